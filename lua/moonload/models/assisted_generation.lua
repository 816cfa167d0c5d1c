--- Assisted generation (transformers' generate(assistant_model = ...), speculative decoding with
-- greedy verification): a small draft model proposes a few tokens one at a time, and the model
-- checks them all in one forward, keeping those it would have picked itself and adding its own
-- next one. The output is the model's own greedy output; what changes is how many forwards of
-- the model it takes. That pays most where a forward costs about the same for one token as for
-- a few: a model whose weights stream from the CPU or the disk (hooks.lua) reads them once per
-- forward, whatever the number of tokens.
--
-- Both models keep a key-value cache; the tokens the model did not accept are cropped from both
-- (KVCache:crop). The number of draft tokens follows transformers' "heuristic" schedule: two
-- more after a round where all were accepted, one fewer otherwise.
local T = require("moonload.tensor")

local M = {}

local WHO = "generate"

-- Options assisted generation does not take, with why.
local UNSUPPORTED = {
   repetition_penalty = "repetition_penalty",
   micro_batch_size = "a block schedule", prefill_chunk_size = "a block schedule",
}

--- check(model, draft, opts, B) -> errors naming what assisted generation cannot do here.
function M.check(model, draft, opts, B)
   if type(draft) ~= "table" or type(draft.new_cache) ~= "function" or type(draft.forward) ~= "function" then
      error(WHO .. ": assistant_model must be a causal language model (with a key-value cache), got " .. type(draft), 4)
   end
   if B ~= 1 then error(string.format("%s: assistant_model takes one prompt at a time, got a batch of %d", WHO, B), 4) end
   for k, what in pairs(UNSUPPORTED) do
      local v = opts[k]
      if v ~= nil and v ~= false and not (k == "repetition_penalty" and v == 1) then
         error(string.format("%s: assistant_model does not support %s", WHO, what), 4)
      end
   end
   -- (a tokenizer's mask of one unpadded prompt is all ones: nothing to mask)
   local mask = opts.attention_mask
   if mask ~= nil then
      local t = type(mask) == "table" and mask.numel == nil and T.tensor(mask, { dtype = "int64" }) or mask
      if t:eq(0):sum():item() > 0 then
         error(WHO .. ": assistant_model does not support a padding attention_mask (one prompt, no padding)", 4)
      end
   end
   if opts.do_sample == true or (opts.temperature and opts.temperature > 0 and opts.do_sample ~= false) then
      error(WHO .. ": assistant_model verifies greedy picks and does not sample (do_sample or a temperature > 0, "
         .. "perhaps from the model's generation config: pass do_sample = false)", 4)
   end
   local n = opts.num_assistant_tokens
   if n ~= nil and (type(n) ~= "number" or n ~= math.floor(n) or n < 1) then
      error(string.format("%s: num_assistant_tokens must be an integer >= 1, got %s", WHO, tostring(n)), 4)
   end
   for _, m in ipairs({ model, draft }) do
      if m.recompute_cache_at and m:recompute_cache_at() then
         error(WHO .. ": assistant_model does not support LongRoPE models (their cache is rebuilt mid-generation)", 4)
      end
   end
end

local function ids_tensor(list) return T.tensor({ list }, { dtype = "int64" }) end

-- Greedy picks of logits (1, n, vocab) as a list of n ids, the eos ids masked in the first
-- ban_first rows (min_new_tokens).
local function picks(logits, eos_ban, ban_first)
   local rows = logits:select(1, 1)                            -- (n, vocab)
   if eos_ban and ban_first > 0 then
      local n, N = math.min(ban_first, rows:size(1)), rows:size(1)
      local head = rows:narrow(1, 1, n):masked_fill(eos_ban:to(rows.device):expand(n, rows:size(2)), -math.huge)
      rows = n == N and head or T.cat({ head, rows:narrow(1, n + 1, N - n) }, 1)
   end
   return rows:argmax(2):tolist()
end

--- run(model, draft, prompt, s) -> the generated ids (a list, prompt first). s: max_new, min_new,
-- eos (an id or a list, or nil), eos_ban ((1, vocab) bool or nil), on_token, kv_device,
-- kv_dtype, num_assistant_tokens, stats (a table that gets forwards and accepted counts).
function M.run(model, draft, prompt, s)
   local L, max_new = #prompt, s.max_new
   local seq = { unpack(prompt) }
   local is_eos = {}
   for _, id in ipairs(type(s.eos) == "table" and s.eos or { s.eos }) do is_eos[id] = true end
   -- (a round's forward ends with at most max_new - 1 new tokens cached)
   local cache = model:new_cache(L + max_new, s.kv_device, s.kv_dtype)
   local draft_cache = draft:new_cache(L + max_new)
   local stats = s.stats or {}
   stats.forwards, stats.draft_forwards, stats.proposed, stats.accepted = 0, 0, 0, 0

   local finished = false
   local function emit(tok)                                   -- false once generation ends
      seq[#seq + 1] = tok
      local n = #seq - L
      if s.on_token and s.on_token({ tok }, n) == false then finished = true end
      if is_eos[tok] or n >= max_new then finished = true end
      return not finished
   end

   local logits = model(ids_tensor(prompt), { cache = cache, logits_to_keep = 1 })
   stats.forwards = stats.forwards + 1
   local first = picks(logits, s.eos_ban, s.min_new)[1]
   if max_new == 0 then return seq end
   emit(first)
   local k_next = s.num_assistant_tokens or 5
   while not finished do
      local n_new = #seq - L
      local k = math.min(k_next, max_new - n_new - 1)
      -- the draft: the tokens it has not seen yet (at least the last one), then k - 1 more
      local proposal = {}
      if k > 0 then
         if draft_cache.length > #seq - 1 then                 -- (a sliding window kept it from cropping)
            draft_cache = draft:new_cache(L + max_new)
         end
         local unseen = { unpack(seq, draft_cache.length + 1) }
         for i = 1, k do
            local dl = draft(ids_tensor(unseen), { cache = draft_cache, logits_to_keep = 1 })
            stats.draft_forwards = stats.draft_forwards + 1
            proposal[i] = dl:select(2, -1):argmax(2):item()
            unseen = { proposal[i] }
         end
      end
      -- the model: the last token and the proposal in one forward, a pick after each
      local before = cache.length                              -- = #seq - 1
      local feed = { seq[#seq], unpack(proposal) }
      logits = model(ids_tensor(feed), { cache = cache, logits_to_keep = #feed })
      stats.forwards = stats.forwards + 1
      local mine = picks(logits, s.eos_ban, s.min_new - n_new)
      local accepted = 0
      while accepted < #proposal and mine[accepted + 1] == proposal[accepted + 1] do accepted = accepted + 1 end
      stats.proposed, stats.accepted = stats.proposed + #proposal, stats.accepted + accepted
      -- keep the cache up to the last accepted token; the model's own next pick comes after it
      cache:crop(before + 1 + accepted)
      if draft_cache.length > before + 1 + accepted and draft_cache:can_crop(before + 1 + accepted) then
         draft_cache:crop(before + 1 + accepted)
      end
      for i = 1, accepted do
         if not emit(proposal[i]) then break end
      end
      if not finished then emit(mine[accepted + 1]) end
      if #proposal > 0 then
         k_next = accepted == #proposal and k_next + 2 or math.max(1, k_next - 1)
      end
   end
   return seq
end

return M
