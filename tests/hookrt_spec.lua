-- The C hook runtime (core/src/hookrt.c), driven directly through the FFI: zero-copy
-- materialization of mapped weights, copies shared between tied users, order learning,
-- prefetch on a worker thread and page dropping after release.
local C = require("moonload.C")
local Tensor = require("moonload.tensor")
local ml = require("moonload")

local ffi, lib = C.ffi, C.lib

local function new_rt()
   local p = ffi.new("ml_hookrt*[1]")
   C.check(lib.ml_hookrt_new(p))
   C.check(lib.ml_hookrt_set_prefetch_window(p[0], 0, 0))   -- small groups, one group ahead
   return ffi.gc(p[0], lib.ml_hookrt_release)
end

local function dev(name) return Tensor.parse_device("test", name) end

local function new_group(rt, d)
   local g = ffi.new("int[1]")
   C.check(lib.ml_hookrt_group_new(rt, dev(d or "cpu"), g))
   return g[0]
end

local function add(rt, g, t, dtype)
   C.check(lib.ml_hookrt_group_add(rt, g, t._c, Tensor.parse_dtype("test", dtype or t.dtype)))
end

local function materialize(rt, g, n)
   local outs = ffi.new("ml_tensor*[?]", n)
   C.check(lib.ml_hookrt_materialize(rt, g, outs, n))
   local res = {}
   for i = 0, n - 1 do res[i + 1] = Tensor.wrap(outs[i]) end
   return res
end

local function stats(rt)
   local s = ffi.new("ml_hookrt_stats")
   lib.ml_hookrt_get_stats(rt, s)
   local r = {}
   for _, k in ipairs({ "materialize_calls", "releases", "bytes_viewed", "bytes_copied", "tied_hits",
      "bytes_dropped", "prefetch_jobs", "prefetch_bytes", "prefetch_pages", "shared_copies", "bytes_mapped",
      "bytes_streamed", "streams_pending", "stream_waits", "stream_drains", "streams_dropped" }) do
      r[k] = tonumber(s[k])
   end
   return r
end

-- A file of n float32 values 0, 1, 2, ... mapped read-only; returns a function making views.
local tmpfiles = {}
local function mapped_floats(n)
   local path = os.tmpname()
   tmpfiles[#tmpfiles + 1] = path
   local buf = ffi.new("float[?]", n)
   for i = 0, n - 1 do buf[i] = i end
   local f = assert(io.open(path, "wb"))
   f:write(ffi.string(buf, n * 4))
   f:close()
   local mp = ffi.new("ml_mapping*[1]")
   C.check(lib.ml_mapping_open(path, mp))
   local map = ffi.gc(mp[0], lib.ml_mapping_release)
   return function(offset_elems, shape)
      local numel = 1
      for _, s in ipairs(shape) do numel = numel * s end
      local sp = ffi.new("ml_storage*[1]")
      C.check(lib.ml_storage_from_mapping(map, offset_elems * 4, numel * 4, sp))
      local shp = ffi.new("int64_t[?]", #shape, shape)
      local tp = ffi.new("ml_tensor*[1]")
      local st = lib.ml_tensor_from_storage(sp[0], 0, lib.ML_FLOAT32, #shape, shp, nil, tp)
      lib.ml_storage_release(sp[0])
      C.check(st)
      return Tensor.wrap(tp[0])
   end, map
end

teardown(function()
   for _, p in ipairs(tmpfiles) do os.remove(p) end
end)

describe("hookrt", function()
   describe("materialize", function()
      it("hands out a mapped source of matching dtype as a zero-copy view on cpu", function()
         local rt = new_rt()
         local view = mapped_floats(64)
         local w = view(0, { 4, 8 })
         local g = new_group(rt)
         add(rt, g, w)
         local before = ml.memory_allocated("cpu")
         local out = materialize(rt, g, 1)
         assert.are.equal(w:data_ptr(), out[1]:data_ptr())
         assert.are.same({ 4, 8 }, out[1].shape)
         assert.are.equal(before, ml.memory_allocated("cpu"))
         assert.are.equal(9, out[1]:tolist()[2][2])
         local s = stats(rt)
         assert.are.equal(4 * 8 * 4, s.bytes_viewed)
         assert.are.equal(0, s.bytes_copied)
      end)

      it("converts to the wanted dtype with a copy", function()
         local rt = new_rt()
         local view = mapped_floats(16)
         local w = view(0, { 16 })
         local g = new_group(rt)
         add(rt, g, w, "float16")
         local out = materialize(rt, g, 1)
         assert.are.equal("float16", out[1].dtype)
         assert.are_not.equal(w:data_ptr(), out[1]:data_ptr())
         assert.are.same(w:tolist(), out[1]:tolist())
         assert.are.equal(32, stats(rt).bytes_copied)
      end)

      it("copies tied sources once and shares the copy between groups", function()
         local rt = new_rt()
         local src = ml.tensor({ { 0, 1, 2, 3 }, { 4, 5, 6, 7 }, { 8, 9, 10, 11 } })
         local g1, g2 = new_group(rt), new_group(rt)
         add(rt, g1, src, "float64")
         add(rt, g2, src, "float64")
         local a = materialize(rt, g1, 1)
         local b = materialize(rt, g2, 1)
         assert.are.equal(a[1]:data_ptr(), b[1]:data_ptr())
         local s = stats(rt)
         assert.are.equal(1, s.tied_hits)
         assert.are.equal(12 * 8, s.bytes_copied)
         assert.are.equal(1, s.shared_copies)
         C.check(lib.ml_hookrt_release_group(rt, g1))
         assert.are.equal(1, stats(rt).shared_copies)
         C.check(lib.ml_hookrt_release_group(rt, g2))
         assert.are.equal(0, stats(rt).shared_copies)
         -- after both released, a new materialization makes a fresh copy
         local c = materialize(rt, g1, 1)
         assert.are.same(src:tolist(), c[1]:tolist())
         assert.are.equal("float64", c[1].dtype)
         assert.are.equal(2 * 12 * 8, stats(rt).bytes_copied)
      end)

      it("keeps the materialized copy alive for the caller after release", function()
         local rt = new_rt()
         local src = ml.tensor({ 0, 1, 2, 3, 4 })
         local g = new_group(rt)
         add(rt, g, src, "float64")
         local out = materialize(rt, g, 1)
         C.check(lib.ml_hookrt_release_group(rt, g))
         collectgarbage()
         assert.are.same({ 0, 1, 2, 3, 4 }, out[1]:tolist())
      end)

      it("rejects a meta source, a wrong count and unknown groups", function()
         local rt = new_rt()
         local g = new_group(rt)
         local meta = ml.empty({ 2, 2 }, { device = "meta" })
         assert.has_error(function() add(rt, g, meta) end,
            "ml_hookrt_group_add: source tensor [2, 2] is on meta: it has no data to materialize")
         add(rt, g, ml.zeros(2))
         assert.has_error(function() materialize(rt, g, 2) end,
            "ml_hookrt_materialize: group 0 has 1 tensors, caller expects 2")
         assert.has_error(function() materialize(rt, 7, 1) end,
            "ml_hookrt_materialize: no group 7 in this runtime")
         assert.has_error(function() C.check(lib.ml_hookrt_configure(rt, 3, -1)) end,
            "ml_hookrt_configure: prefetch must be 0 or 1 (-1 keeps it), got 3")
      end)

      it("reuses freed group ids and forgets them as successors", function()
         local rt = new_rt()
         local g1, g2 = new_group(rt), new_group(rt)
         add(rt, g1, ml.zeros(1)); add(rt, g2, ml.zeros(1))
         materialize(rt, g1, 1); materialize(rt, g2, 1)
         assert.are.equal(g2, lib.ml_hookrt_next(rt, g1))
         C.check(lib.ml_hookrt_group_free(rt, g2))
         assert.are.equal(-1, lib.ml_hookrt_next(rt, g1))
         assert.are.equal(-1, lib.ml_hookrt_group_size(rt, g2))
         assert.are.equal(g2, new_group(rt))
      end)
   end)

   describe("order learning and prefetch", function()
      local function three_groups(rt, view)
         local gs = {}
         for i = 1, 3 do
            gs[i] = new_group(rt)
            add(rt, gs[i], view((i - 1) * 4096, { 64, 64 }))
         end
         return gs
      end

      -- Materializes and releases each group in turn, `passes` times (forwards of a model).
      local function run_passes(rt, gs, passes)
         for _ = 1, passes do
            for _, g in ipairs(gs) do
               materialize(rt, g, 1)
               C.check(lib.ml_hookrt_release_group(rt, g))
            end
         end
      end

      it("learns each group's successor on the first pass", function()
         local rt = new_rt()
         local view = mapped_floats(3 * 4096)
         local gs = three_groups(rt, view)
         run_passes(rt, gs, 1)
         assert.are.equal(gs[2], lib.ml_hookrt_next(rt, gs[1]))
         assert.are.equal(gs[3], lib.ml_hookrt_next(rt, gs[2]))
         assert.are.equal(-1, lib.ml_hookrt_next(rt, gs[3]))
         assert.are.equal(0, stats(rt).prefetch_jobs)   -- nothing known to prefetch on pass one
      end)

      it("prefetches the next group's mapped pages on later passes", function()
         local rt = new_rt()
         local view = mapped_floats(3 * 4096)
         local gs = three_groups(rt, view)
         run_passes(rt, gs, 2)
         C.check(lib.ml_hookrt_wait(rt))
         local s = stats(rt)
         -- pass two: g1 prefetches g2, g2 prefetches g3, g3 prefetches g1 (learned wrap-around)
         assert.are.equal(3, s.prefetch_jobs)
         assert.are.equal(3 * 64 * 64 * 4, s.prefetch_bytes)
         assert.is_true(s.prefetch_pages >= 12)
      end)

      it("does not read ahead through a successor that changed until it comes twice in a row (experts)", function()
         local rt = new_rt()
         local view = mapped_floats(3 * 4096)
         local gs = three_groups(rt, view)
         local function step(a, b)
            materialize(rt, gs[a], 1); C.check(lib.ml_hookrt_release_group(rt, gs[a]))
            materialize(rt, gs[b], 1); C.check(lib.ml_hookrt_release_group(rt, gs[b]))
            C.check(lib.ml_hookrt_wait(rt))
            return stats(rt).prefetch_jobs
         end
         step(1, 2)                                          -- learns g1 -> g2 (and g2 -> g1)
         local before = step(1, 2)                           -- g1 reads g2 ahead
         local after = step(1, 3)                            -- g1 read g2 ahead, but g3 came: g1 -> g3 unsure
         assert.is_true(after > before)
         assert.are.equal(gs[3], lib.ml_hookrt_next(rt, gs[1]))
         local unsure = stats(rt).prefetch_jobs
         materialize(rt, gs[1], 1)                           -- an unsure link: nothing read ahead
         C.check(lib.ml_hookrt_wait(rt))
         assert.are.equal(unsure, stats(rt).prefetch_jobs)
         C.check(lib.ml_hookrt_release_group(rt, gs[1]))
         materialize(rt, gs[3], 1); C.check(lib.ml_hookrt_release_group(rt, gs[3]))   -- g3 again: sure
         local sure = stats(rt).prefetch_jobs
         materialize(rt, gs[1], 1)                           -- now g1 reads g3 ahead
         C.check(lib.ml_hookrt_wait(rt))
         assert.is_true(stats(rt).prefetch_jobs > sure)
         C.check(lib.ml_hookrt_release_group(rt, gs[1]))
      end)

      it("reads ahead several groups within the lookahead window", function()
         local rt = new_rt()
         C.check(lib.ml_hookrt_set_prefetch_window(rt, -1, 2 * 64 * 64 * 4))
         local view = mapped_floats(4 * 4096)
         local gs = {}
         for i = 1, 4 do
            gs[i] = new_group(rt)
            add(rt, gs[i], view((i - 1) * 4096, { 64, 64 }))
         end
         for i = 1, 4 do materialize(rt, gs[i], 1); C.check(lib.ml_hookrt_release_group(rt, gs[i])) end
         -- pass two, first group only: g2 and g3 fit the window, g4 does not
         materialize(rt, gs[1], 1)
         C.check(lib.ml_hookrt_wait(rt))
         assert.are.equal(2, stats(rt).prefetch_jobs)
         C.check(lib.ml_hookrt_release_group(rt, gs[1]))
         -- g2 is already queued: materializing it queues only g4
         materialize(rt, gs[2], 1)
         C.check(lib.ml_hookrt_wait(rt))
         assert.are.equal(3, stats(rt).prefetch_jobs)
      end)

      it("reads the first groups ahead again when a forward begins, their pages may have left since", function()
         local rt = new_rt()
         local view = mapped_floats(3 * 4096)
         local gs = three_groups(rt, view)
         C.check(lib.ml_hookrt_forward_begins(rt))         -- nothing learned yet: nothing to read
         assert.are.equal(0, stats(rt).prefetch_jobs)
         run_passes(rt, gs, 2)
         C.check(lib.ml_hookrt_wait(rt))
         assert.are.equal(3, stats(rt).prefetch_jobs)        -- g3 read g1 ahead at the end of pass two
         C.check(lib.ml_hookrt_forward_begins(rt))         -- g1 again, and only g1 (the window)
         C.check(lib.ml_hookrt_wait(rt))
         assert.are.equal(4, stats(rt).prefetch_jobs)
         C.check(lib.ml_hookrt_set_prefetch_window(rt, -1, 2 * 64 * 64 * 4))
         C.check(lib.ml_hookrt_configure(rt, 0, -1))
         C.check(lib.ml_hookrt_forward_begins(rt))         -- prefetch off: nothing
         C.check(lib.ml_hookrt_configure(rt, 1, -1))
         C.check(lib.ml_hookrt_forward_begins(rt))         -- a window of two groups: g1 and g2
         C.check(lib.ml_hookrt_wait(rt))
         assert.are.equal(6, stats(rt).prefetch_jobs)
      end)

      it("skips groups below the prefetch threshold", function()
         local rt = new_rt()
         C.check(lib.ml_hookrt_set_prefetch_window(rt, 64 * 64 * 4 + 1, -1))
         local view = mapped_floats(3 * 4096)
         local gs = three_groups(rt, view)
         run_passes(rt, gs, 2)
         C.check(lib.ml_hookrt_wait(rt))
         assert.are.equal(0, stats(rt).prefetch_jobs)
         assert.has_error(function() C.check(lib.ml_hookrt_set_prefetch_window(rt, -2, 0)) end,
            "ml_hookrt_set_prefetch_window: sizes must be >= 0 (-1 keeps one), got -2 and 0")
      end)

      it("gives the same values with prefetch on and off", function()
         local sums = {}
         for _, pf in ipairs({ 1, 0 }) do
            local rt = new_rt()
            C.check(lib.ml_hookrt_configure(rt, pf, 2))
            local view = mapped_floats(3 * 4096)
            local gs = three_groups(rt, view)
            local total = 0
            for _ = 1, 3 do
               for i = 1, 3 do
                  local out = materialize(rt, gs[i], 1)
                  for _, row in ipairs(out[1]:tolist()) do
                     for _, v in ipairs(row) do total = total + v end
                  end
                  C.check(lib.ml_hookrt_release_group(rt, gs[i]))
               end
            end
            C.check(lib.ml_hookrt_wait(rt))
            sums[#sums + 1] = total
            if pf == 0 then assert.are.equal(0, stats(rt).prefetch_jobs) end
         end
         local n = 3 * 4096
         assert.are.equal(3 * (n - 1) * n / 2, sums[1])
         assert.are.equal(sums[1], sums[2])
      end)

      it("drops whole pages of released mapped tensors and keeps pages in use by another group", function()
         local rt = new_rt()
         C.check(lib.ml_hookrt_configure(rt, -1, 1))
         local view = mapped_floats(2 * 4096)
         local g1, g2 = new_group(rt), new_group(rt)
         local w = view(0, { 4096 })
         add(rt, g1, w)
         add(rt, g2, w)                         -- tied: same bytes in both groups
         add(rt, g2, view(4096, { 4096 }))
         materialize(rt, g1, 1)
         materialize(rt, g2, 2)
         C.check(lib.ml_hookrt_release_group(rt, g1))
         assert.are.equal(0, stats(rt).bytes_dropped)   -- g2 still reads the tied bytes
         C.check(lib.ml_hookrt_release_group(rt, g2))
         assert.are.equal(2 * 4096 * 4, stats(rt).bytes_dropped)
         -- dropped pages come back from the file on the next read
         local out = materialize(rt, g2, 2)
         assert.are.equal(4096 + 5, out[2]:tolist()[6])
      end)

      it("auto keeps pages while the mapped weights are under the threshold, drops them above", function()
         local rt = new_rt()                    -- auto is the default
         local view = mapped_floats(2 * 4096)
         local g = new_group(rt)
         add(rt, g, view(0, { 2 * 4096 }))     -- 32 KiB mapped in all
         assert.are.equal(32 * 1024, stats(rt).bytes_mapped)
         C.check(lib.ml_hookrt_set_auto_drop(rt, 32 * 1024))
         materialize(rt, g, 1)
         C.check(lib.ml_hookrt_release_group(rt, g))
         assert.are.equal(0, stats(rt).bytes_dropped)
         C.check(lib.ml_hookrt_set_auto_drop(rt, 32 * 1024 - 1))
         materialize(rt, g, 1)
         C.check(lib.ml_hookrt_release_group(rt, g))
         assert.are.equal(2 * 4096 * 4, stats(rt).bytes_dropped)
         C.check(lib.ml_hookrt_group_free(rt, g))          -- a freed group's bytes leave the count
         assert.are.equal(0, stats(rt).bytes_mapped)
      end)

      it("keeps pages with drop level 0", function()
         local rt = new_rt()
         C.check(lib.ml_hookrt_configure(rt, -1, 0))
         local view = mapped_floats(4096)
         local g = new_group(rt)
         add(rt, g, view(0, { 4096 }))
         materialize(rt, g, 1)
         C.check(lib.ml_hookrt_release_group(rt, g))
         assert.are.equal(0, stats(rt).bytes_dropped)
      end)
   end)

   -- Streaming ahead to a cuda execution device (the uploads of upload.c), one group ahead.
   describe("streaming ahead to cuda:0 #cuda", function()
      -- A runtime streaming one group ahead, and groups of CPU-RAM weights executing on cuda:0 in
      -- this order: a big one, a norm-sized one, then three big ones; after two passes (the order
      -- is learned).
      local function learned_layer_groups()
         local rt = new_rt()
         C.check(lib.ml_hookrt_set_stream_window(rt, 0))
         ml.manual_seed(3)
         local gs, ws = {}, {}
         for i, n in ipairs({ 65536, 16, 65536, 65536, 65536 }) do
            gs[i] = new_group(rt, "cuda:0")
            ws[i] = ml.rand({ n })
            add(rt, gs[i], ws[i])
         end
         for _ = 1, 2 do
            for _, g in ipairs(gs) do materialize(rt, g, 1); C.check(lib.ml_hookrt_release_group(rt, g)) end
         end
         return rt, gs, ws
      end

      it("takes the group after a far smaller one too, so a norm does not leave the copy engine idle", function()
         local rt, gs, ws = learned_layer_groups()
         -- the pending uploads as each group is materialized: the norm and the big group after it,
         -- then just that one, then one each
         local pending = {}
         for i, g in ipairs(gs) do
            local got = materialize(rt, g, 1)
            pending[i] = stats(rt).streams_pending
            assert.are.same(ws[i]:tolist(), got[1]:to("cpu"):tolist())
            C.check(lib.ml_hookrt_release_group(rt, g))
         end
         assert.are.same({ 2, 1, 1, 1, 1 }, pending)
      end)

      it("queues the next group's upload before it waits for this group's", function()
         local rt, gs, ws = learned_layer_groups()
         local before = stats(rt)
         for _ = 1, 3 do
            for i, g in ipairs(gs) do
               local got = materialize(rt, g, 1)
               assert.are.same(ws[i]:tolist(), got[1]:to("cpu"):tolist())
               C.check(lib.ml_hookrt_release_group(rt, g))
            end
         end
         local after = stats(rt)
         assert.is_true(after.bytes_streamed > before.bytes_streamed)
         -- a wait with nothing queued behind it would be a drain; every group has one behind it
         -- (the last one the first of the next pass)
         assert.are.equal(before.stream_drains, after.stream_drains)
      end)

      it("streams each device's next group past the other device's, and neither drops the other's", function()
         if ml.cuda_device_count() < 2 then pending("needs two CUDA devices (make test-cuda-sim emulates two)") return end
         local rt = new_rt()
         C.check(lib.ml_hookrt_set_stream_window(rt, 0))
         ml.manual_seed(4)
         local gs, ws = {}, {}
         for i = 1, 4 do                   -- cuda:0, cuda:1, cuda:0, cuda:1
            gs[i] = new_group(rt, i % 2 == 1 and "cuda:0" or "cuda:1")
            ws[i] = ml.rand({ 4096 })
            add(rt, gs[i], ws[i])
         end
         local function pass()
            for i, g in ipairs(gs) do
               local got = materialize(rt, g, 1)
               assert.are.same(ws[i]:tolist(), got[1]:to("cpu"):tolist())
               C.check(lib.ml_hookrt_release_group(rt, g))
            end
         end
         pass(); pass()
         local before = stats(rt)
         pass(); pass()
         local after = stats(rt)
         assert.are.equal(before.streams_dropped, after.streams_dropped)
         assert.are.equal(after.bytes_copied - before.bytes_copied, after.bytes_streamed - before.bytes_streamed)
      end)
   end)
end)
