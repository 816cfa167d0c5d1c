--- KVCache: the key-value cache of a causal language model during incremental decoding.
-- Per layer, keys and values live in buffers (B, H, capacity, D) that grow by doubling;
-- generate sizes them up front (prompt + max_new_tokens) so decoding never copies the past.
-- A model's attention calls cache:update(layer, k, v) with this step's keys and values and
-- gets views of everything cached so far; the model calls cache:advance(T) once per forward.
local T = require("moonload.tensor")

local Cache = {}
Cache.__index = Cache
Cache.__name = "KVCache"

--- new(n_layers[, capacity]) -> an empty cache (length 0).
function Cache.new(n_layers, capacity)
   return setmetatable({ n_layers = n_layers, length = 0, capacity = capacity or 0, k = {}, v = {} }, Cache)
end

local function grow(buf, used, cap)
   local s = buf.shape
   s[3] = cap
   local nb = T.empty(s, { dtype = buf.dtype, device = buf.device })
   if used > 0 then nb:narrow(3, 1, used):copy_(buf:narrow(3, 1, used)) end
   return nb
end

--- Appends this step's k, v (B, H, L, D) for layer i (1-based) at position `length` and returns
-- views of all cached keys and values (B, H, length + L, D).
function Cache:update(i, k, v)
   local past, L = self.length, k:size(3)
   local need = past + L
   local kb, vb = self.k[i], self.v[i]
   if kb == nil then
      local cap = math.max(self.capacity, need)
      local sk, sv = k.shape, v.shape
      sk[3], sv[3] = cap, cap
      kb = T.empty(sk, { dtype = k.dtype, device = k.device })
      vb = T.empty(sv, { dtype = v.dtype, device = v.device })
   elseif kb:size(3) < need then
      local cap = math.max(need, 2 * kb:size(3))
      kb, vb = grow(kb, past, cap), grow(vb, past, cap)
   end
   self.k[i], self.v[i] = kb, vb
   kb:narrow(3, past + 1, L):copy_(k)
   vb:narrow(3, past + 1, L):copy_(v)
   return kb:narrow(3, 1, need), vb:narrow(3, 1, need)
end

--- Called by the model once all layers have seen a step of L tokens.
function Cache:advance(L)
   self.length = self.length + L
end

function Cache:__tostring()
   return string.format("KVCache(layers=%d, length=%d)", self.n_layers, self.length)
end

return Cache
