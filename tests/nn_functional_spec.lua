-- ml.nn.functional (F): results against PyTorch (tests/fixtures/nn.json from gen_nn.py) and
-- argument checking.
local ml = require("moonload")
local F = ml.nn.functional
local N = require("nn_helpers")

local fixture, max_abs_diff = N.fixture, N.max_abs_diff

local FX = fixture().functional
local T = function(x, dt) return ml.tensor(x, dt and { dtype = dt } or nil) end

describe("nn.functional against PyTorch", function()
   it("is reachable as nn.F", function()
      assert.equal(ml.nn.functional, ml.nn.F)
   end)

   it("scaled_dot_product_attention, plain", function()
      local c = FX.sdpa
      local y = F.scaled_dot_product_attention(T(c.q), T(c.k), T(c.v))
      assert.is_true(max_abs_diff(y, c.out) < 1e-5)
   end)

   it("scaled_dot_product_attention with a bool mask (options table and positional)", function()
      local c = FX.sdpa
      local mask = T(FX.sdpa_mask.mask, "bool")
      local y = F.scaled_dot_product_attention(T(c.q), T(c.k), T(c.v), { attn_mask = mask })
      assert.is_true(max_abs_diff(y, FX.sdpa_mask.out) < 1e-5)
      local y2 = F.scaled_dot_product_attention(T(c.q), T(c.k), T(c.v), mask)
      assert.is_true(max_abs_diff(y2, FX.sdpa_mask.out) < 1e-5)
   end)

   it("scaled_dot_product_attention, causal with a scale", function()
      local c = FX.sdpa_causal_scale
      local y = F.sdpa(T(c.q), T(c.k), T(c.v), { is_causal = true, scale = 0.3 })
      assert.is_true(max_abs_diff(y, c.out) < 1e-5)
   end)

   it("normalize, softmax, rms_norm with the default eps", function()
      assert.is_true(max_abs_diff(F.normalize(T(FX.normalize.x), 2, 2), FX.normalize.out) < 1e-6)
      assert.is_true(max_abs_diff(F.softmax(T(FX.softmax.x), -1), FX.softmax.out) < 1e-6)
      local c = FX.rms_norm_default_eps
      assert.is_true(max_abs_diff(F.rms_norm(T(c.x), { 4 }), c.out) < 1e-4)
      assert.is_true(max_abs_diff(F.rms_norm(T(c.x), 4), c.out) < 1e-4)
   end)

   it("linear, embedding and layer_norm agree with their definitions", function()
      local x = T({ { 1, 2 }, { 3, 4 } })
      local w = T({ { 1, 0 }, { 0, 1 }, { 1, 1 } })
      local b = T({ 0.5, 0, -1 })
      assert.same({ { 1.5, 2, 2 }, { 3.5, 4, 6 } }, F.linear(x, w, b):tolist())
      assert.same({ { 1, 2, 3 }, { 3, 4, 7 } }, F.linear(x, w):tolist())
      assert.same({ { 1, 1 }, { 1, 0 } }, F.embedding(T({ 2, 0 }, "int64"), w):tolist())
      local ln = F.layer_norm(T({ { 1, 3 } }), { 2 })
      assert.is_true(max_abs_diff(ln, { { -1, 1 } }) < 1e-4)
      local lnwb = F.layer_norm(T({ { 1, 3 } }), 2, T({ 2, 2 }), T({ 1, 1 }), 0)
      assert.is_true(max_abs_diff(lnwb, { { -1, 3 } }) < 1e-5)
   end)

   it("activations", function()
      local x = T({ -1, 0, 2 })
      assert.same({ 0, 0, 2 }, F.relu(x):tolist())
      assert.is_true(F.silu(x):allclose(x * x:sigmoid()))
      assert.is_true(F.tanh(x):allclose(x:tanh()))
      assert.is_true(F.gelu(x, "tanh"):allclose(x:gelu("tanh")))
      assert.is_true(F.gelu(x):allclose(x:gelu()))
      assert.is_true(F.log_softmax(x, 1):allclose(F.softmax(x, 1):log(), 1e-5, 1e-6))
   end)

   it("dropout is the identity unless training", function()
      local x = ml.ones(10)
      assert.is_true(rawequal(x, F.dropout(x, 0.5)))
      assert.same({ 0, 0 }, F.dropout(ml.ones(2), 1, true):tolist())
   end)
end)

describe("nn.functional errors", function()
   it("checks its arguments", function()
      assert.has_error(function() F.linear(3, ml.ones(2, 2)) end, "linear: input must be a tensor, got number")
      assert.has_error(function() F.linear(ml.ones(2, 2), ml.ones(2, 2), 1) end, "linear: bias must be a tensor, got number")
      assert.has_error(function() F.layer_norm(ml.ones(2, 3), { 2 }) end,
         "layer_norm: normalized_shape [2] does not match the last dims of the input of shape [2, 3]")
      assert.has_error(function() F.rms_norm(ml.ones(3), { 1, 3 }) end,
         "rms_norm: normalized_shape [1, 3] does not match the last dims of the input of shape [3]")
      assert.has_error(function() F.layer_norm(ml.ones(3), {}) end,
         "layer_norm: normalized_shape must be a number or a non-empty list of sizes, got table")
      local q = ml.ones(1, 2, 4)
      assert.has_error(function() F.sdpa(q, q, q, { attn_mask = ml.ones(2, 2, { dtype = "bool" }), is_causal = true }) end,
         "scaled_dot_product_attention: give attn_mask or is_causal, not both")
      assert.has_error(function() F.sdpa(q, q, q, { dropout_p = 0.1 }) end,
         "scaled_dot_product_attention: dropout_p is not supported (inference only), got 0.1")
      assert.has_error(function() F.sdpa(q, q, q, { scale = -1 }) end,
         "scaled_dot_product_attention: scale must be a positive number, got -1")
      assert.has_error(function() F.sdpa(q, q, q, 5) end,
         "scaled_dot_product_attention: the fourth argument must be an options table or a mask tensor, got number")
      assert.has_error(function() F.dropout(q, 2, true) end,
         "dropout: dropout probability has to be between 0 and 1, but got 2")
   end)

   it("passes the core's shape errors through", function()
      local ok, err = pcall(F.linear, ml.ones(2, 3), ml.ones(4, 4))
      assert.is_false(ok)
      assert.matches("linear", err)
      assert.matches("%[2, 3%]", err)
   end)
end)

describe("F.rotary_embedding", function()
   local F = ml.nn.functional

   local function composed(x, cos, sin)
      local h = x:size(-1) / 2
      local rot = ml.cat({ -x:narrow(-1, h + 1, h), x:narrow(-1, 1, h) }, -1)
      return x * cos + rot * sin
   end

   it("gives the composed ops' bits for every float dtype, strided x and broadcast cos/sin", function()
      ml.manual_seed(11)
      for _, dt in ipairs({ "float32", "bfloat16", "float16", "float64" }) do
         local x = ml.randn(2, 5, 3, 8):to(dt):transpose(2, 3)          -- (B, H, T, D), strided
         local ang = ml.randn(5, 8) * 3
         for _, shape in ipairs({ { 5, 8 }, { 1, 1, 5, 8 } }) do
            local cos, sin = ang:cos():to(dt):reshape(shape), ang:sin():to(dt):reshape(shape)
            local got = F.rotary_embedding(x, cos, sin)
            assert.are.equal(dt, got.dtype)
            assert.is_true(got:equal(composed(x, cos, sin)), dt .. " " .. table.concat(shape, "x"))
         end
      end
      local wide = ml.randn(3, 600)                                      -- halves longer than one chunk
      local c, s = ml.randn(600):cos(), ml.randn(600):sin()
      assert.is_true(F.rotary_embedding(wide, c, s):equal(composed(wide, c, s)))
   end)

   it("names what is wrong with its arguments", function()
      local x = ml.zeros(2, 6)
      assert.has_error(function() F.rotary_embedding(ml.zeros(2, 5), ml.zeros(5), ml.zeros(5)) end,
         "rotary_embedding: the last dimension of x must be even (it is split in halves), x has shape [2, 5]")
      assert.has_error(function() F.rotary_embedding(x, ml.zeros(6), ml.zeros(3, 6)) end,
         "rotary_embedding: cos (shape [6]) and sin (shape [3, 6]) must have the same shape")
      assert.has_error(function() F.rotary_embedding(x, ml.zeros(3, 6), ml.zeros(3, 6)) end,
         "rotary_embedding: cos and sin (shape [3, 6]) must broadcast to the shape of x [2, 6]")
      assert.has_error(function() F.rotary_embedding(x:long(), ml.zeros(6), ml.zeros(6)) end,
         "rotary_embedding: x must be floating point, got int64")
   end)
end)
