--- Kolibri-1 (Kolibri1ForCausalLM, model_type "kolibri1": Aleph-Alpha/Kolibri-1) with
-- transformers' parameter names, as transformers builds it.
--
-- Attention: EXAONE 4's (models/llama.lua): no biases, an RMSNorm over each query and key head
-- before the rotary embedding; the sliding layers (layer_types, else all but every fifth) attend
-- over sliding_window tokens and rotate, the full ones attend to everything without any position
-- embedding. The layer is GLM-4's: norms before and after attention (input_layernorm,
-- post_self_attn_layernorm) and before and after the MLP (post_attention_layernorm,
-- post_mlp_layernorm).
--
-- Every layer is sparse. Its router (mlp.gate: a weight, and a float32 e_score_correction_bias)
-- computes float32 logits and picks each token's num_experts_per_tok experts by logit + bias (the
-- bias steers the choice only), weighing them by their logits' sigmoids, renormalized when
-- norm_topk_prob; beside them every token goes through a shared MLP (shared_experts,
-- shared_expert_intermediate_size wide). Only the chosen experts run, so experts on disk are read
-- for the tokens that chose them.
--
-- The hub holds one module per expert (mlp.experts.E.{gate,up,down}_proj) and the bias and the
-- post norms under its own names (moe.router.expert_bias, post_attn_norm, post_ffn_norm), renamed
-- as transformers' conversion mapping renames them; transformers' stacked layout
-- (mlp.experts.{gate_up_proj, down_proj}) loads too.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local F = require("moonload.nn.functional")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")

local M = {}
local WHO = "models.kolibri1"

-- Kolibri1Config's defaults for the keys Llama's reader requires or defaults otherwise.
local DEFAULTS = { vocab_size = 128000, hidden_size = 2560, num_hidden_layers = 50, num_attention_heads = 48,
   num_key_value_heads = 4, head_dim = 128, max_position_embeddings = 262144, sliding_window = 513,
   moe_intermediate_size = 512, shared_expert_intermediate_size = 512, num_experts_per_tok = 6, num_local_experts = 384,
   norm_topk_prob = false }

--- Reads and checks a Kolibri-1 config (path, folder or table) with Kolibri1Config's defaults:
-- Llama's keys and EXAONE 4's layer plan (cfg.layer_windows, cfg.nope_layers; layer_types by
-- default every fifth layer full), then the experts (num_experts from num_local_experts or
-- num_experts, num_experts_per_tok, moe_intermediate_size, shared_expert_intermediate_size,
-- norm_topk_prob).
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   if raw.num_local_experts == nil and raw.num_experts ~= nil then fixed.num_local_experts = raw.num_experts end
   local function int(name, min)
      fixed[name] = config.integer(fixed, WHO, name, fixed[name], min)
      return fixed[name]
   end
   local experts, k = int("num_local_experts", 1), int("num_experts_per_tok", 1)
   if k > experts then
      config.fail(fixed, WHO, "num_experts_per_tok %d is more than num_local_experts %d", k, experts)
   end
   int("moe_intermediate_size", 1)
   -- (no dense MLP: Llama's reader asks for an intermediate_size, the shared one's)
   fixed.intermediate_size = int("shared_expert_intermediate_size", 1)
   if type(fixed.norm_topk_prob) ~= "boolean" then
      config.fail(fixed, WHO, 'config key "norm_topk_prob" must be a boolean, got %s', tostring(fixed.norm_topk_prob))
   end
   if fixed.layer_types == nil then          -- (transformers' default: every fifth layer full)
      fixed.layer_types = {}
      for i = 1, int("num_hidden_layers", 1) do fixed.layer_types[i] = i % 5 == 0 and "full_attention" or "sliding_attention" end
   end
   local cfg = llama.config(fixed, "kolibri1")
   cfg._source, cfg._raw = src, raw
   cfg.num_experts = experts
   return cfg
end

-- --- the sparse block -------------------------------------------------------------------------------

-- An expert or the shared MLP: a SwiGLU of the given width.
local Kolibri1MLP = moe.Qwen3MoeMLP:extend("Kolibri1MLP")
M.Kolibri1MLP = Kolibri1MLP

-- The router: float32 logits from its weight, and the correction bias its choice adds.
local Kolibri1TopKRouter = nn.Module:extend("Kolibri1TopKRouter")
M.Kolibri1TopKRouter = Kolibri1TopKRouter
Kolibri1TopKRouter.keep_float32_buffers = { e_score_correction_bias = true }

function Kolibri1TopKRouter:__init(cfg)
   nn.Module.__init(self)
   self.weight = nn.Module.new_parameter({ cfg.num_experts, cfg.hidden_size })
   if not self.weight:is_meta() then self.weight:fill_(0) end
   self:register_buffer("e_score_correction_bias", T.zeros({ cfg.num_experts }))
end

--- flat (N, hidden) -> the logits (N, E), float32.
function Kolibri1TopKRouter:forward(flat)
   return F.linear(flat:float(), self.weight:float())
end

local Kolibri1SparseMoeBlock = moe.SparseMoeBlock:extend("Kolibri1SparseMoeBlock")
M.Kolibri1SparseMoeBlock = Kolibri1SparseMoeBlock

-- (transformers' order: experts, gate, shared_experts)
function Kolibri1SparseMoeBlock:__init(cfg)
   nn.Module.__init(self)
   self.experts = moe.experts_for(cfg, WHO, Kolibri1MLP, "apart")
   self.gate = Kolibri1TopKRouter(cfg)
   self.shared_experts = Kolibri1MLP(cfg, cfg.shared_expert_intermediate_size)
   self:routing(cfg)
end

--- Each row's top_k experts by logit + e_score_correction_bias, weighted by their logits' sigmoids
-- (over their sum with norm_topk_prob): top_w (N, k) float32, top_i a list per row.
function Kolibri1SparseMoeBlock:route(flat)
   local logits = self.gate(flat)
   local bias = self.gate.e_score_correction_bias
   if bias.device ~= logits.device then bias = bias:to(logits.device) end
   local _, top_i = (logits + bias:float()):topk(self.top_k, 2)
   local top_w = logits:gather(2, top_i):sigmoid()
   if self.norm_topk_prob then top_w = top_w / top_w:sum(2, true) end
   return top_w, top_i:tolist()
end

--- x (B, T, hidden): the routed experts' weighted sum plus the shared MLP's.
function Kolibri1SparseMoeBlock:forward(x)
   return moe.SparseMoeBlock.forward(self, x) + self.shared_experts(x)
end

-- --- layers and models ------------------------------------------------------------------------------

-- (q_norm and k_norm come with cfg.qk_norm: LlamaAttention applies them before rotating)
local LM = moe.decoder_family("kolibri1", "Kolibri1", llama.LlamaAttention, Kolibri1SparseMoeBlock, "mlp", M.config, M)
moe.builds_experts_as_stored(LM)
M.Kolibri1DecoderLayer.__init, M.Kolibri1DecoderLayer.forward = llama.Glm4DecoderLayer.__init, llama.Glm4DecoderLayer.forward

-- the hub's names, as transformers' conversion mapping renames them
LM.checkpoint_renames = { { "%.moe%.router%.expert_bias$", ".mlp.gate.e_score_correction_bias" },
   { "%.post_attn_norm%.", ".post_self_attn_layernorm." }, { "%.post_ffn_norm%.", ".post_mlp_layernorm." } }

return M
