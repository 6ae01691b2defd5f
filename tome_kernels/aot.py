"""Compile every shipped Triton kernel x config x constexpr combination for sm_80 and sm_90, without a GPU.

    python -m tome_kernels.aot [--arch 80 90] [--jobs N] [--filter TEXT]

One line per kernel x config x arch: registers per thread and spill stores (bytes, from the ``ptxas -v`` log
Triton prints with its ``dump_ptxas_log`` knob; the cubin's resource usage via Triton's ``cuobjdump`` as a
fallback) and shared memory (bytes, the compiled kernel's ``metadata.shared``). A CompiledKernel's ``n_regs`` /
``n_spills`` are only filled in when it is loaded on a GPU, hence ptxas. Exits non-zero if any compile fails;
spills are reported (and counted in the last line), not fatal.

The specs come from each kernel module's ``aot_specs()`` (the config tables its launcher uses). Every run
compiles from scratch in a temporary Triton cache (nothing is written to ~/.triton).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import os
import re
import subprocess
import sys
import tempfile
import time

if "tome_kernels.triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("tome_kernels.aot needs the compiled (not interpreted) kernels: run it in a fresh process "
                       "without TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "0"  # before triton.jit runs in the kernel modules

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

ARCHS = (80, 90)


def all_specs():
    # importlib: the package's functions ``match`` / ``merge`` shadow the submodules of the same name.
    modules = [importlib.import_module(f"tome_kernels.triton.{name}") for name in ("match", "merge", "attention")]
    return [spec for module in modules for spec in module.aot_specs()]


def _ptxas_usage(log: str) -> tuple[int, int] | None:
    """(registers, spill store bytes) from ptxas -v output, or None if ptxas did not run / log missing."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)), int(spill.group(1))) if regs and spill else None


def _cuobjdump_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the single kernel in a cubin: Triton kernels have no local arrays, so
    stack frame > 0 means spills (fallback for when Triton's ptxas log is unavailable)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                              check=True, capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    if regs is None or stack is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    return int(regs.group(1)), int(stack.group(1))


def compile_one(index: int, arch: int) -> dict:
    spec = all_specs()[index]
    start = time.perf_counter()
    source = triton.compiler.ASTSource(fn=spec.kernel, signature=spec.signature(), constexprs=spec.constexprs,
                                       attrs=spec.attrs())
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints the ptxas -v log (dump_ptxas_log knob)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    usage = _ptxas_usage(log.getvalue()) or _cuobjdump_usage(kernel.asm["cubin"])
    return dict(regs=usage[0], smem=kernel.metadata.shared, spill=usage[1], seconds=time.perf_counter() - start)


def _init_worker(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # a fresh cache: every kernel really compiles (and logs ptxas)
    if hasattr(triton.knobs.nvidia, "dump_ptxas_log"):  # else the cuobjdump fallback reports the usage
        triton.knobs.nvidia.dump_ptxas_log = True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--filter", default="", help="only specs whose kernel name or label contains this")
    args = parser.parse_args(argv)

    specs = all_specs()
    jobs = [(i, arch) for i, spec in enumerate(specs) for arch in args.arch
            if args.filter in f"{spec.kernel.__name__} {spec.label}"]
    print(f"tome_kernels.aot: triton {triton.__version__}, {len(jobs)} compiles "
          f"({len(specs)} kernel x config combinations x sm_{'/sm_'.join(map(str, args.arch))})", flush=True)
    failures = spilled = 0
    start = time.perf_counter()
    # Compiles run in worker processes (Triton's compile is CPU-bound Python + ptxas); results print in order.
    with tempfile.TemporaryDirectory(prefix="tome_aot_") as cache_dir, \
            concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker,
                                                   initargs=(cache_dir,)) as pool:
        futures = [pool.submit(compile_one, i, arch) for i, arch in jobs]
        for (i, arch), future in zip(jobs, futures):
            spec = specs[i]
            name = f"sm_{arch} {spec.kernel.__name__:<28} {spec.label:<44} warps={spec.num_warps}"
            try:
                result = future.result()
            except Exception as error:  # noqa: BLE001  (report every failure, then exit non-zero)
                failures += 1
                detail = "\n    ".join(str(error).strip().splitlines()[-12:])
                print(f"{name} FAILED: {type(error).__name__}\n    {detail}", flush=True)
                continue
            spill = result["spill"]
            spilled += spill > 0
            print(f"{name} regs={result['regs']:<3} smem={result['smem']:<6} spill={spill}"
                  f" ({result['seconds']:.1f}s)", flush=True)
    print(f"tome_kernels.aot: {len(jobs) - failures}/{len(jobs)} compiled ({spilled} with register spills) in "
          f"{time.perf_counter() - start:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
