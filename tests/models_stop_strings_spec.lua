-- generate's stop_strings (models/stop_strings.lua, transformers' StopStringCriteria) on the chat
-- fixture (a tiny Llama over the llama3_bpe test tokenizer): the expected stop comes from
-- decoding growing prefixes of the unstopped output, so each case is checked against the text.
local ml = require("moonload")
local H = require("models_helpers")

describe("generate's stop_strings", function()
   local dir = H.FIX .. "/chat_tiny"
   local model = ml.models.from_pretrained(dir)
   local tok = ml.tokenizers.from_pretrained(dir)
   local prompt = H.expected("chat_tiny").prompt_ids
   local N = 24
   local free = model:generate(prompt, { max_new_tokens = N, eos_token_id = false })
   local new = { unpack(free, #prompt + 1) }

   -- The new tokens up to the first whose text completes s (nil: s never appears).
   local function until_text(ids, s)
      for n = 1, #ids do
         if tok:decode({ unpack(ids, 1, n) }):find(s, 1, true) then return { unpack(ids, 1, n) } end
      end
   end

   -- a piece of the output's text that first appears some tokens in
   local text = tok:decode(new)
   local piece = text:sub(math.floor(#text / 2), math.floor(#text / 2) + 2)

   it("ends with the token that completes a stop string, the string kept", function()
      local want = until_text(new, piece)
      assert.is_not_nil(want)
      assert.is_true(#want < N, "the piece should come before the end")
      local out = model:generate(prompt, { max_new_tokens = N, eos_token_id = false, stop_strings = piece, tokenizer = tok })
      assert.are.same(want, { unpack(out, #prompt + 1) })
      -- a list: the earliest string to appear wins; one that never appears changes nothing
      local first = tok:decode({ new[2] })
      local list = model:generate(prompt, { max_new_tokens = N, eos_token_id = false, tokenizer = tok,
         stop_strings = { "no such text \1", piece, first } })
      assert.are.same(until_text(new, first), { unpack(list, #prompt + 1) })
      assert.are.same(free, model:generate(prompt, { max_new_tokens = N, eos_token_id = false, tokenizer = tok,
         stop_strings = "no such text \1" }))
   end)

   it("counts a string begun in the prompt, not one wholly inside it (as transformers)", function()
      local prompt_text, first = tok:decode(prompt), tok:decode({ new[1] })
      local both = tok:decode({ unpack(free, 1, #prompt + 1) })
      assert.are.equal(prompt_text, both:sub(1, #prompt_text), "the prompt's text should be a prefix")
      local added = both:sub(#prompt_text + 1)
      assert.is_true(#added > 0 and #prompt_text > 2)
      -- the prompt's last two bytes and the first new byte: completed by the first new token
      local across = prompt_text:sub(-2) .. added:sub(1, 1)
      local out = model:generate(prompt, { max_new_tokens = N, eos_token_id = false, stop_strings = across, tokenizer = tok })
      assert.are.same({ new[1] }, { unpack(out, #prompt + 1) })
      -- a string the prompt holds whole (and the new text never does) changes nothing
      local inside = prompt_text:sub(-3)
      if not tok:decode(new):find(inside, 1, true) and not (inside .. first):sub(2):find(inside, 1, true) then
         assert.are.same(free, model:generate(prompt, { max_new_tokens = N, eos_token_id = false, stop_strings = inside,
            tokenizer = tok }))
      end
   end)

   it("ends each row of a batch on its own, the finished ones padded", function()
      local other = { unpack(prompt) }
      other[#other] = (other[#other] + 7) % 100
      local other_free = model:generate(other, { max_new_tokens = N, eos_token_id = false })
      local rows = model:generate({ prompt, other }, { max_new_tokens = N, eos_token_id = false, pad_token_id = 0,
         stop_strings = piece, tokenizer = tok })
      local want1 = until_text(new, piece)
      local want2 = until_text({ unpack(other_free, #other + 1) }, piece) or { unpack(other_free, #other + 1) }
      local n = math.max(#want1, #want2)
      assert.are.equal(#prompt + n, #rows[1])
      for i, id in ipairs(want1) do assert.are.equal(id, rows[1][#prompt + i]) end
      for i = #want1 + 1, n do assert.are.equal(0, rows[1][#prompt + i]) end
      for i, id in ipairs(want2) do assert.are.equal(id, rows[2][#other + i]) end
   end)

   it("stops assisted generation the same way", function()
      local out = model:generate(prompt, { max_new_tokens = N, eos_token_id = false, stop_strings = piece, tokenizer = tok,
         assistant_model = model })
      assert.are.same(until_text(new, piece), { unpack(out, #prompt + 1) })
   end)

   it("names a missing tokenizer and bad strings", function()
      local function err(o)
         o.max_new_tokens = 2
         local ok, e = pcall(model.generate, model, prompt, o)
         assert.is_false(ok)
         return e
      end
      assert.truthy(err({ stop_strings = "x" }):find("generate: stop_strings needs the tokenizer that reads the ids (tokenizer = tok), got nil", 1, true))
      assert.truthy(err({ stop_strings = {}, tokenizer = tok }):find("generate: stop_strings must be a string or a non-empty list of strings, got table", 1, true))
      assert.truthy(err({ stop_strings = { "a", "" }, tokenizer = tok }):find("generate: stop_strings[2] must be a non-empty string, got ", 1, true))
   end)
end)
