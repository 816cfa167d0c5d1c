--- load_file of a ~500 MB safetensors file to CPU: moonload next to PyPI safetensors' load_file,
-- measured in the same run on the same file (bench/safetensors_load.py through BENCH_PYTHON,
-- default /opt/ref/bin/python; skipped with a note when absent).
-- The file is written once by moonload's save_file (GPT-2-medium-like: 24 layers of float32
-- matrices plus a bfloat16 embedding) into BENCH_DIR (default /tmp) and removed afterwards.
-- Three numbers per side: load_file with a warm page cache (median), load_file plus one pass over
-- every tensor (sum: what the first forward pass pays; zero-copy pays its page faults here, and
-- each side's own reduction kernel is in it), and that again right after the file's pages were
-- dropped from the page cache (once, first thing in each process: disk reads).
-- Prints one JSON object. Run from the repository root: luajit bench/safetensors_load.lua
-- Environment: BENCH_THREADS (default: all cores), BENCH_REPEATS (5), BENCH_MB (500), BENCH_DIR.
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local st = require("moonload.safetensors")
local C = require("moonload.C")
local cjson = require("cjson")
local ffi = require("ffi")
local B = require("benchutil")

local now, median = B.now, B.median

local threads = tonumber(os.getenv("BENCH_THREADS") or "") or B.nproc()
local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 5
local mb = tonumber(os.getenv("BENCH_MB") or "") or 500
local dir = os.getenv("BENCH_DIR") or "/tmp"
local python = B.python
C.lib.ml_set_num_threads(threads)

-- --- the file --------------------------------------------------------------------------------
-- 24 layers x (4 d*d + 2 x 4d*d matrices) of float32 at d = 512 is 24 * 12 * 1 MiB = 288 MiB;
-- d and the layer count scale to reach about BENCH_MB.
local d = 512
local per_layer = 12 * d * d * 4
local emb_rows = 50257
local emb_bytes = emb_rows * d * 2
local layers = math.max(1, math.floor((mb * 1e6 - emb_bytes) / per_layer + 0.5))
local path = string.format("%s/moonload-bench-%d.safetensors", dir, math.random(1e9))
local tensors = { ["wte.weight"] = ml.randn(emb_rows, d):to("bfloat16") }
for l = 0, layers - 1 do
   local p = "h." .. l .. "."
   tensors[p .. "attn.c_attn.weight"] = ml.randn(d, 3 * d)
   tensors[p .. "attn.c_attn.bias"] = ml.zeros(3 * d)
   tensors[p .. "attn.c_proj.weight"] = ml.randn(d, d)
   tensors[p .. "mlp.c_fc.weight"] = ml.randn(d, 4 * d)
   tensors[p .. "mlp.c_proj.weight"] = ml.randn(4 * d, d)
   tensors[p .. "ln_1.weight"] = ml.ones(d)
end
local t0 = now()
st.save_file(tensors, path, { format = "pt" })
local save_s = now() - t0
tensors = nil
collectgarbage()
local f = io.open(path, "rb")
local size = f:seek("end")
f:close()

local function drop_cache()
   local m = ffi.new("ml_mapping*[1]")
   C.check(C.lib.ml_mapping_open(path, m))
   C.check(C.lib.ml_mapping_advise(m[0], 0, size, 1))
   C.lib.ml_mapping_release(m[0])
end

-- --- moonload ------------------------------------------------------------------------------
-- Cold first, while no mapping of the file exists (DONTNEED cannot drop pages still mapped).
drop_cache()
t0 = now()
local cold_all = st.load_file(path)
for _, x in pairs(cold_all) do local _ = x:sum():item() end
local cold = now() - t0
cold_all = nil
collectgarbage()
st.load_file(path)                                          -- warm the page cache
local loads, touched, ntensors, zero_copy = {}, {}, 0, 0
for _ = 1, repeats do
   local t = now()
   local all = st.load_file(path)
   loads[#loads + 1] = now() - t
   ntensors, zero_copy = 0, 0
   for _, x in pairs(all) do
      ntensors = ntensors + 1
      if C.lib.ml_storage_is_borrowed(C.lib.ml_tensor_storage(x._c)) then zero_copy = zero_copy + 1 end
   end
   all = nil
   collectgarbage()
end
for _ = 1, repeats do
   local t = now()
   local all = st.load_file(path)
   local s = 0
   for _, x in pairs(all) do s = s + x:sum():item() end
   touched[#touched + 1] = now() - t
   all = nil
   collectgarbage()
end

local result = {
   bench = "safetensors_load",
   file = { bytes = size, tensors = ntensors, layers = layers },
   threads = threads,
   moonload = { load_s = median(loads), load_and_sum_s = median(touched), cold_load_and_sum_s = cold,
                zero_copy_tensors = zero_copy, save_s = save_s },
}

-- --- PyPI safetensors peer -----------------------------------------------------------------
if B.have_python() then
   local p = io.popen(string.format("%s bench/safetensors_load.py --path '%s' --repeats %d --threads %d 2>&1",
      python, path, repeats, threads))
   local out = p:read("*a")
   p:close()
   local ok, peer = pcall(cjson.decode, out:match("{.*}") or "")
   if ok then
      result.safetensors = peer
      result.ratio_load = peer.load_s / result.moonload.load_s             -- > 1: moonload faster
      result.ratio_load_and_sum = peer.load_and_sum_s / result.moonload.load_and_sum_s
      result.ratio_cold_load_and_sum = peer.cold_load_and_sum_s / result.moonload.cold_load_and_sum_s
   else
      result.safetensors = { error = out }
   end
else
   result.safetensors = { skipped = python .. " not found" }
end
os.remove(path)
print(cjson.encode(result))
