-- ml.utils warning channel: one handler for warnings and info messages.
local utils = require("moonload.utils")
local log = require("moonload.utils.log")

describe("utils.log", function()
   it("routes warnings and info through the installed handler and returns the previous one", function()
      local got = {}
      local previous = utils.set_warning_handler(function(msg, level) got[#got + 1] = level .. ":" .. msg end)
      utils.warn("careful")
      utils.info("fyi")
      local mine = utils.set_warning_handler(previous)
      assert.are.same({ "warning:careful", "info:fyi" }, got)
      assert.are.equal("function", type(mine))
      assert.are.equal(previous, log.set_warning_handler(previous))
   end)

   it("prints warnings to stderr by default and keeps info quiet without MOONLOAD_VERBOSE", function()
      local previous = utils.set_warning_handler(nil)   -- the default
      local real = io.stderr
      local written = {}
      io.stderr = { write = function(_, ...) for _, s in ipairs({ ... }) do written[#written + 1] = s end end }
      local ok, err = pcall(function()
         utils.warn("disk is slow")
         utils.info("just so you know")
      end)
      io.stderr = real
      utils.set_warning_handler(previous)
      assert.is_true(ok, tostring(err))
      local text = table.concat(written)
      if os.getenv("MOONLOAD_VERBOSE") == "1" then
         assert.are.equal("moonload: warning: disk is slow\nmoonload: info: just so you know\n", text)
      else
         assert.are.equal("moonload: warning: disk is slow\n", text)
      end
   end)

   it("rejects a handler that is not a function", function()
      assert.has_error(function() utils.set_warning_handler(42) end,
         "set_warning_handler: handler must be a function or nil, got number")
   end)
end)
