--- Cohere 2 MoE (Cohere2MoeForCausalLM, model_type "cohere2_moe": Command A+) with Hugging Face
-- parameter names: Cohere 2's parallel block (one norm before attention and MLP, both joining the
-- residual; models/llama.lua), its sliding layers rotating in pairs of neighbouring dims and its full
-- layers without position embedding (NoPE), except that the dense layers rotate whatever their
-- window when prefix_dense_sliding_window_pattern is 1 (transformers' force_rope). mlp_layer_types
-- says which layers keep a dense MLP (prefix_dense_intermediate_size wide) and which are sparse:
-- a router (mlp.gate) whose top num_experts_per_tok logits pick the experts, weighted by a softmax
-- over those logits ("softmax") or by their sigmoid, renormalized with norm_topk_prob ("sigmoid");
-- the experts (intermediate_size wide) plus num_shared_experts folded into one MLP
-- (mlp.shared_experts), summed or averaged (shared_expert_combination_strategy). Cohere's bias-free
-- LayerNorms (layer_norm_eps), or RMSNorms when the config sets rms_norm_eps; logits times
-- logit_scale. The hub holds one module per expert (mlp.experts.E.{gate,up,down}_proj); transformers'
-- stacked layout loads too. Only the experts some token chose run (models/moe.lua).
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")

local M = {}
local WHO = "models.cohere2_moe"

-- Cohere2MoeConfig's defaults for the keys Llama's and the MoE config require or default otherwise.
local DEFAULTS = { vocab_size = 256000, hidden_size = 8192, intermediate_size = 22528, num_hidden_layers = 40,
   num_attention_heads = 64, head_dim = 128, max_position_embeddings = 8192, tie_word_embeddings = true,
   num_experts = 8, num_experts_per_tok = 2, norm_topk_prob = true }

-- One of `choices` (a list) for config key `key`, its default applied.
local function one_of(cfg, key, default, choices)
   local v = cfg[key]
   if v == nil then v = default end
   for _, c in ipairs(choices) do if v == c then return v end end
   config.fail(cfg, WHO, 'config key "%s" is %s (supported: %s)', key,
      type(v) == "string" and string.format('"%s"', v) or tostring(v), table.concat(choices, ", "))
end

local function int_or(cfg, key, default, min)
   local v = cfg[key]
   if v == nil then v = default end
   return config.integer(cfg, WHO, key, v, min)
end

-- transformers' layer_types when the file has none: the first first_k_dense_replace layers slide
-- but for every prefix_dense_sliding_window_pattern-th, the others but for every
-- sliding_window_pattern-th (counted from the first of them).
local function default_layer_types(fixed, n, first)
   local prefix_every = int_or(fixed, "prefix_dense_sliding_window_pattern", 1, 1)
   local every = int_or(fixed, "sliding_window_pattern", 4, 1)
   local types = {}
   for i = 1, n do
      local j, pattern = i, prefix_every
      if i > first then j, pattern = i - first, every end
      types[i] = j % pattern ~= 0 and "sliding_attention" or "full_attention"
   end
   return types
end

--- Reads and checks a Cohere 2 MoE config (path, folder or table), with transformers' defaults. Besides
-- Llama's and the MoE keys (models/moe.lua's config): cfg.rms_norm (RMSNorms, else LayerNorms; either
-- way their eps is cfg.rms_norm_eps), cfg.sparse_layers, cfg.nope_layers, cfg.dense_intermediate_size,
-- cfg.num_shared_experts, cfg.expert_selection_fn and cfg.shared_expert_combination_strategy.
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   -- the norms' kind: RMSNorms when rms_norm_eps is set (not null), else Cohere's LayerNorms
   fixed.rms_norm = raw.rms_norm_eps ~= nil
   if not fixed.rms_norm then
      local eps = fixed.layer_norm_eps == nil and 1e-5 or fixed.layer_norm_eps
      if type(eps) ~= "number" or eps <= 0 then
         config.fail(fixed, WHO, 'config key "layer_norm_eps" must be a positive number, got %s', tostring(eps))
      end
      fixed.rms_norm_eps = eps
   end
   local first = int_or(fixed, "first_k_dense_replace", 0, 0)
   local n = fixed.num_hidden_layers
   if fixed.layer_types == nil and type(n) == "number" and n >= 1 and n == math.floor(n) then
      fixed.layer_types = default_layer_types(fixed, n, first)        -- (a bad count: llama.config names it)
   end
   fixed.moe_intermediate_size = fixed.intermediate_size              -- (transformers' experts: intermediate_size wide)
   local cfg = moe.config(fixed, "cohere2_moe")
   cfg._source, cfg._raw = src, raw
   cfg.expert_selection_fn = one_of(cfg, "expert_selection_fn", "softmax", { "softmax", "sigmoid" })
   cfg.num_shared_experts = int_or(cfg, "num_shared_experts", 0, 0)
   if cfg.num_shared_experts > 0 then
      cfg.shared_expert_combination_strategy = one_of(cfg, "shared_expert_combination_strategy", "average",
         { "average", "sum" })
   end
   cfg.dense_intermediate_size = int_or(cfg, "prefix_dense_intermediate_size", cfg.intermediate_size, 1)
   -- which layers are sparse: mlp_layer_types, else the first first_k_dense_replace dense
   local kinds = cfg.mlp_layer_types
   if kinds ~= nil and (type(kinds) ~= "table" or #kinds ~= cfg.num_hidden_layers) then
      config.fail(cfg, WHO, 'config key "mlp_layer_types" must list %d layer types', cfg.num_hidden_layers)
   end
   local force_rope = int_or(cfg, "prefix_dense_sliding_window_pattern", 1, 1) == 1
   for i = 1, cfg.num_hidden_layers do
      local kind = kinds and kinds[i] or (i <= first and "dense" or "sparse")
      if kind ~= "dense" and kind ~= "sparse" then
         config.fail(cfg, WHO, 'mlp_layer_types[%d] is "%s" (supported: dense, sparse)', i, tostring(kind))
      end
      cfg.sparse_layers[i] = kind == "sparse"
      -- the dense layers rotate whatever their window when the prefix's pattern is 1 (force_rope)
      if kind == "dense" and force_rope then cfg.nope_layers[i] = false end
   end
   for i = 1, cfg.num_hidden_layers do
      if cfg.sparse_layers[i] then config.integer(cfg, WHO, "num_experts", cfg.num_experts, 1) break end
   end
   return cfg
end

--- The model's norms: RMSNorms when the config sets rms_norm_eps, else Cohere's LayerNorms.
function M.norm(cfg)
   return (cfg.rms_norm and nn.RMSNorm or llama.CohereLayerNorm)(cfg.hidden_size, { eps = cfg.rms_norm_eps })
end

-- --- the sparse block ------------------------------------------------------------------------------

-- A dense layer's MLP, an expert, or the shared experts (one MLP as wide as all of them).
local Cohere2MoeMLP = moe.Qwen3MoeMLP:extend("Cohere2MoeMLP")
M.Cohere2MoeMLP = Cohere2MoeMLP

local Cohere2MoeSparseMoeBlock = moe.SparseMoeBlock:extend("Cohere2MoeSparseMoeBlock")
M.Cohere2MoeSparseMoeBlock = Cohere2MoeSparseMoeBlock

function Cohere2MoeSparseMoeBlock:__init(cfg)
   nn.Module.__init(self)
   self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, { bias = false })
   self.experts = moe.experts_for(cfg, WHO, Cohere2MoeMLP, "apart")
   if cfg.num_shared_experts > 0 then
      self.shared_experts = Cohere2MoeMLP(cfg, cfg.intermediate_size * cfg.num_shared_experts)
   end
   self:routing(cfg)
   rawset(self, "sigmoid", cfg.expert_selection_fn == "sigmoid")
   rawset(self, "shared_average", cfg.shared_expert_combination_strategy == "average")
end

--- The top_k experts by router logit, weighted by a softmax over their logits, or by their sigmoid
-- (renormalized with norm_topk_prob). -> top_w (N, k) float32, top_i a list per row.
function Cohere2MoeSparseMoeBlock:route(flat)
   local top, top_i = self.gate(flat):float():topk(self.top_k, 2)            -- (N, k), 0-based experts
   local top_w
   if self.sigmoid then
      top_w = top:sigmoid()
      if self.norm_topk_prob then top_w = top_w / top_w:sum(2, true) end
   else
      top_w = top:softmax(-1)
   end
   return top_w, top_i:tolist()
end

--- The routed experts' sum, plus the shared experts' output (halved together with "average").
function Cohere2MoeSparseMoeBlock:forward(x)
   local y = moe.SparseMoeBlock.forward(self, x)
   local shared = self.shared_experts
   if not shared then return y end
   y = y + shared(x)
   if self.shared_average then y = y / 2 end
   return y
end

-- --- layers and models ------------------------------------------------------------------------------

local function mlp(cfg, layer_idx)
   if cfg.sparse_layers[layer_idx] then return Cohere2MoeSparseMoeBlock(cfg) end
   return Cohere2MoeMLP(cfg, cfg.dense_intermediate_size)
end

local LM = moe.decoder_family("cohere2_moe", "Cohere2Moe", llama.LlamaAttention, mlp, "mlp", M.config, M)
local Layer, Model = M.Cohere2MoeDecoderLayer, M.Cohere2MoeModel

-- Cohere's parallel layer, its one norm of the config's kind.
function Layer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.self_attn = self.Attention(cfg, layer_idx)
   self.mlp = self.MLP(cfg, layer_idx)
   self.input_layernorm = M.norm(cfg)
end

Layer.forward = llama.parallel_layer_forward

--- Cohere2MoeModel(config): a config path, folder or table, or one M.config has checked.
function Model:__init(cfg)
   if type(cfg) ~= "table" or cfg._source == nil then cfg = M.config(cfg) end
   self:build_parts(cfg, cfg.hidden_size, self.Layer, cfg.num_hidden_layers, M.norm(cfg), self.Rotary)
end

LM.forward = llama.scaled_logits_forward(WHO, function(logits, cfg) return logits * cfg.logit_scale end)
moe.builds_experts_as_stored(LM)

return M
