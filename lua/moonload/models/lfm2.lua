--- LFM2 (Lfm2ForCausalLM, model_type "lfm2": Liquid's LFM2-350M to 2.6B; Lfm2MoeForCausalLM,
-- "lfm2_moe": LFM2-8B-A1B, sparse after its first num_dense_layers) with Hugging Face
-- parameter names. Most layers are short convolutions (conv.*): in_proj gives B, C and x, a
-- depthwise causal convolution of conv_L_cache taps runs over B * x, and out_proj reads C times
-- it; the others (full_attn_idxs, or layer_types "full_attention") are grouped-query attention
-- with an RMSNorm over each query and key head (q_layernorm, k_layernorm) and out_proj. Each layer
-- has an RMSNorm before its operator (operator_norm) and before its SwiGLU feed-forward (ffn_norm;
-- feed_forward.{w1, w3, w2}, whose width block_auto_adjust_ff_dim scales by 2/3, then
-- block_ffn_dim_multiplier, rounded up to block_multiple_of); embedding_norm ends the model; the
-- head is tied.
--
-- A generation's cache keeps the short convolutions' last conv_L_cache - 1 inputs
-- (KVCache:layer_state), which cannot be cropped back: assisted generation is refused.
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local causal_conv = require("moonload.models.causal_conv")
local moe = require("moonload.models.moe")
local T = require("moonload.tensor")

local M = {}

--- Reads and checks an LFM2 config (path, folder or table): Llama's keys under LFM2's names
-- (norm_eps, tie_embedding, block_ff_dim), layer_types or full_attn_idxs, the convolution's taps
-- and bias, and the feed-forward's width (cfg.intermediate_size, adjusted as transformers does).
-- family "lfm2_moe" reads an LFM2-MoE one: its experts, router and num_dense_layers.
function M.config(source, family)
   family = family or "lfm2"
   local WHO = "models." .. family
   local cfg = llama.config(source, family)
   local function int(name, default, min) return config.integer(cfg, WHO, name, cfg[name] or default, min) end
   cfg.conv_L_cache = int("conv_L_cache", 3, 1)
   cfg.conv_bias = cfg.conv_bias == true
   -- transformers' default: the layers full_attn_idxs lists (0-based) attend, all of them without it
   local full = {}
   for _, i in ipairs(type(cfg.full_attn_idxs) == "table" and cfg.full_attn_idxs or {}) do full[i + 1] = true end
   config.layer_types(cfg, WHO, { "conv", "full_attention" }, function(i)
      return (cfg.full_attn_idxs == nil or full[i]) and "full_attention" or "conv"
   end)
   if family == "lfm2_moe" then return M.moe_config(cfg, WHO, int) end
   if cfg.block_auto_adjust_ff_dim ~= false then
      local width = math.floor(2 * cfg.intermediate_size / 3)
      local multiplier = cfg.block_ffn_dim_multiplier
      if multiplier == nil then multiplier = 1 end
      if type(multiplier) ~= "number" or multiplier <= 0 then
         config.fail(cfg, WHO, 'config key "block_ffn_dim_multiplier" must be a positive number, got %s', tostring(multiplier))
      end
      local multiple = int("block_multiple_of", 256, 1)
      width = math.floor(multiplier * width)
      cfg.intermediate_size = multiple * math.floor((width + multiple - 1) / multiple)
   end
   return cfg
end

-- LFM2-MoE's keys (its dense layers keep intermediate_size as it is).
function M.moe_config(cfg, WHO, int)
   cfg.num_experts = int("num_experts", 32, 1)
   cfg.num_experts_per_tok = int("num_experts_per_tok", 4, 1)
   cfg.moe_intermediate_size = int("moe_intermediate_size", 1792, 1)
   cfg.num_dense_layers = int("num_dense_layers", 2, 0)
   if cfg.num_experts_per_tok > cfg.num_experts then
      config.fail(cfg, WHO, "num_experts_per_tok %d is more than num_experts %d", cfg.num_experts_per_tok, cfg.num_experts)
   end
   local scale = cfg.routed_scaling_factor
   if scale == nil then scale = 1 end
   if type(scale) ~= "number" or scale <= 0 then
      config.fail(cfg, WHO, 'config key "routed_scaling_factor" must be a positive number, got %s', tostring(scale))
   end
   cfg.routed_scaling_factor = scale
   cfg.use_expert_bias = cfg.use_expert_bias ~= false
   cfg.norm_topk_prob = cfg.norm_topk_prob ~= false
   return cfg
end

-- --- layers ---------------------------------------------------------------------------------------

local Lfm2ShortConv = nn.Module:extend("Lfm2ShortConv")
M.Lfm2ShortConv = Lfm2ShortConv

function Lfm2ShortConv:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local H = cfg.hidden_size
   self.conv = causal_conv.Conv1d(H, cfg.conv_L_cache, { bias = cfg.conv_bias })
   self.in_proj = nn.Linear(H, 3 * H, { bias = cfg.conv_bias })
   self.out_proj = nn.Linear(H, H, { bias = cfg.conv_bias })
   rawset(self, "layer_idx", layer_idx)
end

--- Bytes a cache keeps for this layer per batch of B sequences (utils/runtime_memory.lua): the
-- last taps - 1 inputs of the convolution, el bytes each, whatever the length.
function Lfm2ShortConv:state_bytes(B, el)
   return B * (self.conv.taps - 1) * self.conv.channels * el
end

--- Values a forward forms per token at once beside the layer's input and MLP (for planning).
function Lfm2ShortConv:token_values()
   return 8 * self.conv.channels
end

--- x (B, L, hidden); cache optional (the convolution's last inputs carry over); pad (B, past + L)
-- bool or nil: padding tokens enter as zeros.
function Lfm2ShortConv:forward(x, cache, pad)
   local B, L, H = x:size(1), x:size(2), x:size(3)
   if pad and L > 1 then x = x * pad:narrow(2, pad:size(2) - L + 1, L):to(x.dtype):unsqueeze(3) end
   local bcx = self.in_proj(x)
   local b, c, v = bcx:narrow(3, 1, H), bcx:narrow(3, H + 1, H), bcx:narrow(3, 2 * H + 1, H)
   local state = cache and cache:layer_state(self.layer_idx, B, function(rows)
      return { conv = causal_conv.initial_state(self.conv, rows, x) }
   end)
   local y = causal_conv.run(self.conv, b * v, state and state.conv)
   return self.out_proj(c * y)
end

local Lfm2Attention = llama.LlamaAttention:extend("Lfm2Attention")
M.Lfm2Attention = Lfm2Attention
Lfm2Attention.out_name = "out_proj"

function Lfm2Attention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
   self.q_proj = nn.Linear(cfg.hidden_size, H * D, { bias = false })
   self.k_proj = nn.Linear(cfg.hidden_size, Hkv * D, { bias = false })
   self.v_proj = nn.Linear(cfg.hidden_size, Hkv * D, { bias = false })
   self.out_proj = nn.Linear(H * D, cfg.hidden_size, { bias = false })
   self.q_layernorm = nn.RMSNorm(D, { eps = cfg.rms_norm_eps })
   self.k_layernorm = nn.RMSNorm(D, { eps = cfg.rms_norm_eps })
   llama.attention_geometry(self, cfg, layer_idx)
end

function Lfm2Attention:project(x, B, L)
   local H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
   return self.q_layernorm(self.q_proj(x):view(B, L, H, D)), self.k_layernorm(self.k_proj(x):view(B, L, Hkv, D)),
      self.v_proj(x):view(B, L, Hkv, D)
end

local Lfm2MLP = nn.Module:extend("Lfm2MLP")
M.Lfm2MLP = Lfm2MLP

--- Lfm2MLP(cfg[, width]): intermediate_size wide, or width (an LFM2-MoE expert).
function Lfm2MLP:__init(cfg, width)
   nn.Module.__init(self)
   width = width or cfg.intermediate_size
   self.w1 = nn.Linear(cfg.hidden_size, width, { bias = false })
   self.w3 = nn.Linear(cfg.hidden_size, width, { bias = false })
   self.w2 = nn.Linear(width, cfg.hidden_size, { bias = false })
end

function Lfm2MLP:forward(x)
   return self.w2(self.w1(x):silu() * self.w3(x))
end

-- LFM2-MoE's sparse feed-forward: experts w1/w3/w2 one by one behind a sigmoid router, each
-- token's top num_experts_per_tok chosen by score + expert_bias (a float32 buffer) but weighted by
-- the scores alone, renormalized (norm_topk_prob) and scaled by routed_scaling_factor.
local Lfm2MoeSparseMoeBlock = moe.SparseMoeBlock:extend("Lfm2MoeSparseMoeBlock")
M.Lfm2MoeSparseMoeBlock = Lfm2MoeSparseMoeBlock

function Lfm2MoeSparseMoeBlock:__init(cfg)
   nn.Module.__init(self)
   local experts = {}
   for e = 1, cfg.num_experts do experts[e] = Lfm2MLP(cfg, cfg.moe_intermediate_size) end
   self.experts = nn.ModuleList(experts)
   self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, { bias = false })
   if cfg.use_expert_bias then self:register_buffer("expert_bias", T.zeros({ cfg.num_experts })) end
   self:routing(cfg)
   rawset(self, "routed_scaling_factor", cfg.routed_scaling_factor)
end
Lfm2MoeSparseMoeBlock.keep_float32_buffers = { expert_bias = true }

function Lfm2MoeSparseMoeBlock:route(flat)
   return moe.biased_sigmoid_route(self.gate(flat), self.expert_bias, self.top_k, self.norm_topk_prob, 1e-6,
      self.routed_scaling_factor)
end

local Lfm2DecoderLayer = nn.Module:extend("Lfm2DecoderLayer")
M.Lfm2DecoderLayer = Lfm2DecoderLayer
Lfm2DecoderLayer.Attention, Lfm2DecoderLayer.Conv, Lfm2DecoderLayer.MLP = Lfm2Attention, Lfm2ShortConv, Lfm2MLP   -- (LFM3's own)

function Lfm2DecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   if cfg.layer_types[layer_idx] ~= "conv" then         -- (LFM3's sliding layers attend too)
      self.self_attn = self.Attention(cfg, layer_idx)
   else
      self.conv = self.Conv(cfg, layer_idx)
   end
   local sparse = cfg.num_experts and layer_idx > cfg.num_dense_layers
   self.feed_forward = sparse and Lfm2MoeSparseMoeBlock(cfg) or self.MLP(cfg)
   self.operator_norm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.ffn_norm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
end

function Lfm2DecoderLayer:forward(x, cos, sin, cache, pad)
   local h = self.operator_norm(x)
   if self.self_attn then
      x = x + self.self_attn(h, cos, sin, cache, pad)
   else
      x = x + self.conv(h, cache, pad)
   end
   return x + self.feed_forward(self.ffn_norm(x))
end

-- --- model ----------------------------------------------------------------------------------------

local Lfm2RotaryEmbedding = llama.LlamaRotaryEmbedding:extend("Lfm2RotaryEmbedding")
M.Lfm2RotaryEmbedding = Lfm2RotaryEmbedding

local Lfm2Model = llama.LlamaModel:extend("Lfm2Model")
M.Lfm2Model = Lfm2Model
Lfm2Model.family, Lfm2Model.Layer, Lfm2Model.Rotary = "lfm2", Lfm2DecoderLayer, Lfm2RotaryEmbedding
Lfm2Model.norm_name = "embedding_norm"

-- transformers' order: the embeddings, the layers, the rotary table, the final norm
function Lfm2Model:__init(cfg)
   local layers = {}
   for i = 1, cfg.num_hidden_layers do layers[i] = self.Layer(cfg, i) end
   nn.Module.__init(self)
   self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
   self.layers = nn.ModuleList(layers)
   self.rotary_emb = self.Rotary(cfg)
   self.embedding_norm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   rawset(self, "config", cfg)
end

local Lfm2ForCausalLM = llama.LlamaForCausalLM:extend("Lfm2ForCausalLM")
M.Lfm2ForCausalLM = Lfm2ForCausalLM
Lfm2ForCausalLM.family, Lfm2ForCausalLM.Model = "lfm2", Lfm2Model
Lfm2ForCausalLM.no_split_modules = { "Lfm2DecoderLayer" }
Lfm2ForCausalLM.stateful = true          -- its cache cannot be cropped: no assisted generation
Lfm2ForCausalLM.forward = common.causal_lm_forward("models.lfm2.forward", "model", "embed_tokens")

function Lfm2ForCausalLM:read_config(source) return M.config(source, self.family) end

-- LFM2-MoE (Lfm2MoeForCausalLM, model_type "lfm2_moe": LFM2-8B-A1B): the same layers with a sparse
-- feed-forward after the first num_dense_layers.
local Lfm2MoeModel = Lfm2Model:extend("Lfm2MoeModel")
M.Lfm2MoeModel = Lfm2MoeModel
Lfm2MoeModel.family = "lfm2_moe"

local Lfm2MoeForCausalLM = Lfm2ForCausalLM:extend("Lfm2MoeForCausalLM")
M.Lfm2MoeForCausalLM = Lfm2MoeForCausalLM
Lfm2MoeForCausalLM.family, Lfm2MoeForCausalLM.Model = "lfm2_moe", Lfm2MoeModel
Lfm2MoeForCausalLM.forward = common.causal_lm_forward("models.lfm2_moe.forward", "model", "embed_tokens")

return M
