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

   it("gives OPT's, BLOOM's, Falcon's and GPT-J's greedy tokens with their int4 copies drafting", function()
      for _, name in ipairs({ "opt_tiny", "bloom_tiny", "falcon_tiny_new_arch", "gptj_tiny" }) do
         local m = model(name)
         local prompt = { 1, 7, 9, 33 }
         local want = m:generate(prompt, { max_new_tokens = 20, eos_token_id = false })
         assert.are.same(want, m:generate(prompt, { max_new_tokens = 20, eos_token_id = false,
            assistant_model = model(name, { quantize = "int4" }) }), name)
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

   it("keeps the plain tokens under a repetition penalty and n-gram blocking (drafted and looked up)", function()
      local draft = model("llama_tiny_untied", { quantize = "int4" })
      -- (n = 1 and a penalty of 5 make each checked position depend on the proposals before it)
      for _, o in ipairs({ { repetition_penalty = 1.3 }, { no_repeat_ngram_size = 2 }, { no_repeat_ngram_size = 1 },
         { repetition_penalty = 5 }, { repetition_penalty = 0.8, no_repeat_ngram_size = 3 } }) do
         o.max_new_tokens, o.eos_token_id = 20, false
         local want = main:generate(PROMPT, o)
         local stats = {}
         o.assistant_model, o.assistant_stats = draft, stats
         assert.are.same(want, main:generate(PROMPT, o))
         assert.is_true(stats.accepted > 0 and stats.forwards < 20)
         o.assistant_model, o.assistant_stats, o.prompt_lookup_num_tokens = nil, nil, 3
         assert.are.same(want, main:generate(PROMPT, o))
      end
      -- gpt2_tiny repeats its last token when let (70 70, 65 65 65): a checked position must see
      -- the proposals before it as part of the sequence
      local gpt2 = model("gpt2_tiny")
      for _, o in ipairs({ { no_repeat_ngram_size = 1 }, { repetition_penalty = 5 } }) do
         o.max_new_tokens, o.eos_token_id = 16, false
         local p = { 5, 17, 42, 3, 99, 0, 64, 8 }
         local want = gpt2:generate(p, o)
         o.assistant_model = gpt2
         assert.are.same(want, gpt2:generate(p, o))
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
      assert.truthy(err({ micro_batch_size = 2 }):find("generate: assistant_model does not support a block schedule", 1, true))
      assert.truthy(err({ num_assistant_tokens = 0 }):find("generate: num_assistant_tokens must be an integer >= 1, got 0", 1, true))
      assert.truthy(err({ prompt_lookup_num_tokens = 3 }):find("generate: assistant_model and prompt_lookup_num_tokens are two ways of proposing tokens: pass one", 1, true))
      assert.truthy(err({ assistant_model = "none", prompt_lookup_num_tokens = 2.5 }):find("generate: prompt_lookup_num_tokens must be an integer >= 1, got 2.5", 1, true))
      assert.truthy(err({ assistant_model = "none", prompt_lookup_num_tokens = 3, max_matching_ngram_size = 0 }):find("generate: max_matching_ngram_size must be an integer >= 1, got 0", 1, true))
      assert.truthy(err({ assistant_model = "none", prompt_lookup_num_tokens = 3, prefill_chunk_size = 4 }):find("generate: prompt_lookup_num_tokens does not support a block schedule", 1, true))
      local ok, e = pcall(main.generate, main, { PROMPT, PROMPT }, { assistant_model = main })
      assert.is_false(ok)
      assert.truthy(e:find("generate: assistant_model takes one prompt at a time, got a batch of 2", 1, true), e)
      local ok2, e2 = pcall(main.generate, main, PROMPT, { assistant_model = main, attention_mask = { { 0, 1, 1, 1 } } })
      assert.is_false(ok2)
      assert.truthy(e2:find("generate: assistant_model does not support a padding attention_mask", 1, true), e2)
      -- a tokenizer's all-ones mask is fine; do_sample = false turns a temperature's sampling off
      assert.are.same({ unpack(plain, 1, #PROMPT + 3) }, main:generate(PROMPT, { max_new_tokens = 3, eos_token_id = false,
         assistant_model = main, attention_mask = { { 1, 1, 1, 1 } } }))
      assert.are.same({ unpack(plain, 1, #PROMPT + 5) }, main:generate(PROMPT, { max_new_tokens = 5, eos_token_id = false,
         assistant_model = main, do_sample = false, temperature = 0.7 }))
   end)
end)

describe("speculative sampling", function()
   local assisted = require("moonload.models.assisted_generation")

   -- Frequencies of the token standing at a round's first position over n rounds: the proposal
   -- drawn from q (or the fixed `certain`), kept or replaced by speculative_pick.
   local function frequencies(p, q, certain, n)
      local P, Q = ml.tensor({ p, p }), q and ml.tensor({ q }) or nil
      local counts = {}
      for i = 1, #p do counts[i] = 0 end
      local function uniform() return ml.rand({ 1 }):item() end
      for _ = 1, n do
         local x = certain or Q:select(1, 1):view(1, #p):multinomial():item()
         local kept, nxt = assisted.speculative_pick(P, Q, { x }, uniform)
         local tok = kept == 1 and x or nxt
         counts[tok + 1] = counts[tok + 1] + 1
      end
      for i = 1, #p do counts[i] = counts[i] / n end
      return counts
   end

   it("stands a proposal or replaces it so that the tokens come out as the model's own distribution", function()
      ml.manual_seed(5)
      local p = { 0.5, 0.2, 0.15, 0.1, 0.05 }
      local n = 10000                                         -- (a frequency's sd: at most 0.005)
      for _, case in ipairs({ { q = { 0.1, 0.1, 0.3, 0.3, 0.2 } }, { q = { 0.05, 0.05, 0.05, 0.05, 0.8 } },
                              { certain = 3 }, { certain = 0 } }) do
         local f = frequencies(p, case.q, case.certain, n)
         for i = 1, #p do
            assert.is_true(math.abs(f[i] - p[i]) < 0.02, ("token %d: %.4f against %.4f"):format(i - 1, f[i], p[i]))
         end
      end
      -- proposals drawn from the model's own distribution all stand
      local P = ml.tensor({ p, p })
      for _ = 1, 200 do
         local x = P:select(1, 1):view(1, 5):multinomial():item()
         assert.are.equal(1, (assisted.speculative_pick(P, ml.tensor({ p }), { x }, function() return ml.rand({ 1 }):item() end)))
      end
   end)

   it("draws from the distribution generate's sampling draws from (temperature, top_k, top_p)", function()
      local rows = ml.tensor({ { 1, 2, 3, 4, 5 } })
      local function near(t, want)
         for i, v in ipairs(t:tolist()[1]) do assert.is_true(math.abs(v - want[i]) < 1e-6, i .. ": " .. v) end
      end
      local e = {}
      for i = 1, 5 do e[i] = math.exp(i / 2) end
      local z = e[1] + e[2] + e[3] + e[4] + e[5]
      near(assisted.distributions(rows, { temperature = 2 }), { e[1] / z, e[2] / z, e[3] / z, e[4] / z, e[5] / z })
      local z3 = e[3] + e[4] + e[5]
      near(assisted.distributions(rows, { temperature = 2, top_k = 3 }), { 0, 0, e[3] / z3, e[4] / z3, e[5] / z3 })
      -- top_p 0.5: the largest (0.42 of the mass at temperature 2) is below 0.5, so the next stays too
      near(assisted.distributions(rows, { temperature = 2, top_p = 0.5 }), { 0, 0, 0, e[4] / (e[4] + e[5]), e[5] / (e[4] + e[5]) })
   end)

   it("samples with a draft or a prompt lookup: reproducible with a seed, greedy's tokens at a near-zero temperature", function()
      local main = model("llama_tiny_untied")
      local draft = model("llama_tiny_untied", { quantize = "int4" })
      local plain = main:generate(PROMPT, { max_new_tokens = 30, eos_token_id = false })
      for _, extra in ipairs({ { assistant_model = draft }, { prompt_lookup_num_tokens = 5 } }) do
         local function run(o)
            for k, v in pairs(extra) do o[k] = v end
            o.max_new_tokens, o.eos_token_id = 30, false
            return main:generate(PROMPT, o)
         end
         local a = run({ do_sample = true, temperature = 0.9, top_k = 20, seed = 7 })
         assert.are.same(a, run({ do_sample = true, temperature = 0.9, top_k = 20, seed = 7 }))
         assert.are_not.same(a, run({ do_sample = true, temperature = 0.9, top_k = 20, seed = 8 }))
         assert.are.same(plain, run({ do_sample = true, temperature = 1e-4 }))
      end
      -- the model as its own draft: every proposal stands
      local stats = {}
      main:generate(PROMPT, { max_new_tokens = 30, eos_token_id = false, do_sample = true, temperature = 1.0,
         assistant_model = main, assistant_stats = stats })
      assert.are.equal(stats.proposed, stats.accepted)
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
