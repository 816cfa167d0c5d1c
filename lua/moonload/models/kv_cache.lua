--- KVCache: the key-value cache of a causal language model during incremental decoding.
-- Per layer, keys and values live in buffers (B, H, capacity, D) that grow by doubling;
-- generate sizes them up front (prompt + max_new_tokens) so decoding never copies the past.
-- A model's attention calls cache:update(layer, k, v[, window]) with this step's keys and values
-- and gets views of everything its queries may see; the model calls cache:advance(T) once per
-- forward.
--
-- A sliding-window layer (window w: a query sees itself and the w - 1 keys before it) keeps only
-- what later queries can still see: its buffers hold at most the first forward's tokens + 2w, and
-- when full, the last w - 1 keys move to the front (keys are stored rotated, so their slots need
-- not follow their positions). A 32k-token generation with Mistral's 4096 window holds 8k + the
-- prompt per layer; Gemma 3's sliding layers (512) far less.
local T = require("moonload.tensor")

local Cache = {}
Cache.__index = Cache
Cache.__name = "KVCache"

--- new(n_layers[, capacity[, device]]) -> an empty cache (length 0). With a device, the keys and
-- values are kept there whatever device computes them (llama.cpp's -nkvo: a long context's cache
-- in host memory while the layers run on a GPU), and attention runs there (models/common.lua).
function Cache.new(n_layers, capacity, device)
   -- start[i]: the position of the key in slot 1 of layer i's buffers
   return setmetatable({ n_layers = n_layers, length = 0, capacity = capacity or 0, device = device,
      k = {}, v = {}, start = {} }, Cache)
end

local function grow(buf, used, cap)
   local s = buf.shape
   s[3] = cap
   local nb = T.empty(s, { dtype = buf.dtype, device = buf.device })
   if used > 0 then nb:narrow(3, 1, used):copy_(buf:narrow(3, 1, used)) end
   return nb
end

-- Moves slots from..from+n-1 to the front (through a copy: the ranges overlap).
local function slide(buf, from, n)
   if n > 0 then buf:narrow(3, 1, n):copy_(buf:narrow(3, from, n):clone()) end
end

--- The buffer length a layer needs for max_length tokens, the first forward bringing
-- first_tokens of them, with a sliding window (nil: none).
function Cache.layer_capacity(max_length, first_tokens, window)
   if not window then return max_length end
   return math.min(max_length, first_tokens + 2 * window)
end

--- Appends this step's k, v (B, H, L, D) for layer i (1-based) after the `length` tokens cached
-- and returns views of the keys and values its queries may see (B, H, S, D): all length + L,
-- or with a window, the last min(length + L, window - 1 + L). block (from Cache:block): k and v
-- are rows first_row .. of a batch of block.batch rows and come block.offset tokens after
-- `length`; the views returned are of those rows.
function Cache:update(i, k, v, window, block)
   local offset, row, rows = 0, 1, k:size(1)
   if block then offset, row, rows = block.offset, block.first_row, block.batch end
   if self.device and k.device ~= self.device then k, v = k:to(self.device), v:to(self.device) end
   local past, L = self.length + offset, k:size(3)
   local need = past + L
   local keep_from = window and math.max(0, past - window + 1) or 0   -- oldest position still seen
   local kb, vb = self.k[i], self.v[i]
   local start = self.start[i] or 0
   if kb == nil then
      local cap = Cache.layer_capacity(math.max(self.capacity, need), need, window)
      local sk, sv = k.shape, v.shape
      sk[1], sv[1], sk[3], sv[3] = rows, rows, cap, cap
      kb = T.empty(sk, { dtype = k.dtype, device = k.device })
      vb = T.empty(sv, { dtype = v.dtype, device = v.device })
   elseif past - start + L > kb:size(3) then
      -- (all rows at once: the first block of a step makes room for the others)
      if keep_from > start then                                        -- drop what no query sees
         slide(kb, keep_from - start + 1, past - keep_from)
         slide(vb, keep_from - start + 1, past - keep_from)
         start = keep_from
      end
      local used = past - start
      if used + L > kb:size(3) then
         local cap = math.max(used + L, 2 * kb:size(3))
         if window then cap = used + L + 2 * window end
         kb, vb = grow(kb, used, cap), grow(vb, used, cap)
      end
   end
   self.k[i], self.v[i], self.start[i] = kb, vb, start
   local used = past - start
   local kr, vr = kb, vb
   if block then kr, vr = kb:narrow(1, row, k:size(1)), vb:narrow(1, row, k:size(1)) end
   kr:narrow(3, used + 1, L):copy_(k)
   vr:narrow(3, used + 1, L):copy_(v)
   local first = keep_from - start + 1
   return kr:narrow(3, first, need - keep_from), vr:narrow(3, first, need - keep_from)
end

-- A view of the cache for one block of a block schedule (models/block_schedule.lua): a layer's
-- attention sees `length` (the tokens before the block) and update, as with the whole cache.
local Block = {}
Block.__index = Block

function Block:update(i, k, v, window)
   return self.cache:update(i, k, v, window, self)
end

--- block(first_row, batch, offset) -> the cache as seen by rows first_row.. (1-based) of a batch
-- of `batch` rows for tokens starting `offset` after those cached.
function Cache:block(first_row, batch, offset)
   return setmetatable({ cache = self, first_row = first_row, batch = batch, offset = offset,
      length = self.length + offset }, Block)
end

--- Frees layer i's buffers (a forward's own cache, once the layer is done).
function Cache:drop_layer(i)
   self.k[i], self.v[i], self.start[i] = nil, nil, nil
end

--- Called by the model once all layers have seen a step of L tokens.
function Cache:advance(L)
   self.length = self.length + L
end

function Cache:__tostring()
   return string.format("KVCache(layers=%d, length=%d)", self.n_layers, self.length)
end

return Cache
