--- OPT (transformers' OPTForCausalLM: facebook/opt-125m .. opt-66b, the model of Accelerate's
-- big-model inference guide) with Hugging Face parameter names:
-- model.decoder.{embed_tokens, embed_positions, project_in, project_out, final_layer_norm,
-- layers.N.{self_attn.{q_proj, k_proj, v_proj, out_proj}, self_attn_layer_norm, fc1, fc2,
-- final_layer_norm}}, lm_head (tied to embed_tokens). Learned positions stored 2 rows down (row
-- p + 2 holds position p), counted from the attention mask; ReLU MLP; LayerNorm before attention
-- and MLP (do_layer_norm_before, every size but 350m) or after them (350m, whose word embeddings
-- are narrower than the model and go through project_in and project_out).
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local block_schedule = require("moonload.models.block_schedule")

local M = {}
local WHO = "models.opt"
local POSITION_OFFSET = 2

M.schema = {
   { "vocab_size", "int" },
   { "hidden_size", "int" },
   { "num_hidden_layers", "int" },
   { "num_attention_heads", "int" },
   { "ffn_dim", "int", function(c) return 4 * c.hidden_size end },
   { "max_position_embeddings", "int", 2048 },
   { "word_embed_proj_dim", "int", function(c) return c.hidden_size end },
   { "do_layer_norm_before", "bool", true },
   { "_remove_final_layer_norm", "bool", false },
   { "activation_function", "string", "relu" },
   { "enable_bias", "bool", true },
   { "layer_norm_elementwise_affine", "bool", true },
   { "tie_word_embeddings", "bool", true },
}

--- Reads and checks an OPT config (path, folder or table).
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   if cfg.hidden_size % cfg.num_attention_heads ~= 0 then
      config.fail(cfg, WHO, "hidden_size %d is not a multiple of num_attention_heads %d", cfg.hidden_size,
         cfg.num_attention_heads)
   end
   cfg.head_dim = cfg.hidden_size / cfg.num_attention_heads
   common.activation(cfg.activation_function, WHO, cfg._source)
   return cfg
end

local function layer_norm(cfg)
   return nn.LayerNorm(cfg.hidden_size, { elementwise_affine = cfg.layer_norm_elementwise_affine })
end

local OPTAttention = nn.Module:extend("OPTAttention")
M.OPTAttention = OPTAttention

--- Key/value heads and head size per cached token, and no score tensor (see LlamaAttention).
function OPTAttention:kv_cache_heads() return self.n_head, self.head_dim, self.n_head, false end

function OPTAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local C, bias = cfg.hidden_size, cfg.enable_bias
   self.k_proj = nn.Linear(C, C, { bias = bias })
   self.v_proj = nn.Linear(C, C, { bias = bias })
   self.q_proj = nn.Linear(C, C, { bias = bias })
   self.out_proj = nn.Linear(C, C, { bias = bias })
   rawset(self, "n_head", cfg.num_attention_heads)
   rawset(self, "head_dim", cfg.head_dim)
   rawset(self, "layer_idx", layer_idx)
end

function OPTAttention:forward(x, cache, pad)
   local B, L = x:size(1), x:size(2)
   local H, D = self.n_head, self.head_dim
   -- (scaled before the product, as OPT's original code does)
   local q = (self.q_proj(x) * (1 / math.sqrt(D))):view(B, L, H, D):transpose(2, 3)
   local k = self.k_proj(x):view(B, L, H, D):transpose(2, 3)
   local v = self.v_proj(x):view(B, L, H, D):transpose(2, 3)
   local past = 0
   if cache then
      past = cache.length
      k, v = cache:update(self.layer_idx, k, v)
   end
   local qa, pa, back = common.queries_to_keys(q, k, pad)
   local y = common.causal_attention(qa, k, v, past, 1.0, pa)                    -- (B, H, T, D)
   if back then y = y:to(back) end
   return self.out_proj(y:transpose(2, 3):reshape(B, L, H * D))
end

local OPTDecoderLayer = nn.Module:extend("OPTDecoderLayer")
M.OPTDecoderLayer = OPTDecoderLayer
OPTDecoderLayer.Attention = OPTAttention              -- (XGLM's and BioGPT's own)

function OPTDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.self_attn = self.Attention(cfg, layer_idx)
   self.self_attn_layer_norm = layer_norm(cfg)
   self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_dim, { bias = cfg.enable_bias })
   self.fc2 = nn.Linear(cfg.ffn_dim, cfg.hidden_size, { bias = cfg.enable_bias })
   self.final_layer_norm = layer_norm(cfg)
   self.act = common.activation_module(cfg.activation_function, WHO, cfg._source)
   rawset(self, "norm_before", cfg.do_layer_norm_before)
end

function OPTDecoderLayer:forward(x, cache, pad)
   if self.norm_before then
      local h = x + self.self_attn(self.self_attn_layer_norm(x), cache, pad)
      return h + self.fc2(self.act(self.fc1(self.final_layer_norm(h))))
   end
   local h = self.self_attn_layer_norm(x + self.self_attn(x, cache, pad))
   return self.final_layer_norm(h + self.fc2(self.act(self.fc1(h))))
end

local OPTDecoder = nn.Module:extend("OPTDecoder")
M.OPTDecoder = OPTDecoder

function OPTDecoder:__init(cfg)
   nn.Module.__init(self)
   self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.word_embed_proj_dim)
   self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
   if cfg.word_embed_proj_dim ~= cfg.hidden_size then
      self.project_out = nn.Linear(cfg.hidden_size, cfg.word_embed_proj_dim, { bias = false })
      self.project_in = nn.Linear(cfg.word_embed_proj_dim, cfg.hidden_size, { bias = false })
   end
   if cfg.do_layer_norm_before and not cfg._remove_final_layer_norm then self.final_layer_norm = layer_norm(cfg) end
   local layers = {}
   for i = 1, cfg.num_hidden_layers do layers[i] = OPTDecoderLayer(cfg, i) end
   self.layers = nn.ModuleList(layers)
   rawset(self, "config", cfg)
end

--- input_ids (B, T); pad (B, past + T) bool or nil; pos (B, T) or nil: positions from the mask as
-- OPT counts them (real tokens before each one; padding at -1), else past .. past+T-1.
function OPTDecoder:forward(input_ids, cache, pad, pos, blocks)
   local cfg = self.config
   local L = input_ids:size(2)
   local past = cache and cache.length or 0
   common.check_positions(WHO, past, L, cfg.max_position_embeddings, "max_position_embeddings", 3)
   if pos == nil and pad ~= nil then
      local m = pad:to("int64")
      pos = (m:cumsum(2) * m - 1):narrow(2, past + 1, L)
   end
   pos = pos or T.arange(past, past + L, { device = input_ids.device })
   local x = self.embed_tokens(input_ids)
   if self.project_in then x = self.project_in(x) end
   x = x + self.embed_positions(pos + POSITION_OFFSET)
   local n = cfg.num_hidden_layers
   local schedule = blocks and block_schedule.plan(blocks, x, cache, n, WHO)
   for i = 1, n do x = block_schedule.call(schedule, i, self.layers[i], x, cache, pad) end
   if cache then cache:advance(L) end
   if self.final_layer_norm then x = self.final_layer_norm(x) end
   if self.project_out then x = self.project_out(x) end
   return x
end

local OPTModel = nn.Module:extend("OPTModel")
M.OPTModel = OPTModel

function OPTModel:__init(cfg)
   nn.Module.__init(self)
   self.decoder = OPTDecoder(cfg)
   rawset(self, "config", cfg)
end

function OPTModel:forward(...) return self.decoder(...) end

local OPTForCausalLM = nn.Module:extend("OPTForCausalLM")
M.OPTForCausalLM = OPTForCausalLM
OPTForCausalLM.base_model_prefix = "model"
OPTForCausalLM.tied_weights = { ["lm_head.weight"] = "model.decoder.embed_tokens.weight" }
OPTForCausalLM.no_split_modules = { "OPTDecoderLayer" }

function OPTForCausalLM:__init(cfg)
   nn.Module.__init(self)
   cfg = M.config(cfg)
   self.model = OPTModel(cfg)
   self.lm_head = nn.Linear(cfg.word_embed_proj_dim, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
   if cfg.tie_word_embeddings then self.lm_head.weight = self.model.decoder.embed_tokens.weight end
end

common.causal_lm_methods(OPTForCausalLM, WHO, "model", "decoder.embed_tokens", nil, "num_hidden_layers", "max_position_embeddings")

function M.from_config(cfg) return OPTForCausalLM(cfg) end

return M
