-- The prompt of bin/moonload (lua/moonload/repl.lua): expressions print their values, statements
-- run, unfinished chunks continue, errors print and the loop goes on.
local ml = require("moonload")
local repl = require("moonload.repl")

-- Runs the lines through the loop with a fresh environment; returns the output and the prompts.
local function session(lines)
   local out, prompts, i = {}, {}, 0
   local env = setmetatable({ ml = ml }, { __index = _G })
   repl.run({
      read = function(prompt)
         prompts[#prompts + 1] = prompt
         i = i + 1
         return lines[i]
      end,
      write = function(text) out[#out + 1] = text end,
      env = env,
   })
   return table.concat(out), prompts, env
end

describe("repl", function()
   it("prints an expression's values and keeps the first in _", function()
      local out, _, env = session({ "1 + 2", "ml.ones(2) * 3", "'a', nil, 4" })
      assert.are.equal("3\n" .. tostring(ml.ones(2) * 3) .. "\na\tnil\t4\n", out)
      assert.are.equal("a", env._)
   end)

   it("runs statements, printing only what they return", function()
      local out, _, env = session({ "x = 5", "y = x * 2", "return y, 'z'", "=y + 1" })
      assert.are.equal("10\tz\n11\n", out)
      assert.are.equal(10, env.y)
   end)

   it("continues an unfinished chunk on the next lines", function()
      local out, prompts, env = session({ "function f(a)", "  return a + 1", "end", "f(41)", "ml.tensor({", "1, 2})" })
      assert.are.same({ "ml> ", ">> ", ">> ", "ml> ", "ml> ", ">> ", "ml> " }, prompts)
      assert.are.equal("42\n" .. tostring(ml.tensor({ 1, 2 })) .. "\n", out)
      assert.is_function(env.f)
   end)

   it("prints a compile error or a runtime error with the user's traceback, then goes on", function()
      local out = session({ "x = = 2", "nil + 1", "error('boom')", "7" })
      assert.truthy(out:find("stdin:1: unexpected symbol near '='", 1, true), out)
      assert.truthy(out:find("stdin:1: attempt to perform arithmetic on a nil value\nstack traceback:\n\tstdin:1: in main chunk\n", 1, true), out)
      assert.truthy(out:find("stdin:1: boom\nstack traceback:\n\t[C]: in function 'error'\n\tstdin:1: in main chunk\n", 1, true), out)
      assert.is_nil(out:find("repl.lua", 1, true))
      assert.truthy(out:find("7\n$"), out)
   end)

   it("drops an unfinished chunk at the end of input and goes on (Ctrl-D on a terminal)", function()
      local lines = { "f(", nil, "1 + 1" }
      local out, i = {}, 0
      repl.run({ read = function() i = i + 1; return lines[i] end, write = function(t) out[#out + 1] = t end })
      assert.are.equal("\n2\n", table.concat(out))
   end)

   it("formats plain tables a few levels deep and names cycles", function()
      assert.are.equal('{1, "two", {3, {...}}, a = true, ["b c"] = 4}', repl.format({ 1, "two", { 3, { 4 } }, a = true, ["b c"] = 4 }))
      local t = {}
      t.self = t
      assert.are.equal("{self = {<cycle>}}", repl.format(t))
      local long = {}
      for i = 1, 25 do long[i] = i end
      assert.truthy(repl.format(long):find("19, 20, ...}$"))
      assert.are.equal(tostring(ml.nn.Linear(2, 3)), repl.format(ml.nn.Linear(2, 3)))
   end)

   it("starts from bin/moonload and quits at the end of input", function()
      local p = io.popen("printf 'ml.ones(2):sum():item()\\n' | bin/moonload 2>&1")
      local out = p:read("*a")
      p:close()
      assert.truthy(out:find("ml> 2\nml> ", 1, true), out)
   end)
end)
