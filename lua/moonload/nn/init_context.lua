--- Where modules create their parameters and buffers: the seam under init_empty_weights and
-- init_on_device.
--
-- Layers allocate every parameter with ml.empty(shape, {device = param_device() or "cpu"}) and
-- initialise it in place (initialisation on "meta" does nothing), so a model built under
-- with_devices("meta", nil, fn) costs no memory at all. A Parameter created elsewhere and
-- registered while a device is set is moved there (a new tensor object; the caller's stays put),
-- as Accelerate's patched register_parameter does. Buffers follow buffer_device() the same way.
local M = {}

local param_dev, buffer_dev = nil, nil

--- The device new parameters go to, or nil for the default (cpu).
function M.param_device()
   return param_dev
end

--- The device new buffers go to, or nil for the default (cpu).
function M.buffer_device()
   return buffer_dev
end

local function check_device(what, d)
   if d ~= nil and type(d) ~= "string" and type(d) ~= "number" then
      error(string.format("with_devices: %s device must be a device string (\"meta\", \"cpu\", \"cuda:0\"), an integer or nil, got %s",
         what, type(d)), 3)
   end
   if type(d) == "number" then return "cuda:" .. d end
   return d
end

local function pack(...)
   return { n = select("#", ...), ... }
end

--- Runs fn() with parameters created on param_dev and buffers on buffer_dev (nil = default
-- cpu), restoring the previous devices afterwards, also when fn raises. Returns fn's results.
function M.with_devices(pdev, bdev, fn)
   pdev, bdev = check_device("parameter", pdev), check_device("buffer", bdev)
   if type(fn) ~= "function" and not (type(fn) == "table" and getmetatable(fn) and getmetatable(fn).__call) then
      error("with_devices: a function to run is expected as the third argument, got " .. type(fn), 2)
   end
   local saved_p, saved_b = param_dev, buffer_dev
   param_dev, buffer_dev = pdev, bdev
   local res = pack(pcall(fn))
   param_dev, buffer_dev = saved_p, saved_b
   if not res[1] then error(res[2], 0) end
   return unpack(res, 2, res.n)
end

return M
