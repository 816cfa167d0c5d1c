--- GLM-4.5 and GLM-4.5-Air (Glm4MoeForCausalLM, model_type "glm4_moe") with Hugging Face
-- parameter names: Llama's grouped-query attention with biased q/k/v projections, per-head q/k
-- RMSNorms when use_qk_norm, and rotary embeddings over the first half of each head
-- (partial_rotary_factor, 0.5 by default); the first first_k_dense_replace layers dense, then
-- DeepSeek-V3's routing (sigmoid scores, a correction bias for the choice, the best topk_group of
-- n_group groups, routed_scaling_factor) over n_routed_experts beside shared experts
-- (models/deepseek.lua). Like V3's, the checkpoints carry multi-token-prediction layers after the
-- last decoder layer, which loading leaves out.
-- GLM-4.5V (Glm4vMoeForConditionalGeneration, model_type glm4v_moe) loads its language model alone
-- (text_config, model.language_model.*; the vision tower left out): GLM-4.5's layers, q/k/v biased
-- unless attention_bias says not, no q/k norms. Its multimodal rotary embedding (mrope_section)
-- gives every section the same positions for text, so it is GLM-4.5's: the same inv_freq, halves
-- rotated over partial_rotary_factor (0.5 by default) of each head.
-- Solar Open (model_type solar_open): below.
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local deepseek = require("moonload.models.deepseek")
local config = require("moonload.models.config")

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

-- GLM-4.5V's text config (transformers' glm4v_moe_text): attention_bias True by default, and no
-- use_qk_norm to ask for q/k norms
local function read_config(source)
   if type(source) ~= "table" or source.model_type ~= "glm4v_moe_text" then return M.config(source) end
   local text = {}
   for k, v in pairs(source) do text[k] = v end
   if text.attention_bias == nil then text.attention_bias = true end
   text.use_qk_norm = nil
   return M.config(text)
end

LM.checkpoint_renames = config.LANGUAGE_MODEL_RENAMES
LM.ignore_unexpected = { "rotary_emb%.inv_freq$", "^model%.visual%." }
function LM:read_config(source)
   return config.read_text_config(source, WHO, { glm4v_moe = true }, read_config)
end

function LM:__init(cfg)
   llama.LlamaForCausalLM.__init(self, cfg)
   deepseek.skip_mtp_layers(self)
end

-- Solar Open (upstage/Solar-Open-100B, model_type solar_open): GLM-4.5's routed and shared experts
-- in every layer (no dense layers, no multi-token-prediction layers), behind Llama's attention:
-- the whole head rotated unless partial_rotary_factor says otherwise, no q/k norms, the output
-- projection never biased. The hub holds one module per expert; transformers' stacked layout
-- loads too.
local SOLAR = "models.solar_open"

--- Reads and checks a Solar Open config (path, folder or table), with transformers' defaults.
function M.solar_open_config(source)
   local cfg = llama.config(source, "solar_open")
   if cfg.n_routed_experts == nil and cfg.num_local_experts == nil then cfg.n_routed_experts = 128 end
   if cfg.n_shared_experts == nil then cfg.n_shared_experts = 1 end
   if cfg.moe_intermediate_size == nil then cfg.moe_intermediate_size = 1280 end
   return deepseek.moe_config(cfg, SOLAR, "noaux_tc",
      { norm_topk_prob = true, n_group = 1, topk_group = 1, first_k_dense_replace = 0, num_experts_per_tok = 8 })
end

local SolarMLP, SolarMoE, solar_mlp = deepseek.moe_layer_classes("SolarOpen", "MoE")
M.SolarOpenMLP, M.SolarOpenMoE = SolarMLP, SolarMoE
moe.decoder_family("solar_open", "SolarOpen", llama.LlamaAttention, solar_mlp, "mlp", M.solar_open_config, M)

return M
