"""Turn a pytest-benchmark JSON of ``bench/`` into the op section of docs/BENCHMARKS.md and a PNG chart.

    python -m pytest bench/ --benchmark-only --benchmark-json=bench.json
    python scripts/bench_report.py bench.json [--markdown docs/BENCHMARKS.md] [--png docs/bench_ops.png]

Only the text between ``<!-- ops:begin -->`` and ``<!-- ops:end -->`` is rewritten (appended at the end
when the markers are missing), so the hand-written sections stay and a second run changes nothing. Every
figure is the minimum over rounds: on a shared machine other jobs only ever add time, so the minimum is
the least disturbed estimate (the JSON keeps the median and the rest).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from shapes import ATTENTION_HEADLINE, MERGE_HEADLINE, SHAPES  # noqa: E402  (the one shapes table)

BEGIN, END = "<!-- ops:begin -->", "<!-- ops:end -->"
OPS = ("match", "window_match", "merge", "bipartite_merge", "unmerge", "prop_attention")
BACKENDS = ("cpu", "triton", "cuda", "torch")
BASELINES = ("chain", "chain_compiled", "composed", "floor_copy", "floor_scores", "sdpa_unbiased", "sdpa_biased")
PROVIDER_NAMES = {"torch": "torch (reference)", "chain": "chain", "chain_compiled": "chain compiled",
                  "floor_copy": "floor: copy x", "floor_scores": "floor: A·Bᵀ", "sdpa_unbiased": "unbiased SDPA",
                  "sdpa_biased": "SDPA + log-size mask", "composed": "tiles + torch ranking"}
DTYPES = ("fp32", "bf16")
DIRECTIONS = ("fwd", "bwd")
SHAPE_ORDER = tuple(SHAPES)


def load(path):
    """``(machine_info, commit_info, {(op, direction, shape, dtype): {provider: (seconds, extra_info)}})``."""
    with open(path) as f:
        data = json.load(f)
    results = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        key = (info["op"], info["direction"], info["shape"], info["dtype"])
        results[key][info["provider"]] = (bench["stats"]["min"], info)
    return data["machine_info"], data.get("commit_info", {}), data.get("datetime", ""), results


def fmt_time(seconds):
    if seconds is None:
        return "—"
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale or unit == "µs":
            value = seconds / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


def fmt_ratio(ratio):
    return "—" if ratio is None else f"{ratio:.2f}×" if ratio < 10 else f"{ratio:.1f}×"


def min_time(group, provider):
    return group[provider][0] if provider in group else None


def floor_time(group):
    """The floor of one ToMe step: the larger of its two timed parts (either may be missing)."""
    parts = [min_time(group, p) for p in ("floor_copy", "floor_scores")]
    parts = [t for t in parts if t is not None]
    return max(parts) if parts else None


def shapes_table(results):
    """One row per shape, from the ``extra_info`` of its benchmarks."""
    infos = {}
    for group in results.values():
        for _, info in group.values():
            infos.setdefault(info["shape"], info)
    lines = ["| shape | B | N | C | merge metric | protected | r | attention heads × dim |", "|---|---|---|---|---|---|---|---|"]
    for name in sorted(infos, key=shape_rank):
        info = infos[name]
        metric = "x" if info["metric_channels"] is None else f"own, C={info['metric_channels']}"
        lines.append(f"| {info['label']} | {info['batch']} | {info['tokens']} | {info['channels']} | {metric} | "
                     f"{info['protected']} | {info['r']} | {info['heads']} × {info['head_dim']} |")
    return "\n".join(lines)


def shape_rank(name):
    return SHAPE_ORDER.index(name) if name in SHAPE_ORDER else len(SHAPE_ORDER)


def machine_text(machine, commit, when, source):
    cpu = machine.get("cpu", {})
    device = machine.get("device_name") or cpu.get("brand_raw", machine.get("processor", "?"))
    commit_id = commit.get("id", "?")[:10] + (" (uncommitted changes)" if commit.get("dirty") else "")
    load = ", ".join(f"{x:.1f}" for x in machine.get("load_average", ()))
    mode = "quick mode (1 round each: smoke figures, not measurements)" if machine.get("quick") else "full run"
    threads, loads = machine.get("threads", 1), machine.get("load_average", ())
    caveat = ""
    # The run's own threads count in the load average: others' jobs show as load beyond one more thread.
    if threads > 1 and loads and max(loads) > machine.get("cpu_count", 1) + 1:
        caveat = (f" **Other jobs loaded the {machine['cpu_count']} cores during this {threads}-thread run:** a parallel "
                  "region then waits for a descheduled thread (a scheduler slice, ~4-8 ms), which swamps sub-10 ms "
                  "figures; on a shared machine use `TOME_BENCH_THREADS=1`.")
    return (f"Generated by `python scripts/bench_report.py {source}` from `pytest bench/ --benchmark-only` "
            f"({mode}), {when[:16].replace('T', ' ')} UTC.\n\n"
            f"**Machine:** {device}, {machine.get('cpu_count', cpu.get('count', '?'))} logical cores, "
            f"{machine.get('threads', '?')} torch threads, tensors on `{machine.get('device', '?')}`; "
            f"load average at the end of the run {load or '?'}. **Versions:** torch {machine.get('torch', '?')}, "
            f"triton {machine.get('triton', '?')}, Python {machine.get('python_version', '?')}, "
            f"commit {commit_id}.{caveat}\n\n"
            "Every figure is the **minimum over rounds** (other jobs on a shared machine only add time; the JSON "
            "keeps the medians). `bwd` times the backward alone (`autograd.grad` with `retain_graph`). "
            "Chain = the original ToMe step as plain PyTorch ops (`chain` in bench/baselines.py); floor = the larger "
            "of one copy of x and one BLAS product of the normalised A and B sets.")


def headline(results, backend):
    """The headline targets (bars), for the fp32 forward of ``backend``."""
    rows, notes = [], []

    def row(case, baseline_name, baseline, ours, bar, bound, speedup):
        """A bar on baseline / ours >= bound (``speedup``) or on ours / baseline <= bound."""
        ratio = None if baseline is None else baseline / ours if speedup else ours / baseline
        met = None if ratio is None else ratio >= bound if speedup else ratio <= bound
        rows.append(f"| {case} | {fmt_time(ours)} | {baseline_name}: {fmt_time(baseline)} | {fmt_ratio(ratio)} "
                    f"| {bar} | {'—' if met is None else '**yes**' if met else 'no'} |")

    def timed(op, shapes):
        """(group, our time, shape info) of each headline shape ``backend`` ran."""
        for shape in shapes:
            group = results.get((op, "fwd", shape, "fp32"), {})
            ours = min_time(group, backend)
            if ours is not None:
                yield group, ours, group[backend][1]

    for group, ours, info in timed("bipartite_merge", MERGE_HEADLINE):
        case = f"`bipartite_merge`, {info['label']}"
        chain, floor = min_time(group, "chain"), floor_time(group)
        row(case, "eager chain", chain, ours, "≥ 4× faster", 4, speedup=True)
        row(case, "compiled chain", min_time(group, "chain_compiled"), ours, "≥ 2× faster", 2, speedup=True)
        row(case, "floor", floor, ours, "≤ 2× the floor", 2, speedup=False)
        if floor is not None and chain is not None:
            notes.append(f"At {info['label']} the eager chain takes {chain / floor:.2f}× the floor: "
                         f"no implementation can be faster than it by more than that.")
    for group, ours, info in timed("prop_attention", ATTENTION_HEADLINE):
        case = f"`prop_attention`, {info['label']} (N={info['tokens']})"
        row(case, "explicit softmax", min_time(group, "torch"), ours, "≥ 1.5× faster", 1.5, speedup=True)
        row(case, "unbiased SDPA", min_time(group, "sdpa_unbiased"), ours, "≤ 1.2× its time", 1.2, speedup=False)
    if not rows:
        return ""
    return "\n".join([f"### Headline: the targets (`{backend}` backend, fp32, forward)", "",
                      "Ratio: the baseline's time over ours (speed-up), except for the floor and SDPA rows: "
                      "ours over theirs.", "",
                      f"| case | `{backend}` | baseline | ratio | bar | met |", "|---|---|---|---|---|---|", *rows,
                      "", *(f"- {note}" for note in notes)])


def op_table(results, op):
    keys = sorted((k for k in results if k[0] == op),
                  key=lambda k: (DIRECTIONS.index(k[1]), shape_rank(k[2]), DTYPES.index(k[3])))
    if not keys:
        return ""
    present = {p for k in keys for p in results[k]}
    providers = [p for p in BACKENDS + BASELINES if p in present]
    lines = [f"#### `{op}`", "",
             "| dir | shape | dtype | " + " | ".join(PROVIDER_NAMES.get(p, f"`{p}`") for p in providers)
             + " | best backend GB/s | GFLOP/s |",
             "|---" * (len(providers) + 5) + "|"]
    for key in keys:
        group = results[key]
        fastest = min((p for p in BACKENDS if p != "torch" and p in group), key=lambda p: group[p][0], default=None)
        best = None if fastest is None else group[fastest][0]
        cells = []
        for provider in providers:
            t = min_time(group, provider)
            versus = min_time(group, "torch") if provider in BACKENDS else best
            ratio = None if (t is None or versus is None or provider == "torch") else (
                versus / t if provider in BACKENDS else t / versus)
            cells.append(fmt_time(t) + ("" if ratio is None else f" ({fmt_ratio(ratio)})"))
        gbps = gflops = "—"
        if fastest is not None:
            info = group[fastest][1]
            gbps = f"{info['bytes'] / best / 1e9:.3g}"
            gflops = f"{info['flops'] / best / 1e9:.3g}" if info["flops"] else "—"
        label = next(iter(group.values()))[1]["label"]
        lines.append(f"| {key[1]} | {label} | {key[3]} | " + " | ".join(cells) + f" | {gbps} | {gflops} |")
    return "\n".join(lines)


def chart(results, backends, path):
    """Speed-up of each non-reference backend per op and shape, log scale: over the eager chain for
    ``bipartite_merge`` forward (the original algorithm), over the ``torch`` reference otherwise."""
    fig, axes = plt.subplots(1, len(OPS), figsize=(3.6 * len(OPS), 4.6), sharey=True)
    series = [(b, d, t) for b in backends for d in DIRECTIONS for t in DTYPES]
    width = 0.8 / len(series)
    for ax, op in zip(axes, OPS):
        speedups = {}
        for backend, direction, dtype in series:
            baseline = "chain" if (op == "bipartite_merge" and direction == "fwd") else "torch"
            for shape in SHAPE_ORDER:
                group = results.get((op, direction, shape, dtype), {})
                ours, theirs = min_time(group, backend), min_time(group, baseline)
                if ours and theirs:
                    speedups[backend, direction, dtype, shape] = theirs / ours
        shapes = [s for s in SHAPE_ORDER if any(key[3] == s for key in speedups)]  # e.g. no reference timed
        for i, (backend, direction, dtype) in enumerate(series):
            values = [speedups.get((backend, direction, dtype, shape), math.nan) for shape in shapes]
            ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(shapes))], values, width,
                   label=f"{backend} {direction} {dtype}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)), shapes, rotation=30)
        ax.set_title(op + ("\n(fwd: over the eager chain)" if op == "bipartite_merge" else ""), fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("speed-up over the torch reference (log)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(series), fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version/date stamp: reruns are identical
    plt.close(fig)


def render(machine, commit, when, results, source, png_link):
    device = machine.get("device", "cpu")
    backends = [b for b in BACKENDS if b != "torch" and any(b in g for g in results.values())]
    backend = backends[0] if backends else "torch"
    parts = [BEGIN, "## Op benchmarks (generated)", "", machine_text(machine, commit, when, source), "",
             headline(results, backend), "", f"![op speed-ups]({png_link})", "",
             f"Speed-up of each backend on `{device}` tensors over the plain-PyTorch reference (for "
             "`bipartite_merge` forward, over the eager ToMe chain), log scale.", ""]
    parts += ["### Per op", "",
              "Shapes (B is the batch on this device):", "", shapes_table(results), "",
              "Cells: the minimum time; in brackets, for a backend its speed-up over the `torch` reference, for a "
              "baseline the fastest backend's speed-up over it (> 1: the backend is faster; for a floor, 0.5× "
              "means twice the floor). Throughput: of the fastest non-reference backend, the bytes it must move "
              "and, where a product dominates, its FLOPs. Floors are timed without autograd in both directions.",
              ""]
    for op in OPS:
        table = op_table(results, op)
        if table:
            parts += [table, ""]
    parts.append(END)
    return "\n".join(parts), backends


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="pytest-benchmark JSON of bench/")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--markdown", default=os.path.join(root, "docs", "BENCHMARKS.md"))
    parser.add_argument("--png", default=os.path.join(root, "docs", "bench_ops.png"))
    args = parser.parse_args()

    machine, commit, when, results = load(args.json)
    png_link = os.path.relpath(args.png, os.path.dirname(os.path.abspath(args.markdown)))
    section, backends = render(machine, commit, when, results, os.path.basename(args.json), png_link)
    text = open(args.markdown).read() if os.path.exists(args.markdown) else "# Benchmarks\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(args.markdown, "w") as f:
        f.write(text)
    chart(results, backends or ["torch"], args.png)
    print(f"wrote {args.markdown} and {args.png}")


if __name__ == "__main__":
    main()
