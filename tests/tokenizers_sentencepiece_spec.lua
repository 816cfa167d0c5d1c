-- SentencePiece model files read without the sentencepiece library (tokenizers/sentencepiece.lua)
-- and Marian's tokenizer on top of them (tokenizers/marian.lua), against the sentencepiece library
-- and transformers' MarianTokenizer (tests/fixtures/gen_tokenizers.py sentencepiece, marian): ids,
-- pieces and decoded text for every fixture text, what each SentencePiece rule changes, and errors.
local tokenizers = require("moonload.tokenizers")
local sentencepiece = require("moonload.tokenizers.sentencepiece")
local H = require("models_helpers")

local FIX = "tests/fixtures/tokenizers"

local function read(path)
   local f = assert(io.open(path, "rb"))
   local s = f:read("*a")
   f:close()
   return s
end

-- A protobuf varint, and a length-delimited field.
local function varint(v)
   local out = {}
   repeat
      local b = v % 128
      v = math.floor(v / 128)
      out[#out + 1] = string.char(v > 0 and b + 128 or b)
   until v == 0
   return table.concat(out)
end
local function field(n, bytes) return varint(n * 8 + 2) .. varint(#bytes) .. bytes end

for _, name in ipairs({ "spm_unigram", "spm_bpe_bytes", "spm_unigram_raw" }) do
   describe("tokenizers.from_sentencepiece (" .. name .. ")", function()
      local tok = tokenizers.from_sentencepiece(FIX .. "/" .. name .. "/tokenizer.model")
      local exp = H.read_json(FIX .. "/" .. name .. "/expected.json")

      it("gives sentencepiece's ids and pieces, and decodes as it does", function()
         assert.are.equal(exp.vocab_size, tok:get_vocab_size())
         for _, c in ipairs(exp.cases) do
            assert.are.same(c.ids, tok:encode(c.text), c.text)
            assert.are.same(c.pieces, tok:tokenize(c.text), c.text)
            assert.are.equal(c.decoded, tok:decode(c.ids), c.text)
         end
      end)
   end)
end

describe("tokenizers.from_sentencepiece", function()
   it("reads the normalizer and trainer specs the file holds", function()
      local uni = sentencepiece.read(FIX .. "/spm_unigram/tokenizer.model")
      assert.are.same({ "Unigram", false, 0, 1, 2, -1 }, { uni.model_type, uni.byte_fallback, uni.unk_id, uni.bos_id, uni.eos_id, uni.pad_id })
      assert.are.same({ "nmt_nfkc", true, true }, { uni.normalizer.name, uni.normalizer.add_dummy_prefix, uni.normalizer.remove_extra_whitespaces })
      local bpe = sentencepiece.read(FIX .. "/spm_bpe_bytes/tokenizer.model")
      assert.are.same({ "BPE", true, "identity", false }, { bpe.model_type, bpe.byte_fallback, bpe.normalizer.name, bpe.normalizer.remove_extra_whitespaces })
      assert.are.same({ "<|im_start|>", 0, 4 }, bpe.pieces[4])                 -- a user-defined piece
      local raw = sentencepiece.read(FIX .. "/spm_unigram_raw/tokenizer.model")
      assert.is_false(raw.normalizer.add_dummy_prefix)
   end)

   it("walks the normalization rules as sentencepiece does, not as tokenizers' Precompiled does", function()
      -- halfwidth kana with voicing marks: a 6-byte rule that tokenizers' per-cluster walk misses
      local tok = tokenizers.from_sentencepiece(FIX .. "/spm_unigram/tokenizer.model")
      local text = "ｶﾞｷﾞ"
      local spec = sentencepiece.spec(sentencepiece.read(FIX .. "/spm_unigram/tokenizer.model"), "t")
      assert.are.equal("sentencepiece", spec.normalizer.normalizers[1].walk)
      spec.normalizer.normalizers[1].walk = nil
      local per_cluster = tokenizers.Tokenizer(spec, "t")
      assert.are.same({ "\226\150\129", "ガギ" }, tok:tokenize(text))
      assert.are_not.same(tok:tokenize(text), per_cluster:tokenize(text))
   end)

   it("never matches control or unknown pieces in text, as sentencepiece does", function()
      local tok = tokenizers.from_sentencepiece(FIX .. "/spm_unigram/tokenizer.model")
      local spec = sentencepiece.spec(sentencepiece.read(FIX .. "/spm_unigram/tokenizer.model"), "t")
      assert.are.same({ 0, 1, 2 }, spec.model.unmatched)
      spec.model.unmatched = nil
      local plain = tokenizers.Tokenizer(spec, "t")
      local ids = tok:encode("</s>")
      for _, id in ipairs(ids) do assert.are_not.equal(2, id) end       -- (</s> is piece 2)
      assert.are.same({ 3, 2 }, plain:encode("</s>"))
   end)

   it("keeps user-defined pieces whole, and spaces as they are when the model says so", function()
      local bpe = tokenizers.from_sentencepiece(FIX .. "/spm_bpe_bytes/tokenizer.model")
      assert.are.same({ "\226\150\129", "x", "<|im_start|>", "y" }, bpe:tokenize("x<|im_start|>y"))
      assert.are.same({ "\226\150\129", "@@", "\226\150\129", "@@", "@@" }, bpe:tokenize("@@ @@@@"))
      local raw = tokenizers.from_sentencepiece(FIX .. "/spm_unigram_raw/tokenizer.model")
      assert.are.equal("  a  b ", raw:decode(raw:encode("  a  b ")))
   end)

   it("tokenizes a long text part by part only where no token spans a U+2581", function()
      local S = "\226\150\129"
      local function unigram(pieces)
         local vocab = { { "<unk>", 0 } }
         for _, p in ipairs(pieces) do vocab[#vocab + 1] = { p[1], p[2] } end
         return tokenizers.Tokenizer({ model = { type = "Unigram", vocab = vocab, unk_id = 0 },
            pre_tokenizer = { type = "Metaspace", replacement = S, prepend_scheme = "always", split = false } }, "t")
      end
      local text = ("a b "):rep(100):sub(1, -2)
      -- "a▁b" holds U+2581 inside: the text is not cut, and the long piece wins
      local spanning = unigram({ { S, -5 }, { S .. "a", -2 }, { "a", -3 }, { "b", -3 }, { "a" .. S .. "b", -1 } })
      local tokens = spanning:tokenize(text)
      assert.are.equal("a" .. S .. "b", tokens[2])
      -- without it, cutting gives what the whole text gives: ▁a ▁b pairs
      local plain = unigram({ { S, -5 }, { S .. "a", -2 }, { S .. "b", -2 }, { "a", -3 }, { "b", -3 } })
      tokens = plain:tokenize(text)
      assert.are.equal(200, #tokens)
      assert.are.same({ S .. "a", S .. "b" }, { tokens[199], tokens[200] })
   end)

   it("names a file that is not a SentencePiece model, a truncated one and model types it does not read", function()
      assert.has_error(function() tokenizers.from_sentencepiece("/nonexistent.model") end,
         "tokenizers.from_sentencepiece: cannot read /nonexistent.model (/nonexistent.model: No such file or directory)")
      local p = H.tmpfile('{"model_type": "unigram"}')
      local ok, err = pcall(tokenizers.from_sentencepiece, p)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("tokenizers.from_sentencepiece: " .. p .. ": field 15 at byte 0 has wire type 3, not a protobuf message (is this a SentencePiece model?)", 1, true), err)
      local bytes = read(FIX .. "/spm_bpe_bytes/tokenizer.model")
      H.write(p, bytes:sub(1, 100))
      ok, err = pcall(tokenizers.from_sentencepiece, p)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("tokenizers.from_sentencepiece: " .. p .. ": field 1 at byte ", 1, true), err)
      assert.truthy(tostring(err):find("bytes past its message", 1, true), err)
      -- one piece, trainer_spec.model_type WORD (3)
      H.write(p, field(1, field(1, "a")) .. field(2, varint(3 * 8) .. varint(3)))
      assert.has_error(function() tokenizers.from_sentencepiece(p) end,
         "tokenizers.from_sentencepiece: " .. p .. ": SentencePiece model type WORD is not supported (Unigram and BPE are)")
      H.write(p, field(2, varint(3 * 8) .. varint(1)))
      assert.has_error(function() tokenizers.from_sentencepiece(p) end,
         "tokenizers.from_sentencepiece: " .. p .. ": no pieces (is this a SentencePiece model?)")
      os.remove(p)
   end)
end)

describe("tokenizers.from_pretrained (a Marian folder: source.spm, target.spm, vocab.json)", function()
   local dir = FIX .. "/marian_spm"
   local tok = tokenizers.from_pretrained(dir)
   local exp = H.read_json(dir .. "/expected.json")

   it("gives transformers' MarianTokenizer ids and decoded text", function()
      assert.are.equal("MarianTokenizer", tok.__name)
      for _, c in ipairs(exp.cases) do
         if c.text then assert.are.same(c.ids, tok:encode(c.text), c.text) end
         assert.are.equal(c.decoded, tok:decode(c.ids), c.text)
         assert.are.equal(c.decoded_skip_special, tok:decode(c.ids, { skip_special_tokens = true }), c.text)
      end
   end)

   it("encodes a long text (tens of thousands of ids) as the pieces of its parts", function()
      local one = tok:encode("Hello world.", { add_special_tokens = false })
      local ids = tok:encode(("Hello world. "):rep(20000))
      assert.are.equal(20000 * #one + 1, #ids)
      assert.are.same(one, { unpack(ids, 1, #one) })
   end)

   it("takes its ids from vocab.json, not from the SentencePiece model", function()
      local vocab = H.read_json(dir .. "/vocab.json")
      local spm = tokenizers.from_sentencepiece(dir .. "/source.spm")
      local pieces = spm:tokenize("Hello world")
      local ids = tok:encode("Hello world")
      assert.are.equal(#pieces + 1, #ids)
      for i, p in ipairs(pieces) do assert.are.equal(vocab[p] or vocab["<unk>"], ids[i]) end
      assert.are_not.same(spm:encode("Hello world"), { unpack(ids, 1, #pieces) })
      assert.are.equal(vocab["</s>"], ids[#ids])
   end)

   it("pads a batch with <pad> and saves a folder that reads back the same", function()
      local ids, mask = tok:encode_batch({ "Hello", "The quick brown fox" })
      local pad = H.read_json(dir .. "/vocab.json")["<pad>"]
      assert.are.equal(pad, ids[1][#ids[1]])
      assert.are.equal(0, mask[1][#mask[1]])
      local out = H.tmpdir()
      tok:save_pretrained(out)
      local back = tokenizers.from_pretrained(out)
      for _, c in ipairs(exp.cases) do
         if c.text then assert.are.same(c.ids, back:encode(c.text), c.text) end
      end
      H.rmdir(out)
   end)

   it("decodes through target_vocab.json and target.spm when the folder has separate vocabularies", function()
      local sep = tokenizers.from_pretrained(FIX .. "/marian_spm_separate")
      local e = H.read_json(FIX .. "/marian_spm_separate/expected.json")
      assert.are.equal(e.vocab_size, sep:get_vocab_size())
      for _, c in ipairs(e.cases) do
         if c.text then assert.are.same(c.ids, sep:encode(c.text), c.text) end
         if c.decoded then
            assert.are.equal(c.decoded, sep:decode(c.ids))
            -- transformers skips special ids by their source-vocabulary ids, so it keeps the target's
            -- <pad> (a decoder's first id); this drops it
            assert.are.equal((c.decoded_skip_special:gsub("^<pad> ", "")), sep:decode(c.ids, { skip_special_tokens = true }))
         end
      end
      local pieces = #sentencepiece.read(FIX .. "/marian_spm_separate/target.spm").pieces
      assert.has_error(function() sep:decode({ 5, 100000 }) end, string.format(
         "decode: id 100000 at position 2 is in neither the vocabulary (size %d) nor target.spm (%d pieces)", e.vocab_size, pieces))
   end)

   it("names a folder whose vocabulary is missing or lacks a special token", function()
      local bad = H.tmpdir()
      H.copy(dir .. "/source.spm", bad .. "/source.spm")
      assert.has_error(function() tokenizers.from_pretrained(bad) end,
         "tokenizers.from_pretrained: " .. bad .. " has no vocab.json")
      H.write(bad .. "/vocab.json", '{"</s>": 0, "<pad>": 1}')
      assert.has_error(function() tokenizers.from_pretrained(bad) end,
         "tokenizers.from_pretrained: " .. bad .. '/vocab.json has no "<unk>"')
      H.write(bad .. "/vocab.json", '{"</s>": 0, "<pad>": 1, "<unk>": 1}')
      local ok, err = pcall(tokenizers.from_pretrained, bad)
      assert.is_false(ok)
      assert.truthy(tostring(err):find(bad .. "/vocab.json gives id 1 to both", 1, true), err)
      H.rmdir(bad)
   end)
end)
