--- Sampling as transformers' warpers shape it, in their order: the scores divided by the
-- temperature, then only the top_k largest kept (ties with the k-th kept too), then only the
-- nucleus of probability top_p (the tokens whose more likely tokens sum to less than top_p, so
-- the top one always stays), then only the tokens at least min_p times as likely as the most
-- likely one. Two forms of the same rule:
-- - pick: generate's draw of one token per row, through the top candidates only (sorting a whole
--   vocabulary each token costs more than the step itself);
-- - warp: the dense scores with -inf outside the kept set (beam sampling warps log-probs,
--   speculative sampling needs whole distributions).
-- s is {temperature, top_k, top_p, min_p}; a top_p of 1, a min_p of 0 and a top_k as large as the
-- vocabulary keep everything.
local T = require("moonload.tensor")

local M = {}

local function active(s, V)
   local top_k = s.top_k and s.top_k < V and s.top_k or nil
   local top_p = s.top_p and s.top_p < 1 and s.top_p or nil
   local min_p = s.min_p and s.min_p > 0 and s.min_p or nil
   return top_k, top_p, min_p
end

--- Sorted probabilities (B, n), the tokens outside the nucleus and below min_p at 0.
local function trim(probs, top_p, min_p)
   if top_p then probs = probs:masked_fill((probs:cumsum(2) - probs):ge(top_p), 0) end
   if min_p then probs = probs:masked_fill(probs:lt(probs:narrow(2, 1, 1) * min_p), 0) end
   return probs
end

--- pick(logits (B, V), s) -> int64 (B, 1): each row's draw (greedy without a temperature).
function M.pick(logits, s)
   local temperature = s.temperature
   if temperature == nil or temperature == 0 then return logits:argmax(2, true) end
   local scaled = logits / temperature
   local V = scaled:size(2)
   local top_k, top_p, min_p = active(s, V)
   if top_k then
      local vals, idx = scaled:topk(top_k, 2)              -- (B, k) sorted, idx 0-based
      local pick = trim(vals:softmax(2), top_p, min_p):multinomial()
      return idx:gather(2, pick:unsqueeze(2))              -- (B, 1) token ids
   end
   local probs = scaled:softmax(2)
   if top_p then
      -- The nucleus lies within the k most likely tokens once their probability reaches top_p:
      -- k grows from 64 until it does.
      local k = math.min(64, V)
      while true do
         local p, idx = probs:topk(k, 2)
         if k == V or p:sum(2):min():item() >= top_p then
            return idx:gather(2, trim(p, top_p, min_p):multinomial():unsqueeze(2))
         end
         k = math.min(V, k * 4)
      end
   end
   if min_p then probs = probs:masked_fill(probs:lt(probs:max(2, true) * min_p), 0) end
   return probs:multinomial():unsqueeze(2)
end

--- warp(scores (N, V), s) -> scores / temperature, -inf outside what pick would draw from.
function M.warp(scores, s)
   if s.temperature and s.temperature ~= 1 then scores = scores / s.temperature end
   local V = scores:size(2)
   local top_k, top_p, min_p = active(s, V)
   if top_k then
      local kth = scores:topk(top_k, 2):narrow(2, top_k, 1)        -- (N, 1)
      scores = scores:masked_fill(scores:lt(kth), -math.huge)
   end
   if top_p then
      local sorted = scores:topk(V, 2)                              -- (N, V) descending
      local probs = sorted:softmax(2)
      local count = (probs:cumsum(2) - probs):lt(top_p):to("int64"):sum(2, true)   -- a prefix, >= 1
      scores = scores:masked_fill(scores:lt(sorted:gather(2, count - 1)), -math.huge)
   end
   if min_p then
      -- (p >= min_p * p_max is log p >= log p_max + log min_p, whatever the normalisation)
      scores = scores:masked_fill(scores:lt(scores:max(2, true) + math.log(min_p)), -math.huge)
   end
   return scores
end

return M
