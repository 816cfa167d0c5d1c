#!/opt/ref/bin/python
"""Peer for bench/kv_int8_attention.lua (run through BENCH_PYTHON, default /opt/ref/bin/python):
PyTorch's scaled_dot_product_attention for one decoding step (one query row per head) over a
cache of S keys, float32 and bfloat16, grouped heads through enable_gqa; best of 5 after a
warm-up, for each shape given as B,Hq,Hk,S,E. One JSON object."""
import json
import sys
import time

import torch
import torch.nn.functional as F


def best(fn, n=5):
    fn()
    t = None
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        d = time.perf_counter() - t0
        t = d if t is None else min(t, d)
    return t


def main():
    out = []
    for shape in sys.argv[1:]:
        b, hq, hk, s, e = (int(x) for x in shape.split(","))
        r = {"shape": shape}
        for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            q = torch.randn(b, hq, 1, e, dtype=dt)
            k = torch.randn(b, hk, s, e, dtype=dt)
            v = torch.randn(b, hk, s, e, dtype=dt)
            r[name + "_s"] = best(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hk))
        out.append(r)
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "shapes": out}))


if __name__ == "__main__":
    main()
