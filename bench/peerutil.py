"""Helpers shared by the Python peers of bench/*.lua (run by them through BENCH_PYTHON)."""
import argparse
import time

import torch


def best(reps, fn):
    """The fastest of reps timed calls of fn, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def parse(**defaults):
    """The peers' command line: --threads (torch's thread count, set here) and --repeats, and
    --NAME for each NAME=default given (parsed with the default's type)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=3)
    for name, value in defaults.items():
        ap.add_argument("--" + name, type=type(value), default=value)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    return a


def prompt(length, vocab):
    """One row of `length` token ids below `vocab` (a Lehmer sequence: any ids do, the timing does
    not depend on them) and its all-ones attention mask, as tensors (1, length)."""
    seed, ids = 12345, []
    for _ in range(length):
        seed = (seed * 48271) % 2147483647
        ids.append(seed % vocab)
    x = torch.tensor([ids])
    return x, torch.ones_like(x)
