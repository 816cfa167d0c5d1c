-- A chat turn end to end against transformers (tests/fixtures/gen_models.py chat): the folder
-- tests/fixtures/models/chat_tiny holds a tiny Llama over the llama3_bpe test tokenizer and a
-- Llama 3 style chat template; AutoTokenizer's apply_chat_template ids, greedy generate's new
-- ids and their decoded text (malformed UTF-8 included) are what moonload gives; and
-- examples/chat.lua runs on it.
local ml = require("moonload")
local H = require("models_helpers")

describe("a chat turn (tests/fixtures/models/chat_tiny)", function()
   local dir = H.FIX .. "/chat_tiny"
   local exp = H.expected("chat_tiny")
   local model = ml.models.from_pretrained(dir)
   local tok = ml.tokenizers.from_pretrained(dir)

   it("renders and encodes the messages as transformers' apply_chat_template", function()
      assert.are.equal(exp.prompt_text, tok:apply_chat_template(exp.messages, { add_generation_prompt = true, tokenize = false }))
      assert.are.same(exp.prompt_ids, tok:apply_chat_template(exp.messages, { add_generation_prompt = true }))
   end)

   it("generates transformers' tokens and decodes them to its text", function()
      local out = model:generate(exp.prompt_ids, { max_new_tokens = exp.max_new_tokens })
      local new = { unpack(out, #exp.prompt_ids + 1) }
      assert.are.same(exp.new_ids, new)
      assert.are.equal(exp.text, tok:decode(new, { skip_special_tokens = true }))
   end)

   it("runs examples/chat.lua", function()
      local p = assert(io.popen("luajit examples/chat.lua 2>&1"))
      local out = p:read("*a")
      p:close()
      assert.truthy(out:find("answer: " .. exp.text, 1, true), out)
   end)
end)

describe("byte-level decoding of malformed UTF-8", function()
   local U = require("moonload.tokenizers.unicode")
   it("replaces each maximal malformed subsequence with one U+FFFD, as Python and Rust do", function()
      local R = "\239\191\189"
      assert.are.equal("a" .. R .. "b", U.lossy("a\228\184b"))
      assert.are.equal(R, U.lossy("\255"))
      assert.are.equal(R .. R .. R, U.lossy("\237\160\128"))       -- a surrogate's bytes
      assert.are.equal(R, U.lossy("\240\159\153"))
      assert.are.equal("ok\226\130\172z" .. R, U.lossy("ok\226\130\172z\128"))
   end)
end)
