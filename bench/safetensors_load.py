#!/opt/ref/bin/python
"""PyPI safetensors peer for bench/safetensors_load.lua: load_file of one file to CPU.

Measures, on a file the Lua side wrote: (1) safetensors.torch.load_file, median seconds over
--repeats (page cache warm); (2) the same plus one pass over every tensor (sum), which is what a
first forward pass pays; (3) load_file plus the sum right after the file's pages were dropped
from the page cache (posix_fadvise DONTNEED), once, before anything maps the file. Prints one JSON object.

Usage: python bench/safetensors_load.py --path FILE [--repeats R] [--threads N]
"""
import argparse
import json
import os
import statistics
import time

import safetensors
import torch
from safetensors.torch import load_file


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    drop_cache(a.path)                                    # cold first: nothing maps the file yet
    t0 = time.perf_counter()
    ts = load_file(a.path)
    s = 0.0
    for t in ts.values():
        s += float(t.sum())
    cold = time.perf_counter() - t0
    del ts
    load_file(a.path)                                     # warm the page cache
    loads, touched = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        ts = load_file(a.path)
        loads.append(time.perf_counter() - t0)
        del ts
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        ts = load_file(a.path)
        s = 0.0
        for t in ts.values():
            s += float(t.sum())
        touched.append(time.perf_counter() - t0)
        del ts
    print(json.dumps({
        "load_s": statistics.median(loads), "load_and_sum_s": statistics.median(touched),
        "cold_load_and_sum_s": cold, "threads": a.threads,
        "versions": {"safetensors": safetensors.__version__, "torch": torch.__version__},
    }))


if __name__ == "__main__":
    main()
