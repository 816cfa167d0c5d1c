--- Issue 4, benchmark 3: forward on 1x128 tokens of the GPT-2-small-shaped checkpoint with half
-- of the blocks (h.6 .. h.11) on "disk", as a ratio to the same model fully in RAM:
--   warm:    the disk blocks' bytes are in the page cache            (goal <= 1.05x)
--   evicted: before every forward the disk blocks' byte ranges are dropped from the page cache
--            with posix_fadvise(DONTNEED)        (goal <= 1.2x of max(disk read time, compute));
--            moonload's own mapping of them is unmapped first (MADV_DONTNEED), or the pages its
--            prefetch read ahead for the next forward would stay cached; mincore then counts what
--            is left cached (evicted_resident_bytes: one 2 MiB folio at most, the one shared with
--            the last RAM block, which its mapping keeps)
-- moonload reads disk blocks in place from the checkpoint's safetensors files (zero-copy views,
-- next layer prefetched on a worker thread; released pages stay mapped in the warm case (the
-- hooks' auto drop level: the model fits in RAM) and are dropped after each layer in the evicted
-- case, as they are for a model larger than RAM); accelerate
-- (bench/big_model_peer.py offload) writes them to an offload folder of .dat files and copies
-- them in at each forward. Both measured in the same run. Prints one JSON object.
-- Environment: BENCH_PYTHON (default /opt/ref/bin/python), BENCH_REPEATS (default 5).
package.path = "lua/?.lua;lua/?/init.lua;bench/lib/?.lua;" .. package.path
local ml = require("moonload")
local hooks = require("moonload.hooks")
local cjson = require("cjson")
local ffi = require("ffi")
local B = require("benchutil")

local now, median = B.now, B.median

pcall(ffi.cdef, [[
int open(const char *path, int flags, ...);
int close(int fd);
int posix_fadvise(int fd, long offset, long len, int advice);
long pread(int fd, void *buf, size_t count, long offset);
int madvise(void *addr, size_t len, int advice);
int mincore(void *addr, size_t len, unsigned char *vec);
]])

local repeats = tonumber(os.getenv("BENCH_REPEATS") or "") or 5

local dir, index = B.demo_checkpoint()

local tokens = {}
for i = 1, 128 do tokens[i] = (i * 37) % 50257 end
local ids = ml.tensor({ tokens }, { dtype = "int64" })

local function build()
   return ml.init_empty_weights(function() return ml.models.gpt2.GPT2LMHeadModel(dir .. "/config.json") end)
end

-- The disk blocks' byte ranges in the shard files.
local weight_map = cjson.decode(assert(io.open(index)):read("*a")).weight_map
local ranges, disk_bytes = {}, 0
do
   local by_file = {}
   for name, file in pairs(weight_map) do
      local i = tonumber(name:match("^transformer%.h%.(%d+)%."))
      if i and i >= 6 then
         by_file[file] = by_file[file] or {}
         table.insert(by_file[file], name)
      end
   end
   for file, names in pairs(by_file) do
      local h = ml.safetensors.safe_open(dir .. "/" .. file)
      for _, name in ipairs(names) do
         local info = h:tensor_info(name)
         ranges[#ranges + 1] = { path = dir .. "/" .. file, offset = info.file_offset, nbytes = info.nbytes }
         disk_bytes = disk_bytes + info.nbytes
      end
      h:close()
   end
   table.sort(ranges, function(a, b)
      if a.path ~= b.path then return a.path < b.path end
      return a.offset < b.offset
   end)
end

-- The pages holding each disk weight's bytes in the model's own mapping (the views its hooks read
-- from), collected after the warm-up.
local PAGE = 4096
local views = {}
local function collect_views(model)
   for _, m in model:named_modules() do
      local h = rawget(m, "_hf_hook")
      for _, slot in ipairs(h and h.slots or {}) do
         local t = slot.src or h.weights_map[slot.name]   -- the tensor the hook runtime reads
         local p, n = t:data_ptr(), t:nbytes()
         local a, b = math.floor(p / PAGE) * PAGE, math.ceil((p + n) / PAGE) * PAGE
         if b > a then views[#views + 1] = { a, b - a } end
      end
   end
   assert(#views > 0, "no disk weights found behind the model's hooks")
end

-- Bytes of the views still in the page cache.
local function resident_bytes()
   local total = 0
   for _, v in ipairs(views) do
      local pages = v[2] / PAGE
      local vec = ffi.new("unsigned char[?]", pages)
      assert(ffi.C.mincore(ffi.cast("void *", v[1]), v[2], vec) == 0, "mincore failed")
      for i = 0, pages - 1 do if bit.band(vec[i], 1) == 1 then total = total + PAGE end end
   end
   return total
end

-- The disk blocks' span in each file, widened to 2 MiB: the page cache holds file data in large
-- folios that can straddle two tensors, and fadvise(DONTNEED) drops only folios wholly inside the
-- range it is given (one call per tensor would leave the shared ones cached).
local spans = {}
do
   local by_path = {}
   for _, r in ipairs(ranges) do
      local sp = by_path[r.path]
      if not sp then
         sp = { path = r.path, lo = r.offset, hi = r.offset + r.nbytes }
         by_path[r.path] = sp
         spans[#spans + 1] = sp
      end
      sp.lo, sp.hi = math.min(sp.lo, r.offset), math.max(sp.hi, r.offset + r.nbytes)
   end
   local FOLIO = 2 ^ 21
   for _, sp in ipairs(spans) do sp.lo, sp.hi = math.floor(sp.lo / FOLIO) * FOLIO, math.ceil(sp.hi / FOLIO) * FOLIO end
end

local function evict()
   hooks.wait_prefetch()
   for _, v in ipairs(views) do ffi.C.madvise(ffi.cast("void *", v[1]), v[2], 4) end   -- MADV_DONTNEED
   for _, sp in ipairs(spans) do
      local fd = ffi.C.open(sp.path, 0)
      ffi.C.posix_fadvise(fd, sp.lo, sp.hi - sp.lo, 4)        -- POSIX_FADV_DONTNEED
      ffi.C.close(fd)
   end
end

local function cold_read_seconds()
   evict()
   local buf = ffi.new("uint8_t[?]", 16777216)
   local t0 = now()
   for _, r in ipairs(ranges) do
      local fd = ffi.C.open(r.path, 0)
      local off, left = r.offset, r.nbytes
      while left > 0 do
         local n = ffi.C.pread(fd, buf, math.min(left, 16777216), off)
         if n <= 0 then break end
         off, left = off + n, left - tonumber(n)
      end
      ffi.C.close(fd)
   end
   return now() - t0
end

-- Both models live together so their forwards can be interleaved (the machine's load changes
-- slowly; alternating runs see the same conditions). CPU weights of both are views into the
-- page cache, touched by the warm-up.
local device_map = { ["transformer.wte"] = "cpu", ["transformer.wpe"] = "cpu", ["transformer.drop"] = "cpu",
   ["transformer.ln_f"] = "cpu", lm_head = "cpu" }
for i = 0, 11 do device_map["transformer.h." .. i] = i < 6 and "cpu" or "disk" end
local folder = os.tmpname()
os.remove(folder)
local ram = build()
ml.load_checkpoint_and_dispatch(ram, index, { device_map = { [""] = "cpu" } })
local model = build()
local prev = ml.utils.set_warning_handler(function() end)
ml.load_checkpoint_and_dispatch(model, index, { device_map = device_map, offload_folder = folder })
ml.utils.set_warning_handler(prev)

local function once(m, prepare)
   if prepare then prepare() end
   local t0 = now()
   m(ids)
   return now() - t0
end

ram(ids); model(ids)                                 -- warm-up (and order learning for prefetch)
collect_views(model)
local r_ram, r_warm = {}, {}
for _ = 1, repeats do
   r_ram[#r_ram + 1] = once(ram)
   r_warm[#r_warm + 1] = once(model)
end
local t_ram, t_warm = median(r_ram), median(r_warm)
-- free the RAM model for real (JIT traces keep constants alive until flushed): its mapped pages
-- would keep the shared page-cache pages from being evicted below
ram = nil
jit.flush()
collectgarbage(); collectgarbage()

-- Evicted stands for a model larger than RAM: there the hooks' auto drop level unmaps released
-- pages (level 1); set it explicitly, since this checkpoint is small enough for auto to keep them
-- mapped, and mapped pages cannot be evicted from the page cache.
local r_cold, r_cold_off = {}, {}
local left_resident = 0
local function evict_checked()
   evict()
   left_resident = math.max(left_resident, resident_bytes())
end
hooks.set_drop_pages(1)
for _ = 1, repeats do
   hooks.set_prefetch(true)
   r_cold[#r_cold + 1] = once(model, evict_checked)
   hooks.set_prefetch(false)
   r_cold_off[#r_cold_off + 1] = once(model, evict_checked)
end
hooks.set_prefetch(true)
local t_cold, prefetch_off_cold = median(r_cold), median(r_cold_off)
local t_read = cold_read_seconds()
model = nil
collectgarbage(); collectgarbage()
os.execute("rm -rf '" .. folder .. "'")

local result = {
   bench = "big_model_offload", checkpoint = dir, repeats = repeats, tokens = 128,
   moonload = {
      forward_ram_seconds = t_ram, forward_half_disk_warm_seconds = t_warm, runs_ram = r_ram, runs_warm = r_warm,
      forward_half_disk_evicted_seconds = t_cold, forward_half_disk_evicted_no_prefetch_seconds = prefetch_off_cold,
      disk_bytes = disk_bytes, disk_read_seconds = t_read, evicted_resident_bytes = left_resident,
      ratio_warm = t_warm / t_ram, ratio_evicted = t_cold / math.max(t_read, t_ram),
      threads = ml.get_num_threads(),
   },
   goal = { ratio_warm = 1.05, ratio_evicted = 1.2 },
}
local peer, err = B.run_peer(string.format("bench/big_model_peer.py offload --ckpt %s --repeats %d --threads %d",
   dir, repeats, ml.get_num_threads()))
if peer then
   result.accelerate = peer
else
   result.peer_error = err
end
result.meets_goal = result.moonload.ratio_warm <= 1.05 and result.moonload.ratio_evicted <= 1.2
print(cjson.encode(result))
