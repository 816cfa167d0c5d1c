-- generate's sampling warpers (models/sampling.lua): temperature, top_k, top_p and min_p in
-- transformers' order, as kept sets computed by hand from sorted probabilities, the draws of
-- pick (each of its three paths) against those sets and their renormalised probabilities, and
-- min_p in generate.
local ml = require("moonload")
local T = require("moonload.tensor")
local H = require("models_helpers")
local sampling = require("moonload.models.sampling")

-- The kept ids (a set) and their probabilities, by hand: sorted, top_k, nucleus, min_p.
local function by_hand(logits, s)
   local order = {}
   for i, x in ipairs(logits) do order[i] = { id = i - 1, x = x / (s.temperature or 1) } end
   table.sort(order, function(a, b) return a.x > b.x end)
   local n = s.top_k and math.min(s.top_k, #order) or #order
   local function probs(k)
      local z, p = 0, {}
      for i = 1, k do z = z + math.exp(order[i].x - order[1].x) end
      for i = 1, k do p[i] = math.exp(order[i].x - order[1].x) / z end
      return p
   end
   if s.top_p and s.top_p < 1 then
      local p, above, keep = probs(n), 0, 0
      for i = 1, n do
         if above < s.top_p then keep = i end
         above = above + p[i]
      end
      n = keep
   end
   if s.min_p and s.min_p > 0 then
      local p, keep = probs(n), 0
      for i = 1, n do if p[i] >= s.min_p * p[1] then keep = i end end
      n = keep
   end
   local p, kept = probs(n), {}
   for i = 1, n do kept[order[i].id] = p[i] end
   return kept
end

local LOGITS = { 2.0, 1.5, 1.4, 0.3, -0.2, 0.9, 3.1, -1.0, 0.0, 2.6, 1.0, -2.5 }
local CASES = {
   { temperature = 1 }, { temperature = 0.7, top_k = 4 }, { temperature = 1.3, top_p = 0.8 },
   { temperature = 1, min_p = 0.3 }, { temperature = 0.9, top_k = 6, top_p = 0.9, min_p = 0.1 },
   { temperature = 2, top_p = 0.5, min_p = 0.5 },
}

describe("sampling warpers", function()
   it("keep what transformers' warpers keep, in their order", function()
      for ci, s in ipairs(CASES) do
         local want = by_hand(LOGITS, s)
         local got = sampling.warp(T.tensor({ LOGITS }), s):softmax(2):view(#LOGITS):tolist()
         for id = 0, #LOGITS - 1 do
            local w = want[id] or 0
            assert.is_true(math.abs(got[id + 1] - w) < 1e-5, string.format("case %d, id %d: %g vs %g", ci, id, got[id + 1], w))
         end
      end
   end)

   it("draw only kept tokens, as often as their probabilities say (each path of pick)", function()
      ml.manual_seed(5)
      local N = 6000
      local rows = {}
      for r = 1, N do rows[r] = LOGITS end
      local batch = T.tensor(rows)
      for ci, s in ipairs(CASES) do
         local want = by_hand(LOGITS, s)
         local counts = {}
         for _, id in ipairs(sampling.pick(batch, s):view(N):tolist()) do
            assert.is_not_nil(want[id], string.format("case %d drew %d, outside the kept set", ci, id))
            counts[id] = (counts[id] or 0) + 1
         end
         for id, p in pairs(want) do
            -- (a frequency's standard deviation is at most 0.0065 here)
            assert.is_true(math.abs((counts[id] or 0) / N - p) < 0.03, string.format("case %d, id %d", ci, id))
         end
      end
   end)

   it("min_p = 1 in generate keeps only the most likely token: greedy's output", function()
      local model = ml.models.from_pretrained(H.FIX .. "/gpt2_tiny")
      local prompt = { 5, 17, 42, 3 }
      assert.are.same(model:generate(prompt, { max_new_tokens = 10, eos_token_id = false }),
         model:generate(prompt, { max_new_tokens = 10, eos_token_id = false, temperature = 1.5, min_p = 1, seed = 3 }))
      assert.has_error(function() model:generate(prompt, { min_p = 1.5 }) end, "generate: min_p must be a number in [0, 1], got 1.5")
   end)
end)
