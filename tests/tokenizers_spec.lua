-- ml.tokenizers against Hugging Face tokenizers (tests/fixtures/gen_tokenizers.py): small
-- tokenizers trained in the layouts of GPT-2, Llama 3, Qwen2, Llama 2, BERT and T5 (SentencePiece
-- Unigram behind its precompiled nmt_nfkc normalizer), and the real
-- all-MiniLM-L6-v2 one; ids with and without special tokens, tokens, and decoding with and
-- without the special tokens, for texts with contractions, digits, whitespace runs, newlines,
-- accents, CJK, Hangul, emoji and special tokens inside the text.
local ml = require("moonload")
local tokenizers = require("moonload.tokenizers")
local N = require("nn_helpers")

local FIX = "tests/fixtures/tokenizers"
local NAMES = { "gpt2_bpe", "llama3_bpe", "qwen2_bpe", "qwen3_5_bpe", "o200k_bpe", "o200k_inverted_bpe", "llama2_spm", "mistral_spm", "bert_wordpiece", "minilm_wordpiece", "mpnet_wordpiece",
   "t5_unigram", "xlmr_unigram" }

local tmpfile = require("models_helpers").tmpfile

describe("tokenizers", function()
   for _, name in ipairs(NAMES) do
      describe(name, function()
         local exp = N.read_json(FIX .. "/" .. name .. "/expected.json")
         local tok = tokenizers.from_pretrained(FIX .. "/" .. name)

         it("has tokenizers' vocabulary size", function()
            assert.are.equal(exp.vocab_size, tok:get_vocab_size())
         end)

         for i, c in ipairs(exp.cases) do
            it(string.format("encodes and decodes case %d (%q) as tokenizers does", i, c.text:sub(1, 30)), function()
               assert.are.same(c.pre_tokens, tok.pre_tokenize({ c.text }, { first = true }))
               assert.are.same(c.tokens_no_special, tok:tokenize(c.text))
               assert.are.same(c.ids_no_special, tok:encode(c.text, { add_special_tokens = false }))
               assert.are.same(c.ids, tok:encode(c.text))
               assert.are.equal(c.decoded, tok:decode(c.ids))
               assert.are.equal(c.decoded_skip_special, tok:decode(c.ids, { skip_special_tokens = true }))
            end)
         end

         it("maps tokens and ids both ways", function()
            for _, t in ipairs(exp.cases[3].tokens_no_special) do
               assert.are.equal(t, tok:id_to_token(tok:token_to_id(t)))
            end
            assert.is_nil(tok:token_to_id("no such token \1"))
         end)
      end)
   end

   it("gives sentence-transformers' input ids for all-MiniLM-L6-v2, alone and as a padded batch", function()
      local exp = N.read_json("tests/fixtures/models/minilm/expected.json")
      local tok = tokenizers.from_pretrained(FIX .. "/minilm_wordpiece")
      for i, s in ipairs(exp.sentences) do
         local want = {}
         for k, id in ipairs(exp.input_ids[i]) do
            if exp.attention_mask[i][k] == 1 then want[#want + 1] = id end
         end
         assert.are.same(want, tok:encode(s))
      end
      local ids, mask = tok:encode_batch(exp.sentences)
      assert.are.same(exp.input_ids, ids)
      assert.are.same(exp.attention_mask, mask)
   end)

   it("pads a batch on the left for generation", function()
      local tok = tokenizers.from_pretrained(FIX .. "/llama3_bpe")
      local a, b = tok:encode("Hello world"), tok:encode("Hello world, and the quick brown fox jumps over it")
      local ids, mask = tok:encode_batch({ "Hello world", "Hello world, and the quick brown fox jumps over it" },
         { padding_side = "left", pad_id = 2 })
      local fill = #b - #a
      assert.is_true(fill > 0)
      for k = 1, fill do assert.are.equal(2, ids[1][k]); assert.are.equal(0, mask[1][k]) end
      assert.are.same(a, { unpack(ids[1], fill + 1) })
      assert.are.same(b, ids[2])
      for k = 1, #b do assert.are.equal(1, mask[2][k]) end
      assert.has_error(function() tok:encode_batch({ "a" }, { padding_side = "middle" }) end,
         'encode_batch: padding_side must be "right" or "left", got middle')
   end)

   it("truncates on the right to max_length, special tokens included, as transformers does", function()
      local tok = tokenizers.from_pretrained(FIX .. "/minilm_wordpiece")
      assert.are.same({ 101, 1037, 1037, 1037, 102 }, tok:encode(("a "):rep(10), { truncation = true, max_length = 5 }))
      assert.are.same({ 1037, 1037 }, tok:encode(("a "):rep(10), { truncation = true, max_length = 2, add_special_tokens = false }))
      assert.are.equal(12, #tok:encode(("a "):rep(10), { max_length = 5 }))       -- no truncation asked
      assert.has_error(function() tok:encode("a", { truncation = true, max_length = 1 }) end,
         "encode: max_length 1 leaves no room beside the 2 special tokens")
   end)

   it("decodes a tensor of ids", function()
      local tok = tokenizers.from_pretrained(FIX .. "/gpt2_bpe")
      local ids = tok:encode("The quick brown fox")
      assert.are.equal("The quick brown fox", tok:decode(ml.tensor(ids, { dtype = "int64" })))
   end)

   describe("bad input", function()
      local tok = tokenizers.from_pretrained(FIX .. "/llama3_bpe")

      it("names malformed UTF-8 and ids outside the vocabulary", function()
         assert.has_error(function() tok:encode("ok \255 no") end, "encode: text is not valid UTF-8 (byte 4)")
         assert.has_error(function() tok:encode(42) end, "encode: text must be a string, got number")
         assert.has_error(function() tok:decode({ 1, 5000 }) end,
            "decode: id 5000 at position 2 is not in the vocabulary (size 800)")
      end)

      it("names a missing file and components it does not support", function()
         assert.has_error(function() tokenizers.from_pretrained("/nonexistent") end,
            "tokenizers.from_pretrained: no tokenizer.json in /nonexistent (tokenizer.json files and Marian's source.spm + "
            .. "vocab.json are read; for a bare SentencePiece model use tokenizers.from_sentencepiece)")
         local p = tmpfile('{"model": {"type": "WordLevel", "vocab": {}}}')
         assert.has_error(function() tokenizers.from_file(p) end,
            'tokenizer ' .. p .. ': tokenizer model "WordLevel" is not supported (supported: BPE, Unigram, WordPiece)')
         os.remove(p)
         -- (transformers 5 writes "" for no prefix: that is none)
         p = tmpfile('{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]], '
            .. '"continuing_subword_prefix": "", "end_of_word_suffix": ""}}')
         assert.are.same({ 2 }, tokenizers.from_file(p):encode("ab"))
         os.remove(p)
         p = tmpfile('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "continuing_subword_prefix": "##"}}')
         assert.has_error(function() tokenizers.from_file(p) end,
            'tokenizer ' .. p .. ': BPE with continuing_subword_prefix or end_of_word_suffix is not supported')
         os.remove(p)
         p = tmpfile('{"model": {"type": "Unigram", "vocab": [["a", -1.0], ["b"]]}}')
         assert.has_error(function() tokenizers.from_file(p) end,
            'tokenizer ' .. p .. ': Unigram vocabulary entry 1 is not a [piece, score] pair')
         os.remove(p)
         p = tmpfile('{"model": {"type": "Unigram", "vocab": [["a", -1.0]], "unk_id": null}}')
         assert.has_error(function() tokenizers.from_file(p):encode("ab") end,
            'tokenizer ' .. p .. ': "b" has no piece and the Unigram model has no unk_id')
         os.remove(p)
         p = tmpfile('{"normalizer": {"type": "Precompiled", "precompiled_charsmap": "AAAA!AAA"}, "model": {"type": "Unigram", "vocab": [["a", -1.0]]}}')
         assert.has_error(function() tokenizers.from_file(p) end,
            'tokenizer ' .. p .. ': the precompiled charsmap is not base64 (byte 5)')
         os.remove(p)
         p = tmpfile('{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": '
            .. '{"type": "Split", "pattern": {"Regex": "\\\\w+"}, "behavior": "Isolated", "invert": false}}')
         assert.has_error(function() tokenizers.from_file(p) end,
            'tokenizer ' .. p .. ': the Split pre-tokenizer\'s regex "\\\\w+" is not supported (supported: the GPT-2, Llama 3, Qwen2 and o200k patterns, and alternations of literals)')
         os.remove(p)
         p = tmpfile('{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a b"]}}')
         assert.has_error(function() tokenizers.from_file(p) end,
            'tokenizer ' .. p .. ': BPE merge 1 ("a" + "b") makes a token missing from the vocabulary')
         os.remove(p)
         p = tmpfile("not json")
         assert.has_error(function() tokenizers.from_file(p) end)
         os.remove(p)
      end)
   end)
end)
