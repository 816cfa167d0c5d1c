--- Gemma 1, Gemma 2 and Gemma 3 text (transformers' GemmaForCausalLM, Gemma2ForCausalLM,
-- Gemma3ForCausalLM) with Hugging Face parameter names. Llama's network (models/llama.lua reads the config: rotary embeddings,
-- grouped-query attention, windows) with Gemma's changes: RMSNorms that scale by (1 + weight) in
-- float32, four of them per layer (before and after attention and MLP), token embeddings scaled
-- by sqrt(hidden_size), attention scaled by query_pre_attn_scalar^-0.5 and its scores
-- soft-capped (cap * tanh(s / cap)), a sliding window on every other layer, a GELU-tanh MLP, and
-- logits soft-capped too. Gemma 3 drops the caps (unless its config sets them), normalizes each
-- query and key head, slides on all but every sixth layer, and rotates its sliding layers with a
-- base of their own (rope_local_base_freq).
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local config = require("moonload.models.config")

local M = {}
local WHO = "models.gemma2"
local F = nn.functional

-- A positive number or nil (JSON null) for an optional config key.
local function optional_positive(cfg, key)
   local v = cfg[key]
   if v ~= nil and (type(v) ~= "number" or v <= 0) then
      error(string.format('%s: config key "%s" in %s must be a positive number or null, got %s',
         WHO, key, cfg._source, tostring(v)), 3)
   end
   return v
end

--- Reads and checks a Gemma 2 config (path, folder or table); family "gemma3_text" a Gemma 3 one,
-- "gemma" a Gemma 1 one (which has no soft caps and scales its scores by head_dim^-0.5).
function M.config(source, family)
   local cfg = llama.config(source, family or "gemma2")
   if cfg.use_bidirectional_attention == true then
      error(string.format("%s: use_bidirectional_attention (EmbeddingGemma) is not supported, in %s", WHO, cfg._source), 2)
   end
   if family == "gemma" then return cfg end
   cfg.query_pre_attn_scalar = optional_positive(cfg, "query_pre_attn_scalar") or 256
   cfg.attn_logit_softcapping = optional_positive(cfg, "attn_logit_softcapping")
   cfg.final_logit_softcapping = optional_positive(cfg, "final_logit_softcapping")
   return cfg
end

-- --- layers -----------------------------------------------------------------------------------

local Gemma2RMSNorm = nn.Module:extend("Gemma2RMSNorm")
M.Gemma2RMSNorm = Gemma2RMSNorm

--- x / rms(x) * (1 + weight), in float32 and cast back (the weight starts at zero).
function Gemma2RMSNorm:__init(dim, opts)
   nn.Module.__init(self)
   self.weight = nn.Parameter(T.zeros({ dim }))
   rawset(self, "dim", dim)
   rawset(self, "eps", opts and opts.eps or 1e-6)
end

function Gemma2RMSNorm:forward(x)
   local y = F.rms_norm(x:float(), { self.dim }, self.weight:float() + 1, self.eps)
   return y.dtype == x.dtype and y or y:to(x.dtype)
end

local Gemma2Attention = llama.LlamaAttention:extend("Gemma2Attention")
M.Gemma2Attention = Gemma2Attention

function Gemma2Attention:__init(cfg, layer_idx)
   llama.LlamaAttention.__init(self, cfg, layer_idx)
   rawset(self, "scale", cfg.query_pre_attn_scalar ^ -0.5)
   rawset(self, "softcap", cfg.attn_logit_softcapping)
end

-- Query rows whose soft-capped scores are formed at once: a long prompt holds
-- B x heads x query_block x keys scores, not the whole square.
Gemma2Attention.query_block = 256

--- The capped scores' mask (true = attend): causal, windowed, padding; T5Gemma's encoder
-- (models/t5gemma.lua) attends both ways.
function Gemma2Attention:scores_mask(L, S, pad, device)
   return common.attention_mask(L, S, pad, self.window or nil, device)
end

--- With a soft cap the scores are formed explicitly (the fused kernel has no cap): q k^T * scale,
-- cap * tanh(. / cap), the causal/window/padding mask, softmax in float32, then v. The query
-- heads that share a key/value head are stacked as rows of one product, so keys and values are
-- never repeated per head; the queries go query_block rows at a time.
function Gemma2Attention:attend(q, k, v, past, pad)
   local cap = self.softcap
   if not cap then return llama.LlamaAttention.attend(self, q, k, v, past, pad) end
   local floats = require("moonload.models.kv_cache").floats                -- (an int8 cache's views)
   k, v = floats(k, q.dtype), floats(v, q.dtype)
   local B, H, L, D = q:size(1), q:size(2), q:size(3), q:size(4)
   local Hkv, S = k:size(2), k:size(3)
   local rep = H / Hkv
   local mask = self:scores_mask(L, S, pad, q.device)                         -- (L, S), (B, 1, L, S) or nil
   local kt = k:transpose(3, 4)                                               -- (B, Hkv, D, S)
   local outs = {}
   for first = 1, L, self.query_block do
      local n = math.min(self.query_block, L - first + 1)
      local rows = q:narrow(3, first, n):reshape(B, Hkv, rep * n, D)         -- head-major rows
      local scores = rows:matmul(kt) * self.scale                            -- (B, Hkv, rep * n, S)
      scores = (scores / cap):tanh() * cap
      if mask then
         local m = mask:narrow(-2, first, n)
         if m:dim() == 2 then
            m = m:unsqueeze(1):expand(rep, n, S):reshape(rep * n, S)
         else
            m = m:unsqueeze(2):expand(B, 1, rep, n, S):reshape(B, 1, rep * n, S)
         end
         scores = scores:masked_fill(m:logical_not(), -math.huge)
      end
      local probs = scores:float():softmax(-1)
      if probs.dtype ~= v.dtype then probs = probs:to(v.dtype) end
      outs[#outs + 1] = probs:matmul(v):view(B, H, n, D)
   end
   return #outs == 1 and outs[1] or T.cat(outs, 3)
end

local Gemma2MLP = llama.LlamaMLP:extend("Gemma2MLP")
M.Gemma2MLP = Gemma2MLP

local Gemma2DecoderLayer = nn.Module:extend("Gemma2DecoderLayer")
M.Gemma2DecoderLayer = Gemma2DecoderLayer

Gemma2DecoderLayer.Attention, Gemma2DecoderLayer.MLP, Gemma2DecoderLayer.Norm = Gemma2Attention, Gemma2MLP, Gemma2RMSNorm

function Gemma2DecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.self_attn = self.Attention(cfg, layer_idx)
   self.mlp = self.MLP(cfg)
   local o = { eps = cfg.rms_norm_eps }
   self.input_layernorm = self.Norm(cfg.hidden_size, o)
   self.post_attention_layernorm = self.Norm(cfg.hidden_size, o)
   self.pre_feedforward_layernorm = self.Norm(cfg.hidden_size, o)
   self.post_feedforward_layernorm = self.Norm(cfg.hidden_size, o)
end

function Gemma2DecoderLayer:forward(x, cos, sin, cache, pad)
   x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache, pad))
   return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
end

-- --- models -------------------------------------------------------------------------------------

local Gemma2RotaryEmbedding = llama.LlamaRotaryEmbedding:extend("Gemma2RotaryEmbedding")
M.Gemma2RotaryEmbedding = Gemma2RotaryEmbedding

local Gemma2Model = llama.LlamaModel:extend("Gemma2Model")
M.Gemma2Model = Gemma2Model
Gemma2Model.family, Gemma2Model.Layer, Gemma2Model.Rotary, Gemma2Model.Norm =
   "gemma2", Gemma2DecoderLayer, Gemma2RotaryEmbedding, Gemma2RMSNorm

--- s rounded to dtype, as transformers multiplies by a scale cast to the embedding's dtype.
function M.in_dtype(s, dtype)
   if dtype == "float32" or dtype == "float64" or dtype == "meta" then return s end
   return T.tensor({ s }):to(dtype):float():item()
end

--- sqrt(hidden_size) rounded to the embedding's dtype, as transformers multiplies by it.
function Gemma2Model:embed_scale()
   return M.in_dtype(math.sqrt(self.config.hidden_size), self.embed_tokens.weight.dtype)
end

local Gemma2ForCausalLM = llama.LlamaForCausalLM:extend("Gemma2ForCausalLM")
M.Gemma2ForCausalLM = Gemma2ForCausalLM
Gemma2ForCausalLM.family, Gemma2ForCausalLM.Model = "gemma2", Gemma2Model
Gemma2ForCausalLM.no_split_modules = { "Gemma2DecoderLayer" }

function Gemma2ForCausalLM:read_config(source)
   return M.config(source, self.family)
end

local lm_forward = common.causal_lm_forward(WHO .. ".forward", "model", "embed_tokens")

--- cap * tanh(logits / cap), or the logits as they are without a cap.
function M.soft_cap(logits, cap)
   if cap then logits = (logits / cap):tanh() * cap end
   return logits
end

--- As LlamaForCausalLM's forward, with the logits soft-capped (final_logit_softcapping).
function Gemma2ForCausalLM:forward(input_ids, opts)
   return M.soft_cap(lm_forward(self, input_ids, opts), self.config.final_logit_softcapping)
end

-- --- Gemma 1 --------------------------------------------------------------------------------------

-- Gemma (gemma-2b, gemma-7b, CodeGemma, Gemma 1.1): Llama's pre-norm layers with Gemma's (1 + w)
-- RMSNorms, a GELU-tanh MLP and embeddings scaled by sqrt(hidden_size); no soft caps, no windows,
-- scores scaled by head_dim^-0.5 as Llama's.
local GemmaRMSNorm = Gemma2RMSNorm:extend("GemmaRMSNorm")
M.GemmaRMSNorm = GemmaRMSNorm
local GemmaAttention = llama.LlamaAttention:extend("GemmaAttention")
M.GemmaAttention = GemmaAttention
local GemmaMLP = llama.LlamaMLP:extend("GemmaMLP")
M.GemmaMLP = GemmaMLP

local GemmaDecoderLayer = llama.LlamaDecoderLayer:extend("GemmaDecoderLayer")
M.GemmaDecoderLayer = GemmaDecoderLayer
GemmaDecoderLayer.Attention, GemmaDecoderLayer.MLP, GemmaDecoderLayer.Norm = GemmaAttention, GemmaMLP, GemmaRMSNorm

local GemmaRotaryEmbedding = llama.LlamaRotaryEmbedding:extend("GemmaRotaryEmbedding")
M.GemmaRotaryEmbedding = GemmaRotaryEmbedding

local GemmaModel = Gemma2Model:extend("GemmaModel")        -- (Gemma 2's embed_scale)
M.GemmaModel = GemmaModel
GemmaModel.family, GemmaModel.Layer, GemmaModel.Rotary, GemmaModel.Norm =
   "gemma", GemmaDecoderLayer, GemmaRotaryEmbedding, GemmaRMSNorm

local GemmaForCausalLM = llama.LlamaForCausalLM:extend("GemmaForCausalLM")
M.GemmaForCausalLM = GemmaForCausalLM
GemmaForCausalLM.family, GemmaForCausalLM.Model = "gemma", GemmaModel
GemmaForCausalLM.no_split_modules = { "GemmaDecoderLayer" }
GemmaForCausalLM.read_config = Gemma2ForCausalLM.read_config
GemmaForCausalLM.forward = common.causal_lm_forward("models.gemma.forward", "model", "embed_tokens")

-- --- VaultGemma ---------------------------------------------------------------------------------

-- VaultGemma (google/vaultgemma-1b, trained with differential privacy): Gemma 2's attention (soft
-- caps, query_pre_attn_scalar, every other layer sliding), MLP and logits, with its two norms only
-- before attention and MLP.
local VaultGemmaDecoderLayer = nn.Module:extend("VaultGemmaDecoderLayer")
M.VaultGemmaDecoderLayer = VaultGemmaDecoderLayer
VaultGemmaDecoderLayer.Attention = Gemma2Attention:extend("VaultGemmaAttention")
VaultGemmaDecoderLayer.MLP = Gemma2MLP:extend("VaultGemmaMLP")
VaultGemmaDecoderLayer.Norm = Gemma2RMSNorm:extend("VaultGemmaRMSNorm")
M.VaultGemmaAttention, M.VaultGemmaMLP, M.VaultGemmaRMSNorm =
   VaultGemmaDecoderLayer.Attention, VaultGemmaDecoderLayer.MLP, VaultGemmaDecoderLayer.Norm

function VaultGemmaDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.self_attn = self.Attention(cfg, layer_idx)
   self.mlp = self.MLP(cfg)
   self.input_layernorm = self.Norm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.pre_feedforward_layernorm = self.Norm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
end

function VaultGemmaDecoderLayer:forward(x, cos, sin, cache, pad)
   x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pad)
   return x + self.mlp(self.pre_feedforward_layernorm(x))
end

local VaultGemmaModel = Gemma2Model:extend("VaultGemmaModel")
M.VaultGemmaModel = VaultGemmaModel
VaultGemmaModel.family, VaultGemmaModel.Layer, VaultGemmaModel.Norm =
   "vaultgemma", VaultGemmaDecoderLayer, VaultGemmaDecoderLayer.Norm
VaultGemmaModel.Rotary = llama.LlamaRotaryEmbedding:extend("VaultGemmaRotaryEmbedding")
M.VaultGemmaRotaryEmbedding = VaultGemmaModel.Rotary

local VaultGemmaForCausalLM = Gemma2ForCausalLM:extend("VaultGemmaForCausalLM")
M.VaultGemmaForCausalLM = VaultGemmaForCausalLM
VaultGemmaForCausalLM.family, VaultGemmaForCausalLM.Model = "vaultgemma", VaultGemmaModel
VaultGemmaForCausalLM.no_split_modules = { "VaultGemmaDecoderLayer" }

-- --- Gemma 3 text ---------------------------------------------------------------------------------

local Gemma3RMSNorm = Gemma2RMSNorm:extend("Gemma3RMSNorm")
M.Gemma3RMSNorm = Gemma3RMSNorm

local Gemma3Attention = Gemma2Attention:extend("Gemma3Attention")
M.Gemma3Attention = Gemma3Attention

--- Gemma 2's attention with (1 + w) norms of each query and key head, after the projections.
function Gemma3Attention:__init(cfg, layer_idx)
   Gemma2Attention.__init(self, cfg, layer_idx)
   self.q_norm = Gemma3RMSNorm(cfg.head_dim, { eps = cfg.rms_norm_eps })
   self.k_norm = Gemma3RMSNorm(cfg.head_dim, { eps = cfg.rms_norm_eps })
end

local Gemma3MLP = Gemma2MLP:extend("Gemma3MLP")
M.Gemma3MLP = Gemma3MLP

local Gemma3DecoderLayer = Gemma2DecoderLayer:extend("Gemma3DecoderLayer")
M.Gemma3DecoderLayer = Gemma3DecoderLayer
Gemma3DecoderLayer.Attention, Gemma3DecoderLayer.MLP, Gemma3DecoderLayer.Norm = Gemma3Attention, Gemma3MLP, Gemma3RMSNorm

local Gemma3RotaryEmbedding = llama.LlamaRotaryEmbedding:extend("Gemma3RotaryEmbedding")
M.Gemma3RotaryEmbedding = Gemma3RotaryEmbedding

--- The full layers' frequencies (rope_theta and its scaling, as Llama's) and the sliding layers'
-- own (local_inv_freq, from rope_local_base_freq).
function Gemma3RotaryEmbedding:__init(cfg)
   llama.LlamaRotaryEmbedding.__init(self, cfg)
   llama.add_local_rotary(self, cfg)
end

local Gemma3TextModel = Gemma2Model:extend("Gemma3TextModel")
M.Gemma3TextModel = Gemma3TextModel
Gemma3TextModel.family, Gemma3TextModel.Layer, Gemma3TextModel.Rotary, Gemma3TextModel.Norm =
   "gemma3_text", Gemma3DecoderLayer, Gemma3RotaryEmbedding, Gemma3RMSNorm

Gemma3TextModel.layer_rotary = llama.layer_rotary_by_window

local Gemma3ForCausalLM = Gemma2ForCausalLM:extend("Gemma3ForCausalLM")
M.Gemma3ForCausalLM = Gemma3ForCausalLM
Gemma3ForCausalLM.family, Gemma3ForCausalLM.Model = "gemma3_text", Gemma3TextModel
Gemma3ForCausalLM.no_split_modules = { "Gemma3DecoderLayer" }
-- The language model of a multimodal Gemma 3 checkpoint (model_type "gemma3": Gemma-3-4B and up)
-- under the hub's names, or transformers' newer ones; its vision tower and projector are left out.
Gemma3ForCausalLM.checkpoint_renames = config.LANGUAGE_MODEL_RENAMES
Gemma3ForCausalLM.ignore_unexpected = { "rotary_emb%.inv_freq$", "^vision_tower%.", "^multi_modal_projector%.",
   "^model%.vision_tower%.", "^model%.multi_modal_projector%." }

--- A gemma3_text config, or a multimodal gemma3 one's text_config (the language model alone).
function Gemma3ForCausalLM:read_config(source)
   return config.read_text_config(source, "models.gemma3", { gemma3 = true },
      function(src) return M.config(src, self.family) end)
end

return M
