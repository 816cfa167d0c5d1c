--- XGLM (transformers' XGLMForCausalLM: facebook/xglm-564M, 1.7B, 2.9B, 4.5B and 7.5B) with
-- Hugging Face parameter names: model.{embed_tokens, layers.N.{self_attn.{q_proj, k_proj, v_proj,
-- out_proj}, self_attn_layer_norm, fc1, fc2, final_layer_norm}, layer_norm}, lm_head (tied to
-- embed_tokens). OPT's pre-norm layers (models/opt.lua: q scaled before the product, biased
-- projections, a GELU MLP) after word embeddings scaled by sqrt(d_model) (scale_embedding) and
-- fairseq's sinusoidal positions, computed rather than stored: row p + 2 for position p, sines of
-- d_model / 2 frequencies then their cosines, the row of pad_token_id all zeros.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local block_schedule = require("moonload.models.block_schedule")
local opt = require("moonload.models.opt")

local M = {}
local WHO = "models.xglm"
local POSITION_OFFSET = 2

M.schema = {
   { "vocab_size", "int" },
   { "d_model", "int" },
   { "num_layers", "int" },
   { "attention_heads", "int" },
   { "ffn_dim", "int", function(c) return 4 * c.d_model end },
   { "max_position_embeddings", "int", 2048 },
   { "activation_function", "string", "gelu" },
   { "scale_embedding", "bool", true },
   { "add_cross_attention", "bool", false },
   { "tie_word_embeddings", "bool", true },
}

--- Reads and checks an XGLM config (path, folder or table); adds the names OPT's layers read
-- (hidden_size, num_attention_heads, head_dim, enable_bias, ...) and embed_scale.
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   if cfg.d_model % cfg.attention_heads ~= 0 then
      config.fail(cfg, WHO, "d_model %d is not a multiple of attention_heads %d", cfg.d_model, cfg.attention_heads)
   end
   if cfg.add_cross_attention then
      config.fail(cfg, WHO, 'config key "add_cross_attention" must be false (cross-attention to an encoder is not supported)')
   end
   if cfg.pad_token_id ~= nil then config.integer(cfg, WHO, "pad_token_id", cfg.pad_token_id, 0) end
   common.activation(cfg.activation_function, WHO, cfg._source)
   cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers = cfg.d_model, cfg.attention_heads, cfg.num_layers
   cfg.head_dim = cfg.d_model / cfg.attention_heads
   cfg.enable_bias, cfg.layer_norm_elementwise_affine, cfg.do_layer_norm_before = true, true, true
   cfg.embed_scale = cfg.scale_embedding and math.sqrt(cfg.d_model) or 1
   return cfg
end

-- --- sinusoidal positions ---------------------------------------------------------------------

--- The sinusoidal embedding of positions pos (any shape, int64) at frequencies inv_freq (n,
-- float32): (..., 2n), sin(p * f) for every frequency, then cos(p * f), in float32.
function M.sinusoids(pos, inv_freq)
   local angles = pos:float():unsqueeze(-1) * inv_freq                       -- (..., n)
   return T.cat({ angles:sin(), angles:cos() }, -1)
end

local XGLMSinusoidalPositionalEmbedding = nn.Module:extend("XGLMSinusoidalPositionalEmbedding")
M.XGLMSinusoidalPositionalEmbedding = XGLMSinusoidalPositionalEmbedding
XGLMSinusoidalPositionalEmbedding.keep_float32_buffers = { inv_freq = true }

--- (dim, padding_idx or nil): frequencies 10000^(-i / (dim/2 - 1)), i = 0 .. dim/2 - 1.
function XGLMSinusoidalPositionalEmbedding:__init(dim, padding_idx)
   nn.Module.__init(self)
   local half = math.floor(dim / 2)
   local step = math.log(10000) / (half - 1)
   local f = {}
   for i = 1, half do f[i] = math.exp(-(i - 1) * step) end
   self:register_buffer("inv_freq", T.tensor(f, { dtype = "float32" }), false)
   rawset(self, "dim", dim)
   rawset(self, "padding_idx", padding_idx)
end

--- pos (..., T) int64 -> (..., T, dim), float32: the rows pos + 2 of transformers' table.
function XGLMSinusoidalPositionalEmbedding:forward(pos)
   local rows = pos + POSITION_OFFSET
   local emb = M.sinusoids(rows, self.inv_freq)
   if self.dim % 2 == 1 then                                                  -- (an odd width ends in a zero)
      local shape = emb.shape
      shape[#shape] = 1
      emb = T.cat({ emb, T.zeros(shape, { device = emb.device }) }, -1)
   end
   if self.padding_idx then emb = emb * rows:ne(self.padding_idx):float():unsqueeze(-1) end
   return emb
end

-- --- layers and models ------------------------------------------------------------------------

local XGLMAttention = opt.OPTAttention:extend("XGLMAttention")
M.XGLMAttention = XGLMAttention

local XGLMDecoderLayer = opt.OPTDecoderLayer:extend("XGLMDecoderLayer")
M.XGLMDecoderLayer = XGLMDecoderLayer
XGLMDecoderLayer.Attention = XGLMAttention

local XGLMModel = nn.Module:extend("XGLMModel")
M.XGLMModel = XGLMModel
-- the layer class, the name errors give and the config reader: a family built on XGLM's own (BioGPT)
XGLMModel.Layer, XGLMModel.who = XGLMDecoderLayer, WHO
function XGLMModel.read_config(source) return M.config(source) end
function XGLMModel.positions(cfg) return XGLMSinusoidalPositionalEmbedding(cfg.hidden_size, cfg.pad_token_id) end

--- XGLMModel(config): a config path, folder or table, or one read_config has checked.
function XGLMModel:__init(cfg)
   nn.Module.__init(self)
   if type(cfg) ~= "table" or cfg._source == nil then cfg = self.read_config(cfg) end
   self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
   self.embed_positions = self.positions(cfg)
   local layers = {}
   for i = 1, cfg.num_hidden_layers do layers[i] = self.Layer(cfg, i) end
   self.layers = nn.ModuleList(layers)
   self.layer_norm = nn.LayerNorm(cfg.hidden_size)
   rawset(self, "config", cfg)
end

--- input_ids (B, T); cache optional; pad (B, past + T) bool or nil; pos (B, T) or nil (positions
-- past .. past+T-1, as transformers' forward counts them; generate passes them from the mask);
-- blocks: see models/block_schedule.lua. Returns the final hidden states (B, T, hidden_size).
function XGLMModel:forward(input_ids, cache, pad, pos, blocks)
   local cfg = self.config
   local L = input_ids:size(2)
   local past = cache and cache.length or 0
   pos = pos or T.arange(past, past + L, { device = input_ids.device })
   local x = self.embed_tokens(input_ids)
   if cfg.embed_scale ~= 1 then x = x * cfg.embed_scale end
   x = x + self.embed_positions(pos):to(x.dtype)
   local n = cfg.num_hidden_layers
   local schedule = blocks and block_schedule.plan(blocks, x, cache, n, self.who)
   for i = 1, n do x = block_schedule.call(schedule, i, self.layers[i], x, cache, pad) end
   if cache then cache:advance(L) end
   return self.layer_norm(x)
end

local XGLMForCausalLM = nn.Module:extend("XGLMForCausalLM")
M.XGLMForCausalLM = XGLMForCausalLM
XGLMForCausalLM.base_model_prefix = "model"
XGLMForCausalLM.tied_weights = { ["lm_head.weight"] = "model.embed_tokens.weight" }
-- (the table of positions, which checkpoints written by older transformers hold)
XGLMForCausalLM.ignore_unexpected = { "embed_positions%.weights$" }
XGLMForCausalLM.no_split_modules = { "XGLMDecoderLayer" }

--- XGLMForCausalLM(config): config is a config.json path, a folder holding one, or a table.
function XGLMForCausalLM:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.model = XGLMModel(cfg)
   self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
   if cfg.tie_word_embeddings then self.lm_head.weight = self.model.embed_tokens.weight end
end

-- (no max_length: transformers extends its table of positions past max_position_embeddings)
common.causal_lm_methods(XGLMForCausalLM, WHO, "model", "embed_tokens", nil, "num_layers")

function M.from_config(cfg) return XGLMForCausalLM(cfg) end

return M
