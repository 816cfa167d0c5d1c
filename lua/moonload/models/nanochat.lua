--- NanoChat (NanoChatForCausalLM, model_type "nanochat": karpathy/nanochat-d32) with Hugging Face
-- parameter names: model.{embed_tokens, layers.N.{self_attn.{q,k,v,o}_proj, mlp.{fc1, fc2}}}, lm_head.
-- Llama's layers (models/llama.lua reads the config) with nanochat's changes: RMSNorms without a
-- weight, the final one applied to the embeddings too; per-head q/k norms (weightless as well) after
-- a rotary embedding whose rotate_half turns the other way (cat(x2, -x1)); an ungated MLP,
-- fc2(relu(fc1 x)^2); and the logits soft-capped, cap * tanh(logits / cap) (final_logit_softcapping).
local cjson = require("cjson")
local nn = require("moonload.nn")
local json = require("moonload.utils.json")
local common = require("moonload.models.common")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local gemma = require("moonload.models.gemma")

local M = {}
local WHO = "models.nanochat"

--- Reads and checks a NanoChat config (path, folder or table): Llama's keys with NanoChatConfig's
-- defaults, and cfg.final_logit_softcapping: 15 when absent, nil (no cap) when the file says null.
function M.config(source)
   local cfg = llama.config(source, "nanochat")
   local cap = cfg.final_logit_softcapping
   if cap == nil then
      local raw = type(source) == "table" and source or json.read(cfg._source, WHO, true) or {}
      cap = raw.final_logit_softcapping ~= cjson.null and 15 or nil
   end
   if cap ~= nil and (type(cap) ~= "number" or cap <= 0) then
      config.fail(cfg, WHO, 'config key "final_logit_softcapping" must be a positive number or null, got %s', tostring(cap))
   end
   cfg.final_logit_softcapping = cap
   return cfg
end

--- x / sqrt(mean(x^2) + eps), without a weight (transformers' Llama4TextL2Norm), in float32.
local NanoChatRMSNorm = nn.RMSNorm:extend("NanoChatRMSNorm")
M.NanoChatRMSNorm = NanoChatRMSNorm

function NanoChatRMSNorm:__init(dim, opts)
   nn.RMSNorm.__init(self, dim, { eps = opts and opts.eps, elementwise_affine = false })
end

function NanoChatRMSNorm:extra_repr() return "eps=" .. nn.Module.py_float(self.eps) end

local NanoChatMLP = nn.Module:extend("NanoChatMLP")
M.NanoChatMLP = NanoChatMLP

function NanoChatMLP:__init(cfg)
   nn.Module.__init(self)
   self.activation_fn = common.activation_module(cfg.hidden_act, WHO, cfg._source)
   self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, { bias = false })
   self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, { bias = false })
end

function NanoChatMLP:forward(x) return self.fc2(self.activation_fn(self.fc1(x))) end

local LM = moe.decoder_family("nanochat", "NanoChat", llama.LlamaAttention, NanoChatMLP, "mlp", M.config, M)

-- The q/k norms run where Llama's attention runs Qwen3's, before the rotary embedding: a norm
-- without a weight commutes with a rotation (which keeps each head's length), so this is
-- transformers' rotate-then-normalize.
function M.NanoChatAttention:__init(cfg, layer_idx)
   llama.LlamaAttention.__init(self, cfg, layer_idx)
   self.q_norm = NanoChatRMSNorm(cfg.head_dim, { eps = cfg.rms_norm_eps })
   self.k_norm = NanoChatRMSNorm(cfg.head_dim, { eps = cfg.rms_norm_eps })
end

--- Llama's cos and sin with sin negated: rotate_half's halves swapped the other way round,
-- x * cos + cat(x2, -x1) * sin = x * cos + rotate_half(x) * -sin.
function M.NanoChatRotaryEmbedding:forward(positions, ...)
   local cos, sin = llama.LlamaRotaryEmbedding.forward(self, positions, ...)
   return cos, -sin
end

M.NanoChatDecoderLayer.Norm, M.NanoChatModel.Norm = NanoChatRMSNorm, NanoChatRMSNorm
M.NanoChatModel.norms_embeddings = true        -- (LlamaModel:forward: the final norm on the embeddings first)

local function soft_capped(logits, cfg) return gemma.soft_cap(logits, cfg.final_logit_softcapping) end
LM.forward = llama.scaled_logits_forward(WHO, soft_capped)

return M
