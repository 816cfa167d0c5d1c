-- Mamba-2's selective state-space scan: F.ssm_scan against transformers' per-token
-- mamba2_selective_state_update and the chunked mamba2_chunk_scan (tests/fixtures/ssm_scan.json,
-- tests/fixtures/gen_ssm_scan.py): one group, heads in groups with D and an initial state, a
-- decoding step, a sequence split over two calls, bfloat16 and mixed dtypes, views of one tensor,
-- the mixer's dt, the errors; and the same on cuda:0 against the CPU (#cuda).
local ml = require("moonload")
local N = require("nn_helpers")
local C = require("moonload.C")
local F = ml.nn.functional

local FIX = N.read_json("tests/fixtures/ssm_scan.json")

local function shapes(c)
   return { c.B, c.T, c.H, c.P }, { c.B, c.T, c.H }, { c.B, c.T, c.G, c.N }, { c.B, c.H, c.P, c.N }
end

local function t(list, shape, dtype) return ml.tensor(list, { dtype = dtype or "float32" }):view(shape) end

-- A fixture case's inputs x, dt, A, B, C, D (or nil) and its initial state (or nil); x, B and C
-- in dtype (float32).
local function operands(c, dtype)
   local xs, ds, bs, ss = shapes(c)
   return t(c.x, xs, dtype), t(c.dt, ds), t(c.A, { c.H }), t(c.Bm, bs, dtype), t(c.Cm, bs, dtype),
      c.D and t(c.D, { c.H }) or nil, c.state and t(c.state, ss) or nil
end

local rel_err, assert_close, formula = N.rel_err, N.assert_rel_close, N.formula

-- The chunk case's inputs, from the closed formulas of gen_ssm_scan.py.
local function chunk_operands()
   local c = FIX.chunk
   local xs, ds, bs = shapes(c)
   return formula(xs, function(n) return math.sin(0.61 * n + 0.3) end),
      formula(ds, function(n) return 0.05 + 0.2 * (1 + math.sin(1.3 * n)) end),
      formula({ c.H }, function(n) return -(0.5 + n) end),
      formula(bs, function(n) return math.cos(0.43 * n + 1.1) end),
      formula(bs, function(n) return math.sin(0.27 * n) * 0.8 end),
      formula({ c.H }, function(n) return 0.5 + 0.25 * n end)
end

describe("ssm_scan", function()
   it("matches transformers with one group, no D, from a zero state", function()
      local c = FIX.one_group
      local x, dt, A, B, Cm = operands(c)
      local out, state = F.ssm_scan(x, dt, A, B, Cm)
      assert.are.same({ c.B, c.T, c.H, c.P }, out.shape)
      assert.are.equal("float32", out.dtype)
      assert.are.same({ c.B, c.H, c.P, c.N }, state.shape)
      assert.are.equal("float32", state.dtype)
      assert_close(out, c.out, 1e-5, "out")
      assert_close(state, c.final_state, 1e-5, "state")
   end)

   it("gives each group to H / G heads, adds D x, and updates a given state in place", function()
      local c = FIX.groups
      local x, dt, A, B, Cm, D, state = operands(c)
      assert.are.equal(2 * c.G, c.H)
      local out, st = F.ssm_scan(x, dt, A, B, Cm, D, state)
      assert.are.equal(state, st)
      assert_close(out, c.out, 1e-5, "out")
      assert_close(state, c.final_state, 1e-5, "state")
      -- neither the initial state nor D is a no-op here
      assert.is_true(rel_err(F.ssm_scan(x, dt, A, B, Cm, D), c.out) > 1e-2)
      assert.is_true(rel_err(F.ssm_scan(x, dt, A, B, Cm, nil, t(c.state, { c.B, c.H, c.P, c.N })), c.out) > 1e-2)
   end)

   it("takes dt made as the mixer makes it (softplus of dt + dt_bias, clamped) and A = -exp(A_log)", function()
      local c = FIX.groups
      local _, ds = shapes(c)
      local raw = t(c.dt_raw, ds) + t(c.dt_bias, { c.H })
      local dt = ((raw:exp() + 1):log()):clamp(c.time_step_limit[1], c.time_step_limit[2])
      assert_close(dt, c.dt, 1e-6, "dt")
      assert_close(-t(c.A_log, { c.H }):exp(), c.A, 1e-6, "A")
   end)

   it("continues from a state with one token (a decoding step)", function()
      local g = FIX.groups
      local x, dt, A, B, Cm, D, state = operands(g)
      F.ssm_scan(x, dt, A, B, Cm, D, state)
      local c = FIX.decode
      local xs, ds, bs = shapes(c)
      assert.are.equal(1, c.T)
      local out, st = F.ssm_scan(t(c.x, xs), t(c.dt, ds), A, t(c.Bm, bs), t(c.Cm, bs), D, state)
      assert.are.equal(state, st)
      assert_close(out, c.out, 1e-5, "out")
      assert_close(state, c.final_state, 1e-5, "state")
   end)

   it("takes Mamba-1's steps per channel and decay rates per channel and state entry", function()
      local c = FIX.mamba1
      local x, dt = t(c.x, { c.B, c.T, 1, c.P }), t(c.dt, { c.B, c.T, 1, c.P })
      local B, Cm = t(c.Bm, { c.B, c.T, 1, c.N }), t(c.Cm, { c.B, c.T, 1, c.N })
      local A, D = t(c.A, { 1, c.P, c.N }), t(c.D, { 1, c.P })
      local out, state = F.ssm_scan(x, dt, A, B, Cm, D)
      assert_close(out, c.out, 1e-5, "out")
      assert_close(state, c.final_state, 1e-5, "state")
      -- a decoding step from there (mamba_selective_state_update)
      local d = FIX.mamba1_decode
      local step = F.ssm_scan(t(d.x, { d.B, 1, 1, d.P }), t(d.dt, { d.B, 1, 1, d.P }), A, t(d.Bm, { d.B, 1, 1, d.N }),
         t(d.Cm, { d.B, 1, 1, d.N }), D, state)
      assert_close(step, d.out, 1e-5, "decode out")
      assert_close(state, d.final_state, 1e-5, "decode state")
      -- a step per row equal across a head's rows is the per-head form, bit for bit
      local g = FIX.groups
      local xg, dtg, Ag, Bg, Cg, Dg = operands(g)
      local rows = dtg:unsqueeze(4):expand(g.B, g.T, g.H, g.P)
      local rates = Ag:view(g.H, 1, 1):expand(g.H, g.P, g.N)
      assert.is_true(ml.equal(F.ssm_scan(xg, rows, rates, Bg, Cg, Dg:view(g.H, 1):expand(g.H, g.P)),
         F.ssm_scan(xg, dtg, Ag, Bg, Cg, Dg)))
   end)

   it("takes the models' A_log for the rates, -exp(A_log), per head and per row", function()
      local c = FIX.groups
      local x, dt, A, B, Cm, D, state = operands(c)
      local out = F.ssm_scan(x, dt, t(c.A_log, { c.H }), B, Cm, D, state, { A_log = true })
      assert_close(out, c.out, 1e-5, "out")
      assert_close(state, c.final_state, 1e-5, "state")
      local m = FIX.mamba1
      local xs, dts = t(m.x, { m.B, m.T, 1, m.P }), t(m.dt, { m.B, m.T, 1, m.P })
      local Bs, Cs = t(m.Bm, { m.B, m.T, 1, m.N }), t(m.Cm, { m.B, m.T, 1, m.N })
      local A_log = t(m.A, { 1, m.P, m.N }):neg():log()
      assert_close(F.ssm_scan(xs, dts, A_log:bfloat16(), Bs, Cs, t(m.D, { 1, m.P }), nil, { A_log = true }),
         F.ssm_scan(xs, dts, -A_log:bfloat16():float():exp(), Bs, Cs, t(m.D, { 1, m.P })):view(-1):tolist(), 1e-6,
         "bfloat16 A_log against the rates taken in Lua")
   end)

   it("matches the chunked form transformers runs on prompts (70 tokens, two chunks of 64)", function()
      local c = FIX.chunk
      local out, state = F.ssm_scan(chunk_operands())
      local rows = {}
      for i, p in ipairs(c.positions) do rows[i] = out:narrow(2, p + 1, 1) end
      assert_close(ml.cat(rows, 2), c.out, 1e-5, "out")
      assert_close(state, c.final_state, 1e-5, "state")
   end)

   it("gives the same bits for a sequence in two calls as in one", function()
      local x, dt, A, B, Cm, D = chunk_operands()
      local out, state = F.ssm_scan(x, dt, A, B, Cm, D)
      local function part(v, s, n) return v:narrow(2, s, n) end
      local o1, st = F.ssm_scan(part(x, 1, 33), part(dt, 1, 33), A, part(B, 1, 33), part(Cm, 1, 33), D)
      local o2 = F.ssm_scan(part(x, 34, 37), part(dt, 34, 37), A, part(B, 34, 37), part(Cm, 34, 37), D, st)
      assert.is_true(ml.equal(ml.cat({ o1, o2 }, 2), out))
      assert.is_true(ml.equal(st, state))
   end)

   it("reads bfloat16 and float16 inputs in float32 and writes float32", function()
      local c = FIX.bf16
      local x, dt, A, B, Cm, D = operands(c, "bfloat16")
      local out, state = F.ssm_scan(x, dt, A, B, Cm, D)
      assert.are.equal("float32", out.dtype)
      assert.are.equal("float32", state.dtype)
      assert_close(out, c.out, 1e-5, "out against transformers")
      assert_close(out, c.out_f32, 1e-5, "out against float32 inputs")
      assert_close(state, c.final_state, 1e-5, "state")
      -- each operand its own dtype: the bfloat16 values are exact in float32 and float16
      assert_close(F.ssm_scan(x:half(), dt:bfloat16(), A:half(), B:float(), Cm, D:half()), c.out_f32, 1e-2, "mixed out")
      assert_close(F.ssm_scan(x:half(), dt, A, B:half(), Cm:float(), D), c.out_f32, 1e-5, "float16 out")
   end)

   it("reads x, B and C as views of one tensor (the mixer's split of its convolution output)", function()
      local c = FIX.mixed
      local Bt, T, H, P, G, Ns = c.B, c.T, c.H, c.P, c.G, c.N
      local mixed = t(c.mixed, { Bt, T, H * P + 2 * G * Ns })
      local x = mixed:narrow(3, 1, H * P):view(Bt, T, H, P)
      local B = mixed:narrow(3, H * P + 1, G * Ns):view(Bt, T, G, Ns)
      local Cm = mixed:narrow(3, H * P + G * Ns + 1, G * Ns):view(Bt, T, G, Ns)
      assert.is_false(x:is_contiguous())
      local dt, A, D = t(c.dt, { Bt, T, H }), t(c.A, { H }), t(c.D, { H })
      local out, state = F.ssm_scan(x, dt, A, B, Cm, D)
      assert_close(out, c.out, 1e-5, "out")
      assert_close(state, c.final_state, 1e-5, "state")
      -- dt as a strided view, and a last dim that is not unit-stride (copied by the binding)
      local dtt = dt:transpose(2, 3):contiguous():transpose(2, 3)
      local xt = x:contiguous():transpose(3, 4):contiguous():transpose(3, 4)
      assert.are_not.equal(1, xt:stride(4))
      assert.is_true(ml.equal(F.ssm_scan(xt, dtt, A, B, Cm, D), out))
   end)

   it("writes nothing for zero tokens and keeps the state", function()
      local x, dt, A, B, Cm, D, state = operands(FIX.groups)
      local before = state:clone()
      local function none(v) return v:narrow(2, 1, 0) end
      local out = F.ssm_scan(none(x), none(dt), A, none(B), none(Cm), D, state)
      assert.are.same({ FIX.groups.B, 0, FIX.groups.H, FIX.groups.P }, out.shape)
      assert.is_true(ml.equal(state, before))
   end)

   describe("errors", function()
      local c = FIX.groups
      local x, dt, A, B, Cm, D, state = operands(c)

      -- the call fails with msg and leaves the state as it was
      local function refuses(msg, o)
         local s = o.state or state
         local before = s:clone()
         assert.has_error(function()
            F.ssm_scan(o.x or x, o.dt or dt, o.A or A, o.B or B, o.C or Cm, o.D or D, s)
         end, msg)
         assert.is_true(ml.equal(s, before), "state changed")
      end

      it("names a state of the wrong shape, dtype or layout", function()
         refuses("ssm_scan: state must have shape [2, 4, 4, 8] (B, H, P, N), got [2, 4, 8, 4]",
            { state = ml.zeros(2, 4, 8, 4) })
         refuses("ssm_scan: state must be float32, got bfloat16", { state = ml.zeros({ 2, 4, 4, 8 }, { dtype = "bfloat16" }) })
         refuses("ssm_scan: state must be contiguous", { state = ml.zeros(2, 4, 8, 4):transpose(3, 4) })
      end)

      it("names heads that are not a multiple of the groups", function()
         local b3 = ml.zeros(2, 3, 3, 8)
         refuses("ssm_scan: the heads of x (H = 4) must be a multiple of the groups of B and C (G = 3)", { B = b3, C = b3 })
      end)

      it("names an operand whose batch, length, heads or size do not match", function()
         refuses("ssm_scan: B must be (B, T, G, N) with x's B = 2 and T = 3, got shape [2, 4, 2, 8]",
            { B = ml.zeros(2, 4, 2, 8) })
         refuses("ssm_scan: C must have shape [2, 3, 2, 8] (B, T, G, N), as B, got [2, 3, 2, 4]", { C = ml.zeros(2, 3, 2, 4) })
         refuses("ssm_scan: dt must have shape [2, 3, 4] (B, T, H) or [2, 3, 4, 4] (B, T, H, P), got [2, 3, 1]",
            { dt = ml.zeros(2, 3, 1) })
         refuses("ssm_scan: dt must have shape [2, 3, 4] (B, T, H) or [2, 3, 4, 4] (B, T, H, P), got [2, 3, 4, 8]",
            { dt = ml.zeros(2, 3, 4, 8) })
         refuses("ssm_scan: A must have shape [4] (H) or [4, 4, 8] (H, P, N), got [2]", { A = ml.zeros(2) })
         refuses("ssm_scan: A must have shape [4] (H) or [4, 4, 8] (H, P, N), got [4, 4]", { A = ml.zeros(4, 4) })
         refuses("ssm_scan: D must have shape [4] (H) or [4, 4] (H, P), got [4, 1]", { D = ml.zeros(4, 1) })
         refuses("ssm_scan: x must be (B, T, H, P), got shape [3, 8]", { x = ml.zeros(3, 8) })
      end)

      it("names an operand of the wrong dtype, a missing one, one on the meta device", function()
         refuses("ssm_scan: x must be float32, bfloat16 or float16, got int64", { x = x:long() })
         refuses("ssm_scan: dt must be float32, bfloat16 or float16, got float64", { dt = dt:double() })
         assert.has_error(function() F.ssm_scan(x, dt, nil, B, Cm) end, "ssm_scan: A must be a tensor, got nil")
         refuses("ssm_scan: C is on the meta device and has no data", { C = ml.empty({ 2, 3, 2, 8 }, { device = "meta" }) })
      end)

      it("refuses, in C, a last dim that is not unit-stride (the binding copies it first)", function()
         local st2 = ml.zeros(c.B, c.H, c.P, c.N)
         local out = ml.zeros(x.shape)
         local xt = x:transpose(3, 4):contiguous():transpose(3, 4)
         assert.is_true(ml.equal(xt, x))
         assert.are_not.equal(0, C.lib.ml_ssm_scan(xt._c, dt._c, A._c, B._c, Cm._c, nil, false, st2._c, out._c))
         assert.are.equal("ssm_scan: the last dim of x must have stride 1, got 4 (make it contiguous)",
            require("ffi").string(C.lib.ml_last_error()))
         assert.is_true(ml.equal(st2, ml.zeros(st2.shape)))
         assert.is_true(ml.equal(out, ml.zeros(out.shape)))
      end)
   end)
end)

describe("ssm_scan on cuda #cuda", function()
   local DEV = "cuda:0"

   local on = N.on_device

   -- out and the final state of the same call on the CPU and on cuda:0, compared.
   local function same_as_cpu(tol, what, x, dt, A, B, Cm, D, state)
      local oc, sc = F.ssm_scan(x, dt, A, B, Cm, D, state and state:clone())
      local xd, dtd, Ad, Bd, Cd, Dd, sd = on(DEV, x, dt, A, B, Cm, D, state)
      local od, sdd = F.ssm_scan(xd, dtd, Ad, Bd, Cd, Dd, sd)
      assert.are.equal(DEV, od.device)
      assert.are.equal(DEV, sdd.device)
      if sd then assert.are.equal(sd, sdd) end
      assert_close(od:cpu(), oc:view(-1):tolist(), tol, what .. " out")
      assert_close(sdd:cpu(), sc:view(-1):tolist(), tol, what .. " state")
   end

   it("computes the CPU's values for every fixture case", function()
      same_as_cpu(1e-5, "one_group", operands(FIX.one_group))
      same_as_cpu(1e-5, "groups", operands(FIX.groups))
      same_as_cpu(1e-5, "bf16", operands(FIX.bf16, "bfloat16"))
      same_as_cpu(1e-5, "chunk", chunk_operands())
      local c = FIX.chunk
      local out = F.ssm_scan(on(DEV, chunk_operands()))
      local rows = {}
      for i, p in ipairs(c.positions) do rows[i] = out:narrow(2, p + 1, 1) end
      assert_close(ml.cat(rows, 2):cpu(), c.out, 1e-5, "chunk against transformers")
   end)

   it("handles a partial block of rows and a state size that is not a multiple of 32", function()
      ml.manual_seed(37)
      for _, T in ipairs({ 1, 5 }) do
         local Bt, H, P, G, Ns = 2, 6, 13, 3, 200
         same_as_cpu(1e-5, "P 13, N 200, T " .. T, ml.randn(Bt, T, H, P), ml.rand(Bt, T, H) * 0.3, -ml.rand(H),
            ml.randn(Bt, T, G, Ns), ml.randn(Bt, T, G, Ns), ml.randn(H), ml.randn(Bt, H, P, Ns))
      end
   end)

   it("takes Mamba-1's per-channel steps, decay rates and skips, prompt and decoding step", function()
      ml.manual_seed(41)
      for _, T in ipairs({ 1, 6 }) do
         for _, Ns in ipairs({ 16, 48 }) do        -- (past 32, a lane holds two entries and their rates)
            local Bt, P = 2, 40
            same_as_cpu(1e-5, "Mamba-1, T " .. T .. ", N " .. Ns, ml.randn(Bt, T, 1, P), ml.rand(Bt, T, 1, P) * 0.3,
               -ml.rand(1, P, Ns) * 4, ml.randn(Bt, T, 1, Ns), ml.randn(Bt, T, 1, Ns), ml.randn(1, P), ml.randn(Bt, 1, P, Ns))
         end
      end
   end)

   it("takes the rates from A_log as the CPU does", function()
      ml.manual_seed(43)
      for _, rows in ipairs({ false, true }) do
         local Bt, T, H, P, Ns = 2, 4, rows and 1 or 4, rows and 40 or 16, rows and 48 or 8
         local x, B, Cm = ml.randn(Bt, T, H, P), ml.randn(Bt, T, 1, Ns), ml.randn(Bt, T, 1, Ns)
         local dt = rows and ml.rand(Bt, T, H, P) * 0.3 or ml.rand(Bt, T, H) * 0.3
         local A_log = rows and ml.randn(H, P, Ns) or ml.randn(H)
         local oc, sc = F.ssm_scan(x, dt, A_log, B, Cm, nil, nil, { A_log = true })
         local od, sd = F.ssm_scan(x:to(DEV), dt:to(DEV), A_log:to(DEV), B:to(DEV), Cm:to(DEV), nil, nil, { A_log = true })
         assert_close(od:cpu(), oc:view(-1):tolist(), 1e-5, "out")
         assert_close(sd:cpu(), sc:view(-1):tolist(), 1e-5, "state")
      end
   end)

   it("names the operand on another device and a state size over the kernel's", function()
      local x, dt, A, B, Cm, D, state = operands(FIX.groups)
      assert.has_error(function() F.ssm_scan(x:to(DEV), dt:to(DEV), A:to(DEV), B:to(DEV), Cm:to(DEV), D:to(DEV), state) end,
         "ssm_scan: x is on cuda:0 but state is on cpu")
      assert.has_error(function() F.ssm_scan(x:to(DEV), dt, A, B, Cm) end, "ssm_scan: x is on cuda:0 but dt is on cpu")
      local z = function(...) return ml.zeros({ ... }, { device = DEV }) end
      assert.has_error(function() F.ssm_scan(z(1, 1, 1, 1), z(1, 1, 1), z(1), z(1, 1, 1, 300), z(1, 1, 1, 300)) end,
         "ssm_scan: a state size N of 300 is over the CUDA kernel's 256")
   end)
end)
