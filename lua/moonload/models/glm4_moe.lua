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
-- Solar Open (model_type solar_open) and Sarvam MoE (model_type sarvam_moe): below.
local llama = require("moonload.models.llama")
local common = require("moonload.models.common")
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

-- Sarvam MoE (model_type sarvam_moe: sarvamai/sarvam-30b; transformers builds a Glm4MoeForCausalLM):
-- GLM-4.5's layers with the whole head rotated (partial_rotary_factor 1), per-head q/k norms unless
-- use_qk_norm is false, q/k/v biased when attention_bias (the hub: use_qkv_bias). The hub's names
-- load as transformers' conversion mapping renames them: model.word_embeddings, attention.dense,
-- query_layernorm / key_layernorm, mlp.gate.expert_bias, and attention.query_key_value (q rows,
-- then k, then v) split into q_proj, k_proj and v_proj as it loads (views of the file, no copy).
local SARVAM = "models.sarvam_moe"

-- SarvamMoEConfig's defaults for the keys Llama's and DeepSeek's readers require or default otherwise
-- (the others: models/llama.lua's FAMILIES)
local SARVAM_DEFAULTS = { vocab_size = 262144, hidden_size = 4096, intermediate_size = 8192, num_hidden_layers = 19,
   num_attention_heads = 64, use_qk_norm = true, n_routed_experts = 128, n_shared_experts = 1, moe_intermediate_size = 1024 }
-- the original config's names for transformers' keys (its attribute_map)
local SARVAM_ALIASES = { num_experts = "n_routed_experts", num_local_experts = "n_routed_experts",
   num_shared_experts = "n_shared_experts", use_qkv_bias = "attention_bias", num_mtp_layers = "num_nextn_predict_layers" }

--- Reads and checks a Sarvam MoE config (path, folder or table), with SarvamMoEConfig's defaults
-- and its aliases.
function M.sarvam_moe_config(source)
   local raw, src, fixed = config.read_with_defaults(source, SARVAM, SARVAM_DEFAULTS)
   for alias, key in pairs(SARVAM_ALIASES) do
      if raw[key] == nil and raw[alias] ~= nil then fixed[key] = raw[alias] end
   end
   if type(fixed.use_qk_norm) ~= "boolean" then
      config.fail(fixed, SARVAM, 'config key "use_qk_norm" must be a boolean, got %s', tostring(fixed.use_qk_norm))
   end
   local cfg = llama.config(fixed, "sarvam_moe")
   cfg._source, cfg._raw = src, raw
   return deepseek.moe_config(cfg, SARVAM, "noaux_tc", { routed_scaling_factor = 2.5, norm_topk_prob = true, n_group = 1,
      topk_group = 1, first_k_dense_replace = 1, num_experts_per_tok = 6 })
end

local SarvamMLP, SarvamMoE, sarvam_mlp = deepseek.moe_layer_classes("SarvamMoE", "MoE")
M.SarvamMoEMLP, M.SarvamMoEMoE = SarvamMLP, SarvamMoE
local SarvamLM = moe.decoder_family("sarvam_moe", "SarvamMoE", llama.LlamaAttention, sarvam_mlp, "mlp",
   M.sarvam_moe_config, M)
SarvamLM.checkpoint_renames = { { "^model%.word_embeddings%.", "model.embed_tokens." }, { "%.attention%.", ".self_attn." },
   { "%.self_attn%.dense%.", ".self_attn.o_proj." }, { "%.self_attn%.query_layernorm%.", ".self_attn.q_norm." },
   { "%.self_attn%.key_layernorm%.", ".self_attn.k_norm." }, { "%.mlp%.gate%.expert_bias$", ".mlp.gate.e_score_correction_bias" } }

-- The experts as the checkpoint holds them (one module each on the hub, or transformers' stacked
-- layout); a checkpoint holding the fused projection (any layer's attention.query_key_value) split
-- as it loads.
moe.builds_experts_as_stored(SarvamLM)
local experts_as_stored, sarvam_init = SarvamLM.build_opts_for, SarvamLM.__init

function SarvamLM.build_opts_for(names, shape_of)
   local opts = experts_as_stored(names, shape_of) or {}
   for _, name in ipairs(names) do
      if name:find("%.attention%.query_key_value%.weight$") then opts.fused_qkv = true break end
   end
   return next(opts) and opts or nil
end

function SarvamLM:__init(cfg, opts)
   sarvam_init(self, cfg, opts)
   deepseek.skip_mtp_layers(self)
   if opts and opts.fused_qkv then common.split_fused_qkv(self, "model.layers.%d.attention", "query_key_value") end
end

return M
