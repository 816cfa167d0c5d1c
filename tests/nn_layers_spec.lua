-- nn layers: outputs against PyTorch/transformers with fixed weights (tests/fixtures/nn.json from
-- gen_nn.py), PyTorch's default initialisation, printing, constructor errors.
local ml = require("moonload")
local nn = ml.nn
local N = require("nn_helpers")

local fixture, max_abs_diff = N.fixture, N.max_abs_diff

local FX = fixture()

-- Builds a layer, loads the fixture's weights into it, runs the fixture's inputs.
local function run_case(name, layer)
   local c = FX.layers[name]
   for k, v in pairs(c.params) do
      local ok, target = pcall(layer.get_parameter, layer, k)
      if not ok then target = layer:get_buffer(k) end
      target:copy_(ml.tensor(v))
   end
   local inputs = {}
   for i, x in ipairs(c.inputs) do
      inputs[i] = ml.tensor(x, { dtype = c.input_dtypes[i] })
   end
   return layer(unpack(inputs)), c
end

describe("nn layers against PyTorch", function()
   local cases = {
      { "linear", function() return nn.Linear(4, 5) end },
      { "linear_nobias", function() return nn.Linear(4, 3, { bias = false }) end },
      { "conv1d", function() return nn.Conv1D(5, 4) end },
      { "embedding", function() return nn.Embedding(7, 3) end },
      { "layernorm", function() return nn.LayerNorm(4) end },
      { "layernorm_2d", function() return nn.LayerNorm({ 3, 4 }, { eps = 1e-6 }) end },
      { "rmsnorm", function() return nn.RMSNorm(4, { eps = 1e-6 }) end },
      { "batchnorm_eval_2d", function() return nn.BatchNorm1d(4) end },
      { "batchnorm_eval_3d", function() return nn.BatchNorm1d(4) end },
      { "gelu", function() return nn.GELU() end },
      { "gelu_tanh", function() return nn.GELU({ approximate = "tanh" }) end },
      { "silu", function() return nn.SiLU() end },
      { "relu", function() return nn.ReLU() end },
      { "tanh", function() return nn.Tanh() end },
      { "identity", function() return nn.Identity() end },
      { "dropout_eval", function() return nn.Dropout(0.5) end },
      { "sequential", function()
         return nn.Sequential(nn.Linear(4, 6), nn.GELU({ approximate = "tanh" }), nn.Linear(6, 2))
      end },
   }
   for _, cs in ipairs(cases) do
      it(cs[1], function()
         local y, c = run_case(cs[1], cs[2]())
         assert.is_true(max_abs_diff(y, c.output) < 1e-5, cs[1] .. " differs from PyTorch")
      end)
   end

   it("BatchNorm1d in training mode uses batch statistics and updates the running ones", function()
      local bn = nn.BatchNorm1d(4, { momentum = 0.2 })
      bn:train()
      local y, c = run_case("batchnorm_train_3d", bn)
      assert.is_true(max_abs_diff(y, c.output) < 1e-5)
      assert.is_true(max_abs_diff(bn.running_mean, c.running_mean_after) < 1e-5)
      assert.is_true(max_abs_diff(bn.running_var, c.running_var_after) < 1e-5)
      assert.equal(c.num_batches_tracked_after, bn.num_batches_tracked:item())
   end)
end)

describe("nn layers: initialisation", function()
   it("Linear: weight and bias within 1/sqrt(in_features), spread over it", function()
      ml.manual_seed(1)
      local l = nn.Linear(64, 32)
      local bound = 1 / math.sqrt(64)
      local w = l.weight
      assert.is_true(w:abs():max():item() <= bound)
      assert.is_true(w:abs():max():item() > 0.9 * bound)
      -- U(-b, b) has standard deviation b / sqrt(3)
      local std = math.sqrt((w * w):mean():item())
      assert.is_true(math.abs(std - bound / math.sqrt(3)) < 0.1 * bound)
      assert.is_true(l.bias:abs():max():item() <= bound)
      assert.equal("float32", w.dtype)
   end)

   it("is reproducible with ml.manual_seed and differs without it", function()
      ml.manual_seed(42)
      local a = nn.Linear(8, 8)
      ml.manual_seed(42)
      local b = nn.Linear(8, 8)
      local c = nn.Linear(8, 8)
      assert.is_true(a.weight:equal(b.weight))
      assert.is_true(a.bias:equal(b.bias))
      assert.is_false(a.weight:equal(c.weight))
   end)

   it("Embedding ~ N(0, 1) with the padding row zeroed; Conv1D ~ N(0, 0.02), bias 0", function()
      ml.manual_seed(3)
      local e = nn.Embedding(200, 50, { padding_idx = 2 })
      local w = e.weight
      local mean = w:mean():item()
      local std = math.sqrt(((w - mean) * (w - mean)):mean():item())
      assert.is_true(math.abs(mean) < 0.05)
      assert.is_true(math.abs(std - 1) < 0.05)
      assert.equal(0, w:select(1, 3):abs():sum():item())
      local c = nn.Conv1D(100, 100)
      local cstd = math.sqrt((c.weight * c.weight):mean():item())
      assert.is_true(math.abs(cstd - 0.02) < 0.002)
      assert.equal(0, c.bias:abs():sum():item())
      assert.same({ 100, 100 }, c.weight.shape)
   end)

   it("norms start at weight 1, bias 0; BatchNorm1d buffers 0, 1 and an int64 0", function()
      local ln = nn.LayerNorm(3)
      assert.same({ 1, 1, 1 }, ln.weight:tolist())
      assert.same({ 0, 0, 0 }, ln.bias:tolist())
      assert.same({ 1, 1 }, nn.RMSNorm(2).weight:tolist())
      local bn = nn.BatchNorm1d(2)
      assert.same({ 0, 0 }, bn.running_mean:tolist())
      assert.same({ 1, 1 }, bn.running_var:tolist())
      assert.equal("int64", bn.num_batches_tracked.dtype)
      assert.same({}, bn.num_batches_tracked.shape)
      assert.equal(0, bn.num_batches_tracked:item())
      assert.is_nil(nn.BatchNorm1d(2, { track_running_stats = false }).running_mean)
      assert.is_nil(nn.LayerNorm(2, { elementwise_affine = false }).weight)
   end)

   it("dtype and device options", function()
      local l = nn.Linear(2, 2, { dtype = "float64" })
      assert.equal("float64", l.weight.dtype)
      assert.equal("meta", nn.Embedding(3, 2, { device = "meta" }).weight.device)
   end)
end)

describe("nn layers: behaviour", function()
   it("Dropout is the identity in eval mode and drops with scaling in training mode", function()
      local d = nn.Dropout(0.5)
      local x = ml.ones(1000)
      assert.is_true(rawequal(x, d(x)))
      d:train()
      ml.manual_seed(5)
      local y = d(x)
      local kept = y:gt(0):to("float32"):sum():item()
      assert.is_true(kept > 400 and kept < 600)
      assert.is_true(math.abs(y:max():item() - 2) < 1e-6)
      assert.is_true(y:equal(y:gt(0):to("float32") * 2))
   end)

   it("Sequential passes through Identity and chains outputs", function()
      local s = nn.Sequential(nn.Identity(), nn.Tanh(), nn.Identity())
      local x = ml.tensor({ 0.3, -2 })
      assert.is_true(s(x):allclose(x:tanh()))
   end)

   it("Conv1D keeps leading dims", function()
      local c = nn.Conv1D(3, 2)
      assert.same({ 4, 5, 3 }, c(ml.ones(4, 5, 2)).shape)
      assert.has_error(function() c(ml.ones(4, 3)) end,
         "Conv1D: input of shape [4, 3] does not end in nx = 2")
   end)

   it("BatchNorm1d checks its input", function()
      local bn = nn.BatchNorm1d(3)
      assert.has_error(function() bn(ml.ones(2, 3, 4, 5)) end, "BatchNorm1d: expected 2D or 3D input (got 4D input)")
      assert.has_error(function() bn(ml.ones(2, 4)) end,
         "BatchNorm1d: input of shape [2, 4] has 4 channels in dim 2, expected 3")
   end)
end)

describe("nn layers: printing", function()
   it("extra_repr as PyTorch", function()
      assert.equal("Linear(in_features=3, out_features=4, bias=True)", tostring(nn.Linear(3, 4)))
      assert.equal("Embedding(10, 4, padding_idx=0)", tostring(nn.Embedding(10, 4, { padding_idx = 0 })))
      assert.equal("Embedding(10, 4, padding_idx=9)", tostring(nn.Embedding(10, 4, { padding_idx = -1 })))
      assert.equal("LayerNorm((2, 3), eps=1e-12, elementwise_affine=True, bias=False)",
         tostring(nn.LayerNorm({ 2, 3 }, { eps = 1e-12, bias = false })))
      assert.equal("BatchNorm1d(4, eps=1e-05, momentum=None, affine=True, bias=True, track_running_stats=True)",
         tostring(nn.BatchNorm1d(4, { momentum = false })))
      assert.equal("RMSNorm((4,), eps=1e-06, elementwise_affine=True)", tostring(nn.RMSNorm(4)))
      assert.equal("GELU(approximate='none')", tostring(nn.GELU()))
      assert.equal("Dropout(p=0.5, inplace=False)", tostring(nn.Dropout()))
      assert.equal("ReLU()", tostring(nn.ReLU()))
      assert.equal("Softmax(dim=-1)", tostring(nn.Softmax(-1)))
      assert.equal("ModuleList()", tostring(nn.ModuleList()))
      assert.equal("Sequential()", tostring(nn.Sequential()))
      assert.equal("Conv1D(nf=3, nx=2)", tostring(nn.Conv1D(3, 2)))
   end)

   it("Python float formatting", function()
      local f = nn.Module.py_float
      assert.equal("1e-05", f(1e-5))
      assert.equal("0.1", f(0.1))
      assert.equal("1.0", f(1))
      assert.equal("0.001", f(0.001))
      assert.equal("1e-06", f(1e-6))
      assert.equal("1.5e-07", f(1.5e-7))
      assert.equal("0.0001", f(1e-4))
      assert.equal("123.456", f(123.456))
   end)
end)

describe("nn layers: constructor errors", function()
   it("name the layer and the bad value", function()
      assert.has_error(function() nn.Linear(3.5, 2) end, "Linear: in_features must be a non-negative integer, got 3.5")
      assert.has_error(function() nn.Linear(3, "4") end, "Linear: out_features must be a non-negative integer, got 4")
      assert.has_error(function() nn.Linear(3, 4, true) end, "Linear: options must be a table like {bias = false}, got boolean")
      assert.has_error(function() nn.Embedding(4, 2, { padding_idx = 4 }) end,
         "Embedding: padding_idx must be within num_embeddings (0-based, -4..3), got 4")
      assert.has_error(function() nn.LayerNorm({ 3, 0 }) end,
         "LayerNorm: normalized_shape entry 2 must be a positive integer, got 0")
      assert.has_error(function() nn.BatchNorm1d(0) end, "BatchNorm1d: num_features must be a positive integer, got 0")
      assert.has_error(function() nn.Dropout(1.5) end, "Dropout: dropout probability has to be between 0 and 1, but got 1.5")
      assert.has_error(function() nn.GELU({ approximate = "fast" }) end, 'GELU: approximate must be "none" or "tanh", got fast')
      assert.has_error(function() nn.Conv1D(-1, 2) end, "Conv1D: nf must be a non-negative integer, got -1")
   end)
end)
