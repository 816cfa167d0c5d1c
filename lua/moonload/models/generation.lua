--- The generate loop shared by causal language models (GPT-2, Llama).
-- Incremental decoding with a key-value cache: the prompt runs once (prefill), then each step
-- feeds only the newly chosen token. Greedy when temperature is 0 or absent; otherwise samples
-- from softmax(logits / temperature), restricted to the top_k most likely tokens when top_k is
-- set, reproducibly for a given seed.
--
-- A model plugs in by being callable as model(ids, {cache = c, logits_to_keep = n}) -> logits
-- (B, T or n, vocab) (advancing the cache), and by providing new_cache(capacity), max_length()
-- and config.vocab_size.
local T = require("moonload.tensor")
local C = require("moonload.C")
local common = require("moonload.models.common")

local M = {}
local WHO = "generate"

local function check_opts(opts)
   if opts == nil then return {} end
   if type(opts) ~= "table" then
      error(WHO .. ": options must be a table {max_new_tokens, temperature, top_k, seed}", 3)
   end
   local function int_opt(name, min)
      local v = opts[name]
      if v ~= nil and (type(v) ~= "number" or v ~= math.floor(v) or v < min) then
         error(string.format("%s: %s must be an integer >= %d, got %s", WHO, name, min, tostring(v)), 4)
      end
   end
   int_opt("max_new_tokens", 0)
   int_opt("top_k", 1)
   int_opt("seed", 0)
   int_opt("eos_token_id", 0)
   local temp = opts.temperature
   if temp ~= nil and (type(temp) ~= "number" or temp < 0 or temp ~= temp) then
      error(string.format("%s: temperature must be a number >= 0, got %s", WHO, tostring(temp)), 3)
   end
   for k in pairs(opts) do
      if k ~= "max_new_tokens" and k ~= "temperature" and k ~= "top_k" and k ~= "seed"
         and k ~= "eos_token_id" and k ~= "do_sample" and k ~= "attention_mask" then
         error(string.format('%s: unknown option "%s" (expected max_new_tokens, temperature, top_k, seed, eos_token_id, attention_mask)',
            WHO, tostring(k)), 3)
      end
   end
   return opts
end

--- Picks the next token of each row from the last-position logits (B, vocab) -> int64 (B, 1).
local function next_tokens(logits, temperature, top_k)
   if temperature == nil or temperature == 0 then
      return logits:argmax(2, true)
   end
   local scaled = logits / temperature
   if top_k and top_k < scaled:size(2) then
      local vals, idx = scaled:topk(top_k, 2)              -- (B, k) sorted, idx 0-based
      local probs = vals:softmax(2)
      local pick = probs:multinomial()                     -- (B) 0-based positions in the top k
      return idx:gather(2, pick:unsqueeze(2))              -- (B, 1) token ids
   end
   return scaled:softmax(2):multinomial():unsqueeze(2)
end

--- Returns the ids in the form they came in: a flat list for a flat list (batch 1), nested
-- lists for nested lists, an int64 tensor (B, T) for a tensor.
local function shape_output(seq, form)
   if form == "tensor" then return seq end
   local rows = seq:tolist()
   if form == "flat" then return rows[1] end
   return rows
end

--- model:generate(input_ids[, {max_new_tokens = 20, temperature = 0, top_k, seed, eos_token_id,
-- attention_mask}])
-- input_ids: 0-based token ids as a Lua list, a list of equal-length lists (batch), or an int64
-- tensor (B, T) / (T); prompts of different lengths are left-padded with attention_mask
-- (B, T) marking the real tokens with 1. Returns the prompt followed by the generated ids, in
-- the input's form.
function M.generate(model, input_ids, opts)
   opts = check_opts(opts)
   local ids, form = common.ids_tensor(input_ids, WHO)
   local vocab = model.config.vocab_size
   common.check_vocab(ids, vocab, WHO)
   local B, L = ids:size(1), ids:size(2)
   local max_new = opts.max_new_tokens or 20
   local limit = model:max_length()
   if limit and L + max_new > limit then
      error(string.format("%s: prompt of %d tokens + max_new_tokens %d exceeds the model's %d positions",
         WHO, L, max_new, limit), 2)
   end
   local temperature = opts.temperature
   if opts.do_sample == false then temperature = 0 end
   if opts.seed ~= nil then C.lib.ml_manual_seed(opts.seed) end
   if max_new == 0 then return shape_output(ids, form) end

   local cache = model:new_cache(L + max_new)
   local dev = ids.device
   local out = T.empty({ B, L + max_new }, { dtype = "int64", device = dev })
   out:narrow(2, 1, L):copy_(ids)
   local eos = opts.eos_token_id
   local done
   -- A padding mask (left padding for prompts of different lengths): generated tokens are
   -- real; positions count the real tokens before each one, as transformers' generate does.
   local mask
   if opts.attention_mask ~= nil then
      mask = T.ones({ B, L + max_new }, { dtype = "int64", device = dev })
      mask:narrow(2, 1, L):copy_(common.mask_tensor(opts.attention_mask, B, L, WHO))
   end
   local function step_opts(len, new)
      local o = { cache = cache, logits_to_keep = 1, _ids_in_range = len > L }   -- sampled tokens
      if mask then
         local m = mask:narrow(2, 1, len)
         o.attention_mask = m
         o.position_ids = common.positions_from_mask(m, new)
      end
      return o
   end
   local logits = model(ids, step_opts(L, L))                  -- (B, 1, vocab)
   local n = 0
   for step = 1, max_new do
      local last = logits:select(2, -1)                       -- (B, vocab)
      local tok = next_tokens(last, temperature, opts.top_k)  -- (B, 1) int64
      if eos and not done then done = T.zeros({ B, 1 }, { dtype = "bool", device = tok.device }) end
      if done then tok = T.where(done, eos, tok) end
      out:narrow(2, L + step, 1):copy_(tok)
      n = step
      if done then
         done = done:logical_or(tok:eq(eos))
         if done:sum():item() == B then break end
      end
      if step < max_new then logits = model(tok, step_opts(L + step, 1)) end
   end
   local seq = out:narrow(2, 1, L + n)
   if form ~= "tensor" then return shape_output(seq, form) end
   return seq:contiguous()
end

return M
