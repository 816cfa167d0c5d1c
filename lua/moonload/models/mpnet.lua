--- MPNet (transformers' MPNetModel): the encoder of all-mpnet-base-v2, multi-qa-mpnet and the other
-- sentence-transformers MPNets. BERT's layers with transformers' names
-- embeddings.{word_embeddings, position_embeddings, LayerNorm},
-- encoder.layer.N.{attention.{attn.{q,k,v,o}, LayerNorm}, intermediate.dense, output.{dense, LayerNorm}},
-- encoder.relative_attention_bias, pooler.dense (optional); and what differs from BERT:
--  * no token types; positions counted as RoBERTa counts them, from padding id 1 (fixed in
--    transformers, whatever the config's pad_token_id) over the real tokens;
--  * every layer adds one relative position bias to its scores: T5's bidirectional buckets
--    (32 of them, up to a distance of 128, whatever relative_attention_num_buckets says: that
--    only sizes the table) looked up in the encoder's table.
-- Sentence embeddings, pooling and the sentence-transformers folder files work as for BERT
-- (models/bert.lua: MPNetModel is a BertModel with these layers).
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local bert = require("moonload.models.bert")
local t5 = require("moonload.models.t5")

local M = {}
local WHO = "models.mpnet"

local PAD = 1                      -- MPNetEmbeddings.padding_idx
local BUCKETS, MAX_DISTANCE = 32, 128   -- MPNetEncoder.compute_position_bias's defaults

M.schema = {
   { "vocab_size", "int", 30527 },
   { "hidden_size", "int", 768 },
   { "num_hidden_layers", "int", 12 },
   { "num_attention_heads", "int", 12 },
   { "intermediate_size", "int", 3072 },
   { "max_position_embeddings", "int", 514 },
   { "relative_attention_num_buckets", "int", 32 },
   { "layer_norm_eps", "posnum", 1e-12 },
   { "hidden_act", "string", "gelu" },
   { "add_pooling_layer", "bool", true },
}

--- Reads and checks an MPNet config (path, folder or table).
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   config.multiple(cfg, WHO, "hidden_size", "num_attention_heads")
   if cfg.relative_attention_num_buckets < BUCKETS then
      config.fail(cfg, WHO, "relative_attention_num_buckets %d is below the %d buckets the bias looks up",
         cfg.relative_attention_num_buckets, BUCKETS)
   end
   if cfg.max_position_embeddings < PAD + 2 then
      config.fail(cfg, WHO, "max_position_embeddings %d leaves no position after the padding id %d",
         cfg.max_position_embeddings, PAD)
   end
   common.activation(cfg.hidden_act, WHO, cfg._source)
   return cfg
end

-- --- embeddings -----------------------------------------------------------------------------

local MPNetEmbeddings = nn.Module:extend("MPNetEmbeddings")
M.MPNetEmbeddings = MPNetEmbeddings

function MPNetEmbeddings:__init(cfg)
   nn.Module.__init(self)
   self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
   self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
   self.LayerNorm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_eps })
   self.dropout = nn.Dropout(0)
end

--- ids (B, T) -> (B, T, hidden): positions PAD + 1, PAD + 2, ... over the real tokens, PAD at padding.
function MPNetEmbeddings:forward(ids)
   local real = ids:ne(PAD):to("int64")
   local pos = real:cumsum(2) * real + PAD
   return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos))
end

-- --- encoder --------------------------------------------------------------------------------

local MPNetSelfAttention = nn.Module:extend("MPNetSelfAttention")
M.MPNetSelfAttention = MPNetSelfAttention

function MPNetSelfAttention:__init(cfg)
   nn.Module.__init(self)
   local Hd = cfg.hidden_size
   self.q = nn.Linear(Hd, Hd)
   self.k = nn.Linear(Hd, Hd)
   self.v = nn.Linear(Hd, Hd)
   self.o = nn.Linear(Hd, Hd)
   self.dropout = nn.Dropout(0)
   rawset(self, "n_head", cfg.num_attention_heads)
   rawset(self, "head_dim", Hd / cfg.num_attention_heads)
end

--- x (B, T, hidden); bias: the additive scores (B or 1, H, T, T), position bias plus padding.
function MPNetSelfAttention:forward(x, bias)
   return self.o(bert.self_attention(self.q, self.k, self.v, x, bias, self.n_head, self.head_dim))
end

local MPNetAttention = nn.Module:extend("MPNetAttention")
M.MPNetAttention = MPNetAttention

function MPNetAttention:__init(cfg)
   nn.Module.__init(self)
   self.attn = MPNetSelfAttention(cfg)
   self.LayerNorm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_eps })
   self.dropout = nn.Dropout(0)
end

function MPNetAttention:forward(x, bias)
   return self.LayerNorm(self.attn(x, bias) + x)
end

local MPNetLayer = nn.Module:extend("MPNetLayer")
M.MPNetLayer = MPNetLayer

function MPNetLayer:__init(cfg)
   nn.Module.__init(self)
   self.attention = MPNetAttention(cfg)
   self.intermediate = bert.BertIntermediate(cfg)
   self.output = bert.BertOutput(cfg)
end

function MPNetLayer:forward(x, bias)
   local a = self.attention(x, bias)
   return self.output(self.intermediate(a), a)
end

local MPNetEncoder = nn.Module:extend("MPNetEncoder")
M.MPNetEncoder = MPNetEncoder

function MPNetEncoder:__init(cfg)
   nn.Module.__init(self)
   local layers = {}
   for i = 1, cfg.num_hidden_layers do layers[i] = MPNetLayer(cfg) end
   self.layer = nn.ModuleList(layers)
   self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_attention_heads)
   rawset(self, "n_layer", cfg.num_hidden_layers)
end

--- x (B, T, hidden); pad (B, T) bool (true: a real token) or nil. The position bias, computed once,
-- goes to every layer with the padded keys at -inf.
function MPNetEncoder:forward(x, pad)
   local B, L = x:size(1), x:size(2)
   local bias = t5.relative_bias(self.relative_attention_bias, L, L, 0, true, BUCKETS, MAX_DISTANCE, x.dtype)
   if pad then
      bias = bias:masked_fill(pad:logical_not():view(B, 1, 1, L), -math.huge)     -- (B, H, T, T)
   end
   for i = 1, self.n_layer do x = self.layer[i](x, bias) end
   return x
end

-- --- model ----------------------------------------------------------------------------------

local MPNetModel = bert.BertModel:extend("MPNetModel")
M.MPNetModel = MPNetModel

MPNetModel.base_model_prefix = "mpnet"
MPNetModel.ignore_unexpected = { "^embeddings%.position_ids$", "^pooler%.", "^lm_head%." }
MPNetModel.no_split_modules = { "MPNetLayer" }

--- MPNetModel(config[, {add_pooling_layer = true}]): config is a path, a folder or a table. As for
-- BERT, from_pretrained builds it without the pooler when the checkpoint has none.
function MPNetModel:__init(cfg, opts)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   local pool = cfg.add_pooling_layer
   if opts and opts.add_pooling_layer ~= nil then pool = opts.add_pooling_layer end
   self.embeddings = MPNetEmbeddings(cfg)
   self.encoder = MPNetEncoder(cfg)
   if pool then self.pooler = bert.BertPooler(cfg) end
   rawset(self, "config", cfg)
end

--- forward(input_ids[, {attention_mask}]) -> {last_hidden_state = (B, T, hidden), pooler_output =
-- (B, hidden) or nil}. input_ids and the mask: int64 tensors (B, T) or Lua lists; ids are 0-based.
function MPNetModel:forward(input_ids, opts)
   local ids, real = bert.untyped_inputs(input_ids, opts or {}, WHO .. ".forward", "MPNet", self.config.vocab_size,
      self.embeddings.word_embeddings.weight, self.config.max_position_embeddings - PAD - 1)
   local h = self.encoder(self.embeddings(ids), real)
   return { last_hidden_state = h, pooler_output = self.pooler and self.pooler(h) or nil }
end

function M.from_config(cfg, opts) return MPNetModel(cfg, opts) end

return M
