"""Helpers shared by the Python peers of bench/*.lua (run by them through BENCH_PYTHON)."""
import time


def best(reps, fn):
    """The fastest of reps timed calls of fn, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
