"""ToMe patches of transformers 5.x vision transformers (ViT, DeiT, DINOv2 with and without registers, CLIP,
SigLIP, and the DINOv2 / SigLIP classifiers whose heads average the patch tokens).

r = 0 must reproduce the unpatched model bit for bit (the attention path is the model's own); r > 0 must
equal an independent forward loop written here from ``tome_kernels.reference`` on the model's modules (run in
float64, so rounding cannot flip a near-tie in the matching). Small configurations (2-3 layers, 64 px,
8 px patches) keep the file fast on a 2-core CPU.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tome_kernels  # noqa: E402
import tome_kernels.patch  # noqa: E402
from tome_kernels import reference  # noqa: E402
from tome_kernels.patch import hf_vit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:tome_kernels. no compiled backend")

IMAGE, PATCH = 64, 8
NUM_PATCHES = (IMAGE // PATCH) ** 2
SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, image_size=IMAGE,
             patch_size=PATCH)
DINO = {k: v for k, v in SMALL.items() if k != "intermediate_size"} | {"mlp_ratio": 2}
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)


def _vit(t):
    return t.ViTForImageClassification(t.ViTConfig(**SMALL, num_labels=5))


def _deit(t):
    return t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(**SMALL, num_labels=5))


def _dinov2(t):
    return t.Dinov2Model(t.Dinov2Config(**DINO))


def _dinov2_reg(t):
    return t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(**DINO, num_register_tokens=4))


def _dinov2_cls(t):
    return t.Dinov2ForImageClassification(t.Dinov2Config(**DINO, num_labels=5))


def _dinov2_reg_cls(t):
    return t.Dinov2WithRegistersForImageClassification(t.Dinov2WithRegistersConfig(**DINO, num_register_tokens=4,
                                                                                     num_labels=5))


def _clip(t):
    return t.CLIPModel(t.CLIPConfig(vision_config=SMALL, text_config=TEXT))


def _clip_vision(t):
    return t.CLIPVisionModel(t.CLIPVisionConfig(**SMALL))


def _siglip(t):
    return t.SiglipVisionModel(t.SiglipVisionConfig(**SMALL))


def _siglip_cls(t):
    text = TEXT | {"hidden_size": SMALL["hidden_size"]}
    return t.SiglipForImageClassification(t.SiglipConfig(vision_config=SMALL, text_config=text, num_labels=5))


def _siglip_model(t):
    text = TEXT | {"hidden_size": SMALL["hidden_size"]}  # SigLIP compares the towers' outputs directly
    return t.SiglipModel(t.SiglipConfig(vision_config=SMALL, text_config=text))


# name: (builder, protected prefix tokens)
MODELS = {
    "vit": (_vit, 1),
    "deit_teacher": (_deit, 2),
    "dinov2": (_dinov2, 1),
    "dinov2_registers": (_dinov2_reg, 5),
    "dinov2_cls": (_dinov2_cls, 1),
    "dinov2_registers_cls": (_dinov2_reg_cls, 5),
    "clip": (_clip, 1),
    "clip_vision": (_clip_vision, 1),
    "siglip": (_siglip, 0),
    "siglip_model": (_siglip_model, 0),
    "siglip_cls": (_siglip_cls, 0),
}
CLASSIFIERS = ["dinov2_cls", "dinov2_registers_cls", "siglip_cls"]  # heads that average the patch tokens


def make(case: str, dtype=torch.float64, attn_implementation: str = "sdpa"):
    """A fresh copy of a random-weight model (built once per configuration)."""
    return copy.deepcopy(_build(case, dtype, attn_implementation))


@functools.lru_cache(maxsize=None)
def _build(case: str, dtype, attn_implementation: str):
    torch.manual_seed(0)
    model = MODELS[case][0](transformers)
    model.set_attn_implementation(attn_implementation)
    model = model.to(dtype).eval()
    with torch.no_grad():  # these start at constants: make them matter
        for name, param in model.named_parameters():
            if name.endswith(("cls_token", "distillation_token", "register_tokens", "probe")):
                param.normal_()
            elif name.endswith("lambda1"):  # DINOv2 LayerScale
                param.uniform_(0.5, 1.5)
    return model


def images(model, batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=gen).to(next(model.parameters()).dtype)


def run(model, x):
    """The model's output for images ``x`` (a text batch too for the two-tower models)."""
    if hasattr(model, "text_model"):
        ids = torch.arange(10).reshape(2, 5) % TEXT["vocab_size"]
        return model(input_ids=ids, pixel_values=x)
    return model(x)


def backbone(model):
    return model.get_submodule(hf_vit.find_family(model)[1])


# ----------------------------------------------------------------------------------------------------
# The independent rendering of ToMe (a plain loop over the model's modules and the reference functions)
# ----------------------------------------------------------------------------------------------------
def _layer_parts(layer):
    """(norm1, attention, after attention, norm2, mlp, after mlp) of a layer of any of the families."""
    if hasattr(layer, "layernorm_before"):  # ViT, DeiT
        return (layer.layernorm_before, layer.attention, layer.dropout, layer.layernorm_after, layer.mlp,
                layer.dropout)
    if hasattr(layer, "layer_scale1"):  # DINOv2
        return (layer.norm1, layer.attention, lambda y: layer.drop_path(layer.layer_scale1(y)), layer.norm2,
                layer.mlp, lambda y: layer.drop_path(layer.layer_scale2(y)))
    identity = torch.nn.Identity()  # CLIP, SigLIP
    return layer.layer_norm1, layer.self_attn, identity, layer.layer_norm2, layer.mlp, identity


def tome_forward(vision, x, r_per_layer, protected, prop_attn=True):
    """Encoder output (before any final norm), final sizes [B, N] and source [B, N, N0] of ToMe on the
    weights of the vision backbone ``vision``, without the patch."""
    x = vision.embeddings(x)
    if hasattr(vision, "pre_layrnorm"):  # CLIP
        x = vision.pre_layrnorm(x)
    batch, num_tokens, _ = x.shape
    size = torch.ones(batch, num_tokens, dtype=x.dtype)
    source = torch.eye(num_tokens, dtype=x.dtype).repeat(batch, 1, 1)
    layers = vision.layers if hasattr(vision, "layers") else getattr(vision.encoder, "layers", None)
    layers = layers if layers is not None else vision.encoder.layer
    for layer, r in zip(layers, r_per_layer):
        norm1, attn, after_attn, norm2, mlp, after_mlp = _layer_parts(layer)
        n = x.shape[1]
        h = norm1(x)
        q, k, v = (proj(h).view(batch, n, -1, attn.head_dim).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        scale = getattr(attn, "scaling", getattr(attn, "scale", None))
        out, _ = reference.attention(q, k, v, size if prop_attn else None, scale)
        out_proj = getattr(attn, "o_proj", getattr(attn, "out_proj", None))
        x = x + after_attn(out_proj(out.transpose(1, 2).reshape(batch, n, -1)))
        unm_idx, src_idx, dst_idx = reference.match(k.mean(1), r, protected)
        x, _, size = reference.merge(x, None, size, unm_idx, src_idx, dst_idx, protected, False)
        source = reference.merge_source(source, unm_idx, src_idx, dst_idx, protected)
        x = x + after_mlp(mlp(norm2(x)))
    return x, size, source


def siglip_pool(head, tokens, size):
    """SigLIP's attention-pooling head with the log-size bias, written out (explicit softmax)."""
    batch, num_tokens, channels = tokens.shape
    mha, heads = head.attention, head.attention.num_heads
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    probe = head.probe.expand(batch, 1, channels)

    def split(t):
        return t.reshape(batch, -1, heads, channels // heads).transpose(1, 2)

    q, k, v = split(probe @ wq.T + bq), split(tokens @ wk.T + bk), split(tokens @ wv.T + bv)
    logits = q @ k.transpose(-1, -2) * (channels // heads) ** -0.5 + size.log().reshape(batch, 1, 1, num_tokens)
    pooled = (logits.softmax(-1) @ v).transpose(1, 2).reshape(batch, 1, channels)
    pooled = mha.out_proj(pooled)
    return (pooled + head.mlp(head.layernorm(pooled)))[:, 0]


def classifier_logits(model, hidden, size, protected):
    """The logits of a patch-averaging classifier from the encoder output ``hidden`` [B, N, C] and the token
    sizes [B, N], written out: the final norm, then ``Σ sᵢ xᵢ / Σ sᵢ`` over the patch tokens."""
    vision = backbone(model)
    norm = vision.post_layernorm if hasattr(vision, "post_layernorm") else vision.layernorm
    hidden = norm(hidden)
    weights = size[:, protected:, None]
    patch_mean = (hidden[:, protected:] * weights).sum(1) / weights.sum(1)
    if protected:  # DINOv2: the class token next to the patch mean
        patch_mean = torch.cat([hidden[:, 0], patch_mean], dim=1)
    return model.classifier(patch_mean)


# ----------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(MODELS))
def test_r0_matches_unpatched_bit_for_bit(case, attn_implementation):
    model = make(case, torch.float32, attn_implementation)
    x = images(model)
    with torch.no_grad():
        expected = run(model, x)
        tome_kernels.patch.apply_patch(model)
        assert type(model).__name__.startswith("ToMe") and model.r == 0
        actual = run(model, x)
    for key, value in expected.items():
        if torch.is_tensor(value):
            assert torch.equal(actual[key], value), key


@pytest.mark.parametrize("case, attn_impl", [(case, "op") for case in MODELS]
                         + [("vit", "sdpa"), ("dinov2_registers", "sdpa"), ("siglip", "sdpa"), ("vit", "no_prop")])
def test_matches_independent_tome(case, attn_impl):
    prop_attn = attn_impl != "no_prop"
    model = make(case)
    vision, protected = backbone(model), MODELS[case][1]
    x = images(model)
    r = [9, 7, 11]
    with torch.no_grad():
        hidden, size, source = tome_forward(vision, x, r, protected, prop_attn)
        tome_kernels.patch.hf(model, trace_source=True, prop_attn=prop_attn, attn_impl="op" if not prop_attn else attn_impl)
        model.r = r
        out = vision(x)
    info = model._tome_info
    assert info["r"] == r and info["num_prefix_tokens"] == protected
    assert info["attn_impl"] == ("op" if not prop_attn else attn_impl)
    torch.testing.assert_close(info["size"].squeeze(-1), size, rtol=0, atol=0)
    torch.testing.assert_close(info["source"], source, rtol=0, atol=0)
    if hasattr(vision, "layernorm"):  # ViT, DeiT, DINOv2: the final norm is applied to every token
        hidden = vision.layernorm(hidden)
    elif hasattr(vision, "head"):  # SigLIP: post norm, then the size-weighted attention pooling
        hidden = vision.post_layernorm(hidden)
        torch.testing.assert_close(out.pooler_output, siglip_pool(vision.head, hidden, size), rtol=0, atol=1e-10)
    torch.testing.assert_close(out.last_hidden_state, hidden, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", CLASSIFIERS)
def test_classifier_pools_the_patch_tokens_by_size(case):
    model = make(case)
    protected = MODELS[case][1]
    x = images(model)
    r = [9, 7, 11]
    with torch.no_grad():
        hidden, size, _ = tome_forward(backbone(model), x, r, protected)
        expected = classifier_logits(model, hidden, size, protected)
        unweighted = classifier_logits(model, hidden, torch.ones_like(size), protected)
        tome_kernels.patch.hf(model, attn_impl="op", r=r)
        logits = model(x).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-10)
    assert not torch.allclose(logits, unweighted, rtol=1e-3, atol=1e-3)  # the sizes matter here


@pytest.mark.parametrize("case", CLASSIFIERS)
def test_classifier_of_duplicated_patches_keeps_its_logits(case):
    """Images of identical patches: every patch token is the same vector, so merging leaves the weighted
    mean, and the logits, as they were (an unweighted mean would too: the sizes must not break it)."""
    model = make(case)
    tile = torch.randn(1, 3, PATCH, PATCH, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = tile.repeat(2, 1, IMAGE // PATCH, IMAGE // PATCH)
    with torch.no_grad():
        embeddings = backbone(model).embeddings
        position = [p for n, p in embeddings.named_parameters() if "position" in n]
        for p in position:  # equal positions too, or the patch tokens differ
            p.copy_(p.mean(dim=-2, keepdim=True).expand_as(p))
        expected = model(x).logits
        tome_kernels.patch.hf(model, r=8)
        actual = model(x).logits
    assert model._tome_info["size"].amax() > 1
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", ["dinov2_registers_cls", "siglip_cls"])
def test_classifier_loss_and_tuples(case):
    model = tome_kernels.patch.hf(make(case, torch.float32), r=8)
    x, labels = images(model), torch.tensor([1, 4])
    with torch.no_grad():
        out = model(x, labels=labels)
        plain = model(x, return_dict=False)
    assert torch.equal(plain[0], out.logits) and len(plain) == 1
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    model.r = 0
    with torch.no_grad():
        assert len(model(x, labels=labels, return_dict=False)) == 2


@pytest.mark.parametrize("case", list(MODELS))
def test_outputs_finite_with_documented_shapes(case):
    model = make(case, torch.float32)
    x = images(model)
    with torch.no_grad():
        expected = run(model, x)
        tome_kernels.patch.hf(model).r = 8
        actual = run(model, x)
    protected, num_layers = MODELS[case][1], len(model._tome_info["r"])
    num_tokens = NUM_PATCHES + protected
    for key, value in expected.items():
        if not torch.is_tensor(value):
            continue
        assert torch.isfinite(actual[key]).all(), key
        if key == "last_hidden_state":
            assert actual[key].shape == (2, num_tokens - 8 * num_layers, SMALL["hidden_size"])
        else:
            assert actual[key].shape == value.shape, key
    out = backbone(model)(x)
    assert out.last_hidden_state.shape[1] == num_tokens - 8 * num_layers


@pytest.mark.parametrize("case", ["vit", "deit_teacher", "dinov2_registers", "siglip"])
def test_prefix_tokens_never_merge(case):
    model = tome_kernels.patch.hf(make(case), trace_source=True)
    model.r = 100  # clamps to half the mergeable tokens in every layer
    with torch.no_grad():
        run(model, images(model))
    info, prefix = model._tome_info, MODELS[case][1]
    source, size = info["source"], info["size"].squeeze(-1)
    num_tokens = NUM_PATCHES + prefix
    remaining = num_tokens
    for _ in info["r"]:
        remaining -= (remaining - prefix) // 2
    assert source.shape[1:] == (remaining, num_tokens)
    eye = torch.eye(num_tokens, dtype=source.dtype)[:prefix]
    assert torch.equal(source[:, :prefix], eye.expand(source.shape[0], -1, -1))
    assert torch.equal(source.sum(1), torch.ones_like(source.sum(1)))  # each original token in one group
    assert torch.equal(source.sum(-1), size)
    assert info["num_prefix_tokens"] == prefix
    assert info["class_token"] == (prefix > 0)
    assert info["distill_token"] == (case == "deit_teacher")


def test_trace_source_is_identity_without_merging():
    model = tome_kernels.patch.hf(make("dinov2"), trace_source=True)
    with torch.no_grad():
        model(images(model))
    source = model._tome_info["source"]
    assert torch.equal(source, torch.eye(NUM_PATCHES + 1, dtype=source.dtype).expand(2, -1, -1))


@pytest.mark.parametrize("r, merges", [
    (3, [3, 3, 3]),
    ((4, -1), [8, 4, 0]),
    ((4, 1), [0, 4, 8]),
    ([1, 0, 7], [1, 0, 7]),
    ([5], [5, 0, 0]),
])
def test_r_schedules(r, merges):
    model = tome_kernels.patch.hf(make("vit", torch.float32))
    model.r = r
    assert model.r == r
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for layer in model.vit.layers]
    with torch.no_grad():
        out = model.vit(images(model))
    for hook in hooks:
        hook.remove()
    assert model._tome_info["r"] == merges  # published by the forward
    tokens = [NUM_PATCHES + 1]
    for merged in merges:
        tokens.append(tokens[-1] - merged)
    assert seen + [out.last_hidden_state.shape[1]] == tokens


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), ([1, 2, 3, 4], ValueError),
                                        ((2, 3), ValueError), (True, TypeError)])
def test_bad_r_is_refused_when_set(bad, error):
    model = tome_kernels.patch.hf(make("vit", torch.float32))
    with pytest.raises(error, match="tome"):
        model.r = bad
    assert model.r == 0


def test_hidden_states_and_attentions_are_captured():
    model = tome_kernels.patch.hf(make("vit", torch.float32, "eager"))
    x = images(model)
    model.r = 8
    with torch.no_grad():
        out = model.vit(x, output_hidden_states=True, output_attentions=True)
    assert [h.shape[1] for h in out.hidden_states] == [65, 57, 49, 41]
    # weights come from the model's eager attention until the first merge; proportional attention is fused
    assert [a.shape[-1] for a in out.attentions] == [65]


def test_unpatch_restores_classes_and_outputs():
    model = make("clip", torch.float32)
    x = images(model)
    classes = {name: type(m) for name, m in model.named_modules()}
    with torch.no_grad():
        expected = run(model, x).logits_per_image
        tome_kernels.patch.hf(model, trace_source=True).r = 8
        assert type(model.text_model.encoder.layers[0]) is classes["text_model.encoder.layers.0"]  # text untouched
        run(model, x)
        tome_kernels.patch.unpatch(model)
        assert {name: type(m) for name, m in model.named_modules()} == classes
        assert not any(k.startswith("_tome") for m in model.modules() for k in vars(m))
        assert torch.equal(run(model, x).logits_per_image, expected)


def test_repatch_keeps_r_and_updates_flags():
    model = tome_kernels.patch.hf(make("deit_teacher", torch.float32))
    model.r = (4, 1)
    cls = type(model)
    tome_kernels.patch.hf(model, trace_source=True, attn_impl="sdpa")
    assert type(model) is cls and model.r == (4, 1)
    with torch.no_grad():
        model(images(model))
    info = model._tome_info
    assert info["trace_source"] and info["attn_impl"] == "sdpa" and info["r"] == [0, 4, 8]
    assert model.deit._tome_info is info and info["source"].shape == (2, NUM_PATCHES + 2 - 12, NUM_PATCHES + 2)


def test_unsupported_models_are_refused_with_the_supported_list():
    config = transformers.ViTConfig(**SMALL, encoder_stride=PATCH)
    with pytest.raises(TypeError, match="ViTForMaskedImageModeling. Supported: transformers ViTModel"):
        tome_kernels.patch.hf(transformers.ViTForMaskedImageModeling(config))
    with pytest.raises(TypeError, match="Linear. Supported families: .*hf_vit: .*hf_siglip: "):
        tome_kernels.patch.apply_patch(torch.nn.Linear(2, 2))


def test_classifier_with_its_own_forward_is_refused():
    class Classifier(transformers.Dinov2ForImageClassification):
        def forward(self, pixel_values):
            return self.classifier(self.dinov2(pixel_values).pooler_output.repeat(1, 2))

    model = Classifier(transformers.Dinov2Config(**DINO, num_labels=5))
    with pytest.raises(TypeError, match="Classifier; supported: .*Dinov2ForImageClassification or a subclass"):
        tome_kernels.patch.apply_patch(model)


def test_attention_mask_is_refused_once_tokens_merge():
    model = tome_kernels.patch.hf(make("vit", torch.float32))
    x = images(model)
    mask = torch.ones(2, NUM_PATCHES + 1, dtype=torch.long)
    mask[:, -1] = 0
    with torch.no_grad():
        model.vit(x, attention_mask=mask)  # r = 0: passed through
        model.r = 4
        with pytest.raises(NotImplementedError, match="attention_mask"):
            model.vit(x, attention_mask=mask)
        with pytest.raises(NotImplementedError, match="attention_mask"):
            model.vit(x, None, None, mask)  # positional
        with pytest.raises(NotImplementedError, match="attention_mask"):
            model(x, attention_mask=mask)  # through the classifier


def test_gradients_flow_and_checkpointing_is_refused():
    model = tome_kernels.patch.hf(make("dinov2", torch.float32)).train()
    model.r = 6
    model(images(model)).last_hidden_state.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p is not model.embeddings.mask_token)
    model.activation_checkpointing_enable()
    with pytest.raises(NotImplementedError, match="checkpointing"):
        model(images(model))


@pytest.mark.parametrize("case", ["vit", "dinov2_registers", "siglip", "dinov2_registers_cls", "siglip_cls"])
def test_torch_compile_fullgraph(case):
    torch._dynamo.reset()
    model = make(case, torch.float32)
    x = images(model)
    tome_kernels.patch.hf(model)
    model.r = [6, 4, 5]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected = model(x)
        actual = compiled(x)
    for key, value in expected.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(MODELS))
def test_apply_patch_finds_the_family(case):
    model = tome_kernels.patch.apply_patch(make(case, torch.float32), r=(3, -1))
    family = hf_vit.find_family(model)[0]
    assert tome_kernels.patch.families()[family.name].apply is tome_kernels.patch.hf
    assert model.r == (3, -1) and backbone(model).r == (3, -1)
    with torch.no_grad():
        run(model, images(model))
    assert model._tome_info["r"] == [6, 3, 0]


@pytest.mark.parametrize("case", ["deit_teacher", "dinov2_registers_cls"])
def test_pickle_and_deepcopy_of_a_patched_model(case):
    model = tome_kernels.patch.hf(make(case, torch.float32), r=5)
    x = images(model)
    with torch.no_grad():
        expected = model(x).logits
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert clone.r == 5 and clone._tome_info is not model._tome_info
            assert torch.equal(clone(x).logits, expected)


def test_unpickled_model_keeps_output_capture():
    from transformers.utils import output_capturing

    model = tome_kernels.patch.hf(make("vit", torch.float32), r=8)
    data = pickle.dumps(model)
    for module in (model, model.vit):  # as in a fresh process, which never registered the ToMe classes
        output_capturing._CAN_RECORD_REGISTRY.pop(str(type(module)), None)
    clone = pickle.loads(data)
    with torch.no_grad():
        out = clone(images(clone), output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [65, 57, 49, 41]


@pytest.mark.parametrize("case, output", [("siglip", "pooler_output"), ("siglip_cls", "logits")])
def test_threads_share_one_patched_model(case, output):
    model = tome_kernels.patch.hf(make(case, torch.float32), r=[10, 3, 7])
    inputs = [images(model, batch=1 + i % 3, seed=i) for i in range(6)]
    with torch.no_grad():
        expected = [model(x)[output] for x in inputs]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            actual = list(pool.map(lambda x: model(x)[output], inputs))
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


# ----------------------------------------------------------------------------------------------------
# bench_model's transformers models
# ----------------------------------------------------------------------------------------------------
def test_bench_model_flops_match_the_timm_count():
    from tome_kernels.tools import bench_model

    timm = pytest.importorskip("timm")
    reference_model = timm.create_model("vit_base_patch16_224", pretrained=False, device="meta")
    with torch.device("meta"):
        model = tome_kernels.patch.hf(bench_model.HF_MODELS["vit-base"](224))
    assert bench_model.hf_num_tokens(model, 224) == 197
    for r in (None, tome_kernels.patch.parse_r(16, 12)):
        assert bench_model.hf_vit_flops(model, 224, 2, r) == pytest.approx(bench_model.vit_flops(reference_model, 197, 2, r), rel=1e-12)


def test_bench_model_cli_runs_an_hf_model():
    from tome_kernels.tools import bench_model

    rows = bench_model.main(["--model", "hf:siglip-base", "--img-size", "64", "--batch", "1", "--sweep", "0,4",
                             "--rounds", "1", "--warmup", "0", "--threads", "1", "--no-progress"])
    assert [row["kind"] for row in rows] == ["baseline", "tome", "tome"]
    assert rows[1]["ceiling"] == 1.0 and rows[2]["ceiling"] > 1.0
    with pytest.raises(SystemExit, match="hf:vit-base"):
        bench_model.family_for("hf:nothing")


@pytest.mark.parametrize("case", ["vit", "siglip", "dinov2_cls"])
def test_torch_export(case):
    model = tome_kernels.patch.hf(make(case, torch.float32), r=[6, 4, 5])
    x = images(model)
    with torch.no_grad():
        expected = model(x)
        program = torch.export.export(model, (x,))
        actual = program.module()(x)
        again = model(x)  # the eager model keeps working after the export trace
    for key, value in expected.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-5)
            assert torch.equal(again[key], value)
