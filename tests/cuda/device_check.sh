#!/usr/bin/env bash
# The GPU check, for a lent GPU machine (see the device tool): sets up the carried Lua runtime,
# makes sure libmoonload_cuda.so loads there (rebuilding it with that machine's nvcc if the one
# built here does not), runs the #cuda specs and the GPU benchmarks, and prints a short table.
# About 7.5 minutes at most (specs 90 s + one file's 120 s, ceilings 45 s, Llama 200 s; SPEC_S,
# SPEC_FILE_S, CEILINGS_S, LLAMA_S); on the H200 of 2026-11-30 it took about 5 (specs 110 s,
# cuda_spec.lua 82 s of them).
# Prepare on the development machine with `make device-prep` (CUDA build, the libraries and the
# packed runtime in .device, fixtures the tree cannot carry moved aside), then run with the carry
# it prints, [".device", "lua/moonload/cdef.lua"]:
#   bash tests/cuda/device_check.sh
# and afterwards `make device-restore` here. The specs of the families whose fixtures stayed
# behind (.device/left_behind.txt) are filtered out.
# A dry run of this script on the CUDA emulator, here, before spending device time:
#   make test-cuda-sim && CUDASIM=1 bash tests/cuda/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
RUNTIME=${RUNTIME:-.device/runtime}
OUT=${OUT:-/tmp/moonload-device-check}
mkdir -p "$OUT"
if [ "${CUDASIM:-0}" = 1 ]; then
  export MOONLOAD_CUDA_LIB=build/cudasim/libmoonload_cuda.so BENCH_SHAPE=tiny BENCH_LAYERS=2 BENCH_REPEATS=1
  echo "== DRY RUN on the CUDA emulator: the benchmark figures below mean nothing"
else
  [ -x "$RUNTIME/bin/luajit" ] || tar -C "$(dirname "$RUNTIME")" -xzf "$RUNTIME.tgz"
  [ -d .device/lib ] && mkdir -p build && cp .device/lib/*.so build/
  # shellcheck disable=SC1091
  source "$RUNTIME/env.sh"
fi
# Line-buffered output where coreutils has stdbuf: a spec file cut off by its timeout keeps its lines.
LINEBUF=$(command -v stdbuf >/dev/null && echo "stdbuf -oL" || true)

# cuBLAS/cudart 13 from the CUDA toolkit or from the nvidia-* Python wheels, wherever they are.
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda-13*/lib64 \
         $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, s, "lib") for p in nvidia.__path__ for s in os.listdir(p)))' 2>/dev/null); do
  [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH

probe='local ml = require("moonload"); io.write(ml.cuda_device_count())'
count=$(luajit -e "package.path='lua/?.lua;lua/?/init.lua;'..package.path; $probe" 2>"$OUT/probe.err")
if [ "${count:-0}" = "0" ] && command -v nvcc >/dev/null; then
  echo "== libmoonload_cuda.so did not load ($(head -c 300 "$OUT/probe.err")); rebuilding it here"
  rm -rf build/cuda build/libmoonload_cuda.so
  make -j"$(nproc)" CUDA=1 NVCC="$(command -v nvcc)" build/libmoonload_cuda.so > "$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
  count=$(luajit -e "package.path='lua/?.lua;lua/?/init.lua;'..package.path; $probe" 2>>"$OUT/probe.err")
fi
echo "== CUDA devices seen by moonload: ${count:-0}"
[ "${count:-0}" != "0" ] && luajit -e "package.path='lua/?.lua;lua/?/init.lua;'..package.path
  local p = require('moonload').cuda.get_device_properties(0)
  print(string.format('== cuda:0 is %s, compute capability %d.%d, %d SMs, %.1f GiB', p.name, p.major, p.minor,
    p.multi_processor_count, p.total_memory / 2^30))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

echo "== #cuda specs"
# One busted per spec file, each under its own timeout, so that a crash or a hang in one file
# costs that file alone; no new file starts once SPEC_S seconds have gone.
: > "$OUT/cuda_specs.tap"
# The files with #cuda specs: those that name the tag, and those that require a helper that does
# (ops_helpers.lua's PyTorch-reference describes).
cuda_helpers=$(grep -l "#cuda" tests/*.lua | grep -v '_spec\.lua$' | xargs -r -n1 basename | sed 's/\.lua$//' | paste -sd'|')
spec_files=$(grep -lE "#cuda${cuda_helpers:+|require\(\"($cuda_helpers)\"\)}" tests/*_spec.lua)
filter_out=()
if [ -f .device/left_behind.txt ]; then
  while read -r n; do [ -n "$n" ] && filter_out+=("--filter-out=%f[%w_]${n}%f[^%w_]"); done < .device/left_behind.txt
  echo "== specs of ${#filter_out[@]} families left behind (their fixtures did not travel) are filtered out"
fi
spec_start=$SECONDS
for f in ${SPEC_FILES:-$spec_files}; do
  if [ $((SECONDS - spec_start)) -ge "${SPEC_S:-90}" ]; then echo "# not run (time): $f" >> "$OUT/cuda_specs.tap"; continue; fi
  t0=$SECONDS
  timeout "${SPEC_FILE_S:-120}" $LINEBUF busted --tags=cuda "${filter_out[@]}" -o TAP "$f" >> "$OUT/cuda_specs.tap" 2>&1
  echo "# $f: rc $? in $((SECONDS - t0)) s" >> "$OUT/cuda_specs.tap"
done
passed=$(grep -c '^ok ' "$OUT/cuda_specs.tap"); failed=$(grep -c '^not ok ' "$OUT/cuda_specs.tap")
listed=$(busted --tags=cuda "${filter_out[@]}" --list ${SPEC_FILES:-$spec_files} 2>/dev/null | wc -l)
echo "== $((passed + failed)) of the $listed #cuda specs listed ran"
grep '^# .*: rc [^0]' "$OUT/cuda_specs.tap"; grep '^# not run' "$OUT/cuda_specs.tap"
grep -A4 '^not ok ' "$OUT/cuda_specs.tap" | head -60

echo "== GPU benchmarks"
export LUA_PATH="lua/?.lua;lua/?/init.lua;bench/lib/?.lua;;"
timeout "${CEILINGS_S:-45}" luajit bench/cuda/ceilings.lua > "$OUT/ceilings.jsonl" 2>"$OUT/ceilings.err"; cat "$OUT/ceilings.jsonl"
BENCH_PYTHON=${BENCH_PYTHON:-python3} timeout "${LLAMA_S:-200}" $LINEBUF luajit bench/cuda/llama_stream.lua > "$OUT/llama.jsonl" 2>"$OUT/llama.err"
cat "$OUT/llama.jsonl"; tail -5 "$OUT/llama.err"

echo
echo "| check | result |"
echo "|---|---|"
echo "| cuda specs | $passed passed, $failed failed (of $listed listed) |"
OUT="$OUT" luajit -e '
local cjson = require("cjson")
local out = os.getenv("OUT")
for _, f in ipairs({ out .. "/ceilings.jsonl", out .. "/llama.jsonl" }) do
   local h = io.open(f)
   if h then
      for line in h:lines() do
         local ok, r = pcall(cjson.decode, line)
         if ok then
            local v = r.tflops and string.format("%.1f TFLOP/s", r.tflops) or r.gbps and string.format("%.1f GB/s", r.gbps)
               or r.ratio_to_floor and string.format("%.3f s per forward (one module ahead %.3f s, no prefetch %.3f s, the uploads alone %.3f s; uploader busy %.3f s, host blocked %.3f s, %d drains); floor %.3f s at %.1f GB/s: %.2fx (%.2fx the floor of the %.2f GB moved)",
                  r.forward_s, r.forward_one_ahead_s, r.forward_no_prefetch_s, r.upload_only_s or 0 / 0, r.window_busy_s or 0 / 0,
                  r.window_host_wait_s or 0 / 0, r.window_drains or -1, r.floor_s, r.h2d_gbps, r.ratio_to_floor,
                  r.ratio_to_moved_floor or 0 / 0, (r.bytes_moved or 0 / 0) / 1e9)
               or r.ratio_to_accelerate and string.format("accelerate %.3f s per forward: moonload takes %.2fx its time",
                  r.accelerate_s, r.ratio_to_accelerate)
               or r.ratio_pinned_to_floor and string.format("pinned weights %.3f s per forward; floor %.3f s at %.1f GB/s: %.2fx; pinned in place %.3f s per forward, %.2fx (locking took %.2f s)",
                  r.forward_pinned_s, r.floor_pinned_s, r.h2d_pinned_gbps, r.ratio_pinned_to_floor,
                  r.forward_in_place_s or 0 / 0, r.ratio_in_place_to_floor or 0 / 0, r.pin_in_place_s or 0 / 0)
               or r.in_place_tokens_per_s and string.format("decode %.2f tokens/s streamed, %.2f in place on the CPU (%.2fx)",
                  r.streamed_tokens_per_s, r.in_place_tokens_per_s, r.speedup)
               or r.blocked_s and string.format("8 prompts of 512: %.3f s one forward each, %.3f s in a block schedule (%.2fx), %.3f s as one batch",
                  r.one_by_one_s, r.blocked_s, r.blocked_speedup, r.whole_s)
               or r.quantized_forward_s and string.format("%s weights streamed: %.3f s per forward (%.2fx the speed of bfloat16); floor %.3f s",
                  r.bench:match("_(int%d)$") or "quantized", r.quantized_forward_s, r.quantized_speedup, r.quantized_floor_s)
               or r.int8_decode_speedup and string.format("resident decode: %.1f tokens/s bfloat16, %.1f int8 (%.2fx), %.1f with the int8 cache too, %.1f int4",
                  r.bf16_tokens_per_s, r.int8_tokens_per_s, r.int8_decode_speedup, r.int8_kv_tokens_per_s, r.int4_tokens_per_s or 0)
               or r.skipped or "?"
            local notes = {}
            for _, k in ipairs({ "pinned_note", "peer_note", "quantized_note", "resident_note" }) do if r[k] then notes[#notes + 1] = r[k] end end
            if #notes > 0 then v = v .. " (" .. table.concat(notes, "; ") .. ")" end
            print(string.format("| %s | %s |", r.bench, v))
         end
      end
      h:close()
   end
end'
echo "$passed passed, $failed failed"
