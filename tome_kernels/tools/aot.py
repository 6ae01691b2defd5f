"""Compile every shipped Triton kernel x config for each target GPU architecture, without a GPU, and check
what each compile needs.

    python -m tome_kernels.aot [--arch 80 86 89 90 100 120] [--jobs N] [--filter TEXT]
                               [--write-table docs/KERNELS.md]
    python -m tome_kernels.aot --write-table docs/KERNELS.md --cuda-log LOG

One line per kernel x config x arch: registers per thread and spill stores (bytes, from the ``ptxas -v`` log
Triton prints with its ``dump_ptxas_log`` knob; the cubin's resource usage via Triton's ``cuobjdump`` as a
fallback), shared memory (bytes, the compiled kernel's ``metadata.shared``) and the theoretical occupancy
that follows (resident warps / the SM's maximum). A CompiledKernel's ``n_regs`` / ``n_spills`` are only
filled in when it is loaded on a GPU, hence ptxas.

Exits non-zero when a compile fails, when a kernel needs more shared memory than one block may have on that
arch (``SHARED_MEMORY_PER_BLOCK``: the launch would fail there with OutOfResources), or when a kernel spills
registers and ``SPILLS_ACCEPTED`` does not name it with a reason.

The specs come from each kernel module's ``aot_specs`` (the config tables its launcher uses; attention's
depend on the arch's shared memory). Every run compiles from scratch in a temporary Triton cache (nothing is
written to ~/.triton). ``--write-table`` rewrites the generated resource table of docs/KERNELS.md (between
its ``aot-table`` markers) from the results; with ``--cuda-log`` it rewrites the CUDA backend's table
instead, parsed from an ``nvcc -Xptxas -v`` log (``scripts/cuda_resources.sh`` writes one).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import math
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

from tome_kernels.triton._common import SHARED_MEMORY_PER_BLOCK  # noqa: E402

ARCHS = tuple(SHARED_MEMORY_PER_BLOCK)

# (kernel name, label prefix, arch) -> why its spill is accepted.
SPILLS_ACCEPTED: dict[tuple[str, str, int], str] = {
    ("_match_rank_kernel", "UNM_ASCENDING=True", 80):
        "ptxas for sm_80 parks 3 words on the stack at 40 registers: stored once before the compare loops and "
        "loaded once after them (STL/LDL outside every loop in the SASS); no other arch spills it",
    ("_attn_bwd_kernel", "fp32 D=128", 100):
        "fp32 with head dim 65-128, backward, sm_100: 12 B at 255 registers with the smallest tiles tl.dot "
        "takes (16 x 16; 3xTF32 splits every operand in two); the next candidates spilled 24-120 B",
    **{("_attn_fwd_kernel", f"{dtype} D=64", 120):
       "sm_120, 16-bit head dim 33-64 forward: 52 B at 255 registers since the key loop carries 64-bit pointer "
       "tiles (int64-safe offsets; 179 registers with 32-bit offsets); no other arch spills it"
       for dtype in ("fp16", "bf16")},
}


@dataclasses.dataclass(frozen=True)
class SmLimits:
    """Per-SM limits for the theoretical occupancy (CUDA C++ Programming Guide, compute capability table)."""

    max_warps: int
    max_blocks: int
    shared_memory: int  # bytes per SM usable by blocks


SM_LIMITS = {80: SmLimits(64, 32, 167_936), 86: SmLimits(48, 16, 102_400), 89: SmLimits(48, 24, 102_400),
             90: SmLimits(64, 32, 233_472), 100: SmLimits(64, 32, 233_472), 120: SmLimits(48, 32, 102_400)}
REGISTERS_PER_SM = 65_536
REGISTER_GRANULE = 256  # registers are allocated per warp in units of 256
SHARED_RESERVED_PER_BLOCK = 1024  # the driver's reservation per resident block (sm_80 and newer)


def occupancy(arch: int, regs: int, shared: int, warps: int) -> float:
    """Resident warps / the SM's maximum, from registers, shared memory and block limits (no other limit)."""
    limits = SM_LIMITS[arch]
    regs_per_warp = math.ceil(regs * 32 / REGISTER_GRANULE) * REGISTER_GRANULE
    blocks = min(limits.max_blocks, limits.max_warps // warps, REGISTERS_PER_SM // (regs_per_warp * warps))
    if shared:
        blocks = min(blocks, limits.shared_memory // (shared + SHARED_RESERVED_PER_BLOCK))
    return blocks * warps / limits.max_warps


def all_specs(arch: int):
    from tome_kernels.triton import _attention, _match, _merge

    return [*_match.aot_specs(), *_merge.aot_specs(), *_attention.aot_specs(arch)]


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
    spec = all_specs(arch)[index]
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


def problems(kernel: str, label: str, arch: int, result: dict) -> list[str]:
    """Why this compile may not ship (empty when it may)."""
    found = []
    if result["smem"] > SHARED_MEMORY_PER_BLOCK[arch]:
        found.append(f"shared memory {result['smem']} B > {SHARED_MEMORY_PER_BLOCK[arch]} B per block on sm_{arch}")
    if result["spill"] and not any(kernel == name and label.startswith(prefix) and arch == accepted_arch
                                   for name, prefix, accepted_arch in SPILLS_ACCEPTED):
        found.append(f"spills {result['spill']} B (not in SPILLS_ACCEPTED)")
    return found


# ----------------------------------------------------------------------------------------------------------
# The CUDA backend's kernels: parsed from nvcc -Xptxas -v output
# ----------------------------------------------------------------------------------------------------------
# Threads per block of the csrc/cuda kernels: 256 (kThreads, kMatchThreads, kRankThreads...), except the
# attention kernels' kAttnThreads.
CUDA_BLOCK_THREADS = {"attention": 128}


def cuda_block_threads(kernel: str) -> int:
    return next((threads for prefix, threads in CUDA_BLOCK_THREADS.items() if kernel.startswith(prefix)), 256)
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)a?'")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores")


def cuda_usage(log: str) -> list[dict]:
    """One row per (kernel instantiation, arch) of an ``nvcc -Xptxas -v`` log; names demangled by c++filt."""
    rows, current = [], None
    for line in log.splitlines():
        if entry := _PTXAS_ENTRY.search(line):
            current = dict(mangled=entry.group(1), arch=int(entry.group(2)), spill=0, stack=0)
        elif current and (spill := _PTXAS_SPILL.search(line)):
            current.update(stack=int(spill.group(1)), spill=int(spill.group(2)))
        elif current and (used := _PTXAS_USED.search(line)):
            smem = _PTXAS_SMEM.search(line)
            current.update(regs=int(used.group(1)), smem=int(smem.group(1)) if smem else 0)
            rows.append(current)
            current = None
    names = subprocess.run(["c++filt"], input="\n".join(r["mangled"] for r in rows), capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for row, name in zip(rows, names):
        row["name"] = _short_cuda_name(name)
    return rows


def _short_cuda_name(demangled: str) -> str:
    """``void tome::cuda::(anonymous namespace)::gather_kernel<c10::Half, 8, (tome::cuda::Gather)0>(...)``
    -> ``gather_kernel<Half, 8, 0>``: the name and template arguments, without namespaces and casts."""
    depth = 0
    for end, char in enumerate(demangled):
        depth += (char == "<") - (char == ">")
        if char == "(" and depth == 0 and end > 0 and demangled[end - 1] != ":":
            break
    name = re.sub(r"(\(anonymous namespace\)|\w+)::", "", demangled[:end].removeprefix("void "))
    return re.sub(r"\(\w+\)(?=-?\d)", "", name)  # enum casts: (Gather)0 -> 0


# ----------------------------------------------------------------------------------------------------------
# The generated table of docs/KERNELS.md
# ----------------------------------------------------------------------------------------------------------
TRITON_TABLE = ("<!-- aot-table:begin (python -m tome_kernels.aot --write-table; do not edit) -->",
                "<!-- aot-table:end -->")
CUDA_TABLE = ("<!-- aot-cuda-table:begin (python -m tome_kernels.aot --cuda-log; do not edit) -->",
              "<!-- aot-cuda-table:end -->")


def _cell(result: dict) -> str:
    return (f"{result['regs']} / {result['spill']} / {result['smem'] / 1024:.1f} / "
            f"{100 * result['occupancy']:.0f}%")


def _arch_cells(results: dict, archs) -> str:
    return " | ".join(_cell(results[arch]) if arch in results else "–" for arch in archs)


def _header(first_columns: str, archs) -> list[str]:
    return [f"| {first_columns} | " + " | ".join(f"sm_{a}" for a in archs) + " |",
            "|" + "---|" * (first_columns.count("|") + 1 + len(archs))]


def render_triton_table(results: dict, archs) -> str:
    """Markdown, one row per kernel x config, one cell per arch: registers / spill bytes / shared memory KB /
    occupancy."""
    lines = _header("kernel | config | warps", archs)
    for (kernel, label, warps), per_arch in results.items():
        lines.append(f"| `{kernel}` | {label} | {warps} | {_arch_cells(per_arch, archs)} |")
    return "\n".join(lines)


def render_cuda_table(rows: list[dict], archs) -> str:
    """The same for the CUDA backend's kernels (one row per template instantiation)."""
    grouped: dict = {}
    for row in rows:
        grouped.setdefault(row["name"], {})[row["arch"]] = row
    lines = _header("kernel | warps", archs)
    for name, per_arch in sorted(grouped.items()):
        lines.append(f"| `{name}` | {cuda_block_threads(name) // 32} | {_arch_cells(per_arch, archs)} |")
    return "\n".join(lines)


def write_table(path: str, markers: tuple[str, str], table: str) -> None:
    """Replace what lies between the markers (idempotent: the same table leaves the file unchanged)."""
    begin_marker, end_marker = markers
    with open(path) as f:
        text = f.read()
    begin, end = text.find(begin_marker), text.find(end_marker)
    if begin < 0 or end < 0:
        raise SystemExit(f"{path} has no {begin_marker!r} ... {end_marker!r} markers")
    new = text[:begin] + begin_marker + "\n\n" + table + "\n\n" + text[end:]
    if new != text:
        with open(path, "w") as f:
            f.write(new)


def write_cuda_table(path: str, log_path: str, archs) -> None:
    with open(log_path) as f:
        rows = [row for row in cuda_usage(f.read()) if row["arch"] in archs]
    for row in rows:
        row["occupancy"] = occupancy(row["arch"], row["regs"], row["smem"], cuda_block_threads(row["name"]) // 32)
    write_table(path, CUDA_TABLE, render_cuda_table(rows, archs))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--filter", default="", help="only specs whose kernel name or label contains this")
    parser.add_argument("--write-table", metavar="MARKDOWN", help="rewrite the generated resource table there")
    parser.add_argument("--cuda-log", metavar="LOG",
                        help="with --write-table: rewrite the CUDA table from this nvcc -Xptxas -v log, compile nothing")
    args = parser.parse_args(argv)
    if args.cuda_log:
        if not args.write_table:
            parser.error("--cuda-log needs --write-table")
        write_cuda_table(args.write_table, args.cuda_log, args.arch)
        print(f"tome_kernels.aot: CUDA table written to {args.write_table}")
        return 0

    specs = {arch: all_specs(arch) for arch in args.arch}
    jobs = [(i, arch) for arch in args.arch for i, spec in enumerate(specs[arch])
            if args.filter in f"{spec.kernel.__name__} {spec.label}"]
    jobs.sort(key=lambda job: (job[0], args.arch.index(job[1])))  # each spec's archs together
    print(f"tome_kernels.aot: triton {triton.__version__}, {len(jobs)} compiles "
          f"(sm_{'/sm_'.join(map(str, args.arch))})", flush=True)
    failures = rejected = 0
    table: dict = {}
    start = time.perf_counter()
    # Compiles run in worker processes (Triton's compile is CPU-bound Python + ptxas); results print in order.
    with tempfile.TemporaryDirectory(prefix="tome_aot_") as cache_dir, \
            concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, initializer=_init_worker,
                                                   initargs=(cache_dir,)) as pool:
        futures = [pool.submit(compile_one, i, arch) for i, arch in jobs]
        for (i, arch), future in zip(jobs, futures):
            spec = specs[arch][i]
            kernel = spec.kernel.__name__
            name = f"sm_{arch:<3} {kernel:<28} {spec.label:<48} warps={spec.num_warps}"
            try:
                result = future.result()
            except Exception as error:  # noqa: BLE001  (report every failure, then exit non-zero)
                failures += 1
                detail = "\n    ".join(str(error).strip().splitlines()[-12:])
                print(f"{name} FAILED: {type(error).__name__}\n    {detail}", flush=True)
                continue
            result["occupancy"] = occupancy(arch, result["regs"], result["smem"], spec.num_warps)
            issues = problems(kernel, spec.label, arch, result)
            rejected += bool(issues)
            print(f"{name} regs={result['regs']:<3} smem={result['smem']:<6} spill={result['spill']:<3} "
                  f"occupancy={100 * result['occupancy']:.0f}% ({result['seconds']:.1f}s)"
                  + "".join(f"\n    REJECTED: {issue}" for issue in issues), flush=True)
            table.setdefault((kernel, spec.label, spec.num_warps), {})[arch] = result
    print(f"tome_kernels.aot: {len(jobs) - failures}/{len(jobs)} compiled, {rejected} rejected (shared memory over "
          f"the arch's limit or unaccepted spills) in {time.perf_counter() - start:.0f}s")
    if args.write_table and not failures:
        write_table(args.write_table, TRITON_TABLE, render_triton_table(table, args.arch))
        print(f"tome_kernels.aot: table written to {args.write_table}")
    return 1 if failures or rejected else 0


if __name__ == "__main__":
    sys.exit(main())
