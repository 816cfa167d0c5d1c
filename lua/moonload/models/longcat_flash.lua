--- LongCat-Flash (LongcatFlashForCausalLM, model_type "longcat_flash": meituan-longcat/LongCat-Flash-Chat,
-- 560B parameters, 18.6B to 31.3B active a token) with Hugging Face parameter names, as
-- transformers builds it.
--
-- Each of its num_layers decoder layers (transformers' num_hidden_layers is twice that: it counts
-- the attention sublayers) runs two attention + MLP sub-blocks and one MoE block beside them:
--   h = x + self_attn[0](input_layernorm[0](x)); n = post_attention_layernorm[0](h)
--   shortcut = mlp(n); h = h + mlps[0](n)
--   h = h + self_attn[1](input_layernorm[1](h))
--   out = h + mlps[1](post_attention_layernorm[1](h)) + shortcut
-- The attention is DeepSeek's multi-head latent attention (models/deepseek.lua: the latent cache,
-- absorbed or expanded), always through a q_lora_rank bottleneck, its rotary pairs interleaved,
-- the queries scaled by sqrt(hidden_size / q_lora_rank) and the normed latent (as cached) by
-- sqrt(hidden_size / kv_lora_rank), whatever the config's mla_scale_q_lora / mla_scale_kv_lora
-- say (transformers reads neither). Each sub-block's attention has a cache slot of its own.
--
-- The MoE block's router (router.classifier, float32) scores n_routed_experts experts and
-- zero_expert_num zero experts by one softmax, picks the moe_topk best by score +
-- e_score_correction_bias and weighs them by their score x routed_scaling_factor (not
-- renormalized). A zero expert returns its input: a token that picks one keeps that share of its
-- normed input instead of an expert's output. Only the chosen experts run (the zero experts are
-- no modules: nothing to place or read), so experts on disk are read for the tokens that chose
-- them. The hub holds one module per real expert (mlp.experts.E.{gate,up,down}_proj);
-- transformers' save_pretrained also writes gate and up rows for the zero experts, never used,
-- which loading leaves out, as it leaves out the hub's multi-token-prediction layers (model.mtp.*).
local nn = require("moonload.nn")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local deepseek = require("moonload.models.deepseek")
local hooks = require("moonload.hooks")

local M = {}
local WHO = "models.longcat_flash"

-- LongcatFlashConfig's defaults where Llama's and DeepSeek's readers would take others (the
-- rest: models/llama.lua's FAMILIES entry).
local DEFAULTS = { vocab_size = 131072, hidden_size = 6144, num_attention_heads = 64, q_lora_rank = 1536,
   kv_lora_rank = 512, qk_nope_head_dim = 128, qk_rope_head_dim = 64, v_head_dim = 128, head_dim = 64 }

--- Reads and checks a LongCat-Flash config (path, folder or table): LongcatFlashConfig's keys
-- (num_layers, ffn_hidden_size, expert_ffn_hidden_size, n_routed_experts, zero_expert_num,
-- moe_topk, routed_scaling_factor; their Llama-style aliases win, as transformers' attribute_map
-- makes them) read as Llama's and DeepSeek's (models/deepseek.lua): cfg.num_hidden_layers is the
-- count of decoder layers, cfg.intermediate_size the dense MLPs' width, cfg.moe_intermediate_size
-- an expert's, cfg.num_experts_per_tok the top-k over the n_routed_experts + zero_expert_num.
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   local where = { _source = src }
   -- (name, value): the alias when the file has it, else LongCat's own key, else the default
   local function key(alias, own, default, min)
      local name = raw[alias] ~= nil and alias or own
      local v = raw[name]
      if v == nil then v = default end
      return name, config.integer(where, WHO, name, v, min)
   end
   local layers
   if raw.num_hidden_layers ~= nil then      -- (transformers' setter: half of it, rounded down)
      layers = math.floor(config.integer(where, WHO, "num_hidden_layers", raw.num_hidden_layers, 2) / 2)
   else
      layers = config.integer(where, WHO, "num_layers", raw.num_layers == nil and 28 or raw.num_layers, 1)
   end
   local _, ffn = key("intermediate_size", "ffn_hidden_size", 12288, 1)
   local _, expert_ffn = key("moe_intermediate_size", "expert_ffn_hidden_size", 2048, 1)
   local _, experts = key("num_local_experts", "n_routed_experts", 512, 0)
   local _, zero = key("zero_expert_num", "zero_expert_num", 256, 0)
   local topk_name, topk = key("num_experts_per_tok", "moe_topk", 12, 1)
   if topk > experts + zero then
      config.fail(where, WHO, "%s %d is more than the %d experts (n_routed_experts %d + zero_expert_num %d)", topk_name,
         topk, experts + zero, experts, zero)
   end
   fixed.num_hidden_layers, fixed.intermediate_size, fixed.moe_intermediate_size = layers, ffn, expert_ffn
   -- DeepSeek's reader checks the top-k against the router's pool: the experts and the zero experts
   fixed.n_routed_experts, fixed.num_local_experts, fixed.num_experts_per_tok = experts + zero, nil, topk
   -- every layer's MoE block, without shared experts, never renormalized
   fixed.n_shared_experts, fixed.first_k_dense_replace, fixed.moe_layer_freq, fixed.mlp_layer_types = nil, nil, nil, nil
   fixed.norm_topk_prob, fixed.topk_method = nil, nil
   fixed.num_nextn_predict_layers, fixed.num_mtp_layers = nil, nil
   local rotary_width = fixed.head_dim
   local cfg = deepseek.config(fixed, "longcat_flash")
   cfg._source, cfg._raw = src, raw
   cfg.num_layers, cfg.n_routed_experts, cfg.zero_expert_num = layers, experts, zero
   cfg.rope_interleave = true                 -- (transformers' LongCat always interleaves)
   -- transformers' rotary table turns head_dim dims (64 unless the file says) of the rotary key
   if rotary_width ~= cfg.qk_rope_head_dim then
      config.fail(cfg, WHO, 'config key "head_dim" (%d, the width transformers gives the rotary table) must equal '
         .. "qk_rope_head_dim %d", rotary_width, cfg.qk_rope_head_dim)
   end
   if raw.qk_head_dim ~= nil and raw.qk_head_dim ~= cfg.qk_head_dim then
      config.fail(cfg, WHO, 'config key "qk_head_dim" must be qk_nope_head_dim + qk_rope_head_dim (%d), got %s',
         cfg.qk_head_dim, tostring(raw.qk_head_dim))
   end
   if cfg.router_bias ~= nil and type(cfg.router_bias) ~= "boolean" then
      config.fail(cfg, WHO, 'config key "router_bias" must be a boolean, got %s', tostring(cfg.router_bias))
   end
   return cfg
end

-- --- attention ----------------------------------------------------------------------------------

-- The bottleneck norms of LongCat's attention: an RMSNorm (DeepSeek's eps, 1e-6) whose output is
-- scaled by sqrt(hidden_size / rank). q_b_proj has no bias, so scaling its input scales the
-- queries as transformers does after it; the latent is cached scaled, as there.
local ScaledRMSNorm = nn.RMSNorm:extend("LongcatFlashScaledRMSNorm")
M.LongcatFlashScaledRMSNorm = ScaledRMSNorm

function ScaledRMSNorm:__init(rank, hidden)
   nn.RMSNorm.__init(self, rank, { eps = 1e-6 })
   rawset(self, "lora_scale", math.sqrt(hidden / rank))
end

function ScaledRMSNorm:forward(x)
   return nn.RMSNorm.forward(self, x) * self.lora_scale
end

function ScaledRMSNorm:extra_repr()
   return nn.RMSNorm.extra_repr(self) .. string.format(", scale=%s", nn.Module.py_float(self.lora_scale))
end

local MLA = deepseek.MLAttention:extend("LongcatFlashMLA")
M.LongcatFlashMLA = MLA

function MLA:__init(cfg, layer_idx)
   deepseek.MLAttention.__init(self, cfg, layer_idx)
   self.q_a_layernorm = ScaledRMSNorm(cfg.q_lora_rank, cfg.hidden_size)
   self.kv_a_layernorm = ScaledRMSNorm(cfg.kv_lora_rank, cfg.hidden_size)
end

-- --- the MoE block ------------------------------------------------------------------------------

-- The router's linear layer: float32 whatever the model's dtype, and a class of its own, so that
-- quantize leaves it so too (transformers keeps classifier.weight float32 under quantization).
local Classifier = nn.Linear:extend("LongcatFlashClassifier")
M.LongcatFlashClassifier = Classifier
Classifier.keep_float32_buffers = { weight = true }

-- The router: classifier (n_routed_experts + zero_expert_num, hidden), its bias (router_bias) held
-- but never added, as in transformers; e_score_correction_bias (float32) joins the scores for the
-- choice only.
local Router = nn.Module:extend("LongcatFlashTopkRouter")
M.LongcatFlashTopkRouter = Router
Router.keep_float32_buffers = { e_score_correction_bias = true }

function Router:__init(cfg)
   nn.Module.__init(self)
   local pool = cfg.n_routed_experts + cfg.zero_expert_num
   self.classifier = Classifier(cfg.hidden_size, pool, { bias = cfg.router_bias == true })
   self:register_buffer("e_score_correction_bias", nn.Module.new_buffer({ pool }, 0))
   rawset(self, "top_k", cfg.num_experts_per_tok)
   rawset(self, "routed_scaling_factor", cfg.routed_scaling_factor)
end

--- flat (N, hidden) -> top_w (N, k) float32, top_i a list per row of k 0-based experts (the zero
-- experts after the others): the k best softmax scores + bias, weighed by score x scale.
function Router:forward(flat)
   -- (the classifier's weight read as a tensor: under an offload hook of its own, brought for this,
   -- or read where it lies for a few rows: set_compute_in_place)
   local scores = hooks.with_weights(self.classifier, function(x)
      local w = self.classifier.weight
      if w.device ~= x.device then w = w:to(x.device) end
      return x:float():matmul(w:float():t()):softmax(-1)                      -- (N, E + zero)
   end, flat)
   if scores.device ~= flat.device then scores = scores:to(flat.device) end
   local bias = self.e_score_correction_bias
   if bias.device ~= scores.device then bias = bias:to(scores.device) end
   local _, top_i = (scores + bias:float()):topk(self.top_k, 2)
   return scores:gather(2, top_i) * self.routed_scaling_factor, top_i:tolist()
end

-- LongcatFlashMLP(cfg[, intermediate]): a dense MLP (ffn_hidden_size) or an expert, unbiased.
local MLP = moe.Qwen3MoeMLP:extend("LongcatFlashMLP")
M.LongcatFlashMLP = MLP

local MoE = nn.Module:extend("LongcatFlashMoE")
M.LongcatFlashMoE = MoE

--- A zero expert (x -> x, zero_expert_type "identity"): its rows as they are, weighed by
-- run_experts as any expert's output.
function MoE.zero_expert(x) return x end

function MoE:__init(cfg)
   nn.Module.__init(self)
   -- one module per real expert, as the hub stores them
   self.experts = moe.experts_for(setmetatable({ num_experts = cfg.n_routed_experts }, { __index = cfg }), WHO, MLP, "apart")
   self.router = Router(cfg)
   rawset(self, "top_k", cfg.num_experts_per_tok)         -- (memory planning: experts a token runs)
   rawset(self, "zero_expert_num", cfg.zero_expert_num)
end

--- x (B, T, hidden): the chosen experts' weighted outputs summed, zero experts' rows included.
function MoE:forward(x)
   local B, L, H = x:size(1), x:size(2), x:size(3)
   local flat = x:reshape(B * L, H)
   local top_w, top_i = self.router(flat)
   -- the experts as run_experts indexes them: the modules (whatever a hook or quantize put in
   -- their place), then the zero experts
   local list = {}
   for e, expert in ipairs(self.experts) do list[e] = expert end
   for _ = 1, self.zero_expert_num do list[#list + 1] = self.zero_expert end
   return moe.run_experts(list, flat, top_w, top_i):view(B, L, H)
end

-- --- layers and model ---------------------------------------------------------------------------

local LM = moe.decoder_family("longcat_flash", "LongcatFlash", MLA, MoE, "mlp", M.config, M)
M.LongcatFlashAttention = nil          -- (its attention is LongcatFlashMLA, transformers' name)
LM.ignore_unexpected = { "rotary_emb%.inv_freq$", "^model%.mtp%." }

local Layer = M.LongcatFlashDecoderLayer

--- The layer's modules in transformers' order: the MoE block, then the two sub-blocks' attentions,
-- MLPs and norms as lists. Sub-block s (1, 2) of layer i attends through cache slot 2(i - 1) + s.
function Layer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local eps = cfg.rms_norm_eps
   self.mlp = MoE(cfg)
   self.self_attn = nn.ModuleList({ MLA(cfg, 2 * layer_idx - 1), MLA(cfg, 2 * layer_idx) })
   rawset(self.self_attn, "part_of_layer", true)   -- (memory planning counts the layer's MLPs with them)
   self.mlps = nn.ModuleList({ MLP(cfg), MLP(cfg) })
   self.input_layernorm = nn.ModuleList({ nn.RMSNorm(cfg.hidden_size, { eps = eps }), nn.RMSNorm(cfg.hidden_size, { eps = eps }) })
   self.post_attention_layernorm = nn.ModuleList({ nn.RMSNorm(cfg.hidden_size, { eps = eps }),
      nn.RMSNorm(cfg.hidden_size, { eps = eps }) })
end

function Layer:forward(x, cos, sin, cache, pad)
   local attn, mlps, pre, post = self.self_attn, self.mlps, self.input_layernorm, self.post_attention_layernorm
   x = x + attn[1](pre[1](x), cos, sin, cache, pad)
   local normed = post[1](x)
   local shortcut = self.mlp(normed)           -- (the MoE block's output joins at the layer's end)
   x = x + mlps[1](normed)
   x = x + attn[2](pre[2](x), cos, sin, cache, pad)
   return x + mlps[2](post[2](x)) + shortcut
end

--- Loading leaves out the gate and up rows transformers' save_pretrained writes for the zero
-- experts (experts n_routed_experts .. + zero_expert_num - 1), beside the class's own ignores.
function LM:__init(cfg)
   llama.LlamaForCausalLM.__init(self, cfg)
   local skip = { unpack(self.ignore_unexpected) }
   local n = self.config.n_routed_experts
   for e = n, n + self.config.zero_expert_num - 1 do
      skip[#skip + 1] = "%.mlp%.experts%." .. e .. "%.gate_proj%.weight$"
      skip[#skip + 1] = "%.mlp%.experts%." .. e .. "%.up_proj%.weight$"
   end
   rawset(self, "ignore_unexpected", skip)
end

--- A cache slot per attention sublayer: two a decoder layer.
function LM:new_cache(capacity, device, dtype)
   return common.new_cache(2 * self.config.num_hidden_layers, capacity, device, dtype)
end

return M
