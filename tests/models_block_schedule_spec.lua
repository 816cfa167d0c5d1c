-- The block schedule (models/block_schedule.lua): micro_batch_size rows and prefill_chunk_size
-- tokens at a time through each layer give the logits, caches and tokens of the whole batch,
-- load each offloaded layer once per forward, and hold less activation memory.
local ml = require("moonload")
local hooks = require("moonload.hooks")
local H = require("models_helpers")

local FIX = "tests/fixtures/models/"

-- Deterministic prompts (B, L) within the vocabulary.
local function prompts(vocab, B, L)
   local rows = {}
   for b = 1, B do
      rows[b] = {}
      for t = 1, L do rows[b][t] = (b * 31 + t * 17 + b * t) % vocab end
   end
   return ml.tensor(rows, { dtype = "int64" })
end

local function max_diff(a, b) return (a - b):abs():max():item() end

describe("models block schedule", function()
   H.collect_warnings()         -- (dispatching with disk offload warns of weights on meta)
   -- every family with a decoder loop of its own, and sliding windows (3-5 tokens) shorter
   -- than the chunks and longer than some
   local families = { "llama_tiny_untied", "gpt2_tiny", "gpt_neox_tiny", "mistral_tiny", "gemma2_tiny",
      "gemma3_tiny", "phi_tiny", "phi3_tiny", "qwen3_moe_tiny", "starcoder2_tiny", "opt_tiny", "bloom_tiny", "falcon_tiny_new_arch", "gptj_tiny",
      "llama4_tiny", "ernie4_5_moe_tiny", "exaone4_tiny", "smollm3_tiny", "hunyuan_v1_moe_tiny", "cohere2_tiny", "granitemoe_tiny", "olmoe_tiny", "phimoe_tiny", "internlm3_tiny", "arcee_tiny", "apertus_tiny", "gemma_tiny", "ministral_tiny", "helium_tiny", "glm_tiny", "olmo_tiny", "nemotron_tiny", "stablelm_tiny", "stablelm_12b_tiny", "gpt_bigcode_tiny", "gpt_bigcode_mha_tiny", "exaone_tiny", "vaultgemma_tiny", "mpt_tiny", "solar_open_tiny", "dbrx_tiny", "gpt_neo_tiny", "codegen_tiny", "flex_olmo_tiny", "cohere2_moe_tiny", "cohere2_moe_sigmoid_tiny", "afmoe_tiny", "hy_v3_tiny", "mimo_v2_flash_tiny", "longcat_flash_tiny", "laguna_tiny", "laguna_per_element_tiny", "exaone_moe_tiny", "minicpm3_tiny", "zamba_tiny", "zamba2_tiny", "zamba2_untied_tiny", "recurrent_gemma_tiny", "youtu_tiny", "diffllama_tiny", "doge_tiny", "gpt_neox_japanese_tiny", "lara_mini_tiny", "axk2_tiny", "dory_tiny", "zaya_tiny", "apertus1p5_text_tiny", "apertus1p5_multimodal_tiny", "cohere_compass_text_tiny", "cohere_compass_multimodal_tiny", "jetmoe_tiny", "sarvam_moe_tiny", "sarvam_mla_tiny", "kolibri1_tiny", "flint_tiny", "axk1_tiny", "mellum_tiny", "persimmon_tiny", "xglm_tiny", "biogpt_tiny", "openai_gpt_tiny", "ctrl_tiny", "gpt_sw3_tiny", "iquestcoder_tiny", "cwm_tiny", "jais2_tiny", "bitnet_tiny", "nanochat_tiny", "granitemoeshared_tiny", "granite_swa_tiny", "granitemoe_swa_tiny", "hyperclovax_tiny",
      "glm4v_multimodal_tiny", "glm4v_moe_multimodal_tiny", "dots1_tiny", "gemma4_tiny", "gemma4_moe_tiny" }
   local blockings = {
      { micro_batch_size = 2 },
      { prefill_chunk_size = 4 },
      { micro_batch_size = 3, prefill_chunk_size = 7 },
      { micro_batch_size = 1, prefill_chunk_size = 1 },
   }
   for _, name in ipairs(families) do
      describe(name, function()
         local model, ids                       -- loaded for these tests only (the suite's heap stays small)
         setup(function()
            model = ml.models.from_pretrained(FIX .. name)
            ids = prompts(model.config.vocab_size, 5, 19)
         end)
         teardown(function() model, ids = nil, nil end)

         it("gives the whole batch's logits, block by block", function()
            local ref = model(ids)
            for _, b in ipairs(blockings) do
               local got = model(ids, b)
               assert.are.same(ref.shape, got.shape)
               assert.is_true(max_diff(ref, got) < 1e-4, name .. " " .. require("cjson").encode(b))
            end
         end)

         it("fills the cache as the whole batch does and decodes after it", function()
            local whole, blocked = model:new_cache(24), model:new_cache(24)
            model(ids, { cache = whole })
            model(ids, { cache = blocked, micro_batch_size = 2, prefill_chunk_size = 6 })
            assert.are.equal(19, blocked.length)
            local step = prompts(model.config.vocab_size, 5, 1)
            local a = model(step, { cache = whole })
            local b = model(step, { cache = blocked, micro_batch_size = 2 })
            assert.is_true(max_diff(a, b) < 1e-4)
         end)

         it("generates the same tokens, padded rows included", function()
            local P, mask = H.padded_prompts(model, 4, 9)
            local want = model:generate(P, { max_new_tokens = 8, attention_mask = mask })
            local got = model:generate(P, { max_new_tokens = 8, attention_mask = mask,
               micro_batch_size = 3, prefill_chunk_size = 2 })
            assert.are.same(want, got)
         end)
      end)
   end

   it("runs decoding steps (one token per row) and blocks as large as the batch whole", function()
      local schedule = require("moonload.models.block_schedule")
      assert.is_nil(schedule.plan({ micro_batch_size = 2 }, ml.zeros(5, 1, 8), nil, 2, "t"))
      assert.is_nil(schedule.plan({ micro_batch_size = 5, prefill_chunk_size = 9 }, ml.zeros(5, 9, 8), nil, 2, "t"))
      local s = schedule.plan({ micro_batch_size = 2 }, ml.zeros(5, 2, 8), nil, 2, "t")
      assert.are.same({ 2, 2, false }, { s.rows, s.tokens, s.own_cache })
      s = schedule.plan({ prefill_chunk_size = 4 }, ml.zeros(5, 9, 8), nil, 2, "t")
      assert.are.same({ 5, 4, true }, { s.rows, s.tokens, s.own_cache })
   end)

   it("rejects sizes that are not positive integers, naming the option", function()
      local model = ml.models.from_pretrained(FIX .. "llama_tiny_untied")
      local ids = prompts(model.config.vocab_size, 2, 3)
      for _, bad in ipairs({ 0, -1, 1.5, "2" }) do
         local ok, err = pcall(model, ids, { micro_batch_size = bad })
         assert.is_false(ok)
         assert.is_truthy(tostring(err):find("micro_batch_size must be an integer >= 1, got " .. tostring(bad), 1, true))
         ok, err = pcall(model.generate, model, { 1, 2 }, { prefill_chunk_size = bad })
         assert.is_false(ok)
         assert.is_truthy(tostring(err):find("generate: prefill_chunk_size must be an integer >= 1", 1, true))
      end
   end)

   it("loads each disk-offloaded layer once per forward, however many blocks", function()
      local model = ml.models.from_pretrained(FIX .. "llama_tiny_untied", {
         device_map = { ["model.embed_tokens"] = "cpu", ["model.layers.0"] = "disk", ["model.layers.1"] = "disk",
            ["model.norm"] = "cpu", ["model.rotary_emb"] = "cpu", lm_head = "cpu" },
         offload_folder = H.tmpdir() })
      local plain = ml.models.from_pretrained(FIX .. "llama_tiny_untied")
      local ids = prompts(model.config.vocab_size, 6, 12)
      local function forward_stats(opts)
         local before = hooks.runtime_stats()
         local out = model(ids, opts)
         local after = hooks.runtime_stats()
         return out, after.materialize_calls - before.materialize_calls, after.releases - before.releases
      end
      local ref, calls, releases = forward_stats()
      assert.are.equal(18, calls)           -- the 9 modules with weights in each of the 2 layers
      local got, blocked_calls, blocked_releases = forward_stats({ micro_batch_size = 2, prefill_chunk_size = 3 })
      assert.are.equal(calls, blocked_calls)
      assert.are.equal(releases, blocked_releases)
      assert.is_true(max_diff(ref, got) < 1e-4)
      assert.is_true(max_diff(plain(ids), got) < 1e-4)
      -- the weights are back on meta between forwards
      assert.is_true(model.model.layers[1].self_attn.q_proj.weight:is_meta())
   end)

   it("holds less activation memory than the whole batch", function()
      -- Measured in a fresh process: it collects dead tensors at every new one (a gc cap of 1
      -- byte) so that the peak counts live tensors only, which the suite's large Lua heap makes slow.
      local script = [[
         package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
         local ml = require("moonload")
         ml.manual_seed(0)
         local model = ml.models.llama.LlamaForCausalLM({ vocab_size = 64, hidden_size = 64,
            intermediate_size = 512, num_hidden_layers = 2, num_attention_heads = 4, num_key_value_heads = 2,
            max_position_embeddings = 512, rms_norm_eps = 1e-5, tie_word_embeddings = false, hidden_act = "silu" })
         local rows = {}
         for b = 1, 8 do
            rows[b] = {}
            for t = 1, 256 do rows[b][t] = (b * 31 + t * 17) % 64 end
         end
         local ids = ml.tensor(rows, { dtype = "int64" })
         ml.set_gc_cap("cpu", 1)
         local function peak(opts)
            collectgarbage()
            local base = ml.memory_allocated("cpu")
            ml.reset_peak_memory("cpu")
            local out = model(ids, opts)
            local _, p = ml.memory_allocated("cpu")
            return p - base, out
         end
         local whole, ref = peak({ logits_to_keep = 1 })
         local blocked, got = peak({ logits_to_keep = 1, micro_batch_size = 2, prefill_chunk_size = 64 })
         print(whole, blocked, (ref - got):abs():max():item())
      ]]
      local p = io.popen((os.getenv("LUAJIT") or "luajit") .. " -e '" .. script .. "' 2>&1")
      local out = p:read("*a")
      p:close()
      local whole, blocked, diff = out:match("^(%S+)%s+(%S+)%s+(%S+)")
      whole, blocked, diff = tonumber(whole), tonumber(blocked), tonumber(diff)
      assert.is_number(diff, out)
      assert.is_true(diff < 1e-4)
      -- the MLP's (rows x tokens x 512) tensors shrink 16 times; the hidden states (8 x 256 x 64)
      -- and the forward's own key-value buffers stay whole
      assert.is_true(blocked < whole / 4, string.format("blocked %d bytes, whole %d", blocked, whole))
   end)
end)

describe("hooks.hold", function()
   it("keeps an offloaded module's weights from its first call to the end, even on an error", function()
      local lin = ml.nn.Linear(4, 3)
      local x = ml.randn({ 2, 4 })
      local want = lin(x)
      hooks.attach_align_device_hook(lin, { execution_device = "cpu", offload = true,
         weights_map = { weight = lin.weight:clone(), bias = lin.bias:clone() } })
      assert.is_true(lin.weight:is_meta())
      local stats0 = hooks.runtime_stats()
      hooks.hold(lin, function()
         assert.is_true(ml.equal(lin(x), want))
         assert.is_false(lin.weight:is_meta())       -- still out after the call
         assert.is_true(ml.equal(lin(x), want))
      end)
      assert.is_true(lin.weight:is_meta())
      assert.are.equal(1, hooks.runtime_stats().materialize_calls - stats0.materialize_calls)
      local ok, err = pcall(hooks.hold, lin, function()
         lin(x)
         error("boom", 0)
      end)
      assert.is_false(ok)
      assert.are.equal("boom", err)
      assert.is_true(lin.weight:is_meta())
      assert.is_true(ml.equal(lin(x), want))
   end)

   it("tells custom hooks when a hold begins and ends", function()
      local Counting = hooks.ModelHook:extend("Counting")
      local events = {}
      function Counting:hold_begin() events[#events + 1] = "begin" end
      function Counting:hold_end() events[#events + 1] = "end" end
      local seq = ml.nn.Sequential(ml.nn.Linear(2, 2), ml.nn.Linear(2, 2))
      hooks.add_hook_to_module(seq[2], Counting())
      local r1, r2 = hooks.hold(seq, function(a, b) return a + 1, b end, 1, "x")
      assert.are.same({ "begin", "end" }, events)
      assert.are.equal(2, r1)
      assert.are.equal("x", r2)
   end)
end)
