-- The gated delta rule (Qwen3-Next's linear attention): F.gated_delta_rule against transformers'
-- torch_recurrent_gated_delta_rule and the chunked torch_chunk_gated_delta_rule
-- (tests/fixtures/delta_rule.json, tests/fixtures/gen_delta_rule.py): as many value heads as key
-- heads, grouped value heads, an initial state, a decoding step, a sequence split over two calls,
-- bfloat16 and mixed dtypes, views of one tensor, Qwen3-Next's gates, the errors; and the same on
-- cuda:0 against the CPU (#cuda).
local ml = require("moonload")
local N = require("nn_helpers")
local C = require("moonload.C")
local F = ml.nn.functional

local FIX = N.read_json("tests/fixtures/delta_rule.json")

local function shapes(c)
   return { c.B, c.T, c.Hk, c.Dk }, { c.B, c.T, c.Hv, c.Dv }, { c.B, c.T, c.Hv }, { c.B, c.Hv, c.Dk, c.Dv }
end

-- A fixture case's inputs q, k, v, g, beta (and its initial state or nil), in dtype (float32).
local function operands(c, dtype)
   local qk, vs, gs, ss = shapes(c)
   local function t(list, shape, dt) return ml.tensor(list, { dtype = dt or dtype or "float32" }):view(shape) end
   return t(c.q, qk), t(c.k, qk), t(c.v, vs), t(c.g, gs, "float32"), t(c.beta, gs),
      c.state and t(c.state, ss, "float32") or nil
end

local rel_err, assert_close, formula = N.rel_err, N.assert_rel_close, N.formula

-- The chunk case's inputs, from the closed formulas of gen_delta_rule.py.
local function chunk_operands()
   local c = FIX.chunk
   local qk, vs, gs = shapes(c)
   return formula(qk, function(n) return math.sin(0.61 * n + 0.3) end),
      formula(qk, function(n) return math.cos(0.43 * n + 1.1) end),
      formula(vs, function(n) return math.sin(0.27 * n) * 0.8 end),
      formula(gs, function(n) return -(0.05 + 0.15 * (1 + math.sin(1.3 * n))) end),
      formula(gs, function(n) return 0.2 + 0.35 * (1 + math.cos(0.77 * n)) end)
end

-- Qwen3-Next's gates from its projections a and b: g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b).
local function qwen3_next_gates(c)
   local gs = { c.B, c.T, c.Hv }
   local a, b = ml.tensor(c.a):view(gs), ml.tensor(c.b):view(gs)
   local A_log, dt_bias = ml.tensor(c.A_log), ml.tensor(c.dt_bias)
   return -A_log:exp() * (a + dt_bias):softplus(), b:sigmoid()
end

describe("gated_delta_rule", function()
   it("matches transformers with as many value heads as key heads, from a zero state", function()
      local c = FIX.heads_equal
      local q, k, v, g, beta = operands(c)
      local out, state = F.gated_delta_rule(q, k, v, g, beta)
      assert.are.same({ c.B, c.T, c.Hv, c.Dv }, out.shape)
      assert.are.equal("float32", out.dtype)
      assert.are.same({ c.B, c.Hv, c.Dk, c.Dv }, state.shape)
      assert.are.equal("float32", state.dtype)
      assert_close(out, c.out, 1e-5, "out")
      assert_close(state, c.final_state, 1e-5, "state")
   end)

   it("gives each key head to Hv / Hk value heads and updates a given state in place", function()
      local c = FIX.gva
      local q, k, v, g, beta, state = operands(c)
      assert.are.equal(2 * c.Hk, c.Hv)
      local out, st = F.gated_delta_rule(q, k, v, g, beta, state)
      assert.are.equal(state, st)
      assert_close(out, c.out, 1e-5, "out")
      assert_close(state, c.final_state, 1e-5, "state")
      -- a zero state is not the same thing: the initial state matters
      local out0 = F.gated_delta_rule(q, k, v, g, beta)
      assert.is_true(rel_err(out0, c.out) > 1e-2)
   end)

   it("takes g and beta made as Qwen3-Next makes them (softplus, exp(A_log), sigmoid)", function()
      local c = FIX.gva
      local q, k, v, _, _, state = operands(c)
      local g, beta = qwen3_next_gates(c)
      assert_close(g, c.g, 1e-6, "g")
      assert_close(beta, c.beta, 1e-6, "beta")
      local out = F.gated_delta_rule(q, k, v, g, beta, state)
      assert_close(out, c.out, 1e-5, "out")
      assert_close(state, c.final_state, 1e-5, "state")
   end)

   it("continues from a state with one token (a decoding step)", function()
      local q, k, v, g, beta, state = operands(FIX.gva)
      F.gated_delta_rule(q, k, v, g, beta, state)
      local c = FIX.decode
      q, k, v, g, beta = operands(c)
      assert.are.equal(1, c.T)
      local out, st = F.gated_delta_rule(q, k, v, g, beta, state)
      assert.are.equal(state, st)
      assert_close(out, c.out, 1e-5, "out")
      assert_close(state, c.final_state, 1e-5, "state")
   end)

   it("matches the chunked form transformers runs on prompts (70 tokens, two chunks of 64)", function()
      local c = FIX.chunk
      local out, state = F.gated_delta_rule(chunk_operands())
      local rows = {}
      for i, p in ipairs(c.positions) do rows[i] = out:narrow(2, p + 1, 1) end
      assert_close(ml.cat(rows, 2), c.out, 1e-5, "out")
      assert_close(state, c.final_state, 1e-5, "state")
   end)

   it("gives the same bits for a sequence in two calls as in one", function()
      local q, k, v, g, beta = chunk_operands()
      local out, state = F.gated_delta_rule(q, k, v, g, beta)
      local function part(x, s, n) return x:narrow(2, s, n) end
      local o1, st = F.gated_delta_rule(part(q, 1, 33), part(k, 1, 33), part(v, 1, 33), part(g, 1, 33), part(beta, 1, 33))
      local o2 = F.gated_delta_rule(part(q, 34, 37), part(k, 34, 37), part(v, 34, 37), part(g, 34, 37),
         part(beta, 34, 37), st)
      assert.is_true(ml.equal(ml.cat({ o1, o2 }, 2), out))
      assert.is_true(ml.equal(st, state))
   end)

   it("reads bfloat16 inputs in float32 and writes v's dtype", function()
      local c = FIX.bf16
      local q, k, v, g, beta = operands(c, "bfloat16")
      assert.are.equal("float32", g.dtype)
      local out, state = F.gated_delta_rule(q, k, v, g, beta)
      assert.are.equal("bfloat16", out.dtype)
      assert.are.equal("float32", state.dtype)
      assert_close(out, c.out, 1e-2, "out against transformers' bfloat16")
      assert_close(out, c.out_f32, 1e-2, "out against float32")
      assert_close(state, c.final_state, 1e-5, "state")
      -- each operand its own dtype: the bfloat16 values are exact in float32 and float16
      local out32 = F.gated_delta_rule(q, k:float(), v:float(), g:bfloat16(), beta:half())
      assert.are.equal("float32", out32.dtype)
      assert.is_true(rel_err(g:bfloat16(), c.g) < 4e-3)
      local out16 = F.gated_delta_rule(q:half(), k, v:half(), g, beta:float())
      assert.are.equal("float16", out16.dtype)
      assert_close(out16, c.out_f32, 1e-3, "float16 out")
      assert_close(F.gated_delta_rule(q:float(), k:half(), v:float(), g, beta), c.out_f32, 1e-5, "float32 out")
   end)

   it("reads q, k and v as views of one tensor (the model's split of its convolution output)", function()
      local c = FIX.mixed
      local B, T, Hk, Hv, Dk, Dv = c.B, c.T, c.Hk, c.Hv, c.Dk, c.Dv
      local mixed = ml.tensor(c.mixed):view(B, T, 2 * Hk * Dk + Hv * Dv)
      local q = mixed:narrow(3, 1, Hk * Dk):view(B, T, Hk, Dk)
      local k = mixed:narrow(3, Hk * Dk + 1, Hk * Dk):view(B, T, Hk, Dk)
      local v = mixed:narrow(3, 2 * Hk * Dk + 1, Hv * Dv):view(B, T, Hv, Dv)
      assert.is_false(q:is_contiguous())
      assert.are.equal(2 * Hk * Dk + Hv * Dv, v:stride(2))
      local g, beta = ml.tensor(c.g):view(B, T, Hv), ml.tensor(c.beta):view(B, T, Hv)
      local out, state = F.gated_delta_rule(q, k, v, g, beta)
      assert_close(out, c.out, 1e-5, "out")
      assert_close(state, c.final_state, 1e-5, "state")
      -- g and beta as strided views, and a last dim that is not unit-stride (copied by the binding)
      local gt = g:transpose(2, 3):contiguous():transpose(2, 3)
      local qt = q:contiguous():transpose(3, 4):contiguous():transpose(3, 4)
      assert.are_not.equal(1, qt:stride(4))
      local out2 = F.gated_delta_rule(qt, k, v, gt, beta)
      assert.is_true(ml.equal(out2, out))
   end)

   it("writes nothing for zero tokens and keeps the state", function()
      local q, k, v, g, beta, state = operands(FIX.gva)
      local before = state:clone()
      local function none(x) return x:narrow(2, 1, 0) end
      local out = F.gated_delta_rule(none(q), none(k), none(v), none(g), none(beta), state)
      assert.are.same({ FIX.gva.B, 0, FIX.gva.Hv, FIX.gva.Dv }, out.shape)
      assert.is_true(ml.equal(state, before))
   end)

   describe("errors", function()
      local c = FIX.gva
      local q, k, v, g, beta, state = operands(c)

      -- the call fails with msg and leaves the state as it was
      local function refuses(msg, qq, kk, vv, gg, bb, ss)
         local s = ss or state
         local before = s:clone()
         assert.has_error(function() F.gated_delta_rule(qq or q, kk or k, vv or v, gg or g, bb or beta, s) end, msg)
         assert.is_true(ml.equal(s, before), "state changed")
      end

      it("names a state of the wrong shape, dtype or layout", function()
         refuses("gated_delta_rule: state must have shape [2, 4, 8, 4] (B, Hv, Dk, Dv), got [2, 4, 4, 8]",
            nil, nil, nil, nil, nil, ml.zeros(2, 4, 4, 8))
         refuses("gated_delta_rule: state must be float32, got bfloat16", nil, nil, nil, nil, nil,
            ml.zeros({ 2, 4, 8, 4 }, { dtype = "bfloat16" }))
         refuses("gated_delta_rule: state must be contiguous", nil, nil, nil, nil, nil,
            ml.zeros(2, 4, 4, 8):transpose(3, 4))
      end)

      it("names value heads that are not a multiple of the key heads", function()
         local k2 = ml.zeros(2, 3, 2, 8)
         refuses("gated_delta_rule: the value heads of v (Hv = 3) must be a multiple of the key heads of q and k (Hk = 2)",
            k2, k2, ml.zeros(2, 3, 3, 4), ml.zeros(2, 3, 3), ml.zeros(2, 3, 3))
      end)

      it("names an operand whose batch, length or heads do not match", function()
         refuses("gated_delta_rule: v must be (B, T, Hv, Dv) with q's B = 2 and T = 3, got shape [2, 4, 4, 4]",
            nil, nil, ml.zeros(2, 4, 4, 4))
         refuses("gated_delta_rule: v must be (B, T, Hv, Dv) with q's B = 2 and T = 3, got shape [1, 3, 4, 4]",
            nil, nil, ml.zeros(1, 3, 4, 4))
         refuses("gated_delta_rule: k must have shape [2, 3, 2, 8] (B, T, Hk, Dk), as q, got [2, 2, 2, 8]",
            nil, ml.zeros(2, 2, 2, 8))
         refuses("gated_delta_rule: g must have shape [2, 3, 4] (B, T, Hv), got [2, 3, 1]", nil, nil, nil, ml.zeros(2, 3, 1))
         refuses("gated_delta_rule: beta must have shape [2, 3, 4] (B, T, Hv), got [2, 2, 4]", nil, nil, nil, nil,
            ml.zeros(2, 2, 4))
         refuses("gated_delta_rule: q must be (B, T, Hk, Dk), got shape [3, 8]", ml.zeros(3, 8))
      end)

      it("names an operand of the wrong dtype, a missing one, one on the meta device", function()
         refuses("gated_delta_rule: q must be float32, bfloat16 or float16, got int64", q:long())
         refuses("gated_delta_rule: beta must be float32, bfloat16 or float16, got float64", nil, nil, nil, nil,
            beta:double())
         assert.has_error(function() F.gated_delta_rule(q, k, nil, g, beta) end, "gated_delta_rule: v must be a tensor, got nil")
         refuses("gated_delta_rule: g is on the meta device and has no data", nil, nil, nil, ml.empty({ 2, 3, 4 }, { device = "meta" }))
      end)

      it("refuses, in C, a last dim that is not unit-stride (the binding copies it first)", function()
         local q2, k2, v2, g2, b2 = operands(FIX.heads_equal)
         local st2 = ml.zeros(FIX.heads_equal.B, FIX.heads_equal.Hv, FIX.heads_equal.Dk, FIX.heads_equal.Dv)
         local out = ml.zeros(v2.shape)
         local qt = q2:transpose(3, 4):contiguous():transpose(3, 4)
         assert.is_true(ml.equal(qt, q2))
         local status = C.lib.ml_gated_delta_rule(qt._c, k2._c, v2._c, g2._c, b2._c, st2._c, out._c)
         assert.are_not.equal(0, status)
         assert.are.equal("gated_delta_rule: the last dim of q must have stride 1, got 2 (make it contiguous)",
            require("ffi").string(C.lib.ml_last_error()))
         assert.is_true(ml.equal(st2, ml.zeros(st2.shape)))
         assert.is_true(ml.equal(out, ml.zeros(out.shape)))
      end)
   end)
end)

describe("gated_delta_rule on cuda #cuda", function()
   local DEV = "cuda:0"

   local on = N.on_device

   -- out and the final state of the same call on the CPU and on cuda:0, compared.
   local function same_as_cpu(tol, what, q, k, v, g, beta, state)
      local oc, sc = F.gated_delta_rule(q, k, v, g, beta, state and state:clone())
      local qd, kd, vd, gd, bd, sd = on(DEV, q, k, v, g, beta, state)
      local od, sdd = F.gated_delta_rule(qd, kd, vd, gd, bd, sd)
      assert.are.equal(DEV, od.device)
      assert.are.equal(DEV, sdd.device)
      if sd then assert.are.equal(sd, sdd) end
      assert.are.equal(oc.dtype, od.dtype)
      assert_close(od:cpu(), oc:float():view(-1):tolist(), tol, what .. " out")
      assert_close(sdd:cpu(), sc:view(-1):tolist(), tol, what .. " state")
   end

   it("computes the CPU's values for every fixture case (state in shared memory and in place)", function()
      same_as_cpu(1e-5, "heads_equal", operands(FIX.heads_equal))
      same_as_cpu(1e-5, "gva", operands(FIX.gva))
      local q, k, v, g, beta, state = operands(FIX.gva)
      F.gated_delta_rule(q, k, v, g, beta, state)
      q, k, v, g, beta = operands(FIX.decode)
      same_as_cpu(1e-5, "decode", q, k, v, g, beta, state)
      same_as_cpu(1e-2, "bf16", operands(FIX.bf16, "bfloat16"))
      same_as_cpu(1e-5, "chunk", chunk_operands())
      local c = FIX.chunk
      local out = F.gated_delta_rule(on(DEV, chunk_operands()))
      local rows = {}
      for i, p in ipairs(c.positions) do rows[i] = out:narrow(2, p + 1, 1) end
      assert_close(ml.cat(rows, 2):cpu(), c.out, 1e-5, "chunk against transformers")
   end)

   it("reads views of one tensor on the device", function()
      local c = FIX.mixed
      local B, T, Hk, Hv, Dk, Dv = c.B, c.T, c.Hk, c.Hv, c.Dk, c.Dv
      local mixed = ml.tensor(c.mixed):view(B, T, 2 * Hk * Dk + Hv * Dv):to(DEV)
      local q = mixed:narrow(3, 1, Hk * Dk):view(B, T, Hk, Dk)
      local k = mixed:narrow(3, Hk * Dk + 1, Hk * Dk):view(B, T, Hk, Dk)
      local v = mixed:narrow(3, 2 * Hk * Dk + 1, Hv * Dv):view(B, T, Hv, Dv)
      local g = ml.tensor(c.g):view(B, T, Hv):to(DEV):transpose(2, 3):contiguous():transpose(2, 3)
      local out, state = F.gated_delta_rule(q, k, v, g, ml.tensor(c.beta):view(B, T, Hv):to(DEV))
      assert_close(out:cpu(), c.out, 1e-5, "out")
      assert_close(state:cpu(), c.final_state, 1e-5, "state")
   end)

   it("handles a key head dim past shared memory and a partial block of columns", function()
      ml.manual_seed(31)
      for _, T in ipairs({ 1, 3 }) do
         local B, Hk, Hv, Dk, Dv = 1, 1, 2, 300, 40
         local q, k, v = ml.randn(B, T, Hk, Dk), ml.randn(B, T, Hk, Dk), ml.randn(B, T, Hv, Dv)
         local g, beta = -ml.rand(B, T, Hv), ml.rand(B, T, Hv)
         same_as_cpu(1e-5, "Dk 300, T " .. T, q, k, v, g, beta, ml.randn(B, Hv, Dk, Dv))
      end
   end)

   it("names the operand on another device and a key head dim over the kernel's", function()
      local q, k, v, g, beta, state = operands(FIX.gva)
      assert.has_error(function() F.gated_delta_rule(q:to(DEV), k:to(DEV), v:to(DEV), g:to(DEV), beta:to(DEV), state) end,
         "gated_delta_rule: q is on cuda:0 but state is on cpu")
      assert.has_error(function() F.gated_delta_rule(q:to(DEV), k, v, g, beta) end,
         "gated_delta_rule: q is on cuda:0 but k is on cpu")
      local big = ml.zeros({ 1, 1, 1, 1100 }, { device = DEV })
      local st = ml.zeros({ 1, 1, 1100, 1 }, { device = DEV })
      assert.has_error(function()
         F.gated_delta_rule(big, big, ml.zeros({ 1, 1, 1, 1 }, { device = DEV }), ml.zeros({ 1, 1, 1 }, { device = DEV }),
            ml.zeros({ 1, 1, 1 }, { device = DEV }), st)
      end, "gated_delta_rule: a key head dim Dk of 1100 is over the CUDA kernel's 1024")
   end)
end)
