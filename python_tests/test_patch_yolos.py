"""tome_kernels.patch.hf_yolos on transformers 5.x YOLOS (``YolosForObjectDetection``, ``YolosModel``).

r = 0 must reproduce the unpatched model bit for bit; r > 0 must equal an independent forward loop written
here from ``tome_kernels.reference`` (in float64, so rounding cannot flip a near-tie in the matching). The
loop keeps the detection tokens next to the class token from the start and carries every layer's
mid-position embedding as positions, where the patch moves them at the first merge and carries one index.
A 3-layer model on a 64x96 image (24 patches, 10 detection tokens) keeps the file fast.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tome_kernels  # noqa: E402
from tome_kernels import reference
from tome_kernels.tools import bench_model  # noqa: E402
import tome_kernels.patch  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:tome_kernels. no compiled backend")

NUM_DETECTION = 10
IMAGE = (64, 96)


def make(dtype=torch.float64, detector: bool = True, attn: str = "sdpa", mid: bool = True):
    """A fresh copy of a random-weight YOLOS (built once per configuration)."""
    return copy.deepcopy(_build(dtype, detector, attn, mid))


@functools.lru_cache(maxsize=None)
def _build(dtype, detector: bool, attn: str, mid: bool):
    from transformers import YolosConfig, YolosForObjectDetection, YolosModel

    config = YolosConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                         image_size=list(IMAGE), patch_size=16, num_detection_tokens=NUM_DETECTION, num_labels=5,
                         use_mid_position_embeddings=mid, attn_implementation=attn)
    torch.manual_seed(0)
    model = (YolosForObjectDetection if detector else YolosModel)(config)
    with torch.no_grad():  # transformers starts tokens and position embeddings at zero: make them matter
        for name, param in model.named_parameters():
            if "position_embeddings" in name or "token" in name:
                param.normal_(std=0.5)
    return model.to(dtype).eval()


def images(model, batch: int = 2, seed: int = 1, size=IMAGE):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=gen).to(next(model.parameters()).dtype)


# ----------------------------------------------------------------------------------------------------
# The independent rendering of ToMe on YOLOS (plain loop over the model's modules and the reference)
# ----------------------------------------------------------------------------------------------------
def tome_forward(model, x, r_per_layer, pos_mode="keep", prop_attn=True):
    """Logits, boxes, final sizes [B, N] and source [B, N, N0] (output order), without the patch."""
    yolos = model.vit
    x = yolos.embeddings(x)
    batch, num_tokens, channels = x.shape
    first_detection = num_tokens - NUM_DETECTION
    order = [0, *range(first_detection, num_tokens), *range(1, first_detection)]
    x = x[:, order]
    # every later layer's mid-position embedding rides along as one block of position channels
    mid = yolos.encoder.interpolation(IMAGE)[:, 0, order]  # [L - 1, N, C]
    pos = mid.permute(1, 0, 2).reshape(1, num_tokens, -1).expand(batch, -1, -1)
    size = torch.ones(batch, num_tokens, dtype=x.dtype)
    source = torch.eye(num_tokens, dtype=x.dtype)[order].repeat(batch, 1, 1)
    protected = 1 + NUM_DETECTION
    layers = yolos.encoder.layer
    for index, (layer, r) in enumerate(zip(layers, r_per_layer)):
        attn = layer.attention.attention
        h = layer.layernorm_before(x)
        q, k, v = (lin(h).view(batch, -1, attn.num_attention_heads, attn.attention_head_size).transpose(1, 2)
                   for lin in (attn.query, attn.key, attn.value))
        out, _ = reference.attention(q, k, v, size if prop_attn else None, attn.scaling)
        x = x + layer.attention.output.dense(out.transpose(1, 2).reshape(batch, -1, channels))
        unm_idx, src_idx, dst_idx = reference.match(k.mean(1), r, protected)
        x, pos, size = reference.merge(x, pos, size, unm_idx, src_idx, dst_idx, protected, pos_mode == "mean")
        source = reference.merge_source(source, unm_idx, src_idx, dst_idx, protected)
        x = x + layer.output.dense(layer.intermediate(layer.layernorm_after(x)))
        if index < len(layers) - 1:
            x = x + pos[..., index * channels:(index + 1) * channels]
    detections = yolos.layernorm(x)[:, 1:protected]
    logits = model.class_labels_classifier(detections)
    boxes = model.bbox_predictor(detections).sigmoid()

    def output_order(t):
        return torch.cat([t[:, :1], t[:, protected:], t[:, 1:protected]], dim=1)

    return logits, boxes, output_order(size), output_order(source)


# ----------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("detector, attn, mid", [(True, "sdpa", True), (True, "eager", True), (False, "sdpa", True),
                                                 (True, "sdpa", False)])
def test_r0_matches_unpatched(detector, attn, mid):
    model = make(torch.float32, detector, attn, mid)
    x = images(model)
    kwargs = dict(output_hidden_states=True, output_attentions=attn == "eager")
    with torch.no_grad():
        expected = model(x, **kwargs)
        tome_kernels.patch.apply_patch(model, trace_source=True)
        assert model.r == 0
        out = model(x, **kwargs)
    assert type(model).__name__ == ("YolosForObjectDetection" if detector else "YolosModel")
    for name in ("logits", "pred_boxes", "last_hidden_state", "hidden_states", "attentions"):
        want, got = getattr(expected, name, None), getattr(out, name, None)
        if isinstance(want, tuple):
            assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), name
        else:
            assert (got is None and want is None) or torch.equal(got, want), name
    num_tokens = expected.last_hidden_state.shape[1]
    assert model._tome_info["size"] is None
    assert torch.equal(model._tome_info["source"], torch.eye(num_tokens).expand(2, -1, -1))


@pytest.mark.parametrize("pos_mode, attn", [("keep", "op"), ("keep", "sdpa"), ("mean", "op"), ("mean", "sdpa"),
                                            ("keep", "no_prop_attn")])
def test_matches_independent_tome(pos_mode, attn):
    prop_attn = attn != "no_prop_attn"
    model = make()
    x = images(model)
    r = [3, 5, 2]
    with torch.no_grad():
        logits, boxes, size, source = tome_forward(model, x, r, pos_mode, prop_attn)
        tome_kernels.patch.apply_patch(model, trace_source=True, prop_attn=prop_attn, pos_mode=pos_mode,
                             attn_impl=attn if prop_attn else "op")
        model.r = r
        out = model(x)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.pred_boxes, boxes, rtol=0, atol=1e-10)
    assert torch.equal(model._tome_info["size"].squeeze(-1), size)
    assert torch.equal(model._tome_info["source"], source)


@pytest.mark.parametrize("r", [100, (6, 1), [0, 0, 9]])
def test_class_and_detection_tokens_never_merge(r):
    model = tome_kernels.patch.apply_patch(make(torch.float32), trace_source=True)
    model.r = r
    x = images(model)
    with torch.no_grad():
        out = model(x)
    assert out.logits.shape == (2, NUM_DETECTION, model.config.num_labels + 1)
    assert out.pred_boxes.shape == (2, NUM_DETECTION, 4)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.pred_boxes).all()
    source, size = model._tome_info["source"], model._tome_info["size"].squeeze(-1)
    num_tokens = source.shape[-1]
    protected = [0, *range(num_tokens - NUM_DETECTION, num_tokens)]
    eye = torch.eye(num_tokens)[protected].expand(2, -1, -1)
    assert torch.equal(torch.cat([source[:, :1], source[:, -NUM_DETECTION:]], 1), eye)
    assert source.shape[1] == out.last_hidden_state.shape[1] < num_tokens
    assert torch.equal(source.sum(1), torch.ones_like(source.sum(1)))  # each original token in one group
    assert torch.equal(source.sum(-1), size)


def test_batch_rows_are_independent():
    """YOLOS takes no pixel mask; images in a batch merge on their own, so a batch equals its single images."""
    model = tome_kernels.patch.apply_patch(make())
    model.r = 4
    x = images(model, batch=3)
    with torch.no_grad():
        batched = model(x)
        single = [model(x[i:i + 1]) for i in range(3)]
    torch.testing.assert_close(batched.logits, torch.cat([s.logits for s in single]), rtol=0, atol=1e-12)


def test_other_image_size_interpolates():
    model = tome_kernels.patch.apply_patch(make())
    model.r = 3
    with torch.no_grad():
        out = model(images(model, size=(48, 112)))  # 3 x 7 patches: the position embeddings are interpolated
    assert out.pred_boxes.shape == (2, NUM_DETECTION, 4) and torch.isfinite(out.pred_boxes).all()


def test_compile_fullgraph():
    model = tome_kernels.patch.apply_patch(make(torch.float32), trace_source=True, attn_impl="op")
    model.r = 4
    x = images(model)
    with torch.no_grad():
        expected = model(x)
        expected_source = model._tome_info["source"]
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x).logits, expected.logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(model._tome_info["source"], expected_source)
        model.r = [0, 7, 7]  # a new schedule must not reuse the graph traced for the old one
        expected = model(x)
        torch.testing.assert_close(compiled(x).pred_boxes, expected.pred_boxes, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_impl", ["op", "sdpa"])
def test_training_backward(attn_impl):
    model = tome_kernels.patch.apply_patch(make(), attn_impl=attn_impl).train()
    model.r = 4
    out = model(images(model))
    (out.logits.sum() + out.pred_boxes.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.activation_checkpointing_enable()
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        model(images(model))


def test_per_instance_unpatch_and_errors():
    original = make(torch.float32)
    model = tome_kernels.patch.apply_patch(copy.deepcopy(original))
    assert type(original.vit.encoder).__name__ == "YolosEncoder"  # other instances untouched
    model.r = 5
    tome_kernels.patch.yolos(model, pos_mode="mean")  # re-patching keeps r, updates the flags
    assert model.r == 5 and model._tome_info["pos_mode"] == "mean"
    x = images(model)
    tome_kernels.patch.unpatch(model)
    assert type(model) is type(original) and not hasattr(model, "_tome_info")
    with torch.no_grad():
        assert torch.equal(model(x).logits, original(x).logits)
    with pytest.raises(ValueError, match="pos_mode"):
        tome_kernels.patch.apply_patch(model, pos_mode="first")
    with pytest.raises(TypeError, match="YolosForObjectDetection"):
        tome_kernels.patch.yolos(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="yolos: transformers YolosForObjectDetection"):
        tome_kernels.patch.apply_patch(torch.nn.Linear(2, 2))  # the registry names the supported families
    with pytest.raises(ValueError, match="r"):
        tome_kernels.patch.apply_patch(model).r = -1


def test_bench_flop_ceiling_yolos_small():
    from transformers import YolosConfig, YolosForObjectDetection

    with torch.device("meta"):
        model = YolosForObjectDetection(YolosConfig(**bench_model.YOLOS_CONFIGS["hf:yolos-small"]))
    num_tokens = 1 + 50 * 84 + 100
    r = tome_kernels.patch.parse_r(300, 12)
    ceiling = bench_model.yolos_flops(model, num_tokens, 1) / bench_model.yolos_flops(model, num_tokens, 1, r)
    assert ceiling == pytest.approx(2.06, abs=0.01)


def test_pickle_and_layer_on_its_own():
    import io
    import pickle

    model = tome_kernels.patch.apply_patch(make(), r=4, trace_source=True)
    x = images(model)
    with torch.no_grad():
        expected = model(x).logits
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(loaded(x).logits, expected)
        assert torch.equal(pickle.loads(pickle.dumps(model))(x).logits, expected)
        # a layer or the encoder called outside the model's forward runs transformers' own computation
        hidden = torch.randn(2, 35, 32, dtype=torch.float64)
        layer, plain = model.vit.encoder.layer[0], make().vit.encoder.layer[0]
        assert torch.equal(layer(hidden), plain(hidden))


def test_threads_share_a_patched_model():
    from test_patch_toolkit import run_threads

    model = tome_kernels.patch.apply_patch(make(torch.float32), r=4)
    inputs = [images(model, batch=1, seed=1), images(model, batch=3, seed=2)]

    def boxes(model, x):
        with torch.no_grad():
            return model(x).pred_boxes

    expected = [boxes(model, x) for x in inputs]
    outputs, errors = run_threads(model, inputs, boxes, calls=10)
    assert not errors, errors[:3]
    for index in range(2):
        assert len(outputs[index]) == 10 and all(torch.equal(out, expected[index]) for out in outputs[index])


@pytest.mark.parametrize("pos_mode", ["keep", "mean"])
def test_export_then_eager(pos_mode):
    model = tome_kernels.patch.apply_patch(make(torch.float32), r=4, pos_mode=pos_mode)
    x = images(model)
    with torch.no_grad():
        expected = model(x)
    exported = torch.export.export(model, (x,))
    out = exported.module()(x)
    torch.testing.assert_close(out["pred_boxes"], expected.pred_boxes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["logits"], expected.logits, rtol=1e-5, atol=1e-5)
    model.r = 0  # the eager model keeps working, also with another schedule
    with torch.no_grad():
        assert model(x).last_hidden_state.shape[1] == 1 + 24 + NUM_DETECTION


def test_torch_load_in_a_fresh_process_keeps_output_capture(tmp_path):
    import subprocess
    import sys

    model = tome_kernels.patch.apply_patch(make(torch.float32, detector=False), r=4)
    x = images(model)
    with torch.no_grad():
        expected = model(x).last_hidden_state
    torch.save({"model": model, "x": x, "expected": expected}, tmp_path / "model.pt")
    code = ("import torch; saved = torch.load(r'%s', weights_only=False); model = saved['model']\n"
            "with torch.no_grad(): out = model(saved['x'], output_hidden_states=True)\n"
            "assert torch.equal(out.last_hidden_state, saved['expected'])\n"
            "print(type(model).__name__, model.r, [h.shape[1] for h in out.hidden_states])" % (tmp_path / "model.pt"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[0] == "YolosModel 4 [35, 31, 27, 23]"


def test_bench_model_cli_yolos():
    rows = bench_model.main(["--model", "hf:yolos-tiny", "--image", "64,96", "--batch", "1", "--sweep", "0,4",
                             "--rounds", "1", "--warmup", "0", "--threads", "1", "--no-progress"])
    assert [row["kind"] for row in rows] == ["baseline", "tome", "tome"]
    assert rows[1]["ceiling"] == 1.0 and rows[2]["ceiling"] > 1.0
    assert all(row["ms"] > 0 for row in rows)
