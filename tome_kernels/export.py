"""Export of ToMe models: ``torch.export`` and ONNX, with the ``tome`` ops written in standard ops.

``torch.export.export`` keeps the ``tome`` ops of a patched model as custom-op nodes (their fake kernels
give the shapes), so the exported program runs wherever ``tome_kernels`` is imported. A runtime without
``tome_kernels`` (onnxruntime, TensorRT, ...) needs the ops in standard operators: :func:`decompositions`
maps each inference op to an out-of-place composition of ATen ops that the ONNX exporter translates to
TopK, ArgMax, Gather, ScatterElements (add / max) and Div. The compositions follow the op contract
exactly (the same matches, order and ties as every backend; README "The op contract")::

    program = tome_kernels.export.export_program(model, (images,))            # dynamic batch
    tome_kernels.export.export_onnx(model, (images,), "model.onnx")          # runs in onnxruntime

``python -m tome_kernels.export --model vit_base_patch16_224 --r 16 --onnx out.onnx`` (:mod:`tome_kernels.tools.export`)
does the latter for a timm model and checks it in onnxruntime (`--compare`: r = 0 against r, timed in both runtimes). Only the inference ops are covered:
an exported training graph is not a use case.
"""

from __future__ import annotations

import torch

from . import layout, reference

__all__ = ["decompositions", "export_program", "export_onnx"]


# ----------------------------------------------------------------------------------------------------
# The ops as out-of-place ATen compositions (N is static per call). merge, unmerge and merge_source are the
# reference's own; the match is not, since a stable sort has no ONNX translation.
# ----------------------------------------------------------------------------------------------------
def _identity_match(metric, num_a: int, first_a: int):
    batch = metric.shape[0]
    unm_idx = first_a + 2 * torch.arange(num_a, device=metric.device).expand(batch, num_a)
    empty = metric.new_zeros(batch, 0, dtype=torch.long)
    return unm_idx.clone(), empty, empty.clone()


def _unit(metric):
    metric = metric.to(torch.promote_types(metric.dtype, torch.float32))
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(reference.NORM_EPS)


def _rank_slots(best_score, r: int, unm_ascending: bool):
    """``(unm_slots, src_slots)``: the A slots ranked by best score (descending, ties to the lower slot; the
    first r merge), the unmerged in rank order or ascending. The rank is the number of A tokens ranked
    before: counting keeps the contract's tie order exactly, whatever a runtime's TopK does with ties."""
    batch, num_a = best_score.shape
    slot = torch.arange(num_a, device=best_score.device)
    higher = best_score.unsqueeze(1) > best_score.unsqueeze(2)
    tied_before = (best_score.unsqueeze(1) == best_score.unsqueeze(2)) & (slot < slot.unsqueeze(1))
    rank = (higher | tied_before).sum(dim=-1)
    if unm_ascending:  # unmerged A in ascending position, behind them the sources in rank order
        unmerged = rank >= r
        rank = torch.where(unmerged, unmerged.long().cumsum(dim=-1) - 1, num_a - r + rank)
    order = torch.zeros_like(rank).scatter(1, rank, slot.expand(batch, num_a))  # the inverse permutation
    if unm_ascending:
        return order[:, :num_a - r], order[:, num_a - r:]
    return order[:, r:], order[:, :r]


def _match(metric, r: int, protected: int = 0):
    num_tokens = metric.shape[1]
    r = layout.clamp_r(r, num_tokens, protected)
    first_a, first_b = layout.first_a(protected), layout.first_b(protected)
    num_a = layout.num_a(num_tokens, protected)
    if r == 0 or layout.num_b(num_tokens, protected) == 0:
        return _identity_match(metric, num_a, first_a)
    metric = _unit(metric)
    scores = metric[:, first_a::2] @ metric[:, first_b::2].transpose(1, 2)
    best_score, best_b = scores.max(dim=-1)  # ArgMax: the first maximum, the contract's tie rule
    unm_slots, src_slots = _rank_slots(best_score, r, protected >= 1)
    return first_a + 2 * unm_slots, first_a + 2 * src_slots, first_b + 2 * best_b.gather(1, src_slots)


def _window_match(metric, windows, r: int):
    """As ``_match``, each A token's best B searched in its window: quadratic in nA (the rank by counting)."""
    batch, num_tokens, _ = metric.shape
    r = layout.window_r(r, num_tokens, windows.shape)
    num_a = layout.num_a(num_tokens, 0)
    if r == 0:
        return _identity_match(metric, num_a, 0)
    metric = _unit(metric)
    a_pos, b_pos = windows[:, 0::2], windows[:, 1::2]
    scores = metric[:, a_pos] @ metric[:, b_pos].transpose(-1, -2)  # [B, W, S/2, S/2]
    window_best, window_slot = scores.max(dim=-1)
    a_slot = (a_pos // 2).flatten().expand(batch, -1)
    # Unlisted A tokens score -inf: they rank last, and r never reaches them.
    best_score = window_best.new_full((batch, num_a), float("-inf")).scatter(1, a_slot, window_best.flatten(1))
    partner = b_pos.expand(batch, -1, -1).gather(2, window_slot).flatten(1)
    best_b = torch.ones(batch, num_a, dtype=torch.long, device=metric.device).scatter(1, a_slot, partner)
    unm_slots, src_slots = _rank_slots(best_score, r, True)
    return 2 * unm_slots, 2 * src_slots, best_b.gather(1, src_slots)


def _size_2d(size):
    return None if size is None else size.reshape(size.shape[0], size.shape[1])


def _bipartite_merge(x, pos, size, r, metric=None, protected=0, pos_mode="keep"):
    unm_idx, src_idx, dst_idx = _match(x if metric is None else metric, r, protected)
    x_out, pos_out, size_out = reference.merge(x, pos, _size_2d(size), unm_idx, src_idx, dst_idx, protected,
                                               pos_mode == "mean")
    return x_out, pos_out, size_out.unsqueeze(-1), unm_idx, src_idx, dst_idx


def _merge_op(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mode):
    x_out, pos_out, size_out = reference.merge(x, pos, _size_2d(size), unm_idx, src_idx, dst_idx, protected,
                                               pos_mode == "mean")
    return x_out, pos_out, size_out.unsqueeze(-1)


def _merge_public(x, size, unm_idx, src_idx, dst_idx, protected=0):
    """``merge``: a composite op that export keeps as it is."""
    x_out, _, size_out = _merge_op(x, None, size, unm_idx, src_idx, dst_idx, protected, "keep")
    return x_out, size_out


# The graph passes an argument left at its schema default as absent: the compositions keep the defaults.
def _unmerge(y, unm_idx, src_idx, dst_idx, protected=0):
    return reference.unmerge(y, unm_idx, src_idx, dst_idx, protected)


def _merge_source(source, unm_idx, src_idx, dst_idx, protected=0):
    return reference.merge_source(source, unm_idx, src_idx, dst_idx, protected)


def _prop_attention(q, k, v, size, scale):
    """``(out, lse)``; a row whose keys all have size 0 gets output 0 and lse -inf, as the contract. Not the
    reference's logsumexp form: a runtime's LogSumExp of an all -inf row may give NaN, not -inf."""
    acc = torch.promote_types(q.dtype, torch.float32)
    logits = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale
    if size is not None:
        logits = logits + size.reshape(size.shape[0], 1, 1, -1).to(acc).log()
    peak = logits.amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
    weights = (logits - peak).exp()
    total = weights.sum(dim=-1, keepdim=True)
    out = (weights @ v.to(acc)) / torch.where(total == 0, torch.ones_like(total), total)
    return out.to(q.dtype), (total.log() + peak).squeeze(-1)


def decompositions() -> dict:
    """``{tome op overload: ATen composition}`` for ``ExportedProgram.run_decompositions``."""
    ops = torch.ops.tome
    return {
        ops.bipartite_match.default: _match,
        ops.window_match.default: _window_match,
        ops.bipartite_merge.default: _bipartite_merge,
        ops._merge.default: _merge_op,
        ops.merge.default: _merge_public,
        ops.unmerge.default: _unmerge,
        ops.merge_source.default: _merge_source,
        ops._prop_attention.default: _prop_attention,
    }


# ----------------------------------------------------------------------------------------------------
# Export entry points
# ----------------------------------------------------------------------------------------------------
def _dynamic_batch(example_inputs: tuple):
    """Example inputs with a batch of at least 2 (export specialises a batch of 1), and their dynamic batch
    dimension given per tensor (so any forward signature, ``*args`` included, takes it)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    examples = tuple(t.expand(2, *t.shape[1:]) if isinstance(t, torch.Tensor) and t.shape[0] == 1 else t
                     for t in example_inputs)
    shapes = torch.export.ShapesCollection()
    for t in examples:
        if isinstance(t, torch.Tensor):
            shapes[t] = {0: batch}
    return examples, shapes


def export_program(model: torch.nn.Module, example_inputs: tuple, dynamic_batch: bool = True,
                   decompose: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (in eval mode; the batch dimension of every tensor input dynamic
    by default); with ``decompose`` the ``tome`` ops are replaced by their ATen compositions
    (:func:`decompositions`)."""
    example_inputs, dynamic_shapes = _dynamic_batch(tuple(example_inputs)) if dynamic_batch else (
        tuple(example_inputs), None)
    if dynamic_shapes is not None:
        dynamic_shapes = dynamic_shapes.dynamic_shapes(model, example_inputs)
    program = torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    return program.run_decompositions(decompositions()) if decompose else program


def export_onnx(model: torch.nn.Module, example_inputs: tuple, path: str, dynamic_batch: bool = True,
                opset: int = 18):
    """Writes ``model`` as ONNX to ``path`` (standard operators only) and returns the ONNXProgram."""
    program = export_program(model, example_inputs, dynamic_batch, decompose=True)
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset,
                                     optimize=True, external_data=False)
    onnx_program.save(path)
    return onnx_program


if __name__ == "__main__":  # python -m tome_kernels.export: the command-line tool
    from .tools.export import main

    main()
