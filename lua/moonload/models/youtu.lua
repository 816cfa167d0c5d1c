--- Youtu-LLM (YoutuForCausalLM, model_type "youtu": tencent/Youtu-LLM-2B) with Hugging Face
-- parameter names, as transformers builds it.
--
-- Attention: DeepSeek-V3's multi-head latent attention (models/deepseek.lua: queries through a
-- q_lora_rank bottleneck, or q_proj when it is null; keys and values from a kv_lora_rank latent and
-- one rotary key of qk_rope_head_dim shared by all heads, rotary pairs interleaved unless
-- rope_interleave is false; the cache keeps the latent and the rotary key only, and a step attends
-- absorbed or expanded, whichever costs less).
--
-- Layers: Llama's dense pre-norm layers with Qwen3's SwiGLU MLP (never biased), no experts; the head
-- tied to the embeddings unless tie_word_embeddings says otherwise.
local cjson = require("cjson")
local json = require("moonload.utils.json")
local config = require("moonload.models.config")
local llama = require("moonload.models.llama")
local moe = require("moonload.models.moe")
local deepseek = require("moonload.models.deepseek")

local M = {}
local WHO = "models.youtu"

-- YoutuConfig's defaults (Youtu-LLM-2B's) where Llama's and DeepSeek's readers would take others;
-- q_lora_rank: below, as null reads otherwise.
local DEFAULTS = { vocab_size = 128256, hidden_size = 2048, intermediate_size = 6144, num_hidden_layers = 32,
   num_attention_heads = 16, max_position_embeddings = 131072, tie_word_embeddings = true, kv_lora_rank = 512,
   qk_rope_head_dim = 64, v_head_dim = 128, qk_nope_head_dim = 128 }

--- Reads and checks a Youtu config (path, folder or table) with YoutuConfig's defaults: Llama's keys
-- and DeepSeek's latent attention keys (models/deepseek.lua). q_lora_rank absent: 1536; null: q_proj,
-- no bottleneck (transformers' readings).
function M.config(source)
   local raw, src, fixed = config.read_with_defaults(source, WHO, DEFAULTS)
   if raw.q_lora_rank == nil then         -- (config.read drops nulls: the file as written says which)
      local written = type(source) == "table" and source or json.read(src, WHO, true) or {}
      if written.q_lora_rank ~= cjson.null then fixed.q_lora_rank = 1536 end
   end
   local cfg = deepseek.config(fixed, "youtu")
   cfg._source, cfg._raw = src, raw
   cfg.mlp_bias = false                    -- (Qwen3's MLP, whatever the file says)
   -- (every head has its own keys and values from the latent: transformers' attention fails otherwise)
   if cfg.num_key_value_heads ~= cfg.num_attention_heads then
      config.fail(cfg, WHO, 'config key "num_key_value_heads" (%d) must equal num_attention_heads %d',
         cfg.num_key_value_heads, cfg.num_attention_heads)
   end
   return cfg
end

local MLP = llama.LlamaMLP:extend("YoutuMLP")
M.YoutuMLP = MLP

moe.decoder_family("youtu", "Youtu", deepseek.MLAttention, MLP, "mlp", M.config, M)

return M
