--- The interactive prompt of bin/moonload: a LuaJIT REPL that prints what an expression gives,
-- as Torch7's `th` and Python do. `ml` is loaded; each line is run as `return <line>` when that
-- compiles, else as statements; what it gives back is printed, the first value kept in `_`. An
-- unfinished chunk (an open `function`, `do`, string or parenthesis) continues on the next line
-- (`>>`); errors are printed with the traceback of the user's code only. Plain tables print their
-- contents, a few levels deep; tensors, modules and the rest through tostring.
local M = {}

local MAX_ITEMS, MAX_DEPTH = 20, 2

local function is_identifier(k)
   return type(k) == "string" and k:match("^[%a_][%w_]*$") ~= nil
end

local function sorted_keys(t)
   local keys = {}
   for k in pairs(t) do
      if not (type(k) == "number" and k >= 1 and k <= #t and k == math.floor(k)) then keys[#keys + 1] = k end
   end
   table.sort(keys, function(a, b)
      local ta, tb = type(a), type(b)
      if ta ~= tb then return ta < tb end
      if ta == "number" or ta == "string" then return a < b end
      return tostring(a) < tostring(b)
   end)
   return keys
end

--- format(v) -> a string for v: strings quoted inside tables, plain tables as {..} with at most
-- MAX_ITEMS entries per level and MAX_DEPTH levels; anything with a metatable through tostring.
function M.format(v, depth, seen)
   depth, seen = depth or 0, seen or {}
   local tv = type(v)
   if tv == "string" then return depth == 0 and v or string.format("%q", v) end
   if tv ~= "table" or getmetatable(v) ~= nil then return tostring(v) end
   if seen[v] then return "{<cycle>}" end
   if depth >= MAX_DEPTH then return "{...}" end
   seen[v] = true
   local parts, n = {}, 0
   for i = 1, #v do
      n = n + 1
      if n > MAX_ITEMS then break end
      parts[n] = M.format(v[i], depth + 1, seen)
   end
   for _, k in ipairs(sorted_keys(v)) do
      n = n + 1
      if n > MAX_ITEMS then break end
      local key = is_identifier(k) and k or "[" .. M.format(k, depth + 1, seen) .. "]"
      parts[n] = key .. " = " .. M.format(v[k], depth + 1, seen)
   end
   seen[v] = nil
   if n > MAX_ITEMS then parts[MAX_ITEMS + 1] = "..." end
   return "{" .. table.concat(parts, ", ") .. "}"
end

-- A chunk that failed only because its text ended early.
local function incomplete(err)
   return err:find("<eof>", 1, true) ~= nil
end

--- compile(text) -> fn, is_expression | nil, "incomplete" | nil, message: the chunk as an
-- expression when it is one, else as statements.
function M.compile(text)
   -- (through select, so that a call in it is not a tail call and keeps its line in errors)
   local fn = loadstring("return select(1, " .. text .. "\n)", "=stdin")
   if fn then return fn, true end
   local err
   fn, err = loadstring(text, "=stdin")
   if fn then return fn, false end
   if incomplete(err) then return nil, "incomplete" end
   return nil, err
end

-- The traceback of the user's chunk: the frames up to (not including) the REPL's own.
local function user_traceback(err)
   local tb = debug.traceback(tostring(err), 2)
   local lines = {}
   for line in tb:gmatch("[^\n]+") do
      if line:find("moonload/repl.lua", 1, true) or line:find("[C]: in function 'xpcall'", 1, true) then break end
      if not line:find("^%s*%[builtin#") then lines[#lines + 1] = line end      -- error() itself
   end
   return table.concat(lines, "\n")
end

local function pack(...) return { n = select("#", ...), ... } end

--- run({read = fn(prompt) -> line or nil, write = fn(text), env = table}): the loop; returns
-- when read gives nil (end of input) outside an unfinished chunk.
function M.run(io_)
   local read, write, env = io_.read, io_.write, io_.env or _G
   local buffer
   while true do
      local line = read(buffer and ">> " or "ml> ")
      if line == nil then
         if not buffer then return end
         buffer = nil                         -- Ctrl-D in an unfinished chunk drops it
         write("\n")
      end
      local text = line and (buffer and (buffer .. "\n" .. line) or line) or ""
      if not text:match("^%s*$") then
         local fn, how = M.compile(text:gsub("^%s*=", "", 1))     -- `=expr` as in the Lua 5.1 REPL
         if fn == nil and how == "incomplete" then
            buffer = text
         elseif fn == nil then
            buffer = nil
            write(how .. "\n")
         else
            buffer = nil
            setfenv(fn, env)
            local res = pack(xpcall(fn, user_traceback))
            if not res[1] then
               write(tostring(res[2]) .. "\n")
            elseif res.n > 1 then                               -- what the chunk gave back
               local out = {}
               for i = 2, res.n do out[i - 1] = M.format(res[i]) end
               write(table.concat(out, "\t") .. "\n")
               rawset(env, "_", res[2])
            end
         end
      end
   end
end

--- The interactive loop on the terminal (bin/moonload with no script).
function M.main()
   local ml = require("moonload")
   rawset(_G, "ml", ml)
   io.write("moonload " .. ml.__version .. " on " .. jit.version .. ": `ml` is loaded, expressions print their value (try ml.randn(2, 3)); Ctrl-D quits\n")
   M.run({
      read = function(prompt)
         io.write(prompt)
         io.flush()
         return io.read("*l")
      end,
      write = function(text) io.write(text) end,
   })
   io.write("\n")                             -- (the shell's prompt on a line of its own)
end

return M
