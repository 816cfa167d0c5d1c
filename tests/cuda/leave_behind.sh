#!/usr/bin/env bash
# The device tool sends the whole working tree (tracked files and carried paths) and refuses more
# than 64 MiB; the fixtures alone are over 50. `leave_behind.sh out` moves aside, into the ignored
# build/left-behind/, what the GPU check can do without until the tree fits: first the tokenizer
# and chat-template fixtures (no #cuda spec reads them), then the largest model fixtures that only
# the per-family lists use. It writes their names to .device/left_behind.txt, from which
# device_check.sh filters out every #cuda spec whose description names one: so a #cuda spec that
# reads a model fixture names it in its description. `leave_behind.sh back` puts everything back
# (`git checkout -- tests/fixtures` would too: they are all tracked).
set -euo pipefail
cd "$(dirname "$0")/../.."
AWAY=build/left-behind
LIST=.device/left_behind.txt
# 60 MiB counted in 4 KiB blocks: what went through on 2026-11-30, where 62 MiB of bytes (66 in
# blocks) was refused.
LIMIT=${DEVICE_TREE_LIMIT:-$(( 60 << 20 ))}

back() {
  [ -d "$AWAY" ] || return 0
  (cd "$AWAY" && find . -type f -print0) | while IFS= read -r -d '' f; do
    mkdir -p "$(dirname "$f")"; mv "$AWAY/$f" "$f"
  done
  rm -rf "$AWAY" "$LIST"
  echo "leave_behind: fixtures back in place"
}

# Bytes that would travel: tracked files present in the tree, then the carried paths, each
# counted in whole 4 KiB blocks (the tool's own count came out above the bytes alone).
travelling() {
  local tracked
  tracked=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=int(($1+4095)/4096)*4096} END {print s+0}')
  echo $(( tracked + $(du -s --block-size=1 "$@" | awk '{s+=$1} END {print s}') ))
}

away() { # move one tracked path (file or folder) aside
  local p=$1
  [ -e "$p" ] || return 0
  mkdir -p "$AWAY/$(dirname "$p")"; mv "$p" "$AWAY/$p"
}

case "${1:-}" in
back) back ;;
out)
  shift
  back >/dev/null
  total=$(travelling "$@")
  mkdir -p "$(dirname "$LIST")"; : > "$LIST"
  for p in tests/fixtures/tokenizers tests/fixtures/chat_templates; do
    [ "$total" -lt "$LIMIT" ] && break
    size=$(du -s --block-size=1 "$p" | cut -f1); away "$p"; total=$((total - size))
  done
  # Model fixtures named in cuda_spec.lua's list of generating families, largest first, save those
  # that the device-specific specs use by name.
  keep='^(gpt2_tiny|llama_tiny_untied|llama_tiny_tied|mamba_tiny|qwen3_moe_tiny|deepseek_v3_tiny|gpt_neox_tiny|gemma2_tiny|mistral_tiny|gemma4_tiny|qwen2_tiny|qwen3_tiny)$'
  names=$(sed -n '/for _, name in ipairs({ "gpt2_tiny", "llama_tiny_untied"/,/}) do/p' tests/cuda_spec.lua |
    grep -o '"[a-z0-9_]*"' | tr -d '"' | grep -Ev "$keep" || true)
  for n in $(for n in $names; do [ -d "tests/fixtures/models/$n" ] && echo "$(du -sb "tests/fixtures/models/$n" | cut -f1) $n"; done | sort -rn | cut -d' ' -f2); do
    [ "$total" -lt "$LIMIT" ] && break
    size=$(du -s --block-size=1 "tests/fixtures/models/$n" | cut -f1); away "tests/fixtures/models/$n"; total=$((total - size))
    echo "$n" >> "$LIST"
  done
  if [ "$total" -ge "$LIMIT" ]; then
    echo "leave_behind: still $total bytes after moving everything it may; putting it back"; back; exit 1
  fi
  echo "leave_behind: $(wc -l < "$LIST") model fixtures (and the tokenizer fixtures) moved to $AWAY; $((total >> 20)) MiB travel"
  echo "leave_behind: put them back with \`make device-restore\` once the device run is done"
  ;;
*) echo "usage: $0 out CARRIED_PATH... | back" >&2; exit 2 ;;
esac
