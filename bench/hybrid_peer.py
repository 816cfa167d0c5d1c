#!/opt/ref/bin/python
"""transformers peer for bench/qwen3_next.lua, bench/granite_hybrid.lua, bench/falcon_mamba.lua, bench/gemma4.lua
and bench/gpt_bigcode.lua:
loads the model's folder the Lua side wrote (bfloat16; without flash-linear-attention, causal-conv1d
and mamba-ssm installed, transformers runs its PyTorch fallbacks for the linear-attention and Mamba
layers), then N greedy tokens after a P-token prompt. Reports
seconds to load, the growth of resident memory over the load and a warm-up generation, seconds to
generate and the ids. Prints one JSON object.

Usage: python bench/hybrid_peer.py --dir DIR [--prompt P] [--new N] [--threads N]
"""
import torch
from transformers import AutoModelForCausalLM

from peerutil import load_and_generate, parse


def main():
    a = parse(dir="", prompt=128, new=32)
    load_and_generate(a, lambda: AutoModelForCausalLM.from_pretrained(a.dir, dtype=torch.bfloat16),
                      attn_implementation=lambda m: m.config._attn_implementation)


if __name__ == "__main__":
    main()
