-- ml.models.from_pretrained with a device_map: the empty skeleton placed and loaded by
-- ml.load_checkpoint_and_dispatch (CPU and disk here), logits and generation unchanged.
local ml = require("moonload")
local models = require("moonload.models")
local H = require("models_helpers")

-- Zamba's block is stored under its first hybrid layer (the 3rd) and tied into the 5th; layers
-- 0-3 go to places[1], the rest to places[2]. Whichever side holds its weights, the other finds
-- the block: in the holding module's tensor, or read from the disk under the stored name.
local function shared_block_split(placings)
   for name, layers in pairs({ zamba_tiny = 6, zamba2_tiny = 5 }) do
      local exp = H.expected(name)
      for _, places in ipairs(placings) do
         local off = H.tmpdir()
         local map = { ["model.embed_tokens"] = "cpu", ["model.final_layernorm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "cpu" }
         for i = 0, layers - 1 do map["model.layers." .. i] = i < 4 and places[1] or places[2] end
         local model = models.from_pretrained(H.FIX .. "/" .. name, { offload_folder = off, device_map = map })
         local logits = model(ml.tensor(exp.input_ids, { dtype = "int64" })):to("cpu")
         assert.is_true(H.max_abs_diff(logits, exp.logits) < 1e-4, name .. ": " .. table.concat(places, " + "))
         H.rmdir(off)
      end
   end
end

describe("models.from_pretrained with device_map", function()
   H.collect_warnings()                       -- kept quiet

   -- The CPU budget leaves room for the largest layer (Accelerate reserves it for offloading) and a
   -- few modules beside it; the MoE layers with shared experts (Qwen2-MoE, DeepSeek) need more.
   local budget = { qwen2_moe_tiny = 160000, ernie4_5_moe_tiny = 120000, hunyuan_v1_moe_tiny = 150000, bloom_tiny = 160000, deepseek_v3_tiny = 200000, deepseek_v32_tiny = 200000, mistral4_tiny = 150000, mistral4_multimodal_tiny = 90000, glm_moe_dsa_tiny = 200000, glm4_moe_lite_tiny = 200000, deepseek_v2_lite_tiny = 150000, glm4_moe_tiny = 200000, glm4v_moe_multimodal_tiny = 200000, glm4v_multimodal_tiny = 150000, dots1_tiny = 200000,
                    gpt_oss_tiny = 400000, gpt_oss_mxfp4_tiny = 150000, qwen3_next_tiny = 150000,
                    qwen3_5_moe_multimodal_tiny = 150000, granitemoehybrid_tiny = 150000, falcon_h1_tiny = 150000, llama_ct_int_tiny = 100000, deepseek_v3_ct_int4_tiny = 150000, kimi_k25_ct_int4_tiny = 150000,
                    gemma4_tiny = 100000, gemma4_moe_tiny = 150000, gemma4_multimodal_tiny = 100000, stablelm_12b_tiny = 150000, gpt_bigcode_tiny = 50000, mpt_tiny = 150000, dbrx_tiny = 90000, solar_open_tiny = 150000, codegen_tiny = 130000, cohere2_moe_tiny = 150000, cohere2_moe_sigmoid_tiny = 150000, afmoe_tiny = 150000, hy_v3_tiny = 150000, mimo_v2_flash_tiny = 150000, longcat_flash_tiny = 200000, laguna_tiny = 150000, exaone_moe_tiny = 150000, minicpm3_tiny = 120000, minimax_tiny = 150000, zamba_tiny = 150000, zamba2_tiny = 200000, zamba2_untied_tiny = 250000, youtu_tiny = 150000, diffllama_tiny = 300000, doge_tiny = 100000, doge_moe_tiny = 100000, lara_mini_tiny = 200000, axk2_tiny = 300000, dory_tiny = 100000, zaya_tiny = 150000, sarvam_moe_tiny = 150000, sarvam_mla_tiny = 150000, kolibri1_tiny = 150000, flint_tiny = 150000, axk1_tiny = 150000, mellum_tiny = 150000, persimmon_tiny = 100000, xglm_tiny = 100000, biogpt_tiny = 100000, openai_gpt_tiny = 150000, ctrl_tiny = 100000, gpt_sw3_tiny = 150000 }
   for _, name in ipairs({ "gpt2_tiny", "llama_tiny_untied", "mistral_tiny", "qwen2_tiny", "qwen3_tiny", "phi3_tiny",
                           "gemma2_tiny", "gemma3_tiny", "qwen3_moe_tiny",
                           "mixtral_tiny", "gemma3_multimodal_tiny", "gpt_neox_tiny",
                           "qwen2_moe_tiny", "starcoder2_tiny", "olmo2_tiny",
                           "phi_tiny", "opt_tiny", "bloom_tiny", "falcon_tiny_new_arch", "gptj_tiny",
                           "deepseek_v3_tiny", "deepseek_v2_lite_tiny", "glm4_moe_tiny", "deepseek_v32_tiny", "glm_moe_dsa_tiny", "glm4_moe_lite_tiny", "deepseek_v32_fp8_tiny", "mistral4_tiny", "mistral4_multimodal_tiny", "llama4_tiny", "llama4_multimodal_tiny", "ernie4_5_tiny", "ernie4_5_moe_tiny", "seed_oss_tiny", "exaone4_tiny", "smollm3_tiny", "hunyuan_v1_dense_tiny", "hunyuan_v1_moe_tiny", "cohere_tiny", "cohere2_tiny", "glm4_tiny", "granite_tiny", "granitemoe_tiny", "olmoe_tiny", "phimoe_tiny", "internlm3_tiny", "arcee_tiny", "apertus_tiny", "gemma_tiny", "ministral_tiny", "helium_tiny", "glm_tiny", "olmo_tiny", "nemotron_tiny", "stablelm_tiny", "stablelm_12b_tiny", "gpt_bigcode_tiny", "gpt_bigcode_mha_tiny", "exaone_tiny", "vaultgemma_tiny", "mpt_tiny", "solar_open_tiny", "dbrx_tiny", "gpt_neo_tiny", "codegen_tiny", "flex_olmo_tiny", "cohere2_moe_tiny", "cohere2_moe_sigmoid_tiny", "afmoe_tiny", "hy_v3_tiny", "mimo_v2_flash_tiny", "longcat_flash_tiny", "laguna_tiny", "laguna_per_element_tiny", "exaone_moe_tiny", "minicpm3_tiny", "zamba_tiny", "zamba2_tiny", "zamba2_untied_tiny", "recurrent_gemma_tiny", "youtu_tiny", "diffllama_tiny", "doge_tiny", "doge_moe_tiny", "gpt_neox_japanese_tiny", "lara_mini_tiny", "axk2_tiny", "dory_tiny", "zaya_tiny", "apertus1p5_text_tiny", "apertus1p5_multimodal_tiny", "cohere_compass_text_tiny", "cohere_compass_multimodal_tiny", "jetmoe_tiny", "sarvam_moe_tiny", "sarvam_mla_tiny", "kolibri1_tiny", "flint_tiny", "axk1_tiny", "mellum_tiny", "persimmon_tiny", "xglm_tiny", "biogpt_tiny", "openai_gpt_tiny", "ctrl_tiny", "gpt_sw3_tiny", "iquestcoder_tiny", "cwm_tiny", "jais2_tiny", "bitnet_tiny", "nanochat_tiny", "granitemoeshared_tiny", "granite_swa_tiny", "granitemoe_swa_tiny", "hyperclovax_tiny", "gpt_oss_tiny", "gpt_oss_mxfp4_tiny", "qwen3_next_tiny", "olmo_hybrid_tiny", "minimax_tiny",
                           "qwen3_5_tiny", "qwen3_5_moe_multimodal_tiny",
                           "mistral3_multimodal_tiny", "ministral3_tiny", "ministral3_multimodal_tiny", "qwen3_vl_multimodal_tiny",
                           "qwen3_vl_moe_multimodal_tiny", "glm4v_multimodal_tiny", "glm4v_moe_multimodal_tiny", "dots1_tiny", "lfm2_tiny", "lfm2_moe_tiny", "lfm3_tiny", "lfm3_plain_tiny", "minimax_m2_tiny", "olmo3_tiny",
                           "bamba_tiny", "granitemoehybrid_tiny", "granitemoehybrid_dense_tiny", "nemotron_h_tiny",
                           "nemotron_h_latent_tiny", "mamba2_tiny", "mamba2_tiny_tied", "jamba_tiny", "mamba_tiny", "falcon_mamba_tiny", "falcon_h1_tiny",
                           "gemma4_tiny", "gemma4_moe_tiny", "gemma4_multimodal_tiny",
                           "llama_ct_int_tiny", "qwen3_ct_fp8_tiny", "deepseek_v3_ct_int4_tiny", "kimi_k25_ct_int4_tiny", "qwen2_awq_tiny",
                           "qwen2_awq_ct_tiny", "llama_gptq_int4_tiny", "qwen2_gptq_asym_tiny", "llama_gptq_int8_tiny",
                           "llama_gptq_act_order_tiny" }) do
      it(name .. ": split over CPU and disk under a CPU budget, same logits and greedy ids", function()
         local exp = H.expected(name)
         local dir = H.tmpdir()
         local model = models.from_pretrained(H.FIX .. "/" .. name,
            { device_map = "auto", max_memory = { cpu = budget[name] or 70000 }, offload_folder = dir })
         local places = {}
         for _, dev in pairs(model.hf_device_map) do places[tostring(dev)] = true end
         assert.is_true(places.cpu and places.disk, "expected a CPU + disk split")
         -- (Qwen3-Next's and Qwen3.5's fixtures round to a few 1e-4: tests/models_qwen3_next_spec.lua)
         local tol = name:find("^qwen3_") and 1e-3 or 1e-4
         assert.is_true(H.max_abs_diff(model(ml.tensor(exp.input_ids, { dtype = "int64" })), exp.logits) < tol)
         assert.are.same(exp.greedy_ids[1], model:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens, eos_token_id = false }))
         H.rmdir(dir)
      end)
   end

   it("maps a checkpoint without the transformer. prefix before placing it", function()
      local exp = H.expected("gpt2_tiny")
      local src = H.tmpdir()
      H.copy(H.FIX .. "/gpt2_tiny/config.json", src .. "/config.json")
      H.copy(H.FIX .. "/gpt2_tiny/noprefix.safetensors", src .. "/model.safetensors")
      local off = H.tmpdir()
      local model = models.from_pretrained(src, { device_map = "auto", max_memory = { cpu = 70000 },
         offload_folder = off })
      local places = {}
      for _, dev in pairs(model.hf_device_map) do places[tostring(dev)] = true end
      assert.is_true(places.cpu and places.disk, "expected a CPU + disk split")
      assert.are.equal(model.transformer.wte.weight, model.lm_head.weight)
      assert.is_true(H.max_abs_diff(model(exp.input_ids), exp.logits) < 1e-4)
      H.rmdir(src)
      H.rmdir(off)
   end)

   it("dispatches a tie split by a custom map, either way round (embedding on disk, head in memory)", function()
      local exp = H.expected("llama_tiny_tied")
      for _, places in ipairs({ { "disk", "cpu" }, { "cpu", "disk" } }) do
         local off = H.tmpdir()
         local model = models.from_pretrained(H.FIX .. "/llama_tiny_tied", { offload_folder = off, device_map = {
            ["model.embed_tokens"] = places[1], ["model.layers"] = "cpu", ["model.norm"] = "cpu",
            ["model.rotary_emb"] = "cpu", lm_head = places[2] } })
         assert.is_true(H.max_abs_diff(model(exp.input_ids), exp.logits) < 1e-4, table.concat(places, " + "))
         H.rmdir(off)
      end
   end)

   it("zamba_tiny, zamba2_tiny: a shared block stored under one layer, used by a layer on the other side of a custom map", function()
      shared_block_split({ { "cpu", "disk" }, { "disk", "cpu" } })
   end)

   it("reads a sharded checkpoint through its index", function()
      local exp = H.expected("gpt2_tiny")
      local model = models.from_pretrained(H.FIX .. "/gpt2_tiny_sharded", { device_map = "auto" })
      assert.are.equal("cpu", model.hf_device_map[""])
      assert.is_true(H.max_abs_diff(model(exp.input_ids), exp.logits) < 1e-4)
   end)
end)

describe("models.from_pretrained with device_map on cuda #cuda", function()
   H.collect_warnings()
   it("zamba_tiny, zamba2_tiny: a shared block split between cuda:0 and the disk or the CPU, every way round", function()
      shared_block_split({ { "cuda:0", "disk" }, { "disk", "cuda:0" }, { "cuda:0", "cpu" }, { "cpu", "cuda:0" } })
   end)
end)
