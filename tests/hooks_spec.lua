-- ml.hooks: Accelerate's hook semantics (reference section 2) on small Lua modules.
local ml = require("moonload")
local hooks = require("moonload.hooks")
local Module = require("moonload.nn.module")
local Parameter = require("moonload.nn.parameter").Parameter
local ctx = require("moonload.nn.init_context")

-- --- small modules ------------------------------------------------------------------------------

local function param(...)
   local t = ml.empty({ ... }, { device = ctx.param_device() or "cpu" })
   if t.device ~= "meta" then t:normal_(0, 0.5) end
   return Parameter(t)
end

local Lin = Module:extend("Lin")
function Lin:__init(i, o)
   self.weight = param(o, i)
   self.bias = param(o)
end
function Lin:forward(x) return x:matmul(self.weight:t()) + self.bias end

-- A layer with a persistent buffer (like BatchNorm's running statistics) and a non-persistent one.
local Shift = Module:extend("Shift")
function Shift:__init(n)
   self.scale = param(n)
   local b = ml.empty({ n }, { device = ctx.buffer_device() or "cpu" })
   if b.device ~= "meta" then b:fill_(0.25) end
   self:register_buffer("offset", b)
   local np = ml.empty({ n }, { device = ctx.buffer_device() or "cpu" })
   if np.device ~= "meta" then np:fill_(1) end
   self:register_buffer("ones", np, false)
end
function Shift:forward(x) return (x + self.offset) * self.scale * self.ones end

local Net = Module:extend("Net")
function Net:__init()
   self.linear1 = Lin(3, 4)
   self.shift = Shift(4)
   self.linear2 = Lin(4, 5)
end
function Net:forward(x) return self.linear2(self.shift(self.linear1(x))) end

-- A module whose forward reads its child's weight directly (never calls the child).
local Unused = Module:extend("Unused")
function Unused:__init()
   self.linear = Lin(3, 3)
end
function Unused:forward(x) return x:matmul(self.linear.weight:t()) + self.linear.bias end

local function input()
   ml.manual_seed(7)
   return ml.randn(2, 3)
end

local function close(a, b) return ml.allclose(a, b, 1e-6, 1e-6) end

-- A recording hook.
local function recorder(tag, calls)
   local H = hooks.ModelHook:extend("Rec" .. tag)
   function H:init_hook(m) calls[#calls + 1] = tag .. ":init"; return m end
   function H:detach_hook(m) calls[#calls + 1] = tag .. ":detach"; return m end
   function H:pre_forward(m, ...) calls[#calls + 1] = tag .. ":pre"; return ... end
   function H:post_forward(m, ...) calls[#calls + 1] = tag .. ":post"; return ... end
   return H()
end

describe("hooks", function()
   describe("add_hook_to_module", function()
      it("stores _hf_hook and _old_forward and wraps forward at instance level", function()
         local m = Lin(3, 4)
         local class_forward = m.forward
         local h = hooks.ModelHook()
         hooks.add_hook_to_module(m, h)
         assert.are.equal(h, m._hf_hook)
         assert.are.equal(class_forward, m._old_forward)
         assert.are_not.equal(class_forward, rawget(m, "forward"))
         local x = input()
         assert.is_true(close(m(x), class_forward(m, x)))
      end)

      it("lets pre_forward change the arguments and post_forward the outputs", function()
         local Double = hooks.ModelHook:extend("Double")
         function Double:pre_forward(m, x) return x * 2 end
         function Double:post_forward(m, out) return out + 1 end
         local m = Lin(3, 4)
         local x = input()
         local expected = m:forward(x * 2) + 1
         hooks.add_hook_to_module(m, Double())
         assert.is_true(close(m(x), expected))
      end)

      it("replaces the current hook without calling its detach_hook", function()
         local calls = {}
         local m = Lin(3, 4)
         hooks.add_hook_to_module(m, recorder("a", calls))
         local old_forward = m._old_forward
         hooks.add_hook_to_module(m, recorder("b", calls))
         assert.are.same({ "a:init", "b:init" }, calls)
         assert.are.equal(old_forward, m._old_forward)
         calls = {}
         m(input())
      end)

      it("with append chains a SequentialHook, detaching and re-initialising the old hook", function()
         local calls = {}
         local m = Lin(3, 4)
         local a = recorder("a", calls)
         hooks.add_hook_to_module(m, a)
         hooks.add_hook_to_module(m, recorder("b", calls), true)
         assert.are.same({ "a:init", "a:detach", "a:init", "b:init" }, calls)
         assert.are.equal("SequentialHook", m._hf_hook.__name)
         assert.are.equal(a, m._hf_hook.hooks[1])
         for i = #calls, 1, -1 do calls[i] = nil end
         m(input())
         -- post_forward runs in the same order as pre_forward, not reversed
         assert.are.same({ "a:pre", "b:pre", "a:post", "b:post" }, calls)
      end)

      it("reads module._hf_hook at call time", function()
         local m = Lin(3, 4)
         local x = input()
         hooks.add_hook_to_module(m, hooks.ModelHook())
         local Neg = hooks.ModelHook:extend("Neg")
         function Neg:post_forward(_, out) return -out end
         local plain = m._old_forward(m, x)
         m._hf_hook = Neg()
         assert.is_true(close(m(x), -plain))
      end)

      it("keeps the no_grad field (false by default, SequentialHook's own)", function()
         local h = hooks.ModelHook()
         assert.is_false(h.no_grad)
         local NG = hooks.ModelHook:extend("NG")
         NG.no_grad = true
         local s = hooks.SequentialHook(NG(), hooks.ModelHook())
         assert.is_true(s.hooks[1].no_grad)
         assert.is_false(s.no_grad)
      end)

      it("threads several return values through post_forward", function()
         local Two = Module:extend("Two")
         function Two:forward(a, b) return b, a end
         local Swap = hooks.ModelHook:extend("Swap")
         function Swap:post_forward(_, x, y) return y, x end
         local m = Two()
         hooks.add_hook_to_module(m, hooks.SequentialHook(Swap(), hooks.ModelHook()))
         local p, q = m(1, 2)
         assert.are.equal(1, p)
         assert.are.equal(2, q)
      end)

      it("rejects a hook that is not a ModelHook", function()
         assert.has_error(function() hooks.add_hook_to_module(Lin(1, 1), {}) end,
            "add_hook_to_module: hook must be a ModelHook (made with ModelHook:extend), got table")
      end)
   end)

   describe("remove_hook_from_module", function()
      it("detaches, restores the class forward and clears both fields", function()
         local calls = {}
         local m = Lin(3, 4)
         hooks.add_hook_to_module(m, recorder("a", calls))
         hooks.remove_hook_from_module(m)
         assert.are.same({ "a:init", "a:detach" }, calls)
         assert.is_nil(m._hf_hook)
         assert.is_nil(m._old_forward)
         assert.is_nil(rawget(m, "forward"))
      end)

      it("keeps an instance-level forward that was there before the hook", function()
         local m = Lin(3, 4)
         local mine = function(self, x) return x end
         m.forward = mine
         hooks.add_hook_to_module(m, hooks.ModelHook())
         hooks.remove_hook_from_module(m)
         assert.are.equal(mine, rawget(m, "forward"))
      end)

      it("recurses into children with recurse = true, and remove_hook_from_submodules", function()
         for _, how in ipairs({ "recurse", "submodules" }) do
            local net = Net()
            hooks.add_hook_to_module(net, hooks.ModelHook())
            hooks.add_hook_to_module(net.linear1, hooks.ModelHook())
            hooks.add_hook_to_module(net.shift, hooks.ModelHook())
            if how == "recurse" then hooks.remove_hook_from_module(net, true)
            else hooks.remove_hook_from_submodules(net) end
            for name, m in net:named_modules() do
               assert.is_nil(m._hf_hook, name)
               assert.is_nil(m._old_forward, name)
            end
         end
      end)

      it("without recurse leaves the children's hooks", function()
         local net = Net()
         hooks.add_hook_to_module(net, hooks.ModelHook())
         hooks.add_hook_to_module(net.linear1, hooks.ModelHook())
         hooks.remove_hook_from_module(net)
         assert.is_nil(net._hf_hook)
         assert.is_not_nil(net.linear1._hf_hook)
      end)
   end)

   describe("send_to_device / find_device", function()
      it("moves tensors in nested tables, keeps skip_keys and other values", function()
         local x, y = ml.zeros(2), ml.ones(3)
         local data = { x, { y = y, keep = x, n = 3 }, "s" }
         local out = hooks.send_to_device(data, "meta", { "keep" })
         assert.are.equal("meta", out[1].device)
         assert.are.equal("meta", out[2].y.device)
         assert.are.equal(x, out[2].keep)
         assert.are.equal(3, out[2].n)
         assert.are.equal("s", out[3])
         assert.are.equal("cpu", x.device)   -- the input is not modified
      end)

      it("returns the same table when nothing moves, and anything with device nil", function()
         local data = { ml.zeros(1), { ml.zeros(1) } }
         assert.are.equal(data, hooks.send_to_device(data, "cpu"))
         assert.are.equal(data, hooks.send_to_device(data, nil))
      end)

      it("finds the first tensor's device depth-first", function()
         assert.are.equal("meta", hooks.find_device({ 1, { ml.empty({ 1 }, { device = "meta" }) }, ml.zeros(1) }))
         assert.is_nil(hooks.find_device({ 1, "a", {} }))
      end)
   end)

   describe("AlignDevicesHook", function()
      it("prints its fields", function()
         assert.are.equal(
            "AlignDevicesHook(execution_device=cuda:1, offload=true, io_same_device=false, offload_buffers=false, place_submodules=false, skip_keys={a, b})",
            tostring(hooks.AlignDevicesHook({ execution_device = 1, offload = true, skip_keys = { "a", "b" } })))
      end)

      it("moves positional args, skips skip_keys in the trailing table, and io_same_device sends outputs back", function()
         local Probe = Module:extend("Probe")
         local seen = {}
         function Probe:forward(x, kw)
            seen.x, seen.keep, seen.other = x.device, kw.keep.device, kw.other.device
            return ml.ones(2)
         end
         local m = Probe()
         hooks.add_hook_to_module(m, hooks.AlignDevicesHook({
            execution_device = "meta", io_same_device = true, skip_keys = { "keep" } }))
         local out = m(ml.zeros(1), { keep = ml.zeros(1), other = ml.zeros(1) })
         assert.are.same({ x = "meta", keep = "cpu", other = "meta" }, seen)
         assert.are.equal("cpu", out.device)          -- the input device (first tensor found)
         -- with the input on meta, the cpu output is sent to meta
         local out2 = m(ml.empty({ 1 }, { device = "meta" }), { keep = ml.zeros(1), other = ml.zeros(1) })
         assert.are.equal("meta", out2.device)
      end)

      it("offloads a module's weights to meta and materializes them only during forward", function()
         local m = Lin(3, 4)
         local x = input()
         local expected = m(x)
         local during
         local Spy = hooks.ModelHook:extend("Spy")
         hooks.add_hook_to_module(m, hooks.AlignDevicesHook({ execution_device = "cpu", offload = true }))
         assert.is_true(m.weight:is_meta())
         assert.is_true(m.bias:is_meta())
         local old = m._old_forward
         m._old_forward = function(self, ...)
            during = { self.weight.device, self.bias.device }
            return old(self, ...)
         end
         assert.is_true(close(m(x), expected))
         assert.are.same({ "cpu", "cpu" }, during)
         assert.is_true(m.weight:is_meta())
         local _ = Spy
      end)

      it("recovers from a forward that raised: the next forward offloads again", function()
         local m = Lin(3, 4)
         local x = input()
         local expected = m(x)
         hooks.add_hook_to_module(m, hooks.AlignDevicesHook({ execution_device = "cpu", offload = true }))
         local old = m._old_forward
         m._old_forward = function() error("boom", 0) end
         assert.has_error(function() m(x) end, "boom")
         m._old_forward = old
         assert.is_true(close(m(x), expected))
         assert.is_true(m.weight:is_meta())
      end)

      it("restores the original weights on detach when offloading", function()
         local m = Lin(3, 4)
         local x = input()
         local expected = m(x)
         hooks.add_hook_to_module(m, hooks.AlignDevicesHook({ execution_device = "cpu", offload = true }))
         hooks.remove_hook_from_module(m)
         assert.are.equal("cpu", m.weight.device)
         assert.is_true(close(m(x), expected))
      end)

      it("keeps buffers on the execution device unless offload_buffers", function()
         local s = Shift(4)
         hooks.add_hook_to_module(s, hooks.AlignDevicesHook({ execution_device = "cpu", offload = true }))
         assert.is_true(s.scale:is_meta())
         assert.are.equal("cpu", s.offset.device)
         local s2 = Shift(4)
         hooks.add_hook_to_module(s2, hooks.AlignDevicesHook({ execution_device = "cpu", offload = true, offload_buffers = true }))
         assert.is_true(s2.offset:is_meta())
         assert.are.equal("cpu", s2.ones.device)     -- non-persistent: not in any state dict
      end)

      it("reports a weights map without the tensor", function()
         local m = Lin(3, 4)
         hooks.add_hook_to_module(m, hooks.AlignDevicesHook({ execution_device = "cpu", offload = true, weights_map = { weight = ml.zeros(4, 3) } }))
         assert.has_error(function() m(input()) end, 'AlignDevicesHook: the weights map has no tensor for "bias" (got nil)')
      end)
   end)

   describe("attach helpers", function()
      it("attach_align_device_hook hooks every module with direct tensors, with prefixed weights maps", function()
         local net = Net()
         local x = input()
         local expected = net(x)
         local sd = net:state_dict()
         hooks.attach_align_device_hook(net, { execution_device = "cpu", offload = true, weights_map = sd })
         assert.is_nil(net._hf_hook)                   -- the root has no direct tensors
         for _, name in ipairs({ "linear1", "shift", "linear2" }) do
            assert.are.equal("AlignDevicesHook", net[name]._hf_hook.__name)
         end
         assert.is_true(net.linear1.weight:is_meta())
         assert.is_true(close(net(x), expected))
      end)

      it("preload_module_classes loads a whole block in its own hook", function()
         local u = Unused()
         local x = input()
         local expected = u(x)
         hooks.attach_align_device_hook(u, { execution_device = "cpu", offload = true,
            weights_map = u:state_dict(), preload_module_classes = { "Unused" } })
         assert.is_true(u._hf_hook.place_submodules)
         assert.is_nil(u.linear._hf_hook)
         assert.is_true(u.linear.weight:is_meta())
         assert.is_true(close(u(x), expected))
      end)

      it("attach_execution_device_hook hooks modules with state and stops below preload classes", function()
         local net = Net()
         hooks.attach_execution_device_hook(net, "cpu", { preload_module_classes = { "Shift" } })
         assert.is_not_nil(net._hf_hook)
         assert.is_not_nil(net.linear1._hf_hook)
         assert.is_false(net.linear1._hf_hook.offload)
      end)

      it("attach_align_device_hook_on_blocks follows the decision table", function()
         local net = Net()
         local x = input()
         local expected = net(x)
         local sd = net:state_dict()
         hooks.attach_align_device_hook_on_blocks(net, {
            execution_device = { [""] = "cpu", linear1 = "cpu", shift = "cpu", linear2 = "cpu" },
            offload = { linear1 = true, shift = false, linear2 = true },
            weights_map = sd })
         assert.is_true(net._hf_hook.io_same_device)
         assert.is_true(net.linear1._hf_hook.offload)
         assert.is_true(net.shift._hf_hook.place_submodules)
         assert.is_false(net.shift._hf_hook.offload)
         assert.is_true(net.linear1.weight:is_meta())
         assert.are.equal("cpu", net.shift.scale.device)
         assert.is_true(close(net(x), expected))
      end)
   end)

   describe("CpuOffload", function()
      it("cpu_offload_with_hook keeps outputs, and the user hook removes itself", function()
         local net = Net()
         local x = input()
         local expected = net(x)
         local model, user = ml.cpu_offload_with_hook(net, { execution_device = "cpu" })
         assert.are.equal(net, model)
         assert.are.equal("CpuOffload", net._hf_hook.__name)
         assert.is_true(close(net(x), expected))
         user:offload()
         assert.are.equal("cpu", net.linear1.weight.device)
         user:remove()
         assert.is_nil(net._hf_hook)
      end)

      it("offloads the previous model in a chain before running", function()
         -- a model whose first parameter is not on the cpu (meta here) counts as "on the device"
         local a = ml.init_empty_weights(function() return Net() end)
         local b = Net()
         local ha = hooks.UserCpuOffloadHook(a, hooks.CpuOffload({ execution_device = "cpu" }))
         local offloaded = 0
         ha.offload = function() offloaded = offloaded + 1 end
         ml.cpu_offload_with_hook(b, { execution_device = "cpu", prev_module_hook = ha })
         b(input())
         assert.are.equal(1, offloaded)
         local c = Net()
         local _, hb = ml.cpu_offload_with_hook(c, { execution_device = "cpu" })
         local n = 0
         hb.offload = function() n = n + 1 end
         ml.cpu_offload_with_hook(Net(), { execution_device = "cpu", prev_module_hook = hb })(input())
         assert.are.equal(0, n)       -- c is on the cpu already: nothing to offload
      end)
   end)
end)

describe("hooks runtime settings", function()
   it("validates the prefetch window and drop level", function()
      assert.has_error(function() hooks.set_prefetch_window(-5) end,
         "ml_hookrt_set_prefetch_window: sizes must be >= 0 (-1 keeps one), got -5 and -1")
      assert.has_error(function() hooks.set_drop_pages(4) end,
         "ml_hookrt_configure: drop must be 0, 1, 2 or 3 (auto) (-1 keeps it), got 4")
      assert.has_error(function() hooks.set_drop_pages("auto", -1) end,
         "ml_hookrt_set_auto_drop: threshold must be >= 0, got -1")
      hooks.set_prefetch_window(nil, 32 * 1024 * 1024)
      local prev = hooks.set_prefetch(false)
      assert.is_false(hooks.set_prefetch(prev))
      assert.has_error(function() hooks.set_stream_window(-1) end, "set_stream_window: bytes must be >= 0, got -1")
      assert.has_error(function() hooks.set_stream_window() end, "set_stream_window: bytes must be a number >= 0, got nil")
      assert.has_error(function() hooks.set_auto_drop_above("1GB") end,
         "set_auto_drop_above: bytes must be a number >= 0, got string")
      assert.has_error(function() hooks.set_auto_drop_above(-1) end,
         "ml_hookrt_set_auto_drop: threshold must be >= 0, got -1")
      hooks.set_stream_window(64 * 2 ^ 20)
      assert.has_error(function() hooks.set_compute_in_place(1.5) end,
         "set_compute_in_place: tokens must be an integer >= 0, got 1.5")
      assert.are.equal(0, hooks.set_compute_in_place(0))     -- off by default: Accelerate streams always
   end)

   it("frees a hook's weight group when the hook is collected, without remove_hook_from_module", function()
      local function settle() collectgarbage(); collectgarbage() end
      settle()
      local base = hooks.runtime_stats().groups
      local m = ml.nn.Sequential(ml.nn.Linear(4, 3), ml.nn.ReLU(), ml.nn.Linear(3, 2))
      ml.cpu_offload(m, { execution_device = "cpu" })
      local x = ml.randn(2, 4)
      m(x)
      assert.is_true(hooks.runtime_stats().groups >= base + 2)   -- the two linears at least
      m = nil
      settle()
      assert.are.equal(base, hooks.runtime_stats().groups)
      -- removed hooks free theirs at once, and a later collection does not free them twice
      m = ml.nn.Sequential(ml.nn.Linear(4, 3))
      ml.cpu_offload(m, { execution_device = "cpu" })
      m(x)
      hooks.remove_hook_from_submodules(m)
      assert.are.equal(base, hooks.runtime_stats().groups)
      m = nil
      settle()
      assert.are.equal(base, hooks.runtime_stats().groups)
   end)
end)
