--- DistilBERT (transformers' DistilBertModel): distilbert-base-uncased and -cased, and the
-- sentence-transformers DistilBERTs (msmarco-distilbert, distiluse-base-multilingual, ...). Six
-- post-norm layers with transformers' names
-- embeddings.{word_embeddings, position_embeddings, LayerNorm},
-- transformer.layer.N.{attention.{q_lin, k_lin, v_lin, out_lin}, sa_layer_norm, ffn.{lin1, lin2},
-- output_layer_norm}: no token types, no pooler, positions 0, 1, ... (the stored table also when
-- the config says sinusoidal_pos_embds: transformers writes the sinusoids into it and saves them),
-- LayerNorms at eps 1e-12 whatever the config. Sentence embeddings and the sentence-transformers
-- folder files work as for BERT (DistilBertModel is a BertModel with these layers).
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local bert = require("moonload.models.bert")

local M = {}
local WHO = "models.distilbert"
local EPS = 1e-12

M.schema = {
   { "vocab_size", "int", 30522 },
   { "max_position_embeddings", "int", 512 },
   { "sinusoidal_pos_embds", "bool", false },
   { "n_layers", "int", 6 },
   { "n_heads", "int", 12 },
   { "dim", "int", 768 },
   { "hidden_dim", "int", 3072 },
   { "activation", "string", "gelu" },
}

--- Reads and checks a DistilBERT config (path, folder or table).
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   config.multiple(cfg, WHO, "dim", "n_heads")
   common.activation(cfg.activation, WHO, cfg._source)
   return cfg
end

local Embeddings = nn.Module:extend("DistilBertEmbeddings")
M.Embeddings = Embeddings

function Embeddings:__init(cfg)
   nn.Module.__init(self)
   self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
   self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.dim)
   self.LayerNorm = nn.LayerNorm(cfg.dim, { eps = EPS })
   self.dropout = nn.Dropout(0)
end

function Embeddings:forward(ids)
   local pos = T.arange(0, ids:size(2), { device = ids.device })
   return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos))
end

local DistilBertSelfAttention = nn.Module:extend("DistilBertSelfAttention")
M.DistilBertSelfAttention = DistilBertSelfAttention

function DistilBertSelfAttention:__init(cfg)
   nn.Module.__init(self)
   self.q_lin = nn.Linear(cfg.dim, cfg.dim)
   self.k_lin = nn.Linear(cfg.dim, cfg.dim)
   self.v_lin = nn.Linear(cfg.dim, cfg.dim)
   self.out_lin = nn.Linear(cfg.dim, cfg.dim)
   self.dropout = nn.Dropout(0)
   rawset(self, "n_head", cfg.n_heads)
   rawset(self, "head_dim", cfg.dim / cfg.n_heads)
end

--- x (B, T, dim); mask bool (B, 1, 1, T) or nil.
function DistilBertSelfAttention:forward(x, mask)
   return self.out_lin(bert.self_attention(self.q_lin, self.k_lin, self.v_lin, x, mask, self.n_head, self.head_dim))
end

local FFN = nn.Module:extend("DistilBertFFN")
M.FFN = FFN

function FFN:__init(cfg)
   nn.Module.__init(self)
   self.lin1 = nn.Linear(cfg.dim, cfg.hidden_dim)
   self.lin2 = nn.Linear(cfg.hidden_dim, cfg.dim)
   self.activation = common.activation_module(cfg.activation, WHO, cfg._source)
   self.dropout = nn.Dropout(0)
end

function FFN:forward(x) return self.lin2(self.activation(self.lin1(x))) end

local TransformerBlock = nn.Module:extend("TransformerBlock")
M.TransformerBlock = TransformerBlock

function TransformerBlock:__init(cfg)
   nn.Module.__init(self)
   self.attention = DistilBertSelfAttention(cfg)
   self.sa_layer_norm = nn.LayerNorm(cfg.dim, { eps = EPS })
   self.ffn = FFN(cfg)
   self.output_layer_norm = nn.LayerNorm(cfg.dim, { eps = EPS })
end

function TransformerBlock:forward(x, mask)
   local a = self.sa_layer_norm(self.attention(x, mask) + x)
   return self.output_layer_norm(self.ffn(a) + a)
end

local Transformer = nn.Module:extend("DistilBertTransformer")
M.Transformer = Transformer

function Transformer:__init(cfg)
   nn.Module.__init(self)
   local layers = {}
   for i = 1, cfg.n_layers do layers[i] = TransformerBlock(cfg) end
   self.layer = nn.ModuleList(layers)
   rawset(self, "n_layer", cfg.n_layers)
end

function Transformer:forward(x, mask)
   for i = 1, self.n_layer do x = self.layer[i](x, mask) end
   return x
end

local DistilBertModel = bert.BertModel:extend("DistilBertModel")
M.DistilBertModel = DistilBertModel

DistilBertModel.base_model_prefix = "distilbert"
-- (a DistilBertForMaskedLM or classifier checkpoint: its heads are not this model's)
DistilBertModel.ignore_unexpected = { "^embeddings%.position_ids$", "^vocab_", "^pre_classifier%.", "^classifier%.",
   "^qa_outputs%." }
DistilBertModel.no_split_modules = { "TransformerBlock" }

--- DistilBertModel(config): config is a path, a folder or a table.
function DistilBertModel:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.embeddings = Embeddings(cfg)
   self.transformer = Transformer(cfg)
   rawset(self, "config", cfg)
end

--- forward(input_ids[, {attention_mask}]) -> {last_hidden_state = (B, T, dim)}. input_ids and the
-- mask: int64 tensors (B, T) or Lua lists; ids are 0-based.
function DistilBertModel:forward(input_ids, opts)
   local ids, real = bert.untyped_inputs(input_ids, opts or {}, WHO .. ".forward", "DistilBERT", self.config.vocab_size,
      self.embeddings.word_embeddings.weight, self.config.max_position_embeddings)
   local mask = real and real:view(ids:size(1), 1, 1, ids:size(2))
   return { last_hidden_state = self.transformer(self.embeddings(ids), mask) }
end

-- No pooler to build or leave out (BertModel's hook decides that from the checkpoint).
function DistilBertModel.build_opts_for() return nil end

function M.from_config(cfg) return DistilBertModel(cfg) end

return M
