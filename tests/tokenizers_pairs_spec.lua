-- Pairs of texts (a cross-encoder's query and passage) through Tokenizer:encode_pair and
-- encode_batch against the tokenizers library (tests/fixtures/tokenizers/pairs.json,
-- gen_tokenizers.py pairs): each file's post-processor joining them (TemplateProcessing's pair
-- template, BERT's and RoBERTa's processors, ByteLevel), token types, and "longest_first" cuts.
local tokenizers = require("moonload.tokenizers")
local H = require("models_helpers")

local FIX = "tests/fixtures/tokenizers"
local expected = H.read_json(FIX .. "/pairs.json")

describe("tokenizer pairs", function()
   for name, cases in pairs(expected.files) do
      it(name .. ": ids and token types of each pair, whole and cut to 8 and 12 tokens", function()
         local tok = tokenizers.from_pretrained(FIX .. "/" .. name)
         for _, c in ipairs(cases) do
            local ids, types = tok:encode_pair(c.a, c.b)
            assert.are.same(c.ids, ids, c.a .. " | " .. c.b)
            assert.are.same(c.type_ids, types, c.a .. " | " .. c.b)
            for n, cut in pairs(c.cut) do
               if cut.error then
                  assert.has_error(function() tok:encode_pair(c.a, c.b, { truncation = true, max_length = tonumber(n) }) end)
               else
                  local cids, ctypes = tok:encode_pair(c.a, c.b, { truncation = true, max_length = tonumber(n) })
                  assert.are.same(cut.ids, cids, n .. ": " .. c.a .. " | " .. c.b)
                  assert.are.same(cut.type_ids, ctypes, n .. ": " .. c.a .. " | " .. c.b)
               end
            end
         end
      end)
   end

   it("pads a batch of pairs, token types included, and refuses a batch that mixes texts and pairs", function()
      local tok = tokenizers.from_pretrained(FIX .. "/bert_wordpiece")
      local c = expected.files.bert_wordpiece
      local list = {}
      for i, case in ipairs(c) do list[i] = { case.a, case.b } end
      local ids, mask, types = tok:encode_batch(list)
      local longest = 0
      for _, case in ipairs(c) do longest = math.max(longest, #case.ids) end
      for i, case in ipairs(c) do
         assert.are.equal(longest, #ids[i])
         for k = 1, longest do
            assert.are.equal(case.ids[k] or 0, ids[i][k])
            assert.are.equal(case.ids[k] and 1 or 0, mask[i][k])
            assert.are.equal(case.type_ids[k] or 0, types[i][k])
         end
      end
      assert.has_error(function() tok:encode_batch({ { "a", "b" }, "c" }) end,
         "encode_batch: texts[2] must be a pair {a, b} of strings like texts[1]")
      assert.has_error(function() tok:encode_pair("a", 5) end)
   end)
end)
