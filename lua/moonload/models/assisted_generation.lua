--- Assisted generation (transformers' generate(assistant_model = ...), speculative decoding): a
-- small draft model proposes a few tokens one at a time (or, with prompt_lookup_num_tokens, the
-- sequence's own earlier continuation of its last n-gram), and the model checks them all in one
-- forward, keeping those it would have picked itself and adding its own next one. Greedy, the
-- output is the model's own greedy output; sampling, speculative sampling keeps the model's own
-- distribution (speculative_pick). What changes is how many forwards of the model it takes.
-- That pays most where a forward costs about the same for one token as for a few: a model whose
-- weights stream from the CPU or the disk (hooks.lua) reads them once per forward, whatever the
-- number of tokens.
--
-- Both models keep a key-value cache; the tokens the model did not accept are cropped from both
-- (KVCache:crop). The number of draft tokens follows transformers' "heuristic" schedule: two
-- more after a round where all were accepted, one fewer otherwise.
local T = require("moonload.tensor")

local M = {}

local WHO = "generate"

-- Options assisted generation does not take, as they are named in its errors.
local UNSUPPORTED = {
   micro_batch_size = "a block schedule", prefill_chunk_size = "a block schedule",
}

--- check(model, opts, B) -> errors naming what assisted generation (opts.assistant_model or
-- opts.prompt_lookup_num_tokens) cannot do here (generate has checked the counts' types).
function M.check(model, opts, B)
   local draft = opts.assistant_model
   local what = draft ~= nil and "assistant_model" or "prompt_lookup_num_tokens"
   if draft ~= nil and opts.prompt_lookup_num_tokens ~= nil then
      error(WHO .. ": assistant_model and prompt_lookup_num_tokens are two ways of proposing tokens: pass one", 4)
   end
   if draft ~= nil and (type(draft) ~= "table" or type(draft.new_cache) ~= "function" or type(draft.forward) ~= "function") then
      error(WHO .. ": assistant_model must be a causal language model (with a key-value cache), got " .. type(draft), 4)
   end
   if B ~= 1 then error(string.format("%s: %s takes one prompt at a time, got a batch of %d", WHO, what, B), 4) end
   for k, unsupported in pairs(UNSUPPORTED) do
      local v = opts[k]
      if v ~= nil and v ~= false then
         error(string.format("%s: %s does not support %s", WHO, what, unsupported), 4)
      end
   end
   -- (a tokenizer's mask of one unpadded prompt is all ones: nothing to mask)
   local mask = opts.attention_mask
   if mask ~= nil then
      local t = type(mask) == "table" and mask.numel == nil and T.tensor(mask, { dtype = "int64" }) or mask
      if t:eq(0):sum():item() > 0 then
         error(string.format("%s: %s does not support a padding attention_mask (one prompt, no padding)", WHO, what), 4)
      end
   end
   for _, m in ipairs({ model, draft }) do
      if m.recompute_cache_at and m:recompute_cache_at() then
         error(string.format("%s: %s does not support LongRoPE models (their cache is rebuilt mid-generation)", WHO, what), 4)
      end
      if m.stateful then      -- (a recurrent state has no earlier length to crop back to)
         error(string.format("%s: %s does not support %s: its linear-attention layers keep a recurrent state, which cannot drop the tokens the model rejects",
            WHO, what, m.__name), 4)
      end
   end
end

local function ids_tensor(list) return T.tensor({ list }, { dtype = "int64" }) end

-- The rows of logits (1, n, vocab) as (n, vocab), the eos ids at -inf in the first ban_first
-- rows (min_new_tokens).
local function banned_rows(logits, eos_ban, ban_first)
   local rows = logits:select(1, 1)
   if eos_ban and ban_first > 0 then
      local n, N = math.min(ban_first, rows:size(1)), rows:size(1)
      local head = rows:narrow(1, 1, n):masked_fill(eos_ban:to(rows.device):expand(n, rows:size(2)), -math.huge)
      rows = n == N and head or T.cat({ head, rows:narrow(1, n + 1, N - n) }, 1)
   end
   return rows
end

--- distributions(rows, sampling) -> (n, vocab) float32 probabilities on the CPU: each row of
-- logits through generate's warpers (models/sampling.lua: temperature, top_k, top_p, min_p; logits
-- tied at the k-th value all stay), then softmax.
function M.distributions(rows, sampling)
   local scores = rows:to("cpu"):to("float32")
   return require("moonload.models.sampling").warp(scores, sampling):softmax(2)
end

local function draw(probs) return probs:view(1, probs:size(1)):multinomial():item() end

--- speculative_pick(p, q, proposal, uniform) -> how many proposed tokens stand, and the token
-- after them: speculative sampling (Leviathan et al.; Chen et al.), whose tokens are distributed
-- as sampling the model alone would draw them. p (k + 1, vocab): the model's distributions after
-- the last token and after each proposed one; q (k, vocab): those the proposals were drawn from
-- (nil: each was certain, as a prompt lookup's); uniform() draws from [0, 1). Proposal i stands
-- with probability min(1, p(x) / q(x)); the first that does not is replaced by a draw from
-- max(0, p - q), renormalized; when all stand, one more is drawn from p's last row.
function M.speculative_pick(p, q, proposal, uniform)
   for i, x in ipairs(proposal) do
      local pi = p:select(1, i)
      local px, qx = pi[x + 1]:item(), q and q:select(1, i)[x + 1]:item() or 1
      if not (uniform() * qx < px) then
         local residual = q and (pi - q:select(1, i)):clamp(0) or pi:clone()
         if not q then residual[x + 1] = 0 end
         if residual:sum():item() <= 0 then residual = pi end
         return i - 1, draw(residual)
      end
   end
   return #proposal, draw(p:select(1, #proposal + 1))
end

--- Rows of logits (n, vocab) through the repetition penalty and the bans, row i as it
-- follows prefix .. extra[1 .. i - 1] (transformers applies its processors to each candidate
-- position so); the rows unchanged when s asks for neither.
local function processed(rows, s, prefix, extra)
   if not (s.penalty or s.ban) then return rows end
   local generation = require("moonload.models.generation")
   local seqs = {}
   for i = 1, rows:size(1) do
      local q = { unpack(prefix) }
      for j = 1, i - 1 do q[#q + 1] = extra[j] end
      seqs[i] = q
   end
   if s.penalty then rows = generation.penalize(rows, generation.seen_mask(seqs, rows:size(2)):to(rows.device), s.penalty) end
   if s.ban then rows = s.ban(rows, seqs) end
   return rows
end

-- Proposal sources: propose(seq, k) -> up to k ids to follow seq; kept(n): the model kept the
-- first n tokens of the sequence (the rest of what was proposed is gone); next_k(k, accepted,
-- proposed): the next round's count.

--- A draft model with its own cache (transformers' AssistedCandidateGenerator).
local function draft_source(draft, capacity, stats, sampling, s)
   local cache = draft:new_cache(capacity)
   local src = {}
   function src.propose(seq, k)                                -- -> ids, and with sampling their distributions
      if cache.length > #seq - 1 then cache = draft:new_cache(capacity) end   -- (a window kept it from cropping)
      local unseen, out, q = { unpack(seq, cache.length + 1) }, {}, {}
      for i = 1, k do                 -- the tokens it has not seen yet (at least the last one), then one at a time
         local logits = draft(ids_tensor(unseen), { cache = cache, logits_to_keep = 1 })
         stats.draft_forwards = stats.draft_forwards + 1
         -- (the draft proposes under the model's processors, as transformers' assistant does)
         local row = logits:select(1, 1)
         if s.penalty or s.ban then
            local so_far = { unpack(seq) }
            for _, t in ipairs(out) do so_far[#so_far + 1] = t end
            row = processed(row, s, so_far, {})
         end
         if sampling then
            q[i] = M.distributions(row, sampling)
            out[i] = draw(q[i]:select(1, 1))
         else
            out[i] = row:argmax(2):item()
         end
         unseen = { out[i] }
      end
      return out, sampling and k > 0 and T.cat(q, 1) or nil
   end
   function src.kept(n)
      if cache.length > n and cache:can_crop(n) then cache:crop(n) end
   end
   function src.next_k(k, accepted, proposed)                 -- transformers' "heuristic" schedule
      return accepted == proposed and k + 2 or math.max(1, k - 1)
   end
   return src
end

--- The tokens that followed the earliest earlier occurrence of the sequence's last n-gram (n from
-- max_ngram down to 1): transformers' prompt lookup decoding, which pays where the output
-- repeats the input (summaries, edits of code, extraction).
local function lookup_source(max_ngram)
   local src = {}
   function src.propose(seq, k)
      local len = #seq
      for n = math.min(max_ngram, len - 1), 1, -1 do
         for start = 1, len - n do                             -- windows before the last n tokens
            local hit = true
            for i = 0, n - 1 do
               if seq[start + i] ~= seq[len - n + 1 + i] then hit = false break end
            end
            if hit then return { unpack(seq, start + n, math.min(len, start + n + k - 1)) } end
         end
      end
      return {}
   end
   function src.kept() end
   function src.next_k(k) return k end
   return src
end

--- run(model, prompt, s) -> the generated ids (a list, prompt first). s: max_new, min_new, eos (an
-- id or a list, or nil), eos_ban ((1, vocab) bool or nil), on_token, kv_device, kv_dtype, and
-- either draft (a model) with num_assistant_tokens, or prompt_lookup_num_tokens with
-- max_matching_ngram_size; sampling ({temperature, top_k, top_p, min_p}: speculative sampling; nil:
-- greedy); penalty (repetition_penalty, or nil) and ban (generation.bans, or nil); stops
-- (models/stop_strings.lua, or nil); stats (a table that gets forwards, draft_forwards, proposed
-- and accepted counts).
function M.run(model, prompt, s)
   local L, max_new = #prompt, s.max_new
   local seq = { unpack(prompt) }
   local is_eos = {}
   for _, id in ipairs(type(s.eos) == "table" and s.eos or { s.eos }) do is_eos[id] = true end
   local stats = s.stats or {}
   stats.forwards, stats.draft_forwards, stats.proposed, stats.accepted = 0, 0, 0, 0
   -- (a round's forward ends with at most max_new - 1 new tokens cached)
   local cache = model:new_cache(L + max_new, s.kv_device, s.kv_dtype)
   local source, k_next
   local sampling = s.sampling                                 -- {temperature, top_k, top_p}, or nil: greedy
   if s.draft then
      source, k_next = draft_source(s.draft, L + max_new, stats, sampling, s), s.num_assistant_tokens or 5
   else
      source, k_next = lookup_source(s.max_matching_ngram_size or 2), s.prompt_lookup_num_tokens
   end

   local finished = false
   local function emit(tok)                                   -- false once generation ends
      seq[#seq + 1] = tok
      local n = #seq - L
      if s.on_token and s.on_token({ tok }, n) == false then finished = true end
      if is_eos[tok] or n >= max_new or (s.stops and s.stops:hit(1, tok)) then finished = true end
      return not finished
   end

   local function uniform() return T.rand({ 1 }):item() end
   local logits = model(ids_tensor(prompt), { cache = cache, logits_to_keep = 1 })
   stats.forwards = stats.forwards + 1
   if max_new == 0 then return seq end
   local rows = processed(banned_rows(logits, s.eos_ban, s.min_new), s, seq, {})
   emit(sampling and draw(M.distributions(rows, sampling):select(1, 1)) or rows:argmax(2):item())
   while not finished do
      local n_new = #seq - L
      local k = math.min(k_next, max_new - n_new - 1)
      local proposal, q = {}, nil
      if k > 0 then proposal, q = source.propose(seq, k) end
      -- the model: the last token and the proposal in one forward, a pick after each
      local before = cache.length                              -- = #seq - 1
      local feed = { seq[#seq], unpack(proposal) }
      logits = model(ids_tensor(feed), { cache = cache, logits_to_keep = #feed })
      stats.forwards = stats.forwards + 1
      rows = processed(banned_rows(logits, s.eos_ban, s.min_new - n_new), s, seq, proposal)
      local accepted, after = 0, nil
      if sampling then
         accepted, after = M.speculative_pick(M.distributions(rows, sampling), q, proposal, uniform)
      else
         local mine = rows:argmax(2):tolist()
         while accepted < #proposal and mine[accepted + 1] == proposal[accepted + 1] do accepted = accepted + 1 end
         after = mine[accepted + 1]
      end
      stats.proposed, stats.accepted = stats.proposed + #proposal, stats.accepted + accepted
      -- keep the caches up to the last accepted token; the model's own next pick comes after it
      cache:crop(before + 1 + accepted)
      source.kept(before + 1 + accepted)
      for i = 1, accepted do
         if not emit(proposal[i]) then break end
      end
      if not finished then emit(after) end
      if #proposal > 0 then k_next = source.next_k(k_next, accepted, #proposal) end
   end
   return seq
end

return M
