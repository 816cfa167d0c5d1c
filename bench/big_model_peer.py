#!/opt/ref/bin/python
"""Accelerate + PyTorch peer for the issue-4 benchmarks (bench/big_model_*.lua run it through
BENCH_PYTHON, default /opt/ref/bin/python, in the same run and on the same checkpoint).

  seed                       accelerate.init_empty_weights around 1000 x nn.Linear(10000, 10000):
                             build seconds, peak RSS (and the RSS before building)
  load --ckpt DIR            load_checkpoint_and_dispatch(device_map="auto") of the sharded
                             GPT-2-small checkpoint in DIR to CPU: median seconds over --repeats
  offload --ckpt DIR         forward on 1x128 tokens: all blocks in RAM, then blocks 6-11 on
                             "disk" with a warm page cache and after posix_fadvise(DONTNEED) of
                             the offload folder's files; also the cold read rate of those files

Each prints one JSON object. Library versions are part of the output.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time


def vm_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def versions():
    import accelerate
    import torch
    import transformers
    return {"accelerate": accelerate.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


def seed(_):
    import torch.nn as nn
    from accelerate import init_empty_weights
    before = vm_kb("VmHWM") / 1024
    t0 = time.perf_counter()
    with init_empty_weights():
        tst = nn.Sequential(*[nn.Linear(10000, 10000) for _ in range(1000)])
    dt = time.perf_counter() - t0
    params = sum(p.numel() for p in tst.parameters())
    return {"parameters": params, "build_seconds": dt, "peak_rss_mb": vm_kb("VmHWM") / 1024,
            "rss_before_build_mb": before, "device": str(next(tst.parameters()).device)}


def empty_model(ckpt):
    from accelerate import init_empty_weights
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config.from_json_file(os.path.join(ckpt, "config.json"))
    with init_empty_weights():
        model = GPT2LMHeadModel(config)
    model.tie_weights()
    return model


def load(a):
    from accelerate import load_checkpoint_and_dispatch
    index = os.path.join(a.ckpt, "model.safetensors.index.json")
    times = []
    for _ in range(a.repeats + 1):            # the first run warms the page cache and imports
        model = empty_model(a.ckpt)
        t0 = time.perf_counter()
        load_checkpoint_and_dispatch(model, index, device_map="auto")
        times.append(time.perf_counter() - t0)
        del model
    return {"load_seconds": statistics.median(times[1:]), "runs": times[1:],
            "device": "cpu"}


def evict(paths):
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def offload(a):
    import torch
    from accelerate import load_checkpoint_and_dispatch
    torch.set_num_threads(a.threads or torch.get_num_threads())
    index = os.path.join(a.ckpt, "model.safetensors.index.json")
    ids = torch.tensor([[(i * 37) % 50257 for i in range(1, 129)]])

    def once(model, prepare=None):
        if prepare:
            prepare()
        with torch.no_grad():
            t0 = time.perf_counter()
            model(ids)
            return time.perf_counter() - t0

    folder = tempfile.mkdtemp(prefix="accel-offload-")
    try:
        ram = empty_model(a.ckpt)
        load_checkpoint_and_dispatch(ram, index, device_map={"": "cpu"})
        dm = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
              "transformer.ln_f": "cpu", "lm_head": "cpu"}
        for i in range(12):
            dm[f"transformer.h.{i}"] = "cpu" if i < 6 else "disk"
        model = empty_model(a.ckpt)
        load_checkpoint_and_dispatch(model, index, device_map=dm, offload_folder=folder)
        files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".dat")]
        disk_bytes = sum(os.path.getsize(f) for f in files)
        once(ram), once(model)                  # warm-up
        # interleaved, so that every variant sees the same machine load
        r_ram, r_warm, r_cold = [], [], []
        for _ in range(a.repeats):
            r_ram.append(once(ram))
            r_warm.append(once(model))
            r_cold.append(once(model, prepare=lambda: evict(files)))
        t_ram, t_warm, t_cold = (statistics.median(r) for r in (r_ram, r_warm, r_cold))
        # cold read rate of the same files
        evict(files)
        t0 = time.perf_counter()
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        t_read = time.perf_counter() - t0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"forward_ram_seconds": t_ram, "forward_half_disk_warm_seconds": t_warm,
            "forward_half_disk_evicted_seconds": t_cold, "disk_bytes": disk_bytes,
            "disk_read_seconds": t_read, "ratio_warm": t_warm / t_ram, "runs_ram": r_ram, "runs_warm": r_warm,
            "runs_evicted": r_cold,
            "ratio_evicted": t_cold / max(t_read, t_ram), "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["seed", "load", "offload"])
    ap.add_argument("--ckpt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    out = {"seed": seed, "load": load, "offload": offload}[a.what](a)
    out["peer"] = "accelerate"
    out.update(versions())
    out["peak_rss_process_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
