-- generate's beam search (models/beam_search.lua): sequences and scores against transformers'
-- generate(num_beams = n) on the fixture models (tests/fixtures/gen_models.py, beams()), the
-- key-value cache's row reordering, beam sampling, num_return_sequences, and bad options.
local ml = require("moonload")
local T = require("moonload.tensor")
local H = require("models_helpers")
local cjson = require("cjson")
local KVCache = require("moonload.models.kv_cache")

-- generate's options for a fixture case (transformers' None eos is generate's false)
local function case_opts(case, fixture)
   local o = { pad_token_id = 0 }
   for k, v in pairs(case) do
      if k ~= "sequences" and k ~= "sequences_scores" then o[k] = v end
   end
   if o.eos_token_id == nil or o.eos_token_id == cjson.null then o.eos_token_id = false end
   if fixture.attention_mask ~= cjson.null then o.attention_mask = fixture.attention_mask end
   return o
end

local function assert_scores(want, got)
   assert.are.equal(#want, #got)
   for i = 1, #want do
      assert.is_true(math.abs(want[i] - got[i]) <= 1e-4 * math.max(1, math.abs(want[i])),
         string.format("score %d: %.7f, transformers %.7f", i, got[i], want[i]))
   end
end

describe("generate with num_beams", function()
   for _, name in ipairs({ "gpt2_tiny", "llama_tiny_untied", "phi3_tiny_longrope", "qwen3_next_tiny" }) do
      it("gives transformers' sequences and scores (" .. name .. ")", function()
         local model = ml.models.from_pretrained(H.FIX .. "/" .. name)
         local fx = H.read_json(H.FIX .. "/" .. name .. "/beams.json")
         for i, case in ipairs(fx.cases) do
            local ids, scores = model:generate(fx.input_ids, case_opts(case, fx))
            assert.are.same(case.sequences, ids, "case " .. i)
            assert_scores(case.sequences_scores, scores)
         end
      end)
   end

   local model = ml.models.from_pretrained(H.FIX .. "/gpt2_tiny")
   local fx = H.read_json(H.FIX .. "/gpt2_tiny/beams.json")
   local prompts = fx.input_ids

   it("keeps its tokens with the model's layers on cpu and disk, in a block schedule, or with an int8 cache", function()
      local case = fx.cases[2]
      local dir = H.tmpdir()
      local offloaded = ml.models.from_pretrained(H.FIX .. "/gpt2_tiny", { offload_folder = dir, device_map = {
         ["transformer.wte"] = "cpu", ["transformer.wpe"] = "cpu", ["transformer.h.0"] = "disk",
         ["transformer.h.1"] = "cpu", ["transformer.ln_f"] = "disk", lm_head = "cpu" } })
      assert.are.same(case.sequences, (offloaded:generate(prompts, case_opts(case, fx))))
      local o = case_opts(case, fx)
      o.micro_batch_size, o.prefill_chunk_size = 3, 5
      assert.are.same(case.sequences, (model:generate(prompts, o)))
      H.rmdir(dir)
      -- an int8 cache changes the numbers a little, not the shape of the search
      local q = case_opts(case, fx)
      q.kv_cache_dtype = "int8"
      local ids, scores = model:generate(prompts, q)
      assert.are.equal(#case.sequences, #ids)
      for i = 1, #scores do assert.is_true(math.abs(scores[i] - case.sequences_scores[i]) < 0.05) end
   end)

   it("takes num_beams and its companions from the model's generation config", function()
      local case = fx.cases[3]
      local m = ml.models.from_pretrained(H.FIX .. "/gpt2_tiny")
      rawset(m, "generation_config", { num_beams = case.num_beams, num_return_sequences = case.num_return_sequences,
         early_stopping = case.early_stopping, length_penalty = case.length_penalty, eos_token_id = case.eos_token_id,
         pad_token_id = 0 })
      assert.are.same(case.sequences, (m:generate(prompts, { max_new_tokens = case.max_new_tokens })))
      -- the call's num_beams = 1 wins: greedy
      assert.are.same(model:generate(prompts, { max_new_tokens = 5, eos_token_id = false }),
         m:generate(prompts, { max_new_tokens = 5, eos_token_id = false, num_beams = 1, num_return_sequences = 1 }))
   end)

   it("returns flat ids for one prompt and one sequence, nested rows for more", function()
      local one = model:generate(prompts[1], { num_beams = 3, max_new_tokens = 10, eos_token_id = false })
      assert.are.same(fx.cases[1].sequences[1], one)
      local two = model:generate(prompts[1], { num_beams = 3, num_return_sequences = 2, max_new_tokens = 10, eos_token_id = false })
      assert.are.same({ fx.cases[1].sequences[1], fx.cases[1].sequences[2] }, two)
      local t = model:generate(T.tensor(prompts, { dtype = "int64" }), { num_beams = 3, num_return_sequences = 2,
         max_new_tokens = 10, eos_token_id = false })
      assert.are.same({ 4, 18 }, t.shape)
      assert.are.same(fx.cases[1].sequences, t:tolist())
   end)

   it("samples beams reproducibly, and a near-zero temperature gives the search's own sequences", function()
      local o = { num_beams = 3, num_return_sequences = 3, max_new_tokens = 10, eos_token_id = 65, do_sample = true,
         temperature = 1.5, top_k = 20, top_p = 0.9, seed = 7 }
      local a = model:generate(prompts, o)
      assert.are.same(a, model:generate(prompts, o))
      o.seed = 8
      local differs = false
      for s = 8, 11 do
         o.seed = s
         differs = differs or cjson.encode((model:generate(prompts, o))) ~= cjson.encode(a)
      end
      assert.is_true(differs, "other seeds should draw other beams")
      -- the warped scores are the log-probabilities / temperature: ordering unchanged, and the
      -- Gumbel noise negligible next to their gaps
      local case = fx.cases[2]
      local cold = case_opts(case, fx)
      cold.do_sample, cold.temperature, cold.seed = true, 1e-4, 1
      assert.are.same(case.sequences, (model:generate(prompts, cold)))
   end)

   it("draws num_return_sequences samples of each prompt without beams", function()
      local out = model:generate(prompts, { num_return_sequences = 3, max_new_tokens = 6, temperature = 2, seed = 3,
         eos_token_id = false })
      assert.are.equal(6, #out)
      for r = 1, 6 do
         assert.are.same(prompts[math.ceil(r / 3)], { unpack(out[r], 1, 8) })
      end
      local distinct = {}
      for r = 1, 3 do distinct[table.concat(out[r], ",")] = true end
      assert.is_true(next(distinct, next(distinct)) ~= nil, "three draws at temperature 2 should not all agree")
      assert.are.equal(3, #model:generate(prompts[1], { num_return_sequences = 3, max_new_tokens = 2, do_sample = true,
         temperature = 1 }))
   end)

   it("names the option it cannot take", function()
      local function err(opts, msg)
         assert.has_error(function() model:generate(prompts[1], opts) end, msg)
      end
      err({ num_beams = 2, num_return_sequences = 3 }, "generate: num_return_sequences (3) must not exceed num_beams (2)")
      err({ num_beams = 0 }, "generate: num_beams must be an integer >= 1, got 0")
      err({ num_beams = 2, on_token = function() end },
         "generate: num_beams = 2 does not support on_token (tokens are only final once the search ends)")
      err({ num_beams = 2, prompt_lookup_num_tokens = 3 }, "generate: num_beams = 2 does not support prompt_lookup_num_tokens")
      err({ num_beams = 2, early_stopping = "always" }, 'generate: early_stopping must be true, false or "never", got always')
      err({ num_beams = 2, length_penalty = 0 / 0 }, "generate: length_penalty must be a finite number, got nan")
      err({ num_return_sequences = 2 },
         "generate: num_return_sequences = 2 needs sampling (do_sample with a temperature > 0) or num_beams >= 2: greedy decoding gives one sequence per prompt")
   end)
end)

describe("KVCache:reorder", function()
   local function filled(B, L, dtype)
      local c = KVCache.new(1, 8, nil, dtype)
      local k = T.arange(B * 2 * L * 4):view(B, 2, L, 4):float()
      c:update(1, k, k * -1)
      c:advance(L)
      return c, k
   end

   it("copies rows out and lets them follow their beams, in place when the row count stays", function()
      local c, k = filled(2, 3)
      c:reorder({ 0, 0, 0, 1, 1, 1 })                            -- each prompt's row to three beams
      assert.are.same({ 6, 2, 8, 4 }, c.k[1].shape)
      local live = c.k[1]:narrow(3, 1, 3)
      for r, src in ipairs({ 1, 1, 1, 2, 2, 2 }) do assert.is_true(live:select(1, r):equal(k:select(1, src))) end
      local buf = c.k[1]
      c:reorder({ 5, 0, 0, 2, 3, 1 })
      assert.are.equal(buf, c.k[1])                              -- the same buffer, rows moved
      for r, src in ipairs({ 2, 1, 1, 1, 2, 1 }) do
         assert.is_true(c.k[1]:narrow(3, 1, 3):select(1, r):equal(k:select(1, src)))
         assert.is_true(c.v[1]:narrow(3, 1, 3):select(1, r):equal(k:select(1, src) * -1))
      end
      assert.has_error(function() c:reorder({}) end, "KVCache: reorder expects a non-empty Lua list of 0-based rows")
   end)

   it("moves an int8 cache's scales with its values", function()
      local c, k = filled(2, 3, "int8")
      c:reorder({ 1, 0 })
      local back = KVCache.floats(c:update(1, k:narrow(3, 1, 1), k:narrow(3, 1, 1)), "float32")
      assert.is_true(back:narrow(3, 1, 3):select(1, 1):allclose(k:select(1, 2), 0.02, 0.1))
      assert.is_true(back:narrow(3, 1, 3):select(1, 2):allclose(k:select(1, 1), 0.02, 0.1))
   end)
end)

describe("beam search on cuda #cuda", function()
   it("gives transformers' beams with the model over cuda:0, cpu and disk", function()
      local fx = H.read_json(H.FIX .. "/llama_tiny_untied/beams.json")
      local dir = H.tmpdir()
      local m = ml.models.from_pretrained(H.FIX .. "/llama_tiny_untied", { offload_folder = dir, device_map = {
         ["model.embed_tokens"] = 0, ["model.layers.0"] = 0, ["model.layers.1"] = "disk", ["model.norm"] = "cpu",
         ["model.rotary_emb"] = 0, lm_head = 0 } })
      local case = fx.cases[1]
      local ids, scores = m:generate(fx.input_ids, case_opts(case, fx))
      assert.are.same(case.sequences, ids)
      assert_scores(case.sequences_scores, scores)
      H.rmdir(dir)
   end)
end)
