--- ml.models: the decoder, encoder and encoder-decoder families of the ARCH table below (GPT-2 to
-- DeepSeek-V3.2, Llama 4, ERNIE 4.5; BERT, T5, BART; the README's model table says what each one
-- does) with Hugging Face names, and from_pretrained.
--
--    local models = require("moonload.models")
--    local model = models.from_pretrained("path/to/dir")     -- config.json + safetensors
--    local ids = model:generate({464, 2068}, {max_new_tokens = 20})
--
-- from_pretrained(dir[, opts]) reads config.json (model_type picks the class), builds the model
-- and loads model.safetensors or the shards listed in model.safetensors.index.json. Checkpoint
-- keys are mapped onto the model's names the way transformers does: a missing or extra base
-- prefix ("transformer.", "model.", "bert."), tied weights stored once, buffers old checkpoints
-- carry that the model no longer saves (GPT-2's attn.bias, BERT's position_ids).
local config = require("moonload.models.config")

local M = {}

local ARCH = {
   gpt2 = { module = "moonload.models.gpt2", class = "GPT2LMHeadModel" },
   ["gpt-sw3"] = { module = "moonload.models.gpt2", class = "GPT2LMHeadModel" },   -- (transformers' auto classes: GPT-2's)
   llama = { module = "moonload.models.llama", class = "LlamaForCausalLM" },
   mistral = { module = "moonload.models.llama", class = "MistralForCausalLM" },
   -- its language model; (by_text: the class for another text_config model_type than Mistral's)
   mistral3 = { module = "moonload.models.llama", class = "MistralForCausalLM",
      by_text = { mistral4 = { module = "moonload.models.deepseek", class = "Mistral4ForCausalLM" } } },
   ministral3 = { module = "moonload.models.llama", class = "Ministral3ForCausalLM" },
   qwen2 = { module = "moonload.models.llama", class = "Qwen2ForCausalLM" },
   qwen3 = { module = "moonload.models.llama", class = "Qwen3ForCausalLM" },
   qwen3_vl = { module = "moonload.models.llama", class = "Qwen3ForCausalLM" },       -- its language model
   qwen3_vl_text = { module = "moonload.models.llama", class = "Qwen3ForCausalLM" },  -- (as save_model writes it)
   phi3 = { module = "moonload.models.llama", class = "Phi3ForCausalLM" },
   gemma = { module = "moonload.models.gemma", class = "GemmaForCausalLM" },
   gemma2 = { module = "moonload.models.gemma", class = "Gemma2ForCausalLM" },
   vaultgemma = { module = "moonload.models.gemma", class = "VaultGemmaForCausalLM" },
   gemma3_text = { module = "moonload.models.gemma", class = "Gemma3ForCausalLM" },
   gemma3 = { module = "moonload.models.gemma", class = "Gemma3ForCausalLM" },   -- its language model
   gemma4_text = { module = "moonload.models.gemma4", class = "Gemma4ForCausalLM" },
   gemma4 = { module = "moonload.models.gemma4", class = "Gemma4ForCausalLM" },  -- its language model
   qwen3_moe = { module = "moonload.models.moe", class = "Qwen3MoeForCausalLM" },
   qwen3_vl_moe = { module = "moonload.models.moe", class = "Qwen3MoeForCausalLM" },  -- its language model
   qwen3_vl_moe_text = { module = "moonload.models.moe", class = "Qwen3MoeForCausalLM" },
   mixtral = { module = "moonload.models.moe", class = "MixtralForCausalLM" },
   exaone4 = { module = "moonload.models.llama", class = "Exaone4ForCausalLM" },
   exaone_moe = { module = "moonload.models.exaone_moe", class = "ExaoneMoeForCausalLM" },
   smollm3 = { module = "moonload.models.llama", class = "SmolLM3ForCausalLM" },
   seed_oss = { module = "moonload.models.llama", class = "SeedOssForCausalLM" },
   hunyuan_v1_dense = { module = "moonload.models.llama", class = "HunYuanDenseV1ForCausalLM" },
   hunyuan_v1_moe = { module = "moonload.models.hunyuan", class = "HunYuanMoEV1ForCausalLM" },
   cohere = { module = "moonload.models.llama", class = "CohereForCausalLM" },
   cohere2 = { module = "moonload.models.llama", class = "Cohere2ForCausalLM" },
   cohere2_moe = { module = "moonload.models.cohere2_moe", class = "Cohere2MoeForCausalLM" },
   cohere_compass_text = { module = "moonload.models.llama", class = "CohereCompassForCausalLM" },
   cohere_compass = { module = "moonload.models.llama", class = "CohereCompassForCausalLM" },   -- its language model
   granite = { module = "moonload.models.llama", class = "GraniteForCausalLM" },
   granitemoe = { module = "moonload.models.moe", class = "GraniteMoeForCausalLM" },
   granitemoeshared = { module = "moonload.models.moe", class = "GraniteMoeSharedForCausalLM" },
   granite_swa = { module = "moonload.models.granite_swa", class = "GraniteSWAForCausalLM" },
   granitemoe_swa = { module = "moonload.models.granite_swa", class = "GraniteMoeSWAForCausalLM" },
   hyperclovax = { module = "moonload.models.llama", class = "HyperCLOVAXForCausalLM" },
   granitemoehybrid = { module = "moonload.models.bamba", class = "GraniteMoeHybridForCausalLM" },
   bamba = { module = "moonload.models.bamba", class = "BambaForCausalLM" },
   nemotron_h = { module = "moonload.models.nemotron_h", class = "NemotronHForCausalLM" },
   mamba2 = { module = "moonload.models.mamba2", class = "Mamba2ForCausalLM" },
   mamba = { module = "moonload.models.mamba", class = "MambaForCausalLM" },
   falcon_mamba = { module = "moonload.models.mamba", class = "FalconMambaForCausalLM" },
   jamba = { module = "moonload.models.jamba", class = "JambaForCausalLM" },
   falcon_h1 = { module = "moonload.models.falcon_h1", class = "FalconH1ForCausalLM" },
   zamba = { module = "moonload.models.zamba", class = "ZambaForCausalLM" },
   recurrent_gemma = { module = "moonload.models.recurrent_gemma", class = "RecurrentGemmaForCausalLM" },
   zamba2 = { module = "moonload.models.zamba", class = "Zamba2ForCausalLM" },
   internlm3 = { module = "moonload.models.llama", class = "InternLM3ForCausalLM" },
   arcee = { module = "moonload.models.llama", class = "ArceeForCausalLM" },
   apertus = { module = "moonload.models.llama", class = "ApertusForCausalLM" },
   apertus1p5_text = { module = "moonload.models.llama", class = "Apertus1p5TextForCausalLM" },
   apertus1p5 = { module = "moonload.models.llama", class = "Apertus1p5TextForCausalLM" },   -- its language model
   iquestcoder = { module = "moonload.models.llama", class = "IQuestCoderForCausalLM" },
   cwm = { module = "moonload.models.llama", class = "CwmForCausalLM" },
   jais2 = { module = "moonload.models.llama", class = "Jais2ForCausalLM" },
   bitnet = { module = "moonload.models.llama", class = "BitNetForCausalLM" },
   nanochat = { module = "moonload.models.nanochat", class = "NanoChatForCausalLM" },
   olmoe = { module = "moonload.models.moe", class = "OlmoeForCausalLM" },
   flex_olmo = { module = "moonload.models.moe", class = "FlexOlmoForCausalLM" },
   afmoe = { module = "moonload.models.afmoe", class = "AfmoeForCausalLM" },
   dbrx = { module = "moonload.models.dbrx", class = "DbrxForCausalLM" },
   phimoe = { module = "moonload.models.moe", class = "PhimoeForCausalLM" },
   ernie4_5 = { module = "moonload.models.ernie4_5", class = "Ernie4_5ForCausalLM" },
   ernie4_5_moe = { module = "moonload.models.ernie4_5", class = "Ernie4_5_MoeForCausalLM" },
   llama4_text = { module = "moonload.models.llama4", class = "Llama4ForCausalLM" },
   llama4 = { module = "moonload.models.llama4", class = "Llama4ForCausalLM" },              -- its language model
   minimax_m2 = { module = "moonload.models.moe", class = "MiniMaxM2ForCausalLM" },
   minimax = { module = "moonload.models.minimax", class = "MiniMaxForCausalLM" },
   hy_v3 = { module = "moonload.models.hy_v3", class = "HYV3ForCausalLM" },
   jetmoe = { module = "moonload.models.jetmoe", class = "JetMoeForCausalLM" },
   kolibri1 = { module = "moonload.models.kolibri1", class = "Kolibri1ForCausalLM" },
   flint = { module = "moonload.models.flint", class = "FlintForCausalLM" },
   mellum = { module = "moonload.models.laguna", class = "MellumForCausalLM" },
   laguna = { module = "moonload.models.laguna", class = "LagunaForCausalLM" },
   qwen2_moe = { module = "moonload.models.moe", class = "Qwen2MoeForCausalLM" },
   deepseek_v2 = { module = "moonload.models.deepseek", class = "DeepseekV2ForCausalLM" },
   deepseek_v3 = { module = "moonload.models.deepseek", class = "DeepseekV3ForCausalLM" },
   minicpm3 = { module = "moonload.models.minicpm3", class = "MiniCPM3ForCausalLM" },
   youtu = { module = "moonload.models.youtu", class = "YoutuForCausalLM" },
   diffllama = { module = "moonload.models.diffllama", class = "DiffLlamaForCausalLM" },
   doge = { module = "moonload.models.doge", class = "DogeForCausalLM" },
   lara_mini = { module = "moonload.models.lara_mini", class = "LaraMiniForCausalLM" },
   longcat_flash = { module = "moonload.models.longcat_flash", class = "LongcatFlashForCausalLM" },
   kimi_k25 = { module = "moonload.models.deepseek", class = "DeepseekV3ForCausalLM" },   -- its language model
   glm4_moe_lite = { module = "moonload.models.deepseek", class = "Glm4MoeLiteForCausalLM" },
   mistral4 = { module = "moonload.models.deepseek", class = "Mistral4ForCausalLM" },
   deepseek_v32 = { module = "moonload.models.deepseek_sparse", class = "DeepseekV32ForCausalLM" },
   glm_moe_dsa = { module = "moonload.models.deepseek_sparse", class = "GlmMoeDsaForCausalLM" },
   glm4 = { module = "moonload.models.llama", class = "Glm4ForCausalLM" },
   glm4_moe = { module = "moonload.models.glm4_moe", class = "Glm4MoeForCausalLM" },
   solar_open = { module = "moonload.models.glm4_moe", class = "SolarOpenForCausalLM" },
   sarvam_moe = { module = "moonload.models.glm4_moe", class = "SarvamMoEForCausalLM" },
   sarvam_mla = { module = "moonload.models.deepseek", class = "SarvamMLAForCausalLM" },
   axk1 = { module = "moonload.models.deepseek", class = "AXK1ForCausalLM" },
   axk2 = { module = "moonload.models.axk2", class = "AXK2ForCausalLM" },
   dory = { module = "moonload.models.dory", class = "DoryForCausalLM" },
   zaya = { module = "moonload.models.zaya", class = "ZayaForCausalLM" },
   glm4v = { module = "moonload.models.llama", class = "Glm4vForCausalLM" },              -- its language model
   glm4v_text = { module = "moonload.models.llama", class = "Glm4vForCausalLM" },
   glm4v_moe = { module = "moonload.models.glm4_moe", class = "Glm4MoeForCausalLM" },     -- its language model
   dots1 = { module = "moonload.models.dots1", class = "Dots1ForCausalLM" },
   mimo_v2_flash = { module = "moonload.models.mimo_v2_flash", class = "MiMoV2FlashForCausalLM" },
   gpt_oss = { module = "moonload.models.gpt_oss", class = "GptOssForCausalLM" },
   qwen3_next = { module = "moonload.models.qwen3_next", class = "Qwen3NextForCausalLM" },
   qwen3_5_text = { module = "moonload.models.qwen3_5", class = "Qwen3_5ForCausalLM" },
   qwen3_5 = { module = "moonload.models.qwen3_5", class = "Qwen3_5ForCausalLM" },          -- its language model
   qwen3_5_moe_text = { module = "moonload.models.qwen3_5", class = "Qwen3_5MoeForCausalLM" },
   qwen3_5_moe = { module = "moonload.models.qwen3_5", class = "Qwen3_5MoeForCausalLM" },  -- its language model
   lfm2 = { module = "moonload.models.lfm2", class = "Lfm2ForCausalLM" },
   lfm2_moe = { module = "moonload.models.lfm2", class = "Lfm2MoeForCausalLM" },
   lfm3 = { module = "moonload.models.lfm3", class = "Lfm3ForCausalLM" },
   starcoder2 = { module = "moonload.models.llama", class = "Starcoder2ForCausalLM" },
   ministral = { module = "moonload.models.llama", class = "MinistralForCausalLM" },
   helium = { module = "moonload.models.llama", class = "HeliumForCausalLM" },
   glm = { module = "moonload.models.llama", class = "GlmForCausalLM" },
   olmo = { module = "moonload.models.llama", class = "OlmoForCausalLM" },
   exaone = { module = "moonload.models.llama", class = "ExaoneForCausalLM" },
   nemotron = { module = "moonload.models.llama", class = "NemotronForCausalLM" },
   olmo2 = { module = "moonload.models.llama", class = "Olmo2ForCausalLM" },
   olmo3 = { module = "moonload.models.llama", class = "Olmo3ForCausalLM" },
   olmo_hybrid = { module = "moonload.models.olmo_hybrid", class = "OlmoHybridForCausalLM" },
   phi = { module = "moonload.models.phi", class = "PhiForCausalLM" },
   gpt_neox = { module = "moonload.models.gpt_neox", class = "GPTNeoXForCausalLM" },
   gpt_neox_japanese = { module = "moonload.models.gpt_neox_japanese", class = "GPTNeoXJapaneseForCausalLM" },
   opt = { module = "moonload.models.opt", class = "OPTForCausalLM" },
   bloom = { module = "moonload.models.bloom", class = "BloomForCausalLM" },
   mpt = { module = "moonload.models.mpt", class = "MptForCausalLM" },
   falcon = { module = "moonload.models.falcon", class = "FalconForCausalLM" },
   gptj = { module = "moonload.models.gptj", class = "GPTJForCausalLM" },
   gpt_bigcode = { module = "moonload.models.gpt_bigcode", class = "GPTBigCodeForCausalLM" },
   gpt_neo = { module = "moonload.models.gpt_neo", class = "GPTNeoForCausalLM" },
   codegen = { module = "moonload.models.codegen", class = "CodeGenForCausalLM" },
   persimmon = { module = "moonload.models.persimmon", class = "PersimmonForCausalLM" },
   xglm = { module = "moonload.models.xglm", class = "XGLMForCausalLM" },
   biogpt = { module = "moonload.models.biogpt", class = "BioGptForCausalLM" },
   ["openai-gpt"] = { module = "moonload.models.openai", class = "OpenAIGPTLMHeadModel" },
   ctrl = { module = "moonload.models.ctrl", class = "CTRLLMHeadModel" },
   stablelm = { module = "moonload.models.stablelm", class = "StableLmForCausalLM" },
   bert = { module = "moonload.models.bert", class = "BertModel",
      others = { BertForSequenceClassification = "BertForSequenceClassification" } },
   roberta = { module = "moonload.models.bert", class = "RobertaModel",
      others = { RobertaForSequenceClassification = "RobertaForSequenceClassification" } },
   ["xlm-roberta"] = { module = "moonload.models.bert", class = "RobertaModel",
      others = { XLMRobertaForSequenceClassification = "XLMRobertaForSequenceClassification" } },
   camembert = { module = "moonload.models.bert", class = "RobertaModel",
      others = { CamembertForSequenceClassification = "RobertaForSequenceClassification" } },
   mpnet = { module = "moonload.models.mpnet", class = "MPNetModel" },
   distilbert = { module = "moonload.models.distilbert", class = "DistilBertModel" },
   modernbert = { module = "moonload.models.modernbert", class = "ModernBertModel",
      others = { ModernBertForSequenceClassification = "ModernBertForSequenceClassification" } },
   bart = { module = "moonload.models.bart", class = "BartForConditionalGeneration" },
   mbart = { module = "moonload.models.bart", class = "MBartForConditionalGeneration" },
   blenderbot = { module = "moonload.models.bart", class = "BlenderbotForConditionalGeneration" },
   ["blenderbot-small"] = { module = "moonload.models.bart", class = "BlenderbotSmallForConditionalGeneration" },
   plbart = { module = "moonload.models.bart", class = "PLBartForConditionalGeneration" },
   mvp = { module = "moonload.models.bart", class = "MvpForConditionalGeneration" },
   marian = { module = "moonload.models.bart", class = "MarianMTModel" },
   pegasus = { module = "moonload.models.bart", class = "PegasusForConditionalGeneration" },
   m2m_100 = { module = "moonload.models.bart", class = "M2M100ForConditionalGeneration" },
   -- (others: the architectures names of the family's other classes, and the class each reads as)
   t5 = { module = "moonload.models.t5", class = "T5ForConditionalGeneration",
      others = { T5EncoderModel = "T5EncoderModel" } },
   mt5 = { module = "moonload.models.t5", class = "T5ForConditionalGeneration",
      others = { T5EncoderModel = "T5EncoderModel", MT5EncoderModel = "T5EncoderModel", MT5ForConditionalGeneration = "T5ForConditionalGeneration" } },
   umt5 = { module = "moonload.models.t5", class = "UMT5ForConditionalGeneration",
      others = { UMT5EncoderModel = "UMT5EncoderModel" } },
   longt5 = { module = "moonload.models.longt5", class = "LongT5ForConditionalGeneration" },
   t5gemma = { module = "moonload.models.t5gemma", class = "T5GemmaForConditionalGeneration" },
   pegasus_x = { module = "moonload.models.pegasus_x", class = "PegasusXForConditionalGeneration" },
   switch_transformers = { module = "moonload.models.switch_transformers", class = "SwitchTransformersForConditionalGeneration" },
   ["nllb-moe"] = { module = "moonload.models.nllb_moe", class = "NllbMoeForConditionalGeneration" },
}

-- Lazy submodules: ml.models.<file> is moonload/models/<file>.lua (ml.models.gpt2, .llama, .bart,
-- .config, .generation, ...), loaded on first use; a few names are the module their classes live
-- in (ml.models.mistral, .qwen2, .qwen3, .phi3 are .llama: MistralForCausalLM, ... live there).
local ALIASES = { mistral = "llama", qwen2 = "llama", qwen3 = "llama", phi3 = "llama", starcoder2 = "llama",
   olmo2 = "llama", gemma2 = "gemma", qwen3_moe = "moe", qwen2_moe = "moe", mixtral = "moe", zamba2 = "zamba" }
setmetatable(M, { __index = function(t, k)
   if type(k) ~= "string" or not k:match("^[%w_]+$") or k == "init" then return nil end
   local path = "moonload.models." .. (ALIASES[k] or k)
   if not package.searchpath(path, package.path) then path = nil end
   if path then
      local mod = require(path)
      rawset(t, k, mod)
      return mod
   end
   return nil
end })

--- _place_loaded(model, opts, no_split, who): a model loaded in CPU memory (views of mapped files)
-- placed by opts.device_map: planned (max_memory, reserve_for, ...), its disk weights' pages
-- bounded, quantized on the CPU when opts.quantize asks (so that layers bound for a GPU move there
-- quantized), then dispatched.
function M._place_loaded(model, opts, no_split, who)
   local big = require("moonload.big_modeling")
   local plan_opts = setmetatable({ no_split_module_classes = no_split }, { __index = opts })
   local device_map, reserved = big._plan_device_map(model, plan_opts, who)
   local cpu_reserved = big._apply_reserve(model, device_map, reserved)
   big._bound_mapped_disk_weights(model, device_map, opts.max_memory, opts.dtype, cpu_reserved)
   if opts.quantize ~= nil then require("moonload.quantize").quantize(model, { dtype = opts.quantize, embeddings = opts.quantize_embeddings }) end
   return big.dispatch_model(model, device_map, { offload_dir = opts.offload_folder,
      offload_buffers = opts.offload_buffers, skip_keys = opts.skip_keys,
      preload_module_classes = opts.preload_module_classes, force_hooks = opts.force_hooks })
end

--- from_gguf(path[, opts]): a causal model from a llama.cpp GGUF file (models/gguf_model.lua).
function M.from_gguf(path, opts)
   return require("moonload.models.gguf_model").from_gguf(path, opts)
end

--- load_adapter(model, dir[, {merge}]): a peft LoRA adapter on a loaded model (models/adapter.lua).
function M.load_adapter(model, dir, opts)
   return require("moonload.models.adapter").load_adapter(model, dir, opts)
end

local function file_exists(path)
   local f = io.open(path, "rb")
   if f then f:close() return true end
   return false
end

local read_json = require("moonload.utils.json").read

--- The model class for a config's model_type ("gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma2",
-- "gemma3_text", "bert", "t5", ...). architecture (from_pretrained's option, else the config's
-- architectures[1]) picks another class of the family where it has one (T5EncoderModel);
-- text_type (a multimodal config's text_config.model_type) picks the language model's class
-- where the family's differs by it (a Mistral 3 folder holding Mistral Small 4).
function M.class_for(model_type, src, architecture, asked, text_type)
   local a = ARCH[model_type]
   if not a then
      local known = {}
      for k in pairs(ARCH) do known[#known + 1] = k end
      table.sort(known)
      error(string.format('models: model_type "%s" in %s is not supported (supported: %s)',
         tostring(model_type), src, table.concat(known, ", ")), 3)
   end
   local text = text_type and a.by_text and a.by_text[text_type]
   if text then return require(text.module)[text.class] end
   local other = architecture and a.others and a.others[architecture]
   if asked and architecture ~= a.class and not other then
      local names = { a.class }
      for k in pairs(a.others or {}) do names[#names + 1] = k end
      table.sort(names)
      error(string.format('from_pretrained: architecture "%s" is not a class of model_type "%s" (expected %s)',
         tostring(architecture), tostring(model_type), table.concat(names, " or ")), 3)
   end
   return require(a.module)[other or a.class]
end

--- A multimodal config's text_config.model_type, or nil.
function M.text_type(raw)
   return type(raw.text_config) == "table" and raw.text_config.model_type or nil
end

--- Reads a sharded checkpoint's index: {kind = "sharded", index = path, weight_map = {name ->
-- shard path}, files = {shard paths, sorted}}. Shards must sit in the index's folder and exist.
local function parse_index(index, who)
   local dir = index:match("^(.*)/[^/]*$") or "."
   local t = read_json(index, who)
   local wm = t.weight_map
   if type(wm) ~= "table" then
      error(string.format('%s: %s has no "weight_map" object', who, index), 3)
   end
   local map, files, seen = {}, {}, {}
   for name, file in pairs(wm) do
      if type(file) ~= "string" or file:find("/", 1, true) or file:find("..", 1, true) then
         error(string.format('%s: %s maps "%s" to %s, expected a file name in the same folder',
            who, index, tostring(name), tostring(file)), 3)
      end
      local path = dir .. "/" .. file
      map[name] = path
      if not seen[path] then
         if not file_exists(path) then
            error(string.format("%s: shard %s listed in %s does not exist", who, path, index), 3)
         end
         seen[path] = true
         files[#files + 1] = path
      end
   end
   table.sort(files)
   return { kind = "sharded", index = index, weight_map = map, files = files }
end

--- Finds the checkpoint in a folder: returns {kind = "single", path} or the parsed index of a
-- sharded one (model.safetensors is looked for first, as transformers does).
function M.find_checkpoint(dir, who)
   who = who or "from_pretrained"
   local single = dir .. "/model.safetensors"
   if file_exists(single) then return { kind = "single", path = single } end
   local index = dir .. "/model.safetensors.index.json"
   if file_exists(index) then return parse_index(index, who) end
   error(string.format("%s: no model.safetensors or model.safetensors.index.json in %s", who, dir), 2)
end

--- Reads every tensor of a checkpoint (zero-copy views where ml.safetensors allows):
-- returns name -> tensor.
function M.read_checkpoint(ckpt)
   local st = require("moonload.safetensors")
   if ckpt.kind == "single" then return st.load_file(ckpt.path) end
   local sd = {}
   for _, path in ipairs(ckpt.files) do
      local part = st.load_file(path)
      for name, t in pairs(part) do
         if ckpt.weight_map[name] == path then sd[name] = t end
      end
   end
   for name, path in pairs(ckpt.weight_map) do
      if sd[name] == nil then
         error(string.format('from_pretrained: tensor "%s" listed in %s is not in shard %s',
            name, ckpt.index, path), 2)
      end
   end
   return sd
end

--- The tensor names a checkpoint holds (sorted), read from the header or the index only.
function M.checkpoint_names(ckpt)
   local names = {}
   if ckpt.kind == "sharded" then
      for name in pairs(ckpt.weight_map) do names[#names + 1] = name end
   else
      local f = require("moonload.safetensors").safe_open(ckpt.path)
      for _, name in ipairs(f:keys()) do names[#names + 1] = name end
      f:close()
   end
   table.sort(names)
   return names
end

--- info_reader(ckpt) -> info_of(name), close(): a checkpoint tensor's header entry ({dtype,
-- shape, ...}; nil when absent), each file opened once until close.
function M.info_reader(ckpt)
   local open = {}
   local function info_of(name)
      local path = ckpt.kind == "sharded" and ckpt.weight_map[name] or ckpt.path
      if path == nil then return nil end
      local f = open[path]
      if f == nil then
         f = require("moonload.safetensors").safe_open(path)
         open[path] = f
      end
      local ok, info = pcall(f.tensor_info, f, name)
      return ok and info or nil
   end
   local function close()
      for path, f in pairs(open) do
         f:close()
         open[path] = nil
      end
   end
   return info_of, close
end

local function matches_any(name, patterns)
   for _, p in ipairs(patterns or {}) do
      if name:find(p) then return true end
   end
   return false
end

--- name_mapper(model) -> map(name), expected: map takes a checkpoint tensor name to the model's
-- (the class's checkpoint_renames, then its base_model_prefix added or stripped, as
-- remap_state_dict does); expected is the set of the model's own names.
function M.name_mapper(model)
   local expected = {}
   for name in pairs(model:state_dict({ keep_vars = true })) do expected[name] = true end
   local p = model.base_model_prefix and (model.base_model_prefix .. ".") or nil
   return function(name)
      local n = name
      for _, r in ipairs(model.checkpoint_renames or {}) do
         if not expected[n] then n = n:gsub(r[1], r[2], 1) end
      end
      if p and not expected[n] then
         if expected[p .. n] then
            n = p .. n                                   -- "h.0.ln_1.weight" for GPT-2
         elseif n:sub(1, #p) == p and expected[n:sub(#p + 1)] then
            n = n:sub(#p + 1)                            -- "bert.embeddings..." for BertModel
         end
      end
      return n
   end, expected
end

--- Maps checkpoint names onto the model's: applies the class's checkpoint_renames ({pattern,
-- replacement} pairs, e.g. a multimodal checkpoint's language_model.model.), adds or strips its
-- base_model_prefix, fills tied weights stored once, drops keys the class ignores (only when the
-- model lacks them).
-- Returns the new table (the tensors themselves are shared, not copied).
function M.remap_state_dict(model, sd)
   local cls = getmetatable(model)
   local map_name, expected = M.name_mapper(model)
   local out = {}
   for name, t in pairs(sd) do out[map_name(name)] = t end
   for name in pairs(out) do
      if not expected[name] and matches_any(name, model.ignore_unexpected) then out[name] = nil end
   end
   if model.config and model.config.tie_word_embeddings ~= false then
      for dst, src in pairs(model.tied_weights or {}) do
         -- (and a quantized tie's scales: a head reading a quantized embedding's tensors)
         for _, suffix in ipairs({ "", "_scale" }) do
            local d, s = dst .. suffix, src .. suffix
            if expected[d] and expected[s] then
               if out[d] == nil and out[s] ~= nil then out[d] = out[s] end
               if out[s] == nil and out[d] ~= nil then out[s] = out[d] end
            end
         end
      end
   end
   return out, cls
end

--- True when some checkpoint name has to be renamed or dropped to fit the model (a missing or
-- extra base prefix, a legacy buffer, another quantizer's layout to rewrite); tied weights stored
-- once need no remapping.
function M.needs_remap(model, names)
   if rawget(model, "rewrite_checkpoint") then return true end     -- its tensors are rewritten on load
   local fake = {}
   for _, n in ipairs(names) do fake[n] = n end
   local mapped = M.remap_state_dict(model, fake)
   for _, n in ipairs(names) do
      if mapped[n] ~= n then return true end     -- renamed or dropped
   end
   return false
end

local function join(list)
   local q = {}
   for i, s in ipairs(list) do q[i] = '"' .. s .. '"' end
   return table.concat(q, ", ")
end

--- Loads a checkpoint state dict into a model built by this module (shapes checked, strict by
-- default). Returns missing, unexpected (lists of names).
function M.load_into(model, sd, opts)
   opts = opts or {}
   local who = opts.who or "load_checkpoint"
   local strict = opts.strict ~= false
   -- a checkpoint stored in another quantizer's layout (compressed-tensors, AutoAWQ, GPTQ): its
   -- tensors rewritten into those of the layers its reader built
   local rewrite = rawget(model, "rewrite_checkpoint")
   if rewrite then sd = require("moonload.checkpoint_rewrite").in_memory(rewrite, sd, who) end
   sd = M.remap_state_dict(model, sd)
   local params, keys = model:state_dict({ keep_vars = true })
   local wrong = {}
   local names = {}
   for name in pairs(sd) do names[#names + 1] = name end
   table.sort(names)
   for _, name in ipairs(names) do
      local have = params[name]
      if have then
         local a, b = have.shape, sd[name].shape
         local same = #a == #b
         if same then for i = 1, #a do if a[i] ~= b[i] then same = false break end end end
         if not same then
            wrong[#wrong + 1] = string.format('"%s" (checkpoint [%s], model [%s])', name,
               table.concat(b, ", "), table.concat(a, ", "))
         end
      end
   end
   if #wrong > 0 then
      error(who .. ": checkpoint tensors of the wrong shape: " .. table.concat(wrong, ", "), 3)
   end
   -- Checked before anything is written: a failed strict load leaves the model as it was.
   if strict then
      local missing, unexpected = {}, {}
      for _, k in ipairs(keys) do
         if sd[k] == nil then missing[#missing + 1] = k end
      end
      for _, name in ipairs(names) do
         if params[name] == nil then unexpected[#unexpected + 1] = name end
      end
      if #missing > 0 or #unexpected > 0 then
         local parts = {}
         if #missing > 0 then parts[#parts + 1] = "missing keys " .. join(missing) end
         if #unexpected > 0 then parts[#parts + 1] = "unexpected keys " .. join(unexpected) end
         error(who .. ": checkpoint does not match the model: " .. table.concat(parts, "; "), 3)
      end
   end
   local ok, missing, unexpected = pcall(model.load_state_dict, model, sd, { strict = false })
   if not ok then error(who .. ": " .. tostring(missing), 3) end
   if model.tie_weights then model:tie_weights() end
   return missing or {}, unexpected or {}
end

--- load_checkpoint(model, checkpoint[, {strict = true}]): loads a .safetensors file, a sharded
-- index .json, or a folder holding either into a model of this module, with the same name
-- mapping as from_pretrained. Returns missing, unexpected.
function M.load_checkpoint(model, checkpoint, opts)
   if type(checkpoint) ~= "string" then
      error("load_checkpoint: expected a checkpoint path, got " .. type(checkpoint), 2)
   end
   local ckpt
   if checkpoint:match("%.json$") then
      ckpt = parse_index(checkpoint, "load_checkpoint")
   elseif checkpoint:match("%.safetensors$") then
      ckpt = { kind = "single", path = checkpoint }
   else
      ckpt = M.find_checkpoint(checkpoint, "load_checkpoint")
   end
   return M.load_into(model, M.read_checkpoint(ckpt), opts)
end

--- Builds the model a config describes (random weights).
function M.from_config(cfg, opts)
   local raw, src = config.read(cfg, "models")
   local cls = M.class_for(raw.model_type, src, nil, nil, M.text_type(raw))
   return cls(cfg, opts)
end

local FLOAT_DTYPES = { float32 = true, float16 = true, bfloat16 = true, float64 = true }

--- transformers' dtype = "auto" (its default since v5): the config's dtype (or torch_dtype, or
-- its text_config's), else the dtype of the checkpoint's first floating tensor; float32 when
-- the checkpoint has none.
function M.auto_dtype(raw, ckpt, src)
   local text = type(raw.text_config) == "table" and raw.text_config or {}
   local d = raw.dtype or raw.torch_dtype or text.dtype or text.torch_dtype
   if d ~= nil then
      if not FLOAT_DTYPES[d] then
         error(string.format('from_pretrained: dtype "%s" in %s is not a floating dtype (float32, float16, bfloat16, float64)',
            tostring(d), src), 3)
      end
      return d
   end
   local st = require("moonload.safetensors")
   local f = st.safe_open(ckpt.kind == "single" and ckpt.path or ckpt.files[1])
   local found = "float32"
   for _, name in ipairs(f:keys()) do
      local dt = f:get_tensor(name).dtype
      if FLOAT_DTYPES[dt] then found = dt; break end
   end
   f:close()
   return found
end

--- from_pretrained(dir[, {dtype = "auto", strict = true, device_map, max_memory, offload_folder,
-- reserve_for, device_overrides, quantize, adapter, merge_adapter, ...}])
-- dir holds config.json and model.safetensors or model.safetensors.index.json + shards.
-- dtype "auto" (or nil) takes the checkpoint's own (see auto_dtype), so a bfloat16 checkpoint
-- stays bfloat16 and its CPU weights stay views of the file; a dtype name converts.
-- With device_map, the model is built empty and placed by ml.load_checkpoint_and_dispatch.
-- quantize = "int8" (or "int4") then turns the linear layers into int8 (int4) ones (ml.quantize;
-- with a device map, load_checkpoint_and_dispatch plans and loads for it). adapter (a folder)
-- puts a peft LoRA adapter on the loaded model (load_adapter; merged into float layers with
-- merge_adapter = true). architecture picks another class of the model_type's family than its
-- config's architectures[1] says (transformers' choice of class: "T5EncoderModel" for a T5).
local load

function M.from_pretrained(dir, opts)
   opts = opts or {}
   if type(dir) ~= "string" then
      error("from_pretrained: expected a folder path, got " .. type(dir), 2)
   end
   -- a llama.cpp file (transformers' gguf_file): from_gguf
   if dir:lower():match("%.gguf$") then return M.from_gguf(dir, opts) end
   require("moonload.quantize").check_option(opts.quantize, "from_pretrained", 2, opts.quantize_embeddings)
   if opts.adapter ~= nil and type(opts.adapter) ~= "string" then
      error("from_pretrained: adapter must be the folder of a peft LoRA adapter, got " .. type(opts.adapter), 2)
   end
   -- (a tail call: load's errors point at the caller, as from_pretrained's own)
   if not opts.quantize and not opts.adapter then return load(dir, opts) end
   local model = load(dir, opts)
   if opts.quantize then M._quantize_loaded(model, opts) end
   -- a LoRA adapter beside the (quantized) layers, or merged into float ones
   if opts.adapter then M.load_adapter(model, opts.adapter, { merge = opts.merge_adapter }) end
   return model
end

-- from_pretrained's quantize: the linear layers become int8 or int4 (moonload/quantize.lua; with
-- a device map, load_checkpoint_and_dispatch has done so already); a log line counts them.
function M._quantize_loaded(model, opts)
   local _, report = require("moonload.quantize").quantize(model, { offload_folder = opts.offload_folder,
      dtype = opts.quantize, embeddings = opts.quantize_embeddings })
   local n, floats = 0, 0
   for _, m in ipairs(model:modules_list()) do
      if m.__name == "QuantizedLinear" then n = n + 1 end
   end
   for _ in pairs(report.skipped) do floats = floats + 1 end
   require("moonload.utils.log").info(string.format(
      "from_pretrained: %d linear layers quantized (%s), %d left in floats (ml.quantize's report says why)", n,
      opts.quantize, floats))
end

function load(dir, opts)
   dir = dir:gsub("/+$", "")
   local cfg_path = dir .. "/config.json"
   if not file_exists(cfg_path) then
      error(string.format("from_pretrained: no config.json in %s", dir), 2)
   end
   local raw, src = config.read(cfg_path, "from_pretrained")
   if raw.model_type == nil then
      error(string.format('from_pretrained: config key "model_type" is missing in %s', src), 2)
   end
   local archs = type(raw.architectures) == "table" and raw.architectures or {}
   local cls = M.class_for(raw.model_type, src, opts.architecture or archs[1], opts.architecture ~= nil, M.text_type(raw))
   local ckpt = M.find_checkpoint(dir)
   if opts.dtype == nil or opts.dtype == "auto" then
      local resolved = {}
      for k, v in pairs(opts) do resolved[k] = v end
      resolved.dtype = M.auto_dtype(raw, ckpt, src)
      opts = resolved
   end

   local names = M.checkpoint_names(ckpt)
   -- the checkpoint's headers, read as the build asks (closed once the model is built)
   local info_of, close_headers = M.info_reader(ckpt)
   -- a class may build to match the checkpoint (BERT without its pooler) and read more of the
   -- folder (sentence-transformers' pooling)
   local function shape_of(name)
      local info = info_of(name)
      return info and info.shape
   end
   local build_opts = cls.build_opts_for and cls.build_opts_for(names, shape_of) or nil
   -- A decoder's base model saved alone (Qwen3Model, as embedding models ship): no lm_head.weight.
   -- It loads into the causal class with the head tied to the embeddings (its hidden states are
   -- what such a folder is for; generate would read the embeddings back as the head).
   -- (MarianMTModel is a head class whose name ends so)
   local tie_missing_head = type(archs[1]) == "string" and archs[1]:match("Model$") and not archs[1]:find("For", 1, true)
      and archs[1] ~= cls.__name
   if tie_missing_head then
      for _, n in ipairs(names) do
         if n == "lm_head.weight" then tie_missing_head = false break end
      end
   end
   local head_src = tie_missing_head and cls.tied_weights and cls.tied_weights["lm_head.weight"]
   local function build()
      local model = cls(cfg_path, build_opts)
      if head_src and rawget(model, "lm_head") == nil and model.lm_head then
         model.lm_head.weight = model:get_parameter(head_src)
         model.config.tie_word_embeddings = true
      end
      if cls.read_folder then cls.read_folder(model, dir) end
      -- generate's defaults, when the folder has them (else config.json's token ids)
      rawset(model, "generation_config", require("moonload.models.generation_config").read(dir, "from_pretrained"))
      -- a quantized checkpoint (ml.save_model's int8 / int4, FP8, MXFP4, compressed-tensors, AWQ,
      -- GPTQ): its layers built as it stores them, read from its config and its tensors' headers
      local ok, built = pcall(require("moonload.quantize").apply_config, model, raw.quantization_config, src,
         "from_pretrained", names, info_of)
      close_headers()
      if not ok then error(built, 0) end
      return built
   end

   require("moonload.big_modeling")._check_reserve_for_map(opts, "from_pretrained", 3)
   if opts.device_map ~= nil then
      -- Big-model path: empty skeleton, then placement + loading by the dispatcher.
      local big = require("moonload.big_modeling")
      local model = big.init_empty_weights(build):to(opts.dtype)      -- meta: only the dtype changes
      local no_split = opts.no_split_module_classes or cls.no_split_modules
      local rewrite = rawget(model, "rewrite_checkpoint")
      if rewrite and opts.offload_folder ~= nil then
         -- another quantizer's layers, rewritten a batch at a time into the offload folder beside
         -- links to the rest: loaded from there, the model is never whole in RAM
         ckpt = parse_index(require("moonload.checkpoint_rewrite").into_folder(rewrite, ckpt, opts.offload_folder,
            "from_pretrained"), "from_pretrained")
         names = M.checkpoint_names(ckpt)
         rawset(model, "rewrite_checkpoint", nil)
      end
      if not M.needs_remap(model, names) then
         local dispatch_opts = {}
         for k, v in pairs(opts) do dispatch_opts[k] = v end
         dispatch_opts.no_split_module_classes = no_split
         local target = ckpt.kind == "single" and ckpt.path or ckpt.index
         return big.load_checkpoint_and_dispatch(model, target, dispatch_opts)
      end
      -- The checkpoint's names differ from the model's (no base prefix, legacy buffers):
      -- map them, load zero-copy views of the mapped files on the CPU, then place the model.
      M.load_into(model, M.read_checkpoint(ckpt), { strict = opts.strict, who = "from_pretrained" })
      model:to(opts.dtype)
      return M._place_loaded(model, opts, no_split, "from_pretrained")
   end

   local sd = M.read_checkpoint(ckpt)
   local model
   if opts.strict == false then
      -- Weights the checkpoint lacks keep their initialisation.
      model = build()
   else
      -- Every weight comes from the checkpoint: build without allocating or initialising
      -- parameters (meta), and let load_state_dict put the checkpoint tensors in their place
      -- (zero-copy views of the mapped file where dtype and alignment allow).
      model = require("moonload.big_modeling").init_empty_weights(build):to(opts.dtype)
   end
   M.load_into(model, sd, { strict = opts.strict, who = "from_pretrained" })
   model:to(opts.dtype)
   return model
end

return M
