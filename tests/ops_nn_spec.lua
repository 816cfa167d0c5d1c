-- Neural-network kernels (core/src/cpu/nn.c, attention.c): softmax / log_softmax, layer_norm,
-- rms_norm, embedding and scaled dot-product attention against PyTorch fixtures
-- (tests/fixtures/gen_ops_nn.py -> ops_nn.json), plus error messages; through the tensor methods
-- and ml.nn.functional (C.lib directly only where F checks the input before the kernel does).
local ml = require("moonload")
local C = require("moonload.C")
local H = require("ops_helpers")

local ffi, lib = C.ffi, C.lib

local build, values, assert_matches, errmsg = H.nn_build, H.values, H.assert_matches, H.errmsg

local fx = H.load("ops_nn.json")

local out1 = ffi.new("ml_tensor*[1]")

local F = ml.nn.functional

-- The normalized shape: the last nnorm sizes of x.
local function last_dims(x, nnorm)
   local shape, ns = x.shape, {}
   for i = #shape - nnorm + 1, #shape do ns[#ns + 1] = shape[i] end
   return ns
end

local function layer_norm(x, nnorm, w, b, eps)
   return F.layer_norm(x, last_dims(x, nnorm), w, b, eps or 1e-5)
end

local function rms_norm(x, nnorm, w, eps)
   return F.rms_norm(x, last_dims(x, nnorm), w, eps or 1e-6)
end

local function embedding(ids, w) return F.embedding(ids, w) end

local function sdpa(q, k, v, opts) return F.scaled_dot_product_attention(q, k, v, opts or {}) end

-- x (..., S, 32) as int8 rows with one float32 scale each (an int8 cache's layout).
local function q8(x)
   local sshape = { unpack(x.shape) }
   sshape[#sshape] = 1
   local q8v, scales = ml.empty(x.shape, { dtype = "int8" }), ml.empty(sshape)
   C.check(lib.ml_quantize_q8_into(x._c, q8v._c, scales._c))
   return q8v, scales
end

describe("softmax", function()
   for _, case in ipairs(fx.softmax) do
      it("matches PyTorch: " .. case.name, function()
         local x = build(case.x)
         local dim = case.dim < 0 and case.dim or case.dim + 1
         local got = case.log and x:log_softmax(dim) or x:softmax(dim)
         assert_matches(case.expected, got, case.name)
      end)
   end

   it("sums to one over rows of 4096 (the vectorised exp)", function()
      local x = ml.randn(3, 4096) * 20
      local s = values(x:softmax(-1):sum(-1))
      for i = 1, 3 do assert.is_true(math.abs(s[i] - 1) < 1e-4) end
   end)

   it("rejects integer input and a bad dim", function()
      assert.are.equal("softmax: expected a floating-point input, got int64",
         errmsg(function() return ml.tensor({ 1, 2 }, { dtype = "int64" }):softmax(-1) end))
      assert.are.equal("log_softmax: input is on the meta device and has no data",
         errmsg(function() return ml.empty(2, 3, { device = "meta" }):log_softmax(-1) end))
   end)
end)

describe("layer_norm and rms_norm", function()
   for _, case in ipairs(fx.norm) do
      it("matches PyTorch: " .. case.name, function()
         local x = build(case.x)
         local w = case.w and build(case.w) or nil
         local b = case.b and build(case.b) or nil
         local got = case.rms and rms_norm(x, case.nnorm, w, case.eps) or layer_norm(x, case.nnorm, w, b, case.eps)
         assert_matches(case.expected, got, case.name)
      end)
   end

   it("rejects a weight that is not the normalized shape", function()
      assert.are.equal("layer_norm: weight of shape [3] does not match the normalized shape [4]",
         errmsg(function() return layer_norm(ml.zeros(2, 4), 1, ml.ones(3)) end))
      assert.are.equal("rms_norm: weight of shape [4] does not match the normalized shape [3, 4]",
         errmsg(function() return rms_norm(ml.zeros(2, 3, 4), 2, ml.ones(4)) end))
   end)

   it("rejects more normalized dims than the input has (the C kernel's own check)", function()
      local x = ml.zeros(2, 4)
      assert.are.equal(lib.ML_EINVAL, lib.ml_layer_norm(x._c, 3, nil, nil, 1e-5, out1))
      assert.are.equal("layer_norm: cannot normalise over the last 3 dims of a tensor of shape [2, 4]",
         ffi.string(lib.ml_last_error()))
   end)
end)

describe("embedding", function()
   for _, case in ipairs(fx.embedding) do
      it("matches PyTorch: " .. case.name, function()
         assert_matches(case.expected, embedding(build(case.ids), build(case.w)), case.name)
      end)
   end

   it("rejects an out-of-range id naming it and the table size", function()
      local ids = ml.tensor({ 0, 5, 2 }, { dtype = "int64" })
      assert.are.equal("embedding: id 5 is out of range for a table of 5 rows (ids are 0-based)",
         errmsg(function() return embedding(ids, ml.zeros(5, 2)) end))
      assert.are.equal("embedding: id -1 is out of range for a table of 5 rows (ids are 0-based)",
         errmsg(function() return embedding(ml.tensor({ -1 }, { dtype = "int32" }), ml.zeros(5, 2)) end))
   end)

   it("rejects float ids and a table that is not 2-D", function()
      assert.are.equal("embedding: ids must be an integer tensor, got float32",
         errmsg(function() return embedding(ml.tensor({ 1 }), ml.zeros(5, 2)) end))
      assert.are.equal("embedding: weight must be 2-D (num_embeddings, embedding_dim), got shape [5]",
         errmsg(function() return embedding(ml.tensor({ 1 }, { dtype = "int64" }), ml.zeros(5)) end))
   end)
end)

describe("scaled dot-product attention", function()
   for _, case in ipairs(fx.sdpa) do
      it("matches PyTorch: " .. case.name, function()
         local q, k, v = build(case.q), build(case.k), build(case.v)
         local mask = case.mask and build(case.mask) or nil
         local sinks = case.sinks and build(case.sinks) or nil
         local got = sdpa(q, k, v, { attn_mask = mask, is_causal = case.is_causal, scale = case.scale, sinks = sinks })
         assert_matches(case.expected, got, case.name)
      end)
   end

   it("with sinks, reads an int8 cache as it reads the dequantized keys and values", function()
      ml.manual_seed(31)
      local q, kf, vf, sinks = ml.randn(2, 4, 3, 32), ml.randn(2, 2, 9, 32), ml.randn(2, 2, 9, 32), ml.randn(4)
      local k8, ks = q8(kf)
      local v8, vs = q8(vf)
      C.check(lib.ml_sdpa_q8(q._c, k8._c, ks._c, v8._c, vs._c, nil, sinks._c, true, 0, out1))
      local got = require("moonload.tensor").wrap(out1[0])
      local function deq(x, sc) return x:float() * sc end
      local want = sdpa(q, deq(k8, ks), deq(v8, vs), { is_causal = true, sinks = sinks })
      assert.is_true(ml.allclose(got, want, 1e-4, 1e-5))
   end)

   it("names sinks that are not one logit per query head", function()
      local q, k = ml.zeros(1, 4, 3, 8), ml.zeros(1, 2, 5, 8)
      assert.are.equal("sdpa: sinks float32 of shape [2]: expected one floating-point logit per query head (4)",
         errmsg(function() return sdpa(q, k, k, { sinks = ml.zeros(2) }) end))
      assert.are.equal("sdpa: sinks int64 of shape [4]: expected one floating-point logit per query head (4)",
         errmsg(function() return sdpa(q, k, k, { sinks = ml.zeros(4, { dtype = "int64" }) }) end))
      assert.are.equal("sdpa: sinks float32 of shape [3]: expected one floating-point logit per query head (0)",
         errmsg(function() return sdpa(ml.zeros(3, 8), ml.zeros(5, 8), ml.zeros(5, 8), { sinks = ml.zeros(3) }) end))
   end)

   it("agrees with softmax(q k^T / sqrt(E)) v on a threaded, blocked problem", function()
      -- 1 batch-head x L = 300 queries: split in query blocks across threads.
      local q, k, v = ml.randn(1, 1, 300, 16), ml.randn(1, 1, 70, 16), ml.randn(1, 1, 70, 8)
      local got = values(sdpa(q, k, v, { is_causal = true }))
      local scores = ml.matmul(q, k:transpose(-2, -1)) * (1 / 4)
      local keep = ml.ones(300, 70, { dtype = "bool" }):tril()
      local want = values(ml.matmul(scores:masked_fill(keep:logical_not(), -math.huge):softmax(-1), v))
      for i = 1, #want, 97 do assert.is_true(math.abs(got[i] - want[i]) < 1e-4, i) end
   end)

   it("rejects mismatched embedding sizes and sequence lengths", function()
      assert.are.equal("sdpa: query of shape [1, 3, 8] and key of shape [1, 4, 6] have different embedding sizes (8 != 6)",
         errmsg(function() return sdpa(ml.zeros(1, 3, 8), ml.zeros(1, 4, 6), ml.zeros(1, 4, 6)) end))
      assert.are.equal("sdpa: key of shape [1, 4, 8] and value of shape [1, 5, 8] have different sequence lengths (4 != 5)",
         errmsg(function() return sdpa(ml.zeros(1, 3, 8), ml.zeros(1, 4, 8), ml.zeros(1, 5, 8)) end))
   end)

   it("rejects a mask that does not broadcast, and a mask with is_causal", function()
      assert.are.equal("sdpa: attn_mask of shape [3, 3] cannot be broadcast to the scores' shape [1, 3, 4]",
         errmsg(function() return sdpa(ml.zeros(1, 3, 8), ml.zeros(1, 4, 8), ml.zeros(1, 4, 8),
            { attn_mask = ml.zeros(3, 3) }) end))
      assert.has_error(function() sdpa(ml.zeros(1, 3, 8), ml.zeros(1, 4, 8), ml.zeros(1, 4, 8),
         { attn_mask = ml.zeros(3, 4), is_causal = true }) end,
         "scaled_dot_product_attention: give attn_mask or is_causal, not both")
   end)

   it("lets the kernel take a mask and the causal triangle together (a bias of one row, BLOOM's ALiBi)", function()
      ml.manual_seed(12)
      local q, k, v = ml.randn(2, 3, 5, 8), ml.randn(2, 3, 5, 8), ml.randn(2, 3, 5, 8)
      local bias = ml.randn(1, 3, 1, 5)
      local hidden = ml.zeros(5, 5):masked_fill(ml.ones(5, 5, { dtype = "bool" }):tril():logical_not(), -math.huge)
      local want = sdpa(q, k, v, { attn_mask = bias + hidden:view(1, 1, 5, 5) })
      assert.are.equal(lib.ML_OK, lib.ml_sdpa(q._c, k._c, v._c, bias._c, nil, true, 0, out1))
      assert.is_true(ml.allclose(require("moonload.tensor").wrap(out1[0]), want, 1e-5, 1e-6))
   end)

   it("rejects mixed dtypes and integer masks", function()
      assert.are.equal("sdpa: query, key and value must have the same dtype, got float32, float16 and float32",
         errmsg(function() return sdpa(ml.zeros(1, 3, 8), ml.zeros(1, 4, 8):half(), ml.zeros(1, 4, 8)) end))
      assert.are.equal("sdpa: attn_mask must be bool or floating point, got int64",
         errmsg(function() return sdpa(ml.zeros(1, 3, 8), ml.zeros(1, 4, 8), ml.zeros(1, 4, 8),
            { attn_mask = ml.zeros(3, 4, { dtype = "int64" }) }) end))
   end)
end)

-- The same fixtures through the CUDA backend (make test-cuda; needs a GPU), fully masked
-- attention rows included (zeros on both backends, as PyTorch's sdpa).
describe("nn kernels on cuda #cuda", function()
   local check = H.assert_matches_cuda
   for _, case in ipairs(fx.softmax) do
      it("softmax matches PyTorch: " .. case.name, function()
         local x = build(case.x, "cuda:0")
         local dim = case.dim < 0 and case.dim or case.dim + 1
         check(case.expected, case.log and x:log_softmax(dim) or x:softmax(dim), case.name)
      end)
   end
   for _, case in ipairs(fx.norm) do
      it("norm matches PyTorch: " .. case.name, function()
         local x = build(case.x, "cuda:0")
         local w = case.w and build(case.w, "cuda:0") or nil
         local b = case.b and build(case.b, "cuda:0") or nil
         local got = case.rms and rms_norm(x, case.nnorm, w, case.eps) or layer_norm(x, case.nnorm, w, b, case.eps)
         check(case.expected, got, case.name)
      end)
   end
   for _, case in ipairs(fx.embedding) do
      it("embedding matches PyTorch: " .. case.name, function()
         check(case.expected, embedding(build(case.ids, "cuda:0"), build(case.w, "cuda:0")), case.name)
      end)
   end
   for _, case in ipairs(fx.sdpa) do
      it("sdpa matches PyTorch: " .. case.name, function()
         local mask = case.mask and build(case.mask, "cuda:0") or nil
         local sinks = case.sinks and build(case.sinks, "cuda:0") or nil
         local got = sdpa(build(case.q, "cuda:0"), build(case.k, "cuda:0"), build(case.v, "cuda:0"),
            { attn_mask = mask, is_causal = case.is_causal, scale = case.scale, sinks = sinks })
         check(case.expected, got, case.name)
      end)
   end
   it("sdpa with sinks over an int8 cache gives the CPU's result", function()
      ml.manual_seed(32)
      local q, kf, vf, sinks = ml.randn(2, 4, 3, 32), ml.randn(2, 2, 9, 32), ml.randn(2, 2, 9, 32), ml.randn(4)
      local k8, ks = q8(kf)
      local v8, vs = q8(vf)
      local function run(dev)
         local a = { q, k8, ks, v8, vs, sinks }
         for i, t in ipairs(a) do a[i] = t:to(dev) end
         C.check(lib.ml_sdpa_q8(a[1]._c, a[2]._c, a[3]._c, a[4]._c, a[5]._c, nil, a[6]._c, true, 0, out1))
         return require("moonload.tensor").wrap(out1[0]):to("cpu")
      end
      assert.is_true(ml.allclose(run("cuda:0"), run("cpu"), 1e-4, 1e-5))
   end)
end)
