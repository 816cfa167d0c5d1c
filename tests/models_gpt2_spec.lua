-- ml.models GPT-2: Hugging Face names, checkpoints in every layout, logits and greedy
-- generation against transformers (tests/fixtures/gen_models.py), KV-cache decoding, errors.
local ml = require("moonload")
local models = require("moonload.models")
local gpt2 = require("moonload.models.gpt2")
local H = require("models_helpers")

local DIR = H.FIX .. "/gpt2_tiny"
local TOL = 1e-4

local sorted_keys = H.sorted_keys

describe("models.gpt2", function()
   local exp = H.expected("gpt2_tiny")
   local model = models.from_pretrained(DIR)

   describe("structure", function()
      it("uses transformers' parameter names, in registration order", function()
         local names = H.param_names(model)
         assert.are.equal("transformer.wte.weight", names[1])
         assert.are.equal("transformer.wpe.weight", names[2])
         assert.are.equal("transformer.h.0.ln_1.weight", names[3])
         assert.are.equal("transformer.h.0.attn.c_attn.weight", names[5])
         assert.are.equal("transformer.ln_f.bias", names[#names])
         local sd = model:state_dict()
         local expected = {}
         for _, k in ipairs(ml.safetensors.safe_open(DIR .. "/model.safetensors"):keys()) do
            expected[#expected + 1] = k
         end
         expected[#expected + 1] = "lm_head.weight"
         table.sort(expected)
         assert.are.same(expected, sorted_keys(sd))
      end)

      it("ties lm_head.weight to transformer.wte.weight (one tensor object)", function()
         assert.are.equal(model.transformer.wte.weight, model.lm_head.weight)
      end)

      it("uses Conv1D layers with GPT-2's (in, out) weight layout", function()
         assert.are.equal("Conv1D", model.transformer.h[1].attn.c_attn.__name)
         assert.are.same({ 32, 96 }, model.transformer.h[1].attn.c_attn.weight.shape)
         assert.are.same({ 32, 128 }, model.transformer.h[2].mlp.c_fc.weight.shape)
      end)

      it("prints as transformers' module tree", function()
         local text = tostring(model)
         assert.truthy(text:find("GPT2LMHeadModel(\n  (transformer): GPT2Model(\n    (wte): Embedding(100, 32)", 1, true))
         assert.truthy(text:find("(0-1): 2 x GPT2Block(", 1, true))
         assert.truthy(text:find("(c_attn): Conv1D(nf=96, nx=32)", 1, true))
         assert.truthy(text:find("(lm_head): Linear(in_features=32, out_features=100, bias=False)", 1, true))
      end)

      it("builds from a config table with n_inner defaulting to 4 * n_embd", function()
         local m = gpt2.GPT2LMHeadModel({ vocab_size = 10, n_positions = 8, n_embd = 8, n_layer = 1, n_head = 2 })
         assert.are.same({ 8, 32 }, m.transformer.h[1].mlp.c_fc.weight.shape)
         assert.are.equal("GPT2LMHeadModel", m.__name)
      end)
   end)

   describe("against transformers", function()
      it("gives the same logits (batch of 2, within 1e-4)", function()
         local logits = model(ml.tensor(exp.input_ids, { dtype = "int64" }))
         assert.are.same({ 2, 8, 100 }, logits.shape)
         assert.is_true(H.max_abs_diff(logits, exp.logits) < TOL)
      end)

      it("accepts Lua lists of ids", function()
         local logits = model(exp.input_ids[2])
         assert.are.same({ 1, 8, 100 }, logits.shape)
         assert.is_true(H.max_abs_diff(logits:select(1, 1), exp.logits[2]) < TOL)
      end)

      it("generates greedily token for token (batch of 2, tensor in, tensor out)", function()
         local out = model:generate(ml.tensor(exp.input_ids, { dtype = "int64" }),
            { max_new_tokens = exp.max_new_tokens, eos_token_id = false })
         assert.is_true(ml.is_tensor(out))
         assert.are.equal("int64", out.dtype)
         assert.are.same(exp.greedy_ids, out:tolist())
      end)

      it("generates greedily from a flat Lua list and returns a flat list", function()
         local out = model:generate(exp.input_ids[1], { max_new_tokens = exp.max_new_tokens, eos_token_id = false, temperature = 0 })
         assert.are.same(exp.greedy_ids[1], out)
      end)

      it("computes only the last positions' logits with logits_to_keep", function()
         local logits = model(exp.input_ids, { logits_to_keep = 2 })
         assert.are.same({ 2, 2, 100 }, logits.shape)
         assert.is_true(H.max_abs_diff(logits:select(1, 1), { exp.logits[1][7], exp.logits[1][8] }) < TOL)
      end)

      it("loads the sharded checkpoint (model.safetensors.index.json) to the same logits", function()
         local m = models.from_pretrained(H.FIX .. "/gpt2_tiny_sharded")
         local logits = m(ml.tensor(exp.input_ids, { dtype = "int64" }))
         assert.is_true(H.max_abs_diff(logits, exp.logits) < TOL)
      end)

      it("loads a checkpoint without the transformer. prefix (with old attn.bias buffers)", function()
         local m = gpt2.GPT2LMHeadModel(DIR)
         local missing, unexpected = models.load_checkpoint(m, DIR .. "/noprefix.safetensors")
         assert.are.same({}, missing)
         assert.are.same({}, unexpected)
         assert.are.equal(m.transformer.wte.weight, m.lm_head.weight)
         assert.is_true(H.max_abs_diff(m(exp.input_ids[1]):select(1, 1), exp.logits[1]) < TOL)
      end)

      it("loads a checkpoint that stores lm_head.weight and keeps the tie", function()
         local m = gpt2.GPT2LMHeadModel(DIR)
         models.load_checkpoint(m, DIR .. "/with_lm_head.safetensors")
         assert.are.equal(m.transformer.wte.weight, m.lm_head.weight)
         assert.is_true(H.max_abs_diff(m(exp.input_ids[2]):select(1, 1), exp.logits[2]) < TOL)
      end)
   end)

   describe("left-padded batches (attention_mask)", function()
      local pad = H.read_json(DIR .. "/padded.json")

      it("gives transformers' logits at the real positions", function()
         local logits = model(pad.input_ids, { attention_mask = pad.attention_mask })
         -- row 1 has 3 padding positions (their outputs are unused and not compared)
         assert.is_true(H.max_abs_diff(logits:select(1, 1):narrow(1, 4, 3),
            { pad.logits[1][4], pad.logits[1][5], pad.logits[1][6] }) < TOL)
         assert.is_true(H.max_abs_diff(logits:select(1, 2), pad.logits[2]) < TOL)
      end)

      it("generates transformers' greedy ids for prompts of different lengths", function()
         local out = model:generate(pad.input_ids, { attention_mask = pad.attention_mask,
            max_new_tokens = pad.max_new_tokens, eos_token_id = false })
         assert.are.same(pad.greedy_ids, out)
      end)

      it("rejects a mask of the wrong shape", function()
         assert.has_error(function() model:generate(pad.input_ids, { attention_mask = { { 1, 1 } } }) end,
            "generate: attention_mask has shape [1, 2], expected [2, 6]")
      end)
   end)

   describe("from_pretrained options", function()
      it("dtype converts every weight, keeps the tie, and stays close to float32", function()
         local m = models.from_pretrained(DIR, { dtype = "bfloat16" })
         for name, p in m:named_parameters() do
            assert.are.equal("bfloat16", p.dtype, name)
         end
         assert.are.equal(m.transformer.wte.weight, m.lm_head.weight)
         local logits = m(exp.input_ids)
         assert.are.equal("bfloat16", logits.dtype)
         assert.is_true(H.max_abs_diff(logits:float(), exp.logits) < 0.25)
      end)

      it("loads zero-copy into an empty (meta) skeleton by default", function()
         local lib = require("moonload.C").lib
         for name, p in model:named_parameters() do
            assert.are.equal("cpu", p.device, name)
            -- the bytes belong to the mapped checkpoint file, not to a copy
            assert.is_true(lib.ml_storage_is_borrowed(lib.ml_tensor_storage(p._c)), name)
         end
         local m = gpt2.GPT2LMHeadModel(DIR)   -- built normally: own, initialised memory
         assert.is_false(lib.ml_storage_is_borrowed(lib.ml_tensor_storage(m.transformer.wte.weight._c)))
      end)

      it("strict = false builds an initialised model and loads what the checkpoint has", function()
         local m = models.from_pretrained(DIR, { strict = false })
         assert.is_true(H.max_abs_diff(m(exp.input_ids), exp.logits) < TOL)
      end)
   end)

   describe("KV cache", function()
      it("gives the same logits token by token as one full forward", function()
         local ids = exp.input_ids[1]
         local full = model(ids)
         local cache = model:new_cache()
         local first = model(ml.tensor({ { ids[1], ids[2], ids[3] } }, { dtype = "int64" }), { cache = cache })
         assert.is_true(H.max_abs_diff(first, full:narrow(2, 1, 3):tolist()) < 1e-5)
         for i = 4, #ids do
            local step = model({ ids[i] }, { cache = cache })
            assert.are.equal(i, cache.length)
            assert.is_true(H.max_abs_diff(step:select(2, 1), full:narrow(2, i, 1):select(2, 1):tolist()) < 1e-5)
         end
      end)

      it("generate runs the prompt once, then one new token per step", function()
         local m = models.from_pretrained(DIR)
         local wte = m.transformer.wte
         local lengths = {}
         local class_forward = getmetatable(wte).forward
         wte.forward = function(self, ids)
            lengths[#lengths + 1] = ids:size(2)
            return class_forward(self, ids)
         end
         local out = m:generate(exp.input_ids[1], { max_new_tokens = 5 })
         assert.are.same({ 8, 1, 1, 1, 1 }, lengths)
         assert.are.same({ unpack(exp.greedy_ids[1], 1, 13) }, out)
      end)

      it("handles several new tokens after a cached prefix (bottom-right causal mask)", function()
         local ids = exp.input_ids[2]
         local full = model(ids)
         local cache = model:new_cache(2)   -- small capacity: the buffers grow
         model({ ids[1], ids[2] }, { cache = cache })
         local rest = model({ ids[3], ids[4], ids[5], ids[6], ids[7], ids[8] }, { cache = cache })
         assert.is_true(H.max_abs_diff(rest, full:narrow(2, 3, 6):tolist()) < 1e-5)
      end)
   end)

   describe("sampling", function()
      it("is reproducible with a seed", function()
         local o = { max_new_tokens = 10, temperature = 0.9, top_k = 10, seed = 7 }
         local a = model:generate({ 1, 2, 3 }, o)
         local b = model:generate({ 1, 2, 3 }, o)
         assert.are.same(a, b)
         assert.are.equal(13, #a)
         for i = 4, 13 do assert.is_true(a[i] >= 0 and a[i] < 100) end
      end)

      it("top_k = 1 is greedy whatever the temperature", function()
         local g = model:generate(exp.input_ids[1], { max_new_tokens = 8 })
         local s = model:generate(exp.input_ids[1], { max_new_tokens = 8, temperature = 5, top_k = 1, seed = 3 })
         assert.are.same(g, s)
      end)

      it("draws different sequences for different seeds at a high temperature", function()
         local seen, distinct = {}, 0
         for seed = 1, 4 do
            local s = table.concat(model:generate({ 1 }, { max_new_tokens = 12, temperature = 3, seed = seed }), ",")
            if not seen[s] then seen[s] = true; distinct = distinct + 1 end
         end
         assert.is_true(distinct >= 2)
      end)

      it("applies a repetition penalty as transformers does (greedy, above and below 1)", function()
         local pen = H.read_json(H.FIX .. "/gpt2_tiny/penalty.json")
         for _, c in ipairs(pen.cases) do
            assert.are.same(c.greedy_ids, model:generate(pen.input_ids, { max_new_tokens = pen.max_new_tokens,
               repetition_penalty = c.repetition_penalty }))
         end
         assert.are_not.same(pen.cases[1].greedy_ids, model:generate(pen.input_ids, { max_new_tokens = pen.max_new_tokens }))
      end)

      it("never repeats an n-gram with no_repeat_ngram_size, as transformers does (greedy and beams)", function()
         local nr = H.read_json(H.FIX .. "/gpt2_tiny/no_repeat.json")
         for _, c in ipairs(nr.cases) do
            local eos = c.eos_token_id
            if eos == nil or eos == require("cjson").null then eos = false end
            assert.are.same(c.sequences, (model:generate(nr.input_ids, { max_new_tokens = c.max_new_tokens,
               no_repeat_ngram_size = c.no_repeat_ngram_size, num_beams = c.num_beams,
               num_return_sequences = c.num_return_sequences, eos_token_id = eos, pad_token_id = 0 })))
         end
         -- (0 turns it off, as in transformers)
         assert.are.same(model:generate(nr.input_ids, { max_new_tokens = 6 }),
            model:generate(nr.input_ids, { max_new_tokens = 6, no_repeat_ngram_size = 0 }))
         assert.has_error(function() model:generate({ 1 }, { no_repeat_ngram_size = -1 }) end,
            "generate: no_repeat_ngram_size must be an integer >= 0, got -1")
      end)

      it("keeps bad_words_ids out of the output as transformers does (greedy, beams, prompt lookup)", function()
         local bw = H.read_json(H.FIX .. "/gpt2_tiny/bad_words.json")
         local function opts(c)
            return { max_new_tokens = 12, bad_words_ids = c.bad_words_ids, num_beams = c.num_beams,
               num_return_sequences = c.num_return_sequences, no_repeat_ngram_size = c.no_repeat_ngram_size,
               eos_token_id = c.eos_token_id or false, pad_token_id = 0 }
         end
         for _, c in ipairs(bw.cases) do
            assert.are.same(c.sequences, (model:generate(bw.input_ids, opts(c))))
         end
         -- each ban bites: without it the output is the unbanned one
         local free = model:generate(bw.input_ids, { max_new_tokens = 12, eos_token_id = false, pad_token_id = 0 })
         for b = 1, 2 do assert.are.same(bw.unbanned[b], { unpack(free[b], 9) }) end
         local lk = bw.lookup
         assert.are.same(lk.sequences, { model:generate(lk.input_ids[1], { max_new_tokens = 12, eos_token_id = false,
            pad_token_id = 0, prompt_lookup_num_tokens = 3, bad_words_ids = lk.bad_words_ids }) })
         assert.has_error(function() model:generate({ 1 }, { bad_words_ids = { 3 } }) end,
            "generate: bad_words_ids[1] must be a non-empty list of token ids, got 3")
         assert.has_error(function() model:generate({ 1 }, { bad_words_ids = { { 3, -1 } } }) end,
            "generate: bad_words_ids[1][2] must be an integer >= 0, got -1")
         assert.has_error(function() model:generate({ 1 }, { bad_words_ids = {} }) end,
            "generate: bad_words_ids must be a non-empty list of lists of token ids, got an empty list")
         assert.has_error(function() model:generate({ 1 }, { bad_words_ids = { { 7 }, { 3, 100 } } }) end,
            "generate: bad_words_ids[2] holds id 100, outside the vocabulary (100 ids)")
      end)

      it("streams each step's ids to on_token, and stops when it returns false", function()
         local full = model:generate(exp.input_ids, { max_new_tokens = 6 })
         local seen = {}
         local out = model:generate(exp.input_ids, { max_new_tokens = 6, on_token = function(ids, step)
            seen[step] = ids
         end })
         assert.are.same(full, out)
         for step = 1, 6 do
            assert.are.same({ full[1][#exp.input_ids[1] + step], full[2][#exp.input_ids[2] + step] }, seen[step])
         end
         local short = model:generate(exp.input_ids[1], { max_new_tokens = 6, on_token = function(_, step) return step < 3 end })
         assert.are.equal(#exp.input_ids[1] + 3, #short)
         assert.has_error(function() model:generate({ 1 }, { on_token = 5 }) end, "generate: on_token must be a function, got number")
      end)

      it("stops at eos_token_id", function()
         local g = model:generate(exp.input_ids[1], { max_new_tokens = 12 })
         local eos = g[#exp.input_ids[1] + 3]
         local s = model:generate(exp.input_ids[1], { max_new_tokens = 12, eos_token_id = eos })
         assert.is_true(#s <= #exp.input_ids[1] + 3)
         assert.are.equal(eos, s[#s])
      end)

      it("stops at any id of an eos_token_id list, padding finished rows with the first", function()
         local n = #exp.input_ids[1]
         local g = model:generate(exp.input_ids, { max_new_tokens = 12 })
         local first, second = g[1][n + 2], g[2][n + 4]
         local s = model:generate(exp.input_ids, { max_new_tokens = 12, eos_token_id = { 99, first, second } })
         local stop1, stop2
         for i = n + 1, #s[1] do if not stop1 and (s[1][i] == first or s[1][i] == second) then stop1 = i end end
         for i = n + 1, #s[2] do if not stop2 and (s[2][i] == first or s[2][i] == second) then stop2 = i end end
         assert.is_truthy(stop1 and stop2)
         assert.are.equal(math.max(stop1, stop2), #s[1])              -- stopped once both rows had
         local early = stop1 < stop2 and s[1] or s[2]
         for i = math.min(stop1, stop2) + 1, #early do assert.are.equal(99, early[i]) end
      end)

      -- The nucleus as transformers' TopPLogitsWarper computes it: sorted ascending, a token is
      -- dropped while the cumulative probability up to it is <= 1 - top_p.
      local function nucleus_set(logits, temperature, top_p)
         local order = {}
         for i = 1, #logits do order[i] = i end
         table.sort(order, function(a, b) return logits[a] < logits[b] end)
         local mx, z = -math.huge, 0
         for _, v in ipairs(logits) do mx = math.max(mx, v / temperature) end
         for _, v in ipairs(logits) do z = z + math.exp(v / temperature - mx) end
         local keep, cum = {}, 0
         for rank, i in ipairs(order) do
            cum = cum + math.exp(logits[i] / temperature - mx) / z
            if cum > 1 - top_p or rank == #order then keep[i - 1] = true end   -- 0-based ids
         end
         return keep
      end

      it("top_p draws only from the nucleus of most likely tokens (transformers' TopPLogitsWarper)", function()
         local prompt = exp.input_ids[1]
         local logits = model(prompt):select(2, -1):select(1, 1):tolist()
         local keep = nucleus_set(logits, 1.5, 0.6)
         local size = 0
         for _ in pairs(keep) do size = size + 1 end
         assert.is_true(size >= 2 and size < 100, "the test needs a nucleus of a few tokens, got " .. size)
         local drawn, distinct = {}, 0
         for seed = 1, 40 do
            local tok = model:generate(prompt, { max_new_tokens = 1, temperature = 1.5, top_p = 0.6, seed = seed })[#prompt + 1]
            assert.is_true(keep[tok] == true, "drew token " .. tok .. " outside the nucleus")
            if not drawn[tok] then drawn[tok] = true; distinct = distinct + 1 end
         end
         assert.is_true(distinct >= 2)
         -- a flat distribution (high temperature): the nucleus is wider than the first 64 tokens
         -- looked at, so the search widens to the whole vocabulary
         keep = nucleus_set(logits, 50, 0.9)
         size = 0
         for _ in pairs(keep) do size = size + 1 end
         assert.is_true(size > 64 and size < 100, "expected a nucleus of 65-99 tokens, got " .. size)
         local order = {}
         for i = 1, #logits do order[i] = i - 1 end
         table.sort(order, function(a, b) return logits[a + 1] > logits[b + 1] end)
         local rank = {}
         for r, id in ipairs(order) do rank[id] = r end
         local beyond = 0             -- draws past the 64 most likely: (64/90)^40 ~ 1e-6 to see none
         for seed = 1, 40 do
            local tok = model:generate(prompt, { max_new_tokens = 1, temperature = 50, top_p = 0.9, seed = seed })[#prompt + 1]
            assert.is_true(keep[tok] == true, "drew token " .. tok .. " outside the nucleus")
            if rank[tok] > 64 then beyond = beyond + 1 end
         end
         assert.is_true(beyond > 0)
         -- with top_k too, the nucleus is taken within the top k (transformers' order)
         local g = model:generate(prompt, { max_new_tokens = 6 })
         assert.are.same(g, model:generate(prompt, { max_new_tokens = 6, temperature = 2, top_p = 1e-6, seed = 5 }))
         assert.are.same(model:generate(prompt, { max_new_tokens = 6, temperature = 2, seed = 5 }),
            model:generate(prompt, { max_new_tokens = 6, temperature = 2, top_p = 1, seed = 5 }))
         local s = model:generate(prompt, { max_new_tokens = 6, temperature = 2, top_k = 3, top_p = 0.999, seed = 5 })
         assert.are.same(s, model:generate(prompt, { max_new_tokens = 6, temperature = 2, top_k = 3, seed = 5 }))
      end)
   end)

   describe("bad input", function()
      it("rejects token ids outside the vocabulary", function()
         assert.has_error(function() model({ 1, 100 }) end,
            "models.gpt2.forward: token id 100 is out of range for vocab_size 100 (ids are 0-based)")
         assert.has_error(function() model:generate({ -1 }) end,
            "generate: input_ids[1][1] = -1 is not a non-negative integer token id")
      end)

      it("rejects sequences longer than n_positions", function()
         assert.has_error(function() model:generate({ 1, 2 }, { max_new_tokens = 63 }) end,
            "generate: prompt of 2 tokens + max_new_tokens 63 exceeds the model's 64 positions")
      end)

      it("rejects bad generate options", function()
         assert.has_error(function() model:generate({ 1 }, { max_new_tokens = -1 }) end,
            "generate: max_new_tokens must be an integer >= 0, got -1")
         assert.has_error(function() model:generate({ 1 }, { temperature = -0.5 }) end,
            "generate: temperature must be a number >= 0, got -0.5")
         assert.has_error(function() model:generate({ 1 }, { max_tokens = 3 }) end,
            'generate: unknown option "max_tokens" (expected max_new_tokens, min_new_tokens, max_length, min_length, temperature, top_k, top_p, min_p, seed, do_sample, eos_token_id, pad_token_id, attention_mask, repetition_penalty, no_repeat_ngram_size, bad_words_ids, forced_bos_token_id, forced_eos_token_id, on_token, num_beams, num_return_sequences, length_penalty, early_stopping, micro_batch_size, prefill_chunk_size, kv_cache_device, kv_cache_dtype, assistant_model, num_assistant_tokens, assistant_stats, prompt_lookup_num_tokens, max_matching_ngram_size, stop_strings, tokenizer)')
         assert.has_error(function() model:generate({ 1 }, { repetition_penalty = 0 }) end,
            "generate: repetition_penalty must be a number > 0, got 0")
         assert.has_error(function() model:generate({ 1 }, { top_p = 0 }) end, "generate: top_p must be a number in (0, 1], got 0")
         assert.has_error(function() model:generate({ 1 }, { top_p = 1.5 }) end, "generate: top_p must be a number in (0, 1], got 1.5")
         assert.has_error(function() model:generate({ 1 }, { eos_token_id = { 2, -1 } }) end,
            "generate: eos_token_id[2] must be an integer >= 0, got -1")
         assert.has_error(function() model:generate({ 1 }, { eos_token_id = {} }) end,
            "generate: eos_token_id must be an integer or a non-empty list of integers")
         assert.has_error(function() model:generate({ { 1, 2 }, { 3 } }) end,
            "generate: input_ids rows must all have 2 tokens (row 2 differs)")
      end)

      it("names a missing config key and the file", function()
         local dir = H.tmpdir()
         H.write(dir .. "/config.json", '{"model_type": "gpt2", "vocab_size": 100, "n_positions": 64, "n_layer": 2, "n_head": 4}')
         H.copy(DIR .. "/model.safetensors", dir .. "/model.safetensors")
         assert.has_error(function() models.from_pretrained(dir) end,
            'models.gpt2: config key "n_embd" is missing in ' .. dir .. "/config.json")
         H.write(dir .. "/config.json", '{"model_type": "gpt2", "vocab_size": 100, "n_positions": 64, "n_embd": 32, "n_layer": "2", "n_head": 4}')
         assert.has_error(function() models.from_pretrained(dir) end,
            'models.gpt2: config key "n_layer" in ' .. dir .. '/config.json must be a positive integer, got string "2"')
         H.write(dir .. "/config.json", '{"model_type": "gpt3"}')
         local ok, err = pcall(models.from_pretrained, dir)
         assert.is_false(ok)
         local head = 'models: model_type "gpt3" in ' .. dir .. '/config.json is not supported (supported: '
         assert.are.equal(head, err:sub(1, #head))
         local listed = err:sub(#head + 1, -2)                    -- the model types, sorted
         local types = {}
         for t in listed:gmatch("[^, ]+") do types[#types + 1] = t end
         local sorted = { unpack(types) }
         table.sort(sorted)
         assert.are.same(sorted, types)
         assert.truthy(listed:find("gpt2", 1, true) and listed:find("llama", 1, true) and listed:find("bert", 1, true))
         H.rmdir(dir)
      end)

      it("rejects an n_embd that n_head does not divide", function()
         assert.has_error(function()
            gpt2.GPT2LMHeadModel({ vocab_size = 10, n_positions = 8, n_embd = 10, n_layer = 1, n_head = 4 })
         end, "models.gpt2: n_embd 10 is not divisible by n_head 4 in config table")
      end)

      it("names wrong-shape checkpoint tensors", function()
         local m = gpt2.GPT2LMHeadModel({ vocab_size = 100, n_positions = 32, n_embd = 32, n_layer = 2, n_head = 4 })
         assert.has_error(function() models.load_checkpoint(m, DIR .. "/model.safetensors") end,
            'load_checkpoint: checkpoint tensors of the wrong shape: "transformer.wpe.weight" (checkpoint [64, 32], model [32, 32])')
      end)

      it("names missing and unexpected keys (strict), returns them (non-strict)", function()
         local m = gpt2.GPT2LMHeadModel({ vocab_size = 100, n_positions = 64, n_embd = 32, n_layer = 3, n_head = 4 })
         local ok, err = pcall(models.load_checkpoint, m, DIR .. "/model.safetensors")
         assert.is_false(ok)
         assert.truthy(err:find('load_checkpoint: checkpoint does not match the model: missing keys '
            .. '"transformer.h.2.ln_1.weight", "transformer.h.2.ln_1.bias", "transformer.h.2.attn.c_attn.weight"', 1, true))
         local small = gpt2.GPT2LMHeadModel({ vocab_size = 100, n_positions = 64, n_embd = 32, n_layer = 1, n_head = 4 })
         local missing, unexpected = models.load_checkpoint(small, DIR .. "/model.safetensors", { strict = false })
         assert.are.same({}, missing)
         assert.are.equal(12, #unexpected)
         table.sort(unexpected)
         assert.are.equal("transformer.h.1.attn.c_attn.bias", unexpected[1])
      end)

      it("leaves the model untouched when a strict load fails", function()
         local m = gpt2.GPT2LMHeadModel({ vocab_size = 100, n_positions = 64, n_embd = 32, n_layer = 3, n_head = 4 })
         local before = m.transformer.h[1].ln_1.weight:clone()
         local wte_before = m.transformer.wte.weight:clone()
         assert.has_error(function() models.load_checkpoint(m, DIR .. "/model.safetensors") end)
         assert.is_true(m.transformer.h[1].ln_1.weight:equal(before))
         assert.is_true(m.transformer.wte.weight:equal(wte_before))
      end)

      it("rejects a bad sharded index: no weight_map, a shard outside the folder, a missing shard", function()
         local dir = H.tmpdir()
         H.copy(DIR .. "/config.json", dir .. "/config.json")
         local index = dir .. "/model.safetensors.index.json"
         H.write(index, '{"metadata": {}}')
         assert.has_error(function() models.from_pretrained(dir) end,
            'from_pretrained: ' .. index .. ' has no "weight_map" object')
         H.write(index, '{"weight_map": {"transformer.wte.weight": "../model.safetensors"}}')
         assert.has_error(function() models.from_pretrained(dir) end,
            'from_pretrained: ' .. index .. ' maps "transformer.wte.weight" to ../model.safetensors, expected a file name in the same folder')
         H.write(index, '{"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}')
         assert.has_error(function() models.from_pretrained(dir) end,
            "from_pretrained: shard " .. dir .. "/model-00001-of-00002.safetensors listed in " .. index .. " does not exist")
         H.rmdir(dir)
      end)

      it("rejects an index that names a tensor its shard does not hold", function()
         local dir = H.tmpdir()
         H.copy(DIR .. "/config.json", dir .. "/config.json")
         H.copy(DIR .. "/model.safetensors", dir .. "/shard.safetensors")
         H.write(dir .. "/model.safetensors.index.json", '{"weight_map": {"transformer.wte.weight": "shard.safetensors", "lm_head.weight": "shard.safetensors"}}')
         assert.has_error(function() models.from_pretrained(dir) end,
            'from_pretrained: tensor "lm_head.weight" listed in ' .. dir .. '/model.safetensors.index.json is not in shard ' .. dir .. '/shard.safetensors')
         H.rmdir(dir)
      end)

      it("reports a folder without a checkpoint", function()
         local dir = H.tmpdir()
         H.copy(DIR .. "/config.json", dir .. "/config.json")
         assert.has_error(function() models.from_pretrained(dir) end,
            "from_pretrained: no model.safetensors or model.safetensors.index.json in " .. dir)
         H.rmdir(dir)
      end)
   end)
end)
