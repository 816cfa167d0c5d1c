--- StableLM (transformers' StableLmForCausalLM: StableLM-3B-4E1T, StableLM 2 1.6B and 12B,
-- stable-code-3b) with Hugging Face parameter names: model.{embed_tokens, layers.N.{input_layernorm,
-- self_attn.{q,k,v,o}_proj, self_attn.{q_layernorm, k_layernorm}.norms.H, post_attention_layernorm,
-- mlp.{gate,up,down}_proj}, norm}, lm_head.
-- Llama's network with LayerNorms (with biases, layer_norm_eps) in place of RMSNorms, rotary
-- embeddings over the first partial_rotary_factor of each head (0.25 by default; rotate-half), q/k/v
-- biased when use_qkv_bias; StableLM 2 12B adds a LayerNorm per query and key head (qk_layernorm)
-- and one input norm feeding attention and MLP in parallel (use_parallel_residual).
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local phi = require("moonload.models.phi")

local M = {}
local WHO = "models.stablelm"

-- Phi's keys, with StableLM's defaults and its own switches (Phi's q/k norm is StableLM's per head).
M.schema = config.schema_from(phi.schema, {
   max_position_embeddings = { "max_position_embeddings", "int", 4096 },
   hidden_act = { "hidden_act", "string", "silu" },
}, {
   { "use_qkv_bias", "bool", false },
   { "use_parallel_residual", "bool", false },
})

-- (LongRoPE's per-frequency factors and the "dynamic" base growing with the length: not here)
local ROPE_TYPES = { default = true, linear = true, llama3 = true, yarn = true }

local function bad(cfg, key, what, v)
   error(string.format('%s: config key "%s" in %s must be %s, got %s', WHO, key, cfg._source, what,
      type(v) == "string" and string.format("string %q", v) or tostring(v)), 3)
end

--- Reads and checks a StableLM config (path, folder or table) into what Llama's classes read:
-- head_dim, rope (rope_theta, ...), rotary_dim, qkv_bias, o_bias, mlp_bias, layer_windows, and
-- rms_norm_eps (here the LayerNorms' eps).
function M.config(source)
   local cfg = config.load(source, M.schema, WHO)
   local H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
   if cfg.hidden_size % H ~= 0 then
      bad(cfg, "num_attention_heads", "a divisor of hidden_size " .. cfg.hidden_size, H)
   end
   if H % Hkv ~= 0 then bad(cfg, "num_key_value_heads", "a divisor of num_attention_heads " .. H, Hkv) end
   cfg.head_dim = cfg.hidden_size / H        -- (transformers derives it, whatever the file says)
   -- transformers: rope_scaling, when given, stands for rope_parameters; the top level's rope_theta
   -- and partial_rotary_factor fill what the table lacks
   local rp, rp_name = llama.rope_table(cfg, WHO, ROPE_TYPES)
   cfg.rope = llama.rope_from(cfg, WHO, { { { rope_theta = cfg.rope_theta }, "" }, { rp, rp_name .. "." } }, 10000)
   cfg.rope_theta = cfg.rope.rope_theta
   local factor, key = rp.partial_rotary_factor, rp_name .. ".partial_rotary_factor"
   if factor == nil then factor, key = cfg.partial_rotary_factor, "partial_rotary_factor" end
   if factor == nil then factor = 0.25 end
   if type(factor) ~= "number" or factor <= 0 or factor > 1 then bad(cfg, key, "a number in (0, 1]", factor) end
   llama.set_rotary_dim(cfg, WHO, factor)
   common.activation(cfg.hidden_act, WHO, cfg._source)
   cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.use_qkv_bias, false, false
   cfg.qk_norm = false                       -- (its own per-head LayerNorms, not Llama's RMSNorms)
   cfg.rms_norm_eps = cfg.layer_norm_eps     -- (Llama's layers read their norms' eps there)
   cfg.layer_windows = {}
   for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
   return cfg
end

-- --- per-head LayerNorm ----------------------------------------------------------------------

--- StableLmLayerNormPerHead(dim, heads, {eps}): one LayerNorm without bias per head
-- (norms.0 .. norms.{heads-1}, as the checkpoints name them), over (B, T, heads, dim).
local StableLmLayerNormPerHead = nn.Module:extend("StableLmLayerNormPerHead")
M.StableLmLayerNormPerHead = StableLmLayerNormPerHead

function StableLmLayerNormPerHead:__init(dim, heads, opts)
   nn.Module.__init(self)
   local norms = {}
   for h = 1, heads do norms[h] = nn.LayerNorm(dim, { eps = opts and opts.eps, bias = false }) end
   self.norms = nn.ModuleList(norms)
   rawset(self, "dim", dim)
   rawset(self, "eps", opts and opts.eps or 1e-5)
end

--- x (B, T, heads, dim): one normalisation over the last dim for all heads, then each head's
-- weight, (heads, dim) broadcast. Weights offloaded to disk (meta until their own hooks run at
-- their norm's call) take one call per head instead.
function StableLmLayerNormPerHead:forward(x)
   local weights = {}
   for h, norm in ipairs(self.norms) do
      local w = norm.weight
      if w:is_meta() then return self:per_head(x) end
      weights[h] = w
   end
   return nn.functional.layer_norm(x, { self.dim }, nil, nil, self.eps) * T.stack(weights, 1)
end

function StableLmLayerNormPerHead:per_head(x)
   local out = {}
   for h, norm in ipairs(self.norms) do out[h] = norm(x:narrow(3, h, 1)) end
   return T.cat(out, 3)
end

-- --- attention, MLP, layer ------------------------------------------------------------------

local StableLmAttention = llama.LlamaAttention:extend("StableLmAttention")
M.StableLmAttention = StableLmAttention

function StableLmAttention:__init(cfg, layer_idx)
   llama.LlamaAttention.__init(self, cfg, layer_idx)
   if cfg.qk_layernorm then        -- (StableLM 2 12B; before the rotary embedding)
      self.q_layernorm = StableLmLayerNormPerHead(cfg.head_dim, cfg.num_attention_heads, { eps = cfg.layer_norm_eps })
      self.k_layernorm = StableLmLayerNormPerHead(cfg.head_dim, cfg.num_key_value_heads, { eps = cfg.layer_norm_eps })
   end
end

-- Llama's projections, then the q/k norms when the layer has them (Phi's, under the same names).
StableLmAttention.project = phi.PhiAttention.project

local StableLmMLP = llama.LlamaMLP:extend("StableLmMLP")
M.StableLmMLP = StableLmMLP

local StableLmDecoderLayer = llama.LlamaDecoderLayer:extend("StableLmDecoderLayer")
M.StableLmDecoderLayer = StableLmDecoderLayer
StableLmDecoderLayer.Attention, StableLmDecoderLayer.MLP = StableLmAttention, StableLmMLP
StableLmDecoderLayer.Norm = nn.LayerNorm

--- Llama's sequential layer; with use_parallel_residual Cohere's parallel one (one input norm,
-- no post_attention_layernorm).
function StableLmDecoderLayer:__init(cfg, layer_idx)
   local base = cfg.use_parallel_residual and llama.CohereDecoderLayer or llama.LlamaDecoderLayer
   base.__init(self, cfg, layer_idx)
   rawset(self, "parallel", cfg.use_parallel_residual)
end

function StableLmDecoderLayer:forward(x, cos, sin, cache, pad)
   if self.parallel then return llama.parallel_layer_forward(self, x, cos, sin, cache, pad) end
   return llama.LlamaDecoderLayer.forward(self, x, cos, sin, cache, pad)
end

-- --- models ---------------------------------------------------------------------------------

local StableLmRotaryEmbedding = llama.LlamaRotaryEmbedding:extend("StableLmRotaryEmbedding")
M.StableLmRotaryEmbedding = StableLmRotaryEmbedding

local StableLmModel = llama.LlamaModel:extend("StableLmModel")
M.StableLmModel = StableLmModel
StableLmModel.family, StableLmModel.Layer, StableLmModel.Rotary = "stablelm", StableLmDecoderLayer, StableLmRotaryEmbedding
StableLmModel.Norm = nn.LayerNorm

--- StableLmModel(config): a config path, folder or table, or one M.config has checked.
function StableLmModel:__init(cfg)
   if type(cfg) ~= "table" or cfg._source == nil then cfg = M.config(cfg) end
   llama.LlamaModel.__init(self, cfg)
end

local StableLmForCausalLM = llama.LlamaForCausalLM:extend("StableLmForCausalLM")
M.StableLmForCausalLM = StableLmForCausalLM
StableLmForCausalLM.family, StableLmForCausalLM.Model = "stablelm", StableLmModel
StableLmForCausalLM.no_split_modules = { "StableLmDecoderLayer" }

function StableLmForCausalLM:read_config(source) return M.config(source) end

StableLmForCausalLM.forward = common.causal_lm_forward(WHO .. ".forward", "model", "embed_tokens")

return M
