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


def load_and_generate(a, load, **extra):
    """The peer half of benchutil.lua's load_and_generate: load() timed, 2 greedy tokens to warm up,
    the growth of resident memory over both, then a.new greedy tokens after a.prompt MINSTD ids
    (the Lua side's prompt). Prints one JSON object with extra's fields."""
    import json
    import transformers
    from fit_context_peer import kib
    rss0 = kib("VmRSS")
    t0 = time.perf_counter()
    model = load()
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
    res = {"peer": "transformers", "torch": torch.__version__, "transformers": transformers.__version__,
           "load_s": load_s, "rss_growth_mb": rss / 1024, "generate_s": gen_s, "generated": out[0, a.prompt:].tolist()}
    res.update({k: v(model) if callable(v) else v for k, v in extra.items()})
    print(json.dumps(res))
