--- Llama (transformers' LlamaForCausalLM) with Hugging Face parameter names:
-- model.{embed_tokens, layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
-- post_attention_layernorm, mlp.{gate,up,down}_proj}, norm}, lm_head.
-- RMSNorm, rotary position embeddings (rope_theta, linear or llama3 scaling; inv_freq is a
-- non-persistent buffer as in transformers), grouped-query attention, SwiGLU MLP, tied or
-- untied head.
-- Mistral, Qwen2, Qwen3 and Phi-3 are the same network (transformers builds them from Llama's
-- code), so they live here too, as subclasses named as transformers names them
-- (MistralForCausalLM, Qwen2DecoderLayer, ...): Mistral attends through a sliding window, Qwen2
-- has biases on q, k and v and may slide on its upper layers, Qwen3 normalizes each query and key
-- head (q_norm, k_norm) and may slide like Qwen2, Phi-3 (also Phi-4) keeps q, k, v in one
-- qkv_proj and gate, up in one gate_up_proj and may rotate only part of each head.
local nn = require("moonload.nn")
local T = require("moonload.tensor")
local config = require("moonload.models.config")
local common = require("moonload.models.common")
local block_schedule = require("moonload.models.block_schedule")
local generation = require("moonload.models.generation")

local M = {}
local WHO = "models.llama"

-- model_type -> the name errors give and the prefix of the class names.
local FAMILIES = {
   llama = { who = "models.llama", prefix = "Llama" },
   mistral = { who = "models.mistral", prefix = "Mistral" },
   ministral3 = { who = "models.ministral3", prefix = "Ministral3",
                  defaults = { rms_norm_eps = 1e-5, head_dim = 128, rope_theta = 1000000 } },
   qwen2 = { who = "models.qwen2", prefix = "Qwen2" },
   qwen3 = { who = "models.qwen3", prefix = "Qwen3", defaults = { head_dim = 128 } },
   phi3 = { who = "models.phi3", prefix = "Phi3" },
   qwen3_moe = { who = "models.qwen3_moe", prefix = "Qwen3Moe", defaults = { head_dim = 128 } },   -- models/moe.lua
   mixtral = { who = "models.mixtral", prefix = "Mixtral", defaults = { rope_theta = 1000000 } },  -- models/moe.lua
   qwen2_moe = { who = "models.qwen2_moe", prefix = "Qwen2Moe" },                                  -- models/moe.lua
   olmo2 = { who = "models.olmo2", prefix = "Olmo2" },
   olmo3 = { who = "models.olmo3", prefix = "Olmo3", defaults = { rope_theta = 500000, rms_norm_eps = 1e-5 } },
   olmo_hybrid = { who = "models.olmo_hybrid", prefix = "OlmoHybrid",                        -- models/olmo_hybrid.lua
                   defaults = { max_position_embeddings = 65536 } },
   deepseek_v2 = { who = "models.deepseek_v2", prefix = "DeepseekV2" },                        -- models/deepseek.lua
   deepseek_v3 = { who = "models.deepseek_v3", prefix = "DeepseekV3" },
   glm4_moe_lite = { who = "models.glm4_moe_lite", prefix = "Glm4MoeLite", defaults = { rms_norm_eps = 1e-5 } },
   mistral4 = { who = "models.mistral4", prefix = "Mistral4" },
   minicpm3 = { who = "models.minicpm3", prefix = "MiniCPM3" },                              -- models/minicpm3.lua
   youtu = { who = "models.youtu", prefix = "Youtu" },                                       -- models/youtu.lua
   diffllama = { who = "models.diffllama", prefix = "DiffLlama" },                           -- models/diffllama.lua
   doge = { who = "models.doge", prefix = "Doge" },                                          -- models/doge.lua
   lara_mini = { who = "models.lara_mini", prefix = "LaraMini",      -- (no dense MLP: no intermediate_size)
                 defaults = { intermediate_size = function(c) return c.moe_intermediate_size or 512 end } },   -- models/lara_mini.lua
   longcat_flash = { who = "models.longcat_flash", prefix = "LongcatFlash",        -- models/longcat_flash.lua
                     defaults = { rms_norm_eps = 1e-5, rope_theta = 10000000, max_position_embeddings = 131072 } },
   deepseek_v32 = { who = "models.deepseek_v32", prefix = "DeepseekV32" },              -- models/deepseek_sparse.lua
   glm_moe_dsa = { who = "models.glm_moe_dsa", prefix = "GlmMoeDsa", defaults = { rms_norm_eps = 1e-5 } },
   glm4 = { who = "models.glm4", prefix = "Glm4", defaults = { rms_norm_eps = 1.5625e-07, head_dim = 128, attention_bias = true } },
   glm4_moe = { who = "models.glm4_moe", prefix = "Glm4Moe", defaults = { rms_norm_eps = 1e-5 } },   -- models/glm4_moe.lua
   solar_open = { who = "models.solar_open", prefix = "SolarOpen",      -- (no dense MLP: no intermediate_size)
                  defaults = { head_dim = 128, rms_norm_eps = 1e-5, rope_theta = 1000000, max_position_embeddings = 131072,
                               num_key_value_heads = 8, intermediate_size = function(c) return c.moe_intermediate_size or 1280 end } },
   glm4v = { who = "models.glm4v", prefix = "Glm4v", defaults = { rms_norm_eps = 1e-5 } },   -- GLM-4.1V's language model
   dots1 = { who = "models.dots1", prefix = "Dots1" },                                       -- models/dots1.lua
   mimo_v2_flash = { who = "models.mimo_v2_flash", prefix = "MiMoV2Flash",                      -- models/mimo_v2_flash.lua
                     defaults = { head_dim = 192, num_key_value_heads = 4, rms_norm_eps = 1e-5,
                                  max_position_embeddings = 131072 } },
   qwen3_next = { who = "models.qwen3_next", prefix = "Qwen3Next", defaults = { head_dim = 256 } },   -- models/qwen3_next.lua
   qwen3_5 = { who = "models.qwen3_5", prefix = "Qwen3_5", defaults = { head_dim = 256 } },          -- models/qwen3_5.lua
   qwen3_5_moe = { who = "models.qwen3_5_moe", prefix = "Qwen3_5Moe",      -- (no dense MLP: no intermediate_size)
                   defaults = { head_dim = 256, intermediate_size = function(c) return c.moe_intermediate_size or 512 end } },
   gpt_oss = { who = "models.gpt_oss", prefix = "GptOss",                                       -- models/gpt_oss.lua
               defaults = { rms_norm_eps = 1e-5, attention_bias = true, head_dim = 64, rope_theta = 150000 } },
   minimax_m2 = { who = "models.minimax_m2", prefix = "MiniMaxM2", defaults = { head_dim = 128, rope_theta = 5000000 } },   -- models/moe.lua
   minimax = { who = "models.minimax", prefix = "MiniMax",                                          -- models/minimax.lua
               defaults = { rms_norm_eps = 1e-5, rope_theta = 1000000, max_position_embeddings = 131072, num_key_value_heads = 8 } },
   hy_v3 = { who = "models.hy_v3", prefix = "HYV3", defaults = { rope_theta = 11158840 } },                 -- models/hy_v3.lua
   laguna = { who = "models.laguna", prefix = "Laguna" },                                        -- models/laguna.lua
   jetmoe = { who = "models.jetmoe", prefix = "JetMoe" },                                        -- models/jetmoe.lua
   sarvam_moe = { who = "models.sarvam_moe", prefix = "SarvamMoE", defaults = { head_dim = 64, rope_theta = 8000000,   -- models/glm4_moe.lua
                  max_position_embeddings = 131072, num_key_value_heads = 4 } },
   sarvam_mla = { who = "models.sarvam_mla", prefix = "SarvamMLA" },                             -- models/deepseek.lua
   kolibri1 = { who = "models.kolibri1", prefix = "Kolibri1" },                                  -- models/kolibri1.lua
   flint = { who = "models.flint", prefix = "Flint" },                                           -- models/flint.lua
   axk1 = { who = "models.axk1", prefix = "AXK1" },                                              -- models/deepseek.lua
   axk2 = { who = "models.axk2", prefix = "AXK2" },                                              -- models/axk2.lua
   dory = { who = "models.dory", prefix = "Dory",                                                -- models/dory.lua
            defaults = { head_dim = 256, num_key_value_heads = 4, max_position_embeddings = 8192, rope_theta = 10000000 } },
   zaya = { who = "models.zaya", prefix = "Zaya", defaults = { rope_theta = 5000000 } },         -- models/zaya.lua
   mellum = { who = "models.mellum", prefix = "Mellum" },                                        -- models/laguna.lua
   lfm2 = { who = "models.lfm2", prefix = "Lfm2", defaults = { tie_word_embeddings = true, rope_theta = 1000000 } },   -- models/lfm2.lua
   lfm2_moe = { who = "models.lfm2_moe", prefix = "Lfm2Moe", defaults = { tie_word_embeddings = true, rope_theta = 1000000 } },
   ernie4_5 = { who = "models.ernie4_5", prefix = "Ernie4_5",                                    -- models/ernie4_5.lua
                defaults = { head_dim = 128, tie_word_embeddings = true, rms_norm_eps = 1e-5, rope_theta = 500000 } },
   ernie4_5_moe = { who = "models.ernie4_5_moe", prefix = "Ernie4_5_Moe",
                    defaults = { tie_word_embeddings = true, rms_norm_eps = 1e-5, rope_theta = 500000 } },
   exaone4 = { who = "models.exaone4", prefix = "Exaone4", defaults = { rms_norm_eps = 1e-5 } },
   exaone_moe = { who = "models.exaone_moe", prefix = "ExaoneMoe" },                      -- models/exaone_moe.lua
   smollm3 = { who = "models.smollm3", prefix = "SmolLM3",
               defaults = { tie_word_embeddings = true, rope_theta = 2000000 } },
   seed_oss = { who = "models.seed_oss", prefix = "SeedOss",
                defaults = { head_dim = 128, attention_bias = true, rope_theta = 10000 } },
   -- (dynamic_rope: what rope type "dynamic" means for the family: "ntk_alpha", a fixed stretch of the
   -- base by an alpha, as transformers reads HunYuan's; "grows", the base growing past
   -- max_position_embeddings, as transformers' Llama does; elsewhere it is refused)
   hunyuan_v1_dense = { who = "models.hunyuan_v1_dense", prefix = "HunYuanDenseV1", dynamic_rope = "ntk_alpha",
                        defaults = { rms_norm_eps = 1e-5 } },
   hunyuan_v1_moe = { who = "models.hunyuan_v1_moe", prefix = "HunYuanMoEV1", dynamic_rope = "ntk_alpha",   -- models/hunyuan.lua
                      defaults = { rms_norm_eps = 1e-5 } },
   -- (Cohere's LayerNorm eps is layer_norm_eps: read as rms_norm_eps)
   cohere = { who = "models.cohere", prefix = "Cohere",
              defaults = { tie_word_embeddings = true, rope_theta = 500000, rms_norm_eps = 1e-5 } },
   cohere2 = { who = "models.cohere2", prefix = "Cohere2", defaults = { tie_word_embeddings = true, rms_norm_eps = 1e-5 } },
   cohere2_moe = { who = "models.cohere2_moe", prefix = "Cohere2Moe" },                  -- models/cohere2_moe.lua
   cohere_compass_text = { who = "models.cohere_compass", prefix = "CohereCompass",
                           defaults = { tie_word_embeddings = true, rms_norm_eps = 1e-5, max_position_embeddings = 8192 } },
   granite = { who = "models.granite", prefix = "Granite" },
   granitemoe = { who = "models.granitemoe", prefix = "GraniteMoe" },                         -- models/moe.lua
   granitemoeshared = { who = "models.granitemoeshared", prefix = "GraniteMoeShared" },       -- models/moe.lua
   granite_swa = { who = "models.granite_swa", prefix = "GraniteSWA",                          -- models/granite_swa.lua
                   defaults = { tie_word_embeddings = true, rms_norm_eps = 1e-5, max_position_embeddings = 8192,
                                num_key_value_heads = 4 } },
   granitemoe_swa = { who = "models.granitemoe_swa", prefix = "GraniteMoeSWA" },               -- models/granite_swa.lua
   hyperclovax = { who = "models.hyperclovax", prefix = "HyperCLOVAX" },
   -- hybrids of Mamba-2 mixers and attention (models/mamba2.lua's mixer)
   granitemoehybrid = { who = "models.granitemoehybrid", prefix = "GraniteMoeHybrid" },            -- models/bamba.lua
   bamba = { who = "models.bamba", prefix = "Bamba", defaults = { rms_norm_eps = 1e-5 } },          -- models/bamba.lua
   nemotron_h = { who = "models.nemotron_h", prefix = "NemotronH" },                             -- models/nemotron_h.lua
   jamba = { who = "models.jamba", prefix = "Jamba" },                                           -- models/jamba.lua
   falcon_h1 = { who = "models.falcon_h1", prefix = "FalconH1" },                                -- models/falcon_h1.lua
   internlm3 = { who = "models.internlm3", prefix = "InternLM3", dynamic_rope = "grows",
                 defaults = { head_dim = 128, rms_norm_eps = 1e-5 } },
   arcee = { who = "models.arcee", prefix = "Arcee", defaults = { hidden_act = "relu2", rms_norm_eps = 1e-5 } },
   apertus = { who = "models.apertus", prefix = "Apertus",
               defaults = { hidden_act = "xielu", rms_norm_eps = 1e-5, rope_theta = 12000000 } },
   apertus1p5_text = { who = "models.apertus1p5", prefix = "Apertus1p5Text",            -- (Apertus 1.5's language model)
                       defaults = { hidden_act = "xielu", rms_norm_eps = 1e-5, rope_theta = 12000000 } },
   iquestcoder = { who = "models.iquestcoder", prefix = "IQuestCoder",
                   defaults = { head_dim = 128, rms_norm_eps = 1e-5, max_position_embeddings = 131072 } },
   cwm = { who = "models.cwm", prefix = "Cwm",
           defaults = { head_dim = 128, num_key_value_heads = 8, rms_norm_eps = 1e-5, max_position_embeddings = 131072,
                        rope_theta = 1000000 } },
   -- (Jais-2's LayerNorm eps is layer_norm_eps: read as rms_norm_eps)
   jais2 = { who = "models.jais2", prefix = "Jais2",
             defaults = { hidden_act = "relu2", rms_norm_eps = 1e-5, max_position_embeddings = 8192, attention_bias = true,
                          mlp_bias = true } },
   bitnet = { who = "models.bitnet", prefix = "BitNet",
              defaults = { hidden_act = "relu2", rms_norm_eps = 1e-5, rope_theta = 500000, num_key_value_heads = 5 } },
   nanochat = { who = "models.nanochat", prefix = "NanoChat", defaults = { hidden_act = "relu2" } },   -- models/nanochat.lua
   olmoe = { who = "models.olmoe", prefix = "Olmoe", defaults = { rms_norm_eps = 1e-5 } },               -- models/moe.lua
   flex_olmo = { who = "models.flex_olmo", prefix = "FlexOlmo", defaults = { max_position_embeddings = 4096 } },   -- models/moe.lua
   afmoe = { who = "models.afmoe", prefix = "Afmoe",                                                    -- models/afmoe.lua
             defaults = { head_dim = 128, rms_norm_eps = 1e-5, max_position_embeddings = 16384 } },
   phimoe = { who = "models.phimoe", prefix = "Phimoe", defaults = { rms_norm_eps = 1e-5, rope_theta = 1000000 } },   -- models/moe.lua
   ministral = { who = "models.ministral", prefix = "Ministral", defaults = { max_position_embeddings = 131072 } },
   helium = { who = "models.helium", prefix = "Helium",
              defaults = { head_dim = 128, rms_norm_eps = 1e-8, max_position_embeddings = 4096 } },
   glm = { who = "models.glm", prefix = "Glm",
           defaults = { rms_norm_eps = 1.5625e-07, head_dim = 128, attention_bias = true, max_position_embeddings = 131072 } },
   olmo = { who = "models.olmo", prefix = "Olmo" },
   -- (EXAONE 3's hub files say num_layers, layer_norm_epsilon and activation_function: read as Llama's)
   exaone = { who = "models.exaone", prefix = "Exaone",
              defaults = { num_key_value_heads = 8, rope_theta = 500000, rms_norm_eps = 1e-5, max_position_embeddings = 4096 } },
   -- (Nemotron's LayerNorm eps is norm_eps: read as rms_norm_eps)
   nemotron = { who = "models.nemotron", prefix = "Nemotron",
                defaults = { hidden_act = "relu2", rms_norm_eps = 1e-5, max_position_embeddings = 4096 } },
   starcoder2 = { who = "models.starcoder2", prefix = "Starcoder2",
                  defaults = { tie_word_embeddings = true, hidden_act = "gelu_pytorch_tanh" } },
   llama4_text = { who = "models.llama4", prefix = "Llama4Text",                                -- models/llama4.lua
                   defaults = { head_dim = 128, rms_norm_eps = 1e-5, rope_theta = 500000 } },
   -- (Gemma 1's legacy hidden_act "gelu" reads as the tanh GELU, as transformers reads it)
   gemma = { who = "models.gemma", prefix = "Gemma",           -- its classes: models/gemma.lua
             defaults = { head_dim = 256, tie_word_embeddings = true, hidden_act = "gelu_pytorch_tanh",
                          max_position_embeddings = 8192 } },
   gemma2 = { who = "models.gemma2", prefix = "Gemma2",        -- its classes: models/gemma.lua
              defaults = { head_dim = 256, tie_word_embeddings = true, hidden_act = "gelu_pytorch_tanh" } },
   vaultgemma = { who = "models.vaultgemma", prefix = "VaultGemma",
                  defaults = { head_dim = 256, tie_word_embeddings = true, hidden_act = "gelu_pytorch_tanh",
                               max_position_embeddings = 8192 } },
   gemma3_text = { who = "models.gemma3", prefix = "Gemma3",
                   defaults = { head_dim = 256, tie_word_embeddings = true, hidden_act = "gelu_pytorch_tanh",
                                rope_theta = 1000000 } },
}

M.schema = {
   { "vocab_size", "int" },
   { "hidden_size", "int" },
   { "intermediate_size", "int" },
   { "num_hidden_layers", "int" },
   { "num_attention_heads", "int" },
   { "num_key_value_heads", "int", function(c) return c.num_attention_heads end },
   { "head_dim", "int", function(c) return math.floor(c.hidden_size / c.num_attention_heads) end },
   { "max_position_embeddings", "int", 2048 },
   { "rms_norm_eps", "posnum", 1e-6 },
   { "hidden_act", "string", "silu" },
   { "attention_bias", "bool", false },
   { "mlp_bias", "bool", false },
   { "tie_word_embeddings", "bool", false },
   { "rope_parameters", "table", function() return {} end },
   { "rope_scaling", "table", function() return {} end },
}

local ROPE_KEYS = {
   linear = { "factor" },
   llama3 = { "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings" },
   longrope = { "original_max_position_embeddings" },
   yarn = { "original_max_position_embeddings" },
   ntk_alpha = { "alpha" },                -- base = rope_theta * alpha^(d / (d - 2)), d the head size
   dynamic = { "factor" },                 -- (only where the family's dynamic_rope is "grows")
}

-- A sliding window size from the config: nil (none) or a positive integer.
local function window_size(cfg, who)
   local w = cfg.sliding_window
   if w ~= nil and (type(w) ~= "number" or w ~= math.floor(w) or w <= 0) then
      error(string.format('%s: config key "sliding_window" in %s must be a positive integer or null, got %s',
         who, cfg._source, type(w) == "string" and string.format("string %q", w) or tostring(w)), 3)
   end
   return w
end

-- Qwen2's and Qwen3's layers that slide: layer_types when the file has it, else those from max_window_layers
-- on, as transformers' Qwen2Config derives it; none unless use_sliding_window.
local function qwen2_windows(cfg, who)
   local use = cfg.use_sliding_window
   if use ~= nil and type(use) ~= "boolean" then
      config.fail(cfg, who, 'config key "use_sliding_window" must be a boolean, got %s', tostring(use))
   end
   local w = use and window_size(cfg, who) or nil
   local windows, types = {}, cfg.layer_types
   if types ~= nil and (type(types) ~= "table" or #types ~= cfg.num_hidden_layers) then
      config.fail(cfg, who, 'config key "layer_types" must list %d layer types', cfg.num_hidden_layers)
   end
   local first = cfg.max_window_layers == nil and 28 or cfg.max_window_layers
   if types == nil and (type(first) ~= "number" or first < 0 or first ~= math.floor(first)) then
      config.fail(cfg, who, 'config key "max_window_layers" must be a non-negative integer, got %s', tostring(first))
   end
   for i = 1, cfg.num_hidden_layers do
      local kind = types and types[i] or (i - 1 >= first and "sliding_attention" or "full_attention")
      if kind ~= "full_attention" and kind ~= "sliding_attention" then
         config.fail(cfg, who, 'layer_types[%d] is "%s" (supported: full_attention, sliding_attention)', i, tostring(kind))
      end
      windows[i] = kind == "sliding_attention" and w or false
   end
   return windows
end

--- OLMo's and OLMoE's clip_qkv (q, k and v clipped to +-clip_qkv; null for none), checked when the
-- family reads it.
function M.check_clip_qkv(cfg, reads, who)
   local clip = cfg.clip_qkv
   if reads and clip ~= nil and (type(clip) ~= "number" or clip <= 0) then
      config.fail(cfg, who, 'config key "clip_qkv" must be a positive number or null, got %s', tostring(clip))
   end
end

--- Apertus 1.5's output_vocab_size: the head's rows, the first ids of the vocabulary (its released
-- checkpoints prune the visual and audio codes off the head; null or vocab_size: the whole), in
-- cfg.output_vocab_size (nil when whole). A pruned head cannot be the embedding's.
function M.check_output_vocab_size(cfg, who)
   local n = cfg.output_vocab_size
   if n == nil or n == cfg.vocab_size then cfg.output_vocab_size = nil return end
   config.integer(cfg, who, "output_vocab_size", n, 1)
   if n > cfg.vocab_size then
      config.fail(cfg, who, 'config key "output_vocab_size" (%d) must not exceed vocab_size (%d)', n, cfg.vocab_size)
   end
   if cfg.tie_word_embeddings then
      config.fail(cfg, who, 'config key "output_vocab_size" (%d) prunes the head: "tie_word_embeddings" must be false', n)
   end
end

--- q, k and v clipped to +-clip_qkv (the attention's field; nil: as they are).
function M.clip_projections(self, q, k, v)
   local c = self.clip_qkv
   if c then q, k, v = q:clamp(-c, c), k:clamp(-c, c), v:clamp(-c, c) end
   return q, k, v
end

--- The rope table a family's rotary embedding reads (rope_scaling when the file has one, else
-- rope_parameters) and its name, its type one of `supported` (a set), else an error naming it.
function M.rope_table(cfg, who, supported)
   local rp, name = cfg.rope_parameters, "rope_parameters"
   if next(cfg.rope_scaling) ~= nil then rp, name = cfg.rope_scaling, "rope_scaling" end
   local kind = rp.rope_type or rp.type or "default"
   if not supported[kind] then
      local names = {}
      for k in pairs(supported) do names[#names + 1] = k end
      table.sort(names)
      config.fail(cfg, who, 'rope type "%s" is not supported (supported: %s)', tostring(kind), table.concat(names, ", "))
   end
   return rp, name
end

-- One rotary configuration from (table, where-prefix) sources, later ones winning (nested
-- tables, Gemma 3's per-layer-type parameters, are not keys of it), with the keys its rope type
-- needs checked: {rope_type, rope_theta, factor, ...}. dynamic_rope (the family's, see FAMILIES) says
-- what rope type "dynamic" is: "ntk_alpha" (with an alpha: a fixed base, HunYuan's), "grows" (the base
-- growing with the length, InternLM3RotaryEmbedding), or nil (not supported).
function M.rope_from(cfg, WHO, sources, default_theta, dynamic_rope)
   local rope, where = {}, {}
   for _, src in ipairs(sources) do
      for k, v in pairs(src[1]) do
         if type(v) ~= "table" or k == "short_factor" or k == "long_factor" then rope[k], where[k] = v, src[2] .. k end
      end
   end
   rope.rope_type = rope.rope_type or rope.type or "default"
   if rope.rope_theta == nil then rope.rope_theta, where.rope_theta = default_theta, "rope_theta" end
   if dynamic_rope == "ntk_alpha" and rope.rope_type == "dynamic" then
      if rope.alpha == nil then
         error(string.format('%s: rope type "dynamic" needs "alpha" (a fixed NTK-alpha base; scaling by the length is '
            .. "not supported) in %s", WHO, cfg._source), 3)
      end
      rope.rope_type = "ntk_alpha"
   end
   local grows = dynamic_rope == "grows"
   if not (rope.rope_type == "default" or ROPE_KEYS[rope.rope_type]) or (rope.rope_type == "dynamic" and not grows) then
      error(string.format('%s: rope type "%s" is not supported (supported: default, linear, llama3, longrope, yarn%s) in %s',
         WHO, tostring(rope.rope_type), grows and ", dynamic" or "", cfg._source), 3)
   end
   if (rope.rope_type == "longrope" or rope.rope_type == "yarn") and rope.original_max_position_embeddings == nil then
      rope.original_max_position_embeddings = cfg.original_max_position_embeddings   -- Phi-3 keeps it at the top
      where.original_max_position_embeddings = "original_max_position_embeddings"
   end
   if rope.rope_type == "yarn" and rope.original_max_position_embeddings == nil then
      rope.original_max_position_embeddings = cfg.max_position_embeddings            -- transformers' default
   end
   if rope.rope_type == "yarn" then
      for _, k in ipairs({ "factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim" }) do
         local v = rope[k]
         if v ~= nil and (type(v) ~= "number" or v <= 0) then
            error(string.format('%s: config key "%s" in %s must be a positive number, got %s', WHO, where[k] or k,
               cfg._source, tostring(v)), 3)
         end
      end
   end
   local needed = { "rope_theta" }
   for _, k in ipairs(ROPE_KEYS[rope.rope_type] or {}) do needed[#needed + 1] = k end
   for _, k in ipairs(needed) do
      local v = rope[k]
      if v == nil then
         error(string.format('%s: config key "rope_parameters.%s" is missing in %s (needed by rope type "%s")',
            WHO, k, cfg._source, rope.rope_type), 3)
      end
      if type(v) ~= "number" or v <= 0 then
         error(string.format('%s: config key "%s" in %s must be a positive number, got %s',
            WHO, where[k], cfg._source, type(v) == "string" and string.format("string %q", v) or tostring(v)), 3)
      end
   end
   return rope
end

--- Llama 4's query scaling by position (rope_parameters.llama_4_scaling_beta: Ministral 3,
-- Mistral Small 4): queries at position p are multiplied by 1 + beta * ln(1 + floor(p / n)), n the
-- rope's original_max_position_embeddings, so attention sharpens past the pretraining length
-- (1 before it). Returns {beta, n}, or nil when the config has no beta.
function M.query_scaling(cfg, WHO, rope)
   local beta = rope.llama_4_scaling_beta
   if beta == nil then return nil end
   local n = rope.original_max_position_embeddings
   if type(beta) ~= "number" or beta < 0 then
      config.fail(cfg, WHO, 'config key "rope_parameters.llama_4_scaling_beta" must be a number >= 0, got %s', tostring(beta))
   end
   if type(n) ~= "number" or n < 1 then
      config.fail(cfg, WHO, 'config key "rope_parameters.original_max_position_embeddings" must be a number >= 1 '
         .. "with llama_4_scaling_beta, got %s", tostring(n))
   end
   return { beta = beta, original = n }
end

--- cfg.rotary_dim from the fraction of each head the rotary embedding turns (the rest passes
-- through, as in Phi and GPT-NeoX), checked: a number in (0, 1] that leaves an even count.
function M.set_rotary_dim(cfg, WHO, factor)
   if type(factor) ~= "number" or factor <= 0 or factor > 1 then
      config.fail(cfg, WHO, "partial_rotary_factor must be a number in (0, 1], got %s", tostring(factor))
   end
   cfg.rotary_dim = math.floor(cfg.head_dim * factor)
   if cfg.rotary_dim % 2 ~= 0 then
      config.fail(cfg, WHO, "the rotary dims of a head (%d of head_dim %d) must be even", cfg.rotary_dim, cfg.head_dim)
   end
end

-- Cohere Compass's rope_parameters, an entry per layer type (its hub files keep a stray rope_theta and
-- rope_type beside them, which transformers drops): cfg.rope (the full layers', else the sliding ones'),
-- cfg.rope_local (the sliding layers', where both types rotate) and cfg.nope_layers (the layers whose
-- type has no entry, or null: no position embedding).
local function ropes_by_layer_type(cfg, who)
   local rp, ropes = cfg.rope_parameters, {}
   for _, kind in ipairs({ "full_attention", "sliding_attention" }) do
      if rp[kind] ~= nil then
         if type(rp[kind]) ~= "table" then
            config.fail(cfg, who, 'config key "rope_parameters.%s" must be a table or null, got %s', kind, tostring(rp[kind]))
         end
         ropes[kind] = M.rope_from(cfg, who, { { rp[kind], "rope_parameters." .. kind .. "." } }, 10000)
      end
   end
   if not ropes.full_attention and not ropes.sliding_attention and (rp.rope_type ~= nil or rp.rope_theta ~= nil) then
      config.fail(cfg, who, 'config key "rope_parameters" must hold an entry per layer type (full_attention, '
         .. "sliding_attention), not one rope for all")
   end
   cfg.nope_layers = {}
   for i, w in ipairs(cfg.layer_windows) do cfg.nope_layers[i] = not ropes[w and "sliding_attention" or "full_attention"] end
   cfg.rope = ropes.full_attention or ropes.sliding_attention or cfg.rope
   cfg.rope_theta = cfg.rope.rope_theta
   if ropes.full_attention and ropes.sliding_attention then cfg.rope_local = ropes.sliding_attention end
end

--- Reads and checks a Llama config (path, folder or table); family "mistral" or "qwen2" reads
-- theirs (default "llama"). The rotary parameters come from rope_parameters (transformers >= 5)
-- or from rope_theta + rope_scaling (older files), and end up in cfg.rope = {rope_type,
-- rope_theta, factor, ...}; rope types: default, linear, llama3. The family's differences end up
-- in cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.layer_windows (per layer: a sliding window size,
-- or false), cfg.nope_layers (per layer: true where there is no rotary embedding) and
-- cfg.rope_pairs_interleaved (rotary pairs of neighbouring dims).
function M.config(source, family)
   family = family or "llama"
   local fam = assert(FAMILIES[family], "unknown Llama family")
   local WHO = fam.who
   local schema = M.schema
   if fam.defaults then      -- a family whose configs default differently (transformers' own classes)
      schema = {}
      for i, e in ipairs(M.schema) do
         local d = fam.defaults[e[1]]
         schema[i] = d ~= nil and { e[1], e[2], d } or e
      end
   end
   local raw, src = config.read(source, WHO)
   if family == "exaone" then
      for hub, key in pairs({ num_layers = "num_hidden_layers", layer_norm_epsilon = "rms_norm_eps",
                              activation_function = "hidden_act" }) do
         if raw[hub] ~= nil and raw[key] == nil then raw[key] = raw[hub] end
      end
   end
   if (family == "gemma2" or family == "gemma3_text" or family == "vaultgemma") and raw.hidden_activation ~= nil then
      raw.hidden_act = raw.hidden_activation
   end
   if family == "lfm2" or family == "lfm2_moe" then           -- LFM2's names for Llama's keys
      if raw.norm_eps ~= nil and raw.rms_norm_eps == nil then raw.rms_norm_eps = raw.norm_eps end
      if raw.tie_embedding ~= nil and raw.tie_word_embeddings == nil then raw.tie_word_embeddings = raw.tie_embedding end
      if raw.block_ff_dim ~= nil and raw.intermediate_size == nil then raw.intermediate_size = raw.block_ff_dim end
   end
   if family == "gemma" and raw.hidden_act == "gelu" then raw.hidden_act = "gelu_pytorch_tanh" end
   if family == "nemotron" and raw.norm_eps ~= nil and raw.rms_norm_eps == nil then raw.rms_norm_eps = raw.norm_eps end
   if family == "starcoder2" and raw.norm_epsilon ~= nil and raw.rms_norm_eps == nil then
      raw.rms_norm_eps = raw.norm_epsilon                     -- its LayerNorms' eps, under Llama's key
   end
   if (family == "cohere" or family == "cohere2" or family == "cohere_compass_text") and raw.layer_norm_eps ~= nil
      and raw.rms_norm_eps == nil then
      raw.rms_norm_eps = raw.layer_norm_eps
   end
   if family == "jais2" then raw.rms_norm_eps = raw.layer_norm_eps end   -- (its config has no rms_norm_eps)
   if family == "cohere2" then raw.head_dim = nil end         -- transformers derives it, whatever the file says
   if (family == "apertus" or family == "apertus1p5_text") and raw.rope_parameters == nil and raw.rope_scaling == nil then
      -- transformers' default for a config without any (a top-level rope_theta does not count)
      raw.rope_parameters = { rope_type = "llama3", rope_theta = 12000000, factor = 8, original_max_position_embeddings = 8192,
         low_freq_factor = 1, high_freq_factor = 4 }
   end
   if family == "cwm" and raw.rope_parameters == nil and raw.rope_scaling == nil then   -- (likewise)
      raw.rope_parameters = { rope_type = "llama3", rope_theta = 1000000, factor = 16, original_max_position_embeddings = 8192,
         low_freq_factor = 1, high_freq_factor = 4 }
   end
   if family == "internlm3" then                              -- the hub's names for Llama's biases
      if raw.qkv_bias ~= nil and raw.attention_bias == nil then raw.attention_bias = raw.qkv_bias end
      if raw.bias ~= nil and raw.mlp_bias == nil then raw.mlp_bias = raw.bias end
   end
   local cfg = config.validate(raw, schema, src, WHO, 2)
   local rp = cfg.rope_parameters
   local rope = M.rope_from(cfg, WHO, { { cfg.rope_scaling, "rope_scaling." }, { { rope_theta = cfg.rope_theta }, "" },
      { rp, "rope_parameters." }, { type(rp.full_attention) == "table" and rp.full_attention or {},
      "rope_parameters.full_attention." } }, fam.defaults and fam.defaults.rope_theta or 10000,
      fam.dynamic_rope)
   if family == "olmo3" then           -- its sliding layers rotate unscaled
      cfg.rope_local = M.rope_from(cfg, WHO, { { { rope_theta = cfg.rope_theta }, "" },
         { type(rp.sliding_attention) == "table" and rp.sliding_attention or {}, "rope_parameters.sliding_attention." } },
         500000)
   end
   if family == "gemma3_text" then     -- its sliding layers rotate with their own base
      cfg.rope_local = M.rope_from(cfg, WHO, { { { rope_theta = cfg.rope_local_base_freq }, "" },
         { type(rp.sliding_attention) == "table" and rp.sliding_attention or {}, "rope_parameters.sliding_attention." } },
         10000)
   end
   if rope.rope_type == "llama3" and rope.high_freq_factor == rope.low_freq_factor then
      config.fail(cfg, WHO, "rope high_freq_factor and low_freq_factor must differ")
   end
   cfg.rope = rope
   cfg.query_scaling = M.query_scaling(cfg, WHO, rope)
   cfg.rope_theta = rope.rope_theta
   if cfg.num_attention_heads % cfg.num_key_value_heads ~= 0 then
      config.fail(cfg, WHO, "num_attention_heads %d is not a multiple of num_key_value_heads %d",
         cfg.num_attention_heads, cfg.num_key_value_heads)
   end
   -- partial_rotary_factor (Phi-3/4, in rope_parameters or at the top level; MiniMax-M2's hub files
   -- say rotary_dim instead)
   local legacy = family == "minimax_m2" and type(cfg.rotary_dim) == "number" and cfg.rotary_dim / cfg.head_dim or nil
   -- (transformers' default for GLM and GLM-4, and for Nemotron: half of each head)
   local whole = (family == "glm4" or family == "glm" or family == "nemotron") and 0.5 or 1
   M.set_rotary_dim(cfg, WHO, rope.partial_rotary_factor or cfg.partial_rotary_factor or legacy or whole)
   if rope.rope_type == "longrope" then
      for _, k in ipairs({ "short_factor", "long_factor" }) do
         local f = rope[k]
         local ok = type(f) == "table" and #f == cfg.rotary_dim / 2
         for _, x in ipairs(ok and f or {}) do ok = ok and type(x) == "number" and x > 0 end
         if not ok then
            config.fail(cfg, WHO, "longrope %s must list %d positive numbers (one per rotary frequency)", k, cfg.rotary_dim / 2)
         end
      end
   end
   common.activation(cfg.hidden_act, WHO, cfg._source)
   cfg.layer_windows = {}
   if family == "llama" or family == "deepseek_v2" or family == "deepseek_v3" or family == "glm4_moe_lite"
      or family == "deepseek_v32" or family == "glm_moe_dsa" or family == "mistral4" or family == "minicpm3" or family == "sarvam_mla"
      or family == "axk1" or family == "axk2" or family == "jetmoe" or family == "youtu" or family == "diffllama"
      or family == "doge"
      or family == "llama4_text"
      or family == "gemma" or family == "olmo" or family == "nemotron" or family == "exaone" or family == "iquestcoder"
      or family == "jais2" or family == "bitnet" or family == "nanochat" then
      cfg.qkv_bias, cfg.o_bias = cfg.attention_bias, cfg.attention_bias
      if family == "gemma" or family == "bitnet" or family == "nanochat" then cfg.mlp_bias = false end
      if family == "bitnet" and cfg.num_attention_heads * cfg.head_dim ~= cfg.hidden_size then   -- (attn_sub_norm's size)
         config.fail(cfg, WHO, "num_attention_heads %d x head_dim %d must equal hidden_size %d", cfg.num_attention_heads,
            cfg.head_dim, cfg.hidden_size)
      end
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
      M.check_clip_qkv(cfg, family == "olmo", WHO)
      if family == "iquestcoder" then   -- the original code's options no released checkpoint sets (transformers refuses them)
         for _, key in ipairs({ "clip_qkv", "use_sliding_window" }) do
            if cfg[key] ~= nil and cfg[key] ~= false then
               config.fail(cfg, WHO, 'config key "%s" is not supported (IQuest-Coder runs as a Llama), got %s', key, tostring(cfg[key]))
            end
         end
      end
   elseif family == "solar_open" then        -- biased q/k/v when asked, never the output (models/glm4_moe.lua)
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.attention_bias, false, false
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
   elseif family == "helium" then           -- biased q/k/v when asked, never the output; rotary pairs of neighbours
      cfg.qkv_bias, cfg.o_bias = cfg.attention_bias, false
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
      cfg.rope_pairs_interleaved = true
   elseif family == "cwm" then               -- Qwen2's attention unbiased; layer_types says which slide (all but
      -- every 4th by default) over sliding_window (8192 by default)
      cfg.qkv_bias, cfg.o_bias = false, false
      if cfg.sliding_window == nil then cfg.sliding_window = 8192 end
      cfg.use_sliding_window, cfg.max_window_layers = true, 0
      if cfg.layer_types == nil then
         cfg.layer_types = {}
         for i = 1, cfg.num_hidden_layers do cfg.layer_types[i] = i % 4 == 1 and "full_attention" or "sliding_attention" end
      end
      cfg.layer_windows = qwen2_windows(cfg, WHO)
   elseif family == "ministral" then         -- Mistral's layers; layer_types says which slide (all, by default)
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = false, false, false
      cfg.use_sliding_window = window_size(cfg, WHO) ~= nil
      cfg.max_window_layers = 0
      cfg.layer_windows = qwen2_windows(cfg, WHO)
   elseif family == "glm4_moe" or family == "glm4" or family == "glm4v" or family == "glm" or family == "sarvam_moe" then
      -- biased q/k/v, an unbiased output (GLM-4.1V's q/k/v are biased whatever the config says: its
      -- text config has no attention_bias); Sarvam MoE is GLM-4.5's
      local glm45 = family == "glm4_moe" or family == "sarvam_moe"
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = family == "glm4v" or cfg.attention_bias, false, false
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
      cfg.qk_norm = glm45 and cfg.use_qk_norm == true      -- (GLM-4.5's per-head q/k norms, if asked)
      cfg.rope_pairs_interleaved = not glm45               -- (GLM-4's rotary pairs: neighbouring dims)
   elseif family == "ernie4_5" or family == "ernie4_5_moe" then   -- use_bias on every projection
      local bias = cfg.use_bias == true
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = bias, bias, bias
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
      cfg.rope_pairs_interleaved = true
   elseif family == "exaone4" or family == "exaone_moe" or family == "cohere2" or family == "cohere2_moe"
      or family == "kolibri1" then   -- sliding layers rotate; with a window, the full ones are NoPE
      if family == "exaone4" or family == "exaone_moe" or family == "kolibri1" then   -- (Kolibri-1: EXAONE 4's attention)
         cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = false, false, false
         cfg.qk_norm = true
      else                                    -- Cohere 2: Cohere's layers; without a window, transformers' 4096
         cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.attention_bias, cfg.attention_bias, false
         cfg.rope_pairs_interleaved = true
         if cfg.sliding_window == nil then cfg.sliding_window = 4096 end
      end
      local w = window_size(cfg, WHO)
      cfg.use_sliding_window = w ~= nil
      cfg.max_window_layers = 0
      if cfg.layer_types == nil and w then
         local every = cfg.sliding_window_pattern == nil and 4 or cfg.sliding_window_pattern
         if type(every) ~= "number" or every ~= math.floor(every) or every < 1 then
            config.fail(cfg, WHO, 'config key "sliding_window_pattern" must be a positive integer without "layer_types", got %s',
               tostring(every))
         end
         cfg.layer_types = {}
         for i = 1, cfg.num_hidden_layers do cfg.layer_types[i] = i % every ~= 0 and "sliding_attention" or "full_attention" end
      end
      cfg.layer_windows = qwen2_windows(cfg, WHO)
      cfg.nope_layers = {}
      for i = 1, cfg.num_hidden_layers do cfg.nope_layers[i] = w ~= nil and not cfg.layer_windows[i] end
   elseif family == "smollm3" then           -- NoPE on every no_rope_layer_interval-th layer (no_rope_layers: 0)
      cfg.qkv_bias, cfg.o_bias = cfg.attention_bias, cfg.attention_bias
      local n = cfg.num_hidden_layers
      local flags = cfg.no_rope_layers
      if flags ~= nil and (type(flags) ~= "table" or #flags ~= n) then
         config.fail(cfg, WHO, 'config key "no_rope_layers" must list %d layers', n)
      end
      local interval = config.integer(cfg, WHO, "no_rope_layer_interval", cfg.no_rope_layer_interval or 4, 1)
      cfg.nope_layers = {}
      for i = 1, n do
         local rope = flags and flags[i] or (i % interval ~= 0 and 1 or 0)
         if rope ~= 0 and rope ~= 1 then config.fail(cfg, WHO, "no_rope_layers[%d] must be 0 or 1, got %s", i, tostring(rope)) end
         cfg.nope_layers[i] = rope == 0
      end
      -- (transformers' default layer types: the NoPE layers slide when use_sliding_window)
      local w = cfg.use_sliding_window == true and window_size(cfg, WHO) or nil
      if cfg.layer_types == nil then
         cfg.layer_types = {}
         for i = 1, n do cfg.layer_types[i] = w and cfg.nope_layers[i] and "sliding_attention" or "full_attention" end
      end
      cfg.max_window_layers = 0
      cfg.layer_windows = qwen2_windows(cfg, WHO)
   elseif family == "cohere_compass_text" then   -- Cohere 2's layers, rotary halves; layer_types (all full by default)
      -- says which slide over sliding_window (4096), and each type rotates by its own rope_parameters entry
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.attention_bias, cfg.attention_bias, false
      if cfg.sliding_window == nil then cfg.sliding_window = 4096 end
      cfg.use_sliding_window, cfg.max_window_layers = true, 0
      if cfg.layer_types == nil then
         cfg.layer_types = {}
         for i = 1, cfg.num_hidden_layers do cfg.layer_types[i] = "full_attention" end
      end
      cfg.layer_windows = qwen2_windows(cfg, WHO)
      ropes_by_layer_type(cfg, WHO)
   elseif family == "cohere" then            -- rotary pairs of neighbouring dims; per-head q/k LayerNorms if asked
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.attention_bias, cfg.attention_bias, false
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
      cfg.rope_pairs_interleaved = true
      if cfg.use_qk_norm ~= nil and type(cfg.use_qk_norm) ~= "boolean" then
         config.fail(cfg, WHO, 'config key "use_qk_norm" must be a boolean, got %s', tostring(cfg.use_qk_norm))
      end
   elseif family == "granite" or family == "granitemoe" or family == "granitemoehybrid" or family == "granitemoeshared"
      or family == "granite_swa" or family == "granitemoe_swa" or family == "hyperclovax" then
      -- (the multipliers below; the MoE families' MLPs are never biased)
      cfg.qkv_bias, cfg.o_bias = cfg.attention_bias, cfg.attention_bias
      if family ~= "granite" and family ~= "granite_swa" and family ~= "hyperclovax" then cfg.mlp_bias = false end
      if family == "granite_swa" or family == "granitemoe_swa" then   -- (per-layer rope bases: models/granite_swa.lua)
         -- layer_types' sliding layers attend over the window; by default the first of every four attends to all
         if cfg.sliding_window == nil then cfg.sliding_window = 128 end
         if cfg.layer_types == nil then
            cfg.layer_types = {}
            for i = 1, cfg.num_hidden_layers do cfg.layer_types[i] = i % 4 == 1 and "full_attention" or "sliding_attention" end
         end
         cfg.use_sliding_window, cfg.max_window_layers = true, 0
         cfg.layer_windows = qwen2_windows(cfg, WHO)
      else
         for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
      end
      if family == "hyperclovax" then        -- (its default scale: 1/sqrt(head_dim), as Llama's)
         if cfg.hidden_size % cfg.num_attention_heads ~= 0 then
            config.fail(cfg, WHO, "hidden_size %d is not a multiple of num_attention_heads %d", cfg.hidden_size,
               cfg.num_attention_heads)
         end
         if cfg.attention_multiplier == nil then cfg.attention_multiplier = 1 / math.sqrt(cfg.head_dim) end
         if cfg.use_post_norm == nil then cfg.use_post_norm = true end
         if type(cfg.use_post_norm) ~= "boolean" then
            config.fail(cfg, WHO, 'config key "use_post_norm" must be a boolean, got %s', tostring(cfg.use_post_norm))
         end
      end
      for _, key in ipairs({ "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling" }) do
         local v = cfg[key] == nil and 1 or cfg[key]
         if type(v) ~= "number" or v <= 0 then
            config.fail(cfg, WHO, 'config key "%s" must be a positive number, got %s', key, tostring(v))
         end
         cfg[key] = v
      end
   elseif family == "bamba" then             -- (layer types: models/bamba.lua)
      cfg.qkv_bias, cfg.o_bias = cfg.attention_bias, cfg.attention_bias
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
   elseif family == "nemotron_h" then        -- (layer types: models/nemotron_h.lua)
      -- transformers' NemotronHAttention: never biased whatever attention_bias says, no position embedding
      cfg.qkv_bias, cfg.o_bias = false, false
      cfg.nope_layers = {}
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i], cfg.nope_layers[i] = false, true end
   elseif family == "falcon_h1" then         -- (its multipliers: models/falcon_h1.lua)
      cfg.qkv_bias, cfg.o_bias = cfg.attention_bias, cfg.attention_bias
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
      cfg.rotary_dim = cfg.head_dim           -- (transformers' FalconH1 rotates whole heads, whatever partial_rotary_factor says)
   elseif family == "jamba" then             -- (layer types: models/jamba.lua)
      -- transformers' Jamba: no biases in attention or MLPs, whatever the config says
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = false, false, false
      cfg.nope_layers = {}
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i], cfg.nope_layers[i] = false, true end
   elseif family == "seed_oss" then          -- biased q/k/v by default; the output's own key
      cfg.qkv_bias, cfg.o_bias = cfg.attention_bias, cfg.attention_out_bias == true
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
   elseif family == "hunyuan_v1_dense" or family == "hunyuan_v1_moe" then   -- (transformers' MLPs: never biased)
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.attention_bias, cfg.attention_bias, false
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
      -- the original code's switches for what transformers' classes have no other form of
      if cfg.use_qk_norm == false then
         config.fail(cfg, WHO, 'config key "use_qk_norm" is false: HunYuan without per-head q/k norms is not supported')
      end
      if cfg.use_cla == true then
         config.fail(cfg, WHO, 'config key "use_cla" is true: cross-layer attention (shared keys and values) is not supported')
      end
   elseif family == "arcee" or family == "apertus" or family == "apertus1p5_text" then   -- Llama's biases; Apertus's
      -- MLP has none, its heads q/k norms
      cfg.qkv_bias, cfg.o_bias = cfg.attention_bias, cfg.attention_bias
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
      if family ~= "arcee" then cfg.mlp_bias, cfg.qk_norm = false, true end
      if family == "apertus1p5_text" then M.check_output_vocab_size(cfg, WHO) end
   elseif family == "hy_v3" then            -- Apertus's per-head q/k norms; mlp_bias on the dense and shared MLPs
      cfg.qkv_bias, cfg.o_bias, cfg.qk_norm = cfg.attention_bias, cfg.attention_bias, true
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
   elseif family == "internlm3" then        -- Llama's layers: one bias setting for q, k, v, o and the MLP
      if cfg.attention_bias ~= cfg.mlp_bias then
         config.fail(cfg, WHO, 'config keys "qkv_bias" (%s) and "bias" (%s) differ: InternLM3 runs as a Llama, '
            .. "one bias setting for every projection", tostring(cfg.attention_bias), tostring(cfg.mlp_bias))
      end
      cfg.qkv_bias, cfg.o_bias = cfg.attention_bias, cfg.attention_bias
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
   elseif family == "phimoe" then            -- biased attention (all four) and head when asked; Mixtral's window
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.attention_bias, cfg.attention_bias, false
      local w = window_size(cfg, WHO)
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = w or false end
      if cfg.lm_head_bias ~= nil and type(cfg.lm_head_bias) ~= "boolean" then
         config.fail(cfg, WHO, 'config key "lm_head_bias" must be a boolean, got %s', tostring(cfg.lm_head_bias))
      end
      local jitter = cfg.router_jitter_noise == nil and 0.01 or cfg.router_jitter_noise
      if type(jitter) ~= "number" or jitter < 0 then
         config.fail(cfg, WHO, 'config key "router_jitter_noise" must be a number >= 0, got %s', tostring(jitter))
      end
      cfg.router_jitter_noise = jitter
      -- transformers' PhiMoE scales cos/sin by short_mscale or long_mscale in place of LongRoPE's own factor
      if rope.rope_type ~= "default" and rope.rope_type ~= "longrope" then
         config.fail(cfg, WHO, 'rope type "%s" is not supported (supported: default, longrope)', rope.rope_type)
      end
      if rope.rope_type == "longrope" then
         for _, k in ipairs({ "short_mscale", "long_mscale" }) do
            if type(rope[k]) ~= "number" or rope[k] <= 0 then
               config.fail(cfg, WHO, 'config key "rope_parameters.%s" must be a positive number with rope type "longrope", got %s',
                  k, tostring(rope[k]))
            end
         end
      end
   elseif family == "minimax_m2" then
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = false, false, false
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
   elseif family == "lfm2" or family == "lfm2_moe" then   -- (its layer types: models/lfm2.lua)
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = false, false, false
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
   elseif family == "qwen3_next" or family == "qwen3_5" or family == "qwen3_5_moe" or family == "olmo_hybrid"
      or family == "lara_mini" then
      -- (layer types: models/qwen3_next.lua, models/olmo_hybrid.lua, models/lara_mini.lua)
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.attention_bias, cfg.attention_bias, false
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
   elseif family == "gpt_oss" then           -- biased projections; sliding and full layers alternate
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.attention_bias, cfg.attention_bias, false
      cfg.use_sliding_window = cfg.sliding_window ~= nil
      if cfg.layer_types == nil then            -- transformers' default: the first of each pair slides
         cfg.layer_types = {}
         for i = 1, cfg.num_hidden_layers do cfg.layer_types[i] = i % 2 == 1 and "sliding_attention" or "full_attention" end
      end
      cfg.layer_windows = qwen2_windows(cfg, WHO)
   elseif family == "afmoe" or family == "laguna" or family == "flint" or family == "mellum" then   -- per-head q/k norms;
      -- of layer_types (models/afmoe.lua, models/laguna.lua, models/flint.lua fill it in) the sliding layers
      -- attend over the window; AFMoE's and Flint's full ones have no position embedding
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.qk_norm = cfg.attention_bias, cfg.attention_bias, false, true
      cfg.use_sliding_window, cfg.max_window_layers = true, 0
      cfg.layer_windows = qwen2_windows(cfg, WHO)
      if family == "afmoe" or family == "flint" then
         cfg.nope_layers = {}
         for i, w in ipairs(cfg.layer_windows) do cfg.nope_layers[i] = not w end
      end
   elseif family == "dory" or family == "zaya" then   -- of layer_types (models/dory.lua, models/zaya.lua fill
      -- it in) the sliding layers attend over the window, every layer rotating (with its own bases)
      cfg.qkv_bias, cfg.o_bias = cfg.attention_bias, cfg.attention_bias
      cfg.use_sliding_window, cfg.max_window_layers = true, 0
      cfg.layer_windows = qwen2_windows(cfg, WHO)
   elseif family == "mimo_v2_flash" then     -- q/k/v biased when asked, never the output; of layer_types
      -- (models/mimo_v2_flash.lua fills it in) the sliding layers attend over the window
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.attention_bias, false, false
      cfg.use_sliding_window, cfg.max_window_layers = true, 0
      cfg.layer_windows = qwen2_windows(cfg, WHO)
   elseif family == "olmo2" or family == "olmoe" or family == "flex_olmo" then
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.attention_bias, cfg.attention_bias, false
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
      M.check_clip_qkv(cfg, family == "olmoe", WHO)
   elseif family == "olmo3" then            -- OLMo 2's, sliding on three layers of every four
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.attention_bias, cfg.attention_bias, false
      if cfg.sliding_window == nil then cfg.sliding_window = 4096 end
      cfg.use_sliding_window = true
      if cfg.layer_types == nil then
         cfg.layer_types = {}
         for i = 1, cfg.num_hidden_layers do cfg.layer_types[i] = i % 4 == 0 and "full_attention" or "sliding_attention" end
      end
      cfg.layer_windows = qwen2_windows(cfg, WHO)
   elseif family == "starcoder2" then
      local bias = cfg.use_bias ~= false
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = bias, bias, bias
      local w = window_size(cfg, WHO)
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = w or false end
   elseif family == "mistral" or family == "ministral3" or family == "phi3" or family == "mixtral" or family == "minimax" then
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = false, false, false
      local w = window_size(cfg, WHO)
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = w or false end
   elseif family == "qwen2" or family == "qwen2_moe" then
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = true, false, false
      cfg.layer_windows = qwen2_windows(cfg, WHO)
   elseif family == "gemma2" or family == "gemma3_text" or family == "vaultgemma" then
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.attention_bias, cfg.attention_bias, false
      -- Gemma 2: every other layer slides (the first does); Gemma 3: all but every
      -- sliding_window_pattern-th; layer_types, when the file has it, says which
      local w = window_size(cfg, WHO)
      cfg.use_sliding_window = w ~= nil
      cfg.max_window_layers = 0
      if cfg.layer_types == nil then
         local alternate = family ~= "gemma3_text"
         local every = alternate and 2 or cfg.sliding_window_pattern or 6
         cfg.layer_types = {}
         for i = 1, cfg.num_hidden_layers do
            local slides = alternate and i % 2 == 1 or not alternate and i % every ~= 0
            cfg.layer_types[i] = slides and "sliding_attention" or "full_attention"
         end
      end
      cfg.layer_windows = qwen2_windows(cfg, WHO)
      if family == "gemma3_text" then cfg.qk_norm = true end
   elseif family == "dots1" then             -- Qwen3's attention; layers from max_window_layers (62) on slide
      -- whenever sliding_window (4096) is set: transformers' Dots1Config has no use_sliding_window
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.attention_bias, cfg.attention_bias, false
      if cfg.sliding_window == nil then cfg.sliding_window = 4096 end
      if cfg.max_window_layers == nil then cfg.max_window_layers = 62 end
      cfg.use_sliding_window = true
      cfg.layer_windows = qwen2_windows(cfg, WHO)
      cfg.qk_norm = true
   elseif family == "longcat_flash" then     -- DeepSeek's latent attention, twice a layer (models/longcat_flash.lua)
      cfg.qkv_bias, cfg.o_bias = cfg.attention_bias, cfg.attention_bias
      for i = 1, cfg.num_hidden_layers do cfg.layer_windows[i] = false end
   else                                        -- qwen3, qwen3_moe
      cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias = cfg.attention_bias, cfg.attention_bias, false
      cfg.layer_windows = qwen2_windows(cfg, WHO)
      cfg.qk_norm = true
   end
   if family == "cohere" or family == "cohere2" or family == "cohere2_moe" or family == "cohere_compass_text" then
      local scale = cfg.logit_scale == nil and (family == "cohere_compass_text" and 1 or 0.0625) or cfg.logit_scale
      if type(scale) ~= "number" or scale <= 0 then
         config.fail(cfg, WHO, 'config key "logit_scale" must be a positive number, got %s', tostring(scale))
      end
      cfg.logit_scale = scale
   end
   cfg.family = family
   return cfg
end

-- --- rotary embeddings ----------------------------------------------------------------------

--- Llama 3.1's frequency bands: wavelengths shorter than original_max / high_freq_factor are
-- kept, longer than original_max / low_freq_factor divided by factor, smoothed in between.
-- Computed per element in float32 steps as transformers does (dim/2 values, once).
function M.llama3_inv_freq(inv_freq, rope)
   local ffi = require("ffi")
   local f32 = ffi.new("float[1]")
   local function r32(x) f32[0] = x; return f32[0] end
   local factor, lo, hi = rope.factor, rope.low_freq_factor, rope.high_freq_factor
   local old = rope.original_max_position_embeddings
   local low_wavelen, high_wavelen = old / lo, old / hi
   local vals = inv_freq:tolist()
   for i, f in ipairs(vals) do
      local wavelen = r32(r32(2 * math.pi) / f)
      local v = f
      if wavelen > low_wavelen then v = r32(f / factor) end
      if not (wavelen < high_wavelen) and not (wavelen > low_wavelen) then
         local smooth = r32(r32(r32(old / wavelen) - lo) / (hi - lo))
         v = r32(r32(r32(1 - smooth) * v / factor) + r32(smooth * v))
      end
      vals[i] = v
   end
   return T.tensor(vals, { dtype = "float32" })
end

-- YaRN's scale factor: the one given, else max / original positions.
local function yarn_factor(cfg, rope)
   return rope.factor or cfg.max_position_embeddings / rope.original_max_position_embeddings
end

--- YaRN's cos/sin scale: attention_factor, else 0.1 * mscale * ln(factor) + 1 (a ratio of two such
-- with mscale and mscale_all_dim), as transformers computes it.
function M.yarn_attention_factor(cfg, rope)
   if rope.attention_factor then return rope.attention_factor end
   local factor = yarn_factor(cfg, rope)
   local function get_mscale(scale, m) if scale <= 1 then return 1 end return 0.1 * (m or 1) * math.log(scale) + 1 end
   if rope.mscale and rope.mscale_all_dim then
      return get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
   end
   return get_mscale(factor)
end

--- YaRN (NTK-by-parts) frequencies: each one blends the original (extrapolated) and the
-- factor-scaled (interpolated) frequency by a linear ramp over the dims whose wavelengths fall
-- between beta_fast and beta_slow rotations in the original context; float32 steps as in
-- transformers. exps: arange(0, dim, 2) / dim in float32.
function M.yarn_inv_freq(cfg, rope, dim, exps)
   local base, factor = rope.rope_theta, yarn_factor(cfg, rope)
   local original = rope.original_max_position_embeddings
   local beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1
   local function correction_dim(rotations)
      return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))
   end
   local low, high = correction_dim(beta_fast), correction_dim(beta_slow)
   if rope.truncate ~= false then low, high = math.floor(low), math.ceil(high) end
   low, high = math.max(low, 0), math.min(high, dim - 1)
   if low == high then high = high + 0.001 end
   local pos_freqs = T.full({ dim / 2 }, base, { dtype = "float32" }):pow(exps)
   local extrapolation = pos_freqs:reciprocal()
   local interpolation = (pos_freqs * factor):reciprocal()
   local ramp = ((T.arange(0, dim / 2, { dtype = "float32" }) - low) / (high - low)):clamp(0, 1)
   local keep = 1 - ramp                                          -- share of the original frequency
   return interpolation * (1 - keep) + extrapolation * keep
end

local LlamaRotaryEmbedding = nn.Module:extend("LlamaRotaryEmbedding")
M.LlamaRotaryEmbedding = LlamaRotaryEmbedding
-- bfloat16 frequencies would turn position 1000 by several degrees off
LlamaRotaryEmbedding.keep_float32_buffers = { inv_freq = true, long_inv_freq = true, local_inv_freq = true }

function LlamaRotaryEmbedding:__init(cfg)
   nn.Module.__init(self)
   local dim = cfg.rotary_dim or cfg.head_dim
   -- inv_freq[i] = 1 / theta^(2i/dim), computed in float32 as transformers does.
   local exps = T.arange(0, dim, 2, { dtype = "float32" }) / dim
   local rope = cfg.rope or { rope_type = "default" }
   local base = cfg.rope_theta
   if rope.rope_type == "ntk_alpha" then base = base * rope.alpha ^ (cfg.head_dim / (cfg.head_dim - 2)) end
   local inv_freq = (T.full({ dim / 2 }, base, { dtype = "float32" }):pow(exps)):reciprocal()
   if rope.rope_type == "linear" then
      inv_freq = inv_freq / rope.factor
   elseif rope.rope_type == "llama3" then
      inv_freq = M.llama3_inv_freq(inv_freq, rope)
   elseif rope.rope_type == "yarn" then
      inv_freq = M.yarn_inv_freq(cfg, rope, dim, exps)
      rawset(self, "attention_scaling", M.yarn_attention_factor(cfg, rope))
   elseif rope.rope_type == "longrope" then
      -- LongRoPE: per-frequency factors, short ones up to the pretraining length and long ones past
      -- it (picked per forward by the highest position, as transformers does), and cos/sin scaled
      -- by sqrt(1 + ln(factor) / ln(original length)), factor = max / original positions.
      local original = rope.original_max_position_embeddings
      local long = inv_freq / T.tensor(rope.long_factor, { dtype = "float32" })
      inv_freq = inv_freq / T.tensor(rope.short_factor, { dtype = "float32" })
      self:register_buffer("long_inv_freq", long, false)
      local factor = rope.factor or cfg.max_position_embeddings / original
      local scale = rope.attention_factor
      if scale == nil then scale = factor <= 1 and 1 or math.sqrt(1 + math.log(factor) / math.log(original)) end
      rawset(self, "original_max", original)
      rawset(self, "attention_scaling", scale)
   end
   self:register_buffer("inv_freq", inv_freq, false)
   rawset(self, "query_scaling", cfg.query_scaling)
end

-- Each position's query scale (M.query_scaling) as a column (..., T, 1) float32.
local function query_scale_column(positions, qs)
   local function scale(p) return 1 + qs.beta * math.log(1 + math.floor(p / qs.original)) end
   local list = positions:tolist()
   for i, row in ipairs(list) do
      if type(row) == "table" then
         for j, p in ipairs(row) do row[j] = scale(p) end
      else
         list[i] = scale(row)
      end
   end
   return T.tensor(list, { dtype = "float32", device = positions.device }):unsqueeze(-1)
end

--- cos, sin (float32) for positions: (T) or (B, T) -> (T, D) or (B, T, D); inv_freq and
-- scaling: other frequencies than the buffer's and their cos/sin scale (the sliding layers' of
-- Gemma 3 and OLMo 3: local_inv_freq, local_scaling). With Llama 4's query scaling, both tables
-- carry each position's query scale as one more column (D + 1), which the attention takes off
-- (M.split_query_scale): it then travels wherever the tables go (block schedules, devices).
function LlamaRotaryEmbedding:forward(positions, inv_freq, scaling)
   scaling = inv_freq and (scaling or 1) or self.attention_scaling
   inv_freq = inv_freq or self.inv_freq
   if self.original_max and positions:max():item() + 1 > self.original_max then inv_freq = self.long_inv_freq end
   local pos = positions:float():unsqueeze(-1)                             -- (..., T, 1)
   local freqs = pos * inv_freq:float()                                     -- (..., T, D/2)
   local emb = T.cat({ freqs, freqs }, -1)                                  -- (..., T, D)
   local cos, sin = emb:cos(), emb:sin()
   if scaling and scaling ~= 1 then cos, sin = cos * scaling, sin * scaling end
   local qs = rawget(self, "query_scaling")
   if qs then
      local column = query_scale_column(positions, qs)
      cos, sin = T.cat({ cos, column }, -1), T.cat({ sin, column }, -1)
   end
   return cos, sin
end

--- For an attention whose config has Llama 4's query scaling: cos, sin (..., T, D + 1) -> the
-- tables (..., T, D) and the queries' scale (..., T, 1) (see LlamaRotaryEmbedding:forward).
function M.split_query_scale(cos, sin)
   local D = cos:size(-1) - 1
   return cos:narrow(-1, 1, D), sin:narrow(-1, 1, D), cos:narrow(-1, D + 1, 1)
end

--- For a model whose sliding layers rotate otherwise than its full ones (cfg.rope_local: Gemma 3's
-- own base, OLMo 3's unscaled): their frequencies as the buffer local_inv_freq, and their scale.
function M.add_local_rotary(rotary, cfg)
   local lcfg = setmetatable({ rope = cfg.rope_local, rope_theta = cfg.rope_local.rope_theta }, { __index = cfg })
   local local_rotary = LlamaRotaryEmbedding(lcfg)
   rotary:register_buffer("local_inv_freq", local_rotary.inv_freq, false)
   rawset(rotary, "local_scaling", local_rotary.attention_scaling or 1)
end

--- layer_rotary for such a model: the sliding layers (cfg.layer_windows) get the local tables.
function M.layer_rotary_by_window(model, positions, x)
   local rotary = model.rotary_emb
   local cos, sin = rotary(positions)
   local lcos, lsin = rotary(positions, rotary.local_inv_freq, rawget(rotary, "local_scaling"))
   local full, sliding = { M.rotary_for(cos, sin, x) }, { M.rotary_for(lcos, lsin, x) }
   local per_layer = {}
   for i, w in ipairs(model.config.layer_windows) do per_layer[i] = w and sliding or full end
   return per_layer
end

-- x * cos + rotate_half(x) * sin, in one kernel; with fewer rotary dims than the head has
-- (cos narrower than x), the rest of the head passes through, as Phi-3's apply_rotary_pos_emb.
local rotary_kernel = nn.functional.rotary_embedding
local function apply_rotary(x, cos, sin)   -- (also M.apply_rotary, for GPT-NeoX)
   local rd, d = cos:size(-1), x:size(-1)
   if rd == d then return rotary_kernel(x, cos, sin) end
   return T.cat({ rotary_kernel(x:narrow(-1, 1, rd), cos, sin), x:narrow(-1, rd + 1, d - rd) }, -1)
end
M.apply_rotary = apply_rotary

-- --- attention, MLP, layer ------------------------------------------------------------------

local LlamaAttention = nn.Module:extend("LlamaAttention")
M.LlamaAttention = LlamaAttention

--- What this layer keeps per cached token and computes per query, for memory planning
-- (utils/runtime_memory.lua): key/value heads, head size, query heads, and whether the scores
-- are formed as a tensor (Gemma 2's soft cap) rather than inside the fused kernel.
function LlamaAttention:kv_cache_heads()
   return self.n_kv_head, self.head_dim, self.n_head, self.softcap ~= nil
end

function LlamaAttention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
   local bias = cfg.qkv_bias
   if bias == nil then bias = cfg.attention_bias end
   local o_bias = cfg.o_bias
   if o_bias == nil then o_bias = cfg.attention_bias end
   self.q_proj = nn.Linear(cfg.hidden_size, H * D, { bias = bias })
   self.k_proj = nn.Linear(cfg.hidden_size, Hkv * D, { bias = bias })
   self.v_proj = nn.Linear(cfg.hidden_size, Hkv * D, { bias = bias })
   self.o_proj = nn.Linear(H * D, cfg.hidden_size, { bias = o_bias })
   if cfg.qk_norm then       -- Qwen3: RMSNorm over each head's dims, before the rotary embedding
      self.q_norm = nn.RMSNorm(D, { eps = cfg.rms_norm_eps })
      self.k_norm = nn.RMSNorm(D, { eps = cfg.rms_norm_eps })
   end
   M.attention_geometry(self, cfg, layer_idx)
end

--- The plain fields an attention module reads in forward (heads, scale, cache slot, window).
function M.attention_geometry(self, cfg, layer_idx)
   local D = cfg.head_dim
   rawset(self, "n_head", cfg.num_attention_heads)
   rawset(self, "n_kv_head", cfg.num_key_value_heads)
   rawset(self, "head_dim", D)
   rawset(self, "scale", 1 / math.sqrt(D))
   rawset(self, "layer_idx", layer_idx)
   rawset(self, "window", cfg.layer_windows and cfg.layer_windows[layer_idx] or nil)   -- false: none
   rawset(self, "query_scaled", cfg.query_scaling ~= nil)
   rawset(self, "pairs_interleaved", cfg.rope_pairs_interleaved == true)   -- rotary pairs (x0, x1), (x2, x3), ...
   rawset(self, "nope", cfg.nope_layers ~= nil and cfg.nope_layers[layer_idx] == true)   -- no position embedding
end

--- x (B, T, hidden); cos, sin (T, D) or (B, 1, T, D); cache optional; pad (B, past + T) or nil.
LlamaAttention.out_name = "o_proj"                 -- the output projection's attribute (Phi: dense)
LlamaAttention.gated_norm_name = nil               -- a norm between the gated heads and it (Dory: attn_sub_norm)

--- q (B, T, H, D), k and v (B, T, Hkv, D) from x (B, T, hidden); a fourth result (B, T, H * D),
-- when a family returns one, gates the attention's output through a sigmoid (Qwen3-Next).
function LlamaAttention:project(x, B, L)
   local H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
   return self.q_proj(x):view(B, L, H, D), self.k_proj(x):view(B, L, Hkv, D), self.v_proj(x):view(B, L, Hkv, D)
end

function LlamaAttention:forward(x, cos, sin, cache, pad)
   local B, L = x:size(1), x:size(2)
   local q, k, v, gate = self:project(x, B, L)
   if self.q_norm and not self.qk_norm_in_project then q, k = self.q_norm(q), self.k_norm(k) end
   q, k, v = q:transpose(2, 3), k:transpose(2, 3), v:transpose(2, 3) -- (B, H, T, D), (B, Hkv, T, D)
   local query_scale
   if self.query_scaled then cos, sin, query_scale = M.split_query_scale(cos, sin) end
   if not self.nope then
      if self.pairs_interleaved then                       -- (ERNIE 4.5, Cohere; GLM-4 over its rotary dims only)
         local rd = cos:size(-1)
         q, k = self:deinterleave(q, rd), self:deinterleave(k, rd)
      end
      q = apply_rotary(q, cos, sin)
      k = apply_rotary(k, cos, sin)
   end
   if self.query_layernorm then q, k = self.query_layernorm(q), self.key_layernorm(k) end   -- (HunYuan's, after rotating)
   if query_scale then q = q * query_scale end
   local past = 0
   if cache then
      past = cache.length
      k, v = cache:update(self.layer_idx, k, v, self.window or nil)
      -- a sliding layer's cache gives the last keys only: the padding mask follows
      local S = k:size(3)
      if pad and S < past + L then pad = pad:narrow(2, past + L - S + 1, S) end
   end
   local y = self:attend_heads(q, k, v, past, pad)
   if gate then y = y * gate:sigmoid() end
   if self.gated_norm_name then y = self[self.gated_norm_name](y) end   -- (Dory's, after the gate)
   return self[self.out_name](y)
end

--- attend (q (B, H, T, D) over k, v), run where the keys are (a cache kept on another device),
-- its output back on the queries' device with the heads side by side: (B, T, H * D).
function LlamaAttention:attend_heads(q, k, v, past, pad)
   local qa, pa, back = common.queries_to_keys(q, k, pad)
   local y = self:attend(qa, k, v, past, pa)                       -- (B, H, T, D)
   if back then y = y:to(back) end
   local B, H, L, D = y:size(1), y:size(2), y:size(3), y:size(4)
   return y:transpose(2, 3):reshape(B, L, H * D)
end

-- Rotary pairs of neighbouring dims turned into rotate_half's (models/common.lua).
LlamaAttention.deinterleave = common.deinterleave

--- softmax(q k^T * scale + causal/window/padding mask) v; Gemma 2 caps the scores first.
function LlamaAttention:attend(q, k, v, past, pad)
   return common.gqa_attention(q, k, v, past, self.scale, pad, self.window or nil)
end

local LlamaMLP = nn.Module:extend("LlamaMLP")
M.LlamaMLP = LlamaMLP

function LlamaMLP:__init(cfg)
   nn.Module.__init(self)
   local bias = cfg.mlp_bias
   self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, { bias = bias })
   self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, { bias = bias })
   self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, { bias = bias })
   self.act_fn = common.activation_module(cfg.hidden_act, WHO, cfg._source)
end

function LlamaMLP:forward(x)
   return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
end

local LlamaDecoderLayer = nn.Module:extend("LlamaDecoderLayer")
M.LlamaDecoderLayer = LlamaDecoderLayer

LlamaDecoderLayer.Attention, LlamaDecoderLayer.MLP = LlamaAttention, LlamaMLP   -- a family's own
LlamaDecoderLayer.mlp_name = "mlp"                -- Mixtral: block_sparse_moe
LlamaDecoderLayer.Norm = nn.RMSNorm                -- StarCoder2: LayerNorm

function LlamaDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.self_attn = self.Attention(cfg, layer_idx)
   self[self.mlp_name] = self.MLP(cfg, layer_idx)   -- the layer index: a MoE family picks dense or sparse by it
   self.input_layernorm = self.Norm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.post_attention_layernorm = self.Norm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
end

function LlamaDecoderLayer:forward(x, cos, sin, cache, pad)
   x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pad)
   return x + self[self.mlp_name](self.post_attention_layernorm(x))
end

-- --- models ---------------------------------------------------------------------------------

local LlamaModel = nn.Module:extend("LlamaModel")
M.LlamaModel = LlamaModel

LlamaModel.family, LlamaModel.Layer, LlamaModel.Rotary = "llama", LlamaDecoderLayer, LlamaRotaryEmbedding
LlamaModel.Norm, LlamaModel.norm_name = nn.RMSNorm, "norm"   -- the final norm (Phi: final_layernorm)
-- the token embedding and the layer list, by name: models of rotary layers with other names
-- (GPT-NeoX, Falcon, GPT-J) extend LlamaModel for its forward
LlamaModel.embed_name, LlamaModel.layers_name = "embed_tokens", "layers"

--- For the families that extend LlamaModel: the embedding (vocab x dim), n layers made by
-- layer(cfg, i), the final norm and the rotary table, under this class's names (embed_name,
-- layers_name, norm_name), in that order (their module order, as the checkpoints list them).
function LlamaModel:build_parts(cfg, dim, layer, n, norm, Rotary)
   nn.Module.__init(self)
   self[self.embed_name] = nn.Embedding(cfg.vocab_size, dim)
   local layers = {}
   for i = 1, n do layers[i] = layer(cfg, i) end
   self[self.layers_name] = nn.ModuleList(layers)
   self[self.norm_name] = norm
   self.rotary_emb = Rotary(cfg)
   rawset(self, "config", cfg)
end

function LlamaModel:__init(cfg)
   nn.Module.__init(self)
   if type(cfg) ~= "table" or cfg._source == nil then cfg = M.config(cfg, self.family) end
   self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
   local layers = {}
   for i = 1, cfg.num_hidden_layers do layers[i] = self.Layer(cfg, i) end
   self.layers = nn.ModuleList(layers)
   self.norm = self.Norm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.rotary_emb = self.Rotary(cfg)
   rawset(self, "config", cfg)
end

--- input_ids (B, T) int64; cache optional; pad (B, past + T) bool or nil; pos (B, T) int64
-- or nil (positions past .. past+T-1); blocks {micro_batch_size, prefill_chunk_size} or nil (see
-- models/block_schedule.lua). Returns the final hidden states (B, T, hidden).
function LlamaModel:forward(input_ids, cache, pad, pos, blocks)
   local cfg = self.config
   local L = input_ids:size(2)
   local past = cache and cache.length or 0
   local x = self[self.embed_name](input_ids)
   if self.embed_scale then x = x * self:embed_scale() end       -- Gemma: sqrt(hidden_size)
   if self.norms_embeddings then x = self[self.norm_name](x) end  -- NanoChat: its final norm on the embeddings too
   local rope = self:layer_rotary(pos or T.arange(past, past + L, { device = input_ids.device }), x)
   local n = cfg.num_hidden_layers
   local schedule = blocks and block_schedule.plan(blocks, x, cache, n, WHO, self.blocks_need_cache)
   for i = 1, n do
      local r = rope[i] or rope[1]
      x = block_schedule.call(schedule, i, self[self.layers_name][i], x, cache, pad, r[1], r[2])
   end
   if cache then cache:advance(L) end
   return self[self.norm_name](x)
end

--- cos and sin as x's dtype and device, (T, D) or (B, 1, T, D) for positions (T) or (B, T).
function M.rotary_for(cos, sin, x)
   if cos:dim() == 3 then cos, sin = cos:unsqueeze(2), sin:unsqueeze(2) end  -- (B, 1, T, D)
   if cos.dtype ~= x.dtype then cos, sin = cos:to(x.dtype), sin:to(x.dtype) end
   if cos.device ~= x.device then cos, sin = cos:to(x.device), sin:to(x.device) end
   return cos, sin
end

--- The rotary cos and sin each layer uses: {[1] = {cos, sin}} shared by all layers here;
-- Gemma 3 gives its sliding layers their own. A model without a rotary table (Mamba's, Jamba's,
-- Nemotron-H's) gives {{}}: its layers are called without them.
function LlamaModel:layer_rotary(positions, x)
   if not self.rotary_emb then return { {} } end
   local cos, sin = self.rotary_emb(positions)
   cos, sin = M.rotary_for(cos, sin, x)
   return { { cos, sin } }
end

local LlamaForCausalLM = nn.Module:extend("LlamaForCausalLM")
M.LlamaForCausalLM = LlamaForCausalLM

LlamaForCausalLM.base_model_prefix = "model"
LlamaForCausalLM.tied_weights = { ["lm_head.weight"] = "model.embed_tokens.weight" }
LlamaForCausalLM.ignore_unexpected = { "rotary_emb%.inv_freq$" }
LlamaForCausalLM.no_split_modules = { "LlamaDecoderLayer" }
LlamaForCausalLM.family, LlamaForCausalLM.Model = "llama", LlamaModel

--- LlamaForCausalLM(config): config is a config.json path, a folder holding one, or a table.
function LlamaForCausalLM:__init(cfg)
   nn.Module.__init(self)
   cfg = self:read_config(cfg)
   self.model = self.Model(cfg)
   self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
   self:tie_weights()
end

--- The checked config of this class's family (a subclass with more keys reads its own).
function LlamaForCausalLM:read_config(source)
   return M.config(source, self.family)
end

function LlamaForCausalLM:tie_weights()
   if self.config.tie_word_embeddings then
      self.lm_head.weight = self.model.embed_tokens.weight
   end
end

--- forward(input_ids[, {cache, attention_mask, position_ids, logits_to_keep}]) -> logits (B, T, vocab),
-- or (B, n, vocab) for the last n positions only when logits_to_keep = n (generate asks for 1).
-- attention_mask (B, past + T), 1 = token, 0 = padding; position_ids (B, T) default to
-- past .. past+T-1 (generate derives them from the mask, as transformers does).
LlamaForCausalLM.forward = common.causal_lm_forward(WHO .. ".forward", "model", "embed_tokens")

function LlamaForCausalLM:new_cache(capacity, device, dtype)
   return common.new_cache(self.config.num_hidden_layers, capacity, device, dtype)
end

function LlamaForCausalLM:max_length()
   return nil  -- rotary embeddings have no hard limit
end

--- With LongRoPE, the length at which generate rebuilds its cache: one past the original context,
-- where the rotary factors switch from short to long (transformers' Phi-3 does the same).
function LlamaForCausalLM:recompute_cache_at()
   local rope = self.config.rope
   if rope and rope.rope_type == "longrope" then return rope.original_max_position_embeddings + 1 end
   return nil
end

LlamaForCausalLM.generate = generation.generate

function M.from_config(cfg) return LlamaForCausalLM(cfg) end

-- --- Mistral and Qwen2 ------------------------------------------------------------------------

-- The family's classes: Llama's, renamed (no_split_module_classes and printed trees use the names
-- transformers gives them) and reading the family's config.
local function family_classes(family, BaseLayer)
   local f = FAMILIES[family]
   local p = f.prefix
   local Attention = LlamaAttention:extend(p .. "Attention")
   local MLP = LlamaMLP:extend(p .. "MLP")
   local Layer = (BaseLayer or LlamaDecoderLayer):extend(p .. "DecoderLayer")
   Layer.Attention, Layer.MLP = Attention, MLP
   local Rotary = LlamaRotaryEmbedding:extend(p .. "RotaryEmbedding")
   local Model = LlamaModel:extend(p .. "Model")
   Model.family, Model.Layer, Model.Rotary = family, Layer, Rotary
   local LM = LlamaForCausalLM:extend(p .. "ForCausalLM")
   LM.family, LM.Model = family, Model
   LM.no_split_modules = { p .. "DecoderLayer" }
   LM.forward = common.causal_lm_forward(f.who .. ".forward", "model", "embed_tokens")
   M[p .. "Attention"], M[p .. "MLP"], M[p .. "DecoderLayer"] = Attention, MLP, Layer
   M[p .. "RotaryEmbedding"], M[p .. "Model"], M[p .. "ForCausalLM"] = Rotary, Model, LM
end
family_classes("mistral")
family_classes("ministral3")     -- Ministral 3: Mistral's layers with Llama 4's query scaling
family_classes("qwen2")
family_classes("qwen3")
family_classes("phi3")
family_classes("starcoder2")
family_classes("seed_oss")       -- Seed-OSS-36B: Llama's layers, q/k/v biased, attention_out_bias apart
family_classes("smollm3")        -- SmolLM3: Llama's layers, NoPE on every 4th
family_classes("hunyuan_v1_dense")   -- Hunyuan-7B: Llama's layers, per-head q/k norms after the rotary embedding
family_classes("internlm3")      -- InternLM3: Llama's layers (transformers builds a LlamaForCausalLM), "dynamic" rope
family_classes("arcee")          -- Arcee (AFM-4.5B): Llama's layers, an MLP without a gate (ReLU^2)
family_classes("apertus")        -- Apertus: per-head q/k norms, its own norms' names, an MLP without a gate (xIELU)
family_classes("iquestcoder")    -- IQuest-Coder-V1: Llama's layers (transformers builds a LlamaForCausalLM)
family_classes("cwm")            -- CWM: Llama's layers, Qwen2's sliding attention without biases
family_classes("olmo2")
family_classes("olmo3")

-- Multimodal checkpoints whose language model is one of these families load it alone (text in,
-- text out; the vision tower and projector left out): Mistral 3 (model_type mistral3: Mistral Small
-- 3.1/3.2, Magistral, Devstral; a mistral text_config, llava's names) and Qwen3-VL (qwen3_vl:
-- Qwen3's layers; its multimodal rotary embedding is the plain one for text).
local function reads_multimodal(LM, multimodal, ignore)
   LM.checkpoint_renames = config.LANGUAGE_MODEL_RENAMES
   LM.ignore_unexpected = { "rotary_emb%.inv_freq$", unpack(ignore) }
   function LM:read_config(source)
      return config.read_text_config(source, FAMILIES[self.family].who, { [multimodal] = true },
         function(src) return M.config(src, self.family) end)
   end
end
--- A Mistral 3 folder's tensors outside its language model.
M.MISTRAL3_VISION = { "^vision_tower%.", "^multi_modal_projector%.", "^model%.vision_tower%.",
   "^model%.multi_modal_projector%." }
reads_multimodal(M.MistralForCausalLM, "mistral3", M.MISTRAL3_VISION)
reads_multimodal(M.Qwen3ForCausalLM, "qwen3_vl", { "^model%.visual%." })

-- OLMo 2: RMSNorms over the whole query and key projections (before the heads are split), and
-- norms after attention and MLP instead of before.
local Olmo2Attention, Olmo2DecoderLayer = M.Olmo2Attention, M.Olmo2DecoderLayer

function Olmo2Attention:__init(cfg, layer_idx)
   LlamaAttention.__init(self, cfg, layer_idx)
   self.q_norm = nn.RMSNorm(cfg.num_attention_heads * cfg.head_dim, { eps = cfg.rms_norm_eps })
   self.k_norm = nn.RMSNorm(cfg.num_key_value_heads * cfg.head_dim, { eps = cfg.rms_norm_eps })
   rawset(self, "qk_norm_in_project", true)
end

function Olmo2Attention:project(x, B, L)
   local H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
   return self.q_norm(self.q_proj(x)):view(B, L, H, D), self.k_norm(self.k_proj(x)):view(B, L, Hkv, D),
      self.v_proj(x):view(B, L, Hkv, D)
end

function Olmo2DecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.self_attn = self.Attention(cfg, layer_idx)
   self.mlp = self.MLP(cfg, layer_idx)
   self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.post_feedforward_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
end

function Olmo2DecoderLayer:forward(x, cos, sin, cache, pad)
   x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, cache, pad))
   return x + self.post_feedforward_layernorm(self.mlp(x))
end

-- EXAONE 4 (model_type exaone4: EXAONE-4.0-1.2B and -32B): OLMo 2's norms after attention and MLP,
-- Qwen3's per-head q/k norms before the rotary embedding; with a sliding window, three layers of
-- every sliding_window_pattern slide and rotate, and the others attend to everything without any
-- position embedding (NoPE).
family_classes("exaone4", Olmo2DecoderLayer)

-- HunYuan (Hunyuan-7B, and Hunyuan-A13B's attention: models/hunyuan.lua): RMSNorms over each query
-- and key head, applied after the rotary embedding (LlamaAttention:forward), under its own names.
function M.HunYuanDenseV1Attention:__init(cfg, layer_idx)
   LlamaAttention.__init(self, cfg, layer_idx)
   self.query_layernorm = nn.RMSNorm(cfg.head_dim, { eps = cfg.rms_norm_eps })
   self.key_layernorm = nn.RMSNorm(cfg.head_dim, { eps = cfg.rms_norm_eps })
end

-- Cohere (Command R, R+) and Cohere 2 (Command R7B, Command A): LayerNorms without biases, one
-- before a parallel block whose attention and MLP both read it and join the residual together;
-- logits times logit_scale. Cohere 2's full layers have no position embedding (the config's nope_layers).
local CohereLayerNorm = nn.LayerNorm:extend("CohereLayerNorm")
M.CohereLayerNorm = CohereLayerNorm

function CohereLayerNorm:__init(shape, opts)
   nn.LayerNorm.__init(self, shape, { eps = opts and opts.eps, bias = false })
end

--- Over the last dim only: the q/k norms' weight is (heads, head_dim), a weight per head.
function CohereLayerNorm:forward(x)
   local shape = self.normalized_shape
   if #shape == 1 then return nn.LayerNorm.forward(self, x) end
   return nn.functional.layer_norm(x, { shape[#shape] }, nil, nil, self.eps) * self.weight
end

family_classes("cohere")
local CohereDecoderLayer = M.CohereDecoderLayer
CohereDecoderLayer.Norm, M.CohereModel.Norm = CohereLayerNorm, CohereLayerNorm

function M.CohereAttention:__init(cfg, layer_idx)
   LlamaAttention.__init(self, cfg, layer_idx)
   if cfg.use_qk_norm then        -- (on (B, T, heads, head_dim), before the rotary embedding)
      self.q_norm = CohereLayerNorm({ cfg.num_attention_heads, cfg.head_dim }, { eps = cfg.rms_norm_eps })
      self.k_norm = CohereLayerNorm({ cfg.num_key_value_heads, cfg.head_dim }, { eps = cfg.rms_norm_eps })
   end
end

function CohereDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.self_attn = self.Attention(cfg, layer_idx)
   self.mlp = self.MLP(cfg, layer_idx)
   self.input_layernorm = self.Norm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
end

--- A parallel block (Cohere's, Phi's: models/phi.lua): attention and MLP both read the one input
-- norm's output and join the residual together.
function M.parallel_layer_forward(self, x, cos, sin, cache, pad)
   local h = self.input_layernorm(x)
   return x + self.self_attn(h, cos, sin, cache, pad) + self.mlp(h)
end
CohereDecoderLayer.forward = M.parallel_layer_forward

family_classes("cohere2", CohereDecoderLayer)
M.Cohere2Model.Norm = CohereLayerNorm

--- The LM's forward with the logits rescaled by scale(logits, config) (hidden states, when asked,
-- as they are): Cohere's and Granite's.
function M.scaled_logits_forward(who, scale)
   local lm_forward = common.causal_lm_forward(who .. ".forward", "model", "embed_tokens")
   return function(self, input_ids, opts)
      local out = lm_forward(self, input_ids, opts)
      if opts and opts.output_hidden_states then return out end
      return scale(out, self.config)
   end
end
local function times_logit_scale(logits, cfg) return logits * cfg.logit_scale end
M.CohereForCausalLM.forward = M.scaled_logits_forward(FAMILIES.cohere.who, times_logit_scale)
M.Cohere2ForCausalLM.forward = M.scaled_logits_forward(FAMILIES.cohere2.who, times_logit_scale)

-- Cohere Compass (model_type cohere_compass_text; cohere_compass: CohereLabs/North-Micro-Vision-Instruct,
-- its language model alone, the Qwen3-VL vision tower left out): Cohere 2's parallel block rotating
-- halves of each head, each layer type by a rope of its own or not at all; its multimodal rope
-- (mrope_section) is the plain one for text; logits times logit_scale (1 without one).
family_classes("cohere_compass_text", CohereDecoderLayer)
M.CohereCompassModel.Norm = CohereLayerNorm

function M.CohereCompassRotaryEmbedding:__init(cfg)
   LlamaRotaryEmbedding.__init(self, cfg)
   if cfg.rope_local then M.add_local_rotary(self, cfg) end
end

--- The sliding layers' tables apart where the two types rotate otherwise (M.layer_rotary_by_window).
function M.CohereCompassModel:layer_rotary(positions, x)
   if not self.config.rope_local then return LlamaModel.layer_rotary(self, positions, x) end
   return M.layer_rotary_by_window(self, positions, x)
end

M.CohereCompassForCausalLM.forward = M.scaled_logits_forward(FAMILIES.cohere_compass_text.who, times_logit_scale)
reads_multimodal(M.CohereCompassForCausalLM, "cohere_compass", { "^model%.visual%." })

-- Granite (granite-3.x; GraniteMoE's attention and layer too: models/moe.lua): Llama's layers with
-- the embeddings times embedding_multiplier, each block's output times residual_multiplier, the
-- attention's scores times attention_multiplier (in place of 1/sqrt(head_dim)), and the logits
-- divided by logits_scaling.
family_classes("granite")

function M.GraniteAttention:__init(cfg, layer_idx)
   LlamaAttention.__init(self, cfg, layer_idx)
   rawset(self, "scale", cfg.attention_multiplier)
end

function M.GraniteDecoderLayer:__init(cfg, layer_idx)
   LlamaDecoderLayer.__init(self, cfg, layer_idx)
   rawset(self, "residual_multiplier", cfg.residual_multiplier)
end

function M.GraniteDecoderLayer:forward(x, cos, sin, cache, pad)
   local r = self.residual_multiplier
   x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pad) * r
   return x + self[self.mlp_name](self.post_attention_layernorm(x)) * r
end

function M.GraniteModel:embed_scale() return self.config.embedding_multiplier end

--- Granite's logits: divided by logits_scaling.
function M.granite_logits(logits, cfg) return logits / cfg.logits_scaling end
M.GraniteForCausalLM.forward = M.scaled_logits_forward(FAMILIES.granite.who, M.granite_logits)

-- HyperCLOVA X (model_type hyperclovax: HyperCLOVAX-SEED-Think-14B): Granite's layers with an RMSNorm
-- after the attention and after the MLP as well, before the residual multiplier (post_norm1,
-- post_norm2: Peri-LN, when use_post_norm), and the logits multiplied by logits_scaling where
-- Granite divides.
family_classes("hyperclovax", M.GraniteDecoderLayer)
M.HyperCLOVAXAttention.__init = M.GraniteAttention.__init
M.HyperCLOVAXModel.embed_scale = M.GraniteModel.embed_scale

function M.HyperCLOVAXDecoderLayer:__init(cfg, layer_idx)
   M.GraniteDecoderLayer.__init(self, cfg, layer_idx)
   if cfg.use_post_norm then
      self.post_norm1 = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
      self.post_norm2 = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   end
end

function M.HyperCLOVAXDecoderLayer:forward(x, cos, sin, cache, pad)
   local r = self.residual_multiplier
   local h = self.self_attn(self.input_layernorm(x), cos, sin, cache, pad)
   if self.post_norm1 then h = self.post_norm1(h) end
   x = x + h * r
   h = self.mlp(self.post_attention_layernorm(x))
   if self.post_norm2 then h = self.post_norm2(h) end
   return x + h * r
end

M.HyperCLOVAXForCausalLM.forward = M.scaled_logits_forward(FAMILIES.hyperclovax.who,
   function(logits, cfg) return logits * cfg.logits_scaling end)

-- OLMo 3: OLMo 2's layers, sliding on three layers of every four, which rotate unscaled.
local Olmo3Attention, Olmo3DecoderLayer = M.Olmo3Attention, M.Olmo3DecoderLayer
Olmo3Attention.__init, Olmo3Attention.project = Olmo2Attention.__init, Olmo2Attention.project
Olmo3DecoderLayer.__init, Olmo3DecoderLayer.forward = Olmo2DecoderLayer.__init, Olmo2DecoderLayer.forward

function M.Olmo3RotaryEmbedding:__init(cfg)
   LlamaRotaryEmbedding.__init(self, cfg)
   M.add_local_rotary(self, cfg)
end

M.Olmo3Model.layer_rotary = M.layer_rotary_by_window

-- StarCoder2: LayerNorms (with biases) in place of RMSNorms, and a c_fc / c_proj MLP.
local Starcoder2MLP = M.Starcoder2MLP

function Starcoder2MLP:__init(cfg)
   nn.Module.__init(self)
   self.c_fc = nn.Linear(cfg.hidden_size, cfg.intermediate_size, { bias = cfg.mlp_bias })
   self.c_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, { bias = cfg.mlp_bias })
   self.act = common.activation_module(cfg.hidden_act, FAMILIES.starcoder2.who, cfg._source)
end

function Starcoder2MLP:forward(x) return self.c_proj(self.act(self.c_fc(x))) end

M.Starcoder2DecoderLayer.Norm, M.Starcoder2Model.Norm = nn.LayerNorm, nn.LayerNorm

-- Phi-3's fused projections, under its own parameter names: self_attn.{o_proj, qkv_proj} (q, k,
-- v side by side in that order) and mlp.{gate_up_proj (gate, then up), down_proj}.
local Phi3Attention, Phi3MLP = M.Phi3Attention, M.Phi3MLP

function Phi3Attention:__init(cfg, layer_idx)
   nn.Module.__init(self)
   local H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
   self.o_proj = nn.Linear(H * D, cfg.hidden_size, { bias = false })
   self.qkv_proj = nn.Linear(cfg.hidden_size, (H + 2 * Hkv) * D, { bias = false })
   M.attention_geometry(self, cfg, layer_idx)
end

function Phi3Attention:project(x, B, L)
   local H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
   local qkv = self.qkv_proj(x)
   return qkv:narrow(3, 1, H * D):reshape(B, L, H, D), qkv:narrow(3, H * D + 1, Hkv * D):reshape(B, L, Hkv, D),
      qkv:narrow(3, (H + Hkv) * D + 1, Hkv * D):reshape(B, L, Hkv, D)
end

function Phi3MLP:__init(cfg)
   nn.Module.__init(self)
   self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, { bias = false })
   self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, { bias = false })
   self.act_fn = common.activation_module(cfg.hidden_act, FAMILIES.phi3.who, cfg._source)
   rawset(self, "intermediate", cfg.intermediate_size)
end

function Phi3MLP:forward(x)
   local gate_up, I = self.gate_up_proj(x), self.intermediate
   return self.down_proj(self.act_fn(gate_up:narrow(-1, 1, I)) * gate_up:narrow(-1, I + 1, I))
end

-- GLM-4 (GLM-4-9B-0414, GLM-Z1): Phi-3's fused gate_up_proj MLP, and a norm after attention and
-- after the MLP as well as before each.
family_classes("glm4")
local Glm4DecoderLayer = M.Glm4DecoderLayer
M.Glm4MLP.__init, M.Glm4MLP.forward = M.Phi3MLP.__init, M.Phi3MLP.forward

function Glm4DecoderLayer:__init(cfg, layer_idx)
   LlamaDecoderLayer.__init(self, cfg, layer_idx)
   self.post_self_attn_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.post_mlp_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
end

function Glm4DecoderLayer:forward(x, cos, sin, cache, pad)
   x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache, pad))
   return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))
end

-- GLM-4.1V (model_type glm4v: GLM-4.1V-9B) loads its language model alone: GLM-4's layers with
-- transformers' defaults for its text config (the whole head rotated unless partial_rotary_factor
-- says otherwise, head_dim hidden_size / heads). Its multimodal rotary embedding (mrope_section)
-- gives every section the same positions for text, so it is GLM-4's: the same inv_freq, each
-- frequency repeated over a pair of neighbouring dims.
family_classes("glm4v", Glm4DecoderLayer)
M.Glm4vMLP.__init, M.Glm4vMLP.forward = M.Phi3MLP.__init, M.Phi3MLP.forward
reads_multimodal(M.Glm4vForCausalLM, "glm4v", { "^model%.visual%." })

-- InternLM3's "dynamic" rope (transformers' Llama's): up to max_position_embeddings the plain
-- frequencies; past it, the base times (factor x length / max_position_embeddings - (factor - 1))
-- ^ (d / (d - 2)), the length being the highest position + 1 of each forward. (transformers keeps
-- the frequencies of the longest length seen until a forward falls back within the limit; here each
-- forward's own length decides, which is the same while a generation grows.)
local InternLM3RotaryEmbedding = M.InternLM3RotaryEmbedding

function InternLM3RotaryEmbedding:__init(cfg)
   LlamaRotaryEmbedding.__init(self, cfg)
   if cfg.rope.rope_type == "dynamic" then
      rawset(self, "dynamic", { theta = cfg.rope_theta, factor = cfg.rope.factor, dim = cfg.rotary_dim,
         limit = cfg.max_position_embeddings })
   end
end

function InternLM3RotaryEmbedding:forward(positions)
   local d = rawget(self, "dynamic")
   local length = d and positions:max():item() + 1
   if not d or length <= d.limit then return LlamaRotaryEmbedding.forward(self, positions) end
   local base = d.theta * ((d.factor * length / d.limit) - (d.factor - 1)) ^ (d.dim / (d.dim - 2))
   local exps = T.arange(0, d.dim, 2, { dtype = "float32" }) / d.dim
   local inv_freq = T.full({ d.dim / 2 }, base, { dtype = "float32" }):pow(exps):reciprocal()
   if inv_freq.device ~= positions.device then inv_freq = inv_freq:to(positions.device) end
   return LlamaRotaryEmbedding.forward(self, positions, inv_freq, 1)
end

-- Arcee and Apertus: an MLP without a gate (transformers' NemotronMLP): down(act(up x)), act ReLU^2
-- (Arcee's relu2) or xIELU with its learned parameters (Apertus's xielu, mlp.act_fn.{alpha_p,
-- alpha_n, beta, eps}).
function M.ArceeMLP:__init(cfg)
   nn.Module.__init(self)
   self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, { bias = cfg.mlp_bias })
   self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, { bias = cfg.mlp_bias })
   self.act_fn = common.activation_module(cfg.hidden_act, FAMILIES[cfg.family].who, cfg._source)
end

function M.ArceeMLP:forward(x) return self.down_proj(self.act_fn(self.up_proj(x))) end

M.ApertusMLP.__init, M.ApertusMLP.forward = M.ArceeMLP.__init, M.ArceeMLP.forward

-- Apertus's layer: Llama's pre-norms under other names, attention_layernorm and feedforward_layernorm.
function M.ApertusDecoderLayer:__init(cfg, layer_idx)
   nn.Module.__init(self)
   self.self_attn = self.Attention(cfg, layer_idx)
   self.mlp = self.MLP(cfg, layer_idx)
   self.attention_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
   self.feedforward_layernorm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
end

function M.ApertusDecoderLayer:forward(x, cos, sin, cache, pad)
   x = x + self.self_attn(self.attention_layernorm(x), cos, sin, cache, pad)
   return x + self.mlp(self.feedforward_layernorm(x))
end

-- Apertus 1.5 (model_type apertus1p5_text; apertus1p5: swiss-ai/Apertus-v1.5-8B, its language model
-- alone, the image and audio tokenizers left out): Apertus's layers over a vocabulary that holds the
-- visual and audio codes, the head pruned to the first output_vocab_size ids.
family_classes("apertus1p5_text", M.ApertusDecoderLayer)
M.Apertus1p5TextMLP.__init, M.Apertus1p5TextMLP.forward = M.ArceeMLP.__init, M.ArceeMLP.forward

function M.Apertus1p5TextForCausalLM:__init(cfg)
   nn.Module.__init(self)
   cfg = self:read_config(cfg)
   self.model = self.Model(cfg)
   self.lm_head = nn.Linear(cfg.hidden_size, cfg.output_vocab_size or cfg.vocab_size, { bias = false })
   rawset(self, "config", cfg)
   self:tie_weights()
end

reads_multimodal(M.Apertus1p5TextForCausalLM, "apertus1p5", { "^model%.vision_tokenizer%.", "^model%.audio_tokenizer%." })


-- Ministral (Ministral-8B-Instruct-2410): Mistral's layers, layer_types naming the ones that slide.
family_classes("ministral")

-- Helium (kyutai's Helium-1): Llama's layers with rotary pairs of neighbouring dims, the output
-- projection never biased.
family_classes("helium")

-- GLM (THUDM's glm-4-9b-chat-hf and its siblings): GLM-4's attention (biased q/k/v, half of each
-- head rotated in neighbouring pairs) and fused gate_up_proj MLP, in Llama's pre-norm layers.
family_classes("glm")
M.GlmMLP.__init, M.GlmMLP.forward = M.Phi3MLP.__init, M.Phi3MLP.forward

-- OLMo (OLMo-1B-hf, OLMo-7B-hf, OLMo-1.7): Llama's layers with LayerNorms that have neither weight
-- nor bias (eps 1e-5, whatever the config says), and q, k and v clipped to +-clip_qkv when set.
family_classes("olmo")
local OlmoLayerNorm = nn.LayerNorm:extend("OlmoLayerNorm")
M.OlmoLayerNorm = OlmoLayerNorm

function OlmoLayerNorm:__init(dim)
   nn.LayerNorm.__init(self, dim, { eps = 1e-5, elementwise_affine = false })
end

M.OlmoDecoderLayer.Norm, M.OlmoModel.Norm = OlmoLayerNorm, OlmoLayerNorm

function M.OlmoAttention:__init(cfg, layer_idx)
   LlamaAttention.__init(self, cfg, layer_idx)
   rawset(self, "clip_qkv", cfg.clip_qkv)
end

function M.OlmoAttention:project(x, B, L)
   return M.clip_projections(self, LlamaAttention.project(self, x, B, L))
end

-- EXAONE 3.0 and 3.5 (LGAI-EXAONE): Llama's layers (transformers builds a LlamaForCausalLM) under
-- the hub's GPT-2-like names, renamed as transformers' conversion mapping renames them.
family_classes("exaone")
M.ExaoneForCausalLM.checkpoint_renames = { { "^transformer%.wte%.", "model.embed_tokens." },
   { "^transformer%.h%.", "model.layers." }, { "^transformer%.ln_f%.", "model.norm." },
   { "%.attn%.attention%.", ".self_attn." }, { "%.self_attn%.out_proj%.", ".self_attn.o_proj." },
   { "%.ln_1%.", ".input_layernorm." }, { "%.ln_2%.", ".post_attention_layernorm." },
   { "%.mlp%.c_fc_0%.", ".mlp.gate_proj." }, { "%.mlp%.c_fc_1%.", ".mlp.up_proj." },
   { "%.mlp%.c_proj%.", ".mlp.down_proj." } }

-- Nemotron (Nemotron-4, Minitron): LayerNorms whose weight is stored minus one ("1P"), half of each
-- head rotated, an MLP without a gate through ReLU² (Arcee's), biases as the config says.
family_classes("nemotron")
local NemotronLayerNorm1P = nn.LayerNorm:extend("NemotronLayerNorm1P")
M.NemotronLayerNorm1P = NemotronLayerNorm1P

function NemotronLayerNorm1P:forward(x)
   return nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)
end

M.NemotronDecoderLayer.Norm, M.NemotronModel.Norm = NemotronLayerNorm1P, NemotronLayerNorm1P
M.NemotronMLP.__init, M.NemotronMLP.forward = M.ArceeMLP.__init, M.ArceeMLP.forward

-- Jais-2 (Jais-2-8B-Chat): Llama's layers with LayerNorms (biased) in place of RMSNorms, biases on
-- attention and MLP, and Nemotron's MLP without a gate (ReLU²).
family_classes("jais2")
M.Jais2DecoderLayer.Norm, M.Jais2Model.Norm = nn.LayerNorm, nn.LayerNorm
M.Jais2MLP.__init, M.Jais2MLP.forward = M.ArceeMLP.__init, M.ArceeMLP.forward

-- BitNet b1.58 (bitnet-b1.58-2B-4T-bf16): Llama's layers with an RMSNorm over the attention's heads
-- before o_proj (attn_sub_norm) and one over the gated MLP's product before down_proj (ffn_sub_norm),
-- ReLU² as the gate's activation. (The packed ternary checkpoint, quantization_config quant_method
-- "bitnet", is refused by quantize.apply_config: its layers quantize their inputs to int8 as well.)
family_classes("bitnet")

function M.BitNetAttention:__init(cfg, layer_idx)
   LlamaAttention.__init(self, cfg, layer_idx)
   self.attn_sub_norm = nn.RMSNorm(cfg.hidden_size, { eps = cfg.rms_norm_eps })
end

function M.BitNetAttention:attend_heads(q, k, v, past, pad)
   return self.attn_sub_norm(LlamaAttention.attend_heads(self, q, k, v, past, pad))
end

function M.BitNetMLP:__init(cfg)
   LlamaMLP.__init(self, cfg)
   self.ffn_sub_norm = nn.RMSNorm(cfg.intermediate_size, { eps = cfg.rms_norm_eps })
end

function M.BitNetMLP:forward(x)
   return self.down_proj(self.ffn_sub_norm(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))
end

return M
