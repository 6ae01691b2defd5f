#!/usr/bin/env bash
# The one command for the day a CUDA GPU is at hand (one GPU, under 8 minutes):
#   1. builds tome_kernels._C with the CUDA kernels for this GPU's arch only;
#   2. runs the tests on CUDA tensors (Triton and CUDA backends against the reference; the op contract);
#   3. runs the op benchmarks on the GPU (Triton, CUDA and torch backends against the eager reference chain
#      and SDPA: bench/) at the headline shapes, 20 rounds a case; the torch.compile'd chain is left out
#      (its Inductor compiles alone would take minutes: bash scripts/bench.sh runs everything);
#   4. writes a short report (device, versions, each step's outcome and time, the benchmark table).
#     bash scripts/gpu_check.sh [REPORT]     (default gpu_check_report.md; logs and JSON next to it)
# Each step has a time limit (240 + 120 + 120 s). Without a CUDA GPU it says so and exits 0. Exits 1 when
# a step fails (the report says which).
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check, exiting 0"
  exit 0
fi

report="${1:-gpu_check_report.md}"
logs="${report%.md}_logs"
mkdir -p "$logs"
arch="$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="$arch" TOME_BUILD_CUDA=1
export TORCHINDUCTOR_CACHE_DIR="$logs/inductor" TRITON_CACHE_DIR="$logs/triton"
failed=0
steps=()

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, time; a failure is recorded, the next steps still run
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS status
  echo "gpu_check: $name ..."
  timeout "$limit" "$@" >"$logs/$name.log" 2>&1
  status=$?
  steps+=("| $name | $([[ $status == 0 ]] && echo ok || echo "FAILED ($status)") | $((SECONDS - start)) s | \`$logs/$name.log\` |")
  [[ $status == 0 ]] || failed=1
  tail -n 3 "$logs/$name.log"
}

step build 240 python setup.py build_ext --inplace
# Every test id with "cuda" (the device / backend parameters) plus the CUDA backend's own tests.
step tests 120 python -m pytest -q --benchmark-disable -x python_tests/test_cuda_backend.py \
  python_tests/test_triton_backend.py python_tests/test_ops.py python_tests/test_determinism.py -k cuda
step bench 120 env TOME_BENCH_QUICK=1 python -m pytest bench/ -q --benchmark-only -k "not chain_compiled" \
  --benchmark-min-rounds=20 --benchmark-max-time=0.05 --benchmark-json="$logs/bench.json"

{
  echo "# GPU check"
  echo
  python - <<'EOF'
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"{torch.cuda.get_device_name(0)} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.0f} GiB); torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
EOF
  echo
  echo "| step | result | time | log |"
  echo "|---|---|---|---|"
  printf '%s\n' "${steps[@]}"
  echo
  grep -E "passed|failed|error" "$logs/tests.log" | tail -n 1
  if [[ -s "$logs/bench.json" ]]; then
    cp docs/BENCHMARKS.md "$logs/BENCHMARKS.md"
    python scripts/bench_report.py "$logs/bench.json" --markdown "$logs/BENCHMARKS.md" --png "$logs/bench_ops.png" \
      >/dev/null && sed -n '/<!-- ops:begin/,/<!-- ops:end/p' "$logs/BENCHMARKS.md"
  fi
} >"$report"
echo "gpu_check: report in $report"
exit $failed
