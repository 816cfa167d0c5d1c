--- GLM-4.5 and GLM-4.5-Air (Glm4MoeForCausalLM, model_type "glm4_moe") with Hugging Face
-- parameter names: Llama's grouped-query attention with biased q/k/v projections, per-head q/k
-- RMSNorms when use_qk_norm, and rotary embeddings over the first half of each head
-- (partial_rotary_factor, 0.5 by default); the first first_k_dense_replace layers dense, then
-- DeepSeek-V3's routing (sigmoid scores, a correction bias for the choice, the best topk_group of
-- n_group groups, routed_scaling_factor) over n_routed_experts beside shared experts
-- (models/deepseek.lua). Like V3's, the checkpoints carry multi-token-prediction layers after the
-- last decoder layer, which loading leaves out.
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local deepseek = require("moonload.models.deepseek")

local M = {}
local WHO = "models.glm4_moe"

--- Reads and checks a GLM-4.5 config (path, folder or table).
function M.config(source)
   local cfg = llama.config(source, "glm4_moe")
   -- transformers' default rotary share: half of each head
   llama.set_rotary_dim(cfg, WHO, cfg.rope.partial_rotary_factor or cfg.partial_rotary_factor or 0.5)
   return deepseek.moe_config(cfg, WHO, "noaux_tc",
      { norm_topk_prob = true, n_group = 1, topk_group = 1, first_k_dense_replace = 1, num_experts_per_tok = 8 })
end

local MLP, MoE, mlp = deepseek.moe_layer_classes("Glm4Moe", "MoE")
M.Glm4MoeMLP, M.Glm4MoeMoE = MLP, MoE
local LM = moe.decoder_family("glm4_moe", "Glm4Moe", llama.LlamaAttention, mlp, "mlp", M.config, M)

function LM:__init(cfg)
   llama.LlamaForCausalLM.__init(self, cfg)
   deepseek.skip_mtp_layers(self)
end

return M
