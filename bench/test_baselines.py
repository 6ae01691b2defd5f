"""The benchmarks' baseline does the ops' work: the original ToMe step makes the merges of bipartite_merge."""

import torch

import tome_kernels  # noqa: F401  (registers the ops)

import baselines


def test_chain_makes_the_ops_merges():
    """For protected = 0 and 1 (class token) the ops reproduce the paper's algorithm step by step."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 197, 32, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 5, (4, 197, 1), generator=gen).double()
    metric = torch.randn(4, 197, 64, generator=gen, dtype=torch.float64)
    for protected in (0, 1):
        with tome_kernels.use_backend("torch"):
            x_out, _, size_out, *_ = torch.ops.tome.bipartite_merge(x, None, size, 16, metric=metric,
                                                                    protected=protected)
        x_chain, size_chain = baselines.chain(x, size, metric, 16, protected)
        torch.testing.assert_close(x_out, x_chain, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(size_out, size_chain, rtol=0, atol=0)


def test_composed_window_match_makes_the_ops_pairs():
    """The composed baseline of window_match (bipartite_match on tiles, torch ranking) makes its matching."""
    windows = tome_kernels.layout.grid_windows([(10, 12), (5, 6)], 2, 4)
    metric = torch.randn(2, 150, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for r in (1, 20, 30):
        for expected, composed in zip(torch.ops.tome.window_match(metric, windows, r),
                                      baselines.window_match_composed(metric, windows, r)):
            torch.testing.assert_close(composed, expected, rtol=0, atol=0)
