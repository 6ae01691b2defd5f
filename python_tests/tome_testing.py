"""Helpers the test modules import by name. Not in conftest.py: bench/ has a conftest.py too, and a
``from conftest import ...`` would get whichever of the two pytest loaded last."""

import torch

import tome_kernels


def available(device: str) -> list[str]:
    """The backends usable on ``device`` here."""
    return [name for name, reason in tome_kernels.available_backends(device).items() if reason is None]


def tie_free_metric(batch: int, num_tokens: int, channels: int = 64, dtype=torch.float32, device="cpu", seed=0):
    """A metric whose best scores are well separated (gaps ~1/N, far above rounding), so every backend
    must return exactly the reference's indices: A token i is a random B token plus an orthogonal offset
    of a distinct length, so its best score 1/sqrt(1 + noise^2) is distinct and far from the runner-up."""
    gen = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, num_tokens, channels, generator=gen, dtype=torch.float64)
    num_a = (num_tokens + 1) // 2
    num_b = num_tokens // 2
    if num_b > 0 and channels >= 32:
        partner = torch.randint(num_b, (batch, num_a), generator=gen)
        noise = torch.stack([torch.randperm(num_a, generator=gen) for _ in range(batch)]).to(torch.float64)
        noise = (0.1 + 0.9 * noise / max(num_a, 1))[..., None]
        base = metric[:, 1::2].gather(1, partner[..., None].expand(-1, -1, channels))
        direction = torch.randn(batch, num_a, channels, generator=gen, dtype=torch.float64)
        direction -= (direction * base).sum(-1, keepdim=True) / (base * base).sum(-1, keepdim=True) * base
        direction = direction / direction.norm(dim=-1, keepdim=True) * base.norm(dim=-1, keepdim=True)
        metric[:, 0::2] = base + noise * direction
    return metric.to(dtype).to(device)


def random_windows(num_tokens: int, num_windows: int, width: int, seed=0) -> torch.Tensor:
    """A window table for ``tome.window_match``: ``num_windows`` windows of ``width`` slots, A slots drawn
    without repetition from the even positions (in random order), B slots from the odd ones (with
    repetition: windows may share destinations)."""
    gen = torch.Generator().manual_seed(seed)
    half = width // 2
    a_pos = torch.arange(0, num_tokens, 2)[torch.randperm((num_tokens + 1) // 2, generator=gen)]
    a_pos = a_pos[: num_windows * half].view(num_windows, half)
    b_pos = 1 + 2 * torch.randint(num_tokens // 2, (num_windows, half), generator=gen)
    return torch.stack([a_pos, b_pos], dim=-1).flatten(1)


def window_tie_free_metric(batch: int, num_tokens: int, windows: torch.Tensor, channels: int = 64,
                           dtype=torch.float32, device="cpu", seed=0):
    """As :func:`tie_free_metric`, within windows: each listed A token is a random B token of its window plus
    an orthogonal offset of a distinct length, so best scores are distinct and far from the runner-up."""
    gen = torch.Generator().manual_seed(seed)
    metric = torch.randn(batch, num_tokens, channels, generator=gen, dtype=torch.float64)
    a_pos, b_pos = windows[:, 0::2].flatten(), windows[:, 1::2]
    count = a_pos.numel()
    slot = torch.randint(b_pos.shape[1], (batch, b_pos.shape[0], b_pos.shape[1]), generator=gen)
    partner = b_pos.expand(batch, -1, -1).gather(2, slot).flatten(1)  # [batch, K]
    noise = torch.stack([torch.randperm(count, generator=gen) for _ in range(batch)]).to(torch.float64)
    noise = (0.1 + 0.9 * noise / max(count, 1))[..., None]
    base = metric.gather(1, partner[..., None].expand(-1, -1, channels))
    direction = torch.randn(batch, count, channels, generator=gen, dtype=torch.float64)
    direction -= (direction * base).sum(-1, keepdim=True) / (base * base).sum(-1, keepdim=True) * base
    direction = direction / direction.norm(dim=-1, keepdim=True) * base.norm(dim=-1, keepdim=True)
    metric[:, a_pos] = base + noise * direction
    return metric.to(dtype).to(device)


# Tolerances of a backend against the reference, by dtype (rtol = atol): both accumulate in fp32 (fp64 for fp64),
# so half types differ by about one rounding of the output.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def reference_outputs(fn, *args, **kwargs):
    """``fn`` run on the torch backend (tome_kernels/reference.py): the expected values."""
    with tome_kernels.use_backend("torch"):
        return fn(*args, **kwargs)


def assert_close(actual, expected, dtype=None):
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
