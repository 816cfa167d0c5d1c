-- nn.ReLUSquaredActivation / F.relu2 and nn.XIELUActivation / F.xielu against transformers'
-- ReLUSquaredActivation and XIELUActivation (tests/fixtures/gen_models.py arcee and apertus:
-- relu2.json, xielu.json, the activations over a range of inputs).
local ml = require("moonload")
local nn = ml.nn
local H = require("models_helpers")

describe("nn relu2 and xIELU activations", function()
   it("relu2: transformers' relu(x)^2, as a function and a module", function()
      local j = H.read_json(H.FIX .. "/arcee_tiny/relu2.json")
      local x = ml.tensor(j.x)
      assert.is_true(H.max_abs_diff(nn.F.relu2(x), j.y) < 1e-12)
      assert.is_true(H.max_abs_diff(nn.ReLUSquaredActivation()(x), j.y) < 1e-12)
   end)

   it("xielu: transformers' values from its raw parameters, to float32 rounding near 0 and far out", function()
      local j = H.read_json(H.FIX .. "/apertus_tiny/xielu.json")
      local x = ml.tensor(j.x)
      local y = nn.F.xielu(x, ml.tensor({ j.alpha_p }), ml.tensor({ j.alpha_n }), ml.tensor(j.beta), ml.tensor(j.eps))
      for i, v in ipairs(y:tolist()) do
         assert.is_true(math.abs(v - j.y[i]) <= 1e-6 * math.abs(j.y[i]) + 1e-12, i)
      end
      -- as numbers too
      assert.is_true(H.max_abs_diff(nn.F.xielu(x, j.alpha_p, j.alpha_n, j.beta, j.eps), j.y) < 1e-5)
   end)

   it("XIELUActivation: transformers' initial parameters and buffers, learned values once set", function()
      local act = nn.XIELUActivation()
      assert.are.same({ "alpha_p", "alpha_n" }, H.param_names(act))
      assert.is_true(math.abs(act.alpha_p:tolist()[1] - math.log(math.exp(0.8) - 1)) < 1e-6)
      assert.is_true(math.abs(act.alpha_n:tolist()[1] - math.log(math.exp(0.3) - 1)) < 1e-6)
      assert.are.same({ 0.5, {} }, { act.beta:item(), act.beta.shape })
      local j = H.read_json(H.FIX .. "/apertus_tiny/xielu.json")
      act.alpha_p:fill_(j.alpha_p)
      act.alpha_n:fill_(j.alpha_n)
      assert.is_true(H.max_abs_diff(act(ml.tensor(j.x)), j.y) < 1e-5)
   end)
end)
