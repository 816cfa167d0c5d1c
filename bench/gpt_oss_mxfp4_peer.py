#!/opt/ref/bin/python
"""transformers peer for bench/gpt_oss_mxfp4.lua: loads the MXFP4 gpt-oss-shaped folder the Lua
side wrote (on a machine without a GPU transformers dequantizes the experts to bfloat16 as they
load: its MXFP4 kernels need one), then N greedy tokens after a P-token prompt. Reports seconds to
load, the growth of resident memory over the load and a warm-up generation, seconds to generate
and the ids. Prints one JSON object.

Usage: python bench/gpt_oss_mxfp4_peer.py --dir DIR [--prompt P] [--new N] [--threads N]
"""
import torch
from transformers import AutoModelForCausalLM

from peerutil import load_and_generate, parse


def main():
    a = parse(dir="", prompt=32, new=16)
    load_and_generate(a, lambda: AutoModelForCausalLM.from_pretrained(a.dir, dtype=torch.bfloat16),
                      experts=lambda m: str(m.model.layers[0].mlp.experts.gate_up_proj.dtype),
                      attn_implementation=lambda m: m.config._attn_implementation)


if __name__ == "__main__":
    main()
