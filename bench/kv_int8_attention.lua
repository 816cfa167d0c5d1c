--- One decoding step of attention (a query row per head) over a key-value cache of S keys, as an
-- int8 cache (kv_cache_dtype = "int8": ml_sdpa_q8 reads 1.125 bytes a value) against the same
-- cache in float32 and bfloat16, in moonload and in PyTorch (scaled_dot_product_attention,
-- bench/kv_int8_attention_peer.py, same run). Shapes B, Hq, Hk, S, E: Llama-3-like grouped heads
-- at 4k and 2k tokens, and the fit_context model's heads. Best of 5 each.
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local cjson = require("cjson")
local B = require("benchutil")
local F = ml.nn.F
local common = require("moonload.models.common")

local SHAPES = { { 1, 32, 8, 4096, 128 }, { 8, 32, 8, 2048, 128 }, { 32, 8, 8, 256, 64 } }

-- x as an int8 cache hands it out: int8 values carrying their scales (a block of 32)
local function int8_view(x)
   local q = ml.empty(x.shape, { dtype = "int8" })
   local sshape = x.shape
   sshape[4] = x:size(4) / 32
   local s = ml.empty(sshape)
   F.quantize_q8_into(x, q, s)
   rawset(q, "_q8_scales", s)
   return q
end

local rows, keys = {}, {}
for _, c in ipairs(SHAPES) do
   local b, hq, hk, S, E = unpack(c)
   local q, k, v = ml.randn(b, hq, 1, E), ml.randn(b, hk, S, E), ml.randn(b, hk, S, E)
   local k8, v8 = int8_view(k), int8_view(v)
   local qb, kb, vb = q:to("bfloat16"), k:to("bfloat16"), v:to("bfloat16")
   local key = table.concat(c, ",")
   keys[#keys + 1] = key
   rows[#rows + 1] = {
      shape = key,
      float32_s = B.best(5, function() return common.attention(q, k, v, nil, false) end),
      bfloat16_s = B.best(5, function() return common.attention(qb, kb, vb, nil, false) end),
      int8_s = B.best(5, function() return common.attention(q, k8, v8, nil, false) end),
   }
end
local peer, err = B.run_peer("bench/kv_int8_attention_peer.py " .. table.concat(keys, " "))
for i, r in ipairs(rows) do
   local p = peer and peer.shapes[i]
   if p then
      r.torch_float32_s, r.torch_bfloat16_s = p.float32_s, p.bfloat16_s
      r.int8_over_torch_float32 = r.int8_s / p.float32_s
      r.int8_over_torch_bfloat16 = r.int8_s / p.bfloat16_s
   end
   r.int8_over_float32 = r.int8_s / r.float32_s
end
print(cjson.encode({ bench = "kv_int8_attention", rows = rows, torch = peer and peer.torch or nil,
   peer_note = not peer and tostring(err) or nil }))
