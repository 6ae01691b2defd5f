"""tome_kernels.patch.detr on small random-weight transformers DETR models (CPU, a few seconds)."""

import copy
import importlib
import math

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DetrConfig, DetrForObjectDetection, DetrForSegmentation, DetrModel, ResNetConfig  # noqa: E402

import tome_kernels.patch  # noqa: E402
from tome_kernels import reference  # noqa: E402

detr_patch = importlib.import_module("tome_kernels.patch.hf_detr")

HEIGHT, WIDTH = 256, 320  # an 8 x 10 feature map: 80 encoder tokens


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def tiny_config(**overrides) -> DetrConfig:
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage4"])
    settings = dict(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False, d_model=32,
                    encoder_layers=3, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                    encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=20, num_labels=5)
    settings.update(overrides)
    return DetrConfig(**settings)


def make_model(cls=DetrForObjectDetection, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_config(**overrides)).eval()


def images(batch=2, seed=1):
    return torch.randn(batch, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


def padded_mask(sizes):
    """pixel_mask for images of the given (height, width) placed top-left in HEIGHT x WIDTH."""
    mask = torch.zeros(len(sizes), HEIGHT, WIDTH, dtype=torch.long)
    for index, (height, width) in enumerate(sizes):
        mask[index, :height, :width] = 1
    return mask


def run(model, pixel_values, pixel_mask=None, **kwargs):
    with torch.no_grad():
        return model(pixel_values, pixel_mask=pixel_mask, **kwargs)


def assert_no_mixed_groups(info):
    """Source tracing: every memory token holds only real or only padding feature-map tokens, and the
    tracked padding flag agrees with the source."""
    source, token_mask = info["source"], info["token_mask"]
    real = (source * token_mask[:, None, :].to(source.dtype)).sum(-1)
    pad = (source * (~token_mask)[:, None, :].to(source.dtype)).sum(-1)
    assert not ((real > 0) & (pad > 0)).any(), "a real token merged with padding"
    assert torch.equal(real > 0, info["memory_mask"])
    assert torch.equal(source.sum(-1), info["memory_size"].squeeze(-1).to(source.dtype))


# ----------------------------------------------------------------------------------------------------
# r = 0 is the unpatched model
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True], ids=["single", "padded"])
def test_zero_merges_is_exactly_unpatched(padded):
    model = make_model()
    pixel_values = images(2 if padded else 1)
    mask = padded_mask([(HEIGHT, WIDTH), (160, 200)]) if padded else None
    expected = run(model, pixel_values, mask)
    tome_kernels.patch.detr(model)
    assert (model.er, model.mr, model.dr) == (0, 0, 0)
    got = run(model, pixel_values, mask)
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.pred_boxes, expected.pred_boxes)
    # Merge, then back to 0: transformers' code again, bit for bit.
    model.er, model.mr, model.dr = 4, 4, 2
    assert run(model, pixel_values, mask).logits.shape[1] < expected.logits.shape[1]
    model.er = model.mr = model.dr = 0
    assert torch.equal(run(model, pixel_values, mask).logits, expected.logits)
    tome_kernels.patch.detr_unpatch(model)
    assert type(model) is DetrForObjectDetection and not hasattr(model, "_tome_info")
    assert not model.model.encoder._forward_pre_hooks and not model.model.decoder._forward_pre_hooks
    assert torch.equal(run(model, pixel_values, mask).logits, expected.logits)


ATTN_IMPLS = ["op", "sdpa"]


@pytest.mark.parametrize("attn_impl", ATTN_IMPLS)
@pytest.mark.parametrize("padded", [False, True], ids=["single", "padded"])
def test_tome_path_without_merges_matches_transformers(padded, attn_impl):
    """The patch's own attention (key mask through size 0 -> log 0 = -inf) with r = 0 everywhere."""
    model = make_model()
    pixel_values = images(2)
    mask = padded_mask([(HEIGHT, WIDTH), (96, 128)]) if padded else None
    expected = run(model, pixel_values, mask)
    tome_kernels.patch.detr(model, attn_impl=attn_impl)
    model._tome_info["_force"] = True  # internal: take the ToMe code path with nothing to merge
    got = run(model, pixel_values, mask)
    torch.testing.assert_close(got.encoder_last_hidden_state, expected.encoder_last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.pred_boxes, expected.pred_boxes, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Against an independent plain-PyTorch rendering (tome_kernels.reference for match / merge)
# ----------------------------------------------------------------------------------------------------
def _split_heads(t, heads):
    batch, num, channels = t.shape
    return t.view(batch, num, heads, channels // heads).transpose(1, 2)


def _reference_attention(attn, x, x_pos, memory, memory_pos, size):
    heads = attn.q_proj.out_features // attn.head_dim
    q = _split_heads(attn.q_proj(x + x_pos), heads)
    k = _split_heads(attn.k_proj(memory + memory_pos), heads)
    v = _split_heads(attn.v_proj(memory), heads)
    logits = q @ k.transpose(-1, -2) * attn.head_dim ** -0.5 + size.log()[:, None, None, :]
    out = (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return attn.o_proj(out), k


def _reference_merge(x, pos, size, metric, r, pos_mean):
    unm_idx, src_idx, dst_idx = reference.match(metric, r, 0)
    return reference.merge(x, pos, size, unm_idx, src_idx, dst_idx, 0, pos_mean)


def reference_detr(model, x, pos, er, mr, dr, pos_mode):
    """DETR-ToMe on an unpadded batch, written out layer by layer: (encoder output, logits, boxes)."""
    detr, pos_mean = model.model, pos_mode == "mean"
    size = x.new_ones(x.shape[:2])
    for layer in detr.encoder.layers:
        out, keys = _reference_attention(layer.self_attn, x, pos, x, pos, size)
        x = layer.self_attn_layer_norm(x + out)
        x, pos, size = _reference_merge(x, pos, size, keys.mean(1), er, pos_mean)
        x = layer.final_layer_norm(x + layer.mlp(x))
    encoder_out = x
    memory, memory_pos, memory_size = _reference_merge(x, pos, size, x, mr, pos_mean)
    query_pos = detr.query_position_embeddings.weight.expand(x.shape[0], -1, -1)
    queries, query_size = torch.zeros_like(query_pos), query_pos.new_ones(query_pos.shape[:2])
    for layer in detr.decoder.layers:
        out, _ = _reference_attention(layer.self_attn, queries, query_pos, queries, query_pos, query_size)
        queries = layer.self_attn_layer_norm(queries + out)
        out, _ = _reference_attention(layer.encoder_attn, queries, query_pos, memory, memory_pos, memory_size)
        queries = layer.encoder_attn_layer_norm(queries + out)
        queries, query_pos, query_size = _reference_merge(queries, query_pos, query_size, queries, dr, pos_mean)
        queries = layer.final_layer_norm(queries + layer.mlp(queries))
    queries = detr.decoder.layernorm(queries)
    return encoder_out, model.class_labels_classifier(queries), model.bbox_predictor(queries).sigmoid()


def encoder_inputs(model, pixel_values):
    """(flattened features, spatial position embeddings) that DetrModel hands its encoder."""
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)

    handle = model.model.encoder.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        run(model, pixel_values)
    finally:
        handle.remove()
    return captured["inputs_embeds"], captured["spatial_position_embeddings"]


# fp32: the encoder within 1e-5; the decoder starts from all-zero queries, whose first LayerNorms magnify
# rounding (logits differ by ~1e-5 in fp32, by ~1e-16 in fp64): the whole model is checked in fp64.
@pytest.mark.parametrize("dtype, atol_encoder, atol_heads",
                         [(torch.float32, 1e-5, 1e-4), (torch.float64, 1e-10, 1e-10)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("pos_mode, attn_impl", [("keep", "op"), ("mean", "op"), ("keep", "sdpa")])
def test_matches_reference_loop(pos_mode, attn_impl, dtype, atol_encoder, atol_heads):
    model = make_model().to(dtype)
    pixel_values = images(2).to(dtype)
    x, pos = encoder_inputs(model, pixel_values)
    er, mr, dr = 12, 10, 4
    tome_kernels.patch.detr(model, er=er, mr=mr, dr=dr, pos_mode=pos_mode, attn_impl=attn_impl)
    assert model._tome_info["attn_impl"] == attn_impl
    got = run(model, pixel_values)
    with torch.no_grad():
        encoder_out, logits, boxes = reference_detr(model, x, pos, er, mr, dr, pos_mode)
    assert model._tome_info["encoder_r"] == [er] * 3 and model._tome_info["memory_r"] == mr
    assert got.encoder_last_hidden_state.shape == (2, 80 - 3 * er, 32)
    torch.testing.assert_close(got.encoder_last_hidden_state, encoder_out, rtol=0, atol=atol_encoder)
    assert got.logits.shape == (2, 20 - 2 * dr, 6)
    torch.testing.assert_close(got.logits, logits, rtol=0, atol=atol_heads)
    torch.testing.assert_close(got.pred_boxes, boxes, rtol=0, atol=atol_heads)


# ----------------------------------------------------------------------------------------------------
# Padding
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pos_mode, attn_impl", [("keep", "op"), ("mean", "op"), ("keep", "sdpa")])
@pytest.mark.parametrize("sizes", [[(HEIGHT, WIDTH), (160, 200)], [(224, 96), (64, 64)]], ids=["mild", "heavy"])
def test_padded_batch_never_mixes_real_and_padding(sizes, pos_mode, attn_impl):
    model = make_model()
    er, mr, dr = 12, 10, 3
    tome_kernels.patch.detr(model, er=er, mr=mr, dr=dr, pos_mode=pos_mode, trace_source=True, attn_impl=attn_impl)
    mask = padded_mask(sizes)
    out = run(model, images(2), mask)
    info = model._tome_info
    for tensor in (out.logits, out.pred_boxes, out.encoder_last_hidden_state, out.last_hidden_state):
        assert torch.isfinite(tensor).all()
    # Documented shapes: N0 - sum(encoder_r) memory from the encoder, num_queries - sum(decoder_r) predictions.
    assert out.encoder_last_hidden_state.shape == (2, 80 - sum(info["encoder_r"]), 32)
    assert info["memory_size"].shape == (2, 80 - sum(info["encoder_r"]) - info["memory_r"], 1)
    assert info["decoder_r"] == [dr, dr]
    assert out.logits.shape == (2, 20 - 2 * dr, 6) and out.pred_boxes.shape == (2, 20 - 2 * dr, 4)
    assert_no_mixed_groups(info)
    # Both images keep at least one real token, and padding merged first.
    assert info["memory_mask"].any(dim=1).all()
    assert torch.equal(info["query_size"].sum(1).squeeze(-1), torch.full((2,), 20.0))


def test_padding_bound_clamps_r_in_the_model():
    """One image of a single real token beside a full one: the memory merge runs out of same-kind pairs."""
    model = tome_kernels.patch.detr(make_model(), er=30, mr=10, dr=3, trace_source=True)
    out = run(model, images(2), padded_mask([(32, 32), (HEIGHT, WIDTH)]))
    info = model._tome_info
    assert info["memory_r"] < 10 and torch.isfinite(out.logits).all()
    assert info["memory_mask"].sum(1).tolist()[0] == 1
    assert_no_mixed_groups(info)


def test_padding_bound_clamps_r():
    """A real A token without any real B partner (and vice versa) bounds r."""
    real = torch.tensor([[True, False, True, False, False, False],   # A: real, real, pad; B: pad, pad, pad
                         [True, True, False, False, True, False]])   # A: real, pad, real; B: real, pad, pad
    # Row 0: the real A tokens have no real B -> only the padding A (1) can merge. Row 1: all 3 A can.
    assert detr_patch._pad_safe_r(real, 5) == 1
    assert detr_patch._pad_safe_r(real, 0) == 0
    metric = torch.randn(2, 6, 8)
    padded = detr_patch._padding_metric(metric, real)
    unit = padded / padded.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.transpose(1, 2)
    mixed = real[:, :, None] != real[:, None, :]
    both_real = real[:, :, None] & real[:, None, :]
    both_pad = ~real[:, :, None] & ~real[:, None, :]
    assert (similarity[mixed] == 0).all()
    assert (similarity[both_real] >= 0.6 - 1e-6).all()
    torch.testing.assert_close(similarity[both_pad], torch.ones_like(similarity[both_pad]))


def test_decoder_attention_mask_queries_stay_apart():
    model = make_model()
    tome_kernels.patch.detr(model, dr=4, trace_source=True)
    query_mask = torch.ones(2, 20, dtype=torch.long)
    query_mask[1, 12:] = 0
    out = run(model, images(2), decoder_attention_mask=query_mask)
    source = model._tome_info["query_source"]
    assert out.logits.shape == (2, 12, 6) and torch.isfinite(out.logits).all()
    kept = (source * query_mask[:, None, :].float()).sum(-1)
    masked = (source * (1 - query_mask)[:, None, :].float()).sum(-1)
    assert not ((kept > 0) & (masked > 0)).any()


# ----------------------------------------------------------------------------------------------------
# API
# ----------------------------------------------------------------------------------------------------
def test_changing_merge_counts_between_calls():
    model = tome_kernels.patch.detr(make_model(), er=5)
    pixel_values = images(1)
    assert run(model, pixel_values).encoder_last_hidden_state.shape[1] == 80 - 3 * 5
    model.er = 30
    assert run(model, pixel_values).encoder_last_hidden_state.shape[1] == 13  # r clamped to N // 2
    assert model._tome_info["encoder_r"] == [30, 25, 12]
    model.mr, model.dr = 3, 2
    out = run(model, pixel_values)
    assert model._tome_info["memory_size"].shape[1] == 13 - 3 and out.logits.shape[1] == 20 - 4
    assert model.model.er == 30  # the inner DetrModel shares the settings
    with pytest.raises(ValueError, match="er must be >= 0"):
        model.er = -1
    with pytest.raises(TypeError, match="int"):
        model.dr = 1.5
    # Patching again updates settings in place.
    tome_kernels.patch.detr(model, er=1, pos_mode="mean")
    assert (model.er, model.mr, model.dr, model._tome_info["pos_mode"]) == (1, 0, 0, "mean")


def test_detr_model_and_deepcopy():
    base = make_model(DetrModel)
    tome_kernels.patch.detr(base, er=6, mr=4)
    out = run(base, images(1))
    assert out.encoder_last_hidden_state.shape[1] == 80 - 18 and out.last_hidden_state.shape[1] == 20
    clone = copy.deepcopy(base)
    clone.er = 0
    assert base.er == 6  # independent state
    assert run(clone, images(1)).encoder_last_hidden_state.shape[1] == 80
    assert run(base, images(1)).encoder_last_hidden_state.shape[1] == 62


def test_unsupported_models_and_options():
    with pytest.raises(TypeError, match="DetrForObjectDetection and DetrModel"):
        tome_kernels.patch.detr(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="DetrForSegmentation is not supported"):
        # Building one needs a 4-stage FPN backbone; the check only looks at the class.
        tome_kernels.patch.detr(DetrForSegmentation.__new__(DetrForSegmentation))
    with pytest.raises(ValueError, match="pos_mode"):
        tome_kernels.patch.detr(make_model(), er=1, pos_mode="first")
    with pytest.raises(ValueError, match="attn_impl"):
        tome_kernels.patch.detr(make_model(), er=1, attn_impl="flash")
    model = tome_kernels.patch.detr(make_model(), er=2)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        run(model, images(1), output_attentions=True)
    model.er, model.dr = 0, 2
    model.config.auxiliary_loss = True
    with pytest.raises(NotImplementedError, match="auxiliary_loss"):
        run(model, images(1))


def test_unsupported_transformers_version(monkeypatch):
    monkeypatch.setattr("transformers.__version__", "4.57.1")  # by name: the lazy module object can be replaced
    with pytest.raises(RuntimeError, match="supports transformers 5.x"):
        tome_kernels.patch.detr(make_model())


def test_attn_impl_auto():
    """auto: SDPA with the log-size bias on CPU (faster there), the op when a backend was chosen by hand."""
    model = tome_kernels.patch.detr(make_model())
    assert model._tome_info["attn_impl"] == "sdpa"
    with tome_kernels.use_backend("torch"):
        assert tome_kernels.patch.detr(model)._tome_info["attn_impl"] == "op"


@pytest.mark.parametrize("attn_impl", ATTN_IMPLS)
def test_hidden_states_and_training_backward(attn_impl):
    model = tome_kernels.patch.detr(make_model(dropout=0.0), er=8, mr=6, dr=2, attn_impl=attn_impl)
    with torch.no_grad():
        out = model(images(1), output_hidden_states=True)
    lengths = [t.shape[1] for t in out.encoder_hidden_states]
    assert lengths == [80, 72, 64, 56]
    model.train()
    out = model(images(1))
    (out.logits.square().mean() + out.pred_boxes.mean()).backward()
    grad = model.model.encoder.layers[0].self_attn.k_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_training_with_attention_dropout_uses_sdpa():
    model = tome_kernels.patch.detr(make_model(attention_dropout=0.1), er=8, mr=6, attn_impl="op").train()
    out = model(images(1))
    out.logits.sum().backward()
    assert torch.isfinite(out.logits).all()


def test_bench_detr_smoke():
    from tome_kernels.tools import bench_detr

    result = bench_detr.bench(model="detr-tiny", er=8, mr=6, dr=2, batch=1, height=128, width=160, repeats=1,
                              warmup=0, transformer_rounds=2)
    assert result["transformer"]["tome"]["backbone_s"] < result["tome"]["backbone_s"]  # cached: not run
    for key in ("baseline", "tome"):
        timing = result[key]
        assert timing["total_s"] > 0 and 0 <= timing["backbone_s"] <= timing["total_s"]
        assert math.isclose(timing["encoder_decoder_s"], timing["encoder_s"] + timing["decoder_s"])
    assert result["tome"]["memory_tokens"] < result["baseline"]["memory_tokens"]
