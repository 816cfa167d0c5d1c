--- CTRL (transformers' CTRLLMHeadModel: Salesforce/ctrl) with Hugging Face parameter names:
-- transformer.{w, h.N.{multi_head_attention.{Wq, Wk, Wv, dense}, ffn.{0, 2}, layernorm1, layernorm2},
-- layernorm}, lm_head (its weight tied to w, with a bias of its own). Word embeddings scaled by
-- sqrt(n_embd) plus sinusoidal positions (sines then cosines at 10000^(-2i / n_embd); transformers'
-- table of n_positions rows, computed here for the positions asked), pre-norm layers of biased
-- attention and a ReLU MLP whose LayerNorms keep eps 1e-6 (layer_norm_epsilon is the final one's).
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local block_schedule = require("moonload.models.block_schedule")
local llama = require("moonload.models.llama")
local xglm = require("moonload.models.xglm")

local M = {}
local WHO = "models.ctrl"
local LAYER_EPS = 1e-6                  -- (transformers' EncoderLayer, whatever the config says)

M.schema = {
   { "vocab_size", "int" },
   { "n_positions", "int", 256 },
   { "n_embd", "int" },
   { "dff", "int" },
   { "n_layer", "int" },
   { "n_head", "int" },
   { "layer_norm_epsilon", "posnum", 1e-6 },
   { "tie_word_embeddings", "bool", true },
}

--- Reads and checks a CTRL config (path, folder or table); adds the names Llama's attention
-- reads (num_attention_heads, num_key_value_heads, head_dim).
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   if cfg.n_embd % cfg.n_head ~= 0 then
      config.fail(cfg, WHO, "n_embd %d is not divisible by n_head %d", cfg.n_embd, cfg.n_head)
   end
   if cfg.n_embd % 2 ~= 0 then
      config.fail(cfg, WHO, "n_embd %d must be even (its positions are as many sines as cosines)", cfg.n_embd)
   end
   cfg.num_attention_heads, cfg.num_key_value_heads = cfg.n_head, cfg.n_head
   cfg.head_dim = cfg.n_embd / cfg.n_head
   return cfg
end

--- CTRL's positional encoding of positions pos (any shape, int64) for width d: (..., d), float32,
-- its frequencies computed in float32 as transformers' table is.
function M.positional_encoding(pos, d)
   local exps = T.arange(0, d, 2, { dtype = "float32", device = pos.device }) / d
   local inv_freq = T.full({ d / 2 }, 10000, { dtype = "float32", device = pos.device }):pow(exps):reciprocal()
   return xglm.sinusoids(pos, inv_freq)
end

-- --- layers ---------------------------------------------------------------------------------

--- Llama's attention without rotary embeddings (the positions are in the embeddings), under
-- CTRL's names.
local MultiHeadAttention = llama.LlamaAttention:extend("MultiHeadAttention")
M.MultiHeadAttention = MultiHeadAttention
MultiHeadAttention.out_name = "dense"

function MultiHeadAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local C = cfg.n_embd
   self.Wq = nn.Linear(C, C)
   self.Wk = nn.Linear(C, C)
   self.Wv = nn.Linear(C, C)
   self.dense = nn.Linear(C, C)
   llama.attention_geometry(self, cfg, layer_idx)
   rawset(self, "nope", true)
end

function MultiHeadAttention:project(x, B, L)
   local H, D = self.n_head, self.head_dim
   return self.Wq(x):view(B, L, H, D), self.Wk(x):view(B, L, H, D), self.Wv(x):view(B, L, H, D)
end

local EncoderLayer = nn.Module:extend("EncoderLayer")
M.EncoderLayer = EncoderLayer

function EncoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.multi_head_attention = MultiHeadAttention(cfg, layer_idx)
   self.ffn = nn.Sequential(nn.Linear(cfg.n_embd, cfg.dff), nn.ReLU(), nn.Linear(cfg.dff, cfg.n_embd))
   self.layernorm1 = nn.LayerNorm(cfg.n_embd, { eps = LAYER_EPS })
   self.layernorm2 = nn.LayerNorm(cfg.n_embd, { eps = LAYER_EPS })
end

function EncoderLayer:forward(x, cache, pad)
   x = x + self.multi_head_attention(self.layernorm1(x), nil, nil, cache, pad)
   return x + self.ffn(self.layernorm2(x))
end

-- --- models ---------------------------------------------------------------------------------

local CTRLModel = nn.Module:extend("CTRLModel")
M.CTRLModel = CTRLModel

--- CTRLModel(config): a config path, folder or table, or one M.config has checked.
function CTRLModel:__init(cfg)
   nn.Module.__init(self)
   if type(cfg) ~= "table" or cfg._source == nil then cfg = M.config(cfg) end
   self.w = nn.Embedding(cfg.vocab_size, cfg.n_embd)
   self.dropout = nn.Dropout(0)
   local layers = {}
   for i = 1, cfg.n_layer do layers[i] = EncoderLayer(cfg, i) end
   self.h = nn.ModuleList(layers)
   self.layernorm = nn.LayerNorm(cfg.n_embd, { eps = cfg.layer_norm_epsilon })
   rawset(self, "config", cfg)
   rawset(self, "embed_scale", math.sqrt(cfg.n_embd))
end

--- input_ids (B, T); cache optional; pad (B, past + T) bool or nil; pos (B, T) or nil (positions
-- past .. past+T-1); blocks: see models/block_schedule.lua. Returns the final hidden states (B, T, C).
function CTRLModel:forward(input_ids, cache, pad, pos, blocks)
   local cfg = self.config
   local L = input_ids:size(2)
   local past = cache and cache.length or 0
   common.check_positions(WHO, past, L, cfg.n_positions, "n_positions", 3)
   local x = self.w(input_ids) * self.embed_scale
   -- (computed where the embeddings are: an offloaded w hands them back on the execution device)
   pos = pos and pos:to(x.device) or T.arange(past, past + L, { device = x.device })
   x = x + M.positional_encoding(pos, cfg.n_embd):to(x.dtype)
   local n = cfg.n_layer
   local schedule = blocks and block_schedule.plan(blocks, x, cache, n, WHO)
   for i = 1, n do x = block_schedule.call(schedule, i, self.h[i], x, cache, pad) end
   if cache then cache:advance(L) end
   return self.layernorm(x)
end

local CTRLLMHeadModel = nn.Module:extend("CTRLLMHeadModel")
M.CTRLLMHeadModel = CTRLLMHeadModel
CTRLLMHeadModel.base_model_prefix = "transformer"
CTRLLMHeadModel.tied_weights = { ["lm_head.weight"] = "transformer.w.weight" }
CTRLLMHeadModel.no_split_modules = { "EncoderLayer" }

--- CTRLLMHeadModel(config): config is a config.json path, a folder holding one, or a table.
function CTRLLMHeadModel:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.transformer = CTRLModel(cfg)
   self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size)
   rawset(self, "config", cfg)
   if cfg.tie_word_embeddings then self.lm_head.weight = self.transformer.w.weight end
end

common.causal_lm_methods(CTRLLMHeadModel, WHO, "transformer", "w", nil, "n_layer", "n_positions")

function M.from_config(cfg) return CTRLLMHeadModel(cfg) end

return M
