#!/opt/ref/bin/python
"""transformers peer for bench/compressed_load.lua: loads the compressed-tensors (pack-quantized
int4) Llama-shaped folder the Lua side wrote; compressed-tensors decompresses every layer to
bfloat16 as it loads on a machine without a GPU. Then N greedy tokens after a P-token prompt.
Reports seconds to load, the growth of resident memory over the load and a warm-up generation,
seconds to generate and the ids. Prints one JSON object.

Usage: python bench/compressed_load_peer.py --dir DIR [--prompt P] [--new N] [--threads N]
"""
from transformers import AutoModelForCausalLM

from peerutil import load_and_generate, parse


def main():
    a = parse(dir="", prompt=32, new=16)
    load_and_generate(a, lambda: AutoModelForCausalLM.from_pretrained(a.dir),
                      weights=lambda m: str(m.model.layers[1].self_attn.q_proj.weight.dtype))


if __name__ == "__main__":
    main()
