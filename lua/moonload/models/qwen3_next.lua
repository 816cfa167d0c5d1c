--- Qwen3-Next (Qwen3NextForCausalLM, model_type "qwen3_next": Qwen3-Next-80B-A3B) with Hugging
-- Face parameter names. A hybrid: of every full_attention_interval layers (4 on the hub), the
-- last has gated attention and the others linear attention (layer_types says which), each
-- followed by Qwen2-MoE's sparse block (routed experts plus a sigmoid-gated shared expert; a
-- dense MLP in mlp_only_layers). Every RMSNorm but the output one scales by (1 + weight).
--
-- Gated attention: Llama's grouped-query attention whose q_proj gives each head its queries and,
-- beside them, a gate: the attention's output is multiplied by sigmoid(gate) before o_proj;
-- per-head q/k norms; rotary embeddings over partial_rotary_factor (0.25) of each head.
--
-- Linear attention (Gated DeltaNet, linear_attn.*): in_proj_qkvz gives per key head its q, k and
-- the v, z of the value heads it serves; in_proj_ba the per-value-head b and a. q, k, v go through
-- a depthwise causal convolution (conv1d, linear_conv_kernel_dim taps) and SiLU; then each value
-- head keeps a (key dim x value dim) state S, decayed by exp(g) each token (g = -exp(A_log) x
-- softplus(a + dt_bias)) and corrected towards v by the delta rule with rate beta = sigmoid(b),
-- read by the L2-normalized query (F.gated_delta_rule, a C kernel). Its output goes through an
-- RMSNorm gated by silu(z), then out_proj.
--
-- A generation's cache holds, for these layers, the last conv inputs and S instead of keys and
-- values (models/kv_cache.lua's layer_state): a fixed 2 MB per layer and sequence on the hub's
-- model, whatever the length. Such a state cannot be cropped back, so assisted generation is
-- refused (as transformers refuses it for stateful models). The hub's checkpoints also carry a
-- multi-token-prediction head (mtp.*), which loading leaves out.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local F = require("moonload.nn.functional")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local gemma = require("moonload.models.gemma")
local causal_conv = require("moonload.models.causal_conv")

local M = {}

--- The linear attention's keys of cfg (a config read so far; transformers' Qwen3-Next defaults where
-- absent), checked: heads, head sizes and conv taps (also models/lara_mini.lua's).
function M.linear_attention_config(cfg, WHO)
   local function int(name, default, min) return config.integer(cfg, WHO, name, cfg[name] or default, min) end
   cfg.linear_num_key_heads = int("linear_num_key_heads", 16, 1)
   cfg.linear_num_value_heads = int("linear_num_value_heads", 32, 1)
   cfg.linear_key_head_dim = int("linear_key_head_dim", 128, 1)
   cfg.linear_value_head_dim = int("linear_value_head_dim", 128, 1)
   cfg.linear_conv_kernel_dim = int("linear_conv_kernel_dim", 4, 1)
   if cfg.linear_num_value_heads % cfg.linear_num_key_heads ~= 0 then
      config.fail(cfg, WHO, "linear_num_value_heads %d is not a multiple of linear_num_key_heads %d",
         cfg.linear_num_value_heads, cfg.linear_num_key_heads)
   end
end

--- Reads and checks a Qwen3-Next config (path, folder or table): Qwen3-MoE's keys, layer_types
-- (or full_attention_interval), and the linear attention's heads, head sizes and conv taps.
-- family "qwen3_5" reads a dense Qwen3.5 text config, "qwen3_5_moe" a Qwen3.5-MoE one (every
-- layer sparse, the top experts' weights always renormalized).
function M.config(source, family)
   family = family or "qwen3_next"
   local WHO = "models." .. family
   local cfg = family == "qwen3_5" and llama.config(source, family) or moe.config(source, family)
   local function int(name, default, min) return config.integer(cfg, WHO, name, cfg[name] or default, min) end
   llama.set_rotary_dim(cfg, WHO, cfg.rope.partial_rotary_factor or cfg.partial_rotary_factor or 0.25)
   M.linear_attention_config(cfg, WHO)
   local every = int("full_attention_interval", 4, 1)    -- transformers' default: every interval-th layer is full
   config.layer_types(cfg, WHO, { "linear_attention", "full_attention" }, function(i)
      return i % every == 0 and "full_attention" or "linear_attention"
   end)
   if family ~= "qwen3_next" then           -- Qwen3.5: one kind of MLP in every layer
      cfg.sparse_layers = {}
      for i = 1, cfg.num_hidden_layers do cfg.sparse_layers[i] = family == "qwen3_5_moe" end
      cfg.norm_topk_prob = true
   end
   return cfg
end

-- --- norms --------------------------------------------------------------------------------------

local Qwen3NextRMSNorm = gemma.Gemma2RMSNorm:extend("Qwen3NextRMSNorm")   -- (1 + weight), in float32
M.Qwen3NextRMSNorm = Qwen3NextRMSNorm

local Qwen3NextRMSNormGated = nn.Module:extend("Qwen3NextRMSNormGated")
M.Qwen3NextRMSNormGated = Qwen3NextRMSNormGated

--- x / rms(x) * weight * silu(gate), in float32 and cast back to x's dtype.
function Qwen3NextRMSNormGated:__init(dim, eps)
   nn.Module.__init(self)
   self.weight = nn.Module.new_parameter({ dim })
   if not self.weight:is_meta() then self.weight:fill_(1) end
   rawset(self, "dim", dim)
   rawset(self, "eps", eps)
end

function Qwen3NextRMSNormGated:forward(x, gate)
   local y = F.rms_norm(x:float(), { self.dim }, self.weight:float(), self.eps) * gate:float():silu()
   return y.dtype == x.dtype and y or y:to(x.dtype)
end

-- --- gated attention ----------------------------------------------------------------------------

local Qwen3NextAttention = llama.LlamaAttention:extend("Qwen3NextAttention")
M.Qwen3NextAttention = Qwen3NextAttention

function Qwen3NextAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local H, Hkv, D, bias = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.attention_bias
   self.q_proj = nn.Linear(cfg.hidden_size, H * D * 2, { bias = bias })   -- per head: queries, then the gate
   self.k_proj = nn.Linear(cfg.hidden_size, Hkv * D, { bias = bias })
   self.v_proj = nn.Linear(cfg.hidden_size, Hkv * D, { bias = bias })
   self.o_proj = nn.Linear(H * D, cfg.hidden_size, { bias = bias })
   self.q_norm = Qwen3NextRMSNorm(D, { eps = cfg.rms_norm_eps })
   self.k_norm = Qwen3NextRMSNorm(D, { eps = cfg.rms_norm_eps })
   llama.attention_geometry(self, cfg, layer_idx)
end

function Qwen3NextAttention:project(x, B, L)
   local H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
   local qg = self.q_proj(x):view(B, L, H, 2 * D)
   return qg:narrow(4, 1, D), self.k_proj(x):view(B, L, Hkv, D), self.v_proj(x):view(B, L, Hkv, D),
      qg:narrow(4, D + 1, D):reshape(B, L, H * D)
end

-- --- linear attention ---------------------------------------------------------------------------

local Qwen3NextGatedDeltaNet = nn.Module:extend("Qwen3NextGatedDeltaNet")
M.Qwen3NextGatedDeltaNet = Qwen3NextGatedDeltaNet
-- q, k, v, z in one projection and b, a in another, grouped by key head (Qwen3.5's stand apart)
Qwen3NextGatedDeltaNet.fused_in_proj = true
-- the gated norm's and the output projection's attributes (OLMo Hybrid's: o_norm, o_proj)
Qwen3NextGatedDeltaNet.norm_name, Qwen3NextGatedDeltaNet.out_name = "norm", "out_proj"

function Qwen3NextGatedDeltaNet:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local Hk, Hv, Dk, Dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
      cfg.linear_value_head_dim
   local conv_dim = 2 * Hk * Dk + Hv * Dv
   self.conv1d = causal_conv.Conv1d(conv_dim, cfg.linear_conv_kernel_dim)
   if self.fused_in_proj then
      self.in_proj_qkvz = nn.Linear(cfg.hidden_size, 2 * Hk * Dk + 2 * Hv * Dv, { bias = false })
      self.in_proj_ba = nn.Linear(cfg.hidden_size, 2 * Hv, { bias = false })
   end
   self.dt_bias = nn.Module.new_parameter({ Hv })
   self.A_log = nn.Module.new_parameter({ Hv })
   if not self.dt_bias:is_meta() then
      self.dt_bias:fill_(1)
      self.A_log:fill_(0)
   end
   self.norm = Qwen3NextRMSNormGated(Dv, cfg.rms_norm_eps)
   self.out_proj = nn.Linear(Hv * Dv, cfg.hidden_size, { bias = false })
   if not self.fused_in_proj then        -- (Qwen3.5's: transformers swaps them in last)
      self.in_proj_qkv = nn.Linear(cfg.hidden_size, conv_dim, { bias = false })
      self.in_proj_z = nn.Linear(cfg.hidden_size, Hv * Dv, { bias = false })
      self.in_proj_b = nn.Linear(cfg.hidden_size, Hv, { bias = false })
      self.in_proj_a = nn.Linear(cfg.hidden_size, Hv, { bias = false })
   end
   rawset(self, "heads", { Hk = Hk, Hv = Hv, Dk = Dk, Dv = Dv, conv_dim = conv_dim, taps = cfg.linear_conv_kernel_dim })
   rawset(self, "layer_idx", layer_idx)
end

--- Bytes a cache keeps for this layer per batch of B sequences (utils/runtime_memory.lua): the
-- last taps - 1 conv inputs (el bytes each) and the float32 state, whatever the length.
function Qwen3NextGatedDeltaNet:state_bytes(B, el)
   local h = self.heads
   return B * ((h.taps - 1) * h.conv_dim * el + h.Hv * h.Dk * h.Dv * 4)
end

--- Values a forward forms per token at once, beside the layer's input and MLP (for memory
-- planning): q/k/v/z and b/a as projected and rearranged, the conv's window, products and
-- output, the kernel's output and the gated norm's float32 copies.
function Qwen3NextGatedDeltaNet:token_values()
   local h = self.heads
   local qkvz = 2 * h.Hk * h.Dk + 2 * h.Hv * h.Dv
   return 2 * qkvz + 4 * h.Hv + 4 * h.conv_dim + 8 * h.Hv * h.Dv
end

--- The projections of x (B, L, hidden): the conv's input (B, L, conv_dim: all q heads, all k
-- heads, all v heads), z (B * L * Hv, Dv), and b, a (B, L, Hv). Here from in_proj_qkvz, which
-- holds per key head its q, k and the v and z of its Hv / Hk value heads, and in_proj_ba, per
-- key head the b then the a of those value heads.
function Qwen3NextGatedDeltaNet:project(x)
   local h = self.heads
   local Hk, Hv, Dk, Dv = h.Hk, h.Hv, h.Dk, h.Dv
   local B, L = x:size(1), x:size(2)
   local r = Hv / Hk
   local qkvz = self.in_proj_qkvz(x):view(B, L, Hk, 2 * Dk + 2 * r * Dv)
   local ba = self.in_proj_ba(x):view(B, L, Hk, 2 * r)
   local mixed = T.cat({ qkvz:narrow(4, 1, Dk):reshape(B, L, Hk * Dk), qkvz:narrow(4, Dk + 1, Dk):reshape(B, L, Hk * Dk),
      qkvz:narrow(4, 2 * Dk + 1, r * Dv):reshape(B, L, Hv * Dv) }, 3)
   return mixed, qkvz:narrow(4, 2 * Dk + r * Dv + 1, r * Dv):reshape(B * L * Hv, Dv),
      ba:narrow(4, 1, r):reshape(B, L, Hv), ba:narrow(4, r + 1, r):reshape(B, L, Hv)
end

--- x (B, L, hidden); cache optional (the conv inputs and the state carry over); pad (B, past +
-- L) bool or nil: padding tokens enter as zeros, so they leave the state as it was.
function Qwen3NextGatedDeltaNet:forward(x, cache, pad)
   local h = self.heads
   local Hk, Hv, Dk, Dv = h.Hk, h.Hv, h.Dk, h.Dv
   local B, L = x:size(1), x:size(2)
   if pad and L > 1 then x = x * pad:narrow(2, pad:size(2) - L + 1, L):to(x.dtype):unsqueeze(3) end
   local mixed, z, b, a = self:project(x)

   local state
   if cache then
      state = cache:layer_state(self.layer_idx, B, function(rows)
         return { conv = causal_conv.initial_state({ taps = h.taps, channels = h.conv_dim }, rows, x),
                  recurrent = T.zeros({ rows, Hv, Dk, Dv }, { dtype = "float32", device = x.device }) }
      end)
   end
   local conv = self:convolve(mixed, state and state.conv)                             -- (B, L, conv_dim)

   local q = conv:narrow(3, 1, Hk * Dk):view(B, L, Hk, Dk)
   local k = conv:narrow(3, Hk * Dk + 1, Hk * Dk):view(B, L, Hk, Dk)
   local v = conv:narrow(3, 2 * Hk * Dk + 1, Hv * Dv):view(B, L, Hv, Dv)
   local beta = b:sigmoid()
   if self.neg_eigval then beta = beta * 2 end      -- (OLMo Hybrid's rates in (0, 2): S may flip sign)
   local A, dt_bias = self.A_log:float(), self.dt_bias:float()
   if A.device ~= x.device then A, dt_bias = A:to(x.device), dt_bias:to(x.device) end
   local g = -(A:exp()) * (a:float() + dt_bias):softplus()                             -- (B, L, Hv) float32
   local recurrent = state and state.recurrent     -- (read and written back where it lives, as the conv's)
   if recurrent and recurrent.device ~= x.device then recurrent = recurrent:to(x.device) end
   local y = F.gated_delta_rule(q, k, v, g, beta, recurrent)                           -- (B, L, Hv, Dv)
   if recurrent and recurrent ~= state.recurrent then state.recurrent:copy_(recurrent) end
   y = self[self.norm_name](y:reshape(B * L * Hv, Dv), z):view(B, L, Hv * Dv)
   return self[self.out_name](y)
end

--- The depthwise causal conv of the projections (B, L, conv_dim) after the inputs state holds
-- (nil: none; it then holds the last ones), through SiLU (OLMo Hybrid's: three convs, hidden_act).
function Qwen3NextGatedDeltaNet:convolve(mixed, state)
   return causal_conv.run(self.conv1d, mixed, state):silu()
end

-- --- layers and model ---------------------------------------------------------------------------

local Qwen3NextMLP = moe.Qwen3MoeMLP:extend("Qwen3NextMLP")
M.Qwen3NextMLP = Qwen3NextMLP

local Qwen3NextSparseMoeBlock = moe.Qwen2MoeSparseMoeBlock:extend("Qwen3NextSparseMoeBlock")
Qwen3NextSparseMoeBlock.Expert = Qwen3NextMLP
M.Qwen3NextSparseMoeBlock = Qwen3NextSparseMoeBlock

local Qwen3NextDecoderLayer = llama.LlamaDecoderLayer:extend("Qwen3NextDecoderLayer")
M.Qwen3NextDecoderLayer = Qwen3NextDecoderLayer

function Qwen3NextDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   if cfg.layer_types[layer_idx] == "linear_attention" then
      self.linear_attn = self.LinearAttention(cfg, layer_idx)
   else
      self.self_attn = self.Attention(cfg, layer_idx)
   end
   self.mlp = self.MLP(cfg, layer_idx)
   self.input_layernorm = self.Norm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.post_attention_layernorm = self.Norm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
end

function Qwen3NextDecoderLayer:forward(x, cos, sin, cache, pad)
   local h = self.input_layernorm(x)
   if self.linear_attn then
      x = x + self.linear_attn(h, cache, pad)
   else
      x = x + self.self_attn(h, cos, sin, cache, pad)
   end
   return x + self.mlp(self.post_attention_layernorm(x))
end

--- hybrid_family(family, prefix, LinearAttention, Sparse, Dense, into): a decoder of linear and
-- gated full attention layers, its classes named as transformers names them (prefix ..
-- "Attention", "DecoderLayer", "RotaryEmbedding", "TextModel" or "Model", "ForCausalLM"), each
-- layer's MLP Sparse(cfg) where cfg.sparse_layers says so and Dense(cfg) elsewhere, the config
-- read by M.config(source, family). Stored under those names in into; returns the ForCausalLM.
function M.hybrid_family(family, prefix, LinearAttention, Sparse, Dense, into)
   local Attention = Qwen3NextAttention:extend(prefix .. "Attention")
   local Layer = Qwen3NextDecoderLayer:extend(prefix .. "DecoderLayer")
   Layer.LinearAttention, Layer.Attention, Layer.Norm = LinearAttention, Attention, Qwen3NextRMSNorm
   function Layer.MLP(cfg, i) return cfg.sparse_layers[i] and Sparse(cfg) or Dense(cfg) end
   local Rotary = llama.LlamaRotaryEmbedding:extend(prefix .. "RotaryEmbedding")
   local Model = llama.LlamaModel:extend(prefix .. (family == "qwen3_next" and "Model" or "TextModel"))
   Model.family, Model.Layer, Model.Rotary, Model.Norm = family, Layer, Rotary, Qwen3NextRMSNorm
   local LM = llama.LlamaForCausalLM:extend(prefix .. "ForCausalLM")
   LM.family, LM.Model = family, Model
   LM.no_split_modules = { prefix .. "DecoderLayer" }
   LM.ignore_unexpected = { "rotary_emb%.inv_freq$", "^mtp%." }
   LM.stateful = true            -- its cache cannot be cropped: no assisted generation
   LM.forward = require("moonload.models.common").causal_lm_forward("models." .. family .. ".forward", "model",
      "embed_tokens")
   function LM:read_config(source) return M.config(source, self.family) end
   into[prefix .. "Attention"], into[prefix .. "DecoderLayer"], into[prefix .. "RotaryEmbedding"] = Attention, Layer, Rotary
   into[Model.__name], into[prefix .. "ForCausalLM"] = Model, LM
   return LM
end

M.hybrid_family("qwen3_next", "Qwen3Next", Qwen3NextGatedDeltaNet, Qwen3NextSparseMoeBlock, Qwen3NextMLP, M)

return M
