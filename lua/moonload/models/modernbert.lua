--- ModernBERT (transformers' ModernBertModel): ModernBERT-base and -large, gte-modernbert-base,
-- modernbert-embed-base and the other sentence-transformers ModernBERTs. Pre-norm layers with
-- transformers' names
-- embeddings.{tok_embeddings, norm}, layers.N.{attn_norm (none in layer 0), attn.{Wqkv, Wo},
-- mlp_norm, mlp.{Wi, Wo}}, final_norm; and what differs from BERT:
--  * no position table: rotary embeddings (GPT-NeoX's halves), one base for the full-attention
--    layers (160000) and one for the sliding ones (10000);
--  * the layers alternate: every global_attn_every_n_layers-th (from the first) attends to all the
--    keys, the others to those within local_attention / 2 positions either side (layer_types);
--  * a gated MLP: Wi gives the input and the gate, Wo(act(input) * gate);
--  * LayerNorms and linears without biases unless norm_bias, attention_bias, mlp_bias.
-- Sentence embeddings and the sentence-transformers folder files work as for BERT (ModernBertModel
-- is a BertModel with these layers).
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local bert = require("moonload.models.bert")
local llama = require("moonload.models.llama")

local M = {}
local WHO = "models.modernbert"

M.schema = {
   { "vocab_size", "int", 50368 },
   { "hidden_size", "int", 768 },
   { "intermediate_size", "int", 1152 },
   { "num_hidden_layers", "int", 22 },
   { "num_attention_heads", "int", 12 },
   { "hidden_activation", "string", "gelu" },
   { "max_position_embeddings", "int", 8192 },
   { "norm_eps", "posnum", 1e-5 },
   { "norm_bias", "bool", false },
   { "attention_bias", "bool", false },
   { "mlp_bias", "bool", false },
   { "local_attention", "int", 128 },
   { "global_attn_every_n_layers", "int", 3 },
   { "global_rope_theta", "posnum", 160000.0 },
   { "local_rope_theta", "posnum", 10000.0 },
   { "rope_parameters", "table", function() return {} end },
   { "classifier_pooling", "string", "cls" },
   { "classifier_activation", "string", "gelu" },
   { "classifier_bias", "bool", false },
}

local KINDS = { "full_attention", "sliding_attention" }

-- One kind of layer's rope base: rope_parameters[kind].rope_theta (transformers 5's files), else
-- the older key, else its default; any rope type but "default" refused.
local function rope_theta(cfg, kind, older)
   local rp = cfg.rope_parameters[kind]
   if rp == nil then return cfg[older] end
   if type(rp) ~= "table" then config.fail(cfg, WHO, "rope_parameters.%s must be a table", kind) end
   local rope_type = rp.rope_type or rp.type or "default"
   if rope_type ~= "default" then
      config.fail(cfg, WHO, 'rope_parameters.%s: rope type "%s" is not supported (only "default")', kind, tostring(rope_type))
   end
   local theta = rp.rope_theta
   if theta == nil then return cfg[older] end
   if type(theta) ~= "number" or theta <= 0 then
      config.fail(cfg, WHO, "rope_parameters.%s.rope_theta must be a number > 0, got %s", kind, tostring(theta))
   end
   return theta
end

--- Reads and checks a ModernBERT config (path, folder or table).
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   config.multiple(cfg, WHO, "hidden_size", "num_attention_heads")
   cfg.head_dim = cfg.hidden_size / cfg.num_attention_heads
   if cfg.head_dim % 2 ~= 0 then config.fail(cfg, WHO, "the head size %d is odd (rotary pairs)", cfg.head_dim) end
   cfg.theta = { full_attention = rope_theta(cfg, "full_attention", "global_rope_theta"),
      sliding_attention = rope_theta(cfg, "sliding_attention", "local_rope_theta") }
   cfg.window = math.floor(cfg.local_attention / 2)      -- (ModernBertConfig.sliding_window)
   cfg.layer_types = config.layer_types(cfg, WHO, KINDS, function(i)
      return (i - 1) % cfg.global_attn_every_n_layers == 0 and "full_attention" or "sliding_attention"
   end)
   common.activation(cfg.hidden_activation, WHO, cfg._source)
   common.activation(cfg.classifier_activation, WHO, cfg._source)
   if cfg.classifier_pooling ~= "cls" and cfg.classifier_pooling ~= "mean" then
      config.fail(cfg, WHO, 'classifier_pooling "%s" is not supported ("cls" or "mean")', cfg.classifier_pooling)
   end
   return cfg
end

local ModernBertEmbeddings = nn.Module:extend("ModernBertEmbeddings")
M.ModernBertEmbeddings = ModernBertEmbeddings

function ModernBertEmbeddings:__init(cfg)
   nn.Module.__init(self)
   self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
   self.norm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.norm_eps, bias = cfg.norm_bias })
   self.drop = nn.Dropout(0)
end

function ModernBertEmbeddings:forward(ids) return self.norm(self.tok_embeddings(ids)) end

local ModernBertAttention = nn.Module:extend("ModernBertAttention")
M.ModernBertAttention = ModernBertAttention

function ModernBertAttention:__init(cfg)
   nn.Module.__init(self)
   local Hd = cfg.hidden_size
   self.Wqkv = nn.Linear(Hd, 3 * Hd, { bias = cfg.attention_bias })
   self.Wo = nn.Linear(Hd, Hd, { bias = cfg.attention_bias })
   rawset(self, "n_head", cfg.num_attention_heads)
   rawset(self, "head_dim", cfg.head_dim)
end

--- x (B, T, hidden); cos, sin (T, D) in x's dtype; mask bool (B, 1, T or 1, T) or nil.
function ModernBertAttention:forward(x, cos, sin, mask)
   local B, L, Hd = x:size(1), x:size(2), x:size(3)
   local H, D = self.n_head, self.head_dim
   local qkv = self.Wqkv(x):view(B, L, 3, H, D)
   local function part(i) return qkv:select(3, i):transpose(2, 3) end      -- (B, H, T, D)
   local q = llama.apply_rotary(part(1), cos, sin)
   local k = llama.apply_rotary(part(2), cos, sin)
   local y = common.attention(q, k, part(3), mask, false, 1 / math.sqrt(D))
   return self.Wo(y:transpose(2, 3):reshape(B, L, Hd))
end

local ModernBertMLP = nn.Module:extend("ModernBertMLP")
M.ModernBertMLP = ModernBertMLP

function ModernBertMLP:__init(cfg)
   nn.Module.__init(self)
   self.Wi = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, { bias = cfg.mlp_bias })
   self.act = common.activation_module(cfg.hidden_activation, WHO, cfg._source)
   self.drop = nn.Dropout(0)
   self.Wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size, { bias = cfg.mlp_bias })
   rawset(self, "inner", cfg.intermediate_size)
end

function ModernBertMLP:forward(x)
   local h = self.Wi(x)
   local n = self.inner
   return self.Wo(self.act(h:narrow(-1, 1, n)) * h:narrow(-1, n + 1, n))
end

local ModernBertEncoderLayer = nn.Module:extend("ModernBertEncoderLayer")
M.ModernBertEncoderLayer = ModernBertEncoderLayer

function ModernBertEncoderLayer:__init(cfg, i)
   nn.Module.__init(self)
   if i > 1 then self.attn_norm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.norm_eps, bias = cfg.norm_bias }) end
   self.attn = ModernBertAttention(cfg)
   self.mlp_norm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.norm_eps, bias = cfg.norm_bias })
   self.mlp = ModernBertMLP(cfg)
   rawset(self, "kind", cfg.layer_types[i])
end

function ModernBertEncoderLayer:forward(x, cos, sin, mask)
   local normed = self.attn_norm and self.attn_norm(x) or x       -- (layer 0: transformers' Identity)
   x = x + self.attn(normed, cos, sin, mask)
   return x + self.mlp(self.mlp_norm(x))
end

-- No weights: the frequencies of each kind of layer, as transformers' rotary_emb buffers.
local ModernBertRotaryEmbedding = nn.Module:extend("ModernBertRotaryEmbedding")
M.ModernBertRotaryEmbedding = ModernBertRotaryEmbedding

function ModernBertRotaryEmbedding:__init(cfg)
   nn.Module.__init(self)
   for _, kind in ipairs(KINDS) do
      self[kind] = llama.LlamaRotaryEmbedding({ head_dim = cfg.head_dim, rope_theta = cfg.theta[kind] })
   end
end

local ModernBertModel = bert.BertModel:extend("ModernBertModel")
M.ModernBertModel = ModernBertModel

ModernBertModel.base_model_prefix = "model"
-- (a masked-LM or classifier checkpoint: its heads are not this model's)
ModernBertModel.ignore_unexpected = { "^head%.", "^decoder%.", "^classifier%.", "^drop%." }
ModernBertModel.no_split_modules = { "ModernBertEncoderLayer" }

--- ModernBertModel(config): config is a path, a folder or a table.
function ModernBertModel:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.embeddings = ModernBertEmbeddings(cfg)
   local layers = {}
   for i = 1, cfg.num_hidden_layers do layers[i] = ModernBertEncoderLayer(cfg, i) end
   self.layers = nn.ModuleList(layers)
   self.final_norm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.norm_eps, bias = cfg.norm_bias })
   self.rotary_emb = ModernBertRotaryEmbedding(cfg)
   rawset(self, "config", cfg)
end

--- forward(input_ids[, {attention_mask}]) -> {last_hidden_state = (B, T, hidden)}. input_ids and
-- the mask: int64 tensors (B, T) or Lua lists; ids are 0-based.
function ModernBertModel:forward(input_ids, opts)
   local ids, real = bert.untyped_inputs(input_ids, opts or {}, WHO .. ".forward", "ModernBERT", self.config.vocab_size,
      self.embeddings.tok_embeddings.weight)
   local B, L = ids:size(1), ids:size(2)
   local x = self.embeddings(ids)
   local dev = x.device
   local pad = real and real:view(B, 1, 1, L)
   local positions = T.arange(0, L, { device = dev })
   local masks, tables = {}, {}
   for _, kind in ipairs(KINDS) do
      local cos, sin = self.rotary_emb[kind](positions)
      tables[kind] = { llama.rotary_for(cos, sin, x) }
      masks[kind] = pad
   end
   local W = self.config.window
   if L > W + 1 then                           -- keys within W positions either side
      local band = T.ones({ L, L }, { dtype = "bool", device = dev }):tril(W):triu(-W)
      masks.sliding_attention = pad and band:view(1, 1, L, L):logical_and(pad) or band:view(1, 1, L, L)
   end
   for i = 1, #self.layers do
      local layer = self.layers[i]
      local r = tables[layer.kind]
      x = layer(x, r[1], r[2], masks[layer.kind])
   end
   return { last_hidden_state = self.final_norm(x) }
end

-- No pooler to build or leave out (BertModel's hook decides that from the checkpoint).
function ModernBertModel.build_opts_for() return nil end

-- --- sequence classification (gte-reranker-modernbert) ------------------------------------------

-- dense, its activation, a LayerNorm: what the classifier reads the pooled state through
local ModernBertPredictionHead = nn.Module:extend("ModernBertPredictionHead")
M.ModernBertPredictionHead = ModernBertPredictionHead

function ModernBertPredictionHead:__init(cfg)
   nn.Module.__init(self)
   self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, { bias = cfg.classifier_bias })
   self.act = common.activation_module(cfg.classifier_activation, WHO, cfg._source)
   self.norm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.norm_eps, bias = cfg.norm_bias })
end

function ModernBertPredictionHead:forward(x) return self.norm(self.act(self.dense(x))) end

--- ModernBertForSequenceClassification: the first token's state (classifier_pooling "cls") or the
-- mean over the real tokens ("mean") through the head, then classifier.
local ModernBertForSequenceClassification = bert.classifier_class("ModernBertForSequenceClassification", "model",
   ModernBertModel, false, function(self, cfg)
      self.head = ModernBertPredictionHead(cfg)
      self.drop = nn.Dropout(0)
      self.classifier = nn.Linear(cfg.hidden_size, self.num_labels)
   end)
M.ModernBertForSequenceClassification = ModernBertForSequenceClassification

function ModernBertForSequenceClassification:classify(out, opts)
   local h = out.last_hidden_state
   local pooled = self.config.classifier_pooling == "cls" and h:select(2, 1) or bert.mean_pooling(h, opts.attention_mask)
   return self.classifier(self.head(pooled))
end

function M.from_config(cfg) return ModernBertModel(cfg) end

return M
