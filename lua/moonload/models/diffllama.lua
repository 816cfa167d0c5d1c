--- DiffLlama (DiffLlamaForCausalLM, model_type "diffllama": kajuma/DiffLlama-0.3B-handcut) with
-- Hugging Face parameter names, as transformers builds it: Llama's layers
-- (biases on the attention as attention_bias says, an unbiased SwiGLU MLP) with differential
-- attention (https://huggingface.co/papers/2410.05258).
--
-- Differential attention: the keys and values are cached and the scores softmaxed as Llama's; each
-- head attends over two values, its kv head's counterpart in the first half of the kv heads and in
-- the second (transformers' chunk and repeat), side by side (2 x head_dim). The second half of the
-- heads is then subtracted from the first, times lambda = exp(lambda_q1 . lambda_k1) -
-- exp(lambda_q2 . lambda_k2) + lambda_init (lambda_init = 0.8 - 0.6 exp(-0.3 layer), layers from 0),
-- and each of those heads' 2 x head_dim values normed (an RMSNorm without weight, groupnorm) and
-- scaled by 1 - lambda_init before o_proj.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")

local M = {}
local WHO = "models.diffllama"

-- DiffLlamaConfig's defaults where Llama's reader would take others.
local DEFAULTS = { vocab_size = 32000, hidden_size = 2048, intermediate_size = 8192, num_hidden_layers = 16,
   num_attention_heads = 32, rms_norm_eps = 1e-5 }

--- Reads and checks a DiffLlama config (path, folder or table) with DiffLlamaConfig's defaults;
-- refuses what transformers refuses (odd num_key_value_heads, attention_dropout).
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   local cfg = llama.config(fixed, "diffllama")
   cfg._source, cfg._raw = src, raw
   cfg.mlp_bias = false                    -- (Mistral's MLP, whatever the file says)
   if cfg.num_key_value_heads % 2 ~= 0 then
      config.fail(cfg, WHO, 'config key "num_key_value_heads" must be even (the values split in two halves), got %d',
         cfg.num_key_value_heads)
   end
   local dropout = cfg.attention_dropout
   if dropout ~= nil and (type(dropout) ~= "number" or dropout ~= 0) then
      config.fail(cfg, WHO, 'config key "attention_dropout" must be 0 (differential attention defines no dropout), got %s',
         tostring(dropout))
   end
   return cfg
end

local Attention = llama.LlamaAttention:extend("DifferentialAttention")
M.DifferentialAttention = Attention

function Attention:__init(cfg, layer_idx)
   llama.LlamaAttention.__init(self, cfg, layer_idx)
   local D = cfg.head_dim
   for _, name in ipairs({ "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2" }) do
      self[name] = nn.Module.new_parameter({ D })
   end
   self.groupnorm = nn.RMSNorm(2 * D, { eps = cfg.rms_norm_eps, elementwise_affine = false })
   rawset(self, "lambda_init", 0.8 - 0.6 * math.exp(-0.3 * (layer_idx - 1)))
end

--- The learned lambda: exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init (float32 dots).
function Attention:lambda()
   local function dot(a, b) return (a:float() * b:float()):sum():item() end
   return math.exp(dot(self.lambda_q1, self.lambda_k1)) - math.exp(dot(self.lambda_q2, self.lambda_k2)) + self.lambda_init
end

--- For memory planning (utils/runtime_memory.lua): Llama's q, k, v and output, the values doubled for
-- every key (the halves side by side, and the two copies before), and the output twice as wide with
-- its difference and norm.
function Attention:activation_values(L, S)
   local H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
   return 2 * (H * D + 2 * Hkv * D) * L + 4 * S * Hkv * D + 4 * L * H * D
end

--- q (B, H, T, D) over the cached k, v (B, Hkv, S, D): (B, T, H * D), the differential combination.
function Attention:attend_heads(q, k, v, past, pad)
   if rawget(k, "_q8_scales") then                                         -- an int8 cache
      local floats = require("moonload.models.kv_cache").floats
      k, v = floats(k, q.dtype), floats(v, q.dtype)
   end
   local half = v:size(2) / 2
   local first, second = v:narrow(2, 1, half), v:narrow(2, half + 1, half)
   local values = T.cat({ T.cat({ first, first }, 2), T.cat({ second, second }, 2) }, 4)   -- (B, Hkv, S, 2D)
   local y = llama.LlamaAttention.attend_heads(self, q, k, values, past, pad)              -- (B, T, H * 2D)
   local B, L, H, D = y:size(1), y:size(2), self.n_head, self.head_dim
   y = y:view(B, L, H, 2 * D)
   local diff = y:narrow(3, 1, H / 2) - y:narrow(3, H / 2 + 1, H / 2) * self:lambda()       -- (B, T, H/2, 2D)
   return (self.groupnorm(diff) * (1 - self.lambda_init)):reshape(B, L, H * D)
end

local MLP = llama.LlamaMLP:extend("DiffLlamaMLP")
M.DiffLlamaMLP = MLP

moe.decoder_family("diffllama", "DiffLlama", Attention, MLP, "mlp", M.config, M)

return M
