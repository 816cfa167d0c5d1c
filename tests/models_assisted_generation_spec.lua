-- Assisted generation (models/assisted_generation.lua, generate's assistant_model): the output is
-- the model's own greedy output, token for token, whatever the draft proposes; what changes is
-- the number of the model's forwards. Also KVCache:crop, which it relies on.
local ml = require("moonload")
local H = require("models_helpers")

local PROMPT = { 3, 17, 5, 9 }

local function model(name, opts) return ml.models.from_pretrained(H.FIX .. "/" .. name, opts) end

describe("assisted generation", function()
   local main = model("llama_tiny_untied")
   local plain = main:generate(PROMPT, { max_new_tokens = 40, eos_token_id = false })

   it("gives the model's greedy tokens with any draft, in fewer forwards the more it accepts", function()
      local drafts = {
         { "itself", main, 40 },                              -- accepts everything
         { "its int4 copy", model("llama_tiny_untied", { quantize = "int4" }), 40 },
         { "another model", model("llama_tiny_tied"), 40 },  -- accepts (almost) nothing
      }
      local forwards = {}
      for _, d in ipairs(drafts) do
         local stats = {}
         local got = main:generate(PROMPT, { max_new_tokens = 40, eos_token_id = false, assistant_model = d[2],
            assistant_stats = stats })
         assert.are.same(plain, got, d[1])
         assert.is_true(stats.accepted <= stats.proposed, d[1])
         forwards[#forwards + 1] = stats.forwards
         -- every new token comes from an accepted proposal or from one of the model's forwards
         assert.are.equal(40, stats.accepted + stats.forwards, d[1])
      end
      -- itself: the prompt's forward, then rounds of 5, 7, 9, 11 proposals (two more after each
      -- full acceptance), each adding one of its own, and 2 for the last 3 tokens
      assert.are.equal(6, forwards[1])
      assert.is_true(forwards[1] < forwards[2] and forwards[2] < forwards[3], table.concat(forwards, ", "))
   end)

   it("takes the input forms, stops at eos, keeps min_new_tokens, streams with on_token", function()
      local draft = model("llama_tiny_untied", { quantize = "int8" })
      local eos = plain[#PROMPT + 7]
      local want = main:generate(PROMPT, { max_new_tokens = 40, eos_token_id = eos })
      assert.are.same(want, main:generate(PROMPT, { max_new_tokens = 40, eos_token_id = eos, assistant_model = draft }))
      local banned = main:generate(PROMPT, { max_new_tokens = 20, eos_token_id = eos, min_new_tokens = 10 })
      assert.are.same(banned, main:generate(PROMPT, { max_new_tokens = 20, eos_token_id = eos, min_new_tokens = 10,
         assistant_model = draft }))
      local seen = {}
      local got = main:generate({ PROMPT }, { max_new_tokens = 12, eos_token_id = false, assistant_model = draft,
         on_token = function(ids, step) seen[#seen + 1] = ids[1]; if step == 9 then return false end end })
      assert.are.same({ { unpack(plain, 1, #PROMPT + 9) } }, got)
      assert.are.same({ unpack(plain, #PROMPT + 1, #PROMPT + 9) }, seen)
      local t = main:generate(ml.tensor({ PROMPT }, { dtype = "int64" }), { max_new_tokens = 3, eos_token_id = false,
         assistant_model = draft })
      assert.are.same({ 1, #PROMPT + 3 }, t.shape)
      for _, n in ipairs({ 0, 1, 2 }) do
         assert.are.same({ unpack(plain, 1, #PROMPT + n) },
            main:generate(PROMPT, { max_new_tokens = n, eos_token_id = false, assistant_model = draft }))
      end
   end)

   it("crops sliding-window caches and an int8 cache (Mistral, Qwen2 windows of 4 and 3)", function()
      for _, name in ipairs({ "mistral_tiny", "qwen2_tiny" }) do
         local m = model(name)
         local want = m:generate(PROMPT, { max_new_tokens = 30, eos_token_id = false })
         for _, draft in ipairs({ m, model(name, { quantize = "int4" }) }) do
            assert.are.same(want, m:generate(PROMPT, { max_new_tokens = 30, eos_token_id = false, assistant_model = draft }), name)
         end
         local q8 = m:generate(PROMPT, { max_new_tokens = 30, eos_token_id = false, kv_cache_dtype = "int8" })
         assert.are.same(q8, m:generate(PROMPT, { max_new_tokens = 30, eos_token_id = false, kv_cache_dtype = "int8",
            assistant_model = m }), name)
      end
   end)

   it("takes proposals from the sequence itself with prompt_lookup_num_tokens, the same tokens again", function()
      for _, name in ipairs({ "llama_tiny_untied", "gpt2_tiny", "mistral_tiny" }) do
         local m = model(name)
         local want = m:generate(PROMPT, { max_new_tokens = 60, eos_token_id = false })
         local stats = {}
         assert.are.same(want, m:generate(PROMPT, { max_new_tokens = 60, eos_token_id = false, prompt_lookup_num_tokens = 10,
            assistant_stats = stats }), name)
         assert.are.equal(60, stats.accepted + stats.forwards, name)
         assert.are.equal(0, stats.draft_forwards)
         if name == "gpt2_tiny" then                          -- its greedy output repeats itself: lookups hit
            assert.is_true(stats.accepted >= 10, name .. ": " .. stats.accepted .. " accepted")
         end
         for _, ngram in ipairs({ 1, 3 }) do
            assert.are.same(want, m:generate(PROMPT, { max_new_tokens = 60, eos_token_id = false, prompt_lookup_num_tokens = 4,
               max_matching_ngram_size = ngram }), name)
         end
      end
   end)

   it("names what it cannot do", function()
      local function err(opts)
         if opts.assistant_model == nil then opts.assistant_model = main end
         if opts.assistant_model == "none" then opts.assistant_model = nil end
         local ok, e = pcall(main.generate, main, PROMPT, opts)
         assert.is_false(ok)
         return e
      end
      assert.truthy(err({ assistant_model = {} }):find("generate: assistant_model must be a causal language model", 1, true))
      assert.truthy(err({ do_sample = true }):find("generate: assistant_model verifies greedy picks and does not sample", 1, true))
      assert.truthy(err({ temperature = 0.7 }):find("does not sample", 1, true))
      assert.truthy(err({ repetition_penalty = 1.2 }):find("generate: assistant_model does not support repetition_penalty", 1, true))
      assert.truthy(err({ num_assistant_tokens = 0 }):find("generate: num_assistant_tokens must be an integer >= 1, got 0", 1, true))
      assert.truthy(err({ prompt_lookup_num_tokens = 3 }):find("generate: assistant_model and prompt_lookup_num_tokens are two ways of proposing tokens: pass one", 1, true))
      assert.truthy(err({ assistant_model = "none", prompt_lookup_num_tokens = 2.5 }):find("generate: prompt_lookup_num_tokens must be an integer >= 1, got 2.5", 1, true))
      assert.truthy(err({ assistant_model = "none", prompt_lookup_num_tokens = 3, max_matching_ngram_size = 0 }):find("generate: max_matching_ngram_size must be an integer >= 1, got 0", 1, true))
      assert.truthy(err({ assistant_model = "none", prompt_lookup_num_tokens = 3, do_sample = true }):find("generate: prompt_lookup_num_tokens verifies greedy picks", 1, true))
      local ok, e = pcall(main.generate, main, { PROMPT, PROMPT }, { assistant_model = main })
      assert.is_false(ok)
      assert.truthy(e:find("generate: assistant_model takes one prompt at a time, got a batch of 2", 1, true), e)
      local ok2, e2 = pcall(main.generate, main, PROMPT, { assistant_model = main, attention_mask = { { 0, 1, 1, 1 } } })
      assert.is_false(ok2)
      assert.truthy(e2:find("generate: assistant_model does not support a padding attention_mask", 1, true), e2)
      -- a tokenizer's all-ones mask is fine; a config that samples: the call can turn it off
      assert.are.same({ unpack(plain, 1, #PROMPT + 3) }, main:generate(PROMPT, { max_new_tokens = 3, eos_token_id = false,
         assistant_model = main, attention_mask = { { 1, 1, 1, 1 } } }))
      assert.are.same({ unpack(plain, 1, #PROMPT + 5) }, main:generate(PROMPT, { max_new_tokens = 5, eos_token_id = false,
         assistant_model = main, do_sample = false, temperature = 0.7 }))
   end)
end)

describe("KVCache:crop", function()
   it("forgets the last tokens, so a forward after it sees only the first ones", function()
      local m = model("llama_tiny_untied")
      local ids = ml.tensor({ { 3, 17, 5, 9, 44, 61 } }, { dtype = "int64" })
      local want = m(ids:narrow(2, 1, 5))
      local cache = m:new_cache(16)
      m(ids, { cache = cache })
      assert.are.equal(6, cache.length)
      cache:crop(4)
      local got = m(ids:narrow(2, 5, 1), { cache = cache })
      assert.is_true(ml.allclose(got:select(2, 1), want:select(2, 5), 1e-5, 1e-5))
      assert.has_error(function() cache:crop(6) end, "KVCache: crop to 6 tokens, expected an integer in 0..5 (the length)")
   end)

   it("refuses to go back past what a sliding window kept", function()
      local m = model("mistral_tiny")                         -- window 4
      local cache = m:new_cache(8)
      local ids = {}
      for i = 1, 12 do ids[i] = (i * 7) % 100 end
      m(ml.tensor({ { unpack(ids, 1, 8) } }, { dtype = "int64" }), { cache = cache })
      for i = 9, 12 do m(ml.tensor({ { ids[i] } }, { dtype = "int64" }), { cache = cache }) end
      assert.is_true(cache:can_crop(12))
      assert.is_false(cache:can_crop(2))
      local ok, e = pcall(cache.crop, cache, 2)
      assert.is_false(ok)
      assert.truthy(e:find("no longer holds the keys of its window", 1, true), e)
   end)
end)

describe("assisted generation on cuda #cuda", function()
   it("gives the model's greedy tokens with the model over cuda:0, cpu and disk and the draft on the CPU", function()
      local dir = H.tmpdir()
      local m = model("llama_tiny_untied", { offload_folder = dir, device_map = { ["model.embed_tokens"] = 0,
         ["model.layers.0"] = 0, ["model.layers.1"] = "disk", ["model.norm"] = "cpu", ["model.rotary_emb"] = 0, lm_head = 0 } })
      local want = m:generate(PROMPT, { max_new_tokens = 20, eos_token_id = false })
      local stats = {}
      local got = m:generate(PROMPT, { max_new_tokens = 20, eos_token_id = false, kv_cache_dtype = "int8",
         assistant_model = model("llama_tiny_untied", { quantize = "int4" }), assistant_stats = stats })
      assert.are.same(m:generate(PROMPT, { max_new_tokens = 20, eos_token_id = false, kv_cache_dtype = "int8" }), got)
      assert.is_true(stats.forwards < 20)
      -- and a draft on the GPU too
      assert.are.same(want, m:generate(PROMPT, { max_new_tokens = 20, eos_token_id = false,
         assistant_model = model("llama_tiny_untied", { device_map = { [""] = 0 } }) }))
      H.rmdir(dir)
   end)
end)
