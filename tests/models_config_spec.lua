-- ml.models config loading: Hugging Face config.json files and tables, validated per model.
local config = require("moonload.models.config")

local FIX = "tests/fixtures/models"

local tmpfile = require("models_helpers").tmpfile

local SCHEMA = {
   { "n_embd", "int" },
   { "n_head", "int" },
   { "eps", "posnum", 1e-5 },
   { "n_inner", "int", function(c) return 4 * c.n_embd end },
   { "act", "string", "gelu_new" },
   { "tie", "bool", true },
}

describe("models.config", function()
   describe("read", function()
      it("reads a config.json path and a folder holding one", function()
         local a, src_a = config.read(FIX .. "/gpt2_tiny/config.json", "t")
         local b, src_b = config.read(FIX .. "/gpt2_tiny", "t")
         assert.are.equal(32, a.n_embd)
         assert.are.equal("gpt2", b.model_type)
         assert.are.equal(FIX .. "/gpt2_tiny/config.json", src_a)
         assert.are.equal(FIX .. "/gpt2_tiny/config.json", src_b)
      end)

      it("turns JSON null into an absent key", function()
         local t = config.read(FIX .. "/gpt2_tiny/config.json", "t")
         assert.is_nil(t.n_inner)
         assert.is_nil(t.pad_token_id)
      end)

      it("accepts a table and names it in errors", function()
         local t, src = config.read({ n_embd = 8 }, "t")
         assert.are.equal(8, t.n_embd)
         assert.are.equal("config table", src)
      end)

      it("rejects a missing file, bad JSON and a non-object", function()
         assert.has_error(function() config.read("/nonexistent/config.json", "m") end,
            "m: cannot read config /nonexistent/config.json (/nonexistent/config.json: No such file or directory)")
         local bad = tmpfile("{not json")
         local ok, err = pcall(config.read, bad, "m")
         assert.is_false(ok)
         assert.truthy(err:find("m: " .. bad .. " is not valid JSON", 1, true))
         local arr = tmpfile("[1, 2]")
         -- a JSON array decodes to a table too; validation then reports the missing keys
         local t = config.read(arr, "m")
         assert.has_error(function() config.validate(t, SCHEMA, arr, "m") end,
            'm: config key "n_embd" is missing in ' .. arr)
         local num = tmpfile("42")
         assert.has_error(function() config.read(num, "m") end, "m: " .. num .. " does not hold a JSON object")
         os.remove(bad); os.remove(arr); os.remove(num)
      end)

      it("rejects a source that is neither a path nor a table", function()
         assert.has_error(function() config.read(42, "m") end,
            "m: config must be a path to config.json or a table, got number")
      end)
   end)

   describe("validate", function()
      it("fills defaults, including computed ones, and keeps other keys", function()
         local c = config.validate({ n_embd = 16, n_head = 2, extra = "x" }, SCHEMA, "config table", "m")
         assert.are.equal(1e-5, c.eps)
         assert.are.equal(64, c.n_inner)
         assert.are.equal("gelu_new", c.act)
         assert.are.equal(true, c.tie)
         assert.are.equal("x", c.extra)
         assert.are.equal("config table", c._source)
      end)

      it("names the missing key and the file", function()
         local path = tmpfile('{"n_head": 2}')
         assert.has_error(function() config.load(path, SCHEMA, "models.gpt2") end,
            'models.gpt2: config key "n_embd" is missing in ' .. path)
         os.remove(path)
      end)

      it("names the key, the file, the expected kind and the value of a wrong type", function()
         local path = tmpfile('{"n_embd": "32", "n_head": 2}')
         assert.has_error(function() config.load(path, SCHEMA, "models.gpt2") end,
            'models.gpt2: config key "n_embd" in ' .. path .. ' must be a positive integer, got string "32"')
         os.remove(path)
         assert.has_error(function() config.load({ n_embd = 3.5, n_head = 2 }, SCHEMA, "m") end,
            'm: config key "n_embd" in config table must be a positive integer, got number 3.5')
         assert.has_error(function() config.load({ n_embd = 8, n_head = 2, eps = -1 }, SCHEMA, "m") end,
            'm: config key "eps" in config table must be a positive number, got number -1')
         assert.has_error(function() config.load({ n_embd = 8, n_head = 2, tie = "yes" }, SCHEMA, "m") end,
            'm: config key "tie" in config table must be a boolean, got string "yes"')
         assert.has_error(function() config.load({ n_embd = 8, n_head = { 1 } }, SCHEMA, "m") end,
            'm: config key "n_head" in config table must be a positive integer, got an object')
      end)
   end)
end)

describe("the README's model table", function()
   it("names classes that ml.models reaches, for model_types from_pretrained reads", function()
      local ml = require("moonload")
      local f = assert(io.open("README.md", "rb"))
      local text = f:read("*a")
      f:close()
      local section = text:match("\n### Models\n(.-)\n### ")
      local rows = 0
      for line in section:gmatch("[^\n]+") do
         local types, classes = line:match("^| (`[^|]-`) | (`[^|]-`) |")
         if types and not types:find("model_type", 1, true) then
            rows = rows + 1
            local mod
            -- `ml.models.M.C`, `...M.C` (M.C under ml.models), `...C` or `C` (in the module before)
            for item in classes:gmatch("`([^`]+)`") do
               local m, c = item:match("^ml%.models%.([%w_]+)%.([%w_]+)$")
               if not m then m, c = item:match("^%.%.%.([%w_]+)%.([%w_]+)$") end
               if not m then m, c = mod, item:match("^%.*([%w_]+)$") end
               mod = m
               assert.is_table(ml.models[m], line)
               assert.is_not_nil(ml.models[m][c], "ml.models." .. tostring(m) .. "." .. tostring(c))
            end
            for t in types:gmatch("`([^`]+)`") do assert.is_not_nil(ml.models.class_for(t, "README.md"), t) end
         end
      end
      assert.is_true(rows > 100, rows)
   end)
end)
