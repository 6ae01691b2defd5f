"""tome_kernels.tools.bench_model: FLOP counts, token schedules and the CLI on a tiny model."""

import pytest
import torch

timm = pytest.importorskip("timm")

from tome_kernels.tools import bench_model  # noqa: E402
from tome_kernels.patch import parse_r  # noqa: E402


def test_vit_flops_and_ceiling():
    model = timm.create_model("vit_base_patch16_224", pretrained=False, device="meta")
    base = bench_model.vit_flops(model, 197, batch=1)
    assert base == pytest.approx(2 * 17.58e9, rel=0.01)  # ViT-B/16: 17.6 GMACs
    assert base / bench_model.vit_flops(model, 197, 1, parse_r(16, 12)) == pytest.approx(2.00, abs=0.01)
    assert bench_model.vit_flops(model, 197, batch=4) == 4 * base


def test_token_counts_clamp():
    assert bench_model.vit_token_counts(17, [4, 4, 4, 4], protected=1) == [(17, 13), (13, 9), (9, 5), (5, 3)]


def test_cli_rows():
    rows = bench_model.main(["--model", "vit_tiny_patch16_224", "--img-size", "64", "--batch", "1", "--sweep",
                             "0,3", "--rounds", "1", "--warmup", "0", "--threads", "1", "--free-merge",
                             "--no-progress"])
    assert [row["kind"] for row in rows] == ["baseline", "tome", "tome", "free", "free"]
    assert [row["value"] for row in rows[1:]] == [0, 3, 0, 3]
    assert rows[1]["ceiling"] == 1.0 and rows[2]["ceiling"] > 1.0
    assert all(row["ms"] > 0 and torch.isfinite(torch.tensor(row["speedup"])) for row in rows)
