#!/opt/ref/bin/python
"""transformers peer for bench/fp8_load.lua: loads the FP8 DeepSeek-V3-shaped folder the Lua side
wrote with FineGrainedFP8Config(dequantize=True) (its weights dequantized to bfloat16 as they load:
transformers' FP8 kernels need a GPU), then N greedy tokens after a P-token prompt. Reports seconds
to load, the growth of resident memory over the load and a warm-up generation, seconds to generate
and the ids. Prints one JSON object.

Usage: python bench/fp8_load_peer.py --dir DIR [--prompt P] [--new N] [--threads N]
"""
from transformers import AutoModelForCausalLM, FineGrainedFP8Config

from peerutil import load_and_generate, parse


def main():
    a = parse(dir="", prompt=32, new=16)
    load_and_generate(a, lambda: AutoModelForCausalLM.from_pretrained(
        a.dir, quantization_config=FineGrainedFP8Config(dequantize=True)),
        weights=lambda m: str(m.model.layers[1].self_attn.kv_b_proj.weight.dtype))


if __name__ == "__main__":
    main()
