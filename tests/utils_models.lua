-- Lua mirrors of the small torch models in tests/fixtures/gen_accelerate.py (same class names,
-- parameter names, shapes and dtypes), shared by the tests/utils_*_spec.lua files.
local ml = require("moonload")
local nn = require("moonload.nn")

local M = {}

local ModelForTest = nn.Module:extend("ModelForTest")
function ModelForTest:__init()
   self.linear1 = nn.Linear(3, 4)
   self.batchnorm = nn.BatchNorm1d(4)
   self.linear2 = nn.Linear(4, 5)
end
function ModelForTest:forward(x)
   return self.linear2(self.batchnorm(self.linear1(x)))
end
M.ModelForTest = ModelForTest

local NestedModel = nn.Module:extend("NestedModel")
function NestedModel:__init()
   self.linear0 = nn.Linear(2, 3)
   self.sub = ModelForTest()
   self.head = nn.Linear(5, 2)
end
M.NestedModel = NestedModel

local TiedModel = nn.Module:extend("TiedModel")
function TiedModel:__init()
   self.emb = nn.Embedding(8, 4)
   self.block = nn.Linear(4, 4)
   self.head = nn.Linear(4, 8, { bias = false })
   self.head.weight = self.emb.weight
end
M.TiedModel = TiedModel

local Block = nn.Module:extend("Block")
function Block:__init()
   self.fc = nn.Linear(4, 4)
   self.norm = nn.LayerNorm(4)
end
M.Block = Block

local Stack = nn.Module:extend("Stack")
function Stack:__init()
   self.emb = nn.Embedding(6, 4)
   local blocks = {}
   for i = 1, 12 do blocks[i] = Block() end
   self.layers = nn.ModuleList(blocks)
   self.lm_head = nn.Linear(4, 6, { bias = false })
   self.lm_head.weight = self.emb.weight
end
M.Stack = Stack

local Inner = nn.Module:extend("Inner")
function Inner:__init()
   self.linear1 = nn.Linear(10, 4)
   self.linear2 = nn.Linear(4, 4)
   self.linear3 = nn.Linear(4, 8)
end

local Fallback = nn.Module:extend("Fallback")
function Fallback:__init()
   self.module = Inner()
end
M.Fallback = Fallback

local WithParam = nn.Module:extend("WithParam")
function WithParam:__init()
   self.scale = nn.Parameter(ml.ones(6))
   self.a = nn.Linear(4, 4)
   self.b = nn.Linear(4, 4)
   self:register_buffer("mask", ml.ones({ 3 }, { dtype = "bool" }))
   self:register_buffer("tmp", ml.zeros(2), false)
end
M.WithParam = WithParam

local HalfModel = nn.Module:extend("HalfModel")
function HalfModel:__init()
   self.lin = nn.Linear(4, 4):half()
   self.big = nn.Linear(4, 2):to("float64")
   self:register_buffer("ids", ml.zeros({ 5 }, { dtype = "int64" }))
   self:register_buffer("flags", ml.zeros({ 16 }, { dtype = "bool" }))
end
M.HalfModel = HalfModel

local Decoder = nn.Module:extend("Decoder")
function Decoder:__init()
   self.proj = nn.Linear(4, 8, { bias = false })
   self.extra = nn.Linear(4, 16)
end
M.Decoder = Decoder

local TiedSplit = nn.Module:extend("TiedSplit")
function TiedSplit:__init()
   self.emb = nn.Embedding(8, 4)
   self.dec = Decoder()
   self.dec.proj.weight = self.emb.weight
end
M.TiedSplit = TiedSplit

--- nn.Sequential(l, l): one Linear registered twice.
function M.SequentialTwice()
   local lin = nn.Linear(2, 2)
   return nn.Sequential(lin, lin)
end

function M.make(name)
   local cls = M[name]
   if name == "SequentialTwice" then return cls() end
   return cls()
end

--- The model's direct parameters, children and buffers as { name, object } pairs, in that order:
-- the list accelerate's get_max_layer_size and fallback_allocate start from.
function M.top_level(model)
   local modules = {}
   for name, p in model:named_parameters("", false) do modules[#modules + 1] = { name, p } end
   for name, c in model:named_children() do modules[#modules + 1] = { name, c } end
   for name, b in model:named_buffers("", false) do modules[#modules + 1] = { name, b } end
   return modules
end

--- Collects warnings and info messages sent through ml.utils while fn runs.
function M.capture(fn)
   local log = require("moonload.utils.log")
   local warnings, infos = {}, {}
   local previous = log.set_warning_handler(function(msg, level)
      if level == "warning" then warnings[#warnings + 1] = msg else infos[#infos + 1] = msg end
   end)
   local ok, a, b = pcall(fn)
   log.set_warning_handler(previous)
   if not ok then error(a, 0) end
   return a, b, warnings, infos
end

function M.read_json(path)
   local f = assert(io.open(path, "rb"))
   local text = f:read("*a")
   f:close()
   return require("cjson").decode(text)
end

return M
