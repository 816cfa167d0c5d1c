--- Laguna (LagunaForCausalLM, model_type "laguna": poolside's Laguna-XS.2) with Hugging Face
-- parameter names, as transformers builds it.
--
-- Attention: Llama's grouped-query attention with an RMSNorm over each query and key head (q_norm,
-- k_norm) before the rotary embedding, and an output gate: softplus(self_attn.g_proj(x)), in float32,
-- multiplies the heads' output before o_proj, one gate a head (gating true or "per-head") or one a
-- head's dim ("per-element"). Each layer has its own number of query heads
-- (num_attention_heads_per_layer; the key/value heads are the same everywhere). layer_types (else
-- every layer full) says which layers attend over a sliding_window of keys; each layer type rotates
-- by its own rope_parameters entry (full_attention, sliding_attention: by default half of each head
-- at base 500,000 and the whole head at base 10,000; the hub's full layers are YaRN-scaled), over
-- int(head_dim x partial_rotary_factor) dims of each head, the rest passing through.
--
-- MLP: mlp_layer_types (else the first layer dense, the rest sparse) picks a dense SwiGLU MLP or a
-- sparse block: the router (mlp.gate) takes the logits in the model's dtype, to float32, through
-- tanh(logits / c) x c when moe_router_logit_softcapping c > 0, then a sigmoid; each token's
-- num_experts_per_tok experts are the best by score + e_score_correction_bias (a parameter that
-- steers the choice only), weighed by their scores over their sum; the routed sum times
-- moe_routed_scaling_factor, plus a shared MLP every token goes through (mlp.shared_experts,
-- shared_expert_intermediate_size wide). Only the chosen experts run, so experts on disk are read for
-- the tokens that chose them.
--
-- The hub holds one module per expert (mlp.experts.E.{gate,up,down}_proj), the bias as
-- mlp.experts.e_score_correction_bias and the shared MLP as mlp.shared_expert: they load renamed as
-- transformers' conversion mapping renames them. transformers' stacked layout
-- (mlp.experts.{gate_up_proj, down_proj}) loads too.
local nn = require("moonload.nn")
local F = require("moonload.nn.functional")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")

local M = {}
local WHO = "models.laguna"

-- LagunaConfig's defaults for the keys Llama's config requires or defaults otherwise.
local DEFAULTS = { vocab_size = 100352, hidden_size = 2048, intermediate_size = 8192, num_hidden_layers = 40,
   num_attention_heads = 48, num_key_value_heads = 8, head_dim = 128, max_position_embeddings = 131072,
   rms_norm_eps = 1e-6, sliding_window = 512 }

-- transformers' rope_parameters when the config has none, a fresh table each time
local function default_rope()
   return { full_attention = { rope_type = "default", rope_theta = 500000, partial_rotary_factor = 0.5 },
      sliding_attention = { rope_type = "default", rope_theta = 10000, partial_rotary_factor = 1 } }
end

-- The rope types transformers' Laguna is known to build per layer type, with the keys each needs.
local ROPE_NEEDS = { default = { "rope_theta" }, yarn = { "rope_theta", "factor", "original_max_position_embeddings" } }

-- The rope_parameters entry of each layer type in use, checked: an object of a supported rope type
-- holding the keys that type needs (transformers reads them from the entry alone). who: the family's
-- name in errors.
local function check_rope(fixed, where, who)
   local used = {}
   for _, kind in ipairs(fixed.layer_types) do used[kind] = true end
   local rp = fixed.rope_parameters
   if type(rp) ~= "table" then
      config.fail(where, who, 'config key "rope_parameters" must be an object, got %s', tostring(rp))
   end
   for _, kind in ipairs({ "full_attention", "sliding_attention" }) do
      local p, key = rp[kind], "rope_parameters." .. kind
      if used[kind] then
         if type(p) ~= "table" then
            config.fail(where, who, 'config key "%s" must be an object (each layer type rotates by its own), got %s', key,
               tostring(p))
         end
         local rope_type = p.rope_type or p.type or "default"
         if not ROPE_NEEDS[rope_type] then
            config.fail(where, who, 'rope type "%s" of %s is not supported (supported: default, yarn)', tostring(rope_type),
               key)
         end
         for _, k in ipairs(ROPE_NEEDS[rope_type]) do
            if p[k] == nil then config.fail(where, who, 'config key "%s.%s" is missing (needed by rope type "%s")', key, k,
               rope_type) end
         end
      end
   end
end

-- layer_types and mlp_layer_types as LagunaConfig fills them in: every layer full; the first dense,
-- the rest sparse (n: num_hidden_layers, when it is a usable count; llama.config checks it).
local function default_layer_kinds(fixed, n)
   if type(n) ~= "number" or n ~= math.floor(n) or n < 1 then return end
   if fixed.layer_types == nil then
      fixed.layer_types = {}
      for i = 1, n do fixed.layer_types[i] = "full_attention" end
   end
   if fixed.mlp_layer_types == nil then
      fixed.mlp_layer_types = {}
      for i = 1, n do fixed.mlp_layer_types[i] = i == 1 and "dense" or "sparse" end
   end
end

-- cfg[key] (default when absent), checked to be a number > 0, or >= 0 with zero_ok.
local function number_or(cfg, key, default, zero_ok)
   local v = cfg[key]
   if v == nil then v = default end
   if type(v) ~= "number" or v < 0 or (v == 0 and not zero_ok) then
      config.fail(cfg, WHO, 'config key "%s" must be a number %s 0, got %s', key, zero_ok and ">=" or ">", tostring(v))
   end
   cfg[key] = v
end

-- cfg.heads_per_layer: num_attention_heads_per_layer (else num_attention_heads everywhere), each a
-- multiple of num_key_value_heads.
local function heads_per_layer(cfg)
   local list, n = cfg.num_attention_heads_per_layer, cfg.num_hidden_layers
   if list ~= nil and (type(list) ~= "table" or #list ~= n) then
      config.fail(cfg, WHO, 'config key "num_attention_heads_per_layer" must list %d head counts', n)
   end
   cfg.heads_per_layer = {}
   for i = 1, n do
      local h = list and list[i] or cfg.num_attention_heads
      if type(h) ~= "number" or h ~= math.floor(h) or h < 1 then
         config.fail(cfg, WHO, "num_attention_heads_per_layer[%d] must be a positive integer, got %s", i, tostring(h))
      end
      if h % cfg.num_key_value_heads ~= 0 then
         config.fail(cfg, WHO, "num_attention_heads_per_layer[%d] %d is not a multiple of num_key_value_heads %d", i, h,
            cfg.num_key_value_heads)
      end
      cfg.heads_per_layer[i] = h
   end
end

--- The layer plan and rotary tables of a Laguna or Mellum config (fixed: raw with the family's
-- defaults, layer_types and rope_parameters filled in; who: the family's name in errors): llama.config's
-- cfg with layer_types' windows (cfg.layer_windows), the full layers' rotary table (cfg.rope,
-- cfg.rotary_dim) and the sliding layers' (cfg.rope_local, cfg.local_rotary_dim).
function M.layer_type_config(fixed, src, raw, family, who)
   if type(fixed.layer_types) == "table" then check_rope(fixed, { _source = src }, who) end
   -- transformers reads the rotary parameters from rope_parameters' per-type entries alone
   fixed.rope_theta, fixed.rope_scaling, fixed.partial_rotary_factor = nil, nil, nil
   local cfg = llama.config(fixed, family)
   cfg._source, cfg._raw = src, raw
   local rp = cfg.rope_parameters
   -- (YaRN's truncate is read from rope_parameters' top level, not from the entry: transformers')
   cfg.rope.truncate = rp.truncate
   local slides = false
   for _, w in ipairs(cfg.layer_windows) do slides = slides or w ~= false end
   if slides then                        -- the sliding layers' own rope type, base and rotary dims
      local sliding = rp.sliding_attention
      local lcfg = setmetatable({}, { __index = cfg })
      llama.set_rotary_dim(lcfg, who, sliding.partial_rotary_factor or 1)
      cfg.local_rotary_dim = lcfg.rotary_dim
      cfg.rope_local = llama.rope_from(cfg, who, { { sliding, "rope_parameters.sliding_attention." } }, 10000)
      cfg.rope_local.truncate = rp.truncate
   end
   return cfg
end

--- cfg.sparse_layers from cfg.mlp_layer_types ("dense" or "sparse" per layer), checked.
function M.read_mlp_layer_types(cfg, who)
   local kinds = cfg.mlp_layer_types
   if type(kinds) ~= "table" or #kinds ~= cfg.num_hidden_layers then
      config.fail(cfg, who, 'config key "mlp_layer_types" must list %d layer types', cfg.num_hidden_layers)
   end
   cfg.sparse_layers = {}
   for i = 1, cfg.num_hidden_layers do
      if kinds[i] ~= "dense" and kinds[i] ~= "sparse" then
         config.fail(cfg, who, 'mlp_layer_types[%d] is "%s" (supported: dense, sparse)', i, tostring(kinds[i]))
      end
      cfg.sparse_layers[i] = kinds[i] == "sparse"
   end
end

--- Reads and checks a Laguna config (path, folder or table): Llama's keys with LagunaConfig's
-- defaults, layer_types (cfg.layer_windows), the per-layer-type rotary tables (cfg.rope and
-- cfg.rotary_dim for the full layers, cfg.rope_local and cfg.local_rotary_dim for the sliding ones),
-- the query heads per layer (cfg.heads_per_layer), the gate's granularity (cfg.gate_per_head), and
-- the experts: num_experts, num_experts_per_tok, moe_intermediate_size,
-- shared_expert_intermediate_size, moe_routed_scaling_factor, moe_router_logit_softcapping and
-- cfg.sparse_layers (from mlp_layer_types).
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   default_layer_kinds(fixed, fixed.num_hidden_layers)
   if fixed.rope_parameters == nil then fixed.rope_parameters = default_rope() end
   local cfg = M.layer_type_config(fixed, src, raw, "laguna", WHO)
   heads_per_layer(cfg)
   local gating = cfg.gating
   if gating == nil then gating = true end
   if gating ~= true and gating ~= false and gating ~= "per-head" and gating ~= "per-element" then
      config.fail(cfg, WHO, 'config key "gating" must be true, "per-head" or "per-element", got %s', tostring(gating))
   end
   -- (transformers gates per element for anything but true and "per-head": false too)
   cfg.gate_per_head = gating == true or gating == "per-head"
   local function int(key, default, min)
      cfg[key] = config.integer(cfg, WHO, key, cfg[key] == nil and default or cfg[key], min)
   end
   int("num_experts", 256, 1)
   int("num_experts_per_tok", 8, 1)
   int("moe_intermediate_size", 512, 1)
   int("shared_expert_intermediate_size", 512, 1)
   if cfg.num_experts_per_tok > cfg.num_experts then
      config.fail(cfg, WHO, "num_experts_per_tok %d is more than num_experts %d", cfg.num_experts_per_tok, cfg.num_experts)
   end
   number_or(cfg, "moe_routed_scaling_factor", 1)
   number_or(cfg, "moe_router_logit_softcapping", 0, true)       -- (0: no softcapping)
   if cfg.moe_apply_router_weight_on_input ~= nil and cfg.moe_apply_router_weight_on_input ~= false then
      config.fail(cfg, WHO, 'config key "moe_apply_router_weight_on_input" is %s: routing weights applied to the '
         .. "experts' input are not supported (transformers refuses them too)", tostring(cfg.moe_apply_router_weight_on_input))
   end
   M.read_mlp_layer_types(cfg, WHO)
   return cfg
end

-- --- MLPs, router and the sparse block ------------------------------------------------------------

-- A dense layer's MLP, the shared experts or an expert: gate/up/down without biases, of the width given.
local LagunaMLP = moe.Qwen3MoeMLP:extend("LagunaMLP")
M.LagunaMLP = LagunaMLP

-- transformers' stacked experts: gate_up_proj (E, 2 x inter, hidden), down_proj (E, hidden, inter).
local LagunaExperts = moe.StackedExperts:extend("LagunaExperts")
M.LagunaExperts = LagunaExperts

-- The router: its weight (E, hidden) and the correction bias, parameters in the model's dtype (as
-- transformers has them); the choice is made here, where the bias is.
local LagunaTopKRouter = nn.Module:extend("LagunaTopKRouter")
M.LagunaTopKRouter = LagunaTopKRouter

function LagunaTopKRouter:__init(cfg)
   nn.Module.__init(self)
   self.weight = nn.Module.new_parameter({ cfg.num_experts, cfg.hidden_size })
   self.e_score_correction_bias = nn.Module.new_parameter({ cfg.num_experts })
   if not self.weight:is_meta() then
      self.weight:fill_(0)
      self.e_score_correction_bias:fill_(0)
   end
   rawset(self, "top_k", cfg.num_experts_per_tok)
   rawset(self, "softcap", cfg.moe_router_logit_softcapping)
end

--- flat (N, hidden): each row's top_k experts by sigmoid(logits) + e_score_correction_bias,
-- weighted by the scores alone over their sum: top_w (N, k) float32, top_i a list per row of
-- 0-based experts. The logits: flat times the weight in the model's dtype, then float32, softcapped.
function LagunaTopKRouter:forward(flat)
   local logits = F.linear(flat, self.weight):float()
   local cap = self.softcap
   if cap > 0 then logits = (logits / cap):tanh() * cap end
   return moe.biased_sigmoid_route(logits, self.e_score_correction_bias, self.top_k, true, 0)
end

function LagunaTopKRouter:extra_repr()
   return string.format("num_experts=%d, top_k=%d, softcap=%s", self.weight:size(1), self.top_k,
      nn.Module.py_float(self.softcap))
end

local LagunaSparseMoeBlock = moe.SparseMoeBlock:extend("LagunaSparseMoeBlock")
M.LagunaSparseMoeBlock = LagunaSparseMoeBlock

-- (transformers' order: experts, gate, shared_experts)
function LagunaSparseMoeBlock:__init(cfg)
   nn.Module.__init(self)
   self.experts = moe.experts_for(cfg, WHO, LagunaMLP, "apart", LagunaExperts)
   self.gate = LagunaTopKRouter(cfg)
   self.shared_experts = LagunaMLP(cfg, cfg.shared_expert_intermediate_size)
   self:routing(cfg)             -- (top_k here too: memory planning reads it, utils/runtime_memory.lua)
   rawset(self, "scale", cfg.moe_routed_scaling_factor)
end

--- The router's choice for flat's rows (LagunaTopKRouter:forward).
function LagunaSparseMoeBlock:route(flat) return self.gate(flat) end

--- x (B, T, hidden): the routed experts' weighted sum times moe_routed_scaling_factor, plus the
-- shared experts'.
function LagunaSparseMoeBlock:forward(x)
   local routed = moe.SparseMoeBlock.forward(self, x)
   if self.scale ~= 1 then routed = routed * self.scale end
   return routed + self.shared_experts(x)
end

local function mlp(cfg, layer_idx)
   return cfg.sparse_layers[layer_idx] and LagunaSparseMoeBlock(cfg) or LagunaMLP(cfg)
end

-- --- attention, rotary table, model ---------------------------------------------------------------

-- (q_norm and k_norm come with cfg.qk_norm: LlamaAttention applies them before rotating)
local LM = moe.decoder_family("laguna", "Laguna", llama.LlamaAttention, mlp, "mlp", M.config, M)
moe.builds_experts_as_stored(LM)

-- the hub's names, as transformers' conversion mapping renames them
LM.checkpoint_renames = { { "%.mlp%.experts%.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias" },
   { "%.mlp%.shared_expert%.", ".mlp.shared_experts." } }

local LagunaAttention = M.LagunaAttention

-- (this layer's query heads; g_proj gives a gate per head, or per head and dim)
function LagunaAttention:__init(cfg, layer_idx)
   local H = cfg.heads_per_layer[layer_idx]
   llama.LlamaAttention.__init(self, setmetatable({ num_attention_heads = H }, { __index = cfg }), layer_idx)
   self.g_proj = nn.Linear(cfg.hidden_size, cfg.gate_per_head and H or H * cfg.head_dim, { bias = false })
   rawset(self, "gate_per_head", cfg.gate_per_head)
end

--- x (B, T, hidden): LlamaAttention's forward, the gate's input kept for attend_heads, which gates
-- the heads' output before o_proj.
function LagunaAttention:forward(x, cos, sin, cache, pad)
   rawset(self, "gate_input", x)
   return llama.LlamaAttention.forward(self, x, cos, sin, cache, pad)
end

--- The heads' output (B, T, H * D) times softplus(g_proj(x)) (taken in float32, as transformers
-- does), per head or per element.
function LagunaAttention:attend_heads(q, k, v, past, pad)
   local y = llama.LlamaAttention.attend_heads(self, q, k, v, past, pad)
   local x = rawget(self, "gate_input")
   rawset(self, "gate_input", nil)                  -- (not kept past this call)
   local gate = self.g_proj(x):float():softplus():to(y.dtype)
   if not self.gate_per_head then return y * gate end
   local B, L, H, D = y:size(1), y:size(2), self.n_head, self.head_dim
   return (y:view(B, L, H, D) * gate:unsqueeze(4)):view(B, L, H * D)
end

-- The sliding layers' rotary table: their own base, rope type and rotary dims.
function M.LagunaRotaryEmbedding:__init(cfg)
   llama.LlamaRotaryEmbedding.__init(self, cfg)
   if cfg.rope_local then
      llama.add_local_rotary(self, setmetatable({ rotary_dim = cfg.local_rotary_dim }, { __index = cfg }))
   end
end

--- The sliding layers' tables apart when there are any (llama.layer_rotary_by_window).
function M.LagunaModel:layer_rotary(positions, x)
   if not self.config.rope_local then return llama.LlamaModel.layer_rotary(self, positions, x) end
   return llama.layer_rotary_by_window(self, positions, x)
end

-- --- Mellum -----------------------------------------------------------------------------------------

-- Mellum 2 (MellumForCausalLM, model_type "mellum": JetBrains/Mellum2-12B-A2.5B-Base): Laguna's
-- layer plan and per-layer-type rotary tables (by default every layer full; full layers at base
-- 500,000, sliding ones at 10,000) with Qwen3-MoE's attention (per-head q/k norms, biased when
-- attention_bias) and sparse block (the top num_experts_per_tok of a softmax over the router's logits,
-- renormalized when norm_topk_prob); mlp_layer_types (by default all sparse) picks it or a dense MLP.
-- No gates, shared experts or per-layer head counts. transformers rotates whole heads only here
-- (a partial_rotary_factor breaks its attention), so one is refused. The hub's multi-token-prediction
-- layer (mtp.*) is left out, as transformers does.
local MELLUM = "models.mellum"

-- MellumConfig's defaults (Qwen3-MoE's where it has none) for the keys the readers require or default otherwise.
local MELLUM_DEFAULTS = { vocab_size = 98304, hidden_size = 2304, intermediate_size = 7168, num_hidden_layers = 28,
   num_attention_heads = 32, num_key_value_heads = 4, head_dim = 128, max_position_embeddings = 131072,
   sliding_window = 1024, num_local_experts = 64, num_experts_per_tok = 8, moe_intermediate_size = 896,
   norm_topk_prob = true }

--- Reads and checks a Mellum config (path, folder or table) with MellumConfig's defaults: the layer
-- plan and rotary tables (M.layer_type_config), then the experts: num_experts (num_local_experts,
-- or num_experts), num_experts_per_tok, moe_intermediate_size, norm_topk_prob and cfg.sparse_layers.
function M.mellum_config(source)
   local raw, src, fixed = config.read_with_defaults(source, MELLUM, MELLUM_DEFAULTS)
   if raw.num_local_experts == nil and raw.num_experts ~= nil then fixed.num_local_experts = raw.num_experts end
   local n = fixed.num_hidden_layers
   if type(n) == "number" and n >= 1 and n == math.floor(n) then   -- (llama.config names a bad count)
      local function every_layer(kind)
         local t = {}
         for i = 1, n do t[i] = kind end
         return t
      end
      fixed.layer_types = fixed.layer_types or every_layer("full_attention")
      fixed.mlp_layer_types = fixed.mlp_layer_types or every_layer("sparse")
   end
   if fixed.rope_parameters == nil then
      fixed.rope_parameters = { full_attention = { rope_type = "default", rope_theta = 500000 },
         sliding_attention = { rope_type = "default", rope_theta = 10000 } }
   end
   for _, kind in ipairs({ "full_attention", "sliding_attention" }) do
      local p = type(fixed.rope_parameters) == "table" and fixed.rope_parameters[kind]
      local f = type(p) == "table" and p.partial_rotary_factor
      if f and f ~= 1 then
         config.fail({ _source = src }, MELLUM, 'config key "rope_parameters.%s.partial_rotary_factor" is %s: transformers\' '
            .. "Mellum rotates whole heads only", kind, tostring(f))
      end
   end
   local cfg = M.layer_type_config(fixed, src, raw, "mellum", MELLUM)
   local function int(key, min) cfg[key] = config.integer(cfg, MELLUM, key, cfg[key], min) return cfg[key] end
   cfg.num_experts = int("num_local_experts", 1)
   int("num_experts_per_tok", 1)
   int("moe_intermediate_size", 1)
   if cfg.num_experts_per_tok > cfg.num_experts then
      config.fail(cfg, MELLUM, "num_experts_per_tok %d is more than num_local_experts %d", cfg.num_experts_per_tok,
         cfg.num_experts)
   end
   if type(cfg.norm_topk_prob) ~= "boolean" then
      config.fail(cfg, MELLUM, 'config key "norm_topk_prob" must be a boolean, got %s', tostring(cfg.norm_topk_prob))
   end
   M.read_mlp_layer_types(cfg, MELLUM)
   return cfg
end

local MellumMLP = moe.Qwen3MoeMLP:extend("MellumMLP")
M.MellumMLP = MellumMLP

local MellumSparseMoeBlock = moe.Qwen3MoeSparseMoeBlock:extend("MellumSparseMoeBlock")
M.MellumSparseMoeBlock = MellumSparseMoeBlock

local function mellum_mlp(cfg, layer_idx)
   return cfg.sparse_layers[layer_idx] and MellumSparseMoeBlock(cfg) or MellumMLP(cfg)
end

-- (q_norm and k_norm come with cfg.qk_norm: LlamaAttention applies them before rotating)
local MellumLM = moe.decoder_family("mellum", "Mellum", llama.LlamaAttention, mellum_mlp, "mlp", M.mellum_config, M)
moe.builds_experts_as_stored(MellumLM)
MellumLM.ignore_unexpected = { "rotary_emb%.inv_freq$", "^mtp%." }
M.MellumRotaryEmbedding.__init = M.LagunaRotaryEmbedding.__init
M.MellumModel.layer_rotary = M.LagunaModel.layer_rotary

return M
