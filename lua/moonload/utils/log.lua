--- The warning channel of moonload (API.md "Conventions").
-- Every warning and info message goes through one handler, fn(message, level) with level
-- "warning" or "info". The default prints warnings to stderr as "moonload: warning: ..." and
-- prints info messages only when MOONLOAD_VERBOSE=1. Required directly (not through ml.utils)
-- by modules that must not create load cycles.
local M = {}

local function default_handler(message, level)
   if level == "warning" then
      io.stderr:write("moonload: warning: ", message, "\n")
   elseif os.getenv("MOONLOAD_VERBOSE") == "1" then
      io.stderr:write("moonload: info: ", message, "\n")
   end
end

local handler = default_handler

--- Installs fn(message, level) as the handler (nil restores the default); returns the previous one.
function M.set_warning_handler(fn)
   if fn ~= nil and type(fn) ~= "function" then
      error("set_warning_handler: handler must be a function or nil, got " .. type(fn), 2)
   end
   local previous = handler
   handler = fn or default_handler
   return previous
end

--- Sends a warning through the current handler.
function M.warn(message)
   handler(tostring(message), "warning")
end

--- Sends an info message through the current handler.
function M.info(message)
   handler(tostring(message), "info")
end

M.default_handler = default_handler

return M
