--- dots.llm1 (Dots1ForCausalLM, model_type "dots1": dots.llm1.base and .inst) with Hugging Face
-- parameter names: Qwen3's attention (per-head q/k RMSNorms, layers from max_window_layers on
-- sliding when sliding_window is set), the first first_k_dense_replace layers dense, then
-- DeepSeek-V3's routing (sigmoid scores, a correction bias for the choice, the best topk_group of
-- n_group groups, routed_scaling_factor) over n_routed_experts beside shared experts
-- (models/deepseek.lua), as transformers builds it.
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local deepseek = require("moonload.models.deepseek")

local M = {}

--- Reads and checks a dots.llm1 config (path, folder or table).
function M.config(source)
   -- transformers' Dots1Config defaults where they differ from V2's
   return deepseek.moe_config(llama.config(source, "dots1"), "models.dots1", "noaux_tc",
      { norm_topk_prob = false, n_group = 1, topk_group = 1, first_k_dense_replace = 0 })
end

local MLP, MoE, mlp = deepseek.moe_layer_classes("Dots1", "MoE")
M.Dots1MLP, M.Dots1MoE = MLP, MoE
moe.decoder_family("dots1", "Dots1", llama.LlamaAttention, mlp, "mlp", M.config, M)

return M
