-- generate's defaults from the model's generation config (models/generation_config.lua), as
-- transformers' generate takes them: generation_config.json, else config.json's token ids. The
-- expected tokens come from the same model run with explicit options (and from a plain greedy
-- loop), so each default is checked against what it stands for.
local ml = require("moonload")
local H = require("models_helpers")
local cjson = require("cjson")

local FIXTURE = H.FIX .. "/llama_tiny_untied"
local PROMPT = { 3, 17, 5, 9 }

-- A copy of the fixture folder with generation_config.json holding gc (none when gc is nil).
local function folder_with(gc)
   local dir = H.tmpdir()
   for _, f in ipairs({ "config.json", "model.safetensors.index.json", "model-00001-of-00003.safetensors",
                        "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors" }) do
      H.copy(FIXTURE .. "/" .. f, dir .. "/" .. f)
   end
   if gc then
      local f = io.open(dir .. "/generation_config.json", "wb")
      f:write(type(gc) == "string" and gc or cjson.encode(gc))
      f:close()
   end
   return dir
end

describe("generation config", function()
   -- greedy ids of the fixture with no end-of-sequence id at all
   local plain = ml.models.from_pretrained(FIXTURE)
   local free = plain:generate(PROMPT, { max_new_tokens = 12, eos_token_id = false })

   it("stops at the eos ids of generation_config.json and pads finished rows with its pad id", function()
      -- the 3rd and 5th new tokens as the model's end-of-sequence ids (a list, as Llama 3's)
      local eos = { free[#PROMPT + 5], free[#PROMPT + 3] }
      local dir = folder_with({ eos_token_id = eos, pad_token_id = 99 })
      local model = ml.models.from_pretrained(dir)
      assert.are.same(eos, model.generation_config.eos_token_id)
      local got = model:generate(PROMPT, { max_new_tokens = 12 })
      assert.are.same({ unpack(free, 1, #PROMPT + 3) }, got)
      -- the call's own eos_token_id wins; false turns the model's off
      assert.are.same(free, model:generate(PROMPT, { max_new_tokens = 12, eos_token_id = false }))
      assert.are.same({ unpack(free, 1, #PROMPT + 5) }, model:generate(PROMPT, { max_new_tokens = 12, eos_token_id = eos[1] }))
      -- a batch: the row that ends first continues with pad_token_id until the other ends
      local other = { 8, 1, 4, 4 }
      local other_free = plain:generate(other, { max_new_tokens = 12, eos_token_id = false })
      local rows = model:generate({ PROMPT, other }, { max_new_tokens = 12 })
      local n = #rows[1] - #PROMPT
      local function ends_at(seq)
         for i = #PROMPT + 1, #seq do
            if seq[i] == eos[1] or seq[i] == eos[2] then return i end
         end
         return #seq
      end
      assert.are.equal(math.max(ends_at(free), ends_at(other_free)) - #PROMPT, math.min(n, 12))
      for i = ends_at(free) + 1, #rows[1] do assert.are.equal(99, rows[1][i]) end
      H.rmdir(dir)
   end)

   it("takes config.json's eos_token_id when the folder has no generation_config.json", function()
      local dir = folder_with(nil)
      local model = ml.models.from_pretrained(dir)
      assert.is_nil(rawget(model, "generation_config"))
      assert.are.same({ bos_token_id = 1, eos_token_id = 2, pad_token_id = 0 },
         require("moonload.models.generation_config").of(model))
      local got = model:generate(PROMPT, { max_new_tokens = 12 })
      local stop = #free
      for i = #PROMPT + 1, #free do if free[i] == 2 then stop = i break end end
      assert.are.same({ unpack(free, 1, stop) }, got)
      H.rmdir(dir)
   end)

   it("samples as its do_sample, temperature, top_k and top_p say, unless the call chooses", function()
      local dir = folder_with({ do_sample = true, temperature = 0.7, top_p = 0.9, max_new_tokens = 6 })
      local model = ml.models.from_pretrained(dir)
      -- what the file says is what the same options given by the call do (top_k: transformers'
      -- default 50, larger than this vocabulary of 100 so the nucleus decides)
      local explicit = model:generate(PROMPT, { seed = 7, temperature = 0.7, top_k = 50, top_p = 0.9, max_new_tokens = 6,
         eos_token_id = false })
      assert.are.same(explicit, model:generate(PROMPT, { seed = 7, eos_token_id = false }))
      assert.are.equal(#PROMPT + 6, #explicit)                       -- the file's max_new_tokens
      local differs = false
      for seed = 1, 5 do
         local s = model:generate(PROMPT, { seed = seed, eos_token_id = false })
         for i = 1, #s do if s[i] ~= free[i] then differs = true end end
      end
      assert.is_true(differs, "sampling never left the greedy path in 5 seeds")
      -- do_sample = false, or a temperature of 0, from the call: greedy
      assert.are.same({ unpack(free, 1, #PROMPT + 6) }, model:generate(PROMPT, { do_sample = false, eos_token_id = false }))
      assert.are.same({ unpack(free, 1, #PROMPT + 6) }, model:generate(PROMPT, { temperature = 0, eos_token_id = false }))
      H.rmdir(dir)
   end)

   it("min_new_tokens keeps the eos ids from being picked before that many new tokens", function()
      local eos = free[#PROMPT + 3]                         -- the greedy 3rd new token
      local model = ml.models.from_pretrained(FIXTURE)
      -- a plain greedy loop over whole-sequence forwards, the eos logit at -inf for 5 steps
      local seq = { unpack(PROMPT) }
      for step = 1, 8 do
         local last = model({ seq }):select(2, -1):select(1, 1)
         if step <= 5 then last[eos + 1] = -math.huge end
         local _, best = last:max(1)
         seq[#seq + 1] = best:item()
         if step > 5 and seq[#seq] == eos then break end
      end
      local got = model:generate(PROMPT, { max_new_tokens = 8, eos_token_id = eos, min_new_tokens = 5 })
      assert.are.same(seq, got)
      assert.are_not.equal(eos, got[#PROMPT + 3])
      -- from generation_config.json too
      local dir = folder_with({ eos_token_id = eos, min_new_tokens = 5 })
      assert.are.same(seq, ml.models.from_pretrained(dir):generate(PROMPT, { max_new_tokens = 8 }))
      H.rmdir(dir)
   end)

   it("max_length and min_length count the prompt too, the new-token counts winning, as transformers", function()
      local model = ml.models.from_pretrained(FIXTURE)
      local nolimit = { eos_token_id = false }
      local function with(extra)
         local o = { eos_token_id = false }
         for k, v in pairs(extra) do o[k] = v end
         return model:generate(PROMPT, o)
      end
      assert.are.same({ unpack(free, 1, 10) }, with({ max_length = 10 }))
      assert.are.same({ unpack(free, 1, #PROMPT + 3) }, with({ max_length = 10, max_new_tokens = 3 }))
      local log = require("moonload.utils.log")
      local warned = {}
      local prev = log.set_warning_handler(function(msg) warned[#warned + 1] = msg end)
      local ok, short = pcall(with, { max_length = 3 })
      log.set_warning_handler(prev)
      assert(ok, short)
      assert.are.same(PROMPT, short)                                  -- not longer than the prompt: nothing new
      assert.truthy(warned[1]:find("generate: max_length 3 is not more than the prompt's 4 tokens", 1, true), warned[1])
      local gpt2 = ml.models.from_pretrained(H.FIX .. "/gpt2_tiny")
      assert.has_error(function() gpt2:generate(PROMPT, { max_length = gpt2:max_length() + 1 }) end,
         ("generate: prompt of 4 tokens + max_new_tokens %d exceeds the model's %d positions"):format(gpt2:max_length() - 3, gpt2:max_length()))
      assert.has_error(function() with({ max_length = 0 }) end, "generate: max_length must be an integer >= 1, got 0")
      assert.has_error(function() with({ min_length = -1 }) end, "generate: min_length must be an integer >= 0, got -1")
      -- min_length: the eos id banned until the sequence holds that many tokens (here 5 new)
      local eos = free[#PROMPT + 3]
      local banned = model:generate(PROMPT, { max_new_tokens = 8, eos_token_id = eos, min_new_tokens = 5 })
      assert.are.same(banned, model:generate(PROMPT, { max_new_tokens = 8, eos_token_id = eos, min_length = #PROMPT + 5 }))
      assert.are.same({ unpack(free, 1, #PROMPT + 3) },
         model:generate(PROMPT, { max_new_tokens = 8, eos_token_id = eos, min_length = #PROMPT + 5, min_new_tokens = 0 }))
      -- from generation_config.json: its max_length (capped at the config's 64 positions) and min_length
      local dir = folder_with({ max_length = 9 })
      assert.are.same({ unpack(free, 1, 9) }, ml.models.from_pretrained(dir):generate(PROMPT, nolimit))
      H.rmdir(dir)
      dir = folder_with({ max_length = 32768 })
      assert.are.equal(64, #ml.models.from_pretrained(dir):generate(PROMPT, nolimit))
      H.rmdir(dir)
      dir = folder_with({ max_length = 9, max_new_tokens = 2, eos_token_id = eos, min_length = #PROMPT + 5 })
      local m2 = ml.models.from_pretrained(dir)
      assert.are.same({ unpack(free, 1, #PROMPT + 2) }, m2:generate(PROMPT))
      assert.are.same(banned, m2:generate(PROMPT, { max_new_tokens = 8 }))
      H.rmdir(dir)
   end)

   it("is saved by save_model and read back", function()
      local dir = folder_with({ eos_token_id = { 5, 7 }, do_sample = true, temperature = 0.6 })
      local out = H.tmpdir()
      ml.save_model(ml.models.from_pretrained(dir), out)
      local back = ml.models.from_pretrained(out)
      assert.are.same({ eos_token_id = { 5, 7 }, do_sample = true, temperature = 0.6 }, back.generation_config)
      H.rmdir(out)
      H.rmdir(dir)
   end)

   it("names a generation_config.json that is not JSON, and bad values it holds", function()
      local dir = folder_with("{ not json")
      local ok, err = pcall(ml.models.from_pretrained, dir)
      assert.is_false(ok)
      assert.truthy(err:find("from_pretrained: " .. dir .. "/generation_config.json is not a valid JSON object", 1, true), err)
      H.rmdir(dir)
      dir = folder_with({ eos_token_id = "end" })
      ok, err = pcall(function() return ml.models.from_pretrained(dir):generate(PROMPT) end)
      assert.is_false(ok)
      assert.truthy(err:find("generate: eos_token_id must be an integer >= 0, got end", 1, true), err)
      H.rmdir(dir)
   end)
end)
