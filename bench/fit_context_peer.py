#!/opt/ref/bin/python
"""Peer and fixture maker for bench/fit_context.lua (run through BENCH_PYTHON, default
/opt/ref/bin/python).

  make --dir DIR       writes a Llama-shaped checkpoint with random weights to DIR (once): 16
                       layers, hidden 512, 8 heads (no grouping), MLP 1408, vocab 32000, float32,
                       about 340 MB, saved by transformers
  generate --dir DIR   transformers' LlamaForCausalLM placed by accelerate's device_map="auto"
                       under --max-memory for the CPU (offload folder beside DIR): --batch prompts
                       of --prompt tokens, then --new greedy tokens with the cache. Reports the
                       map's bytes per device, seconds, the generated ids of row 0, and the peak
                       resident memory of the process from just before loading (VmHWM after
                       /proc/self/clear_refs). With --micro-batch N, the prompts go N at a time,
                       one generate call after the other (bench/block_schedule.lua), and the
                       last row's ids are reported too

Each prints one JSON object with the library versions.
"""
import argparse
import json
import os
import shutil
import tempfile
import time

import torch


def versions():
    import accelerate
    import transformers
    return {"accelerate": accelerate.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def make(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    if os.path.exists(os.path.join(args.dir, "config.json")):
        return {"dir": args.dir, "made": False}
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=16,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(args.dir, safe_serialization=True, max_shard_size="200MB")
    return {"dir": args.dir, "made": True}


def kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def prompts(batch, length, vocab):
    seed, rows = 1, []                                       # MINSTD, as bench/fit_context.lua
    for _ in range(batch):
        row = []
        for _ in range(length):
            seed = seed * 48271 % 2147483647
            row.append(seed % vocab)
        rows.append(row)
    return rows


def generate(args):
    from transformers import LlamaForCausalLM
    torch.set_num_threads(args.threads)
    folder = tempfile.mkdtemp(prefix="fit-context-", dir=os.path.dirname(os.path.abspath(args.dir)))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                         # VmHWM starts again from VmRSS
    base = kib("VmRSS")
    model = LlamaForCausalLM.from_pretrained(args.dir, device_map="auto", max_memory={"cpu": args.max_memory},
                                             offload_folder=folder, dtype=torch.float32).eval()
    sizes = {}
    for name, dev in getattr(model, "hf_device_map", {"": "cpu"}).items():   # one device: no map kept
        mod = model.get_submodule(name) if name else model
        n = sum(p.numel() * p.element_size() for p in mod.parameters())
        sizes[str(dev)] = sizes.get(str(dev), 0) + n
    ids = torch.tensor(prompts(args.batch, args.prompt, model.config.vocab_size))
    step = args.micro_batch or args.batch
    t0 = time.perf_counter()
    parts = []
    with torch.no_grad():
        for first in range(0, args.batch, step):
            part = ids[first:first + step]
            parts.append(model.generate(part, attention_mask=torch.ones_like(part), max_new_tokens=args.new,
                                        do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0))
    seconds = time.perf_counter() - t0
    out = torch.cat(parts)
    peak = kib("VmHWM")
    shutil.rmtree(folder, ignore_errors=True)
    r = {"peer": "accelerate", "bytes_per_device": sizes, "seconds": seconds,
         "peak_rss_mb": (peak - base) / 1024.0, "generated": out[0, ids.shape[1]:].tolist(), "threads": args.threads}
    if args.micro_batch:
        r["micro_batch"] = args.micro_batch
        r["generated_last"] = out[-1, ids.shape[1]:].tolist()
    r.update(versions())
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["make", "generate"])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--max-memory", default="800MB")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=240)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--micro-batch", type=int, default=None)
    args = ap.parse_args()
    print(json.dumps({"make": make, "generate": generate}[args.what](args)))


if __name__ == "__main__":
    main()
