-- A Llama whose weights stay in CPU RAM and on disk, executed on cuda:0: the hook runtime streams
-- the coming modules' weights to the GPU (up to a 64 MiB window ahead, hooks.set_stream_window)
-- while the current one computes, and frees each module's weights after it ran. Prints the device
-- memory a forward needs next to the whole model's, and what was streamed. The tiny test
-- checkpoint fits in one window; a small window here shows the bound at work. Then it decodes
-- twice: streaming every weight per token, and in place on the CPU (hooks.set_compute_in_place).
--
--    luajit examples/stream_to_gpu.lua                -- the tiny test checkpoint
--    luajit examples/stream_to_gpu.lua path/to/llama  -- any Llama folder (config.json + safetensors)
--    MOONLOAD_CUDA_LIB=build/cudasim/libmoonload_cuda.so luajit examples/stream_to_gpu.lua
--                                                     -- on the CUDA emulator (make test-cuda-sim builds it)
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
local ml = require("moonload")
local hooks = require("moonload.hooks")

if ml.cuda_device_count() == 0 then
   print("no CUDA device here; to see this run on the CUDA emulator:\n" ..
      "  make test-cuda-sim && MOONLOAD_CUDA_LIB=build/cudasim/libmoonload_cuda.so luajit examples/stream_to_gpu.lua")
   return
end
local DEV = "cuda:0"
local dir = arg[1] or "tests/fixtures/models/llama_tiny_untied"
local cfg = ml.models.config.read(dir .. "/config.json", "stream_to_gpu")

-- The final norm resident on cuda:0; the embedding, the head and even layers in CPU RAM, odd
-- layers on disk. As in Accelerate, the GPU in the map is the main device: the cpu and disk
-- modules execute there, their weights streamed in for each forward. The embedding is the
-- exception (hooks.set_lookup_in_place, on by default): its rows are gathered on the CPU and only
-- those go to the GPU.
local device_map = { ["model.embed_tokens"] = "cpu", ["model.norm"] = 0, ["model.rotary_emb"] = 0, lm_head = "cpu" }
for i = 0, cfg.num_hidden_layers - 1 do device_map["model.layers." .. i] = i % 2 == 0 and "cpu" or "disk" end
local folder = os.tmpname()
os.remove(folder)
local model = ml.models.from_pretrained(dir, { device_map = device_map, offload_folder = folder })

local weight_bytes = 0
for _, p in model:named_parameters() do weight_bytes = weight_bytes + p:nbytes() end

local ids = { 1, 15, 42, 7, 3 }
local input = ml.tensor({ ids }, { dtype = "int64" })
-- a window of a quarter of the weights (the default, 64 MiB, would hold the whole tiny model)
hooks.set_stream_window(math.min(64 * 2 ^ 20, math.floor(weight_bytes / 4)))
model(input)                                 -- the first forward learns the order of the modules
collectgarbage(); collectgarbage()
ml.reset_peak_memory(DEV)
local before = ml.memory_allocated(DEV)
local t0 = os.clock()
local logits = model(input)
local _, peak = ml.memory_allocated(DEV)
print(string.format("forward on %s: %.3f s CPU time, logits [%s] back on %s", DEV, os.clock() - t0,
   table.concat(logits.shape, ", "), logits.device))
print(string.format("device memory: %d bytes resident, a forward's peak %d bytes more; all the weights are %d bytes",
   before, peak - before, weight_bytes))
local s = hooks.runtime_stats()
print(string.format("streamed ahead on the copy stream: %d bytes; uploads dropped: %d, given back for memory: %d " ..
   "(window now %d bytes)", s.bytes_streamed, s.streams_dropped, s.streams_reclaimed, s.stream_window))
print(string.format("the embedding table (%d bytes) stayed on the CPU: %d module calls ran there; the host waited " ..
   "%d times for an upload, %d of them with nothing queued behind it", model.model.embed_tokens.weight:nbytes(),
   s.in_place_forwards, s.stream_waits, s.stream_drains))
local streamed = model:generate(ids, { max_new_tokens = 8 })
print("greedy continuation, every weight streamed per token: " .. table.concat(streamed, " "))
-- llama.cpp's policy for decoding: a module whose weights are in host memory runs on the CPU
-- when its input has fewer than 8 rows, so each new token reads the weights where they lie
-- (the 5-token prompt still streams).
hooks.set_compute_in_place(8)
local before = hooks.runtime_stats()
local in_place = model:generate(ids, { max_new_tokens = 8 })
local after = hooks.runtime_stats()
hooks.set_compute_in_place(0)
print(string.format("the same, decoding in place on the CPU: %s (%d module calls ran on the CPU)",
   table.concat(in_place, " "), after.in_place_forwards - before.in_place_forwards))
os.execute("rm -rf '" .. folder .. "'")
