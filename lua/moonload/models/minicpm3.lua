--- MiniCPM3 (MiniCPM3ForCausalLM, model_type "minicpm3": openbmb/MiniCPM3-4B) with Hugging Face
-- parameter names, as transformers builds it.
--
-- Attention: DeepSeek-V2's multi-head latent attention (models/deepseek.lua: queries through a
-- q_lora_rank bottleneck, or q_proj when it is null; keys and values from a kv_lora_rank latent and
-- one rotary key of qk_rope_head_dim shared by all heads; the cache keeps the latent and the rotary
-- key only, and a step attends absorbed or expanded, whichever costs less). Unlike DeepSeek's, the
-- rotary key and queries turn as Llama's do (halves, not neighbouring pairs), by default with
-- LongRoPE (short factors up to original_max_position_embeddings, long ones past it).
--
-- Layers: Llama's dense pre-norm layers (SwiGLU MLP, no experts), with muP-style scales as
-- Granite's (models/llama.lua): the embeddings times scale_emb, each attention and MLP output times
-- scale_depth / sqrt(num_hidden_layers) before it joins the residual, and the logits divided by
-- hidden_size / dim_model_base. The head is tied to the embeddings unless tie_word_embeddings says
-- otherwise.
local cjson = require("cjson")
local json = require("moonload.utils.json")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local deepseek = require("moonload.models.deepseek")

local M = {}
local WHO = "models.minicpm3"

-- MiniCPM3Config's defaults (openbmb/MiniCPM3-4B's) where Llama's and DeepSeek's readers would take
-- others; v_head_dim, q_lora_rank, scale_depth and dim_model_base: below, as null reads otherwise.
local DEFAULTS = { vocab_size = 73448, hidden_size = 2560, intermediate_size = 6400, num_hidden_layers = 62,
   num_attention_heads = 40, max_position_embeddings = 32768, rms_norm_eps = 1e-5, tie_word_embeddings = true,
   kv_lora_rank = 256, qk_nope_head_dim = 64, qk_rope_head_dim = 32 }

-- The keys transformers reads otherwise when the file says null than when it has none (config.read
-- drops nulls, so this looks at the source as written): the set of those that are null.
local function null_keys(source, src)
   local raw = type(source) == "table" and source or json.read(src, WHO, true) or {}
   local null = {}
   for _, k in ipairs({ "q_lora_rank", "v_head_dim", "scale_depth", "dim_model_base" }) do
      null[k] = raw[k] == cjson.null
   end
   return null
end

-- cfg[name] (default when absent) checked to be a positive number.
local function positive(cfg, name, default)
   local v = cfg[name]
   if v == nil then v = default end
   if type(v) ~= "number" or v <= 0 then
      config.fail(cfg, WHO, 'config key "%s" must be a positive number, got %s', name, tostring(v))
   end
   return v
end

--- Reads and checks a MiniCPM3 config (path, folder or table) with MiniCPM3Config's defaults:
-- Llama's keys and DeepSeek's latent attention keys (models/deepseek.lua), the rotary table over
-- qk_rope_head_dim dims, and the scales: cfg.embedding_multiplier (scale_emb),
-- cfg.residual_multiplier (scale_depth / sqrt(num_hidden_layers)) and cfg.logits_scaling
-- (hidden_size / dim_model_base), as Granite's layers read them. Null q_lora_rank: q_proj, no
-- bottleneck; null v_head_dim: hidden_size / num_attention_heads; null scale_depth and
-- dim_model_base: no scaling (transformers' readings of null).
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   local null = null_keys(source, src)
   local where = { _source = src }
   -- transformers' rotary table turns head_dim dims, which it sets to qk_rope_head_dim whatever the file says
   fixed.head_dim = config.integer(where, WHO, "qk_rope_head_dim", fixed.qk_rope_head_dim, 2)
   if raw.q_lora_rank == nil and not null.q_lora_rank then fixed.q_lora_rank = 768 end
   local hidden, heads = fixed.hidden_size, fixed.num_attention_heads
   if fixed.v_head_dim == nil and type(hidden) == "number" and type(heads) == "number" and heads > 0 then
      fixed.v_head_dim = math.floor(hidden / heads)
   end
   -- (LongRoPE's pretraining length: max_position_embeddings unless said, as transformers standardizes it)
   if fixed.original_max_position_embeddings == nil then
      fixed.original_max_position_embeddings = fixed.max_position_embeddings
   end
   local cfg = deepseek.config(fixed, "minicpm3")
   cfg._source, cfg._raw = src, raw
   cfg.rope_interleave = false                 -- (transformers' MiniCPM3 rotates halves, whatever the file says)
   if cfg.hidden_size % cfg.num_attention_heads ~= 0 then
      config.fail(cfg, WHO, "hidden_size %d is not a multiple of num_attention_heads %d", cfg.hidden_size,
         cfg.num_attention_heads)
   end
   -- (every head has its own keys and values from the latent: transformers' attention fails otherwise)
   if cfg.num_key_value_heads ~= cfg.num_attention_heads then
      config.fail(cfg, WHO, 'config key "num_key_value_heads" (%d) must equal num_attention_heads %d',
         cfg.num_key_value_heads, cfg.num_attention_heads)
   end
   local L = cfg.num_hidden_layers
   cfg.scale_emb = positive(cfg, "scale_emb", 12)
   cfg.scale_depth = null.scale_depth and math.sqrt(L) or positive(cfg, "scale_depth", 1.4)
   cfg.dim_model_base = null.dim_model_base and cfg.hidden_size or positive(cfg, "dim_model_base", 256)
   cfg.embedding_multiplier = cfg.scale_emb
   cfg.residual_multiplier = cfg.scale_depth / math.sqrt(L)
   cfg.logits_scaling = cfg.hidden_size / cfg.dim_model_base
   return cfg
end

local MLP = llama.LlamaMLP:extend("MiniCPM3MLP")
M.MiniCPM3MLP = MLP

local LM = moe.decoder_family("minicpm3", "MiniCPM3", deepseek.MLAttention, MLP, "mlp", M.config, M)

-- Granite's scales, read from the config's names for them (see M.config)
M.MiniCPM3DecoderLayer.__init = llama.GraniteDecoderLayer.__init
M.MiniCPM3DecoderLayer.forward = llama.GraniteDecoderLayer.forward
M.MiniCPM3Model.embed_scale = llama.GraniteModel.embed_scale
-- (transformers divides the last hidden states; the head has no bias, so the logits divide alike)
LM.forward = llama.scaled_logits_forward(WHO, llama.granite_logits)

--- nil: unlike Phi-3's, transformers' MiniCPM3 never rebuilds the cache when a generation passes
-- LongRoPE's original length: the keys cached so far keep their short factors, and each forward
-- turns its own tokens by the factors its highest position picks.
function LM:recompute_cache_at()
   return nil
end

return M
