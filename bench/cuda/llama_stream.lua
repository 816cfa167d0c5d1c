--- A Llama-shaped model of about 8 GB in bfloat16 with every weight in CPU RAM, streamed to the
-- GPU layer by layer (cpu_offload with execution_device cuda:0): time per forward of 1x512
-- tokens against the floor bytes / measured host-to-device bandwidth, and next to accelerate's
-- cpu_offload on the same machine (bench/cuda/llama_stream_peer.py, same shapes, same run).
-- Then decoding: weights streamed for each token, or the new tokens computed on the CPU in place
-- (hooks.set_compute_in_place); and 8 prompts in a block schedule against one forward each. Twice: weights in ordinary (pageable) memory, staged through the uploader's pinned buffers, as
-- accelerate has them; and weights pinned (t:pin_memory()), which the DMA reads directly, copied
-- into page-locked memory or locked where they lie (pin_memory = "in_place"). Last,
-- int8 and int4: the model quantized in RAM and streamed, and the whole model resident on the GPU
-- decoding in bfloat16, int8 and int4.
-- Environment: BENCH_LAYERS (16), BENCH_PYTHON (python3), BENCH_REPEATS (3), BENCH_SHAPE=tiny (a
-- dry run on the CUDA emulator: a toy Llama, figures meaningless).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local C = require("moonload.C")
local B = require("benchutil")
local hooks = require("moonload.hooks")
local utils = require("moonload.utils")

if ml.cuda_device_count() == 0 then
   B.emit({ "bench", "skipped" }, { bench = "cuda_llama_stream", skipped = "no CUDA device" })
   return
end

local layers = tonumber(os.getenv("BENCH_LAYERS") or "") or 16
local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 3
local shape = os.getenv("BENCH_SHAPE") or "8gb"
local cfg = {
   model_type = "llama", vocab_size = 32000, hidden_size = 4096, intermediate_size = 14336,
   num_hidden_layers = layers, num_attention_heads = 32, num_key_value_heads = 8,
   max_position_embeddings = 4096, rms_norm_eps = 1e-5, rope_theta = 500000.0,
   tie_word_embeddings = false, hidden_act = "silu",
}
if shape == "tiny" then
   cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size = 256, 64, 128
   cfg.num_attention_heads, cfg.num_key_value_heads = 4, 2
end

local ids = {}
for i = 1, 512 do ids[i] = (i * 7919) % cfg.vocab_size end
local input = ml.tensor({ ids }, { dtype = "int64" })
local ffi, lib = C.ffi, C.lib

-- Skeleton on meta, then random bf16 weights in CPU RAM (never zeros); cpu_offload executes on
-- cuda:0, streaming every weight in for each forward, page-locking them first when pinned.
local function build(pinned)
   ml.manual_seed(0)
   local model = ml.init_empty_weights(function() return ml.models.llama.LlamaForCausalLM(cfg) end)
   local bytes, weights = 0, {}
   for name, p in model:named_parameters() do
      local w = ml.rand(p.shape, { dtype = "bfloat16" }) * 0.02 - 0.01
      utils.set_module_tensor_to_device(model, name, "cpu", { value = w, dtype = "bfloat16" })
      bytes = bytes + w:nbytes()
      -- the forward's uploads: all but the embedding table, looked up on the CPU
      if name ~= "model.embed_tokens.weight" then weights[#weights + 1] = w end
   end
   local t0 = B.now()
   ml.cpu_offload(model, { execution_device = "cuda:0", pin_memory = pinned })
   return model, bytes, weights, B.now() - t0
end

-- The same weights through one uploader back to back, in the model's order, with no hooks and no
-- compute between them: what the staging pipeline itself takes for these bytes. A forward slower
-- than this loses time between its uploads; one as slow loses it in the host's memory.
local function upload_only_seconds(weights)
   local up = ffi.new("ml_uploader*[1]")
   C.check(lib.ml_uploader_new(up))
   local uploader = ffi.gc(up[0], lib.ml_uploader_release)
   local dsts = {}
   for i, w in ipairs(weights) do dsts[i] = ml.empty(w.shape, { dtype = w.dtype, device = "cuda:0" }) end
   local tickets = ffi.new("int[?]", #weights)
   local t = B.best(3, function()
      for i, w in ipairs(weights) do C.check(lib.ml_uploader_submit(uploader, dsts[i]._c, w._c, tickets + i - 1)) end
      for i = 0, #weights - 1 do C.check(lib.ml_uploader_wait(uploader, tickets[i])) end
      ml.cuda.synchronize(0)
   end)
   return t
end

-- Best time per forward (each after one forward that learns the order): streaming with the
-- default window, without prefetch, and one module ahead (window 0; skipped with `quick`).
local function measure(model, quick)
   local function forward()
      local logits = model(input, { logits_to_keep = 1 })
      ml.cuda.synchronize(0)
      return logits
   end
   local modes = { { "window", true, 64 * 2 ^ 20 }, { "no_prefetch", false, 0 }, { "one_ahead", true, 0 } }
   local r = {}
   for i = 1, quick and 1 or #modes do
      local m = modes[i]
      hooks.set_prefetch(m[2])
      hooks.set_stream_window(m[3])
      forward()
      r[m[1]] = B.best(repeats, forward)
      -- one more forward's counters: the share of the weight bytes that were streamed ahead
      -- (the rest were copied when their module asked), uploads dropped, bytes the prefetch read
      local s0 = hooks.runtime_stats()
      forward()
      local s1 = hooks.runtime_stats()
      r[m[1] .. "_streamed_share"] = (s1.bytes_streamed - s0.bytes_streamed) / math.max(s1.bytes_copied - s0.bytes_copied, 1)
      r[m[1] .. "_dropped"] = s1.streams_dropped - s0.streams_dropped
      r[m[1] .. "_prefetch_bytes"] = s1.prefetch_bytes - s0.prefetch_bytes
      -- where that forward's time went: the upload worker copying, the host blocked on uploads
      -- not yet queued, and how often such a wait had nothing queued behind it (a drain)
      r[m[1] .. "_busy_s"] = s1.stream_busy_s - s0.stream_busy_s
      r[m[1] .. "_host_wait_s"] = s1.stream_wait_s - s0.stream_wait_s
      r[m[1] .. "_drains"] = s1.stream_drains - s0.stream_drains
      r[m[1] .. "_bytes_moved"] = s1.bytes_copied - s0.bytes_copied
   end
   hooks.set_prefetch(true)
   hooks.set_stream_window(64 * 2 ^ 20)
   return r
end

-- Host-to-device bandwidth of the uploader from a pageable or a pinned source: the floors.
local function h2d_bandwidth(pinned)
   local probe = ml.rand({ shape == "tiny" and 1024 * 1024 or 256 * 1024 * 1024 }, { dtype = "bfloat16" })
   if pinned then probe = probe:pin_memory() end
   local up = ffi.new("ml_uploader*[1]")
   C.check(lib.ml_uploader_new(up))
   local uploader = ffi.gc(up[0], lib.ml_uploader_release)
   local dst = ml.empty(probe.shape, { dtype = "bfloat16", device = "cuda:0" })
   local ticket = ffi.new("int[1]")
   local t = B.best(3, function()
      C.check(lib.ml_uploader_submit(uploader, dst._c, probe._c, ticket))
      C.check(lib.ml_uploader_wait(uploader, ticket[0]))
      ml.cuda.synchronize(0)
   end)
   return probe:nbytes() / t
end

-- Three JSON lines, each printed as soon as it is measured (a run cut short by the device
-- check's timeout still reports what it finished): pageable weights, accelerate on the same
-- shapes, pinned weights.
local h2d = h2d_bandwidth(false)
local t_build = B.now()
local model, weight_bytes, weights = build(false)
t_build = B.now() - t_build
local times = measure(model)
local upload_only_s = upload_only_seconds(weights)
weights = nil
collectgarbage(); collectgarbage()
local forward_s = times.window
local floor = weight_bytes / h2d
B.emit({ "bench", "layers", "weight_bytes", "build_s", "h2d_gbps", "floor_s", "forward_s", "forward_no_prefetch_s",
         "forward_one_ahead_s", "ratio_to_floor", "window_streamed_share", "window_dropped", "window_prefetch_bytes",
         "one_ahead_streamed_share", "one_ahead_dropped", "one_ahead_prefetch_bytes", "staging_threads",
         "upload_only_s", "window_busy_s", "window_host_wait_s", "window_drains", "one_ahead_busy_s",
         "one_ahead_drains", "bytes_moved", "ratio_to_moved_floor" }, {
   bench = "cuda_llama_stream", layers = layers, weight_bytes = weight_bytes, build_s = t_build,
   h2d_gbps = h2d / 1e9, floor_s = floor, forward_s = forward_s, forward_no_prefetch_s = times.no_prefetch,
   forward_one_ahead_s = times.one_ahead, ratio_to_floor = forward_s / floor,
   window_streamed_share = times.window_streamed_share, window_dropped = times.window_dropped,
   window_prefetch_bytes = times.window_prefetch_bytes, one_ahead_streamed_share = times.one_ahead_streamed_share,
   one_ahead_dropped = times.one_ahead_dropped, one_ahead_prefetch_bytes = times.one_ahead_prefetch_bytes,
   staging_threads = os.getenv("MOONLOAD_UPLOAD_THREADS") or "default", upload_only_s = upload_only_s,
   window_busy_s = times.window_busy_s, window_host_wait_s = times.window_host_wait_s,
   window_drains = times.window_drains, one_ahead_busy_s = times.one_ahead_busy_s,
   one_ahead_drains = times.one_ahead_drains,
   -- what crossed to the GPU per forward (the embedding is looked up on the CPU: hooks.set_lookup_in_place)
   -- and the time against that floor; ratio_to_floor counts every weight byte
   bytes_moved = times.window_bytes_moved, ratio_to_moved_floor = forward_s / (times.window_bytes_moved / h2d),
})

-- Decoding 8 tokens after a 16-token prompt: every weight streamed per token (Accelerate's way)
-- against hooks.set_compute_in_place(8) (the prompt streams, each new token's modules run on
-- the CPU where the weights are).
local function decode_tokens_per_s(in_place_below)
   local prev = hooks.set_compute_in_place(in_place_below)
   local prompt, new = {}, 8
   for i = 1, 16 do prompt[i] = ids[i] end
   local short = ml.tensor({ prompt }, { dtype = "int64" })
   local prefill = B.best(1, function() return model(short, { logits_to_keep = 1 }) end)
   local total = B.best(1, function() return model:generate(prompt, { max_new_tokens = new, eos_token_id = false }) end)
   hooks.set_compute_in_place(prev)
   return (new - 1) / math.max(total - prefill, 1e-9)
end
local stream_tps, in_place_tps = decode_tokens_per_s(0), decode_tokens_per_s(8)
B.emit({ "bench", "streamed_tokens_per_s", "in_place_tokens_per_s", "speedup" }, {
   bench = "cuda_llama_stream_decode", streamed_tokens_per_s = stream_tps, in_place_tokens_per_s = in_place_tps,
   speedup = in_place_tps / stream_tps,
})

-- 8 prompts of 512 tokens: one forward each (every weight streamed 8 times: 8 x forward_s), the
-- block schedule with one row per block (streamed once), and the 8 rows in one forward.
local rows = {}
for b = 1, 8 do rows[b] = ids end
local batch = ml.tensor(rows, { dtype = "int64" })
local function timed(opts)
   return B.best(1, function()
      local logits = model(batch, opts)
      ml.cuda.synchronize(0)
      return logits
   end)
end
local blocked_s = timed({ logits_to_keep = 1, micro_batch_size = 1 })
local whole_s = timed({ logits_to_keep = 1 })
B.emit({ "bench", "one_by_one_s", "blocked_s", "whole_s", "blocked_speedup" }, {
   bench = "cuda_llama_block_schedule", one_by_one_s = 8 * forward_s, blocked_s = blocked_s, whole_s = whole_s,
   blocked_speedup = 8 * forward_s / blocked_s,
})
model = nil
collectgarbage(); collectgarbage()

local peer = {}
local python = os.getenv("BENCH_PYTHON") or "python3"
local ok, res, raw = pcall(B.run_json, string.format("%s bench/cuda/llama_stream_peer.py %d %d %s", python, layers,
   repeats, shape), true)
if ok and res then peer = res end
-- (its last line alone: the note is one cell of the device check's table)
local peer_error = (not ok and tostring(res) or ((raw or ""):gsub("%s+$", ""))):match("([^\n]*)$"):sub(-200)
B.emit({ "bench", "accelerate_s", "forward_s", "ratio_to_accelerate", "peer_device", "peer_note" }, {
   bench = "cuda_llama_stream_accelerate", accelerate_s = peer.forward_s, forward_s = forward_s,
   ratio_to_accelerate = peer.forward_s and forward_s / peer.forward_s or nil, peer_device = peer.device,
   peer_note = not peer.forward_s and ("accelerate peer unavailable: " .. peer_error) or nil,
})

-- Page-locking 8 GB can fail where the driver limits it (a sandboxed host): that becomes a note.
local pinned_ok, h2d_pinned = pcall(h2d_bandwidth, true)
local pinned_s
if pinned_ok then pinned_ok, pinned_s = pcall(function() return measure(build(true), true).window end) end
collectgarbage(); collectgarbage()
local floor_pinned = pinned_ok and weight_bytes / h2d_pinned or nil
-- The same weights page-locked where they lie (cpu_offload's pin_memory = "in_place": no copy, no
-- second RAM), against the same floor; and the seconds the locking itself took.
local in_place_ok, in_place_s, lock_s = pcall(function()
   local m, _, _, seconds = build("in_place")
   return measure(m, true).window, seconds
end)
collectgarbage(); collectgarbage()
B.emit({ "bench", "h2d_pinned_gbps", "floor_pinned_s", "forward_pinned_s", "ratio_pinned_to_floor", "forward_in_place_s",
         "ratio_in_place_to_floor", "pin_in_place_s", "pinned_note" }, {
   bench = "cuda_llama_stream_pinned", h2d_pinned_gbps = pinned_ok and h2d_pinned / 1e9 or nil,
   floor_pinned_s = floor_pinned, forward_pinned_s = pinned_ok and pinned_s or nil,
   ratio_pinned_to_floor = pinned_ok and pinned_s / floor_pinned or nil,
   forward_in_place_s = in_place_ok and in_place_s or nil,
   ratio_in_place_to_floor = in_place_ok and floor_pinned and in_place_s / floor_pinned or nil,
   pin_in_place_s = in_place_ok and lock_s or nil,
   pinned_note = (not pinned_ok and ("pinned run failed: " .. tostring(pinned_s or h2d_pinned)):sub(1, 300) or nil)
      or (not in_place_ok and ("pinning in place failed: " .. tostring(in_place_s)):sub(1, 300) or nil),
})

-- The same model quantized in CPU RAM (ml.quantize: the hooks then stream the quantized weights
-- and their float32 scales, 1.125 bytes a weight for int8 and 0.625 for int4 where bfloat16 takes
-- 2): time per forward against bfloat16's and against its own floor. int4 runs last of all.
local function stream_quantized(dtype)
   local ok, seconds, bytes = pcall(function()
      local m = build(false)
      local _, report = ml.quantize(m, { dtype = dtype })
      return measure(m, true).window, weight_bytes - report.bytes_before + report.bytes_after
   end)
   collectgarbage(); collectgarbage()
   B.emit({ "bench", "quantized_forward_s", "quantized_bytes", "quantized_floor_s", "quantized_speedup", "quantized_note" }, {
      bench = "cuda_llama_stream_" .. dtype, quantized_forward_s = ok and seconds or nil, quantized_bytes = ok and bytes or nil,
      quantized_floor_s = ok and bytes / h2d or nil, quantized_speedup = ok and forward_s / seconds or nil,
      quantized_note = not ok and (dtype .. " run failed: " .. tostring(seconds)):sub(1, 300) or nil,
   })
end
stream_quantized("int8")

-- The whole model resident on cuda:0, decoding 16 tokens after a 16-token prompt: bfloat16
-- weights (cuBLAS) against the same model quantized on the device (cuda/q8.cu's kernels, which
-- read 1.125 bytes a weight for int8 and 0.625 for int4 where bfloat16 reads 2).
local function resident_model()
   ml.manual_seed(0)
   local m = ml.init_empty_weights(function() return ml.models.llama.LlamaForCausalLM(cfg) end)
   for name, p in m:named_parameters() do
      local w = ml.rand(p.shape, { dtype = "bfloat16", device = "cuda:0" }) * 0.02 - 0.01
      utils.set_module_tensor_to_device(m, name, "cuda:0", { value = w, dtype = "bfloat16" })
   end
   return m:to("cuda:0")                                 -- (the buffers: rotary frequencies)
end
local resident_ok, resident = pcall(function()
   local m = resident_model()
   local prompt = {}
   for i = 1, 16 do prompt[i] = ids[i] end
   local function tokens_per_s(kv_dtype)
      local short = ml.tensor({ prompt }, { dtype = "int64", device = "cuda:0" })
      local prefill = B.best(2, function() m(short, { logits_to_keep = 1 }); ml.cuda.synchronize(0) end)
      local total = B.best(2, function()
         m:generate(short, { max_new_tokens = 16, eos_token_id = false, kv_cache_dtype = kv_dtype })
         ml.cuda.synchronize(0)
      end)
      return 15 / math.max(total - prefill, 1e-9)
   end
   local r = { bf16 = tokens_per_s() }
   ml.quantize(m)
   r.int8 = tokens_per_s()
   r.int8_kv = tokens_per_s("int8")                      -- (and the int8 key-value cache)
   m = nil
   collectgarbage(); collectgarbage()
   m = resident_model()
   ml.quantize(m, { dtype = "int4" })
   r.int4 = tokens_per_s()
   return r
end)
collectgarbage(); collectgarbage()
B.emit({ "bench", "bf16_tokens_per_s", "int8_tokens_per_s", "int8_kv_tokens_per_s", "int8_decode_speedup",
         "int4_tokens_per_s", "resident_note" }, {
   bench = "cuda_llama_resident_decode", bf16_tokens_per_s = resident_ok and resident.bf16 or nil,
   int8_tokens_per_s = resident_ok and resident.int8 or nil, int8_kv_tokens_per_s = resident_ok and resident.int8_kv or nil,
   int8_decode_speedup = resident_ok and resident.int8 / resident.bf16 or nil,
   int4_tokens_per_s = resident_ok and resident.int4 or nil,
   resident_note = not resident_ok and ("resident run failed: " .. tostring(resident)):sub(1, 300) or nil,
})

stream_quantized("int4")
