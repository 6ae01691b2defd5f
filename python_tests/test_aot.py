"""python -m tome_kernels.aot's resource checks, ptxas log parsing and generated table, without compiling
(CI runs the compiles). The helpers run in a fresh process: tome_kernels.aot needs the compiled (not
interpreted) kernels, and this test session may have the Triton interpreter on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_CHECKS = r"""
import json, sys
from tome_kernels.tools import aot

result = {}
# Occupancy: 128 registers x 4 warps on sm_80 -> 4 blocks (register-bound) of 4 warps = 16 / 64 warps.
result["occ_regs"] = aot.occupancy(80, 128, 8192, 4)
# 53,504 B of shared memory on sm_86 (100 KB per SM, +1 KB reserved per block): 1 block of 4 warps / 48.
result["occ_smem"] = aot.occupancy(86, 186, 53504, 4)
result["over_smem"] = aot.problems("_attn_fwd_kernel", "fp32 D=128", 86, dict(smem=123136, spill=0))
result["spill"] = aot.problems("_attn_fwd_kernel", "fp32 D=32", 90, dict(smem=0, spill=4))
result["accepted"] = aot.problems("_match_rank_kernel", "UNM_ASCENDING=True", 80, dict(smem=128, spill=8))
result["accepted_elsewhere"] = aot.problems("_match_rank_kernel", "UNM_ASCENDING=True", 90, dict(smem=128, spill=8))
log = open(sys.argv[1]).read()
rows = aot.cuda_usage(log)
result["cuda"] = [(r["name"], r["arch"], r["regs"], r["spill"], r["smem"]) for r in rows]
table = {("_k", "cfg", 4): {80: dict(regs=32, spill=0, smem=1024, occupancy=1.0)}}
path = sys.argv[2]
begin, end = aot.TRITON_TABLE
cuda_begin, cuda_end = aot.CUDA_TABLE
open(path, "w").write(f"intro\n{begin}\nold\n{end}\nmiddle\n{cuda_begin}\n{cuda_end}\noutro\n")
aot.write_table(path, aot.TRITON_TABLE, aot.render_triton_table(table, [80, 90]))
aot.write_cuda_table(path, sys.argv[1], [80, 90])
first = open(path).read()
aot.write_table(path, aot.TRITON_TABLE, aot.render_triton_table(table, [80, 90]))
aot.write_cuda_table(path, sys.argv[1], [80, 90])
result["idempotent"] = first == open(path).read()
result["table"] = first
print(json.dumps(result))
"""

_PTXAS_LOG = """\
ptxas info    : Compiling entry function '_ZN4tome4cuda46_GLOBAL__N__daa0df36_8_match_cu_37c6f7b6_1698819best_partner_kernelIN3c108BFloat16EEEvPKT_PKN2at10OpMathTypeIS5_E4typeENS_6LayoutEllPSB_Pi' for 'sm_90'
ptxas info    : Function properties for _ZN4tome4cuda46_GLOBAL__N__daa0df36_8_match_cu_37c6f7b6_1698819best_partner_kernelIN3c108BFloat16EEEvPKT_PKN2at10OpMathTypeIS5_E4typeENS_6LayoutEllPSB_Pi
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8320 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN4tome4cuda46_GLOBAL__N__daa0df36_8_match_cu_37c6f7b6_1698821unmerged_order_kernelEPKiNS_6LayoutElPl' for 'sm_80'
ptxas info    : Function properties for _ZN4tome4cuda46_GLOBAL__N__daa0df36_8_match_cu_37c6f7b6_1698821unmerged_order_kernelEPKiNS_6LayoutElPl
    16 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 30 registers, used 0 barriers, 384 bytes cmem[0]
"""


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    (tmp / "ptxas.log").write_text(_PTXAS_LOG)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _CHECKS, str(tmp / "ptxas.log"), str(tmp / "KERNELS.md")],
                          capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_occupancy(checks):
    assert checks["occ_regs"] == 16 / 64
    assert checks["occ_smem"] == 4 / 48


def test_resource_checks(checks):
    assert checks["over_smem"] == ["shared memory 123136 B > 101376 B per block on sm_86"]
    assert checks["spill"] == ["spills 4 B (not in SPILLS_ACCEPTED)"]
    assert checks["accepted"] == []
    assert checks["accepted_elsewhere"] == ["spills 8 B (not in SPILLS_ACCEPTED)"]


def test_ptxas_log_parsing(checks):
    assert checks["cuda"] == [["best_partner_kernel<BFloat16>", 90, 64, 0, 8320], ["unmerged_order_kernel", 80, 30, 12, 0]]


def test_table_is_rewritten_between_markers_and_idempotent(checks):
    table = checks["table"]
    assert checks["idempotent"]
    assert table.startswith("intro\n") and table.endswith("\noutro\n") and "old" not in table
    assert "\nmiddle\n" in table
    assert "| `_k` | cfg | 4 | 32 / 0 / 1.0 / 100% | – |" in table
    assert "| `best_partner_kernel<BFloat16>` | 8 | – | 64 / 0 / 8.1 / " in table
