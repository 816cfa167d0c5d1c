#!/opt/ref/bin/python
"""Peer for bench/save_load.lua (run through BENCH_PYTHON, default /opt/ref/bin/python):
transformers loads the float32 checkpoint in DIR, then save_pretrained writes it (safetensors,
shards of --max-shard-size) to a temporary folder, twice; reports the load seconds and the
best save seconds, with the library versions, as one JSON object."""
import argparse
import json
import shutil
import tempfile
import time

import torch
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--max-shard-size", default="10GB")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    best = None
    for _ in range(2):
        out = tempfile.mkdtemp()
        t0 = time.perf_counter()
        model.save_pretrained(out, max_shard_size=args.max_shard_size)
        s = time.perf_counter() - t0
        shutil.rmtree(out)
        best = s if best is None else min(best, s)
    print(json.dumps({"load_s": load_s, "save_s": best, "torch": torch.__version__,
                      "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
