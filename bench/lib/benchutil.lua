--- Helpers shared by the benchmarks in bench/: a wall clock, best-of-n timing and medians, JSON
-- lines, the thread count, the peers' JSON output, /proc figures, MINSTD prompts and the demo
-- checkpoint.
-- bench/run.sh puts bench/lib on LUA_PATH; a benchmark run on its own adds it to package.path.
local ffi = require("ffi")

ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } ml_bench_timespec;
int clock_gettime(int clk, ml_bench_timespec *ts);
void *memcpy(void *dst, const void *src, size_t n);
]]

local M = {}
local ts = ffi.new("ml_bench_timespec")

--- Seconds on the monotonic clock (wall time: threads do not add up as in os.clock).
function M.now()
   ffi.C.clock_gettime(1, ts)
   return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

--- Best wall time of fn over reps runs, after one warm-up run.
function M.best(reps, fn)
   fn()
   local best = math.huge
   for _ = 1, reps do
      local t0 = M.now()
      fn()
      local dt = M.now() - t0
      if dt < best then best = dt end
   end
   return best
end

local function encode(v)
   if type(v) == "number" then
      if v ~= v or v == math.huge or v == -math.huge then return "null" end
      if v % 1 == 0 and math.abs(v) < 2 ^ 53 then return string.format("%d", v) end
      return string.format("%.4g", v)
   elseif type(v) == "boolean" then return tostring(v)
   else return require("cjson").encode(tostring(v)) end   -- %q would leave raw newlines
end

--- Prints one JSON line from a flat table; keys in the order given by `order`.
function M.emit(order, rec)
   local parts = {}
   for _, k in ipairs(order) do
      if rec[k] ~= nil then parts[#parts + 1] = encode(k) .. ":" .. encode(rec[k]) end
   end
   io.write("{", table.concat(parts, ","), "}\n")
   io.flush()
end

--- The directory holding the compiled C peers (set by bench/run.sh).
M.bin = os.getenv("MOONLOAD_BENCH_BIN") or "build/bench"

--- Best wall time of fn over reps runs after one warm-up; the previous result is collected
-- (untimed) before each run so its memory can be reused or returned.
function M.best_collect(reps, fn)
   local r = fn()
   local best = math.huge
   for _ = 1, reps do
      r = nil
      collectgarbage()
      collectgarbage()
      local t0 = M.now()
      r = fn()
      local dt = M.now() - t0
      if dt < best then best = dt end
   end
   return best
end

--- The median of a list of numbers (sorts the list in place); nil for an empty list.
function M.median(xs)
   table.sort(xs)
   local n = #xs
   if n == 0 then return nil end
   if n % 2 == 1 then return xs[(n + 1) / 2] end
   return (xs[n / 2] + xs[n / 2 + 1]) / 2
end

--- The number of online CPUs (nproc), 1 when that cannot be read.
function M.nproc()
   local p = io.popen("nproc 2>/dev/null")
   local n = p and tonumber(p:read("*l")) or nil
   if p then p:close() end
   return n or 1
end

--- The Python that runs the peers: $BENCH_PYTHON, default /opt/ref/bin/python.
M.python = os.getenv("BENCH_PYTHON") or "/opt/ref/bin/python"

--- Whether that Python is there (a benchmark without it reports only its own side).
function M.have_python()
   local f = io.open(M.python, "rb")
   if not f then return false end
   f:close()
   return true
end

--- A number field of a /proc file ("/proc/self/status" VmHWM in KiB, "/proc/self/io" read_bytes).
function M.proc_field(file, field)
   local f = assert(io.open(file))
   local text = f:read("*a")
   f:close()
   return tonumber(text:match(field .. ":%s*(%d+)"))
end

--- Makes VmHWM start again from VmRSS (peak resident memory from now on); returns VmRSS in KiB.
function M.reset_peak_rss()
   local f = assert(io.open("/proc/self/clear_refs", "w"))
   f:write("5")
   f:close()
   return M.proc_field("/proc/self/status", "VmRSS")
end

--- batch prompts of length token ids below vocab from MINSTD (exact in doubles), the same as the
-- peers' (bench/fit_context_peer.py).
function M.minstd_prompts(batch, length, vocab)
   local seed, rows = 1, {}
   for b = 1, batch do
      rows[b] = {}
      for t = 1, length do
         seed = seed * 48271 % 2147483647
         rows[b][t] = seed % vocab
      end
   end
   return rows
end

--- compare_cold(script, base, others, budgets) -> rows: for each CPU budget, `script --variant V
-- BUDGET` run for base and each of others (a variant or a list) in processes of their own, with
-- released pages evicted from the page cache (MOONLOAD_DROP_PAGES=2); each prints a JSON object
-- with seconds, disk_read_mb and generated. A row holds the objects (less generated), each other
-- one with same_tokens, time_ratio and read_ratio against base.
function M.compare_cold(script, base, others, budgets)
   local cjson = require("cjson")
   local luajit = os.getenv("LUAJIT") or "luajit"
   if type(others) == "string" then others = { others } end
   local rows = {}
   for _, budget in ipairs(budgets) do
      local row = { budget = budget }
      for _, variant in ipairs({ base, unpack(others) }) do
         local r, err = M.run_json(string.format("MOONLOAD_DROP_PAGES=2 %s %s --variant %s %s", luajit, script, variant,
            budget), true)
         if not r then error(string.format("%s %s %s failed: %s", script, variant, budget, tostring(err))) end
         row[variant] = r
      end
      for _, variant in ipairs(others) do
         local r = row[variant]
         r.same_tokens = cjson.encode(r.generated) == cjson.encode(row[base].generated)
         r.time_ratio = r.seconds / row[base].seconds
         r.read_ratio = r.disk_read_mb / math.max(row[base].disk_read_mb, 1e-9)
         r.generated = nil
      end
      row[base].generated = nil
      rows[#rows + 1] = row
   end
   return rows
end

--- Runs a peer command (stderr dropped) and decodes the last JSON object it prints;
-- nil and the whole output when it printed none.
-- with_stderr: keep the command's stderr in the returned text (a failing peer's traceback).
function M.run_json(cmd, with_stderr)
   local p = io.popen(cmd .. (with_stderr and " 2>&1" or " 2>/dev/null"))
   local out = p:read("*a")
   p:close()
   local obj = out:match("(%b{})%s*$")
   if not obj then return nil, out end
   return require("cjson").decode(obj)
end

--- Runs `$BENCH_PYTHON args` as run_json does; nil and a note when there is no such Python.
function M.run_peer(args)
   if not M.have_python() then return nil, "no Python at " .. M.python .. " (set BENCH_PYTHON)" end
   return M.run_json(M.python .. " " .. args)
end

--- Runs the peer (`$BENCH_PYTHON args`) into result.peer and sets result[name] =
-- result[ours] / peer[theirs] for each {name, ours, theirs} of ratios; without a peer's JSON,
-- result.peer_note says why. Returns result.
function M.compare_with_peer(result, args, ratios)
   local ok, peer, note = pcall(M.run_peer, args)
   if ok and type(peer) == "table" then
      result.peer = peer
      for _, r in ipairs(ratios) do result[r[1]] = result[r[2]] / peer[r[3]] end
   elseif ok then
      result.peer_note = note and note:sub(1, 300) or "the peer printed no JSON"
   else
      result.peer_note = "peer failed: " .. tostring(peer)
   end
   return result
end

--- A checkpoint loaded and run in this process (a benchmark's --run half), printed as one JSON
-- line: load() -> model timed as load_s, then 2 greedy tokens to warm up, the growth of resident
-- memory over both (rss_growth_mb), and `new` greedy tokens after a `prompt`-token MINSTD prompt
-- (generate_s, generated). threads: the core's thread count.
function M.load_and_generate(load, prompt, new, threads)
   require("moonload.C").lib.ml_set_num_threads(threads)
   local rss0 = M.proc_field("/proc/self/status", "VmRSS")
   local t0 = M.now()
   local model = load()
   local load_s = M.now() - t0
   local ids = M.minstd_prompts(1, prompt, model.config.vocab_size)[1]
   model:generate(ids, { max_new_tokens = 2, eos_token_id = false })
   local rss = M.proc_field("/proc/self/status", "VmRSS") - rss0
   t0 = M.now()
   local out = model:generate(ids, { max_new_tokens = new, eos_token_id = false })
   print(require("cjson").encode({ load_s = load_s, rss_growth_mb = rss / 1024, generate_s = M.now() - t0,
      generated = { unpack(out, prompt + 1) } }))
end

--- The other half: `script --run` in a process of its own (load_and_generate's line) against the
-- peer (`$BENCH_PYTHON peer_args`, printing load_s, rss_growth_mb, generate_s and generated):
-- result = fields plus moonload, peer, the three ratios (ours / theirs) and same_prefix (how many
-- generated ids agree before the first that differs). Prints result as one JSON line.
function M.load_generate_versus_peer(script, peer_args, fields)
   local cjson = require("cjson")
   local mine, err = M.run_json(string.format("%s %s --run", os.getenv("LUAJIT") or "luajit", script), true)
   if not mine then error("moonload run failed: " .. tostring(err)) end
   local result = {}
   for k, v in pairs(fields) do result[k] = v end
   result.moonload = mine
   local peer, perr = M.run_peer(peer_args)
   if peer then
      result.peer = peer
      result.same_prefix = 0
      while mine.generated[result.same_prefix + 1] ~= nil
         and mine.generated[result.same_prefix + 1] == peer.generated[result.same_prefix + 1] do
         result.same_prefix = result.same_prefix + 1
      end
      result.load_ratio = mine.load_s / peer.load_s
      result.rss_ratio = mine.rss_growth_mb / peer.rss_growth_mb
      result.generate_ratio = mine.generate_s / peer.generate_s
      peer.generated = nil
   else
      result.peer_note = "peer failed: " .. tostring(perr)
   end
   mine.generated = nil
   print(cjson.encode(result))
   return result
end

--- A load-and-generate benchmark of the folder dir, both halves: run as `bench/<name>.lua --run`
-- it is the moonload process; else it writes the folder (write(), when dir/config.json is not
-- there yet) and compares that process with bench/<peer>.py (bench/<name>_peer.py by default).
function M.load_generate_main(name, dir, prompt, new, threads, write, peer)
   if arg[1] == "--run" then
      return M.load_and_generate(function() return require("moonload").models.from_pretrained(dir) end, prompt, new,
         threads)
   end
   if not io.open(dir .. "/config.json") then
      os.execute("mkdir -p " .. dir)
      write()
   end
   return M.load_generate_versus_peer("bench/" .. name .. ".lua",
      string.format("bench/%s.py --dir %s --prompt %d --new %d --threads %d", peer or name .. "_peer", dir, prompt, new,
         threads),
      { bench = name, prompt = prompt, new_tokens = new, threads = threads })
end

--- random_ssm_weights(model) -> name -> bfloat16 tensor for every parameter of an empty model with
-- Mamba mixers, in ranges that keep a forward finite and its state alive: decay rates exp(0..2)
-- (A_log), norms near 1, the other vectors (dt_bias, D, conv biases) 1, steps' biases (dt_proj)
-- softplus(-6..-2), matrices N(0, 0.02).
function M.random_ssm_weights(model)
   local ml = require("moonload")
   local sd = {}
   for name, p in model:named_parameters() do
      local t
      if name:find("A_log$") then t = ml.rand(p.shape) * 2
      elseif name:find("norm") and p:dim() == 1 then t = 1 + ml.randn(p.shape) * 0.02
      elseif name:find("dt_proj%.bias$") then t = ml.rand(p.shape) * 4 - 6
      elseif p:dim() == 1 then t = ml.ones(p.shape)
      else t = ml.randn(p.shape) * 0.02 end
      sd[name] = t:to("bfloat16")
   end
   return sd
end

--- Writes a benchmark folder's config.json last, through a temporary name: its presence says
-- the folder is whole.
function M.write_config_last(dir, text)
   local f = assert(io.open(dir .. "/config.json.tmp", "w"))
   f:write(text)
   f:close()
   assert(os.rename(dir .. "/config.json.tmp", dir .. "/config.json"))
end

--- Makes sure the demo's GPT-2-small-shaped checkpoint exists (`examples/demo.lua --write-only`,
-- run with $LUAJIT); returns its folder and the path of its model.safetensors.index.json.
function M.demo_checkpoint()
   local luajit = os.getenv("LUAJIT") or "luajit"
   local p = io.popen(luajit .. " examples/demo.lua --write-only")
   local dir = p:read("*a"):match("([^\n]+)%s*$")
   p:close()
   return dir, dir .. "/model.safetensors.index.json"
end

return M
