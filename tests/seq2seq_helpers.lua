-- What the encoder-decoder specs share (models/bart.lua's and models/t5.lua's families against
-- the fixtures gen_models.py's seq2seq_fixture writes): transformers' encoder states and logits
-- over a right-padded batch, greedy and configured generate, a CPU + disk split under a RAM
-- budget and a save_model round trip; the logits after a change to a fresh copy of the model.
local ml = require("moonload")
local H = require("models_helpers")

local S = {}

function S.load(name, opts) return ml.models.from_pretrained(H.FIX .. "/" .. name, opts) end

--- The logits of a fresh copy of fixture `name` over its batch and decoder_input_ids, after
-- fn(model) changed it.
function S.logits_after(name, fn)
   local e = H.expected(name)
   local m = S.load(name)
   fn(m)
   return m(e.input_ids, { attention_mask = e.attention_mask, decoder_input_ids = e.decoder_input_ids })
end

--- The its every encoder-decoder fixture gets; budget: the CPU bytes under which device_map
-- "auto" must send some layers to the disk; tol: the logits' tolerance (default 1e-4; T5's
-- unscaled scores make larger logits).
function S.it_matches_transformers(name, budget, tol)
   local env = getfenv(2)
   local it, assert = env.it, env.assert
   local e = H.expected(name)
   local mask = e.attention_mask

   it("gives transformers' encoder states and logits over a right-padded batch", function()
      local model = S.load(name)
      local enc = model:encode(e.input_ids, { attention_mask = mask })
      assert.is_true(H.max_abs_diff(enc, e.encoder_last_hidden_state) < 1e-4)
      local logits = model(e.input_ids, { attention_mask = mask, decoder_input_ids = e.decoder_input_ids })
      assert.are.same({ #e.input_ids, #e.decoder_input_ids[1], #e.logits[1][1] }, logits.shape)
      assert.is_true(H.max_abs_diff(logits, e.logits) < (tol or 1e-4))
   end)

   it("generates transformers' tokens, greedy and as its generation config says", function()
      local model = S.load(name)
      assert.is_true(e.greedy_min_margin > 1e-3)
      assert.are.same(e.greedy_ids, model:generate(e.input_ids, { attention_mask = mask, max_new_tokens = e.max_new_tokens,
         num_beams = 1, no_repeat_ngram_size = 0, min_length = 0 }))
      local ids, scores = model:generate(e.input_ids, { attention_mask = mask })
      assert.are.same(e.configured_ids, ids)
      for i, s in ipairs(e.configured_scores or {}) do assert.is_true(math.abs(s - scores[i]) < 1e-4) end
   end)

   it("keeps its tokens with layers on the CPU and the disk, and through save_model", function()
      local model = S.load(name)
      local dir = H.tmpdir()
      local off = S.load(name, { device_map = "auto", max_memory = { cpu = budget }, offload_folder = dir })
      local placed = {}
      for _, d in pairs(off.hf_device_map) do placed[tostring(d)] = true end
      assert.is_true(placed.disk and placed.cpu, "the budget should split the layers over the CPU and the disk")
      assert.are.same(e.configured_ids, (off:generate(e.input_ids, { attention_mask = mask })))
      H.rmdir(dir)
      local saved = H.tmpdir()
      ml.save_model(model, saved)
      local back = ml.models.from_pretrained(saved)
      local o = { attention_mask = mask, decoder_input_ids = e.decoder_input_ids }
      assert.is_true(back(e.input_ids, o):equal(model(e.input_ids, o)))
      assert.are.same(e.configured_ids, (back:generate(e.input_ids, { attention_mask = mask })))
      H.rmdir(saved)
   end)
end

--- An it() (tagged #cuda by its describe) generating transformers' configured tokens with the
-- fixture's modules placed by device_map (over cuda:0, cpu and disk).
function S.it_generates_on_cuda(name, device_map)
   local env = getfenv(2)
   env.it("gives transformers' tokens with layers over cuda:0, cpu and disk", function()
      local e = H.expected(name)
      local dir = H.tmpdir()
      local m = S.load(name, { offload_folder = dir, device_map = device_map })
      env.assert.are.same(e.configured_ids, (m:generate(e.input_ids, { attention_mask = e.attention_mask })))
      H.rmdir(dir)
   end)
end

return S
