-- models/sentence_transformer.lua against sentence-transformers 6 (tests/fixtures/gen_models.py,
-- sentence_t5(), sentence_qwen3()): folders saved by SentenceTransformer.save (a T5 encoder over
-- a SentencePiece tokenizer, mean pooling, Dense with tanh, Normalize; a Qwen3 decoder with
-- last-token pooling and left padding): encode's embeddings, every pooling mode against
-- sentence-transformers' Pooling, left padding by hand, and bad folders.
local ml = require("moonload")
local T = require("moonload.tensor")
local H = require("models_helpers")
local st_mod = require("moonload.models.sentence_transformer")

local DIR = H.FIX .. "/sentence_t5_tiny"

describe("sentence_transformer", function()
   local e = H.expected("sentence_t5_tiny")
   local st = st_mod.from_pretrained(DIR)

   it("reads the folder's modules: the transformer, pooling, Dense and Normalize", function()
      assert.are.equal("T5EncoderModel", st.model.__name)
      assert.are.same({ "mean" }, st.modes)
      assert.are.equal(1, #st.dense)
      assert.is_true(st.normalize)
      assert.are.equal(16, st.max_seq_length)                 -- (the tokenizer's model_max_length)
   end)

   it("encodes texts to sentence-transformers' embeddings (truncated to max_seq_length)", function()
      local emb = st:encode(e.texts)
      assert.are.same({ 3, 16 }, emb.shape)
      assert.is_true(H.max_abs_diff(emb, e.embeddings) < 1e-5)
      -- the same from ids and a mask, and one text alone
      assert.is_true(st:encode(e.input_ids, { attention_mask = e.attention_mask }):allclose(emb, 1e-5, 1e-6))
      assert.is_true(H.max_abs_diff(st:encode(e.texts[2]), { e.embeddings[2] }) < 1e-5)
   end)

   it("pools as sentence-transformers' Pooling in each mode, and several concatenated", function()
      local tok = T.tensor(e.token_embeddings)
      for mode, want in pairs(e.pooled) do
         assert.is_true(H.max_abs_diff(st_mod.pool(tok, e.attention_mask, mode), want) < 1e-5, mode)
      end
      local both = st_mod.pool(tok, e.attention_mask, { "cls", "mean" })
      assert.are.same({ 3, 64 }, both.shape)
      assert.is_true(H.max_abs_diff(both:narrow(2, 33, 32), e.pooled.mean) < 1e-5)
   end)

   it("counts from the first real token under left padding (cls, weightedmean, lasttoken)", function()
      local h = T.arange(1, 13):to("float32"):view(1, 6, 2)     -- positions 1..6 hold (1,2), (3,4), ...
      local mask = { { 0, 0, 1, 1, 1, 0 } }
      assert.are.same({ { 5, 6 } }, st_mod.pool(h, mask, "cls"):tolist())
      assert.are.same({ { 9, 10 } }, st_mod.pool(h, mask, "lasttoken"):tolist())
      -- weights 1, 2, 3 on positions 3, 4, 5
      local w = st_mod.pool(h, mask, "weightedmean"):tolist()[1]
      assert.is_true(math.abs(w[1] - (5 * 1 + 7 * 2 + 9 * 3) / 6) < 1e-6)
      assert.are.same({ { 9, 10 } }, st_mod.pool(h, mask, "max"):tolist())
   end)

   it("gives the same embeddings with the transformer's blocks on the disk", function()
      local dir = H.tmpdir()
      local off = st_mod.from_pretrained(DIR, { device_map = "auto", max_memory = { cpu = 60000 }, offload_folder = dir })
      assert.is_true(off:encode(e.texts):allclose(st:encode(e.texts), 1e-5, 1e-6))
      H.rmdir(dir)
   end)

   it("encodes as an all-mpnet-base-v2-style folder (MPNet, WordPiece cut at 16 tokens, mean, Normalize)", function()
      local q = H.expected("sentence_mpnet_tiny")
      local mp = st_mod.from_pretrained(H.FIX .. "/sentence_mpnet_tiny")
      assert.are.equal("MPNetModel", mp.model.__name)
      assert.are.same({ "mean" }, mp.modes)
      assert.are.equal(16, mp.max_seq_length)                   -- (the saved tokenizer_config.json's)
      local ids, mask = mp.tokenizer:encode_batch(q.texts, { truncation = true, max_length = 16 })
      assert.are.same(q.input_ids, ids)
      assert.are.same(q.attention_mask, mask)
      assert.is_true(H.max_abs_diff(mp:encode(q.texts), q.embeddings) < 1e-5)
      -- in batches, longest first (the first text is the longest: batches {1, 2}, {3}), each row back in place
      assert.is_true(H.max_abs_diff(mp:encode(q.texts, { batch_size = 2 }), q.embeddings) < 1e-5)
      assert.is_true(H.max_abs_diff(mp:encode({ q.texts[3], q.texts[1] }, { batch_size = 1 }),
         { q.embeddings[3], q.embeddings[1] }) < 1e-5)
      assert.has_error(function() mp:encode(q.texts, { batch_size = 0 }) end,
         "sentence_transformer: batch_size must be an integer >= 1, got 0")
   end)

   it("pools a decoder's last token under left padding (a Qwen3-Embedding-style folder)", function()
      local q = H.expected("sentence_qwen3_tiny")
      local dec = st_mod.from_pretrained(H.FIX .. "/sentence_qwen3_tiny")
      assert.are.equal("Qwen3ForCausalLM", dec.model.__name)     -- (a Qwen3Model checkpoint, head tied)
      assert.are.same({ "lasttoken" }, dec.modes)
      local ids, mask = dec.tokenizer:encode_batch(q.texts)     -- left, as its tokenizer_config says
      assert.are.same(q.input_ids, ids)
      assert.are.same(q.attention_mask, mask)
      assert.is_true(H.max_abs_diff(dec:encode(q.texts), q.embeddings) < 1e-5)
      -- the same base checkpoint under a config that unties the head (Qwen3-Embedding-4B's): the
      -- head is tied to the embeddings all the same, as the checkpoint has none
      local dir = H.tmpdir()
      os.execute("mkdir -p " .. dir .. "/1_Pooling " .. dir .. "/2_Normalize")
      for _, f in ipairs({ "model.safetensors", "tokenizer.json", "tokenizer_config.json", "modules.json",
         "sentence_bert_config.json", "1_Pooling/config.json", "2_Normalize/config.json" }) do
         H.copy(H.FIX .. "/sentence_qwen3_tiny/" .. f, dir .. "/" .. f)
      end
      local cfg = H.read_json(H.FIX .. "/sentence_qwen3_tiny/config.json")
      cfg.tie_word_embeddings = false
      H.write(dir .. "/config.json", require("cjson").encode(cfg))
      local untied = st_mod.from_pretrained(dir)
      assert.are.equal(untied.model.model.embed_tokens.weight, untied.model.lm_head.weight)
      assert.is_true(H.max_abs_diff(untied:encode(q.texts), q.embeddings) < 1e-5)
      H.rmdir(dir)
   end)

   it("runs examples/embed.lua on a folder: its embeddings' shape and each sentence's closest", function()
      local p = assert(io.popen("luajit examples/embed.lua " .. DIR .. " 'the first' 'a second one' 'and third' 2>&1"))
      local out = p:read("*a")
      p:close()
      assert.truthy(out:find(DIR .. ": T5EncoderModel, pooling mean, embeddings [3, 16]", 1, true), out)
      local emb = st:encode({ "the first", "a second one", "and third" })
      local sim = emb:matmul(emb:t()):tolist()
      local names = { "the first", "a second one", "and third" }
      for i = 1, 3 do
         local best, bj = -2, nil
         for j = 1, 3 do if j ~= i and sim[i][j] > best then best, bj = sim[i][j], j end end
         assert.truthy(out:find(string.format("%q -> closest %q", names[i], names[bj]), 1, true), out)
      end
   end)

   it("names what is wrong with a folder", function()
      assert.has_error(function() st_mod.from_pretrained(H.FIX .. "/t5_tiny") end,
         "sentence_transformer.from_pretrained: no modules.json in " .. H.FIX .. "/t5_tiny (not a sentence-transformers folder)")
      local dir = H.tmpdir()
      H.write(dir .. "/modules.json", '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.CNN"}]')
      assert.has_error(function() st_mod.from_pretrained(dir) end,
         "sentence_transformer.from_pretrained: module 1 of " .. dir .. "/modules.json is a sentence_transformers.models.CNN (supported: Transformer, Pooling, Dense, Normalize)")
      assert.has_error(function() st_mod.pooling_modes({ pooling_mode = "median" }, "x/config.json") end,
         'sentence_transformer: x/config.json asks for pooling mode "median" (supported: cls, max, mean, mean_sqrt_len_tokens, weightedmean, lasttoken)')
      H.rmdir(dir)
   end)
end)
