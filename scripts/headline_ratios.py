"""Issue #7's bipartite_merge bars as ratios taken within one process: our op, the eager and compiled chains
and the two floors timed round-robin, so that the host's load, which on a shared VM moves single figures by
±30% from minute to minute, hits every contender alike.

    PYTHONPATH=. python scripts/headline_ratios.py [vit_b|detr ...] [--rounds 60]

Prints each contender's minimum and median (ms) and the three ratios at both. Complements the pytest-benchmark
suite (bench/), whose cases run minutes apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from baselines import chain, compiled_chain, floor_copy, floor_scores, make_inputs, normalised_sets  # noqa: E402
from shapes import MERGE_HEADLINE, SHAPES  # noqa: E402

import tome_kernels  # noqa: E402


def contenders(shape):
    x, size, metric = make_inputs(shape, shape.batch("cpu"), torch.float32, "cpu")
    r, protected = shape.r, shape.protected
    a, b = normalised_sets(metric, protected)
    compiled = compiled_chain()
    return {
        "op (cpu)": lambda: torch.ops.tome.bipartite_merge(x, None, size, r, metric=metric, protected=protected),
        "eager chain": lambda: chain(x, size, metric, r, protected),
        "compiled chain": lambda: compiled(x, size, metric, r, protected),
        "floor: copy": lambda: floor_copy(x),
        "floor: product": lambda: floor_scores(a, b),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", default=list(MERGE_HEADLINE), choices=sorted(SHAPES))
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    tome_kernels.set_backend("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, {args.rounds} rounds")
    for key in args.shapes:
        calls = contenders(SHAPES[key])
        for call in calls.values():  # compile, warm caches
            call(), call()
        times = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                call()  # the previous contender's traffic is not ours to pay
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        print(f"\n{SHAPES[key].label}")
        for name, values in times.items():
            print(f"  {name:15s} min {min(values) * 1e3:7.3f} ms   median {statistics.median(values) * 1e3:7.3f} ms")
        for stat, pick in (("min", min), ("median", statistics.median)):
            t = {name: pick(values) for name, values in times.items()}
            floor = max(t["floor: copy"], t["floor: product"])
            print(f"  {stat:6s}: eager / op {t['eager chain'] / t['op (cpu)']:.2f}x (bar >= 4)   compiled / op "
                  f"{t['compiled chain'] / t['op (cpu)']:.2f}x (bar >= 2)   op / floor {t['op (cpu)'] / floor:.2f}x "
                  f"(bar <= 2)")


if __name__ == "__main__":
    main()
