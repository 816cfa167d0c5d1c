--- EXAONE MoE (ExaoneMoeForCausalLM, model_type "exaone_moe": LG's K-EXAONE-236B-A23B) with
-- transformers' parameter names, as transformers builds it.
--
-- Attention: EXAONE 4's (models/llama.lua): no biases, an RMSNorm over each query and key head
-- before the rotary embedding; the sliding layers (layer_types, else all but every
-- sliding_window_pattern-th) attend over sliding_window tokens and rotate, the full ones attend to
-- everything without any position embedding (NoPE). Unlike EXAONE 4's, the layers normalize before
-- attention and MLP (Llama's pre-norm layer, as transformers' OLMoE layer).
--
-- MLP: mlp_layer_types says which layers keep a dense SwiGLU MLP (intermediate_size wide) and which
-- are sparse (by default the first first_k_dense_replace dense). A sparse layer routes as DeepSeek-V3
-- (models/deepseek.lua): a float32 router (mlp.gate) scores every expert with a float32 sigmoid, the
-- choice goes by score + e_score_correction_bias within the topk_group best of n_group groups (a
-- group's score: its best two), num_experts_per_tok of num_experts a token, weighed by their scores
-- renormalized (norm_topk_prob, + 1e-20) times routed_scaling_factor; beside them every token goes
-- through shared experts num_shared_experts x moe_intermediate_size wide (mlp.shared_experts). Only the
-- chosen experts run, so experts on disk are read for the tokens that chose them.
--
-- The hub holds one module per expert (mlp.experts.E.{gate,up,down}_proj) and the bias as
-- mlp.e_score_correction_bias, renamed as transformers' conversion mapping renames it;
-- transformers' stacked layout (mlp.experts.{gate_up_proj, down_proj}) loads too. The
-- multi-token-prediction weights (mtp.*) are left out, as transformers does.
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local deepseek = require("moonload.models.deepseek")

local M = {}
local WHO = "models.exaone_moe"

-- ExaoneMoeConfig's defaults for the keys Llama's config requires or defaults otherwise (its
-- sliding_window is never null: 4096 when the file has none).
local DEFAULTS = { vocab_size = 102400, hidden_size = 4096, intermediate_size = 16384, num_hidden_layers = 32,
   num_attention_heads = 32, num_key_value_heads = 32, rms_norm_eps = 1e-5, sliding_window = 4096,
   moe_intermediate_size = 1024 }

--- Reads and checks an EXAONE MoE config (path, folder or table) with ExaoneMoeConfig's defaults:
-- Llama's keys and EXAONE 4's layer plan (cfg.layer_windows, cfg.nope_layers), then the experts
-- (num_experts, num_experts_per_tok, num_shared_experts, n_group, topk_group, routed_scaling_factor,
-- norm_topk_prob) read into models/deepseek.lua's routing keys, and cfg.sparse_layers.
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   local cfg = llama.config(fixed, "exaone_moe")
   cfg._source, cfg._raw = src, raw
   local function int(name, min, default) return deepseek.int_key(cfg, WHO, name, min, default) end
   -- (checked here, under this family's names, before DeepSeek's checks name its own)
   local experts, k, groups = int("num_experts", 1, 64), int("num_experts_per_tok", 1, 8), int("n_group", 1, 1)
   if k > experts then
      config.fail(cfg, WHO, "num_experts_per_tok %d is more than num_experts %d", k, experts)
   end
   if experts % groups ~= 0 or experts / groups < 2 then
      config.fail(cfg, WHO, "num_experts %d does not split into n_group %d groups of 2 experts or more", experts, groups)
   end
   -- transformers reads these keys alone, whatever DeepSeek's names the file also has
   cfg.n_routed_experts, cfg.n_shared_experts, cfg.moe_layer_freq = experts, int("num_shared_experts", 0, 1), 1
   return deepseek.moe_config(cfg, WHO, "noaux_tc", { routed_scaling_factor = 2.5, norm_topk_prob = true, n_group = 1,
      topk_group = 1, first_k_dense_replace = 1, num_experts_per_tok = 8 })
end

local MLP, MoE, mlp = deepseek.moe_layer_classes("ExaoneMoe", "SparseMoEBlock")
M.ExaoneMoeMLP, M.ExaoneMoeSparseMoEBlock = MLP, MoE

-- (q_norm and k_norm come with cfg.qk_norm: LlamaAttention applies them before rotating)
local LM = moe.decoder_family("exaone_moe", "ExaoneMoe", llama.LlamaAttention, mlp, "mlp", M.config, M)
moe.builds_experts_as_stored(LM)

-- the hub's name for the bias, as transformers' conversion mapping renames it; its mtp.* tensors
-- (transformers' _keys_to_ignore_on_load_unexpected: any name holding "mtp")
LM.checkpoint_renames = { { "%.mlp%.e_score_correction_bias$", ".mlp.gate.e_score_correction_bias" } }
LM.ignore_unexpected = { "rotary_emb%.inv_freq$", "mtp" }

return M
