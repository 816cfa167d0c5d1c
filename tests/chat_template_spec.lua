-- Chat templates (ml.tokenizers' Jinja subset) against transformers' own rendering
-- (tests/fixtures/gen_chat_templates.py): Llama 3, ChatML, Mistral, Gemma and Phi-3 style
-- templates, a Harmony-style one (gpt-oss) built of macros, and one using every construct the
-- interpreter has, over several conversations, with and without the generation prompt,
-- raise_exception included; and apply_chat_template on a tokenizer folder with a
-- tokenizer_config.json.
local jinja = require("moonload.tokenizers.jinja")
local tokenizers = require("moonload.tokenizers")
local N = require("nn_helpers")

local exp = N.read_json("tests/fixtures/chat_templates/expected.json")

local function vars_for(c)
   return { messages = exp.conversations[c.conversation], add_generation_prompt = c.add_generation_prompt,
      bos_token = exp.special.bos_token, eos_token = exp.special.eos_token }
end

describe("chat templates", function()
   for _, c in ipairs(exp.cases) do
      it(string.format("renders %s for %s%s as transformers does", c.template, c.conversation,
         c.add_generation_prompt and " with the generation prompt" or ""), function()
         local render = jinja.compile(exp.templates[c.template])
         if c.error then
            assert.has_error(function() render(vars_for(c)) end, "chat template: " .. c.error)
         else
            assert.are.equal(c.output, render(vars_for(c)))
         end
      end)
   end

   it("names what it cannot parse or does not support", function()
      assert.has_error(function() jinja.compile("{% if x %}open") end, "chat template: {% if %} at line 1 is not closed")
      assert.has_error(function() jinja.compile("{% include 'other.jinja' %}") end,
         "chat template: unsupported statement {% include %} at line 1")
      assert.has_error(function() jinja.compile("{% macro m(a) %}{{ a }}") end, "chat template: {% macro %} at line 1 is not closed")
      assert.has_error(function() jinja.compile("{% macro m(a) %}{{ a }}{% endmacro %}{{ m(1, 2) }}")({}) end,
         "chat template: macro m takes 1 arguments, got 2")
      assert.has_error(function() jinja.compile("{% macro m(a) %}{{ a }}{% endmacro %}{{ m(b=2) }}")({}) end,
         'chat template: macro m has no argument "b"')
      assert.has_error(function() jinja.compile("{{ x | frobnicate }}")({ x = 1 }) end,
         'chat template: unsupported filter "frobnicate"')
      assert.has_error(function() jinja.compile("{{ 'a' ") end, "chat template: a tag opened at line 1 is not closed")
   end)

   describe("apply_chat_template", function()
      local dir = os.tmpname()
      os.remove(dir)
      os.execute("mkdir -p " .. dir)
      local src = assert(io.open("tests/fixtures/tokenizers/llama3_bpe/tokenizer.json", "rb"))
      local dst = assert(io.open(dir .. "/tokenizer.json", "wb"))
      dst:write(src:read("*a")); src:close(); dst:close()
      local cfg = assert(io.open(dir .. "/tokenizer_config.json", "wb"))
      cfg:write(require("cjson").encode({ chat_template = exp.templates.llama3, bos_token = "<|begin_of_text|>",
         eos_token = { content = "<|eot_id|>" } }))
      cfg:close()
      local tok = tokenizers.from_pretrained(dir)
      local conv = exp.conversations.multi_turn

      it("renders the folder's template with its special tokens and encodes the text", function()
         local text = tok:apply_chat_template(conv, { add_generation_prompt = true, tokenize = false })
         local want = jinja.compile(exp.templates.llama3)({ messages = conv, add_generation_prompt = true,
            bos_token = "<|begin_of_text|>", eos_token = "<|eot_id|>" })
         assert.are.equal(want, text)
         assert.are.equal("<|begin_of_text|><|start_header_id|>user", text:sub(1, 40))
         local ids = tok:apply_chat_template(conv, { add_generation_prompt = true })
         assert.are.same(tok:encode(text, { add_special_tokens = false }), ids)
         assert.are.equal(tok:token_to_id("<|begin_of_text|>"), ids[1])   -- once: the template wrote it
         assert.are_not.equal(ids[1], ids[2])
      end)

      it("takes a template given as an option, and names a missing one", function()
         assert.are.equal("user:Hello|", tok:apply_chat_template(conv, { tokenize = false,
            chat_template = "{{ messages[0].role }}:{{ messages[0].content }}|" }))
         local plain = tokenizers.from_pretrained("tests/fixtures/tokenizers/gpt2_bpe")
         assert.has_error(function() plain:apply_chat_template(conv) end,
            "apply_chat_template: tests/fixtures/tokenizers/gpt2_bpe/tokenizer.json has no chat template "
            .. "(tokenizer_config.json's chat_template); pass one as the chat_template option")
      end)

      it("prefers the folder's chat_template.jinja (transformers' file for templates, gpt-oss's)", function()
         local jf = assert(io.open(dir .. "/chat_template.jinja", "wb"))
         jf:write(exp.templates.harmony_macros)
         jf:close()
         local again = tokenizers.from_pretrained(dir)
         os.remove(dir .. "/chat_template.jinja")
         for _, c in ipairs(exp.cases) do
            if c.template == "harmony_macros" and c.conversation == "reasoning" then
               assert.are.equal(c.output, again:apply_chat_template(exp.conversations.reasoning,
                  { add_generation_prompt = c.add_generation_prompt, tokenize = false }))
            end
         end
      end)

      teardown(function() os.execute("rm -rf " .. dir) end)
   end)
end)
