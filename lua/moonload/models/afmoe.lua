--- AFMoE (AfmoeForCausalLM, model_type "afmoe": Arcee's Trinity Nano, Mini and Large) with Hugging
-- Face parameter names, as transformers builds it.
--
-- Attention: Llama's grouped-query attention with an RMSNorm over each query and key head (q_norm,
-- k_norm) and an output gate: self_attn.gate_proj(x), through a sigmoid, multiplies the heads'
-- output before o_proj. layer_types (else every global_attn_every_n_layers-th layer full) says
-- which layers attend over a sliding_window of keys; only those rotate, the full ones attend
-- without any position embedding.
--
-- Layers: RMSNorms before and after both the attention and the MLP (input_layernorm,
-- post_attention_layernorm, pre_mlp_layernorm, post_mlp_layernorm), each block's normed output
-- joining the residual. With mup_enabled the embeddings are multiplied by sqrt(hidden_size).
--
-- MLP: the first num_dense_layers layers a dense SwiGLU MLP, the others sparse: a token-choice
-- router (mlp.router.gate) scores every expert with a sigmoid, picks each token's
-- num_experts_per_tok best by score + expert_bias (a float32 buffer that steers the choice only),
-- weighs them by their scores renormalized to sum to 1, times route_scale; beside them every token
-- goes through num_shared_experts experts' worth of shared MLP (mlp.shared_experts). Only the
-- chosen experts run, so experts on disk are read for the tokens that chose them. The hub holds
-- one module per expert (mlp.experts.E.{gate,up,down}_proj); transformers' stacked layout loads too.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")

local M = {}
local WHO = "models.afmoe"

-- The experts' integer keys: {name, AfmoeConfig's default, least value}.
local EXPERT_KEYS = { { "num_experts", 64, 1 }, { "num_experts_per_tok", 6, 1 }, { "num_shared_experts", 2, 0 },
   { "moe_intermediate_size", 1408, 1 }, { "num_dense_layers", 1, 0 } }

--- Reads and checks an AFMoE config (path, folder or table): Llama's keys with AfmoeConfig's
-- defaults, the layer types (cfg.layer_windows, cfg.nope_layers), the experts and their routing
-- (num_experts, num_experts_per_tok, num_shared_experts, moe_intermediate_size, route_scale;
-- cfg.sparse_layers from num_dense_layers) and mup_enabled.
function M.config(source)
   -- (a null sliding_window, which transformers' mask refuses, reads as absent: the default)
   local raw, src, fixed = config.read_with_defaults(source, WHO, { sliding_window = 1024 })
   local n = raw.num_hidden_layers
   if fixed.layer_types == nil and type(n) == "number" and n == math.floor(n) and n >= 1 then
      local every = config.integer({ _source = src }, WHO, "global_attn_every_n_layers",
         raw.global_attn_every_n_layers == nil and 4 or raw.global_attn_every_n_layers, 1)
      fixed.layer_types = {}
      for i = 1, n do fixed.layer_types[i] = i % every ~= 0 and "sliding_attention" or "full_attention" end
   end
   local cfg = llama.config(fixed, "afmoe")
   cfg._source, cfg._raw = src, raw
   for _, key in ipairs(EXPERT_KEYS) do
      local name, default, min = key[1], key[2], key[3]
      cfg[name] = config.integer(cfg, WHO, name, cfg[name] == nil and default or cfg[name], min)
   end
   if cfg.num_experts_per_tok > cfg.num_experts then
      config.fail(cfg, WHO, "num_experts_per_tok %d is more than num_experts %d", cfg.num_experts_per_tok, cfg.num_experts)
   end
   local scale = cfg.route_scale == nil and 1 or cfg.route_scale
   if type(scale) ~= "number" or scale <= 0 then
      config.fail(cfg, WHO, 'config key "route_scale" must be a positive number, got %s', tostring(scale))
   end
   cfg.route_scale = scale
   if cfg.mup_enabled ~= nil and type(cfg.mup_enabled) ~= "boolean" then
      config.fail(cfg, WHO, 'config key "mup_enabled" must be a boolean, got %s', tostring(cfg.mup_enabled))
   end
   cfg.mup_enabled = cfg.mup_enabled == true
   -- the original code's switches, which transformers' router has no other form of (sigmoid, renormalized)
   if cfg.score_func ~= nil and cfg.score_func ~= "sigmoid" then
      config.fail(cfg, WHO, 'config key "score_func" is "%s" (supported: sigmoid)', tostring(cfg.score_func))
   end
   if cfg.route_norm ~= nil and cfg.route_norm ~= true then
      config.fail(cfg, WHO, 'config key "route_norm" is %s: routing weights that are not renormalized are not supported',
         tostring(cfg.route_norm))
   end
   cfg.sparse_layers = {}
   for i = 1, cfg.num_hidden_layers do cfg.sparse_layers[i] = i > cfg.num_dense_layers end   -- (0-based: i - 1 >= n)
   return cfg
end

-- --- MLPs ---------------------------------------------------------------------------------------

-- A dense layer's MLP, an expert (moe_intermediate_size) or the shared experts (num_shared_experts
-- times as wide): gate/up/down without biases.
local AfmoeMLP = moe.Qwen3MoeMLP:extend("AfmoeMLP")
M.AfmoeMLP = AfmoeMLP

-- The token-choice router: each expert's logit from a linear layer (router.gate), and the choice.
local AfmoeTokenChoiceRouter = nn.Module:extend("AfmoeTokenChoiceRouter")
M.AfmoeTokenChoiceRouter = AfmoeTokenChoiceRouter

function AfmoeTokenChoiceRouter:__init(cfg)
   nn.Module.__init(self)
   self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, { bias = false })
   rawset(self, "top_k", cfg.num_experts_per_tok)
   rawset(self, "route_scale", cfg.route_scale)
end

--- flat (N, hidden), expert_bias (E): each row's top_k experts by sigmoid score + expert_bias,
-- weighted by the scores alone over their sum (+ 1e-20), times route_scale: top_w (N, k) float32,
-- top_i a list per row of 0-based experts.
function AfmoeTokenChoiceRouter:forward(flat, expert_bias)
   return moe.biased_sigmoid_route(self.gate(flat), expert_bias, self.top_k, true, 1e-20, self.route_scale)
end

local AfmoeSparseMoeBlock = moe.SparseMoeBlock:extend("AfmoeSparseMoeBlock")
M.AfmoeSparseMoeBlock = AfmoeSparseMoeBlock
AfmoeSparseMoeBlock.keep_float32_buffers = { expert_bias = true }   -- (transformers keeps it float32 too)

-- (transformers' order: router, shared_experts, experts, expert_bias)
function AfmoeSparseMoeBlock:__init(cfg)
   nn.Module.__init(self)
   self.router = AfmoeTokenChoiceRouter(cfg)
   if cfg.num_shared_experts > 0 then
      self.shared_experts = AfmoeMLP(cfg, cfg.moe_intermediate_size * cfg.num_shared_experts)
   end
   self.experts = moe.experts_for(cfg, WHO, AfmoeMLP, "apart")
   self:register_buffer("expert_bias", T.zeros({ cfg.num_experts }))
   self:routing(cfg)             -- (top_k here too: memory planning reads it, utils/runtime_memory.lua)
end

--- The router's choice for flat's rows (AfmoeTokenChoiceRouter:forward).
function AfmoeSparseMoeBlock:route(flat) return self.router(flat, self.expert_bias) end

--- x (B, T, hidden): the routed experts' weighted sum plus the shared experts'.
function AfmoeSparseMoeBlock:forward(x)
   local routed = moe.SparseMoeBlock.forward(self, x)
   return self.shared_experts and routed + self.shared_experts(x) or routed
end

local function mlp(cfg, layer_idx)
   return cfg.sparse_layers[layer_idx] and AfmoeSparseMoeBlock(cfg) or AfmoeMLP(cfg)
end

local LM = moe.decoder_family("afmoe", "Afmoe", llama.LlamaAttention, mlp, "mlp", M.config, M)
moe.builds_experts_as_stored(LM)

-- --- attention, layer, model --------------------------------------------------------------------

local AfmoeAttention = M.AfmoeAttention

-- (q_norm and k_norm come with cfg.qk_norm; the rotation, or none on full layers, with cfg.nope_layers)
function AfmoeAttention:__init(cfg, layer_idx)
   llama.LlamaAttention.__init(self, cfg, layer_idx)
   self.gate_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, { bias = false })
end

--- q, k, v, and the gate (B, T, H * D) LlamaAttention:forward puts through a sigmoid onto the output.
function AfmoeAttention:project(x, B, L)
   local q, k, v = llama.LlamaAttention.project(self, x, B, L)
   return q, k, v, self.gate_proj(x)
end

local AfmoeDecoderLayer = M.AfmoeDecoderLayer
local NORMS = { "input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm" }

function AfmoeDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.self_attn = self.Attention(cfg, layer_idx)
   for _, name in ipairs(NORMS) do self[name] = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps }) end
   self.mlp = self.MLP(cfg, layer_idx)
end

function AfmoeDecoderLayer:forward(x, cos, sin, cache, pad)
   x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache, pad))
   return x + self.post_mlp_layernorm(self.mlp(self.pre_mlp_layernorm(x)))
end

local AfmoeModel = M.AfmoeModel

function AfmoeModel:__init(cfg)
   llama.LlamaModel.__init(self, cfg)
   if not self.config.mup_enabled then rawset(self, "embed_scale", false) end   -- (LlamaModel:forward skips it)
end

--- muP's input scaling: sqrt(hidden_size), as a Python float times the embeddings in transformers.
function AfmoeModel:embed_scale() return math.sqrt(self.config.hidden_size) end

return M
