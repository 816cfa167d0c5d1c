#!/opt/ref/bin/python
"""Peer for bench/assisted_generation.lua (run through BENCH_PYTHON, default /opt/ref/bin/python).

  decode --dir DIR --new N   transformers' LlamaForCausalLM from DIR (bfloat16) with every decoder
                             layer on "disk" (accelerate's disk offload, offload folder beside DIR;
                             each layer's files evicted from the page cache after it runs, with
                             --drop-pages 2, as moonload's hooks do), greedy decode of N tokens
                             after the same 64-token prompt: plain, then with assistant_model = a
                             copy in RAM with PyTorch's dynamic int8 linears (it has no int4 CPU
                             path). Seconds of each, the generated ids, whether they agree.

Prints one JSON object with the library versions.
"""
import argparse
import glob
import json
import os
import shutil
import tempfile
import time

import torch

from big_model_peer import evict, versions  # (page-cache eviction, library versions)


def decode(args):
    from transformers import LlamaForCausalLM
    torch.set_num_threads(args.threads)
    cfg = json.load(open(os.path.join(args.dir, "config.json")))
    n_layers = cfg["num_hidden_layers"]
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for i in range(n_layers):
        device_map[f"model.layers.{i}"] = "disk"
    folder = tempfile.mkdtemp(prefix="assist-offload-", dir=os.path.dirname(os.path.abspath(args.dir)))
    try:
        model = LlamaForCausalLM.from_pretrained(args.dir, device_map=device_map, offload_folder=folder,
                                                 dtype=torch.bfloat16).eval()
        if args.drop_pages == 2:
            for i in range(n_layers):
                files = glob.glob(os.path.join(folder, f"model.layers.{i}.*"))
                model.model.layers[i].register_forward_hook(lambda m, a, o, files=files: evict(files))
        draft = LlamaForCausalLM.from_pretrained(args.dir, dtype=torch.float32).eval()
        draft = torch.ao.quantization.quantize_dynamic(draft, {torch.nn.Linear}, dtype=torch.qint8)
        prompt = torch.tensor([[(i * 7919) % cfg["vocab_size"] for i in range(1, 65)]])
        common = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
            t0 = time.perf_counter()
            plain = model.generate(prompt, **common)
            plain_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            assisted = model.generate(prompt, assistant_model=draft, **common)
            assisted_s = time.perf_counter() - t0
        plain_ids, assisted_ids = plain[0, 64:].tolist(), assisted[0, 64:].tolist()
        return {"peer": "transformers+accelerate", "new_tokens": args.new, "threads": args.threads,
                "drop_pages": args.drop_pages, "plain_s": plain_s, "assisted_s": assisted_s,
                "plain_tokens_per_s": args.new / plain_s, "assisted_tokens_per_s": args.new / assisted_s,
                "speedup": plain_s / assisted_s, "same_tokens": plain_ids == assisted_ids, "ids": plain_ids,
                **versions()}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--dir", required=True)
    d.add_argument("--new", type=int, default=48)
    d.add_argument("--threads", type=int, default=os.cpu_count())
    d.add_argument("--drop-pages", type=int, default=2)
    args = ap.parse_args()
    print(json.dumps(decode(args)))


if __name__ == "__main__":
    main()
