-- T5 (models/t5.lua) against transformers' T5ForConditionalGeneration on two fixtures
-- (tests/fixtures/gen_models.py, t5()): t5_tiny as the original T5 (ReLU, tied and scaled head)
-- and t5_tiny_gated as a FLAN-T5 folder (gated GELU, its own head, 3 encoder and 2 decoder
-- blocks). A right-padded batch: encoder states, logits, greedy and beam generate; the relative
-- position buckets; offloaded, quantized and sampled runs; bad input.
local ml = require("moonload")
local T = require("moonload.tensor")
local H = require("models_helpers")
local t5 = require("moonload.models.t5")

local function load(name, opts) return ml.models.from_pretrained(H.FIX .. "/" .. name, opts) end

describe("T5", function()
   it("puts relative distances in transformers' buckets, both ways", function()
      local b = H.expected("t5_tiny").buckets
      for key, want in pairs(b) do
         if key ~= "relative_position" then
            local kind, nb, md = key:match("^(%a+)_(%d+)_(%d+)$")
            for i, rel in ipairs(b.relative_position) do
               local got = t5.relative_position_bucket(rel, kind == "bidirectional", tonumber(nb), tonumber(md))
               assert.are.equal(want[i], got, string.format("%s at %d", key, rel))
            end
         end
      end
   end)

   for _, name in ipairs({ "t5_tiny", "t5_tiny_gated" }) do
      describe(name, function()
         local model = load(name)
         local e = H.expected(name)
         local mask = e.attention_mask

         it("reads the folder as transformers 5 does", function()
            local cfg = model.config
            if name == "t5_tiny" then
               assert.is_true(cfg.scale_decoder_outputs)
               assert.are.equal(model.shared.weight, model.lm_head.weight)
               assert.are.same({ "relu", false }, { cfg.dense_act_fn, cfg.is_gated_act })
            else
               assert.is_false(cfg.scale_decoder_outputs)
               assert.are_not.equal(model.shared.weight, model.lm_head.weight)
               assert.are.same({ "gelu_new", true, 3, 2 }, { cfg.dense_act_fn, cfg.is_gated_act, cfg.num_layers,
                  cfg.num_decoder_layers })
            end
            assert.are.equal(model.shared.weight, model.encoder.embed_tokens.weight)
            assert.are.equal(model.shared.weight, model.decoder.embed_tokens.weight)
         end)

         it("gives transformers' encoder states and logits over a padded batch", function()
            local enc = model:encode(e.input_ids, { attention_mask = mask })
            assert.is_true(H.max_abs_diff(enc, e.encoder_last_hidden_state) < 1e-4)
            local logits = model(e.input_ids, { attention_mask = mask, decoder_input_ids = e.decoder_input_ids })
            assert.are.same({ 2, 4, 100 }, logits.shape)
            assert.is_true(H.max_abs_diff(logits, e.logits) < 2e-4)
            -- the encoder's states given: the same logits
            local again = model(e.input_ids, { attention_mask = mask, decoder_input_ids = e.decoder_input_ids,
               encoder_outputs = enc })
            assert.is_true(again:equal(logits))
         end)

         it("saves a folder that reads back to the same logits (ml.save_model)", function()
            local dir = H.tmpdir()
            ml.save_model(model, dir)
            local back = ml.models.from_pretrained(dir)
            local o = { attention_mask = mask, decoder_input_ids = e.decoder_input_ids }
            assert.is_true(back(e.input_ids, o):equal(model(e.input_ids, o)))
            assert.are.equal(model.config.scale_decoder_outputs, back.config.scale_decoder_outputs)
            assert.are.equal(name == "t5_tiny", back.lm_head.weight == back.shared.weight)
            H.rmdir(dir)
         end)

         it("generates transformers' tokens, greedy and with beams", function()
            assert.is_true(e.greedy_min_margin > 1e-3)
            assert.are.same(e.greedy_ids, model:generate(e.input_ids, { attention_mask = mask,
               max_new_tokens = e.max_new_tokens }))
            local ids, scores = model:generate(e.input_ids, { attention_mask = mask, max_new_tokens = e.max_new_tokens,
               num_beams = e.beam.num_beams, num_return_sequences = e.beam.num_return_sequences })
            assert.are.same(e.beam.sequences, ids)
            for i, s in ipairs(e.beam.sequences_scores) do assert.is_true(math.abs(s - scores[i]) < 1e-4) end
            -- one prompt as a flat list: flat ids back
            local one = model:generate({ unpack(e.input_ids[1]) }, { max_new_tokens = e.max_new_tokens })
            assert.are.same(e.greedy_ids[1], one)
         end)
      end)
   end

   local e = H.expected("t5_tiny_gated")

   it("gives the same tokens with blocks on the CPU and the disk, and planned under a budget", function()
      local dir = H.tmpdir()
      local m = load("t5_tiny_gated", { offload_folder = dir, device_map = { shared = "cpu", ["encoder.embed_tokens"] = "cpu",
         ["decoder.embed_tokens"] = "cpu", ["encoder.block.0"] = "cpu",
         ["encoder.block.1"] = "disk", ["encoder.block.2"] = "cpu", ["encoder.final_layer_norm"] = "disk",
         ["decoder.block.0"] = "disk", ["decoder.block.1"] = "cpu", ["decoder.final_layer_norm"] = "cpu",
         lm_head = "disk" } })
      assert.are.same(e.greedy_ids, m:generate(e.input_ids, { attention_mask = e.attention_mask, max_new_tokens = 10 }))
      local ids = m:generate(e.input_ids, { attention_mask = e.attention_mask, max_new_tokens = 10, num_beams = 3,
         num_return_sequences = 2 })
      assert.are.same(e.beam.sequences, ids)
      H.rmdir(dir)
      local dir2 = H.tmpdir()
      local auto = load("t5_tiny_gated", { device_map = "auto", max_memory = { cpu = 60000 }, offload_folder = dir2 })
      local placed = {}
      for _, d in pairs(auto.hf_device_map) do placed[d] = true end
      assert.is_true(placed.disk, "a 60 kB budget should send some blocks to the disk")
      assert.are.same(e.greedy_ids, auto:generate(e.input_ids, { attention_mask = e.attention_mask, max_new_tokens = 10 }))
      H.rmdir(dir2)
   end)

   it("blocks repeated n-grams of the decoder's ids as transformers does", function()
      local nr = H.read_json(H.FIX .. "/t5_tiny/no_repeat.json")
      local c = nr.cases[1]
      assert.are.same(c.sequences, load("t5_tiny"):generate(nr.input_ids, { attention_mask = nr.attention_mask,
         max_new_tokens = c.max_new_tokens, no_repeat_ngram_size = c.no_repeat_ngram_size }))
   end)

   it("budgets the decoder's cache and the encoder's keys and values for reserve_for, nothing for the encoder", function()
      local rm = require("moonload.utils.runtime_memory")
      local m = load("t5_tiny_gated")
      local sizes = rm.kv_cache_sizes(m, { batch_size = 2, max_length = 20, prompt_length = 6 })
      local n = 0
      for name, bytes in pairs(sizes) do
         n = n + 1
         assert.truthy(name:find("^decoder%."), name)
         -- self: 2 (k, v) x 2 rows x 20 tokens x 4 heads x 8 x 4 bytes; cross: the 6 input tokens
         assert.are.equal(name:find("EncDecAttention") and 2 * 2 * 6 * 32 * 4 or 2 * 2 * 20 * 32 * 4, bytes)
      end
      assert.are.equal(4, n)                                       -- 2 decoder blocks x (self, cross)
      local bart = ml.models.from_pretrained(H.FIX .. "/bart_tiny")
      local b = rm.kv_cache_sizes(bart, { batch_size = 1, max_length = 10, prompt_length = 7 })
      assert.are.same({ 2 * 10 * 32 * 4, 2 * 7 * 32 * 4 },
         { b["model.decoder.layers.1.self_attn"], b["model.decoder.layers.1.encoder_attn"] })
      assert.is_nil(b["model.encoder.layers.0.self_attn"])
   end)

   it("generates with int8 weights, an int8 cache, and samples reproducibly", function()
      local q = load("t5_tiny_gated", { quantize = "int8" })
      local ids = q:generate(e.input_ids, { attention_mask = e.attention_mask, max_new_tokens = 10, kv_cache_dtype = "int8" })
      assert.are.equal(2, #ids)
      assert.are.same(e.greedy_ids[1], ids[1])             -- its largest margins survive rounding
      local m = load("t5_tiny_gated")
      local o = { attention_mask = e.attention_mask, max_new_tokens = 8, do_sample = true, temperature = 1.5, seed = 5,
         num_return_sequences = 3 }
      local a = m:generate(e.input_ids, o)
      assert.are.equal(6, #a)
      for _, row in ipairs(a) do assert.are.equal(0, row[1]) end
      assert.are.same(a, m:generate(e.input_ids, o))
   end)

   it("reads an encoder-only folder as T5EncoderModel, and a full one when asked", function()
      local x = H.expected("t5_encoder_tiny")
      local enc = load("t5_encoder_tiny")                            -- architectures: T5EncoderModel
      assert.are.equal("T5EncoderModel", enc.__name)
      local states = enc(x.input_ids, { attention_mask = x.attention_mask })
      assert.is_true(H.max_abs_diff(states, x.last_hidden_state) < 1e-4)
      -- the full model's folder, its decoder and head ignored
      local from_full = load("t5_tiny_gated", { architecture = "T5EncoderModel" })
      assert.is_nil(from_full.decoder)
      assert.is_true(from_full:encode(x.input_ids, { attention_mask = x.attention_mask }):equal(states))
      -- and offloaded block by block
      local dir = H.tmpdir()
      local off = load("t5_encoder_tiny", { device_map = "auto", max_memory = { cpu = 30000 }, offload_folder = dir })
      assert.is_true(off(x.input_ids, { attention_mask = x.attention_mask }):allclose(states, 1e-5, 1e-6))
      H.rmdir(dir)
      assert.has_error(function() load("t5_tiny", { architecture = "BertModel" }) end,
         'from_pretrained: architecture "BertModel" is not a class of model_type "t5" (expected T5EncoderModel or T5ForConditionalGeneration)')
   end)

   it("skips the cross-attention bias old T5 checkpoints carry", function()
      local dir = H.tmpdir()
      H.copy(H.FIX .. "/t5_tiny/config.json", dir .. "/config.json")
      local st = require("moonload.safetensors")
      local sd = st.load_file(H.FIX .. "/t5_tiny/model.safetensors")
      sd["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = T.zeros({ 16, 4 })
      st.save_file(sd, dir .. "/model.safetensors")
      local e = H.expected("t5_tiny")
      local o = { attention_mask = e.attention_mask, decoder_input_ids = e.decoder_input_ids }
      assert.is_true(load("t5_tiny")(e.input_ids, o):equal(ml.models.from_pretrained(dir)(e.input_ids, o)))
      H.rmdir(dir)
   end)

   it("goes from text to text as transformers does (examples/t5.lua: tokenizer, beams, decode)", function()
      local x = H.expected("t5_tiny_text")
      local tok = ml.tokenizers.from_pretrained(H.FIX .. "/t5_tiny_text")
      local ids, mask = tok:encode_batch(x.texts)
      assert.are.same(x.input_ids, ids)
      assert.are.same(x.attention_mask, mask)
      assert.are.same(x.sequences, (load("t5_tiny_text"):generate(ids, { attention_mask = mask,
         max_new_tokens = x.max_new_tokens, num_beams = x.num_beams, no_repeat_ngram_size = x.no_repeat_ngram_size })))
      local p = assert(io.popen("luajit examples/t5.lua 2>&1"))
      local out = p:read("*a")
      p:close()
      for i, text in ipairs(x.texts) do
         assert.truthy(out:find(text .. "\n  -> " .. x.answers[i] .. "\n", 1, true), out)
      end
   end)

   it("names what it cannot take", function()
      local m = load("t5_tiny")
      assert.has_error(function() m:generate({ 5, 1 }, { prompt_lookup_num_tokens = 3 }) end,
         "generate: T5 does not support prompt_lookup_num_tokens")
      assert.has_error(function() m({ { 5, 1 } }, { decoder_input_ids = { { 0 }, { 0 } } }) end,
         "models.t5.forward: decoder_input_ids has 2 rows, input_ids 1")
      assert.has_error(function() m({ 5, 100 }) end, "models.t5.forward: token id 100 is out of range for vocab_size 100 (ids are 0-based)")
      assert.has_error(function()
         t5.T5ForConditionalGeneration({ model_type = "t5", vocab_size = 10, d_model = 8, d_kv = 2, d_ff = 16,
            num_layers = 1, num_heads = 4, feed_forward_proj = "gated-gelu-new" })
      end, 'models.t5: feed_forward_proj "gated-gelu-new" is not "{ACT}" or "gated-{ACT}" in config table')
   end)
end)

describe("T5 on cuda #cuda", function()
   it("gives transformers' tokens with blocks over cuda:0, cpu and disk", function()
      local e = H.expected("t5_tiny_gated")
      local dir = H.tmpdir()
      local m = load("t5_tiny_gated", { offload_folder = dir, device_map = { shared = 0, ["encoder.embed_tokens"] = 0,
         ["decoder.embed_tokens"] = 0, ["encoder.block.0"] = 0,
         ["encoder.block.1"] = "disk", ["encoder.block.2"] = "cpu", ["encoder.final_layer_norm"] = 0,
         ["decoder.block.0"] = 0, ["decoder.block.1"] = "disk", ["decoder.final_layer_norm"] = "cpu", lm_head = 0 } })
      assert.are.same(e.greedy_ids, m:generate(e.input_ids, { attention_mask = e.attention_mask, max_new_tokens = 10 }))
      assert.are.same(e.beam.sequences, (m:generate(e.input_ids, { attention_mask = e.attention_mask, max_new_tokens = 10,
         num_beams = 3, num_return_sequences = 2 })))
      H.rmdir(dir)
   end)
end)
