#!/opt/ref/bin/python
"""transformers peer for bench/gpt_oss_mxfp4.lua: loads the MXFP4 gpt-oss-shaped folder the Lua
side wrote (on a machine without a GPU transformers dequantizes the experts to bfloat16 as they
load: its MXFP4 kernels need one), then N greedy tokens after a P-token prompt. Reports seconds to
load, the growth of resident memory over the load and a warm-up generation, seconds to generate
and the ids. Prints one JSON object.

Usage: python bench/gpt_oss_mxfp4_peer.py --dir DIR [--prompt P] [--new N] [--threads N]
"""
import json
import time

import torch
import transformers
from transformers import AutoModelForCausalLM

from fit_context_peer import kib
from peerutil import parse


def main():
    a = parse(dir="", prompt=32, new=16)
    rss0 = kib("VmRSS")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.dir, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    model.eval()
    seed, ids = 1, []
    for _ in range(a.prompt):
        seed = seed * 48271 % 2147483647
        ids.append(seed % model.config.vocab_size)
    x = torch.tensor([ids])
    with torch.no_grad():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=2, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
        rss = kib("VmRSS") - rss0
        t0 = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.new, min_new_tokens=a.new,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        gen_s = time.perf_counter() - t0
    print(json.dumps({"peer": "transformers", "torch": torch.__version__, "transformers": transformers.__version__,
                      "experts": str(model.model.layers[0].mlp.experts.gate_up_proj.dtype), "load_s": load_s,
                      "rss_growth_mb": rss / 1024, "generate_s": gen_s, "generated": out[0, a.prompt:].tolist(),
                      "attn_implementation": model.config._attn_implementation}))


if __name__ == "__main__":
    main()
