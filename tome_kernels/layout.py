"""Token layout of one ToMe step: which tokens are A and B, how many merge, where each ends up.

N tokens, the first ``protected`` of which never merge::

    A = non-protected tokens at even positions, B = non-protected tokens at odd positions
    r is clamped to (N - protected) // 2
    output = [protected tokens (original order) ; unmerged A ; every B token (original order)]
    except when the clamped r is 0: then every op returns its input unchanged, in the same order.

Two derived maps express every op of :mod:`tome_kernels.reference`:

* ``rep [batch, N - r]``: the input position that represents each output token (its own position for a
  protected, unmerged A or B token: a merged group is represented by its B destination);
* ``group [batch, N]``: the output token each input token ends up in.

The C++ and CUDA kernels share the same integer arithmetic in csrc/include/tome/layout.h.
"""

from __future__ import annotations

import torch


def clamp_r(r: int, num_tokens: int, protected: int) -> int:
    """The number of merges actually made: at most half of the non-protected tokens."""
    return max(0, min(r, (num_tokens - protected) // 2))


def window_r(r: int, num_tokens: int, windows_shape) -> int:
    """The merges a windowed match makes: at most one per A slot of the window table (``[W, S]``: W * S / 2
    A tokens, each listed once), and at most one per A token."""
    num_windows, width = windows_shape
    return max(0, min(r, num_windows * (width // 2), num_a(num_tokens, 0)))


def first_a(protected: int) -> int:
    """Position of the first non-protected A (even) token."""
    return protected + (protected & 1)


def first_b(protected: int) -> int:
    """Position of the first non-protected B (odd) token."""
    return protected | 1


def num_a(num_tokens: int, protected: int) -> int:
    return max(0, (num_tokens - first_a(protected) + 1) // 2)


def num_b(num_tokens: int, protected: int) -> int:
    return max(0, (num_tokens - first_b(protected) + 1) // 2)


def a_positions(num_tokens: int, protected: int, device=None) -> torch.Tensor:
    return torch.arange(min(first_a(protected), num_tokens), num_tokens, 2, device=device)


def b_positions(num_tokens: int, protected: int, device=None) -> torch.Tensor:
    return torch.arange(min(first_b(protected), num_tokens), num_tokens, 2, device=device)


def b_output_index(b_pos: torch.Tensor, num_unmerged: int, protected: int) -> torch.Tensor:
    """Output index of the B token at input position ``b_pos``."""
    return protected + num_unmerged + (b_pos - first_b(protected)) // 2


def representatives(num_tokens: int, protected: int, unm_idx: torch.Tensor) -> torch.Tensor:
    """``rep [batch, N - r]``: input position of each output token (the identity when r = 0)."""
    batch, device = unm_idx.shape[0], unm_idx.device
    if unm_idx.shape[1] == num_a(num_tokens, protected):
        return torch.arange(num_tokens, device=device).expand(batch, num_tokens)
    prot = torch.arange(protected, device=device).expand(batch, protected)
    b_pos = b_positions(num_tokens, protected, device).expand(batch, -1)
    return torch.cat([prot, unm_idx, b_pos], dim=1)


def groups(num_tokens: int, protected: int, unm_idx, src_idx, dst_idx) -> torch.Tensor:
    """``group [batch, N]``: output index of every input token (a source goes to its destination)."""
    rep = representatives(num_tokens, protected, unm_idx)
    batch = rep.shape[0]
    out_index = torch.arange(rep.shape[1], device=rep.device).expand(batch, -1)
    # Out of place, so that the export compositions (tome_kernels.export) can trace it.
    group = torch.zeros(batch, num_tokens, dtype=torch.long, device=rep.device).scatter(1, rep, out_index)
    return group.scatter(1, src_idx, b_output_index(dst_idx, unm_idx.shape[1], protected))


# ----------------------------------------------------------------------------------------------------
# Window tables for ``tome.window_match``: [W, S] token positions, A (even) positions in the even slots
# ----------------------------------------------------------------------------------------------------
def grid_windows(shapes, rows: int, cols: int, device=None) -> torch.Tensor:
    """``rows x cols`` tiles (``cols`` even) of each grid of ``shapes`` ([(height, width)], each flattened
    row-major, one after the other): a tile row holds as many even as odd positions whatever the offsets, so
    each tile's even positions go to its even slots. Tokens of the incomplete tiles at the right and bottom
    edges are in no window."""
    tables, start = [], 0
    for height, width in shapes:
        tiles_y, tiles_x = height // rows, width // cols
        y = (torch.arange(tiles_y, device=device) * rows).view(-1, 1, 1, 1) + torch.arange(rows, device=device
                                                                                            ).view(1, 1, -1, 1)
        x = (torch.arange(tiles_x, device=device) * cols).view(1, -1, 1, 1) + torch.arange(cols, device=device
                                                                                            ).view(1, 1, 1, -1)
        tables.append((start + y * width + x).reshape(tiles_y * tiles_x, rows * cols))
        start += height * width
    table = torch.cat(tables)
    by_parity = table.gather(1, (table % 2 * start + table).argsort(dim=1))  # evens, then odds
    half = rows * cols // 2
    return torch.stack([by_parity[:, :half], by_parity[:, half:]], dim=-1).flatten(1)


def segment_windows(segments, width: int, device=None) -> torch.Tensor:
    """Windows of ``width`` (even) consecutive tokens inside each segment ``[lo, hi)``, starting at even
    positions; the tokens left over at a segment's ends are in no window."""
    starts = []
    for lo, hi in segments:
        first = lo + lo % 2
        count = max(hi - first, 0) // width
        starts.append(first + width * torch.arange(count, device=device))
    starts = torch.cat(starts)
    return starts[:, None] + torch.arange(width, device=device)
