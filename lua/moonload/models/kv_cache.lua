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

--- new(n_layers[, capacity]) -> an empty cache (length 0).
function Cache.new(n_layers, capacity)
   -- start[i]: the position of the key in slot 1 of layer i's buffers
   return setmetatable({ n_layers = n_layers, length = 0, capacity = capacity or 0, k = {}, v = {}, start = {} }, Cache)
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
-- or with a window, the last min(length + L, window - 1 + L).
function Cache:update(i, k, v, window)
   local past, L = self.length, k:size(3)
   local need = past + L
   local keep_from = window and math.max(0, past - window + 1) or 0   -- oldest position still seen
   local kb, vb = self.k[i], self.v[i]
   local start = self.start[i] or 0
   if kb == nil then
      local cap = Cache.layer_capacity(math.max(self.capacity, need), need, window)
      local sk, sv = k.shape, v.shape
      sk[3], sv[3] = cap, cap
      kb = T.empty(sk, { dtype = k.dtype, device = k.device })
      vb = T.empty(sv, { dtype = v.dtype, device = v.device })
   elseif past - start + L > kb:size(3) then
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
   kb:narrow(3, used + 1, L):copy_(k)
   vb:narrow(3, used + 1, L):copy_(v)
   local first = keep_from - start + 1
   return kb:narrow(3, first, need - keep_from), vb:narrow(3, first, need - keep_from)
end

--- Called by the model once all layers have seen a step of L tokens.
function Cache:advance(L)
   self.length = self.length + L
end

function Cache:__tostring()
   return string.format("KVCache(layers=%d, length=%d)", self.n_layers, self.length)
end

return Cache
