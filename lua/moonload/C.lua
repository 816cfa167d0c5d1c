--- The FFI seam: the only file that calls ffi.cdef, ffi.load or ffi.metatype.
-- Finds libmoonload (MOONLOAD_LIB, then package.cpath, then the build tree next to this file),
-- checks its ABI version, and returns the library namespace with a few helpers.
local ffi = require("ffi")

-- The C declarations exist once per process: a second cdef would be an error, and test runners
-- that insulate files reload this module.
if not pcall(ffi.typeof, "ml_tensor") then
   ffi.cdef(require("moonload.cdef"))
end

local function this_dir()
   local src = debug.getinfo(1, "S").source
   return src:sub(1, 1) == "@" and src:sub(2):match("^(.*)/[^/]*$") or "."
end

local function find_library()
   local tried = {}
   local env = os.getenv("MOONLOAD_LIB")
   if env and env ~= "" then
      local ok, lib = pcall(ffi.load, env)
      if ok then return lib end
      tried[#tried + 1] = env .. " (MOONLOAD_LIB: " .. tostring(lib) .. ")"
   end
   local found = package.searchpath("libmoonload", package.cpath)
   if found then
      local ok, lib = pcall(ffi.load, found)
      if ok then return lib end
      tried[#tried + 1] = found .. " (" .. tostring(lib) .. ")"
   else
      tried[#tried + 1] = "libmoonload in package.cpath (" .. package.cpath .. ")"
   end
   local candidates = {
      this_dir() .. "/../../build/libmoonload.so",     -- source tree: lua/moonload/ -> build/
      this_dir() .. "/../../lib/libmoonload.so",       -- LuaRocks tree
   }
   for _, path in ipairs(candidates) do
      local f = io.open(path, "rb")
      if f then
         f:close()
         local ok, lib = pcall(ffi.load, path)
         if ok then return lib end
         tried[#tried + 1] = path .. " (" .. tostring(lib) .. ")"
      else
         tried[#tried + 1] = path
      end
   end
   error("moonload: cannot find libmoonload.so; looked in:\n  " .. table.concat(tried, "\n  ")
      .. "\nRun `make` in the moonload source tree, or set MOONLOAD_LIB to the library's path.", 0)
end

local lib = find_library()
if lib.ml_abi_version() ~= lib.ML_ABI then
   error(string.format("moonload: libmoonload ABI version %d does not match the Lua side's %d (rebuild with make)",
      lib.ml_abi_version(), lib.ML_ABI), 0)
end

-- Every function that returns an ml_status is called through a retry. When one fails for lack
-- of memory, dead tensors that LuaJIT's collector has not reached yet may hold what it needs
-- (PyTorch frees them at once by refcount; a binding over a tracing collector cannot), so a full
-- collection runs and the call is made once more. Such a function leaves nothing behind when it
-- fails (outputs are made last, inputs untouched), so the second call starts clean.
local ML_ENOMEM = lib.ML_ENOMEM
local returns_status = {}
for name in require("moonload.cdef"):gmatch("\nml_status%s+([%w_]+)%s*%(") do returns_status[name] = true end

local function retried_on_oom(f)
   return function(...)
      local status = f(...)
      if status == ML_ENOMEM then
         collectgarbage()
         collectgarbage()
         status = f(...)
      end
      return status
   end
end

-- The library namespace as the rest of the binding sees it: constants and functions as ffi.load
-- gives them, ml_status functions wrapped, each looked up once.
local api = setmetatable({}, { __index = function(t, name)
   local v = lib[name]
   if returns_status[name] then v = retried_on_oom(v) end
   rawset(t, name, v)
   return v
end })

local M = { lib = api, raw_lib = lib, ffi = ffi }

--- Raises the library's last error as a Lua error at the caller's caller (the user's line).
function M.raise(level)
   error(ffi.string(lib.ml_last_error()), (level or 2) + 1)
end

--- Checks a status: raises the library error message when it is not ML_OK.
function M.check(status, level)
   if status ~= 0 then error(ffi.string(lib.ml_last_error()), (level or 2) + 1) end
end

M.metatype = ffi.metatype

return M
