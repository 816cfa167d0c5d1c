--- Hy3 (HYV3ForCausalLM, model_type "hy_v3": Tencent's Hy3-preview) with transformers' parameter
-- names, as transformers builds it.
--
-- Attention: Llama's grouped-query attention with an RMSNorm over each query and key head (q_norm,
-- k_norm), applied before the rotary embedding, as Apertus's.
--
-- MLP: mlp_layer_types says which layers keep a dense SwiGLU MLP and which are sparse (by default
-- the first dense, the others sparse). A sparse layer's router (mlp.gate, a float32 weight) scores
-- every expert with a float32 sigmoid, picks each token's num_experts_per_tok best by score +
-- e_score_correction_bias (a float32 buffer that steers the choice only), weighs them by their
-- scores over their sum (+ 1e-20), times router_scaling_factor; beside them every token goes
-- through a shared MLP as wide as num_shared_experts experts (mlp.shared_experts). Only the chosen
-- experts run, so experts on disk are read for the tokens that chose them.
--
-- The hub holds the router as mlp.router.gate, the bias as mlp.expert_bias, the shared MLP as
-- mlp.shared_mlp and one module per expert (mlp.experts.E.{gate,up,down}_proj): they load renamed
-- as transformers' conversion mapping renames them. transformers' stacked layout
-- (mlp.experts.{gate_up_proj, down_proj}) loads too. The multi-token-prediction layers stored after
-- the last decoder layer (num_nextn_predict_layers, 1 by default) are left out, as transformers does.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local deepseek = require("moonload.models.deepseek")

local M = {}
local WHO = "models.hy_v3"

-- HYV3Config's defaults for the keys Llama's config requires or defaults otherwise (rope_theta's:
-- models/llama.lua's FAMILIES).
local DEFAULTS = { vocab_size = 120832, hidden_size = 4096, intermediate_size = 13312, num_hidden_layers = 80,
   num_attention_heads = 64, num_key_value_heads = 8, head_dim = 128, max_position_embeddings = 131072,
   rms_norm_eps = 1e-5 }

local function int_or(cfg, key, default, min)
   local v = cfg[key]
   if v == nil then v = default end
   cfg[key] = config.integer(cfg, WHO, key, v, min)
   return cfg[key]
end

local function bool_or(cfg, key, default)
   local v = cfg[key]
   if v == nil then v = default end
   if type(v) ~= "boolean" then config.fail(cfg, WHO, 'config key "%s" must be a boolean, got %s', key, tostring(v)) end
   cfg[key] = v
   return v
end

--- Reads and checks a Hy3 config (path, folder or table) with HYV3Config's defaults: Llama's keys,
-- then the experts (num_experts, num_experts_per_tok, num_shared_experts, moe_intermediate_size,
-- router_scaling_factor, enable_moe_fp32_combine), cfg.sparse_layers (per layer, from
-- mlp_layer_types) and num_nextn_predict_layers.
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   local cfg = llama.config(fixed, "hy_v3")
   cfg._source, cfg._raw = src, raw
   -- (the hub's own names, where the file lacks transformers': expert_hidden_dim, first_k_dense_replace)
   if cfg.num_experts == nil then cfg.num_experts = cfg.num_local_experts end
   if cfg.moe_intermediate_size == nil then cfg.moe_intermediate_size = cfg.expert_hidden_dim end
   int_or(cfg, "num_experts", 192, 1)
   int_or(cfg, "num_experts_per_tok", 8, 1)
   int_or(cfg, "num_shared_experts", 1, 0)
   int_or(cfg, "moe_intermediate_size", 1536, 1)
   if cfg.num_experts_per_tok > cfg.num_experts then
      config.fail(cfg, WHO, "num_experts_per_tok %d is more than num_experts %d", cfg.num_experts_per_tok, cfg.num_experts)
   end
   local scale = cfg.router_scaling_factor
   if scale == nil then scale = 2.826 end
   if type(scale) ~= "number" or scale <= 0 then
      config.fail(cfg, WHO, 'config key "router_scaling_factor" must be a positive number, got %s', tostring(scale))
   end
   cfg.router_scaling_factor = scale
   -- (adding the routed and shared outputs in float32 rounds once to the model's dtype, as one add
   -- in that dtype does: nothing to do either way)
   bool_or(cfg, "enable_moe_fp32_combine", true)
   -- the original code's switches, which transformers' classes have no other form of
   for _, key in ipairs({ "qk_norm", "route_norm", "moe_router_use_sigmoid" }) do
      if raw[key] == false then
         config.fail(cfg, WHO, 'config key "%s" is false: transformers\' Hy3 has no such variant', key)
      end
   end
   -- which layers are sparse: mlp_layer_types, else the first first_k_dense_replace (1) dense
   local kinds = cfg.mlp_layer_types
   if kinds ~= nil and (type(kinds) ~= "table" or #kinds ~= cfg.num_hidden_layers) then
      config.fail(cfg, WHO, 'config key "mlp_layer_types" must list %d layer types', cfg.num_hidden_layers)
   end
   local first = kinds == nil and int_or(cfg, "first_k_dense_replace", 1, 0)
   cfg.sparse_layers = {}
   for i = 1, cfg.num_hidden_layers do
      local kind
      if kinds then kind = kinds[i] else kind = i <= first and "dense" or "sparse" end
      if kind ~= "dense" and kind ~= "sparse" then
         config.fail(cfg, WHO, 'mlp_layer_types[%d] is "%s" (supported: dense, sparse)', i, tostring(kind))
      end
      cfg.sparse_layers[i] = kind == "sparse"
   end
   int_or(cfg, "num_nextn_predict_layers", 1, 0)
   return cfg
end

-- --- MLPs and the sparse block --------------------------------------------------------------------

-- A dense layer's MLP or the shared experts, biased with mlp_bias (transformers' HYV3MLP); the
-- routed experts, never biased.
local HYV3MLP = llama.LlamaMLP:extend("HYV3MLP")
M.HYV3MLP = HYV3MLP

--- HYV3MLP(cfg[, intermediate_size[, bias]]): bias defaults to cfg.mlp_bias.
function HYV3MLP:__init(cfg, intermediate, bias)
   if bias == nil then bias = cfg.mlp_bias end
   llama.LlamaMLP.__init(self, setmetatable({ intermediate_size = intermediate or cfg.intermediate_size, mlp_bias = bias },
      { __index = cfg }))
end

local function expert(cfg, width) return HYV3MLP(cfg, width, false) end

-- The router: DeepSeek's float32 weight (kept float32 whatever the model's dtype, as transformers
-- keeps it), the logits computed in float32 from the hidden states cast up.
local HYV3TopKRouter = deepseek.DeepseekTopkRouter:extend("HYV3TopKRouter")
M.HYV3TopKRouter = HYV3TopKRouter

function HYV3TopKRouter:__init(cfg)
   deepseek.DeepseekTopkRouter.__init(self, { n_routed_experts = cfg.num_experts, hidden_size = cfg.hidden_size })
end

local HYV3MoE = moe.SparseMoeBlock:extend("HYV3MoE")
M.HYV3MoE = HYV3MoE
HYV3MoE.keep_float32_buffers = { e_score_correction_bias = true }

-- (transformers' order: gate, experts, e_score_correction_bias, shared_experts)
function HYV3MoE:__init(cfg)
   nn.Module.__init(self)
   self.gate = HYV3TopKRouter(cfg)
   self.experts = moe.experts_for(cfg, WHO, expert, "apart")
   self:register_buffer("e_score_correction_bias", T.zeros({ cfg.num_experts }))
   -- (a width of 0, no shared experts, reads as unset in transformers' HYV3MLP: intermediate_size)
   local shared = cfg.moe_intermediate_size * cfg.num_shared_experts
   self.shared_experts = HYV3MLP(cfg, shared > 0 and shared or cfg.intermediate_size)
   self:routing(cfg)
   rawset(self, "scale", cfg.router_scaling_factor)
end

--- Each row's top_k experts by sigmoid score + e_score_correction_bias, weighted by the scores alone
-- over their sum (+ 1e-20), times router_scaling_factor: top_w (N, k) float32, top_i a list per row.
function HYV3MoE:route(flat)
   return moe.biased_sigmoid_route(self.gate(flat), self.e_score_correction_bias, self.top_k, true, 1e-20, self.scale)
end

--- x (B, T, hidden): the routed experts' weighted sum plus the shared experts'.
function HYV3MoE:forward(x)
   return moe.SparseMoeBlock.forward(self, x) + self.shared_experts(x)
end

-- --- layers and models ------------------------------------------------------------------------------

local function mlp(cfg, layer_idx)
   return cfg.sparse_layers[layer_idx] and HYV3MoE(cfg) or HYV3MLP(cfg)
end

-- (q_norm and k_norm come with cfg.qk_norm: LlamaAttention applies them before rotating)
local LM = moe.decoder_family("hy_v3", "HYV3", llama.LlamaAttention, mlp, "mlp", M.config, M)
moe.builds_experts_as_stored(LM)

-- the hub's names, as transformers' conversion mapping renames them
LM.checkpoint_renames = { { "%.mlp%.router%.gate%.weight$", ".mlp.gate.weight" },
   { "%.mlp%.expert_bias$", ".mlp.e_score_correction_bias" }, { "%.mlp%.shared_mlp%.", ".mlp.shared_experts." } }

local init = LM.__init
function LM:__init(cfg, opts)
   init(self, cfg, opts)
   deepseek.skip_mtp_layers(self)
end

return M
