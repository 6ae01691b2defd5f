#!/usr/bin/env bash
# The op benchmarks and their report, one command each way:
#   bash scripts/bench.sh [bench.json]  full run (2 cores: ~20 min, ~10 with inductor's cache warm), then the
#                                       generated section of docs/BENCHMARKS.md and docs/bench_ops.png
#   bash scripts/bench.sh --quick       CI: 1 round per case at the headline shapes (~1-2 min), rendered into
#                                       a scratch copy of the docs, so that neither the benchmarks nor the
#                                       report can rot; docs/ untouched, speed never asserted
# TOME_BENCH_THREADS sets the thread count; take the full run on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--quick" ]]; then
  out="$(mktemp -d)"
  TOME_BENCH_QUICK=1 python -m pytest bench/ -q --benchmark-only --benchmark-min-rounds=1 \
    --benchmark-max-time=0.000001 --benchmark-warmup=off --benchmark-json="$out/bench.json"
  cp docs/BENCHMARKS.md "$out/"
  python scripts/bench_report.py "$out/bench.json" --markdown "$out/BENCHMARKS.md" --png "$out/bench_ops.png"
else
  json="${1:-bench.json}"
  python -m pytest bench/ --benchmark-only --benchmark-json="$json"
  python scripts/bench_report.py "$json"
fi
