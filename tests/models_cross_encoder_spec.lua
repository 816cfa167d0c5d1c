-- ml.models.cross_encoder against sentence-transformers' CrossEncoder (gen_models.py
-- cross_encoders): a BERT reranker (ms-marco-MiniLM's layout), an XLM-R one (bge-reranker's) and a
-- ModernBERT one pooling the mean (gte-reranker-modernbert's), saved by sentence-transformers 6: the
-- pairs' tokens, the logits, predict's scores and rank's order.
local ml = require("moonload")
local ce_mod = require("moonload.models.cross_encoder")
local H = require("models_helpers")

local function pairs_of(e)
   local list = {}
   for i, d in ipairs(e.documents) do list[i] = { e.query, d } end
   return list
end

describe("models.cross_encoder", function()
   H.collect_warnings()
   for _, name in ipairs({ "cross_encoder_bert_tiny", "cross_encoder_xlmr_tiny", "cross_encoder_modernbert_tiny" }) do
      local dir = H.FIX .. "/" .. name
      local e = H.expected(name)

      it(name .. ": the pairs' tokens, the classifier's logits, predict's scores and rank's order", function()
         local ce = ce_mod.from_pretrained(dir)
         assert.are.equal(1, ce.num_labels)
         assert.are.equal(24, ce.max_length)                       -- (the tokenizer_config.json's)
         local ids, mask, types = ce.tokenizer:encode_batch(pairs_of(e), { truncation = true, max_length = 24 })
         assert.are.same(e.input_ids, ids)
         assert.are.same(e.attention_mask, mask)
         local typed = type(e.token_type_ids) == "table"           -- (JSON null: the model takes none)
         if typed then assert.are.same(e.token_type_ids, types) end
         local logits = ce.model(ml.tensor(ids, { dtype = "int64" }), { attention_mask = mask,
            token_type_ids = typed and types or nil }).logits
         assert.is_true(H.max_abs_diff(logits, e.logits) < 1e-5)
         assert.is_true(H.max_abs_diff(ce:predict(pairs_of(e)), e.scores) < 1e-6)
         assert.is_true(H.max_abs_diff(ce:predict(pairs_of(e), { batch_size = 3 }), e.scores) < 1e-6)
         assert.is_true(H.max_abs_diff(ce:predict(pairs_of(e), { activation = "identity" }):view(4, 1), e.logits) < 1e-5)
         local hits = ce:rank(e.query, e.documents, { return_documents = true })
         for i, want in ipairs(e.rank) do
            assert.are.equal(want.corpus_id + 1, hits[i].corpus_id)
            assert.is_true(math.abs(want.score - hits[i].score) < 1e-6)
            assert.are.equal(e.documents[want.corpus_id + 1], hits[i].text)
         end
         assert.are.equal(2, #ce:rank(e.query, e.documents, { top_k = 2 }))
      end)
   end

   it("reads a plain transformers folder (sigmoid for one label) and older sentence-transformers' activation key", function()
      local e = H.expected("cross_encoder_bert_tiny")
      local dir = H.tmpdir()
      for _, f in ipairs({ "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json" }) do
         H.copy(H.FIX .. "/cross_encoder_bert_tiny/" .. f, dir .. "/" .. f)
      end
      assert.is_true(H.max_abs_diff(ce_mod.from_pretrained(dir):predict(pairs_of(e)), e.scores) < 1e-6)
      local cfg = H.read_json(dir .. "/config.json")
      cfg.sentence_transformers = { activation_fn = "torch.nn.modules.linear.Identity" }
      H.write(dir .. "/config.json", require("cjson").encode(cfg))
      assert.is_true(H.max_abs_diff(ce_mod.from_pretrained(dir):predict(pairs_of(e)):view(4, 1), e.logits) < 1e-5)
      cfg.sentence_transformers = { activation_fn = "my.own.Activation" }
      H.write(dir .. "/config.json", require("cjson").encode(cfg))
      assert.has_error(function() ce_mod.from_pretrained(dir) end,
         "cross_encoder.from_pretrained: " .. dir .. "'s activation my.own.Activation is not supported (supported: Sigmoid, Identity, Softmax, Tanh)")
      H.rmdir(dir)
   end)

   it("names what is wrong: a model that is not a classifier, bad pairs, ranking with several labels", function()
      local ok, err = pcall(ce_mod.from_pretrained, H.FIX .. "/bert_tiny")
      assert.is_false(ok)
      assert.truthy(tostring(err):find("holds a BertModel, not a sequence classifier", 1, true), err)
      local ce = ce_mod.from_pretrained(H.FIX .. "/cross_encoder_bert_tiny")
      assert.has_error(function() ce:predict({ { "a", "b" }, { "c" } }) end,
         "cross_encoder.predict: pairs[2] must be a pair {a, b} of strings")
      assert.has_error(function() ce:predict({ { "a", "b" } }, { activation = "relu" }) end,
         'cross_encoder.predict: activation must be "sigmoid", "identity", "softmax" or "tanh", got relu')
      ce.num_labels = 3
      assert.has_error(function() ce:rank("q", { "d" }) end,
         "cross_encoder.rank: ranking needs a model with one label (this one has 3)")
   end)
end)

describe("examples/rerank.lua", function()
   it("ranks the test reranker's passages as rank does", function()
      local e = H.expected("cross_encoder_bert_tiny")
      local args = { "tests/fixtures/models/cross_encoder_bert_tiny", e.query }
      for _, d in ipairs(e.documents) do args[#args + 1] = d end
      local quoted = {}
      for i, a in ipairs(args) do quoted[i] = "'" .. a:gsub("'", "'\\''") .. "'" end
      local p = assert(io.popen("luajit examples/rerank.lua " .. table.concat(quoted, " ") .. " 2>&1"))
      local out = p:read("*a")
      assert.is_true(p:close(), out)
      for i, want in ipairs(e.rank) do
         local line = string.format("%d. %.4f  %s", i, want.score, e.documents[want.corpus_id + 1])
         assert.truthy(out:find(line, 1, true), out)
      end
   end)
end)

describe("models.cross_encoder on cuda #cuda", function()
   H.collect_warnings()
   it("cross_encoder_bert_tiny, cross_encoder_xlmr_tiny, cross_encoder_modernbert_tiny: the same scores on cuda:0", function()
      for _, name in ipairs({ "cross_encoder_bert_tiny", "cross_encoder_xlmr_tiny", "cross_encoder_modernbert_tiny" }) do
         local e = H.expected(name)
         local ce = ce_mod.from_pretrained(H.FIX .. "/" .. name)
         ce.model = ce.model:to("cuda:0")
         assert.is_true(H.max_abs_diff(ce:predict(pairs_of(e)), e.scores) < 1e-5, name)
      end
   end)
end)
