#!/bin/sh
# Runs the safetensors libFuzzer target: fuzz/run.sh [RUNS] (default 1,000,000 inputs).
# Seeds: fuzz/corpus (committed, small valid files) + tests/fixtures/safetensors; new inputs go
# to build/fuzz/corpus. Any crash, leak or sanitizer report stops the run with a non-zero status
# and leaves the input as build/fuzz/crash-*.
set -e
RUNS=${1:-1000000}
BIN=${FUZZ_BIN:-build/fuzz/safetensors_fuzz}
mkdir -p build/fuzz/corpus
cp -n fuzz/corpus/* tests/fixtures/safetensors/*.safetensors build/fuzz/corpus/ 2>/dev/null || true
ASAN_OPTIONS=detect_leaks=1:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$BIN" -runs="$RUNS" -max_len=8192 -dict=fuzz/safetensors.dict -print_final_stats=1 \
  -artifact_prefix=build/fuzz/ build/fuzz/corpus 2>&1 | tee build/fuzz/last_run.log | \
  grep -E "^#[0-9]+ +(INITED|DONE|pulse)|stat::|ERROR|SUMMARY|runtime error" || true
grep -q "stat::number_of_executed_units" build/fuzz/last_run.log || { echo "fuzz: run failed, see build/fuzz/last_run.log"; exit 1; }
if grep -qE "ERROR: |SUMMARY: |runtime error" build/fuzz/last_run.log; then
  echo "fuzz: sanitizer report, see build/fuzz/last_run.log"; exit 1
fi
echo "fuzz: $(grep stat::number_of_executed_units build/fuzz/last_run.log | awk '{print $2}') inputs, no crash, leak or sanitizer report"
