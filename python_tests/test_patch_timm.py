"""tome_kernels.patch.timm on timm 1.0.x Vision Transformers.

r = 0 must reproduce the unpatched model; r > 0 must equal an independent forward loop written here from
``tome_kernels.reference`` (run in float64, so rounding cannot flip a near-tie in the matching).
Small models (2-4 blocks, 64-96 px) keep the file fast on a 2-core CPU.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

import tome_kernels  # noqa: E402
import tome_kernels.patch  # noqa: E402
from tome_kernels import reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:tome_kernels. no compiled backend")


def make(name: str, dtype=torch.float64, **kwargs):
    """A fresh copy of a random-weight model (built once per configuration: building dominates the tests)."""
    return copy.deepcopy(_build(name, dtype, tuple(sorted(kwargs.items()))))


@functools.lru_cache(maxsize=None)
def _build(name: str, dtype, kwargs: tuple, seed: int = 0):
    kwargs = dict(kwargs)
    gated = kwargs.pop("gated", False)
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs)
    if gated:  # timm's Attention(gated=True): its Block cannot ask for it, so add the gates here
        for block in model.blocks:
            block.attn.gate = torch.nn.Linear(model.embed_dim, block.attn.attn_dim)
    model = model.to(dtype).eval()
    with torch.no_grad():  # timm starts these near constants: make them matter
        for module in model.modules():
            if hasattr(module, "gamma"):  # LayerScale
                module.gamma.uniform_(0.5, 1.5)
        for token in ("cls_token", "dist_token", "reg_token"):
            if getattr(model, token, None) is not None:
                getattr(model, token).normal_()
    return model


def images(model, batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=gen).to(dtype)


# name, kwargs: every kind of prefix, pooling, LayerScale and qk_norm
MODELS = {
    "vit_base": ("vit_base_patch16_224", dict(depth=2, img_size=96)),
    "deit3_layerscale": ("deit3_small_patch16_224", dict(depth=3, img_size=96)),
    "reg4_gap": ("vit_medium_patch16_reg4_gap_256", dict(depth=2, img_size=96)),
    "cls_reg4": ("vit_tiny_patch16_224", dict(depth=3, img_size=96, reg_tokens=4)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(depth=3, img_size=96)),
    "qk_norm_gated_avgmax": ("vit_tiny_patch16_224", dict(depth=2, img_size=96, qk_norm=True, scale_attn_norm=True,
                                                          scale_mlp_norm=True, gated=True, class_token=False,
                                                          global_pool="avgmax")),
    "map_pool": ("vit_tiny_patch16_224", dict(depth=2, img_size=96, class_token=False, global_pool="map")),
}


# ----------------------------------------------------------------------------------------------------
# The independent rendering of ToMe (plain loop over the model's modules and the reference functions)
# ----------------------------------------------------------------------------------------------------
def tome_forward(model, x, r_per_layer, prop_attn=True):
    """Logits, final sizes [B, N] and source [B, N, N0] of ToMe on ``model``'s weights, without the patch."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    batch, num_tokens, _ = x.shape
    prefix = model.num_prefix_tokens
    size = torch.ones(batch, num_tokens, dtype=x.dtype)
    source = torch.eye(num_tokens, dtype=x.dtype).repeat(batch, 1, 1)
    for block, r in zip(model.blocks, r_per_layer):
        attn = block.attn
        n = x.shape[1]
        h = block.norm1(x)
        qkv = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out, _ = reference.attention(q, k, v, size if prop_attn else None, attn.scale)
        out = attn.norm(out.transpose(1, 2).reshape(batch, n, -1))
        out = attn.proj(out if attn.gate is None else out * attn.gate(h).sigmoid())
        x = x + block.ls1(out)
        unm_idx, src_idx, dst_idx = reference.match(k.mean(1), r, prefix)
        x, _, size = reference.merge(x, None, size, unm_idx, src_idx, dst_idx, prefix, False)
        source = reference.merge_source(source, unm_idx, src_idx, dst_idx, prefix)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    x = model.norm(x)

    if hasattr(model, "head_dist"):  # distilled DeiT: class and distillation heads, averaged
        logits = (model.head(x[:, 0]) + model.head_dist(x[:, 1])) / 2
        return logits, size, source
    tokens, weights = x[:, prefix:], size[:, prefix:, None]
    if model.global_pool == "token":
        pooled = x[:, 0]
    elif model.global_pool == "map":
        bias = weights.log().reshape(batch, 1, 1, -1) if prop_attn else None
        pooled = model.attn_pool(tokens, attn_mask=bias)
    else:
        mean = (tokens * weights).sum(1) / weights.sum(1)
        pooled = mean if model.global_pool == "avg" else 0.5 * (tokens.amax(1) + mean)
    return model.head(model.fc_norm(pooled)), size, source


@pytest.mark.parametrize("case", list(MODELS))
def test_r0_matches_unpatched(case):
    name, kwargs = MODELS[case]
    model = make(name, dtype=torch.float32, **kwargs)
    x = images(model).float()
    with torch.no_grad():
        expected = model(x)
        tome_kernels.patch.timm(model)
        assert type(model).__name__.startswith("ToMe")
        model.r = 0
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case, attn", [(case, attn) for case in MODELS for attn in ("op", "no_prop_attn")]
                         + [("deit3_layerscale", "sdpa"), ("deit_distilled", "sdpa"), ("map_pool", "sdpa")])
def test_matches_independent_tome(case, attn):
    name, kwargs = MODELS[case]
    prop_attn = attn != "no_prop_attn"
    model = make(name, **kwargs)
    x = images(model)
    r = [5, 7, 3, 2][:len(model.blocks)]
    with torch.no_grad():
        expected, size, source = tome_forward(model, x, r, prop_attn=prop_attn)
        tome_kernels.patch.timm(model, trace_source=True, prop_attn=prop_attn, attn_impl=attn if prop_attn else "op")
        assert model._tome_info["attn_impl"] == (attn if prop_attn else "op")
        model.r = r
        logits = model(x)
    info = model._tome_info
    assert info["r"] == r
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(info["size"].squeeze(-1), size, rtol=0, atol=0)
    torch.testing.assert_close(info["source"], source, rtol=0, atol=0)


@pytest.mark.parametrize("attn_impl", ["op", "sdpa"])
def test_gradients_match_independent_tome(attn_impl):
    model = make("deit3_small_patch16_224", depth=2, img_size=64)
    x = images(model)
    r = [4, 3]
    tome_forward(model, x, r)[0].square().sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    tome_kernels.patch.timm(model, attn_impl=attn_impl).r = r
    model(x).square().sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("case", ["vit_base", "cls_reg4", "deit_distilled", "reg4_gap"])
def test_prefix_tokens_never_merge(case):
    name, kwargs = MODELS[case]
    model = tome_kernels.patch.timm(make(name, **kwargs), trace_source=True)
    model.r = 100  # clamps to half the mergeable tokens in every layer
    with torch.no_grad():
        model(images(model))
    info, prefix = model._tome_info, model.num_prefix_tokens
    source, size = info["source"], info["size"].squeeze(-1)
    num_tokens = model.patch_embed.num_patches + prefix
    remaining = num_tokens
    for _ in model.blocks:
        remaining -= (remaining - prefix) // 2
    assert source.shape[1:] == (remaining, num_tokens)
    eye = torch.eye(num_tokens, dtype=source.dtype)[:prefix]
    assert torch.equal(source[:, :prefix], eye.expand(source.shape[0], -1, -1))
    assert torch.equal(source.sum(1), torch.ones_like(source.sum(1)))  # each original token in one group
    assert torch.equal(source.sum(-1), size)
    assert info["num_prefix_tokens"] == prefix
    assert info["class_token"] == (model.cls_token is not None)
    assert info["distill_token"] == (case == "deit_distilled")


def _tokens_per_block(model, x):
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        out = model.forward_features(x)
    for hook in hooks:
        hook.remove()
    return seen + [out.shape[1]]


@pytest.mark.parametrize("r, merges", [
    (3, [3, 3, 3, 3]),
    ((4, 0), [4, 4, 4, 4]),
    ((4, -1), [8, 5, 2, 0]),  # 2r down to 0: 8, 8 - 8/3, 8 - 16/3, 0, rounded down
    ((4, 1), [0, 2, 5, 8]),
    ((6, 0.5), [3, 5, 7, 9]),
    ([1, 0, 7], [1, 0, 7, 0]),  # missing layers merge nothing
    (100, [18, 9, 4, 2]),  # clamped to half of the 36 patch tokens left
])
def test_schedules_token_counts(r, merges):
    model = tome_kernels.patch.timm(make("vit_tiny_patch16_224", depth=4, img_size=96))
    model.r = r
    assert model.r == r
    counts = [37]
    for m in merges:
        counts.append(counts[-1] - m)
    assert _tokens_per_block(model, images(model)) == counts
    if r != 100:
        assert model._tome_info["r"] == merges


@pytest.mark.parametrize("bad, error", [
    (-1, ValueError), (2.5, TypeError), (True, TypeError), ("8", TypeError), ((8,), ValueError),
    ((8, 2), ValueError), ((8, "up"), ValueError), ([1, 2, 3, 4, 5], ValueError), ([1, -2], ValueError),
    ([1, 2.0], TypeError),
])
def test_bad_r_rejected(bad, error):
    model = tome_kernels.patch.timm(make("vit_tiny_patch16_224", depth=4, img_size=64))
    with pytest.raises(error, match="tome"):
        model.r = bad
    assert model.r == 0


def test_avg_pool_weights_by_size():
    model = tome_kernels.patch.timm(make("vit_medium_patch16_reg4_gap_256", depth=2, img_size=96))
    model.r = 8
    with torch.no_grad():
        features = model.forward_features(images(model))
        pooled = model.pool(features)
    size = model._tome_info["size"]
    assert not torch.all(size == 1)
    tokens, weights = features[:, 4:], size[:, 4:]
    torch.testing.assert_close(pooled, (tokens * weights).sum(1) / weights.sum(1), rtol=0, atol=1e-12)
    assert not torch.allclose(pooled, tokens.mean(1))


def test_unsupported_models_raise():
    with pytest.raises(TypeError, match="ResNet"):
        tome_kernels.patch.timm(timm.create_model("resnet18", pretrained=False))
    with pytest.raises(TypeError, match="ResPostBlock"):
        tome_kernels.patch.timm(timm.create_model("vit_base_patch16_rpn_224", depth=1, img_size=64))
    with pytest.raises(TypeError, match="DiffAttention"):
        tome_kernels.patch.timm(timm.create_model("vit_tiny_patch16_224", depth=1, img_size=64, attn_layer="diff"))
    prr = tome_kernels.patch.timm(make("vit_tiny_patch16_224", depth=2, img_size=64, class_token=False,
                                       global_pool="prr"))
    prr.r = 4
    with torch.no_grad(), pytest.raises(NotImplementedError, match="AttentionPoolPrr"):
        prr(images(prr))
    model = tome_kernels.patch.timm(make("vit_tiny_patch16_224", depth=2, img_size=64))
    x = images(model)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="attn_mask"):
        model(x, attn_mask=torch.zeros(1, 1, 17, 17, dtype=x.dtype))
    model.r = 2
    with pytest.raises(NotImplementedError, match="forward_intermediates"):
        model.forward_intermediates(x)
    model.set_grad_checkpointing(True)
    with pytest.raises(NotImplementedError, match="checkpointing"):
        model(x)


def test_per_instance_and_unpatch():
    model = make("deit3_small_patch16_224", depth=2, img_size=64)
    other = make("deit3_small_patch16_224", depth=2, img_size=64)
    x = images(model)
    with torch.no_grad():
        expected = model(x)
        tome_kernels.patch.timm(model)
        tome_kernels.patch.timm(model, trace_source=True)  # re-patching updates the flags
        model.r = 6
        assert model._tome_info["trace_source"]
        assert not torch.allclose(model(x), expected)
        assert type(other).__name__ == "VisionTransformer" and not hasattr(other.blocks[0], "_tome_info")
        tome_kernels.patch.unpatch(model)
        assert type(model) is type(other) and type(model.blocks[0]) is type(other.blocks[0])
        assert type(model.blocks[0].attn) is type(other.blocks[0].attn)
        assert not hasattr(model, "_tome_info") and not hasattr(model.blocks[0], "_tome_layer")
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("attn_impl, dropout", [("op", 0.0), ("op", 0.1), ("sdpa", 0.0)])
def test_backward(attn_impl, dropout):
    model = tome_kernels.patch.timm(make("deit3_small_patch16_224", dtype=torch.float32, depth=2, img_size=64,
                                         attn_drop_rate=dropout, drop_path_rate=dropout), attn_impl=attn_impl)
    model.train()
    model.r = 4
    x = images(model)
    model(x).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_compile_fullgraph():
    model = tome_kernels.patch.timm(make("vit_tiny_patch16_224", dtype=torch.float32, depth=2, img_size=64,
                                         reg_tokens=2), trace_source=True, attn_impl="op")
    model.r = 5
    x = images(model)
    with torch.no_grad():
        expected = model(x)
        expected_source = model._tome_info["source"]
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(model._tome_info["source"], expected_source)
        model.r = (3, 1)  # a new schedule must not reuse the graph traced for the old one
        expected = model(x)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
        assert model._tome_info["size"].shape[1] == 19 - 6  # 16 patches + 3 prefix; r per block [0, 6]


def test_make_visualization_fills_groups_with_mean_colour():
    from tome_kernels.vis import make_visualization

    # 2 x 2 patches of 4 px, a class token; patches 0, 1, 3 merged into one token, patch 2 alone.
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    img[:4, :4], img[:4, 4:], img[4:, :4], img[4:, 4:] = 30, 60, 200, 90
    source = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 1, 0, 1], [0, 0, 0, 1, 0]], dtype=torch.float32)
    out = np.asarray(make_visualization(img, source[None], patch_size=4, num_prefix_tokens=1))
    assert out.shape == (8, 8, 3)
    assert (out[1, 1] == 60).all() and (out[6, 6] == 60).all() and (out[6, 1] == 200).all()  # group means
    assert (out[3, 1] == 255).all() and (out[4, 1] == 255).all() and (out[1, 3] == 60).all()  # outline only


def test_attn_impl_auto():
    model = make("vit_tiny_patch16_224", depth=1, img_size=64)
    assert tome_kernels.patch.timm(model)._tome_info["attn_impl"] == "sdpa"  # CPU: SDPA is the fast path
    with tome_kernels.use_backend("torch"):  # a backend chosen by hand runs
        assert tome_kernels.patch.timm(model)._tome_info["attn_impl"] == "op"
    with pytest.raises(ValueError, match="attn_impl"):
        tome_kernels.patch.timm(model, attn_impl="flash")


# ----------------------------------------------------------------------------------------------------
# RoPE ViTs (timm Eva): merged tokens carry their rotary tables
# ----------------------------------------------------------------------------------------------------
ROPE_MODELS = {
    "eva02": ("eva02_tiny_patch14_224", dict(depth=3, img_size=56)),  # EvaAttention, SwiGLU, class token
    "rope": ("vit_small_patch16_rope_224", dict(depth=3, img_size=64)),  # AttentionRope
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(depth=3, img_size=64)),  # per-layer, per-head tables
    "rope_reg_gap": ("vit_medium_patch16_rope_reg1_gap_256", dict(depth=3, img_size=64)),  # register, avg pool
}


@pytest.mark.parametrize("case", list(ROPE_MODELS))
def test_rope_r0_exact_and_merging(case):
    name, kwargs = ROPE_MODELS[case]
    model = make(name, dtype=torch.float32, **kwargs)
    x = images(model).float()
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        expected = model(x)
        tome_kernels.patch.timm(model, trace_source=True)
        assert model.r == 0
        assert torch.equal(model(x), expected)
        outputs = {}
        for pos_mode in ("keep", "mean"):
            tome_kernels.patch.timm(model, trace_source=True, pos_mode=pos_mode, r=100)
            outputs[pos_mode] = model(x)
            assert outputs[pos_mode].shape == expected.shape and torch.isfinite(outputs[pos_mode]).all()
            info = model._tome_info
            source, size = info["source"], info["size"].squeeze(-1)
            num_tokens = model.patch_embed.num_patches + prefix
            remaining = num_tokens
            for _ in model.blocks:
                remaining -= (remaining - prefix) // 2
            assert source.shape[1:] == (remaining, num_tokens)
            eye = torch.eye(num_tokens, dtype=source.dtype)[:prefix]
            assert torch.equal(source[:, :prefix], eye.expand(source.shape[0], -1, -1))  # prefix never merges
            assert torch.equal(source.sum(1), torch.ones_like(source.sum(1)))
            assert torch.equal(source.sum(-1), size)
    assert not torch.equal(outputs["keep"], outputs["mean"])


def rope_tome_forward(model, x, r_per_layer, pos_mode):
    """Independent ToMe loop for a timm Eva (non-mixed rope): merged tokens take their B destination's
    rotation tables ("keep") or the size-weighted mean ("mean"), via ``reference.merge``'s pos."""
    from timm.layers import apply_rot_embed_cat

    x, rope = model._pos_embed(model.patch_embed(x))
    x = model.norm_pre(x)
    batch, num_tokens, _ = x.shape
    prefix = model.num_prefix_tokens
    size = torch.ones(batch, num_tokens, dtype=x.dtype)
    pos = torch.cat([rope.new_zeros(prefix, rope.shape[-1]), rope]).expand(batch, -1, -1)
    for block, r in zip(model.blocks, r_per_layer):
        attn, n = block.attn, x.shape[1]
        h = block.norm1(x)
        qkv = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        metric = k.mean(1)
        table = pos[:, prefix:].unsqueeze(1)
        q = torch.cat([q[:, :, :prefix], apply_rot_embed_cat(q[:, :, prefix:], table)], dim=2)
        k = torch.cat([k[:, :, :prefix], apply_rot_embed_cat(k[:, :, prefix:], table)], dim=2)
        out, _ = reference.attention(q, k, v, size, attn.scale)
        x = x + block.gamma_1 * attn.proj(attn.norm(out.transpose(1, 2).reshape(batch, n, -1)))
        unm_idx, src_idx, dst_idx = reference.match(metric, r, prefix)
        x, pos, size = reference.merge(x, pos, size, unm_idx, src_idx, dst_idx, prefix, pos_mode == "mean")
        x = x + block.gamma_2 * block.mlp(block.norm2(x))
    x = model.norm(x)
    return model.head(model.fc_norm(x[:, 0]))


@pytest.mark.parametrize("pos_mode", ["keep", "mean"])
def test_rope_matches_independent_tome(pos_mode):
    model = make("vit_small_patch16_rope_224", depth=3, img_size=64, init_values=1.0)
    x = images(model)
    r = [5, 4, 2]
    with torch.no_grad():
        expected = rope_tome_forward(model, x, r, pos_mode)
        tome_kernels.patch.timm(model, pos_mode=pos_mode, attn_impl="op", r=r)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-9)


def test_rope_compile_fullgraph_and_refusals():
    model = tome_kernels.patch.timm(make("vit_small_patch16_rope_mixed_224", dtype=torch.float32, depth=2,
                                         img_size=64), trace_source=True, r=6)
    x = images(model)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pos_mode"):
        tome_kernels.patch.timm(model, pos_mode="first")
    with pytest.raises(ValueError, match="pos_mode is for RoPE"):
        tome_kernels.patch.timm(make("vit_tiny_patch16_224", depth=1, img_size=64), pos_mode="mean")
    with pytest.raises(TypeError, match="EvaBlockPostNorm"):
        tome_kernels.patch.timm(timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1, img_size=56,
                                                  use_post_norm=True))
