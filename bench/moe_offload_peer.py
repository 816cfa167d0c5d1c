#!/opt/ref/bin/python
"""Peer and fixture maker for bench/moe_offload.lua (run through BENCH_PYTHON, default
/opt/ref/bin/python).

  make --dir DIR      writes a Qwen3-MoE-shaped checkpoint with random weights to DIR (once):
                      6 layers, hidden 512, 32 experts of 512 with 2 chosen per token, float32,
                      about 650 MB, saved by transformers in the hub's per-expert layout
  decode --dir DIR    transformers' Qwen3MoeForCausalLM with every decoder layer on "disk"
                      (accelerate's disk offload, offload folder on the same file system): a
                      16-token prompt, then 16 greedy tokens with the cache; median seconds per
                      generated token over --repeats, and the generated ids

Each prints one JSON object with the library versions.
"""
import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def versions():
    import accelerate
    import transformers
    return {"accelerate": accelerate.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


PROMPT = [[11, 250, 3000, 17, 42, 999, 5, 7, 4096, 123, 456, 789, 21, 22, 23, 24]]


def make(args):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    if os.path.exists(os.path.join(args.dir, "config.json")):
        return {"dir": args.dir, "made": False}
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=8000, hidden_size=512, intermediate_size=1024, moe_intermediate_size=512,
                         num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                         num_experts=32, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(cfg)
    model.save_pretrained(args.dir, safe_serialization=True, max_shard_size="200MB")
    return {"dir": args.dir, "made": True}


def decode(args):
    from transformers import Qwen3MoeForCausalLM
    torch.set_num_threads(args.threads)
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for i in range(6):
        device_map[f"model.layers.{i}"] = "disk"
    folder = tempfile.mkdtemp(prefix="moe-offload-", dir=os.path.dirname(os.path.abspath(args.dir)))
    model = Qwen3MoeForCausalLM.from_pretrained(args.dir, device_map=device_map, offload_folder=folder,
                                                dtype=torch.float32).eval()
    ids = torch.tensor(PROMPT)
    times, out = [], None
    with torch.no_grad():
        for _ in range(args.repeats + 1):                     # the first run warms up
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 num_beams=1, eos_token_id=None, pad_token_id=0)
            times.append((time.perf_counter() - t0) / 16)
    import shutil
    shutil.rmtree(folder, ignore_errors=True)
    r = {"peer": "accelerate", "seconds_per_token": statistics.median(times[1:]),
         "generated": out[0, ids.shape[1]:].tolist(), "threads": args.threads}
    r.update(versions())
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["make", "decode"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    print(json.dumps({"make": make, "decode": decode}[args.what](args)))


if __name__ == "__main__":
    main()
