-- A ModelHook written in Lua: times every block of a GPT-2 and logs the shapes it sees.
-- Hooks follow Accelerate's protocol: pre_forward(module, ...) returns the (possibly changed)
-- arguments, post_forward(module, output) returns the (possibly changed) output, and
-- add_hook_to_module(m, hook, true) chains a hook after one already there (a SequentialHook),
-- so a timing hook can sit next to the offloading hooks of a dispatched model.
--
--    luajit examples/custom_hook.lua [path/to/gpt2]
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")
local hooks = require("moonload.hooks")
local ffi = require("ffi")

pcall(ffi.cdef, "typedef struct { long tv_sec; long tv_nsec; } ml_hook_timespec; int clock_gettime(int, ml_hook_timespec *);")
local ts = ffi.new("ml_hook_timespec")
local function now()
   ffi.C.clock_gettime(1, ts)
   return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

-- --- the hook -----------------------------------------------------------------------------------

local TimingHook = hooks.ModelHook:extend("TimingHook")

function TimingHook:__init(name, log)
   self.name, self.log = name, log
   self.calls, self.total = 0, 0
end

function TimingHook:__repr() return string.format("TimingHook(%s)", self.name) end

function TimingHook:init_hook(module)
   self.log[#self.log + 1] = string.format("attached to %s (%s)", self.name, module.__name)
   return module
end

function TimingHook:pre_forward(module, x, ...)
   self.t0 = now()
   self.shape = table.concat(x.shape, "x")
   return x, ...                       -- arguments unchanged
end

function TimingHook:post_forward(module, out)
   local dt = now() - self.t0
   self.calls, self.total = self.calls + 1, self.total + dt
   self.log[#self.log + 1] = string.format("%-16s in %-9s out %-9s %7.3f ms", self.name, self.shape,
      table.concat(out.shape, "x"), dt * 1e3)
   return out                          -- output unchanged
end

function TimingHook:detach_hook(module)
   self.log[#self.log + 1] = string.format("detached from %s after %d calls", self.name, self.calls)
   return module
end

-- --- use it on a dispatched model ------------------------------------------------------------------

local dir = arg[1] or "tests/fixtures/models/gpt2_tiny"
local cfg = ml.models.config.read(dir .. "/config.json", "custom_hook")
local device_map = { ["transformer.wte"] = "cpu", ["transformer.wpe"] = "cpu", ["transformer.drop"] = "cpu",
   ["transformer.ln_f"] = "cpu", lm_head = "cpu" }
for i = 0, cfg.n_layer - 1 do device_map["transformer.h." .. i] = i % 2 == 0 and "cpu" or "disk" end
local folder = os.tmpname()
os.remove(folder)
local prev = ml.utils.set_warning_handler(function() end)
local model = ml.models.from_pretrained(dir, { device_map = device_map, offload_folder = folder })
ml.utils.set_warning_handler(prev)

local log = {}
local timers = {}
for i, block in ipairs(model.transformer.h) do
   local t = TimingHook("transformer.h." .. (i - 1), log)
   timers[#timers + 1] = t
   hooks.add_hook_to_module(block, t, true)   -- append: keep the dispatch hook in front
end
print("block 0's hook: " .. tostring(model.transformer.h[1]._hf_hook))

model(ml.tensor({ { 5, 17, 42, 3 } }, { dtype = "int64" }))
model(ml.tensor({ { 9, 8 } }, { dtype = "int64" }))

for _, line in ipairs(log) do print(line) end
for i = #log, 1, -1 do log[i] = nil end
hooks.remove_hook_from_submodules(model)
for _, line in ipairs(log) do print(line) end
for _, t in ipairs(timers) do
   print(string.format("%-16s %d calls, %.3f ms in total", t.name, t.calls, t.total * 1e3))
end
os.execute("rm -rf '" .. folder .. "'")
