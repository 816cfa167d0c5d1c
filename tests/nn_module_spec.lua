-- nn.Module: classes, registration by assignment, ties, introspection, state dicts, conversion,
-- printing and error paths. Reference names and printing: tests/fixtures/nn.json (gen_nn.py).
local ml = require("moonload")
local nn = ml.nn
local class = require("moonload.class")
local N = require("nn_helpers")

local fixture = N.fixture

local function names(iter_fn)
   local out = {}
   for name in iter_fn do out[#out + 1] = name end
   return out
end

-- The model gen_nn.py prints (TinyModel), built the same way in Lua.
local Block = nn.Module:extend("Block")
function Block:__init()
   self.attn = nn.Linear(4, 12)
   self.proj = nn.Conv1D(4, 4)
   self.act = nn.GELU({ approximate = "tanh" })
   self.drop = nn.Dropout(0.1)
   self:register_buffer("mask", ml.ones(2), false)
end

local TinyModel = nn.Module:extend("TinyModel")
function TinyModel:__init()
   self.wte = nn.Embedding(10, 4)
   local blocks = {}
   for i = 1, 3 do blocks[i] = Block() end
   self.h = nn.ModuleList(blocks)
   self.extra = nn.ModuleList({ nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4) })
   self.ln_f = nn.LayerNorm(4)
   self.norm = nn.RMSNorm(4, { eps = 1e-6 })
   self.bn = nn.BatchNorm1d(4)
   self.seq = nn.Sequential(nn.Linear(4, 8, { bias = false }), nn.SiLU(), nn.Identity(), nn.Tanh())
   self:register_buffer("pos", ml.zeros(3))
   self.scale = nn.Parameter(ml.ones(1))
   self.lm_head = nn.Linear(4, 10, { bias = false })
   self.lm_head.weight = self.wte.weight
   self.shared = self.ln_f
end

describe("nn class system", function()
   it("extends, constructs through __init and names instances by class", function()
      local Foo = nn.Module:extend("Foo")
      function Foo:__init(a) self.a = a end
      local f = Foo(3)
      assert.equal(3, f.a)
      assert.equal("Foo", f.__name)
      assert.is_true(class.is_a(f, nn.Module))
      assert.is_true(nn.is_module(f))
      assert.equal("class Foo", tostring(Foo))
   end)

   it("subclasses a concrete layer calling the parent constructor", function()
      local MyLinear = nn.Linear:extend("MyLinear")
      function MyLinear:__init(i, o)
         nn.Linear.__init(self, i, o, { bias = false })
         self.tag = "mine"
      end
      function MyLinear:forward(x) return nn.Linear.forward(self, x) * 2 end
      local m = MyLinear(3, 2)
      assert.equal("MyLinear", m.__name)
      assert.is_true(class.is_a(m, nn.Linear))
      assert.same({ 2, 3 }, m.weight.shape)
      assert.is_nil(m.bias)
      assert.equal("MyLinear(in_features=3, out_features=2, bias=False)", tostring(m))
      local x = ml.ones(1, 3)
      local y = m(x)
      local ref = nn.functional.linear(x, m.weight) * 2
      assert.is_true(y:allclose(ref))
   end)

   it("rejects a class without a name", function()
      assert.has_error(function() nn.Module:extend() end,
         "class: a class name (non-empty string) is expected, got nil")
   end)

   it("plain classes from class() get extend and a default tostring", function()
      local Animal = class("Animal")
      function Animal:__init(n) self.n = n end
      local Dog = Animal:extend("Dog")
      local d = Dog(4)
      assert.equal(4, d.n)
      assert.equal("Dog()", tostring(d))
      assert.is_true(class.is_a(d, Animal))
      assert.is_false(class.is_a(Animal(1), Dog))
      assert.is_true(class.is_subclass(Dog, Animal))
   end)

   it("a module without forward says so when called", function()
      local Empty = nn.Module:extend("Empty")
      assert.has_error(function() Empty()(1) end, 'Module [Empty] is missing the required "forward" function')
   end)
end)

describe("nn.Module registration", function()
   it("registers children, parameters and buffers in assignment order", function()
      local M = nn.Module:extend("M")
      function M:__init()
         self.b = nn.Linear(2, 2)
         self.w = nn.Parameter(ml.zeros(3))
         self.a = nn.ReLU()
         self:register_buffer("z", ml.ones(1))
         self:register_buffer("tmp", ml.ones(1), false)
         self.plain = 5
      end
      local m = M()
      assert.same({ "b", "a" }, names(m:named_children()))
      assert.same({ "w", "b.weight", "b.bias" }, names(m:named_parameters()))
      assert.same({ "z", "tmp" }, names(m:named_buffers()))
      assert.same({ "b", "a" }, m._modules:keys())
      assert.same({ "w" }, m._parameters:keys())
      assert.is_true(m._non_persistent_buffers_set.tmp)
      assert.is_nil(m._non_persistent_buffers_set.z)
      assert.equal(5, rawget(m, "plain"))
      assert.is_nil(rawget(m, "w"))          -- registered things are not raw fields
      assert.equal("Linear", m.b.__name)
      assert.is_nil(m.nothing_here)
      assert.equal(nn.Module.parameters, m.parameters) -- methods still resolve
   end)

   it("ties a parameter by assignment: the same tensor object, its slot kept", function()
      local m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
      m[2].weight = m[1].weight
      assert.is_true(rawequal(m[1].weight, m[2].weight))
      assert.same({ "weight", "bias" }, m[2]._parameters:keys())
      assert.same({ "0.weight", "0.bias", "1.bias" }, names(m:named_parameters()))
      assert.same({ "0.weight", "0.bias", "1.weight", "1.bias" }, names(m:named_parameters("", true, false)))
   end)

   it("a parameter can be set to nil and back by name, keeping its place", function()
      local l = nn.Linear(2, 3)
      local w = l.weight
      l.weight = nil
      assert.is_nil(l.weight)
      assert.is_true(l._parameters:has("weight"))
      assert.same({ "bias" }, names(l:named_parameters()))
      l.weight = ml.zeros(3, 2)                   -- a plain tensor becomes the parameter
      assert.same({ "weight", "bias" }, names(l:named_parameters()))
      assert.is_true(nn.is_parameter(l.weight))
      assert.is_false(rawequal(w, l.weight))
      l._parameters.weight = w                    -- raw registry access as Accelerate does it
      assert.is_true(rawequal(w, l.weight))
   end)

   it("buffers are replaced in place and may hold nil", function()
      local bn = nn.BatchNorm1d(2)
      local t = ml.full({ 2 }, 7)
      bn.running_mean = t
      assert.is_true(rawequal(t, bn.running_mean))
      assert.same({ "running_mean", "running_var", "num_batches_tracked" }, bn._buffers:keys())
      bn.running_var = nil
      assert.same({ "running_mean", "num_batches_tracked" }, names(bn:named_buffers()))
   end)

   it("hooks' fields are plain instance fields, and calling goes through the instance forward", function()
      local l = nn.Linear(2, 2)
      local calls = {}
      l._old_forward = l.forward
      l._hf_hook = { name = "hook" }
      l.forward = function(self, x)
         calls[#calls + 1] = x
         return self._old_forward(self, x) + 1
      end
      local x = ml.ones(1, 2)
      local y = l(x)
      assert.equal(1, #calls)
      assert.is_true(y:allclose(nn.functional.linear(x, l.weight, l.bias) + 1))
      assert.same({}, names(l:named_children()))
      assert.same({ "weight", "bias" }, names(l:named_parameters()))
      l.forward, l._old_forward, l._hf_hook = nil, nil, nil
      assert.equal(nn.Linear.forward, l.forward)
   end)

   it("add_module registers a child under any valid name", function()
      local s = nn.Sequential()
      s:add_module("conv", nn.Linear(1, 1))
      s:add_module("act", nn.ReLU())
      assert.same({ "conv", "act" }, names(s:named_children()))
      assert.equal("ReLU", s[2].__name)
      assert.equal(s.conv, s[1])
      assert.equal(s.act, s[-1])
   end)

   describe("errors", function()
      local m
      before_each(function() m = nn.Linear(2, 2) end)

      it("rejects bad names", function()
         assert.has_error(function() m:register_buffer("a.b", ml.ones(1)) end,
            'register_buffer: buffer name can\'t contain ".", got "a.b"')
         assert.has_error(function() m:add_module("", nn.ReLU()) end,
            'add_module: module name can\'t be empty string ""')
         assert.has_error(function() m:register_parameter(3, ml.ones(1)) end,
            "register_parameter: parameter name should be a string, got number")
      end)

      it("rejects names already taken by something else", function()
         assert.has_error(function() m:register_buffer("weight", ml.ones(1)) end,
            'register_buffer: attribute "weight" already exists')
         assert.has_error(function() m:add_module("forward", nn.ReLU()) end,
            'add_module: attribute "forward" already exists')
         m.foo = 1
         assert.has_error(function() m:register_parameter("foo", ml.ones(1)) end,
            'register_parameter: attribute "foo" already exists')
      end)

      it("rejects wrong value kinds for registered names, changing nothing", function()
         local w = m.weight
         assert.has_error(function() m.weight = nn.ReLU() end,
            'cannot assign ReLU as parameter "weight" (nn.Parameter, a tensor or nil expected)')
         assert.has_error(function() m.weight = 3 end,
            'cannot assign number as parameter "weight" (nn.Parameter, a tensor or nil expected)')
         assert.is_true(rawequal(w, m.weight))
         local s = nn.Sequential(nn.ReLU())
         assert.has_error(function() s:add_module("x", 4) end,
            'add_module: cannot assign number as child module "x" (nn.Module or nil expected)')
         s:add_module("y", nn.ReLU())
         assert.has_error(function() s.y = "no" end,
            'cannot assign string as child module "y" (nn.Module or nil expected)')
         assert.has_error(function() m:register_buffer("b2", {}) end,
            'register_buffer: cannot assign table to buffer "b2" (a tensor or nil expected)')
         assert.has_error(function() nn.Parameter(3) end, "Parameter: a tensor is expected, got number")
      end)
   end)
end)

describe("nn.Module introspection (PyTorch reference)", function()
   local fx = fixture().tree
   local m = TinyModel()

   it("prints the tree like PyTorch", function()
      assert.equal(fx.repr, tostring(m))
   end)

   it("state_dict keys in PyTorch's order (tied and shared entries included, non-persistent left out)", function()
      local sd, keys = m:state_dict()
      assert.same(fx.state_dict_keys, keys)
      local n = 0
      for _ in pairs(sd) do n = n + 1 end
      assert.equal(#keys, n)
   end)

   it("named_parameters, with and without duplicates, prefixed, not recursing", function()
      assert.same(fx.named_parameters, names(m:named_parameters()))
      assert.same(fx.named_parameters_all, names(m:named_parameters("", true, false)))
      assert.same(fx.named_parameters_all, names(m:named_parameters({ remove_duplicate = false })))
      assert.same(fx.h0_named_parameters_prefixed, names(m.h[1]:named_parameters("h.0")))
      assert.same(fx.named_parameters_norecurse, names(m:named_parameters("", false)))
   end)

   it("named_buffers, named_modules, named_children", function()
      assert.same(fx.named_buffers, names(m:named_buffers()))
      assert.same(fx.named_modules, names(m:named_modules()))
      assert.same(fx.named_children, names(m:named_children()))
   end)

   it("value iterators and list variants agree with the named ones", function()
      local ps = {}
      for p in m:parameters() do ps[#ps + 1] = p end
      assert.equal(#fx.named_parameters, #ps)
      assert.equal(#fx.named_parameters, #m:parameters_list())
      assert.equal(#fx.named_buffers, #m:buffers_list())
      assert.equal(#fx.named_modules, #m:modules_list())
      local mods = {}
      for mm in m:modules() do mods[#mods + 1] = mm end
      assert.equal(m, mods[1])
      assert.equal(#fx.named_children, #m:children_list())
      local l = m:named_parameters_list()
      assert.equal("scale", l[1][1])
      assert.is_true(rawequal(m.scale, l[1][2]))
      local with_dup = m:named_modules_list({ remove_duplicate = false })
      assert.equal(#fx.named_modules + 1, #with_dup) -- "shared" shows up too
   end)

   it("get_submodule, get_parameter and get_buffer walk dotted names", function()
      assert.equal(m.h[2].attn, m:get_submodule("h.1.attn"))
      assert.equal(m, m:get_submodule(""))
      assert.is_true(rawequal(m.h[3].proj.weight, m:get_parameter("h.2.proj.weight")))
      assert.is_true(rawequal(m.bn.running_var, m:get_buffer("bn.running_var")))
      assert.is_true(rawequal(m.scale, m:get_parameter("scale")))
      assert.has_error(function() m:get_submodule("h.7") end,
         'get_submodule: ModuleList has no attribute "7" (looking up "h.7")')
      assert.has_error(function() m:get_submodule("bn.weight") end,
         'get_submodule: "bn.weight" is not an nn.Module')
      assert.has_error(function() m:get_parameter("bn.running_mean") end,
         'get_parameter: "bn.running_mean" is not a parameter')
      assert.has_error(function() m:get_buffer("bn.nope") end,
         'get_buffer: BatchNorm1d has no attribute "nope" (looking up "bn.nope")')
   end)

   it("set_submodule puts a module where a dotted name was, in the same place of its parent's order", function()
      local model = nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 2)))
      local before = model:named_modules_list()
      local tanh = nn.Tanh()
      model:set_submodule("1.0", tanh)
      assert.equal(tanh, model:get_submodule("1.0"))
      local after = model:named_modules_list()
      for i = 1, #before do assert.equal(before[i][1], after[i][1]) end
      assert.has_error(function() model:set_submodule("7.0", tanh) end,
         'set_submodule: Sequential has no attribute "7" (looking up "7.0")')
      assert.has_error(function() model:set_submodule("0", 3) end, "set_submodule: expected an nn.Module, got number")
   end)
end)

describe("nn containers", function()
   it("ModuleList: 1-based indexing, names from 0, #, ipairs, append, insert", function()
      local a, b, c = nn.ReLU(), nn.Tanh(), nn.SiLU()
      local l = nn.ModuleList({ a, b })
      assert.equal(2, #l)
      assert.equal(a, l[1])
      assert.equal(b, l[-1])
      l:append(c)
      assert.equal(3, #l)
      local seen = {}
      for i, mod in ipairs(l) do seen[i] = mod.__name end
      assert.same({ "ReLU", "Tanh", "SiLU" }, seen)
      assert.same({ "0", "1", "2" }, names(l:named_children()))
      l:insert(1, nn.Identity())
      assert.same({ "Identity", "ReLU", "Tanh", "SiLU" }, { l[1].__name, l[2].__name, l[3].__name, l[4].__name })
      assert.same({ "0", "1", "2", "3" }, l._modules:keys())
      assert.equal(a, l:get_submodule("1"))
      l[5] = nn.ReLU()
      assert.equal(5, #l)
      assert.has_error(function() l[9] = nn.ReLU() end,
         "ModuleList: index 9 is out of range (it holds 5 modules; append at 6)")
      l[1] = nn.Tanh()                              -- replacing a position updates the registry
      assert.equal("Tanh", l:get_submodule("0").__name)
   end)

   it("ModuleList has no forward of its own", function()
      assert.has_error(function() nn.ModuleList({ nn.ReLU() })(ml.ones(1)) end,
         'Module [ModuleList] is missing the required "forward" function')
   end)

   it("an empty child slot prints as None and is skipped by iterators", function()
      local s = nn.Sequential(nn.ReLU())
      s:add_module("gone", nil)
      assert.equal("Sequential(\n  (0): ReLU()\n  (gone): None\n)", tostring(s))
      assert.same({ "0" }, names(s:named_children()))
   end)

   it("ModuleList rejects non-modules", function()
      assert.has_error(function() nn.ModuleList({ nn.ReLU(), 3 }) end,
         "ModuleList: element 2 is number, expected an nn.Module")
   end)

   it("Sequential runs its children in order", function()
      local s = nn.Sequential(nn.ReLU(), nn.Tanh())
      local x = ml.tensor({ -1, 0.5 })
      assert.is_true(s(x):allclose(x:relu():tanh()))
      assert.equal(2, #s)
      assert.same({ "0", "1" }, names(s:named_children()))
      assert.has_error(function() nn.Sequential(nn.ReLU(), 5) end,
         "Sequential: argument 2 is number, expected an nn.Module")
   end)
end)

describe("nn.Module state_dict / load_state_dict", function()
   local function model()
      local M = nn.Module:extend("Two")
      function M:__init()
         self.linear1 = nn.Linear(3, 4)
         self.bn = nn.BatchNorm1d(4)
         self.linear2 = nn.Linear(4, 2)
         self:register_buffer("scratch", ml.zeros(2), false)
      end
      return M()
   end

   it("state_dict values share data with the model but are new objects", function()
      local m = model()
      local sd = m:state_dict()
      assert.is_false(rawequal(sd["linear1.weight"], m.linear1.weight))
      assert.equal(m.linear1.weight:data_ptr(), sd["linear1.weight"]:data_ptr())
      assert.is_nil(sd.scratch)
      local kept = m:state_dict({ keep_vars = true })
      assert.is_true(rawequal(kept["linear1.weight"], m.linear1.weight))
      local pre = m:state_dict({ prefix = "model." })
      assert.is_not_nil(pre["model.bn.running_mean"])
   end)

   it("round-trips values, converting dtype, into existing tensors", function()
      local a, b = model(), model()
      local sd = a:state_dict()
      sd["linear1.weight"] = sd["linear1.weight"]:to("float64")
      local w = b.linear1.weight
      local missing, unexpected = b:load_state_dict(sd)
      assert.same({}, missing)
      assert.same({}, unexpected)
      assert.is_true(rawequal(w, b.linear1.weight))
      assert.equal("float32", b.linear1.weight.dtype)
      assert.is_true(b.linear1.weight:equal(a.linear1.weight))
      assert.is_true(b.linear2.bias:equal(a.linear2.bias))
      assert.equal("int64", b.bn.num_batches_tracked.dtype)
   end)

   it("strict: one error listing missing, unexpected and mis-shaped keys; nothing written", function()
      local a, b = model(), model()
      local before = b.linear2.weight:clone()
      local sd = a:state_dict()
      sd["linear1.bias"] = nil
      sd["bn.extra"] = ml.ones(1)
      sd["zzz"] = ml.ones(1)
      sd["linear1.weight"] = ml.ones(3, 4)
      assert.has_error(function() b:load_state_dict(sd) end,
         "load_state_dict: error(s) in loading state_dict for Two:\n" ..
         '\tMissing key(s) in state_dict: "linear1.bias".\n' ..
         '\tUnexpected key(s) in state_dict: "bn.extra", "zzz".\n' ..
         "\tsize mismatch for linear1.weight: copying a param with shape [3, 4] from checkpoint, " ..
         "the shape in current model is [4, 3].")
      assert.is_true(b.linear2.weight:equal(before))
   end)

   it("non-strict returns the lists; shape mismatches still raise", function()
      local a, b = model(), model()
      local sd = a:state_dict()
      sd["linear1.bias"] = nil
      sd["extra"] = ml.ones(1)
      local missing, unexpected = b:load_state_dict(sd, { strict = false })
      assert.same({ "linear1.bias" }, missing)
      assert.same({ "extra" }, unexpected)
      assert.is_true(b.linear2.weight:equal(a.linear2.weight))
      sd["linear2.bias"] = ml.ones(3)
      assert.has_error(function() b:load_state_dict(sd, false) end,
         "load_state_dict: error(s) in loading state_dict for Two:\n" ..
         "\tsize mismatch for linear2.bias: copying a param with shape [3] from checkpoint, " ..
         "the shape in current model is [2].")
   end)

   it("meta tensors are replaced in place, so ties survive loading", function()
      local m = ml.init_empty_weights(function()
         local s = nn.Sequential(nn.Linear(2, 2, { bias = false }), nn.Linear(2, 2, { bias = false }))
         s[2].weight = s[1].weight
         return s
      end)
      local w = m[1].weight
      assert.equal("meta", w.device)
      local value = ml.tensor({ { 1, 2 }, { 3, 4 } }, { dtype = "float64" })
      m:load_state_dict({ ["0.weight"] = value, ["1.weight"] = value })
      assert.is_true(rawequal(w, m[1].weight))
      assert.is_true(rawequal(m[1].weight, m[2].weight))
      assert.equal("cpu", w.device)
      assert.equal("float32", w.dtype)
      assert.same({ { 1, 2 }, { 3, 4 } }, w:tolist())
   end)

   it("refuses to copy meta values into real tensors", function()
      local m = nn.Linear(2, 2)
      local w = m.weight:clone()
      assert.has_error(function()
         m:load_state_dict({ weight = ml.empty({ 2, 2 }, { device = "meta" }), bias = ml.zeros(2) })
      end, "load_state_dict: error(s) in loading state_dict for Linear:\n" ..
         '\t"weight" in the state dict is on the meta device (it has no data to copy)')
      assert.is_true(m.weight:equal(w))
   end)

   it("assign = true replaces tensors by the given values in place", function()
      local m = nn.Linear(2, 1)
      local w = m.weight
      local value = ml.tensor({ { 5, 6 } })
      m:load_state_dict({ weight = value, bias = ml.zeros(1) }, { assign = true })
      assert.is_true(rawequal(w, m.weight))
      assert.equal(value:data_ptr(), w:data_ptr())
   end)

   it("rejects a non-table state dict", function()
      assert.has_error(function() model():load_state_dict(3) end,
         "load_state_dict: a table name -> tensor is expected, got number")
   end)
end)

describe("nn.Module conversion and mode", function()
   it("to(dtype) converts floating tensors in place, keeping ties and int buffers", function()
      local s = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.BatchNorm1d(2))
      s[2].weight = s[1].weight
      local w = s[1].weight
      local before = w:tolist()
      s:half()
      assert.is_true(rawequal(w, s[1].weight))
      assert.is_true(rawequal(s[1].weight, s[2].weight))
      assert.equal("float16", w.dtype)
      assert.equal("float16", s[3].running_mean.dtype)
      assert.equal("int64", s[3].num_batches_tracked.dtype)
      s:float()
      local after = w:tolist()
      assert.is_true(math.abs(after[1][1] - before[1][1]) < 1e-3)
      s:to("bfloat16")
      assert.equal("bfloat16", s[2].bias.dtype)
      s:to("cpu", "float32")
      assert.equal("float32", s[2].bias.dtype)
      assert.equal(s, s:to("cpu"))
   end)

   it("to(device) refuses meta tensors before changing anything", function()
      local m = ml.init_empty_weights(function() return nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 2)) end)
      assert.has_error(function() m:to("cpu") end,
         'to: cannot move "0.weight" from meta to cpu: it has no data (load weights into the model first, e.g. with load_state_dict or load_checkpoint_and_dispatch)')
      assert.equal("cpu", m[1].running_mean.device)
      assert.has_error(function() m:to("float17") end, 
         'to: "float17" is neither a device ("cpu", "meta", "cuda:N") nor a dtype (float32, float16, bfloat16, float64, int64, int32, int16, int8, uint8, bool, float8_e4m3fn, float8_e5m2)')
      assert.has_error(function() m:to("cpu", "float17") end,
         "to: unknown dtype float17 (expected one of float32, float16, bfloat16, float64, int64, int32, int16, int8, uint8, bool, float8_e4m3fn, float8_e5m2)")
   end)

   it("to meta drops the data", function()
      local m = nn.Linear(2, 3)
      local w = m.weight
      m:to("meta")
      assert.is_true(rawequal(w, m.weight))
      assert.equal("meta", w.device)
   end)

   it("modules start in eval mode; train/eval recurse", function()
      local s = nn.Sequential(nn.Dropout(0.5), nn.Sequential(nn.ReLU()))
      assert.is_false(s.training)
      assert.is_false(s[2][1].training)
      s:train()
      assert.is_true(s[2][1].training)
      assert.is_true(s[1].training)
      assert.equal(s, s:eval())
      assert.is_false(s[2][1].training)
   end)

   it("apply visits children before the module", function()
      local s = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Tanh()))
      local order = {}
      s:apply(function(m) order[#order + 1] = m.__name end)
      assert.same({ "ReLU", "Tanh", "Sequential", "Sequential" }, order)
   end)
end)

describe("nn.Module error paths", function()
   local Attn = nn.Module:extend("Attn")
   function Attn:__init() self.c_attn = nn.Linear(4, 4) end
   function Attn:forward(x) return x:matmul(ml.ones(3, 3)) end
   local Blk = nn.Module:extend("Blk")
   function Blk:__init() self.attn = Attn() end
   function Blk:forward(x) return self.attn(x) end
   local Tr = nn.Module:extend("Tr")
   function Tr:__init() self.h = nn.ModuleList({ Blk(), Blk() }) end
   function Tr:forward(x)
      for _, b in ipairs(self.h) do x = b(x) end
      return x
   end
   local Model = nn.Module:extend("Model")
   function Model:__init() self.transformer = Tr() end
   function Model:forward(x) return self.transformer(x) end

   it("adds the innermost module's dotted path once", function()
      local m = Model()
      local ok, err = pcall(m, ml.ones(2, 4))
      assert.is_false(ok)
      assert.matches("^transformer%.h%.0%.attn: .*matmul", err)
      assert.is_nil(err:find("transformer.h.0.attn: transformer", 1, true))
   end)

   it("names a failing leaf layer", function()
      local m = Model()
      m.transformer.h[1].attn.forward = function(self, x) return self.c_attn(x) end
      local ok, err = pcall(m, ml.ones(2, 3))
      assert.is_false(ok)
      assert.matches("^transformer%.h%.0%.attn%.c_attn: ", err)
   end)

   it("a root module's own error is unchanged", function()
      local ok, err = pcall(nn.Linear(4, 4), ml.ones(2, 3))
      assert.is_false(ok)
      assert.is_nil(err:find("^Linear"))
      assert.is_nil(err:find("^: "))
   end)
end)
