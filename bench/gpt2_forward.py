#!/opt/ref/bin/python
"""PyTorch/transformers peer for bench/gpt2_forward.lua: GPT-2-small shape (12 layers, d=768,
12 heads, vocab 50257), random float32 weights, CPU.

Measures (1) forward on 1x128 tokens, median seconds; (2) greedy decode of 64 new tokens with
the KV cache through transformers' generate, tokens/s. Prints one JSON object.

Usage: python bench/gpt2_forward.py [--threads N] [--repeats R] [--prompt P] [--new N]
"""
import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--layers", type=int, default=12)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=a.layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, a.seq))
    with torch.inference_mode():
        for _ in range(2):
            model(ids)
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t0)
        prompt = ids[:, : a.prompt]
        gen_kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, num_beams=1,
                      use_cache=True, pad_token_id=0, eos_token_id=None)
        model.generate(prompt, **dict(gen_kw, max_new_tokens=4, min_new_tokens=4))
        dts = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = model.generate(prompt, **gen_kw)
            dts.append(time.perf_counter() - t0)
        assert out.shape[1] == a.prompt + a.new
    dt = statistics.median(dts)
    print(json.dumps({
        "peer": "torch", "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "layers": a.layers,
        "forward_seq": a.seq, "forward_s": statistics.median(times), "forward_best_s": min(times),
        "decode_prompt": a.prompt, "decode_new_tokens": a.new, "decode_s": dt, "decode_best_s": min(dts),
        "decode_tokens_per_s": a.new / dt,
    }))


if __name__ == "__main__":
    main()
