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
--
-- With dtype "int8" (llama.cpp's -ctk/-ctv q8_0, FlexGen's compressed cache) keys and values are
-- stored as int8 with a float32 scale per block of up to 32 values along the head dim (1.125
-- bytes a value where bfloat16 takes 2 and float32 4); update hands out int8 views carrying their
-- scales, and attention reads the int8 bytes (ml_sdpa_q8) for a few query rows (decoding), or
-- dequantizes one layer's keys and values into floats for a longer input (Cache.floats).
--
-- A layer without keys and values (Qwen3-Next's linear attention) keeps a state of fixed size
-- instead (layer_state): named tensors, a row per sequence, that the layer updates in place
-- each forward. Such a state cannot go back to an earlier length (can_crop says no), but
-- reorders with the rows.
local T = require("moonload.tensor")

local Cache = {}
Cache.__index = Cache
Cache.__name = "KVCache"

Cache.DTYPES = { int8 = true }

--- new(n_layers[, capacity[, device[, dtype]]]) -> an empty cache (length 0). With a device, the
-- keys and values are kept there whatever device computes them (llama.cpp's -nkvo: a long
-- context's cache in host memory while the layers run on a GPU), and attention runs there
-- (models/common.lua). dtype "int8" stores them quantized (nil: as computed).
function Cache.new(n_layers, capacity, device, dtype)
   if dtype ~= nil and not Cache.DTYPES[dtype] then
      error(string.format('KVCache: dtype must be "int8" or nil (the computing dtype), got %s', tostring(dtype)), 2)
   end
   -- start[i]: the position of the key in slot 1 of layer i's buffers; ks, vs: int8 scales
   return setmetatable({ n_layers = n_layers, length = 0, capacity = capacity or 0, device = device, dtype = dtype,
      k = {}, v = {}, ks = {}, vs = {}, start = {}, window = {}, states = {}, joint = {}, kv = {}, companions = {} },
      Cache)
end

--- The values per scale of an int8 cache for head dim D: the largest width up to 32 dividing D.
function Cache.q8_block(D)
   for b = math.min(32, D), 1, -1 do
      if D % b == 0 then return b end
   end
end

--- Bytes one cached value takes: int8 and its share of a scale, or the computing dtype's size el.
function Cache.value_bytes(dtype, head_dim, el)
   if dtype == "int8" then return 1 + 4 / Cache.q8_block(head_dim) end
   return el
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

--- join(i): layer i's keys and values (same heads and length, widths Dk and Dv) are kept side by
-- side in one buffer (B, H, capacity, Dk + Dv), which update then also returns as a third view:
-- DeepSeek's absorbed attention attends over [latent, rotary key] as one key without
-- concatenating its cache each step. (An int8 cache, or rows reordered to another count, keep
-- them apart; update then returns no third view.) Call before the layer's first update.
function Cache:join(i)
   if self.dtype ~= "int8" and self.k[i] == nil then self.joint[i] = true end
end

-- Layer i's key and value buffers as views of one joint buffer of capacity cap, the used slots of
-- the old ones (if any) copied in.
local function joint_buffers(self, i, k, v, rows, cap, used)
   local s = k.shape
   s[1], s[3], s[4] = rows, cap, k:size(4) + v:size(4)
   local kv = T.empty(s, { dtype = k.dtype, device = k.device })
   local kb, vb = kv:narrow(4, 1, k:size(4)), kv:narrow(4, k:size(4) + 1, v:size(4))
   if used > 0 then
      kb:narrow(3, 1, used):copy_(self.k[i]:narrow(3, 1, used))
      vb:narrow(3, 1, used):copy_(self.v[i]:narrow(3, 1, used))
   end
   self.kv[i] = kv
   return kb, vb
end

--- Appends this step's k, v (B, H, L, D) for layer i (1-based) after the `length` tokens cached
-- and returns views of the keys and values its queries may see (B, H, S, D): all length + L,
-- or with a window, the last min(length + L, window - 1 + L); for a joined layer (join) a third
-- view, of both side by side. block (from Cache:block): k and v are rows first_row .. of a batch
-- of block.batch rows and come block.offset tokens after `length`; the views returned are of those
-- rows.
function Cache:update(i, k, v, window, block)
   local offset, row, rows = 0, 1, k:size(1)
   if block then offset, row, rows = block.offset, block.first_row, block.batch end
   if self.device and k.device ~= self.device then k, v = k:to(self.device), v:to(self.device) end
   local past, L = self.length + offset, k:size(3)
   local need = past + L
   local keep_from = window and math.max(0, past - window + 1) or 0   -- oldest position still seen
   -- the buffers: keys and values, and with int8 their scales
   local bufs = { self.k[i], self.v[i], self.ks[i], self.vs[i] }
   local start = self.start[i] or 0
   if bufs[1] == nil and self.joint[i] then
      bufs[1], bufs[2] = joint_buffers(self, i, k, v, rows, Cache.layer_capacity(math.max(self.capacity, need), need, window), 0)
   elseif bufs[1] == nil then
      local cap = Cache.layer_capacity(math.max(self.capacity, need), need, window)
      for j, x in ipairs({ k, v }) do
         local s = x.shape
         s[1], s[3] = rows, cap
         if self.dtype == "int8" then
            bufs[j] = T.empty(s, { dtype = "int8", device = x.device })
            s[4] = s[4] / Cache.q8_block(s[4])
            bufs[j + 2] = T.empty(s, { dtype = "float32", device = x.device })
         else
            bufs[j] = T.empty(s, { dtype = x.dtype, device = x.device })
         end
      end
   elseif past - start + L > bufs[1]:size(3) then
      -- (all rows at once: the first block of a step makes room for the others)
      if keep_from > start then                                        -- drop what no query sees
         for _, b in ipairs(bufs) do slide(b, keep_from - start + 1, past - keep_from) end
         start = keep_from
      end
      local used = past - start
      if used + L > bufs[1]:size(3) then
         local cap = math.max(used + L, 2 * bufs[1]:size(3))
         if window then cap = used + L + 2 * window end
         if self.kv[i] then
            bufs[1], bufs[2] = joint_buffers(self, i, k, v, rows, cap, used)
         else
            for j, b in ipairs(bufs) do bufs[j] = grow(b, used, cap) end
         end
      end
   end
   self.k[i], self.v[i], self.ks[i], self.vs[i], self.start[i] = bufs[1], bufs[2], bufs[3], bufs[4], start
   self.window[i] = window
   local used = past - start
   local first = keep_from - start + 1
   local seen = {}
   for j, b in ipairs(bufs) do
      if block then b = b:narrow(1, row, k:size(1)) end
      bufs[j] = b
      seen[j] = b:narrow(3, first, need - keep_from)
   end
   if self.dtype ~= "int8" then
      bufs[1]:narrow(3, used + 1, L):copy_(k)
      bufs[2]:narrow(3, used + 1, L):copy_(v)
      local kv = self.kv[i]
      if kv then
         if block then kv = kv:narrow(1, row, k:size(1)) end
         return seen[1], seen[2], kv:narrow(3, first, need - keep_from)
      end
      return seen[1], seen[2]
   end
   local F = require("moonload.nn.functional")
   for j, x in ipairs({ k, v }) do
      if not (x.dtype == "float32" or x.dtype == "bfloat16" or x.dtype == "float16") then
         error(string.format("KVCache: an int8 cache holds float32, float16 or bfloat16 keys and values, got %s", x.dtype), 3)
      end
      F.quantize_q8_into(x, bufs[j]:narrow(3, used + 1, L), bufs[j + 2]:narrow(3, used + 1, L))
   end
   -- int8 views carrying their scales: attention reads them as they are (models/common.lua)
   rawset(seen[1], "_q8_scales", seen[3])
   rawset(seen[2], "_q8_scales", seen[4])
   return seen[1], seen[2]
end

--- Keys or values update returned as floats of dtype: t itself, or an int8 cache's dequantized.
function Cache.floats(t, dtype)
   local scales = rawget(t, "_q8_scales")
   if scales == nil then return t end
   return require("moonload.nn.functional").dequantize_q8(t, scales, dtype)
end

--- layer_state(i, rows, make) -> layer i's state: a table of tensors whose first dim is the row
-- (sequence), made by make(rows) on the layer's first forward, which the layer updates in place.
function Cache:layer_state(i, rows, make)
   local st = self.states[i]
   if st == nil then
      st = make(rows)
      self.states[i] = st
   end
   return st
end

-- A view of the cache for one block of a block schedule (models/block_schedule.lua): a layer's
-- attention sees `length` (the tokens before the block) and update, as with the whole cache.
local Block = {}
Block.__index = Block

function Block:update(i, k, v, window)
   return self.cache:update(i, k, v, window, self)
end

function Block:join(i) self.cache:join(i) end

--- The block's rows of layer i's state (the whole batch's is made on first use).
function Block:layer_state(i, rows, make)
   local st = self.cache:layer_state(i, self.batch, make)
   local view = {}
   for name, t in pairs(st) do view[name] = t:narrow(1, self.first_row, rows) end
   return view
end

--- block(first_row, batch, offset) -> the cache as seen by rows first_row.. (1-based) of a batch
-- of `batch` rows for tokens starting `offset` after those cached.
function Cache:block(first_row, batch, offset)
   return setmetatable({ cache = self, first_row = first_row, batch = batch, offset = offset,
      length = self.length + offset }, Block)
end

--- What tells this block's rows and tokens apart from the other blocks of a forward: layers that
-- pass something to later layers (GLM-5's choice of keys) keep it per block under this key.
function Block:block_key()
   return self.first_row .. ":" .. self.offset
end

function Cache:block_key()
   return "whole"
end

--- companion(i, name) -> the key under which layer i keeps a second set of keys and values in
-- this cache (DeepSeek Sparse Attention's indexer keys: update, join, crop, reorder apply to it
-- as to a layer); drop_layer(i) drops it with the layer.
function Cache:companion(i, name)
   local key = name .. ":" .. i
   self.companions[i] = self.companions[i] or {}
   self.companions[i][key] = true
   return key
end

function Block:companion(i, name) return self.cache:companion(i, name) end

--- Frees layer i's buffers and its companions' (a forward's own cache, once the layer is done).
function Cache:drop_layer(i)
   for key in pairs(self.companions[i] or {}) do self:drop_layer(key) end
   self.companions[i] = nil
   self.k[i], self.v[i], self.ks[i], self.vs[i], self.start[i], self.window[i] = nil, nil, nil, nil, nil, nil
   self.states[i], self.kv[i] = nil, nil
end

--- Bytes the cache's buffers hold now (keys, values and int8 scales, every layer; the layers'
-- states).
function Cache:nbytes()
   local n = 0
   for _, list in ipairs({ self.k, self.v, self.ks, self.vs }) do
      for _, b in pairs(list) do n = n + b:nbytes() end
   end
   for _, st in pairs(self.states) do
      for _, t in pairs(st) do n = n + t:nbytes() end
   end
   return n
end

--- can_crop(n) -> whether crop(n) can keep every key the tokens from n on may see: a
-- sliding-window layer lets go of keys older than its window, so it can go back only to a
-- length whose window it still holds; a layer's state (linear attention) cannot go back at all.
function Cache:can_crop(n)
   if type(n) ~= "number" or n ~= math.floor(n) or n < 0 or n > self.length then return false end
   if n < self.length then
      for i in pairs(self.states) do return false, i end
   end
   for i, start in pairs(self.start) do
      local window = self.window[i]
      if start > 0 and window and start > math.max(0, n - window + 1) then return false, i end
   end
   return true
end

--- crop(n): forgets the tokens after the first n (assisted generation drops the draft tokens the
-- model did not accept); the next forward writes over their slots.
function Cache:crop(n)
   if type(n) ~= "number" or n ~= math.floor(n) or n < 0 or n > self.length then
      error(string.format("KVCache: crop to %s tokens, expected an integer in 0..%d (the length)", tostring(n), self.length), 2)
   end
   local ok, layer = self:can_crop(n)
   if not ok and self.states[layer] then
      error(string.format("KVCache: layer %d keeps a recurrent state (linear attention) that has seen all %d tokens: cannot crop it back to %d",
         layer, self.length, n), 2)
   end
   if not ok then
      error(string.format("KVCache: layer %d no longer holds the keys of its window before position %d: cannot crop it back to %d tokens",
         layer, self.start[layer], n), 2)
   end
   self.length = n
end

--- reorder(rows): row i of the cache becomes the old row rows[i] (a Lua list of 0-based rows,
-- of any length: beam search first copies each prompt's row out to its beams, then has rows
-- follow the beams they continue). When the row count stays, only the rows that change are
-- copied, and only the slots in use (their sources gathered first: a source may itself move).
function Cache:reorder(rows)
   if type(rows) ~= "table" or #rows == 0 then
      error("KVCache: reorder expects a non-empty Lua list of 0-based rows", 2)
   end
   local moved_to, moved_from = {}, {}
   for i, r in ipairs(rows) do
      if r ~= i - 1 then moved_to[#moved_to + 1], moved_from[#moved_from + 1] = i - 1, r end
   end
   local index = {}                                          -- per device: all rows, or the moved ones' sources
   local function on(list, device)
      local key = tostring(list) .. device
      if not index[key] then index[key] = T.tensor(list, { dtype = "int64" }):to(device) end
      return index[key]
   end
   for _, list in ipairs({ self.k, self.v, self.ks, self.vs }) do
      for i, b in pairs(list) do
         local used = self.length - (self.start[i] or 0)
         if #rows ~= b:size(1) then
            list[i] = b:index_select(1, on(rows, b.device))
            self.kv[i] = nil                                   -- (apart from here on)
         elseif #moved_to > 0 and used > 0 then
            local live = b:narrow(3, 1, used)
            local sources = live:index_select(1, on(moved_from, b.device))
            for k, dst in ipairs(moved_to) do live:narrow(1, dst + 1, 1):copy_(sources:narrow(1, k, 1)) end
         end
      end
   end
   for _, st in pairs(self.states) do
      for name, t in pairs(st) do
         if #rows ~= t:size(1) or #moved_to > 0 then st[name] = t:index_select(1, on(rows, t.device)) end
      end
   end
end

--- Called by the model once all layers have seen a step of L tokens.
function Cache:advance(L)
   self.length = self.length + L
end

function Cache:__tostring()
   return string.format("KVCache(layers=%d, length=%d%s)", self.n_layers, self.length,
      self.dtype and (", dtype=" .. self.dtype) or "")
end

return Cache
