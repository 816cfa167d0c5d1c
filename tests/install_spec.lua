-- The LuaRocks install: `luarocks make` of the rockspec into a scratch tree, then the installed
-- module, library and `moonload` command used from outside the source tree with only that
-- tree's paths. The build itself is the one `make test` just did (luarocks runs `make all`). Not
-- under ASan: the sanitizer preload would reach luarocks and the compilers it runs.
local function sh(cmd)
   local p = assert(io.popen(cmd .. " 2>&1"))
   local out = p:read("*a")
   local ok, _, code = p:close()
   return out, ok == true or code == 0
end

local function quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

describe("luarocks install #noasan", function()
   local root = sh("pwd"):gsub("%s+$", "")
   local tree = os.tmpname()
   local work = os.tmpname()
   local env

   setup(function()
      os.remove(tree)
      os.remove(work)
      assert(os.execute("mkdir -p " .. quote(work)) == 0)
      local out, ok = sh(string.format("luarocks --lua-version=5.1 --tree=%s make %s/rockspec/moonload-scm-1.rockspec --deps-mode=none",
         quote(tree), quote(root)))
      assert(ok, "luarocks make failed:\n" .. out)
      -- Only the tree's paths: nothing may come from the source checkout.
      local lua_path = tree .. "/share/lua/5.1/?.lua;" .. tree .. "/share/lua/5.1/?/init.lua;;"
      local lua_cpath = tree .. "/lib/lua/5.1/?.so;;"
      env = string.format("env -u MOONLOAD_LIB -u MOONLOAD_CUDA_LIB LUA_PATH=%s LUA_CPATH=%s ", quote(lua_path),
         quote(lua_cpath))
   end)

   teardown(function()
      os.execute("rm -rf " .. quote(tree) .. " " .. quote(work))
   end)

   it("runs moonload from the installed files, not the checkout", function()
      local script = [[
local ml = require("moonload")
local y = ml.tensor({{1, 2}, {3, 4}}):matmul(ml.tensor({{1}, {1}}))
io.write(table.concat(y:flatten():tolist(), ","), "\n")
io.write(package.searchpath("moonload", package.path), "\n")
for line in io.lines("/proc/self/maps") do
   local lib = line:match("(/%S*libmoonload%.so)$")
   if lib then io.write(lib, "\n") break end
end
]]
      local out, ok = sh("cd " .. quote(work) .. " && " .. env .. "luajit -e " .. quote(script))
      assert(ok, out)
      local lines = {}
      for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
      assert.are.equal("3,7", lines[1])
      assert.are.equal(tree, lines[2]:sub(1, #tree))
      assert.are.equal(tree, lines[3]:sub(1, #tree))
   end)

   it("installs the moonload command, which preloads ml for scripts and the REPL", function()
      local f = assert(io.open(work .. "/script.lua", "w"))
      f:write('print(ml.ones(3):sum():item(), ...)\n')
      f:close()
      local out, ok = sh("cd " .. quote(work) .. " && " .. env .. quote(tree .. "/bin/moonload") .. " script.lua a b")
      assert(ok, out)
      assert.are.equal("3\ta\tb\n", out)
      out, ok = sh("cd " .. quote(work) .. " && echo 'print(ml.arange(4):sum():item())' | " .. env
         .. quote(tree .. "/bin/moonload"))
      assert(ok, out)
      assert.truthy(out:find("moonload .* on LuaJIT"), out)
      assert.truthy(out:find("\n6\n", 1, true) or out:find("> 6\n", 1, true), out)
   end)
end)
