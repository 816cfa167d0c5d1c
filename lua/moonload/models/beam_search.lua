--- Beam search (transformers' generate(num_beams = n)): each prompt keeps the n running
-- sequences of highest summed log-probability. A step scores every (beam, token) continuation,
-- keeps the best K = max(2, 1 + number of eos ids) * n of them, and splits them: those ending in
-- an eos id (or reaching the length limit) go to the prompt's n finished hypotheses, scored by
-- their summed log-probability / (new tokens ^ length_penalty); the n best of the others run on.
-- The loop ends when no running beam can beat the finished ones (early_stopping: true stops once
-- n have finished; false, the default, estimates the best score a running beam may still reach at
-- its current length; "never" at the longest length when length_penalty > 0), or at the limit.
-- This mirrors transformers' vectorised _beam_search (generation/utils.py) step for step: its
-- specs compare sequences and scores with transformers' on the fixture models.
--
-- The prompt runs once (B rows); the key-value cache is then copied out to B * n rows and, after
-- each step, its rows follow their beams (KVCache:reorder). With do_sample, the K continuations
-- are drawn without replacement from softmax(summed log-probabilities) after the temperature,
-- top_k, top_p and min_p warpers (transformers' beam sampling), through Gumbel keys: the K largest of
-- score + Gumbel noise are such a draw.
local T = require("moonload.tensor")
local common = require("moonload.models.common")

local M = {}

local WHO = "generate"
local NEG = -1e9                     -- transformers' "very large negative" score

-- Options beam search does not take, with how its errors name them.
local UNSUPPORTED = {
   on_token = "on_token (tokens are only final once the search ends)",
   stop_strings = "stop_strings",
   assistant_model = "assistant_model", prompt_lookup_num_tokens = "prompt_lookup_num_tokens",
}

--- check(opts): errors for options beam search cannot take, and for inconsistent beam counts
-- (generate has checked each option's type).
function M.check(opts)
   local n = opts.num_beams
   for k, what in pairs(UNSUPPORTED) do
      if opts[k] ~= nil then error(string.format("%s: num_beams = %d does not support %s", WHO, n, what), 4) end
   end
   local r = opts.num_return_sequences or 1
   if r > n then
      error(string.format("%s: num_return_sequences (%d) must not exceed num_beams (%d)", WHO, r, n), 4)
   end
end

--- The K continuations of each prompt (B, n * V scores): values and 0-based flat indices as Lua
-- lists, best first. Sampling draws them without replacement (Gumbel keys), then sorts them by
-- score as transformers does.
local function top_continuations(acc, K, sampling)
   if not sampling then
      local v, i = acc:topk(K, 2)
      return v:tolist(), i:tolist()
   end
   local u = T.rand(acc.shape, { device = acc.device })
   local _, i = (acc - (-u:log()):log()):topk(K, 2)
   local vals, idx = acc:gather(2, i):tolist(), i:tolist()
   for b = 1, #vals do
      local order = {}
      for j = 1, K do order[j] = j end
      table.sort(order, function(x, y)
         if vals[b][x] ~= vals[b][y] then return vals[b][x] > vals[b][y] end
         return x < y
      end)
      local v, ix = {}, {}
      for j, o in ipairs(order) do v[j], ix[j] = vals[b][o], idx[b][o] end
      vals[b], idx[b] = v, ix
   end
   return vals, idx
end

--- Indices 1..#keys ordered by key, largest first (ties: the earlier first), the first n.
local function best(keys, n)
   local order = {}
   for j = 1, #keys do order[j] = j end
   table.sort(order, function(x, y)
      if keys[x] ~= keys[y] then return keys[x] > keys[y] end
      return x < y
   end)
   for j = #order, n + 1, -1 do order[j] = nil end
   return order
end

local function appended(list, v)
   local out = {}
   for i = 1, #list do out[i] = list[i] end
   out[#list + 1] = v
   return out
end

--- run(model, ids, o) -> int64 (B * num_return_sequences, T): each prompt followed by its best
-- hypotheses, best first; shorter ones padded. ids (B, L) int64. o: num_beams,
-- num_return_sequences, length_penalty, early_stopping, max_new, min_new, eos (nil, an id or a
-- list), pad, eos_ban ((1, V) bool or nil), mask ((B, L) bool or nil), penalty, ban
-- (generation.bans, or nil), forced ({forced_bos_token_id, forced_eos_token_id}), sampling
-- ({temperature, top_k, top_p, min_p} or nil), kv_device, kv_dtype, micro_batch, prefill_chunk.
function M.run(model, ids, o)
   local B, L = ids:size(1), ids:size(2)
   local nb, V = o.num_beams, model.config.output_vocab_size or model.config.vocab_size   -- (a pruned head's scores)
   local max_length = L + o.max_new
   local lp_exp = o.length_penalty or 1.0
   local early = o.early_stopping
   if early == nil then early = false end
   local eos = o.eos
   local eos_set = {}
   if type(eos) == "table" then for _, e in ipairs(eos) do eos_set[e] = true end
   elseif eos then eos_set[eos] = true end
   local n_eos = type(eos) == "table" and #eos or (eos and 1 or 0)
   local K = math.max(2, 1 + n_eos) * nb
   local N = B * nb
   local dev = ids.device

   -- every beam row's prompt (transformers' expanded input ids), and its padding mask
   local expand = {}
   for b = 0, B - 1 do for _ = 1, nb do expand[#expand + 1] = b end end
   local expand_idx = T.tensor(expand, { dtype = "int64", device = dev })
   local prompts = ids:index_select(1, expand_idx)
   local mask
   if o.mask then
      mask = T.ones({ N, max_length }, { dtype = "int64", device = dev })
      mask:narrow(2, 1, L):copy_(o.mask:to(dev):index_select(1, expand_idx))
   end
   local cache = model:new_cache(max_length, o.kv_device, o.kv_dtype)
   local function step_opts(len, new, rows)
      local so = { cache = cache, logits_to_keep = 1, _ids_in_range = len > L,
         micro_batch_size = o.micro_batch, prefill_chunk_size = o.prefill_chunk }
      if mask then
         local m = mask:narrow(2, 1, len)
         if rows then m = m:index_select(1, rows) end
         so.attention_mask = m
         so.position_ids = common.positions_from_mask(m, new)
      end
      return so
   end
   -- the prompt once per batch row (its first beam's mask row), its cache and logits then
   -- copied to the row's beams
   local first_rows = {}
   for b = 0, B - 1 do first_rows[b + 1] = b * nb end
   local logits = model(ids, step_opts(L, L, mask and T.tensor(first_rows, { dtype = "int64", device = dev }) or nil))
   cache:reorder(expand)
   logits = logits:index_select(1, expand_idx:to(logits.device))

   -- running and finished hypotheses per prompt: generated ids (Lua lists) and scores
   local run_seq, run_score, fin_seq, fin_score, fin_done, unsatisfied = {}, {}, {}, {}, {}, {}
   for b = 1, B do
      run_seq[b], run_score[b], fin_seq[b], fin_score[b], fin_done[b] = {}, {}, {}, {}, {}
      for j = 1, nb do
         run_seq[b][j], run_score[b][j] = {}, j == 1 and 0 or NEG   -- only the first beam starts
         fin_seq[b][j], fin_score[b][j], fin_done[b][j] = {}, NEG, false
      end
      unsatisfied[b] = true
   end
   local generation = require("moonload.models.generation")
   local prompt_rows = o.ban and prompts:tolist() or nil
   local seen, vocab_ids
   if o.penalty then
      vocab_ids = T.arange(V):view(1, V)
      seen = generation.seen_mask(prompts, V)
   end

   local cur = L
   while true do
      local step = cur - L + 1
      local lp = logits:select(2, -1):to("float32"):to("cpu"):log_softmax(2)       -- (N, V)
      if o.eos_ban and step <= o.min_new then lp = lp:masked_fill(o.eos_ban, -math.huge) end
      if seen then lp = generation.penalize(lp, seen, o.penalty) end   -- (on log-probabilities, as transformers)
      if prompt_rows then
         local rows, pl = {}, prompt_rows
         for b = 1, B do
            for j = 1, nb do
               local r = {}
               for i, t in ipairs(pl[(b - 1) * nb + j]) do r[i] = t end
               for _, t in ipairs(run_seq[b][j]) do r[#r + 1] = t end
               rows[#rows + 1] = r
            end
         end
         lp = o.ban(lp, rows)
      end
      local forced = o.forced and generation.forced_token(o.forced, cur, max_length)
      if forced then lp = generation.force_token(lp, forced) end
      if o.sampling then lp = require("moonload.models.sampling").warp(lp, o.sampling) end
      local scores = {}
      for b = 1, B do for j = 1, nb do scores[#scores + 1] = run_score[b][j] end end
      local acc = (lp + T.tensor(scores, { dtype = "float32" }):view(N, 1)):view(B, nb * V)
      local vals, idx = top_continuations(acc, K, o.sampling)

      local at_limit = cur + 1 >= max_length
      local denom = (cur + 1 - L) ^ lp_exp
      local all_hit, src, next_tok = true, {}, {}
      for b = 1, B do
         -- candidate j continues beam cand_beam[j] with token cand_tok[j]
         local cand_seq, cand_beam, cand_tok, cand_hit, cand_score, running_key = {}, {}, {}, {}, {}, {}
         for j = 1, K do
            local flat = idx[b][j]
            cand_beam[j], cand_tok[j] = math.floor(flat / V) + 1, flat % V
            cand_seq[j] = appended(run_seq[b][cand_beam[j]], cand_tok[j])
            cand_hit[j] = at_limit or eos_set[cand_tok[j]] == true
            cand_score[j] = vals[b][j]
            running_key[j] = vals[b][j] + (cand_hit[j] and NEG or 0)
            all_hit = all_hit and cand_hit[j]
         end
         -- the n best continuations that did not finish run on
         local new_seq, new_score = {}, {}
         for i, j in ipairs(best(running_key, nb)) do
            new_seq[i], new_score[i] = cand_seq[j], running_key[j]
            src[#src + 1] = (b - 1) * nb + cand_beam[j] - 1
            next_tok[#next_tok + 1] = cand_tok[j]
         end
         -- the finished ones among the first n candidates join the finished hypotheses when they
         -- score better (never once the prompt is done: all n finished under early_stopping, or
         -- no running beam can improve on them)
         local all_done = true
         for j = 1, nb do all_done = all_done and fin_done[b][j] end
         local closed = (all_done and early == true) or not unsatisfied[b]
         local m_seq, m_score, m_done = {}, {}, {}
         for j = 1, nb do m_seq[j], m_score[j], m_done[j] = fin_seq[b][j], fin_score[b][j], fin_done[b][j] end
         for j = 1, K do
            local finished = cand_hit[j] and j <= nb
            local s = cand_score[j] / denom + (closed and NEG or 0) + (finished and 0 or NEG)
            m_seq[nb + j], m_score[nb + j], m_done[nb + j] = cand_seq[j], s, finished
         end
         local keep = best(m_score, nb)
         local f_seq, f_score, f_done = {}, {}, {}
         for i, j in ipairs(keep) do f_seq[i], f_score[i], f_done[i] = m_seq[j], m_score[j], m_done[j] end
         fin_seq[b], fin_score[b], fin_done[b] = f_seq, f_score, f_done
         run_seq[b], run_score[b] = new_seq, new_score
      end
      cur = cur + 1

      -- can a running beam still beat the worst finished hypothesis?
      local open = false
      for b = 1, B do
         if unsatisfied[b] then
            local len = (early == "never" and lp_exp > 0) and (max_length - L) or (cur - L)
            local best_running = run_score[b][1] / len ^ lp_exp
            local worst = math.huge
            for j = 1, nb do worst = math.min(worst, fin_score[b][j]) end
            local any = false
            for j = 1, nb do any = any or best_running > (fin_done[b][j] and worst or NEG) end
            unsatisfied[b] = any
         end
         open = open or unsatisfied[b]
      end
      local every_done = true
      for b = 1, B do for j = 1, nb do every_done = every_done and fin_done[b][j] end end
      if not open or (every_done and early == true) or all_hit then break end

      -- the rows of the cache (and the seen tokens) follow their beams; the new tokens go in
      cache:reorder(src)
      local tok = T.tensor(next_tok, { dtype = "int64" }):view(N, 1)
      if seen then
         seen = seen:index_select(1, T.tensor(src, { dtype = "int64" }))
            :logical_or(vocab_ids:eq(tok))
      end
      local restart = model.recompute_cache_at and model:recompute_cache_at() or nil
      if restart and L < restart and cur == restart then
         -- (LongRoPE: the cache is rebuilt over the whole sequences, as generate does)
         local rows = {}
         local pl = prompts:tolist()
         for b = 1, B do
            for j = 1, nb do
               local row = pl[(b - 1) * nb + j]
               for _, t in ipairs(run_seq[b][j]) do row[#row + 1] = t end
               rows[#rows + 1] = row
            end
         end
         cache = model:new_cache(max_length, o.kv_device, o.kv_dtype)
         logits = model(T.tensor(rows, { dtype = "int64", device = dev }), step_opts(cur, cur))
      else
         logits = model(tok:to(dev), step_opts(cur, 1))
      end
   end

   -- each prompt's best hypotheses, padded to the longest returned (transformers fills with
   -- pad_token_id, or the first eos id when that is 0 or unset)
   local R = o.num_return_sequences or 1
   local longest = 0
   for b = 1, B do for j = 1, R do longest = math.max(longest, #fin_seq[b][j]) end end
   local first_eos = type(eos) == "table" and eos[1] or eos
   local fill = eos ~= nil and ((o.pad ~= nil and o.pad ~= 0) and o.pad or first_eos) or -1
   local pl, rows, out_scores = ids:tolist(), {}, {}
   for b = 1, B do
      for j = 1, R do
         local row = {}
         for i = 1, L do row[i] = pl[b][i] end
         local gen = fin_seq[b][j]
         for i = 1, longest do row[L + i] = gen[i] or fill end
         rows[#rows + 1] = row
         out_scores[#out_scores + 1] = fin_score[b][j]
      end
   end
   return T.tensor(rows, { dtype = "int64", device = dev }), out_scores
end

return M
