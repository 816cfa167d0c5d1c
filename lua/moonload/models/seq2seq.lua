--- What encoder-decoder models (T5, BART) share: reading the input and the decoder's ids, the
-- forward over both, and generate. generate runs the encoder once, then the shared generate
-- loop (models/generation.lua: greedy, sampling, beams, penalties) over a view of the decoder as
-- a causal model; the view's encoder states and per-layer cross-attention keys/values follow the
-- loop's rows (beams, num_return_sequences) by copying each prompt's once.
--
-- A model plugs in with config (vocab_size, decoder_start_token_id), and methods
-- _encode(ids, pad) -> states (B, S, d); _decode(ids, enc, enc_pad, memo, cache, logits_to_keep)
-- -> logits (B, T or n, vocab), advancing the cache (memo: a table where the cross-attention
-- keeps its keys and values per layer, or nil); _decoder_layers() -> the decoder's layer count;
-- and optionally _decoder_positions() -> how many decoder positions it has.
local T = require("moonload.tensor")
local common = require("moonload.models.common")

local M = {}

-- generate options the decoder view cannot take, as the errors name them
local UNSUPPORTED = { micro_batch_size = "a block schedule", prefill_chunk_size = "a block schedule",
   assistant_model = "assistant_model", prompt_lookup_num_tokens = "prompt_lookup_num_tokens" }

--- The input's ids (B, S) and padding mask (B, S bool, or nil) from opts.attention_mask.
function M.encoder_inputs(model, input_ids, opts, who)
   local ids = common.ids_tensor(input_ids, who)
   if not opts._ids_in_range then common.check_vocab(ids, model.config.vocab_size, who) end
   local pad
   if opts.attention_mask ~= nil then pad = common.mask_tensor(opts.attention_mask, ids:size(1), ids:size(2), who) end
   return ids, pad
end

--- The decoder's vocabulary size: config.decoder_vocab_size where the decoder has its own (Marian).
function M.decoder_vocab_size(model) return model.config.decoder_vocab_size or model.config.vocab_size end

--- The decoder's start: B rows of decoder_start_token_id, in the input's form ("flat", "nested",
-- "tensor").
local function start_ids(model, B, form, device)
   local rows = {}
   for b = 1, B do rows[b] = { model.config.decoder_start_token_id } end
   if form == "flat" then return rows[1] end
   if form == "tensor" then return T.tensor(rows, { dtype = "int64", device = device }) end
   return rows
end

--- forward(model, input_ids, opts, who) -> the decoder's logits over opts.decoder_input_ids (default:
-- the start token alone), after the encoder (skipped with opts.encoder_outputs).
function M.forward(model, input_ids, opts, who)
   opts = opts or {}
   local ids, pad = M.encoder_inputs(model, input_ids, opts, who)
   local enc = opts.encoder_outputs or model:_encode(ids, pad)
   local dec = common.ids_tensor(opts.decoder_input_ids or start_ids(model, ids:size(1), "nested"),
      who .. " (decoder_input_ids)")
   common.check_vocab(dec, M.decoder_vocab_size(model), who)
   if dec:size(1) ~= ids:size(1) then
      error(string.format("%s: decoder_input_ids has %d rows, input_ids %d", who, dec:size(1), ids:size(1)), 3)
   end
   return model:_decode(dec, enc, pad, nil, nil, opts.logits_to_keep)
end

--- k, v (B, H, S, D) with prefix's keys and values (1, H, P, D) before them (MVP's prompts; nil:
-- none), and P.
function M.with_prefix(k, v, prefix)
   if not prefix then return k, v, 0 end
   local B, H, P, D = k:size(1), k:size(2), prefix[1]:size(3), k:size(4)
   local function before(p, x) return T.cat({ p:to(x.device):to(x.dtype):expand(B, H, P, D), x }, 3) end
   return before(prefix[1], k), before(prefix[2], v), P
end

--- A padding mask (B, 1, 1, S) bool with P keys that every query sees before it.
function M.mask_with_prefix(mask, P)
   local B = mask:size(1)
   return T.cat({ T.ones({ B, 1, 1, P }, { dtype = "bool", device = mask.device }), mask }, 4)
end

--- Cross-attention of x (B, L, d) to the encoder's states enc (B, S, d) through the projections
-- q, k, v, o (H heads of D) with the given score scale; the keys and values are computed by the
-- first call for layer i and kept in memo (nil: computed each time); enc_mask (B, 1, 1, S) bool;
-- prefix: keys and values set before the encoder's (with_prefix), or nil.
function M.cross_attention(x, enc, enc_mask, memo, i, q_proj, k_proj, v_proj, o_proj, H, D, scale, prefix)
   local B, L = x:size(1), x:size(2)
   local q = q_proj(x):view(B, L, H, D):transpose(2, 3)
   local kv = memo and memo[i]
   if not kv or kv.k.device ~= q.device then
      local S = enc:size(2)
      kv = { k = k_proj(enc):view(B, S, H, D):transpose(2, 3), v = v_proj(enc):view(B, S, H, D):transpose(2, 3) }
      kv.k, kv.v = M.with_prefix(kv.k, kv.v, prefix)
      if memo then memo[i] = kv end
   end
   if enc_mask and enc_mask.device ~= q.device then enc_mask = enc_mask:to(q.device) end
   if enc_mask and prefix then enc_mask = M.mask_with_prefix(enc_mask, prefix[1]:size(3)) end
   local y = common.attention(q, kv.k, kv.v, enc_mask, false, scale)
   return o_proj(y:transpose(2, 3):reshape(B, L, H * D))
end

-- The decoder as generate's loop sees a causal model, over one call's encoder states.
local Decoder = {}
Decoder.__index = Decoder

local Memo = {}          -- (a class: hooks pass it through as it is)
Memo.__index = Memo

function Decoder:new_cache(capacity, device, dtype)
   return common.new_cache(self.model:_decoder_layers(), capacity, device, dtype)
end

function Decoder:max_length()
   return self.model._decoder_positions and self.model:_decoder_positions() or nil
end

function Decoder:__call(ids, opts)
   opts = opts or {}
   local N = ids:size(1)
   if not self.enc[N] then                        -- each prompt's states for its N / rows copies
      local idx, copies = {}, N / self.rows
      for b = 0, self.rows - 1 do for _ = 1, copies do idx[#idx + 1] = b end end
      local e = self.enc[self.rows]
      self.enc[N] = e:index_select(1, T.tensor(idx, { dtype = "int64", device = e.device }))
      local p = self.pad[self.rows]
      if p then self.pad[N] = p:index_select(1, T.tensor(idx, { dtype = "int64", device = p.device })) end
   end
   local cache = opts.cache
   local memo
   if cache then
      local per = self.memos[cache] or {}
      self.memos[cache] = per
      per[N] = per[N] or setmetatable({}, Memo)
      memo = per[N]
   end
   return self.model:_decode(ids, self.enc[N], self.pad[N], memo, cache, opts.logits_to_keep)
end

--- The n-grams of each prompt's input ids (rows: Lua lists, padding included, as transformers
-- takes them): for each, the ids that followed its first n - 1 (keyed "a,b").
local function ngrams(rows, n)
   local out = {}
   for b, seq in ipairs(rows) do
      local follow = {}
      for i = 1, #seq - n + 1 do
         local key = table.concat(seq, ",", i, i + n - 2)
         follow[key] = follow[key] or {}
         table.insert(follow[key], seq[i + n - 1])
      end
      out[b] = follow
   end
   return out
end

--- The view's ban_tokens (generate's hook) with encoder_no_repeat_ngram_size (transformers'
-- EncoderNoRepeatNGramLogitsProcessor, Blenderbot's 3): scores (N, vocab) with -inf at the ids
-- that would make a row's last n - 1 ids and it an n-gram of its prompt's input.
function Decoder:ban_encoder_ngrams(scores, rows)
   local n, out = self.encoder_ngram_size, nil
   local per = #rows / self.rows
   for r, seq in ipairs(rows) do
      if #seq >= n - 1 then
         local banned = self.encoder_ngrams[math.floor((r - 1) / per) + 1][table.concat(seq, ",", #seq - n + 2, #seq)]
         for _, id in ipairs(banned or {}) do
            out = out or scores:clone()
            out:select(1, r):narrow(1, id + 1, 1):fill_(-math.huge)
         end
      end
   end
   return out or scores
end

--- generate(model, input_ids, opts, name) -> the decoder's ids (its start token, then the new
-- ones) in the input's form, and with num_beams their scores. opts as the causal models'
-- generate (attention_mask masks the input's padding), plus decoder_input_ids to start from, and
-- encoder_no_repeat_ngram_size (default: the generation config's) = n: no n-gram of the input
-- in the output.
function M.generate(model, input_ids, opts, name)
   opts = opts or {}
   local who = "generate"
   if type(opts) ~= "table" then error(who .. ": options must be a table", 3) end
   for k, what in pairs(UNSUPPORTED) do
      if opts[k] ~= nil then error(string.format("%s: %s does not support %s", who, name, what), 3) end
   end
   local ids, pad = M.encoder_inputs(model, input_ids, opts, who)
   local _, form = common.ids_tensor(input_ids, who)
   local enc = model:_encode(ids, pad)
   local B = ids:size(1)
   local view = setmetatable({ model = model, enc = { [B] = enc }, pad = pad and { [B] = pad } or {}, rows = B,
      memos = setmetatable({}, { __mode = "k" }), config = { vocab_size = M.decoder_vocab_size(model) },
      generation_config = require("moonload.models.generation_config").of(model) }, Decoder)
   local n = opts.encoder_no_repeat_ngram_size
   if n == nil then n = view.generation_config.encoder_no_repeat_ngram_size or 0 end
   if type(n) ~= "number" or n < 0 or n ~= math.floor(n) then
      error(string.format("%s: encoder_no_repeat_ngram_size must be an integer >= 0, got %s", who, tostring(n)), 3)
   end
   if n > 0 then
      view.encoder_ngram_size, view.encoder_ngrams = n, ngrams(ids:tolist(), n)
      view.ban_tokens = Decoder.ban_encoder_ngrams
   end
   local rest = {}
   for k, v in pairs(opts) do
      if k ~= "attention_mask" and k ~= "decoder_input_ids" and k ~= "encoder_no_repeat_ngram_size" then rest[k] = v end
   end
   return require("moonload.models.generation").generate(view,
      opts.decoder_input_ids or start_ids(model, B, form, ids.device), rest)
end

return M
