--- BERT (transformers' BertModel), and RoBERTa / XLM-RoBERTa (RobertaModel: the same layers, positions
-- counted from pad_token_id + 1 over the real tokens), with Hugging Face parameter names:
-- embeddings.{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm},
-- encoder.layer.N.{attention.{self.{query,key,value}, output.{dense, LayerNorm}},
-- intermediate.dense, output.{dense, LayerNorm}}, pooler.dense (optional).
-- Plus sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2:
-- mean pooling over the attention mask, then L2 normalisation.
--
--    local bert = require("moonload.models.bert")
--    local model = ml.models.from_pretrained(dir)                  -- a BertModel
--    local out = model(ids, {attention_mask = mask})               -- {last_hidden_state, pooler_output}
--    local emb = model:sentence_embedding(ids, {attention_mask = mask})   -- (B, hidden), unit rows
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")

local M = {}
local WHO = "models.bert"

M.schema = {
   { "vocab_size", "int" },
   { "hidden_size", "int" },
   { "num_hidden_layers", "int" },
   { "num_attention_heads", "int" },
   { "intermediate_size", "int" },
   { "max_position_embeddings", "int", 512 },
   { "type_vocab_size", "int", 2 },
   { "layer_norm_eps", "posnum", 1e-12 },
   { "hidden_act", "string", "gelu" },
   { "position_embedding_type", "string", "absolute" },
   { "add_pooling_layer", "bool", true },
   { "pad_token_id", "int0", 0 },
}

-- RoBERTa's layout (BERT's layers): positions counted from pad_token_id + 1 over the real tokens.
local ROBERTA_TYPES = { roberta = true, ["xlm-roberta"] = true, camembert = true }

--- Reads and checks a BERT config (path, folder or table).
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   if cfg.hidden_size % cfg.num_attention_heads ~= 0 then
      config.fail(cfg, WHO, "hidden_size %d is not divisible by num_attention_heads %d",
         cfg.hidden_size, cfg.num_attention_heads)
   end
   if cfg.position_embedding_type ~= "absolute" then
      config.fail(cfg, WHO, 'position_embedding_type "%s" is not supported (only "absolute")',
         cfg.position_embedding_type)
   end
   common.activation(cfg.hidden_act, WHO, cfg._source)
   cfg.roberta_positions = ROBERTA_TYPES[cfg._raw.model_type] == true
   return cfg
end

-- --- embeddings -----------------------------------------------------------------------------

local BertEmbeddings = nn.Module:extend("BertEmbeddings")
M.BertEmbeddings = BertEmbeddings

function BertEmbeddings:__init(cfg)
   nn.Module.__init(self)
   self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
   self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
   self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
   self.LayerNorm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_eps })
   self.dropout = nn.Dropout(0)
   rawset(self, "pad_id", cfg.roberta_positions and cfg.pad_token_id or nil)
end

--- ids (B, T), token_type_ids (B, T) -> (B, T, hidden)
function BertEmbeddings:forward(ids, token_type_ids)
   local L = ids:size(2)
   local pos
   if self.pad_id then                      -- RoBERTa: pad_id + 1, 2, ... over the real tokens, pad_id at padding
      local real = ids:ne(self.pad_id):to("int64")
      pos = real:cumsum(2) * real + self.pad_id
   else
      pos = T.arange(0, L, { device = ids.device })
   end
   local x = self.word_embeddings(ids) + self.token_type_embeddings(token_type_ids)
      + self.position_embeddings(pos)
   return self.LayerNorm(x)
end

-- --- encoder --------------------------------------------------------------------------------

local BertSelfAttention = nn.Module:extend("BertSelfAttention")
M.BertSelfAttention = BertSelfAttention

function BertSelfAttention:__init(cfg)
   nn.Module.__init(self)
   local Hd = cfg.hidden_size
   self.query = nn.Linear(Hd, Hd)
   self.key = nn.Linear(Hd, Hd)
   self.value = nn.Linear(Hd, Hd)
   self.dropout = nn.Dropout(0)
   rawset(self, "n_head", cfg.num_attention_heads)
   rawset(self, "head_dim", Hd / cfg.num_attention_heads)
end

--- Scaled dot-product self-attention of x (B, T, hidden) through three projections (BERT's query,
-- key and value; MPNet's q, k, v; DistilBERT's q_lin, k_lin, v_lin) over H heads of D; mask: bool
-- (true: attend) or additive, broadcast to (B, H, T, T), or nil -> context (B, T, hidden).
function M.self_attention(q_proj, k_proj, v_proj, x, mask, H, D)
   local B, L, Hd = x:size(1), x:size(2), x:size(3)
   local function heads(proj) return proj(x):view(B, L, H, D):transpose(2, 3) end
   local y = common.attention(heads(q_proj), heads(k_proj), heads(v_proj), mask, false, 1 / math.sqrt(D))
   return y:transpose(2, 3):reshape(B, L, Hd)
end

--- x (B, T, hidden); mask bool (B, 1, 1, T) or nil -> context (B, T, hidden)
function BertSelfAttention:forward(x, mask)
   return M.self_attention(self.query, self.key, self.value, x, mask, self.n_head, self.head_dim)
end

-- BertSelfOutput and BertOutput (two classes in transformers too): dense from the config's
-- in_key size to hidden_size, then LayerNorm of that plus the sublayer's input.
local function residual_output(name, in_key)
   local cls = nn.Module:extend(name)
   function cls:__init(cfg)
      nn.Module.__init(self)
      self.dense = nn.Linear(cfg[in_key], cfg.hidden_size)
      self.LayerNorm = nn.LayerNorm(cfg.hidden_size, { eps = cfg.layer_norm_eps })
      self.dropout = nn.Dropout(0)
   end
   function cls:forward(h, input)
      return self.LayerNorm(self.dense(h) + input)
   end
   return cls
end

local BertSelfOutput = residual_output("BertSelfOutput", "hidden_size")
M.BertSelfOutput = BertSelfOutput

local BertAttention = nn.Module:extend("BertAttention")
M.BertAttention = BertAttention

function BertAttention:__init(cfg)
   nn.Module.__init(self)
   self.self = BertSelfAttention(cfg)
   self.output = BertSelfOutput(cfg)
end

function BertAttention:forward(x, mask)
   return self.output(self.self(x, mask), x)
end

local BertIntermediate = nn.Module:extend("BertIntermediate")
M.BertIntermediate = BertIntermediate

function BertIntermediate:__init(cfg)
   nn.Module.__init(self)
   self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
   self.intermediate_act_fn = common.activation_module(cfg.hidden_act, WHO, cfg._source)
end

function BertIntermediate:forward(x)
   return self.intermediate_act_fn(self.dense(x))
end

local BertOutput = residual_output("BertOutput", "intermediate_size")
M.BertOutput = BertOutput

local BertLayer = nn.Module:extend("BertLayer")
M.BertLayer = BertLayer

function BertLayer:__init(cfg)
   nn.Module.__init(self)
   self.attention = BertAttention(cfg)
   self.intermediate = BertIntermediate(cfg)
   self.output = BertOutput(cfg)
end

function BertLayer:forward(x, mask)
   local a = self.attention(x, mask)
   return self.output(self.intermediate(a), a)
end

local BertEncoder = nn.Module:extend("BertEncoder")
M.BertEncoder = BertEncoder

function BertEncoder:__init(cfg)
   nn.Module.__init(self)
   local layers = {}
   for i = 1, cfg.num_hidden_layers do layers[i] = BertLayer(cfg) end
   self.layer = nn.ModuleList(layers)
   rawset(self, "n_layer", cfg.num_hidden_layers)
end

function BertEncoder:forward(x, mask)
   for i = 1, self.n_layer do x = self.layer[i](x, mask) end
   return x
end

local BertPooler = nn.Module:extend("BertPooler")
M.BertPooler = BertPooler

function BertPooler:__init(cfg)
   nn.Module.__init(self)
   self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
   self.activation = nn.Tanh()
end

--- The first token's hidden state through dense + tanh: (B, T, hidden) -> (B, hidden).
function BertPooler:forward(h)
   return self.activation(self.dense(h:select(2, 1)))
end

-- --- model ----------------------------------------------------------------------------------

local BertModel = nn.Module:extend("BertModel")
M.BertModel = BertModel

BertModel.base_model_prefix = "bert"
BertModel.tied_weights = {}
BertModel.ignore_unexpected = { "^embeddings%.position_ids$", "^embeddings%.token_type_ids$",
   "^pooler%." }
BertModel.no_split_modules = { "BertLayer" }

--- BertModel(config[, {add_pooling_layer = true}]): config is a path, a folder or a table.
-- A checkpoint without pooler weights (as sentence-transformers saves some) loads into a
-- model built with add_pooling_layer = false; from_pretrained decides this from the checkpoint.
function BertModel:__init(cfg, opts)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   local pool = cfg.add_pooling_layer
   if opts and opts.add_pooling_layer ~= nil then pool = opts.add_pooling_layer end
   self.embeddings = BertEmbeddings(cfg)
   self.encoder = BertEncoder(cfg)
   if pool then self.pooler = BertPooler(cfg) end
   rawset(self, "config", cfg)
end

--- forward(input_ids[, {attention_mask, token_type_ids}]) ->
-- {last_hidden_state = (B, T, hidden), pooler_output = (B, hidden) or nil}.
-- input_ids and the masks: int64 tensors (B, T) or Lua lists; ids are 0-based.
function BertModel:forward(input_ids, opts)
   opts = opts or {}
   local who = WHO .. ".forward"
   local ids = common.ids_tensor(input_ids, who)
   common.check_vocab(ids, self.config.vocab_size, who)
   -- Lists become CPU tensors: they go where the weights are (a model moved with :to("cuda:0")).
   ids = common.to_weight_device(ids, self.embeddings.word_embeddings.weight)
   local B, L = ids:size(1), ids:size(2)
   local positions = self.config.max_position_embeddings
   if self.config.roberta_positions then positions = positions - self.config.pad_token_id - 1 end
   if L > positions then
      error(string.format("%s: sequence of %d tokens exceeds the model's %d positions", who, L, positions), 2)
   end
   local tt = opts.token_type_ids
   if tt == nil then
      tt = T.zeros({ B, L }, { dtype = "int64", device = ids.device })
   else
      tt = common.ids_tensor(tt, who)
      common.check_vocab(tt, self.config.type_vocab_size, who .. " (token_type_ids)")
      if tt.device ~= ids.device then tt = tt:to(ids.device) end
   end
   local mask
   if opts.attention_mask ~= nil then
      mask = common.mask_tensor(opts.attention_mask, B, L, who):view(B, 1, 1, L)
      if mask.device ~= ids.device then mask = mask:to(ids.device) end
   end
   local h = self.encoder(self.embeddings(ids, tt), mask)
   local pooled = self.pooler and self.pooler(h) or nil
   return { last_hidden_state = h, pooler_output = pooled }
end

--- The inputs of an encoder without token types (MPNet, DistilBERT, ModernBERT): ids (B, T) on
-- weight's device, checked against vocab_size and max_positions (nil: no limit), and the attention
-- mask as bool (B, T) on that device (true: a real token), or nil. Errors name who and the caller's
-- call (level 3: the forward's caller).
function M.untyped_inputs(input_ids, opts, who, family, vocab_size, weight, max_positions)
   if opts.token_type_ids ~= nil then
      error(string.format("%s: %s has no token types (token_type_ids given)", who, family), 3)
   end
   local ids = common.ids_tensor(input_ids, who)
   common.check_vocab(ids, vocab_size, who)
   ids = common.to_weight_device(ids, weight)     -- (lists become CPU tensors: they go where the weights are)
   local B, L = ids:size(1), ids:size(2)
   if max_positions and L > max_positions then
      error(string.format("%s: sequence of %d tokens exceeds the model's %d positions", who, L, max_positions), 3)
   end
   local real
   if opts.attention_mask ~= nil then real = common.mask_tensor(opts.attention_mask, B, L, who):to(ids.device):ne(0) end
   return ids, real
end

--- Mean of the hidden states over the positions where the mask is 1: (B, T, H), (B, T) -> (B, H).
function M.mean_pooling(hidden, attention_mask)
   local B, L = hidden:size(1), hidden:size(2)
   if attention_mask == nil then return hidden:mean(2) end
   local m = common.mask_tensor(attention_mask, B, L, "mean_pooling"):to(hidden.device):to(hidden.dtype):unsqueeze(3)
   local summed = (hidden * m):sum(2)                       -- (B, H)
   local counts = m:sum(2):clamp(1e-9)                       -- (B, 1)
   return summed / counts
end

--- Rows scaled to unit L2 norm (norms clamped at 1e-12 as torch.nn.functional.normalize does).
function M.normalize(x)
   local norm = (x * x):sum(-1, true):sqrt():clamp(1e-12)
   return x / norm
end

--- The pooled rows of hidden (B, T, H) over the real tokens of attention_mask (B, T), as
-- sentence-transformers' Pooling modes: "mean", "cls" (the first token), "max", "mean_sqrt_len"
-- (the sum over the square root of the count).
function M.pool(hidden, attention_mask, mode)
   -- the other sentence-transformers modes, and several concatenated (a list)
   local st = require("moonload.models.sentence_transformer")
   if type(mode) == "table" or mode == "weightedmean" or mode == "lasttoken" or mode == "mean_sqrt_len_tokens" then
      return st.pool(hidden, attention_mask, mode)
   end
   if mode == "mean" then return M.mean_pooling(hidden, attention_mask) end
   if mode == "cls" then return hidden:select(2, 1) end
   local B, L = hidden:size(1), hidden:size(2)
   local m = attention_mask and common.mask_tensor(attention_mask, B, L, "pool"):to(hidden.device):to(hidden.dtype):unsqueeze(3)
      or T.ones({ B, L, 1 }, { dtype = hidden.dtype, device = hidden.device })
   if mode == "max" then
      return hidden:masked_fill(m:eq(0), -math.huge):max(2)
   end
   if mode == "mean_sqrt_len" then
      return (hidden * m):sum(2) / m:sum(2):clamp(1e-9):sqrt()
   end
   error(string.format('sentence_embedding: pooling must be "mean", "cls", "max", "mean_sqrt_len", "weightedmean" or "lasttoken", got %s',
      tostring(mode)), 3)
end

--- Sentence embeddings as sentence-transformers computes them: BERT, pooling over
-- attention_mask, L2 normalisation. pooling and normalize default to what the model folder's
-- 1_Pooling/config.json and modules.json say (from_pretrained reads them), else mean pooling
-- and normalized rows, as all-MiniLM-L6-v2.
function BertModel:sentence_embedding(input_ids, opts)
   opts = opts or {}
   local out = self(input_ids, { attention_mask = opts.attention_mask,
      token_type_ids = opts.token_type_ids })
   local emb = M.pool(out.last_hidden_state, opts.attention_mask, opts.pooling or self.pooling or "mean")
   local normalize = opts.normalize
   if normalize == nil then normalize = self.normalize_embeddings ~= false end
   if not normalize then return emb end
   return M.normalize(emb)
end

-- sentence-transformers' own files in a model folder: the pooling mode (1_Pooling/config.json)
-- and whether a Normalize module follows (modules.json). Sets model.pooling and
-- model.normalize_embeddings when the files are there.
function M.read_sentence_transformers(model, dir)
   local cjson = require("cjson")
   local function read(path)
      local f = io.open(path, "rb")
      if not f then return nil end
      local ok, t = pcall(cjson.decode, f:read("*a"))
      f:close()
      return ok and type(t) == "table" and t or nil
   end
   local modules = read(dir .. "/modules.json")
   local pooling_dir, normalize = "1_Pooling", false
   for _, m in ipairs(type(modules) == "table" and modules or {}) do
      if type(m) == "table" and type(m.type) == "string" then
         if m.type:find("Pooling$") and type(m.path) == "string" then pooling_dir = m.path end
         if m.type:find("Normalize$") then normalize = true end
      end
   end
   local pc = read(dir .. "/" .. pooling_dir .. "/config.json")
   if pc then                     -- (sentence-transformers 6's pooling_mode, or the older flags)
      local modes = require("moonload.models.sentence_transformer").pooling_modes(pc, dir .. "/" .. pooling_dir)
      rawset(model, "pooling", #modes == 1 and modes[1] or modes)
   end
   if modules then rawset(model, "normalize_embeddings", normalize) end
end

--- RobertaModel (RoBERTa, XLM-RoBERTa, CamemBERT: multilingual E5, BGE-M3, paraphrase-multilingual
-- sentence-transformers): BertModel with RoBERTa's positions and its checkpoints' "roberta." prefix.
local RobertaModel = BertModel:extend("RobertaModel")
M.RobertaModel = RobertaModel
RobertaModel.base_model_prefix = "roberta"
M.XLMRobertaModel = RobertaModel

-- from_pretrained's hooks: sentence-transformers checkpoints may come without the pooler (build
-- to match), and their folder says the pooling and normalization.
function BertModel.build_opts_for(names)
   for _, name in ipairs(names) do
      if name:find("^pooler%.") or name:find("%.pooler%.") then return { add_pooling_layer = true } end
   end
   return { add_pooling_layer = false }
end

function BertModel.read_folder(model, dir) M.read_sentence_transformers(model, dir) end

-- --- sequence classification (cross-encoders, rerankers) ---------------------------------------

--- The number of labels a classifier config gives: num_labels, else its id2label's entries, else 2
-- (transformers' default).
function M.num_labels(cfg, who)
   local raw = cfg._raw or cfg
   local n = raw.num_labels
   if n == nil and type(raw.id2label) == "table" then
      n = 0
      for _ in pairs(raw.id2label) do n = n + 1 end
   end
   n = n or 2
   if type(n) ~= "number" or n < 1 or n % 1 ~= 0 then
      config.fail(cfg, who, "num_labels must be an integer >= 1, got %s", tostring(n))
   end
   return n
end

--- A sequence classifier class: Base (built with add_pooling_layer = pool) under base_key, and
-- head(self, cfg) adding its layers; the class's classify(out, opts) turns the base model's output
-- into logits. forward(input_ids[, {attention_mask, token_type_ids}]) -> {logits = (B,
-- num_labels)}, as BertForSequenceClassification and its kin give them.
function M.classifier_class(name, base_key, Base, pool, head)
   local cls = nn.Module:extend(name)
   cls.base_model_prefix = base_key
   cls.tied_weights = {}
   cls.ignore_unexpected = { "^" .. base_key .. "%.embeddings%.position_ids$",
      "^" .. base_key .. "%.embeddings%.token_type_ids$" }
   cls.no_split_modules = Base.no_split_modules
   function cls:__init(cfg)
      nn.Module.__init(self)
      self[base_key] = Base(cfg, { add_pooling_layer = pool })
      local c = self[base_key].config
      rawset(self, "config", c)
      rawset(self, "num_labels", M.num_labels(c, WHO))
      head(self, c)
   end
   function cls:forward(input_ids, opts)
      local out = self[base_key](input_ids, opts)
      return { logits = self:classify(out, opts or {}) }
   end
   return cls
end

-- BERT's: the pooler's output (the first token through dense + tanh) through one linear layer.
local BertForSequenceClassification = M.classifier_class("BertForSequenceClassification", "bert", BertModel, true,
   function(self, cfg)
      self.dropout = nn.Dropout(0)
      self.classifier = nn.Linear(cfg.hidden_size, self.num_labels)
   end)
M.BertForSequenceClassification = BertForSequenceClassification
function BertForSequenceClassification:classify(out) return self.classifier(out.pooler_output) end

-- RoBERTa's (bge-reranker's): no pooler; the first token through classifier.dense, tanh, out_proj.
local RobertaClassificationHead = nn.Module:extend("RobertaClassificationHead")
M.RobertaClassificationHead = RobertaClassificationHead
function RobertaClassificationHead:__init(cfg, num_labels)
   nn.Module.__init(self)
   self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
   self.dropout = nn.Dropout(0)
   self.out_proj = nn.Linear(cfg.hidden_size, num_labels)
end
function RobertaClassificationHead:forward(h)
   return self.out_proj(self.dense(h:select(2, 1)):tanh())
end

local RobertaForSequenceClassification = M.classifier_class("RobertaForSequenceClassification", "roberta", RobertaModel,
   false, function(self, cfg) self.classifier = RobertaClassificationHead(cfg, self.num_labels) end)
M.RobertaForSequenceClassification = RobertaForSequenceClassification
M.XLMRobertaForSequenceClassification = RobertaForSequenceClassification
function RobertaForSequenceClassification:classify(out) return self.classifier(out.last_hidden_state) end

function M.from_config(cfg, opts) return BertModel(cfg, opts) end

return M
