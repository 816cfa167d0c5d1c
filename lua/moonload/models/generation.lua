--- The generate loop shared by causal language models (GPT-2, Llama).
-- Incremental decoding with a key-value cache: the prompt runs once (prefill), then each step
-- feeds only the newly chosen token. Greedy when temperature is 0 or absent; otherwise samples
-- from softmax(logits / temperature), restricted by top_k, top_p and min_p in transformers'
-- order (models/sampling.lua), reproducibly for a given seed.
--
-- A model plugs in by being callable as model(ids, {cache = c, logits_to_keep = n}) -> logits
-- (B, T or n, vocab) (advancing the cache), and by providing new_cache(capacity), max_length()
-- and config.vocab_size; optionally recompute_cache_at() -> a sequence length at which the cache
-- is thrown away and the whole sequence runs again (LongRoPE switching factors).
local T = require("moonload.tensor")
local C = require("moonload.C")
local common = require("moonload.models.common")
local log = require("moonload.utils.log")
local hooks = require("moonload.hooks")
local warpers = require("moonload.models.sampling")

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
   int_opt("min_new_tokens", 0)
   int_opt("max_length", 1)
   int_opt("min_length", 0)
   int_opt("num_assistant_tokens", 1)
   int_opt("prompt_lookup_num_tokens", 1)
   int_opt("max_matching_ngram_size", 1)
   int_opt("top_k", 1)
   int_opt("seed", 0)
   int_opt("num_beams", 1)
   int_opt("num_return_sequences", 1)
   int_opt("no_repeat_ngram_size", 0)
   int_opt("forced_bos_token_id", 0)
   int_opt("forced_eos_token_id", 0)
   int_opt("pad_token_id", 0)
   local eos = opts.eos_token_id
   if eos == false then
      -- (none: not even the model's generation config's)
   elseif type(eos) == "table" then
      if #eos == 0 then error(WHO .. ": eos_token_id must be an integer or a non-empty list of integers", 3) end
      for i, v in ipairs(eos) do
         if type(v) ~= "number" or v ~= math.floor(v) or v < 0 then
            error(string.format("%s: eos_token_id[%d] must be an integer >= 0, got %s", WHO, i, tostring(v)), 3)
         end
      end
   else
      int_opt("eos_token_id", 0)
   end
   local temp = opts.temperature
   if temp ~= nil and (type(temp) ~= "number" or temp < 0 or temp ~= temp) then
      error(string.format("%s: temperature must be a number >= 0, got %s", WHO, tostring(temp)), 3)
   end
   local top_p = opts.top_p
   if top_p ~= nil and (type(top_p) ~= "number" or not (top_p > 0 and top_p <= 1)) then
      error(string.format("%s: top_p must be a number in (0, 1], got %s", WHO, tostring(top_p)), 3)
   end
   local min_p = opts.min_p
   if min_p ~= nil and (type(min_p) ~= "number" or not (min_p >= 0 and min_p <= 1)) then
      error(string.format("%s: min_p must be a number in [0, 1], got %s", WHO, tostring(min_p)), 3)
   end
   local penalty = opts.repetition_penalty
   if penalty ~= nil and (type(penalty) ~= "number" or not (penalty > 0)) then
      error(string.format("%s: repetition_penalty must be a number > 0, got %s", WHO, tostring(penalty)), 3)
   end
   local lp = opts.length_penalty
   if lp ~= nil and (type(lp) ~= "number" or lp ~= lp or math.abs(lp) == math.huge) then
      error(string.format("%s: length_penalty must be a finite number, got %s", WHO, tostring(lp)), 3)
   end
   local early = opts.early_stopping
   if early ~= nil and type(early) ~= "boolean" and early ~= "never" then
      error(string.format('%s: early_stopping must be true, false or "never", got %s', WHO, tostring(early)), 3)
   end
   local bad = opts.bad_words_ids
   if bad ~= nil then
      if type(bad) ~= "table" or #bad == 0 then
         error(string.format("%s: bad_words_ids must be a non-empty list of lists of token ids, got %s", WHO,
            type(bad) == "table" and "an empty list" or tostring(bad)), 3)
      end
      for i, seq in ipairs(bad) do
         if type(seq) ~= "table" or #seq == 0 then
            error(string.format("%s: bad_words_ids[%d] must be a non-empty list of token ids, got %s", WHO, i, tostring(seq)), 3)
         end
         for j, id in ipairs(seq) do
            if type(id) ~= "number" or id ~= math.floor(id) or id < 0 then
               error(string.format("%s: bad_words_ids[%d][%d] must be an integer >= 0, got %s", WHO, i, j, tostring(id)), 3)
            end
         end
      end
   end
   local known = { max_new_tokens = true, min_new_tokens = true, max_length = true, min_length = true, bad_words_ids = true,
      assistant_model = true, num_assistant_tokens = true, assistant_stats = true, prompt_lookup_num_tokens = true,
      max_matching_ngram_size = true, stop_strings = true, tokenizer = true, temperature = true, top_k = true, top_p = true, min_p = true, seed = true,
      eos_token_id = true, pad_token_id = true, do_sample = true, attention_mask = true, repetition_penalty = true, on_token = true,
      num_beams = true, num_return_sequences = true, length_penalty = true, early_stopping = true,
      no_repeat_ngram_size = true, forced_bos_token_id = true, forced_eos_token_id = true,
      micro_batch_size = true, prefill_chunk_size = true, kv_cache_device = true, kv_cache_dtype = true }
   require("moonload.models.block_schedule").check(opts, WHO, 4)
   if opts.kv_cache_dtype ~= nil and not require("moonload.models.kv_cache").DTYPES[opts.kv_cache_dtype] then
      error(string.format('%s: kv_cache_dtype must be "int8" (or nil: the computing dtype), got %s', WHO,
         tostring(opts.kv_cache_dtype)), 4)
   end
   local d = hooks.norm_device(opts.kv_cache_device)
   if d ~= nil then
      T.parse_device(WHO .. ": kv_cache_device", d)
      local n = tonumber(d:match("^cuda:(%d+)$"))
      local count = n and C.lib.ml_cuda_device_count()
      if n and n >= count then
         error(string.format("%s: kv_cache_device %s does not exist (%d CUDA devices here)", WHO, d, count), 4)
      end
   end
   if opts.on_token ~= nil and type(opts.on_token) ~= "function" then
      error(string.format("%s: on_token must be a function, got %s", WHO, type(opts.on_token)), 3)
   end
   for k in pairs(opts) do
      if not known[k] then
         error(string.format('%s: unknown option "%s" (expected max_new_tokens, min_new_tokens, max_length, min_length, temperature, top_k, top_p, min_p, seed, do_sample, eos_token_id, pad_token_id, attention_mask, repetition_penalty, no_repeat_ngram_size, bad_words_ids, forced_bos_token_id, forced_eos_token_id, on_token, num_beams, num_return_sequences, length_penalty, early_stopping, micro_batch_size, prefill_chunk_size, kv_cache_device, kv_cache_dtype, assistant_model, num_assistant_tokens, assistant_stats, prompt_lookup_num_tokens, max_matching_ngram_size, stop_strings, tokenizer)',
            WHO, tostring(k)), 3)
      end
   end
   return opts
end

--- The tokens each row has seen, as a (B, vocab) bool mask, from the prompt ids (B, L): a tensor
-- or Lua lists (rows of any lengths). Ids past vocab (input-only ids a pruned head cannot score)
-- are left out.
function M.seen_mask(ids, vocab)
   local rows = {}
   for b, row in ipairs(T.is_tensor(ids) and ids:tolist() or ids) do
      local r = {}
      for v = 1, vocab do r[v] = false end
      for _, id in ipairs(row) do if id < vocab then r[id + 1] = true end end
      rows[b] = r
   end
   return T.tensor(rows, { dtype = "bool" })
end

--- transformers' RepetitionPenaltyLogitsProcessor: the logits of tokens already seen are divided
-- by the penalty where positive and multiplied by it where negative.
function M.penalize(logits, seen, penalty)
   local scaled = T.where(logits:lt(0), logits * penalty, logits / penalty)
   return T.where(seen, scaled, logits)
end

--- transformers' NoRepeatNGramLogitsProcessor: the ids that would complete, after seq (a Lua list
-- of ids, prompt included), an n-gram seq already holds (every id seq holds when n = 1).
function M.banned_ngram_tokens(seq, n)
   local len, banned = #seq, {}
   if len + 1 < n then return banned end
   local from = len - n + 1                         -- the last n - 1 ids start after it
   for i = 1, len - n + 1 do
      local match = true
      for k = 1, n - 1 do
         if seq[i + k - 1] ~= seq[from + k] then match = false break end
      end
      if match then banned[#banned + 1] = seq[i + n - 1] end
   end
   return banned
end

--- scores (B, vocab) with -inf at the ids each row may not repeat (rows: Lua lists of ids).
function M.ban_repeated_ngrams(scores, rows, n)
   local out
   for b, seq in ipairs(rows) do
      for _, id in ipairs(M.banned_ngram_tokens(seq, n)) do
         out = out or scores:clone()
         out:select(1, b):narrow(1, id + 1, 1):fill_(-math.huge)
      end
   end
   return out or scores
end

--- bad_words_ids (lists of ids no output may end with: transformers' NoBadWordsLogitsProcessor) as
-- {single = {ids banned everywhere}, sequences = {{prefix..., last}}}, or nil when none is left
-- once the lone end-of-sequence ids are dropped (transformers drops them, so a row can still end).
function M.bad_words(list, eos, vocab)
   if list == nil then return nil end
   local is_eos_id = {}
   for _, e in ipairs(type(eos) == "table" and eos or { eos }) do is_eos_id[e] = true end
   local single, sequences = {}, {}
   for i, seq in ipairs(list) do
      for _, id in ipairs(seq) do
         if id >= vocab then
            error(string.format("%s: bad_words_ids[%d] holds id %d, outside the vocabulary (%d ids)", WHO, i, id, vocab), 3)
         end
      end
      if #seq == 1 then
         if not is_eos_id[seq[1]] then single[#single + 1] = seq[1] end
      else
         sequences[#sequences + 1] = seq
      end
   end
   if #single == 0 and #sequences == 0 then return nil end
   return { single = single, sequences = sequences, masks = {} }
end

--- scores (N, vocab) with -inf at the ids each row may not take next under bad (M.bad_words):
-- the single ids always, a sequence's last id where the row ends with the rest of it.
function M.ban_bad_words(scores, rows, bad)
   if #bad.single > 0 then
      local dev = tostring(scores.device)
      local mask = bad.masks[dev]
      if not mask then
         local flags = {}
         for v = 1, scores:size(2) do flags[v] = false end
         for _, id in ipairs(bad.single) do flags[id + 1] = true end
         mask = T.tensor({ flags }, { dtype = "bool" }):to(scores.device)
         bad.masks[dev] = mask
      end
      scores = scores:masked_fill(mask, -math.huge)
   end
   local copied = false
   for b, row in ipairs(rows) do
      for _, seq in ipairs(bad.sequences) do
         local n, len, match = #seq - 1, #row, true
         if n > len then match = false end
         for k = 1, match and n or 0 do
            if row[len - n + k] ~= seq[k] then match = false break end
         end
         if match then
            if not copied then scores, copied = scores:clone(), true end
            scores:select(1, b):narrow(1, seq[#seq] + 1, 1):fill_(-math.huge)
         end
      end
   end
   return scores
end

--- generate's bans as one function ban(scores (N, vocab), rows (each row's ids, Lua lists)) ->
-- scores, in transformers' order: no_repeat_ngram_size (no_repeat: the n-gram size or nil), the
-- model's own ban_tokens hook (an encoder-decoder's encoder n-grams), bad_words_ids (bad_words:
-- M.bad_words or nil). nil when none applies, so callers skip gathering the rows.
function M.bans(model, no_repeat, bad_words)
   local hook = model.ban_tokens
   if not (no_repeat or hook or bad_words) then return nil end
   return function(scores, rows)
      if no_repeat then scores = M.ban_repeated_ngrams(scores, rows, no_repeat) end
      if hook then scores = hook(model, scores, rows) end
      if bad_words then scores = M.ban_bad_words(scores, rows, bad_words) end
      return scores
   end
end

--- scores (N, vocab) where only id may be picked (transformers' ForcedBOS/ForcedEOS processors:
-- the others -inf, id 0).
function M.force_token(scores, id)
   local out = scores:clone():fill_(-math.huge)
   out:narrow(2, id + 1, 1):fill_(0)
   return out
end

--- The id generate must pick next after `len` tokens of `max_length`, or nil: forced_bos_token_id
-- after the first token (an encoder-decoder's start), forced_eos_token_id as the last.
function M.forced_token(opts, len, max_length)
   if opts.forced_bos_token_id and len == 1 then return opts.forced_bos_token_id end
   if opts.forced_eos_token_id and len == max_length - 1 then return opts.forced_eos_token_id end
end

--- Whether each token (B, 1) is an end of sequence: eos is an id or a list of ids.
local function is_eos(tok, eos)
   if type(eos) ~= "table" then return tok:eq(eos) end
   local hit = tok:eq(eos[1])
   for i = 2, #eos do hit = hit:logical_or(tok:eq(eos[i])) end
   return hit
end

--- Returns the ids in the form they came in: a flat list for a flat list (batch 1), nested
-- lists for nested lists, an int64 tensor (B, T) for a tensor.
local function shape_output(seq, form)
   if form == "tensor" then return seq end
   local rows = seq:tolist()
   if form == "flat" and #rows == 1 then return rows[1] end
   return rows
end

--- model:generate(input_ids[, {max_new_tokens = 20, min_new_tokens = 0, temperature = 0, top_k, top_p, min_p, seed, do_sample,
-- eos_token_id, pad_token_id, attention_mask, repetition_penalty, on_token, micro_batch_size, prefill_chunk_size,
-- kv_cache_device, kv_cache_dtype, max_length, min_length, no_repeat_ngram_size, forced_bos_token_id,
-- forced_eos_token_id, assistant_model, num_assistant_tokens, assistant_stats,
-- prompt_lookup_num_tokens, max_matching_ngram_size, stop_strings, tokenizer, num_beams, num_return_sequences,
-- length_penalty, early_stopping}])
-- input_ids: 0-based token ids as a Lua list, a list of equal-length lists (batch), or an int64
-- tensor (B, T) / (T); prompts of different lengths are left-padded with attention_mask
-- (B, T) marking the real tokens with 1. Returns the prompt followed by the generated ids, in
-- the input's form. repetition_penalty (as transformers: > 1 discourages tokens already in the
-- sequence, prompt included) applies before sampling or the greedy pick, and so does
-- no_repeat_ngram_size = n (no n-gram of the sequence, prompt included, twice);
-- forced_bos_token_id is the token after the first (an encoder-decoder's start token) and
-- forced_eos_token_id the last one when generation reaches its length (BART's). on_token(ids, step) is
-- called with each step's new id per row (a list); returning false ends generation there.
-- max_length and min_length count the prompt too (transformers' lengths); max_new_tokens and
-- min_new_tokens win over them. assistant_model (one prompt, greedy) drafts tokens the model
-- checks several at a time, and prompt_lookup_num_tokens takes them from the sequence itself:
-- models/assisted_generation.lua. stop_strings (with tokenizer) ends a row with the token that
-- completes one of them in its new text (models/stop_strings.lua).
-- num_beams > 1 runs beam search (models/beam_search.lua; length_penalty, early_stopping) and
-- returns each prompt's best num_return_sequences hypotheses, then their scores as a second
-- result; without beams, num_return_sequences with sampling draws that many rows per prompt.
-- eos_token_id is an id or a list of ids (Llama 3, Qwen): a row that produced one is finished and
-- continues with pad_token_id (else the first eos id); generation stops when every row is.
-- Options left out come from the model's generation config (models/generation_config.lua:
-- generation_config.json, else config.json's token ids), as in transformers: the model's eos ids
-- end generation unless eos_token_id = false, and its do_sample, temperature, top_k and top_p
-- apply when the call sets neither temperature nor do_sample. micro_batch_size and
-- prefill_chunk_size run each forward in a block schedule (models/block_schedule.lua): each layer
-- takes that many rows and prompt tokens at a time, its weights loaded once for all of them; a
-- model planned with reserve_for uses the sizes given there unless these are set.
-- kv_cache_device ("cpu") keeps the key-value cache there whatever device runs the layers, and
-- runs attention there (llama.cpp's -nkvo: a context longer than the GPU holds).
-- kv_cache_dtype = "int8" stores the cache as int8 with a scale per block of the head dim
-- (models/kv_cache.lua): 1.125 bytes a value, for contexts that do not fit in floats.
-- bad_words_ids = {{id}, {id, id, ...}, ...}: no output ends with one of these (a single id is
-- never picked; the hub's Marian folders ban their pad token so); default: the generation config's.
-- A model with a method ban_tokens(scores (N, vocab), rows (each row's ids, Lua lists)) -> scores
-- bans more ids there, after no_repeat_ngram_size (an encoder-decoder's encoder n-grams:
-- models/seq2seq.lua).
function M.generate(model, input_ids, opts)
   opts = check_opts(require("moonload.models.generation_config").defaults(model, check_opts(opts)))
   local ids, form = common.ids_tensor(input_ids, WHO)
   common.check_vocab(ids, model.config.vocab_size, WHO)
   -- the scores' width: the vocabulary, or the first ids of it a pruned head keeps (Apertus 1.5)
   local vocab = model.config.output_vocab_size or model.config.vocab_size
   local B, L = ids:size(1), ids:size(2)
   -- max_new_tokens, else max_length (prompt included) as transformers counts it, else 20
   local limit = model:max_length()
   local max_new = opts.max_new_tokens
   if max_new == nil and opts.max_length then
      max_new = math.max(opts.max_length - L, 0)
      if max_new == 0 then
         log.warn(string.format("%s: max_length %d is not more than the prompt's %d tokens: nothing is generated (max_new_tokens counts new tokens only)",
            WHO, opts.max_length, L))
      end
   end
   max_new = max_new or 20
   if limit and L + max_new > limit then
      error(string.format("%s: prompt of %d tokens + max_new_tokens %d exceeds the model's %d positions",
         WHO, L, max_new, limit), 2)
   end
   local num_beams, num_return = opts.num_beams or 1, opts.num_return_sequences or 1
   local samples = opts.do_sample ~= false and (opts.temperature or 0) > 0
   if num_beams > 1 then
      require("moonload.models.beam_search").check(opts)
   elseif num_return > 1 then
      -- sampling draws num_return_sequences continuations of each prompt: its rows repeated
      if not samples then
         error(string.format("%s: num_return_sequences = %d needs sampling (do_sample with a temperature > 0) or num_beams >= %d: greedy decoding gives one sequence per prompt",
            WHO, num_return, num_return), 2)
      end
      local rows = {}
      for b = 0, B - 1 do for _ = 1, num_return do rows[#rows + 1] = b end end
      local idx = T.tensor(rows, { dtype = "int64", device = ids.device })
      if opts.attention_mask ~= nil then
         opts.attention_mask = common.mask_tensor(opts.attention_mask, B, L, WHO):index_select(1, idx:to("cpu"))
      end
      ids = ids:index_select(1, idx)
      B = B * num_return
      if form == "flat" then form = "nested" end
   end
   local stops = opts.stop_strings ~= nil and require("moonload.models.stop_strings").new(opts.stop_strings,
      opts.tokenizer, B, WHO, ids:tolist()) or nil
   if opts.assistant_model ~= nil or opts.prompt_lookup_num_tokens ~= nil then
      local assisted = require("moonload.models.assisted_generation")
      assisted.check(model, opts, B)
      local eos = opts.eos_token_id
      local min_new = opts.min_new_tokens or math.max((opts.min_length or 0) - L, 0)
      local eos_ban = eos and min_new > 0 and is_eos(T.arange(vocab):view(1, vocab), eos) or nil
      if opts.seed ~= nil then C.lib.ml_manual_seed(opts.seed) end
      local sampling
      if opts.do_sample ~= false and (opts.temperature or 0) > 0 then
         sampling = { temperature = opts.temperature, top_k = opts.top_k, top_p = opts.top_p, min_p = opts.min_p }
      end
      local seq = assisted.run(model, ids:tolist()[1], {
         sampling = sampling,
         max_new = max_new, min_new = min_new, eos = eos, eos_ban = eos_ban, on_token = opts.on_token,
         kv_device = hooks.norm_device(opts.kv_cache_device), kv_dtype = opts.kv_cache_dtype,
         draft = opts.assistant_model, num_assistant_tokens = opts.num_assistant_tokens,
         prompt_lookup_num_tokens = opts.prompt_lookup_num_tokens, max_matching_ngram_size = opts.max_matching_ngram_size,
         stops = stops, stats = opts.assistant_stats,
         penalty = opts.repetition_penalty ~= 1 and opts.repetition_penalty or nil,
         ban = M.bans(model, opts.no_repeat_ngram_size ~= 0 and opts.no_repeat_ngram_size or nil,
            M.bad_words(opts.bad_words_ids, eos, vocab)) })
      return shape_output(T.tensor({ seq }, { dtype = "int64" }), form)
   end
   -- A device map planned with reserve_for budgeted this much cache and activation memory.
   local planned = rawget(model, "reserved_for")
   if planned and (B * num_beams > planned.batch_size or L + max_new > planned.max_length or L > planned.prompt_length) then
      log.warn(string.format("%s: batch %d, prompt %d + max_new_tokens %d is more than the device map reserved memory for (reserve_for = {batch_size = %d, max_length = %d, prompt_length = %d}); a device may run out of memory",
         WHO, B * num_beams, L, max_new, planned.batch_size, planned.max_length, planned.prompt_length))
   end
   -- the block schedule asked for, else the one the plan budgeted activations for
   -- (and the device the plan kept the key-value cache on)
   local micro_batch, prefill_chunk = opts.micro_batch_size, opts.prefill_chunk_size
   local kv_device, kv_dtype = hooks.norm_device(opts.kv_cache_device), opts.kv_cache_dtype
   if planned then
      micro_batch = micro_batch or planned.micro_batch_size
      prefill_chunk = prefill_chunk or planned.prefill_chunk_size
      kv_device = kv_device or planned.kv_cache_device
      kv_dtype = kv_dtype or planned.kv_cache_dtype
   end
   local temperature = opts.temperature
   if opts.do_sample == false then temperature = 0 end
   if opts.seed ~= nil then C.lib.ml_manual_seed(opts.seed) end
   if max_new == 0 then return shape_output(ids, form) end
   local eos = opts.eos_token_id
   -- min_new_tokens: the eos ids cannot be picked before that many new tokens (transformers'
   -- MinNewTokensLengthLogitsProcessor)
   local min_new = opts.min_new_tokens or math.max((opts.min_length or 0) - L, 0)
   local penalty = opts.repetition_penalty
   if penalty == 1 then penalty = nil end
   local ban = M.bans(model, opts.no_repeat_ngram_size ~= 0 and opts.no_repeat_ngram_size or nil,
      M.bad_words(opts.bad_words_ids, eos, vocab))
   if num_beams > 1 then
      local seq, scores = require("moonload.models.beam_search").run(model, ids, {
         num_beams = num_beams, num_return_sequences = num_return, length_penalty = opts.length_penalty,
         early_stopping = opts.early_stopping, max_new = max_new, min_new = min_new, eos = eos,
         pad = opts.pad_token_id, penalty = penalty, ban = ban,
         forced = { forced_bos_token_id = opts.forced_bos_token_id, forced_eos_token_id = opts.forced_eos_token_id },
         eos_ban = eos and min_new > 0 and is_eos(T.arange(vocab):view(1, vocab), eos) or nil,
         mask = opts.attention_mask ~= nil and common.mask_tensor(opts.attention_mask, B, L, WHO) or nil,
         sampling = (temperature or 0) > 0 and { temperature = temperature, top_k = opts.top_k, top_p = opts.top_p,
            min_p = opts.min_p } or nil,
         kv_device = kv_device, kv_dtype = kv_dtype, micro_batch = micro_batch, prefill_chunk = prefill_chunk })
      return shape_output(seq, form), scores
   end

   local cache = model:new_cache(L + max_new, kv_device, kv_dtype)
   -- sequence length at which the cache must be rebuilt (LongRoPE), when the model has one
   local restart = model.recompute_cache_at and model:recompute_cache_at() or nil
   local dev = ids.device
   local out = T.empty({ B, L + max_new }, { dtype = "int64", device = dev })
   out:narrow(2, 1, L):copy_(ids)
   local done
   -- A padding mask (left padding for prompts of different lengths): generated tokens are
   -- real; positions count the real tokens before each one, as transformers' generate does.
   local mask
   if opts.attention_mask ~= nil then
      mask = T.ones({ B, L + max_new }, { dtype = "int64", device = dev })
      mask:narrow(2, 1, L):copy_(common.mask_tensor(opts.attention_mask, B, L, WHO))
   end
   local function step_opts(len, new)
      local o = { cache = cache, logits_to_keep = 1, _ids_in_range = len > L,      -- sampled tokens
         micro_batch_size = micro_batch, prefill_chunk_size = prefill_chunk }
      if mask then
         local m = mask:narrow(2, 1, len)
         o.attention_mask = m
         o.position_ids = common.positions_from_mask(m, new)
      end
      return o
   end
   local logits = model(ids, step_opts(L, L))                  -- (B, 1, vocab)
   local eos_ban
   if eos and min_new > 0 then                                 -- (1, vocab): which ids end a row
      eos_ban = is_eos(T.arange(vocab, { device = logits.device }):view(1, vocab), eos)
   end
   local draw = { temperature = temperature, top_k = opts.top_k, top_p = opts.top_p, min_p = opts.min_p }
   local seen, vocab_ids                                       -- on the logits' device, made once
   local history = ban and ids:tolist() or nil                -- each row's ids, for the bans
   local n = 0
   for step = 1, max_new do
      local last = logits:select(2, -1)                       -- (B, vocab)
      if eos_ban and step <= min_new then last = last:masked_fill(eos_ban, -math.huge) end
      if penalty then
         if not seen then
            seen = M.seen_mask(ids, vocab):to(last.device)
            vocab_ids = T.arange(vocab, { device = last.device }):view(1, vocab)
         end
         last = M.penalize(last, seen, penalty)
      end
      if ban then last = ban(last, history) end
      local forced = M.forced_token(opts, L + step - 1, L + max_new)
      if forced then last = M.force_token(last, forced) end
      local tok = warpers.pick(last, draw)                     -- (B, 1) int64
      if (eos or stops) and not done then done = T.zeros({ B, 1 }, { dtype = "bool", device = tok.device }) end
      if done then tok = T.where(done, opts.pad_token_id or (type(eos) == "table" and eos[1] or eos) or 0, tok) end
      out:narrow(2, L + step, 1):copy_(tok)
      n = step
      -- streaming: the new id of each row as it comes (a REPL prints them through a tokenizer);
      -- returning false stops here
      if opts.on_token and opts.on_token(tok:view(B):tolist(), step) == false then break end
      if penalty then seen = seen:logical_or(vocab_ids:eq(tok:to(vocab_ids.device))) end
      if history then
         for b, id in ipairs(tok:view(B):tolist()) do table.insert(history[b], id) end
      end
      if done then
         if eos then done = done:logical_or(is_eos(tok, eos)) end
         if stops then                                          -- rows whose new text now holds a stop string
            local ids, finished, hits = tok:view(B):tolist(), done:view(B):tolist(), {}
            for b = 1, B do hits[b] = { not finished[b] and stops:hit(b, ids[b]) } end
            done = done:logical_or(T.tensor(hits, { dtype = "bool" }):to(done.device))
         end
         if done:sum():item() == B then break end
      end
      if step < max_new then
         if restart and L < restart and L + step == restart then
            -- the positions just crossed into the model's long rotary factors: the cache holds keys
            -- rotated with the short ones, so the whole sequence runs again (transformers' Phi-3)
            cache = model:new_cache(L + max_new, kv_device, kv_dtype)
            logits = model(out:narrow(2, 1, L + step), step_opts(L + step, L + step))
         else
            logits = model(tok, step_opts(L + step, 1))
         end
      end
   end
   local seq = out:narrow(2, 1, L + n)
   if form ~= "tensor" then return shape_output(seq, form) end
   return seq:contiguous()
end

return M
