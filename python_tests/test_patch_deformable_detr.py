"""tome_kernels.patch.deformable_detr on a small random-weight transformers Deformable DETR (CPU, seconds)."""

import copy
import importlib
import pickle

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (DeformableDetrConfig, DeformableDetrForObjectDetection, DeformableDetrModel,  # noqa: E402
                          DetrConfig, DetrForObjectDetection, ResNetConfig)

import tome_kernels.patch  # noqa: E402

deformable = importlib.import_module("tome_kernels.patch.hf_deformable_detr")

# Four levels of 16x20, 8x10, 4x5 and 2x3 tokens: 426 encoder tokens, odd level widths included.
HEIGHT, WIDTH = 128, 160
SIZES = [(128, 160), (72, 100)]  # a padded batch of two image sizes


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def make_model(cls=DeformableDetrForObjectDetection, seed=0, **overrides):
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage2", "stage3", "stage4"])
    settings = dict(backbone_config=backbone, d_model=32, encoder_layers=2, decoder_layers=2,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    num_queries=20, num_labels=5)
    settings.update(overrides)
    torch.manual_seed(seed)
    return cls(DeformableDetrConfig(**settings)).eval()


def images(batch=2, seed=1):
    return torch.randn(batch, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


def padded_mask(sizes):
    mask = torch.zeros(len(sizes), HEIGHT, WIDTH, dtype=torch.long)
    for index, (height, width) in enumerate(sizes):
        mask[index, :height, :width] = 1
    return mask


def run(model, pixel_values, pixel_mask=None):
    with torch.no_grad():
        return model(pixel_values, pixel_mask=pixel_mask)


def assert_same_outputs(out, ref, exact=True, atol=0.0):
    for name in ("logits", "pred_boxes", "encoder_last_hidden_state", "last_hidden_state"):
        a, b = getattr(out, name, None), getattr(ref, name, None)
        if b is None:
            continue
        if exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)


def token_mask(model, pixel_values, pixel_mask):
    """The flattened multi-scale padding mask the encoder gets ([B, N] bool, True = real)."""
    seen = {}

    def hook(module, args, kwargs):
        seen["mask"] = kwargs["attention_mask"]

    encoder = model.model.encoder if hasattr(model, "model") else model.encoder
    handle = encoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run(model, pixel_values, pixel_mask)
    finally:
        handle.remove()
    return seen["mask"].bool()


# ----------------------------------------------------------------------------------------------------
# ratio = 0 is the unpatched model
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True])
def test_ratio_zero_is_exactly_unpatched(padded):
    model = make_model()
    x = images(2 if padded else 1)
    mask = padded_mask(SIZES) if padded else None
    ref = run(model, x, mask)
    tome_kernels.patch.deformable_detr(model, ratio=0.0)
    assert_same_outputs(run(model, x, mask), ref)
    model.ratio = 0.5
    assert not torch.equal(run(model, x, mask).logits, ref.logits)
    model.ratio = 0
    assert_same_outputs(run(model, x, mask), ref)
    tome_kernels.patch.unpatch(model)
    assert type(model) is DeformableDetrForObjectDetection
    assert_same_outputs(run(model, x, mask), ref)


@pytest.mark.parametrize("padded", [False, True])
def test_merge_path_with_nothing_to_merge_matches_transformers(padded):
    """A ratio too small for one merge runs the ToMe layers with empty groups: transformers' numbers."""
    model = make_model()
    x = images(2 if padded else 1)
    mask = padded_mask(SIZES) if padded else None
    ref = run(model, x, mask)
    tome_kernels.patch.deformable_detr(model, ratio=1e-4)
    out = run(model, x, mask)
    assert model._tome_info["queries"] == [426, 426]
    assert_same_outputs(out, ref, exact=False, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------------
def test_dense_layer_matches_explicit_merge_and_unmerge():
    """One patched layer equals the dense recipe written out with the groups the model used."""
    model = make_model(encoder_layers=1)
    x = images(1)
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs, hidden=args[0] if args else kwargs["inputs_embeds"])

    handle = model.model.encoder.register_forward_pre_hook(hook, with_kwargs=True)
    tome_kernels.patch.deformable_detr(model, ratio=0.5, pos_mode="mean")
    try:
        run(model, x)
    finally:
        handle.remove()
    groups = model._tome_info["groups"]
    layer = model.model.encoder.layers[0]
    hidden = captured["inputs_embeds"]
    pos = captured["spatial_position_embeddings"]
    shapes = captured["spatial_shapes_list"]
    ref_points = model.model.encoder.get_reference_points(tuple(shapes), captured["valid_ratios"], hidden.device)
    with torch.no_grad():
        q_ref = groups.merge(ref_points.flatten(2)).view(1, -1, *ref_points.shape[2:])
        update, _ = layer.self_attn(hidden_states=groups.merge(hidden), attention_mask=captured["attention_mask"],
                                    encoder_hidden_states=hidden, position_embeddings=groups.merge(pos),
                                    reference_points=q_ref, spatial_shapes=captured["spatial_shapes"],
                                    spatial_shapes_list=shapes, level_start_index=captured["level_start_index"])
        h = layer.self_attn_layer_norm(hidden + groups.unmerge(update))
        expected = layer.final_layer_norm(h + groups.unmerge(layer.mlp(groups.merge(h))))
        out = model.model.encoder(inputs_embeds=hidden, attention_mask=captured["attention_mask"],
                                  spatial_position_embeddings=pos, spatial_shapes=captured["spatial_shapes"],
                                  spatial_shapes_list=shapes, level_start_index=captured["level_start_index"],
                                  valid_ratios=captured["valid_ratios"]).last_hidden_state
        model.ratio = 0.5
        full = run(model, x).encoder_last_hidden_state
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-6)
    # The encoder run on its own (no model forward around it) is transformers' encoder.
    assert not torch.allclose(out, expected)


@pytest.mark.parametrize("ratio, queries", [(0.5, 213), (0.75, 106), (0.3, 298)])
@pytest.mark.parametrize("window", [8, 2, (2, 4), None])
def test_query_counts_and_groups(ratio, queries, window):
    model = tome_kernels.patch.deformable_detr(make_model(), ratio=ratio, window=window)
    out = run(model, images(1))
    assert model._tome_info["queries"] == [queries, queries] or window == 2  # windows of 2: at most half
    groups = model._tome_info["groups"]
    assert groups.num_merged == 426 - model._tome_info["queries"][0]
    assert out.encoder_last_hidden_state.shape == (1, 426, 32)
    # Sizes: every merged query stands for its members; together they cover every token once.
    sizes = groups.merge(torch.ones(1, 426, 1))
    assert sizes.shape[1] == model._tome_info["queries"][0]
    ids = groups.unmerge(torch.arange(sizes.shape[1], dtype=torch.float32).view(1, -1, 1))
    counts = torch.bincount(ids.flatten().long(), minlength=sizes.shape[1])
    assert (counts >= 1).all()


def test_windows_are_local():
    """Windows of 8 consecutive tokens of one level: every member of a group lies within a few tokens of its
    destination (one bipartite step: at most a window apart)."""
    model = tome_kernels.patch.deformable_detr(make_model(), ratio=0.5, window=8)
    run(model, images(1))
    groups = model._tome_info["groups"]
    positions = torch.arange(426, dtype=torch.float32).view(1, -1, 1)
    rep = groups.carry(positions, "keep")
    spread = (groups.unmerge(rep) - positions).abs().max()
    assert spread < 8


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("pos_mode", ["keep", "mean"])
@pytest.mark.parametrize("window, match_once", [(8, True), ((2, 4), True), (None, True), (4, False)])
def test_padded_batch_never_mixes_real_and_padding(ratio, pos_mode, window, match_once):
    model = make_model()
    x, mask = images(2), padded_mask(SIZES)
    ref = run(model, x, mask)
    real = token_mask(model, x, mask)
    assert (~real).any() and real.any()
    tome_kernels.patch.deformable_detr(model, ratio=ratio, pos_mode=pos_mode, window=window, match_once=match_once)
    out = run(model, x, mask)
    for name in ("logits", "pred_boxes", "encoder_last_hidden_state", "last_hidden_state"):
        assert getattr(out, name).shape == getattr(ref, name).shape
        assert torch.isfinite(getattr(out, name)).all()
    groups = model._tome_info["groups"]
    # Source tracing: merged one-hot rows say which tokens each merged query holds.
    source = groups.merge(torch.eye(426).expand(2, -1, -1).contiguous()) > 0
    holds_real = (source & real[:, None, :]).any(-1)
    holds_pad = (source & ~real[:, None, :]).any(-1)
    assert not (holds_real & holds_pad).any(), "a real token merged with padding"
    assert (holds_real | holds_pad).all()
    assert groups.num_merged > 0


def test_one_real_token_clamps_merges():
    """An image whose smallest levels hold a single real token: no cross-kind pair is ever taken."""
    model = make_model()
    x, mask = images(2), padded_mask([(128, 160), (8, 8)])
    real = token_mask(model, x, mask)
    tome_kernels.patch.deformable_detr(model, ratio=0.5, window=None)
    out = run(model, x, mask)
    assert torch.isfinite(out.logits).all()
    source = model._tome_info["groups"].merge(torch.eye(426).expand(2, -1, -1).contiguous()) > 0
    assert not ((source & real[:, None, :]).any(-1) & (source & ~real[:, None, :]).any(-1)).any()


def test_match_once_reuses_and_per_layer_rematches():
    model = tome_kernels.patch.deformable_detr(make_model(), ratio=0.5, match_once=True)
    seen = []
    original = deformable.match

    def spy(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    deformable.match = spy
    try:
        run(model, images(1))
        assert len(seen) == 1
        tome_kernels.patch.deformable_detr(model, ratio=0.5, match_once=False)
        run(model, images(1))
        assert len(seen) == 3
    finally:
        deformable.match = original


@pytest.mark.parametrize("metric", ["x+pos", "x", "random"])
def test_metrics_and_reduced_dimension(metric):
    model = tome_kernels.patch.deformable_detr(make_model(), ratio=0.5, metric=metric, metric_dim=8)
    out = run(model, images(1))
    assert torch.isfinite(out.logits).all()


# ----------------------------------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------------------------------
def test_apply_patch_finds_the_family_and_model_class():
    model = make_model(DeformableDetrModel)
    x = images(1)
    ref = run(model, x)
    assert tome_kernels.patch.apply_patch(model) is model
    assert model.ratio == 0.5 and type(model).__name__ == "DeformableDetrModel"
    out = run(model, x)
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    model.ratio = 0.0
    assert_same_outputs(run(model, x), ref)
    with pytest.raises(TypeError, match="ratio"):
        tome_kernels.patch.apply_patch(model, r=8)


def test_pickle_and_deepcopy_are_independent():
    model = tome_kernels.patch.deformable_detr(make_model(), ratio=0.5)
    x = images(1)
    expected = run(model, x).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(run(clone, x).logits, expected, rtol=0, atol=0)
        clone.ratio = 0.25
        assert model.ratio == 0.5


def test_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="ratio"):
        tome_kernels.patch.deformable_detr(model, ratio=1.0)
    with pytest.raises(TypeError, match="ratio"):
        tome_kernels.patch.deformable_detr(model, ratio="half")
    with pytest.raises(ValueError, match="pos_mode"):
        tome_kernels.patch.deformable_detr(model, pos_mode="first")
    with pytest.raises(ValueError, match="metric"):
        tome_kernels.patch.deformable_detr(model, metric="keys")
    for window in (3, (2, 3), (0, 4), True):
        with pytest.raises(ValueError, match="window"):
            tome_kernels.patch.deformable_detr(model, window=window)
    with pytest.raises(ValueError, match="metric_dim"):
        tome_kernels.patch.deformable_detr(model, metric_dim=5)
    tome_kernels.patch.deformable_detr(model, ratio=0.5)
    with pytest.raises(ValueError, match="ratio"):
        model.ratio = -0.1
    torch.manual_seed(0)
    detr = DetrForObjectDetection(DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, d_model=32,
                                             encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                             decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                             backbone_config=ResNetConfig(embedding_size=8, hidden_sizes=[8] * 4,
                                                                          depths=[1] * 4, layer_type="basic",
                                                                          out_features=["stage4"])))
    with pytest.raises(TypeError, match="DeformableDetrForObjectDetection"):
        tome_kernels.patch.deformable_detr(detr)


def test_training_backward():
    model = tome_kernels.patch.deformable_detr(make_model(), ratio=0.5).train()
    out = model(images(2), pixel_mask=padded_mask(SIZES))
    (out.logits.square().mean() + out.pred_boxes.mean()).backward()
    grads = [p.grad for p in model.model.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_compile():
    model = tome_kernels.patch.deformable_detr(make_model(), ratio=0.5)
    x = images(1)
    expected = run(model, x).logits
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_bench_deformable_smoke(tmp_path):
    from tome_kernels.tools import bench_detr

    result = bench_detr.bench_deformable("deformable-detr-tiny", ratios=(0.5, 0.75), height=96, width=128,
                                         repeats=1, warmup=0)
    rows = result["rows"]
    assert set(rows) == {"baseline", "tome 0.5", "stand-in 0.5", "tome 0.75", "stand-in 0.75"}
    assert rows["tome 0.5"]["queries"] == rows["stand-in 0.5"]["queries"] == [128, 128]
    assert rows["tome 0.75"]["queries"] == [64, 64]
    assert rows["tome 0.5"]["flop_ceiling"] > 1.0 and "share_of_stand_in" in rows["tome 0.5"]
    bench_detr.plot_deformable(result, str(tmp_path / "speed.png"))
    assert (tmp_path / "speed.png").stat().st_size > 0


def test_deviation_smoke():
    pytest.importorskip("skimage")
    from tome_kernels.tools import bench_detr

    errors = bench_detr.deviation("deformable-detr-tiny", ratios=(0.5,), images=("coffee",), height=96, width=128)
    assert set(errors) == {("default", 0.5), ("random", 0.5)}
    for values in errors.values():
        assert len(values) == 1 and all(0 < value < 10 for value in values[0])
