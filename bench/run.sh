#!/bin/sh
# `make bench`: compiles the C peers in bench/c/ into build/bench/, then runs every bench/*.lua
# (LuaJIT) and bench/*.sh (except this file). Each benchmark prints JSON lines on stdout; drop a
# new file beside the others and it runs too. Not part of `make test`. Exits non-zero when any
# benchmark failed, after running the rest.
cd "$(dirname "$0")/.." || exit 1
CC=${CC:-cc}
LUAJIT=${LUAJIT:-luajit}
mkdir -p build/bench
for src in bench/c/*.c; do
   [ -e "$src" ] || continue
   exe="build/bench/$(basename "$src" .c)"
   $CC -O3 -march=x86-64-v3 -std=c11 -D_GNU_SOURCE -o "$exe" "$src" -lopenblas -lm || exit 1
done
LUA_PATH="lua/?.lua;lua/?/init.lua;bench/lib/?.lua;;"
MOONLOAD_BENCH_BIN="build/bench"
export LUA_PATH MOONLOAD_BENCH_BIN
status=0
for f in bench/*.lua; do
   [ -e "$f" ] || continue
   "$LUAJIT" "$f" || { echo "{\"bench\":\"$f\",\"error\":\"exited with status $?\"}"; status=1; }
done
for f in bench/*.sh; do
   [ "$f" = bench/run.sh ] && continue
   [ -e "$f" ] || continue
   sh "$f" || { echo "{\"bench\":\"$f\",\"error\":\"exited with status $?\"}"; status=1; }
done
exit $status
