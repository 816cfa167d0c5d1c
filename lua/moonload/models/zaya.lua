--- ZAYA1 (ZayaForCausalLM, model_type "zaya": Zyphra/ZAYA1-8B) with transformers' parameter
-- names, as transformers builds it.
--
-- Attention: Compressed Convolutional Attention (self_attn.qkv_proj). q_proj and k_proj's outputs,
-- side by side, go through a causal depthwise convolution over the tokens (conv_qk_depthwise,
-- cca_time0 taps) and then a grouped one (conv_qk_grouped, cca_time1 taps, a group per query and
-- key head, mixing its head_dim channels); to that come residual paths: each query head
-- (q + its key head's k) / 2, each key head the mean of its query heads' residuals. Half of the
-- value channels are this token's (v_proj_current), half the previous token's (v_proj_delayed;
-- the first token's: its bias). Queries and keys are L2-normed to length sqrt(head_dim), the keys
-- times a learned scale per head (qk_norm.temp), then rotated over part of each head
-- (partial_rotary_factor) with a base per layer type ("hybrid"; "hybrid_sliding" also attends over
-- sliding_window tokens). Padding tokens' inputs are zeroed first. A generation carries the
-- convolutions' last inputs and the last delayed value in its cache (KVCache:layer_state), beside
-- the keys and values.
--
-- Layers: residuals kept in float32 and joined by learned scales and biases, (h + b_h) * s_h +
-- (residual + b_r) * s_r (post_attention_residual_scale, post_mlp_residual_scale); the embeddings
-- enter as (x + input_hidden_states_bias) * input_hidden_states_scale.
--
-- MLP: every layer sparse, top-1. The router (mlp.gate) projects the input down to
-- router_hidden_size, adds the previous layer's router state times router_states_scale (not on
-- the first layer: it then passes its own on), and scores num_experts + 1 classes by an MLP
-- (RMSNorm, two GELU layers, out_proj) and a softmax; the choice adds balancing_biases (float32),
-- the weight is the class's probability, and the last class runs no expert (weight 0). The experts
-- are stacked per projection (mlp.experts.{gate_up_proj, down_proj}), transformers' layout and the
-- hub's; only the chosen ones run. lm_head may have a bias (lm_head_bias).
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local F = require("moonload.nn.functional")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local causal_conv = require("moonload.models.causal_conv")
local block_schedule = require("moonload.models.block_schedule")

local M = {}
local WHO = "models.zaya"

-- ZayaConfig's defaults where Llama's and Qwen3-MoE's readers would take others.
local DEFAULTS = { vocab_size = 262272, hidden_size = 2048, num_hidden_layers = 40, num_attention_heads = 8,
   num_key_value_heads = 2, head_dim = 128, max_position_embeddings = 131072, rms_norm_eps = 1e-5,
   moe_intermediate_size = 2048, num_experts = 16, num_experts_per_tok = 1, tie_word_embeddings = true,
   router_hidden_size = 256, cca_time0 = 2, cca_time1 = 2, lm_head_bias = false }

local DEFAULT_ROPE = { hybrid = { rope_type = "default", rope_theta = 5000000, partial_rotary_factor = 0.5 },
   hybrid_sliding = { rope_type = "default", rope_theta = 10000, partial_rotary_factor = 0.5 } }

--- Reads and checks a ZAYA config (path, folder or table) with ZayaConfig's defaults: Llama's keys,
-- layer_types ("hybrid", "hybrid_sliding": cfg.layer_windows), a rotary configuration per type
-- (cfg.rope, cfg.rope_local, one partial_rotary_factor), the experts (top-1 only), the router's
-- width and the convolutions' taps.
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   local n = config.integer(fixed, WHO, "num_hidden_layers", fixed.num_hidden_layers, 1)
   local types = fixed.layer_types
   if types == nil then
      types = {}
      for i = 1, n do types[i] = "hybrid" end
   end
   if type(types) ~= "table" or #types ~= n then
      config.fail(fixed, WHO, 'config key "layer_types" must list %d layer types', n)
   end
   local attention_types = {}
   for i, t in ipairs(types) do
      if t ~= "hybrid" and t ~= "hybrid_sliding" then
         config.fail(fixed, WHO, 'layer_types[%d] is "%s" (supported: hybrid, hybrid_sliding)', i, tostring(t))
      end
      attention_types[i] = t == "hybrid" and "full_attention" or "sliding_attention"
   end
   local rp = fixed.rope_parameters
   if rp == nil then rp = DEFAULT_ROPE end
   rp = { full_attention = rp.hybrid or rp, sliding_attention = rp.hybrid_sliding or rp }
   local factor = rp.full_attention.partial_rotary_factor or 1
   if (rp.sliding_attention.partial_rotary_factor or 1) ~= factor then
      config.fail(fixed, WHO, "the layer types' partial_rotary_factor differ (%s, %s): one rotary width is supported",
         tostring(factor), tostring(rp.sliding_attention.partial_rotary_factor))
   end
   fixed.layer_types, fixed.rope_parameters, fixed.partial_rotary_factor = attention_types, rp, factor
   for i, t in ipairs(types) do
      if t == "hybrid_sliding" and fixed.sliding_window == nil then
         config.fail(fixed, WHO, 'layer_types[%d] is "hybrid_sliding" without "sliding_window"', i)
      end
   end
   fixed.use_sliding_window = true
   fixed.intermediate_size = fixed.moe_intermediate_size      -- (no dense MLP: Llama's reader asks for one)
   local cfg = moe.config(fixed, "zaya")
   cfg._source, cfg._raw = src, raw
   cfg.layer_types = types
   cfg.rope_local = llama.rope_from(cfg, WHO, { { rp.sliding_attention, "rope_parameters.hybrid_sliding." } }, 10000)
   if cfg.num_experts_per_tok ~= 1 then
      config.fail(cfg, WHO, 'config key "num_experts_per_tok" is %d (supported: 1)', cfg.num_experts_per_tok)
   end
   for _, key in ipairs({ "router_hidden_size", "cca_time0", "cca_time1" }) do
      cfg[key] = config.integer(cfg, WHO, key, cfg[key], 1)
   end
   if cfg.head_dim % 2 ~= 0 then config.fail(cfg, WHO, "head_dim %d must be even (half of each value head is delayed)", cfg.head_dim) end
   if type(cfg.lm_head_bias) ~= "boolean" then
      config.fail(cfg, WHO, 'config key "lm_head_bias" must be a boolean, got %s', tostring(cfg.lm_head_bias))
   end
   return cfg
end

-- --- compressed convolutional attention -------------------------------------------------------------

-- A causal convolution over the tokens with a group per head: each output channel of a group
-- mixes that group's head_dim input channels over `taps` tokens (transformers' nn.Conv1d with
-- groups; weight (channels, group width, taps)).
local GroupedConv1d = nn.Module:extend("GroupedConv1d")
M.GroupedConv1d = GroupedConv1d

function GroupedConv1d:__init(channels, groups, taps)
   nn.Module.__init(self)
   self.weight = nn.Module.new_parameter({ channels, channels / groups, taps })
   self.bias = nn.Module.new_parameter({ channels })
   if not self.weight:is_meta() then self.weight:fill_(0); self.bias:fill_(0) end
   rawset(self, "groups", groups)
   rawset(self, "taps", taps)
end

--- x (B, T, channels) -> the convolution at the last T - taps + 1 tokens (B, T - taps + 1, channels).
function GroupedConv1d:forward(x)
   local B, K, G = x:size(1), self.taps, self.groups
   local C = x:size(3)
   local D, L = C / G, x:size(2) - K + 1
   local w = self.weight:view(G, D, D, K)                                   -- (group, out, in, tap)
   if w.dtype ~= x.dtype then w = w:to(x.dtype) end
   local y
   for j = 1, K do
      local xj = x:narrow(2, j, L):reshape(B * L, G, D):transpose(1, 2)     -- (G, B L, in)
      local yj = xj:matmul(w:select(4, j):transpose(2, 3))                  -- (G, B L, out)
      y = y and y + yj or yj
   end
   local b = self.bias.dtype == x.dtype and self.bias or self.bias:to(x.dtype)
   return y:transpose(1, 2):reshape(B, L, C) + b
end

function GroupedConv1d:__tostring()
   local C = self.weight:size(1)
   return string.format("GroupedConv1d(%d, %d, kernel_size=(%d,), groups=%d)", C, C, self.taps, self.groups)
end

local ZayaCCAProjection = nn.Module:extend("ZayaCCAProjection")
M.ZayaCCAProjection = ZayaCCAProjection

-- (transformers' order: q_proj, k_proj, v_proj_current, v_proj_delayed, conv_qk_depthwise, conv_qk_grouped)
function ZayaCCAProjection:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local H, Hkv, D, hidden, bias = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
      cfg.attention_bias
   local C = (H + Hkv) * D
   self.q_proj = nn.Linear(hidden, H * D, { bias = bias })
   self.k_proj = nn.Linear(hidden, Hkv * D, { bias = bias })
   self.v_proj_current = nn.Linear(hidden, Hkv * D / 2, { bias = bias })
   self.v_proj_delayed = nn.Linear(hidden, Hkv * D / 2, { bias = bias })
   self.conv_qk_depthwise = causal_conv.Conv1d(C, cfg.cca_time0, { bias = true })
   self.conv_qk_grouped = GroupedConv1d(C, H + Hkv, cfg.cca_time1)
   rawset(self, "heads", { H = H, Hkv = Hkv, D = D, C = C })
   rawset(self, "layer_idx", layer_idx)
   -- both convolutions as one for causal_conv.run: taps - 1 inputs carried between forwards
   rawset(self, "convs", setmetatable({ taps = cfg.cca_time0 + cfg.cca_time1 - 1, channels = C },
      { __call = function(_, window) return self.conv_qk_grouped(self.conv_qk_depthwise(window)) end }))
end

--- For memory planning: the state a sequence carries (the convolutions' last inputs, the last
-- delayed value), whatever the length.
function ZayaCCAProjection:state_bytes(B, el)
   local h = self.heads
   return B * ((self.convs.taps - 1) * h.C + h.Hkv * h.D / 2) * el
end

--- Values a forward forms per token (memory planning): q, k, their residuals and the keys
-- repeated for them, the convolutions' window, each tap's products and outputs, the values.
function ZayaCCAProjection:token_values()
   local h = self.heads
   return 10 * h.C + 4 * h.Hkv * h.D
end

--- x (B, L, hidden) -> q (B, L, H, D), k and v (B, L, Hkv, D); cache optional (its layer state:
-- conv, the convolutions' last inputs (B, taps - 1, C), and v, the last delayed value).
function ZayaCCAProjection:forward(x, cache)
   local h = self.heads
   local H, Hkv, D = h.H, h.Hkv, h.D
   local B, L = x:size(1), x:size(2)
   local state
   if cache then
      state = cache:layer_state(self.layer_idx, B, function(rows)
         return { conv = causal_conv.initial_state(self.convs, rows, x),
                  v = T.zeros({ rows, Hkv * D / 2 }, { dtype = x.dtype, device = x.device }) }
      end)
   end
   local q, k = self.q_proj(x), self.k_proj(x)
   local rep = H / Hkv
   local k_heads = k:view(B, L, Hkv, 1, D):expand(B, L, Hkv, rep, D):reshape(B, L, H, D)
   local q_res = (q:view(B, L, H, D) + k_heads) * 0.5
   local k_res = q_res:view(B, L, Hkv, rep, D):mean(4)
   local qk = causal_conv.run(self.convs, T.cat({ q, k }, 3), state and state.conv)   -- (B, L, C)
   q = qk:narrow(3, 1, H * D):reshape(B, L, H, D) + q_res
   k = qk:narrow(3, H * D + 1, Hkv * D):reshape(B, L, Hkv, D) + k_res
   local delayed = self.v_proj_delayed(x)                                   -- (B, L, Hkv D / 2)
   local first
   if state and cache.length > 0 then            -- (a block's length counts the chunks before it)
      first = state.v:unsqueeze(2)
      if first.dtype ~= x.dtype or first.device ~= x.device then first = first:to(x.device):to(x.dtype) end
   else
      first = self.v_proj_delayed(T.zeros({ B, 1, x:size(3) }, { dtype = x.dtype, device = x.device }))
   end
   local before = L > 1 and T.cat({ first, delayed:narrow(2, 1, L - 1) }, 2) or first:clone()
   if state then state.v:copy_(delayed:select(2, L)) end     -- (after reading it: first may be its view)
   local v = T.cat({ self.v_proj_current(x), before }, 3):view(B, L, Hkv, D)
   return q, k, v
end

-- L2-norms queries and keys to length sqrt(head_dim), the keys times a learned scale per head.
local ZayaQKNorm = nn.Module:extend("ZayaQKNorm")
M.ZayaQKNorm = ZayaQKNorm

function ZayaQKNorm:__init(cfg)
   nn.Module.__init(self)
   self.temp = nn.Module.new_parameter({ cfg.num_key_value_heads })
   if not self.temp:is_meta() then self.temp:fill_(0) end
   rawset(self, "scale", math.sqrt(cfg.head_dim))
end

-- x (..., D) times scale over its length (at least the dtype's eps).
local EPS = { float32 = 1.1920928955078125e-07, bfloat16 = 0.0078125, float16 = 0.0009765625 }

local function to_length(x, scale)
   local len = (x * x):sum(-1, true):sqrt():clamp(EPS[x.dtype] or EPS.float32, math.huge)
   return x * (len:reciprocal() * scale)
end

--- q (B, L, H, D), k (B, L, Hkv, D) -> both normed, k times temp (per head).
function ZayaQKNorm:forward(q, k)
   local temp = self.temp
   if temp.dtype ~= k.dtype then temp = temp:to(k.dtype) end
   return to_length(q, self.scale), to_length(k, self.scale) * temp:view(1, 1, -1, 1)
end

local ZayaAttention = llama.LlamaAttention:extend("ZayaAttention")
M.ZayaAttention = ZayaAttention

-- (transformers' order: o_proj, qk_norm, qkv_proj)
function ZayaAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, { bias = cfg.attention_bias })
   self.qk_norm = ZayaQKNorm(cfg)
   self.qkv_proj = ZayaCCAProjection(cfg, layer_idx)
   llama.attention_geometry(self, cfg, layer_idx)
end

--- For memory planning: q, k, v and the output as every attention's (utils/runtime_memory.lua),
-- and the projection's convolutions and residual paths beside them, per batch row.
function ZayaAttention:activation_values(L, S)
   return 2 * (self.n_head + 2 * self.n_kv_head) * self.head_dim * L + self.qkv_proj:token_values() * L
end

-- (the projection reads the cache's state: ZayaAttention:forward hands it over)
function ZayaAttention:project(x, B, L)
   local q, k, v = self.qkv_proj(x, rawget(self, "_cache"))
   q, k = self.qk_norm(q, k)
   return q, k, v
end

--- x (B, T, hidden); as LlamaAttention:forward, with the padding tokens' inputs zeroed first.
function ZayaAttention:forward(x, cos, sin, cache, pad)
   if pad then
      local keep = pad:narrow(2, pad:size(2) - x:size(2) + 1, x:size(2))
      if keep.device ~= x.device then keep = keep:to(x.device) end
      x = x * keep:to(x.dtype):unsqueeze(3)
   end
   rawset(self, "_cache", cache)
   local ok, y = pcall(llama.LlamaAttention.forward, self, x, cos, sin, cache, pad)
   rawset(self, "_cache", nil)
   if not ok then error(y, 0) end
   return y
end

-- --- the router and the sparse block ------------------------------------------------------------------

local ZayaRouterMLP = nn.Module:extend("ZayaRouterMLP")
M.ZayaRouterMLP = ZayaRouterMLP

function ZayaRouterMLP:__init(cfg)
   nn.Module.__init(self)
   local R = cfg.router_hidden_size
   self.norm = nn.RMSNorm(R, { eps = cfg.rms_norm_eps })
   self.fc1 = nn.Linear(R, R, { bias = true })
   self.fc2 = nn.Linear(R, R, { bias = true })
   self.out_proj = nn.Linear(R, cfg.num_experts + 1, { bias = false })
   self.act_fn = nn.GELU()
end

function ZayaRouterMLP:forward(h)
   return self.out_proj(self.act_fn(self.fc2(self.act_fn(self.fc1(self.norm(h))))))
end

local ZayaRouter = nn.Module:extend("ZayaRouter")
M.ZayaRouter = ZayaRouter
ZayaRouter.keep_float32_buffers = { balancing_biases = true }

-- (transformers' order: down_proj, router_states_scale (past the first layer), router_mlp, balancing_biases)
function ZayaRouter:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.down_proj = nn.Linear(cfg.hidden_size, cfg.router_hidden_size, { bias = true })
   if layer_idx > 1 then
      self.router_states_scale = nn.Module.new_parameter({ cfg.router_hidden_size })
      if not self.router_states_scale:is_meta() then self.router_states_scale:fill_(1) end
   end
   self.router_mlp = ZayaRouterMLP(cfg)
   self:register_buffer("balancing_biases", T.zeros({ cfg.num_experts + 1 }))
   rawset(self, "num_experts", cfg.num_experts)
end

--- x (B, L, hidden), the previous layer's router state (B, L, router_hidden_size) or nil -> the
-- weights (B L, 1) float32, the experts (a list per row, 0-based; the skip class as expert 0 at
-- weight 0, as transformers has it) and this layer's router state.
function ZayaRouter:forward(x, states)
   local h = self.down_proj(x)
   if self.router_states_scale and states then
      local s = self.router_states_scale
      h = h + states * (s.dtype == h.dtype and s or s:to(h.dtype))
   end
   local B, L = x:size(1), x:size(2)
   local probs = self.router_mlp(h):softmax(-1):reshape(B * L, self.num_experts + 1)
   local bias = self.balancing_biases
   if bias.device ~= probs.device then bias = bias:to(probs.device) end
   local _, top_i = (probs:float() + bias:float()):topk(1, 2)
   local top_w = probs:gather(2, top_i):float()
   local chosen = top_i:tolist()
   local skip = top_i:eq(self.num_experts)
   top_w = top_w:masked_fill(skip, 0)
   for _, row in ipairs(chosen) do if row[1] == self.num_experts then row[1] = 0 end end
   return top_w, chosen, h
end

local ZayaSparseMoeBlock = moe.SparseMoeBlock:extend("ZayaSparseMoeBlock")
M.ZayaSparseMoeBlock = ZayaSparseMoeBlock

function ZayaSparseMoeBlock:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.gate = ZayaRouter(cfg, layer_idx)
   self.experts = moe.experts_for(cfg, WHO, moe.Qwen3MoeMLP, "out_in")
   rawset(self, "top_k", 1)
end

--- x (B, L, hidden); states: the table the model's layers pass their router states through, key
-- the block's (KVCache:block_key). -> the chosen experts' weighted outputs (B, L, hidden).
function ZayaSparseMoeBlock:forward(x, states, key)
   local B, L, H = x:size(1), x:size(2), x:size(3)
   local top_w, top_i, state = self.gate(x, states[key])
   states[key] = state
   return self:routed(x:reshape(B * L, H), top_w, top_i):view(B, L, H)
end

-- --- layers, model -------------------------------------------------------------------------------------

-- (h + hidden_states_bias) * hidden_states_scale + (residual + residual_bias) * residual_scale
local ZayaResidualScaling = nn.Module:extend("ZayaResidualScaling")
M.ZayaResidualScaling = ZayaResidualScaling

function ZayaResidualScaling:__init(dim)
   nn.Module.__init(self)
   for _, p in ipairs({ { "hidden_states_scale", 1 }, { "hidden_states_bias", 0 }, { "residual_scale", 1 },
                        { "residual_bias", 0 } }) do
      self[p[1]] = nn.Module.new_parameter({ dim })
      if not self[p[1]]:is_meta() then self[p[1]]:fill_(p[2]) end
   end
end

local function as(t, x) return t.dtype == x.dtype and t or t:to(x.dtype) end

function ZayaResidualScaling:forward(h, residual)
   h = (h + as(self.hidden_states_bias, h)) * as(self.hidden_states_scale, h)
   return h:to(residual.dtype) + (residual + as(self.residual_bias, residual)) * as(self.residual_scale, residual)
end

local ZayaDecoderLayer = nn.Module:extend("ZayaDecoderLayer")
M.ZayaDecoderLayer = ZayaDecoderLayer

-- (transformers' order: self_attn, mlp, input_layernorm, post_attention_layernorm, the two scalings)
function ZayaDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.self_attn = ZayaAttention(cfg, layer_idx)
   self.mlp = ZayaSparseMoeBlock(cfg, layer_idx)
   self.input_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.post_attention_residual_scale = ZayaResidualScaling(cfg.hidden_size)
   self.post_mlp_residual_scale = ZayaResidualScaling(cfg.hidden_size)
end

--- x (B, T, hidden) float32 (the residual stream) -> the next layer's, float32.
function ZayaDecoderLayer:forward(x, cos, sin, cache, pad)
   local dtype = self.input_layernorm.weight.dtype
   local h = self.self_attn(self.input_layernorm(x:to(dtype)), cos, sin, cache, pad)
   x = self.post_attention_residual_scale(h, x)
   h = self.mlp(self.post_attention_layernorm(x:to(dtype)), rawget(self, "router_states"), cache and cache:block_key() or "whole")
   return self.post_mlp_residual_scale(h, x)
end

local ZayaRotaryEmbedding = llama.LlamaRotaryEmbedding:extend("ZayaRotaryEmbedding")
M.ZayaRotaryEmbedding = ZayaRotaryEmbedding

function ZayaRotaryEmbedding:__init(cfg)
   llama.LlamaRotaryEmbedding.__init(self, cfg)
   llama.add_local_rotary(self, cfg)
end

local ZayaModel = llama.LlamaModel:extend("ZayaModel")
M.ZayaModel = ZayaModel
ZayaModel.family, ZayaModel.Layer, ZayaModel.Rotary = "zaya", ZayaDecoderLayer, ZayaRotaryEmbedding
ZayaModel.layer_rotary = llama.layer_rotary_by_window
ZayaModel.blocks_need_cache = true       -- (each block's router state is kept under its key)

-- (transformers' order: embed_tokens, layers, norm, rotary_emb, input_hidden_states_scale, _bias)
function ZayaModel:__init(cfg)
   llama.LlamaModel.__init(self, cfg)
   self.input_hidden_states_scale = nn.Module.new_parameter({ cfg.hidden_size })
   self.input_hidden_states_bias = nn.Module.new_parameter({ cfg.hidden_size })
   if not self.input_hidden_states_scale:is_meta() then
      self.input_hidden_states_scale:fill_(1)
      self.input_hidden_states_bias:fill_(0)
   end
   local states = {}
   for i = 1, cfg.num_hidden_layers do rawset(self.layers[i], "router_states", states) end
   rawset(self, "router_states", states)
end

--- As LlamaModel:forward, from the token embeddings x (B, T, hidden) (ZayaForCausalLM embeds
-- first: this module holds weights of its own, and its offload hook counts x's rows) or the ids;
-- the embeddings scaled into the float32 residual stream, the router states passed from layer to
-- layer, the final norm in the model's dtype.
function ZayaModel:forward(x, cache, pad, pos, blocks)
   local states = rawget(self, "router_states")
   for k in pairs(states) do states[k] = nil end        -- (a forward's router states are its own)
   local cfg = self.config
   if x:dim() == 2 then x = self.embed_tokens(x) end
   local L = x:size(2)
   local past = cache and cache.length or 0
   local rope = self:layer_rotary(pos or T.arange(past, past + L, { device = x.device }), x)
   local dtype = x.dtype
   x = ((x + as(self.input_hidden_states_bias, x)) * as(self.input_hidden_states_scale, x)):float()
   local n = cfg.num_hidden_layers
   local schedule = blocks and block_schedule.plan(blocks, x, cache, n, WHO, self.blocks_need_cache)
   for i = 1, n do
      local r = rope[i]
      x = block_schedule.call(schedule, i, self.layers[i], x, cache, pad, r[1], r[2])
   end
   if cache then cache:advance(L) end
   return self.norm(x:to(dtype))
end

local ZayaForCausalLM = llama.LlamaForCausalLM:extend("ZayaForCausalLM")
M.ZayaForCausalLM = ZayaForCausalLM
ZayaForCausalLM.family, ZayaForCausalLM.Model = "zaya", ZayaModel
ZayaForCausalLM.no_split_modules = { "ZayaDecoderLayer" }
ZayaForCausalLM.forward = common.causal_lm_forward(WHO .. ".forward", "model", "embed_tokens", nil, true)

function ZayaForCausalLM:__init(cfg)
   llama.LlamaForCausalLM.__init(self, cfg)
   if self.config.lm_head_bias then
      self.lm_head = nn.Linear(self.config.hidden_size, self.config.vocab_size, { bias = true })
      self:tie_weights()
   end
end

function ZayaForCausalLM:read_config(source) return M.config(source) end

return M
