--- A block schedule for the decoder layers of a causal language model (FlexGen's, for many
-- sequences sharing one weight stream): the batch is cut into blocks of micro_batch_size rows and
-- the prompt into chunks of prefill_chunk_size tokens, and each layer runs every block before the
-- next layer starts. A layer's weights are loaded once per forward (hooks.hold keeps offloaded
-- ones in place between blocks), while the activations held at once are those of one block:
-- a batch of 64 long prompts runs with the weight traffic of one forward and the activation
-- memory of a few sequences. Chunks of one row run in order, their keys and values going into the
-- cache first (a forward without a cache gets one of its own, freed layer by layer).
-- A forward of one token per row (a decoding step) runs whole: it holds little, and on the CPU
-- each block would cost one more pass over the weights in RAM (85 ms a step for 4 blocks of 8
-- rows of a 340 MB model instead of 52).
-- Results equal the unblocked forward up to the order of float sums.
local T = require("moonload.tensor")
local hooks = require("moonload.hooks")

local M = {}

--- check(opts, who[, level]): errors (at level, default 3: the caller's caller) unless
-- opts.micro_batch_size and opts.prefill_chunk_size are nil or integers >= 1.
function M.check(opts, who, level)
   for _, name in ipairs({ "micro_batch_size", "prefill_chunk_size" }) do
      local v = opts[name]
      if v ~= nil and (type(v) ~= "number" or v ~= math.floor(v) or v < 1) then
         error(string.format("%s: %s must be an integer >= 1, got %s", who, name, tostring(v)), level or 3)
      end
   end
end

--- plan(opts, x, cache, n_layers, who[, needs_cache]) -> a schedule for the hidden states x (B, L,
-- hidden), or nil when one block covers them or L is 1. opts: {micro_batch_size,
-- prefill_chunk_size} (either may be nil: whole batch, whole sequence). needs_cache: the layers
-- keep something per block in the cache (models/deepseek_sparse.lua), so a forward without one
-- gets one of its own even when the prompt is not cut into chunks.
function M.plan(opts, x, cache, n_layers, who, needs_cache)
   M.check(opts, who, 4)
   local rows, tokens = opts.micro_batch_size, opts.prefill_chunk_size
   local B, L = x:size(1), x:size(2)
   rows, tokens = math.min(rows or B, B), math.min(tokens or L, L)
   if L == 1 or (rows == B and tokens == L) then return nil end
   local own = false
   if cache == nil and (tokens < L or needs_cache) then
      cache = require("moonload.models.kv_cache").new(n_layers, L)
      own = true
   end
   return { rows = rows, tokens = tokens, cache = cache, own_cache = own }
end

-- Rows r .. r + nr - 1 and tokens t .. t + nt - 1 (1-based) of a rotary table: (L, D) shared by
-- the rows or (B, 1, L, D).
local function rotary_block(t, r, nr, tok, nt)
   if t == nil then return nil end
   if t:dim() == 4 then return t:narrow(1, r, nr):narrow(3, tok, nt) end
   return t:narrow(1, tok, nt)
end

-- A block's part of pad: rows r .. r + nr - 1 of the padding mask (B, past + L) up to key S; or
-- of an additive score bias (B or 1, H, L, past + L) (BLOOM's ALiBi), queries tok .. tok + nt - 1
-- over keys 1 .. S.
local function score_bias_block(pad, r, nr, tok, nt, S)
   if pad:dim() ~= 4 then return pad:narrow(1, r, nr):narrow(2, 1, S) end
   local rows = pad:size(1) == 1 and pad or pad:narrow(1, r, nr)
   return rows:narrow(3, tok, nt):narrow(4, 1, S)
end

--- call(schedule, i, layer, x, cache, pad[, cos, sin[, per_token]]) -> layer i's output (B, L,
-- hidden): the layer called as layer(x, [cos, sin,] cache, pad[, per_token]) on x whole (schedule
-- nil) or block by block. pad (B, past + L) bool, an additive score bias (B or 1, H, L, past + L),
-- or nil; cos, sin (L, D) or (B, 1, L, D), or nil for a layer without them; per_token (B, L, ...)
-- an input of the layer's own cut into blocks as x is (Gemma 4's per-layer inputs), or nil.
function M.call(s, i, layer, x, cache, pad, cos, sin, per_token)
   local rope = cos ~= nil
   if s == nil then
      if rope then return layer(x, cos, sin, cache, pad, per_token) end
      return layer(x, cache, pad, per_token)
   end
   cache = s.cache
   local B, L = x:size(1), x:size(2)
   local past = cache and cache.length or 0
   local out
   hooks.hold(layer, function()
      for tok = 1, L, s.tokens do
         local nt = math.min(s.tokens, L - tok + 1)
         for r = 1, B, s.rows do
            local nr = math.min(s.rows, B - r + 1)
            local xb = x:narrow(1, r, nr):narrow(2, tok, nt):contiguous()
            local cb = cache and cache:block(r, B, tok - 1)
            local pb = pad and score_bias_block(pad, r, nr, tok, nt, past + tok - 1 + nt)
            local y
            if rope then
               y = layer(xb, rotary_block(cos, r, nr, tok, nt), rotary_block(sin, r, nr, tok, nt), cb, pb,
                  per_token and per_token:narrow(1, r, nr):narrow(2, tok, nt))
            else
               y = layer(xb, cb, pb, per_token and per_token:narrow(1, r, nr):narrow(2, tok, nt))
            end
            -- (the layer's device: a hook may have moved the block)
            out = out or T.empty({ B, L, y:size(3) }, { dtype = y.dtype, device = y.device })
            out:narrow(1, r, nr):narrow(2, tok, nt):copy_(y)
         end
      end
   end)
   if s.own_cache then cache:drop_layer(i) end
   return out
end

return M
