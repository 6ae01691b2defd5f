"""tome_kernels.patch as a whole: the family registry, unpatch, and patched models behaving like models
(threads sharing one model, pickle / torch.save, torch.export, the forward checks)."""

from __future__ import annotations

import importlib
import io
import pickle
import subprocess
import sys
import threading

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("transformers")

import tome_kernels.patch  # noqa: E402
from tome_kernels.patch import _toolkit as tk  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:tome_kernels. no compiled backend")


def small_vit(seed: int = 0, name: str = "vit_tiny_patch16_224"):
    """The ViT of the thread report (img 64, patch 8, dim 64, depth 6, heads 2); ``name`` a RoPE one too."""
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, img_size=64, patch_size=8, embed_dim=64, depth=6,
                             num_heads=2).eval()


def small_detr():
    from test_patch_detr import make_model

    return make_model()


def vit_images(batch: int = 2, seed: int = 1):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def detr_images(batch: int = 1, seed: int = 1):
    from test_patch_detr import images

    return images(batch, seed)


ROPE = "vit_small_patch16_rope_mixed_224"  # timm Eva with per-layer rotary tables


def patched_vit(r=8, name: str = "vit_tiny_patch16_224", **options):
    model = tome_kernels.patch.timm(small_vit(name=name), trace_source=True, **options)
    model.r = r
    return model


def detr_outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return torch.cat([out.logits, out.pred_boxes], dim=-1)


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------
def test_apply_patch_finds_the_family():
    vit = tome_kernels.patch.apply_patch(small_vit(), r=4, attn_impl="op")
    assert vit.r == 4 and vit._tome_info["attn_impl"] == "op"
    eva = tome_kernels.patch.apply_patch(small_vit(name=ROPE), r=(4, 1), pos_mode="mean")
    assert eva.r == (4, 1) and eva._tome_info["pos_mode"] == "mean" and type(eva).__name__ == "ToMeEva"
    detr = tome_kernels.patch.apply_patch(small_detr(), er=3)
    assert detr.er == 3
    assert set(tome_kernels.patch.families()) >= {"timm", "detr"}
    with pytest.raises(ValueError, match="er .*mr .*dr"):
        tome_kernels.patch.apply_patch(small_detr(), r=4)


def test_unsupported_model_names_the_families():
    with pytest.raises(TypeError, match=r"no ToMe patch for torch.nn.modules.linear:Linear.*detr: .*timm: "):
        tome_kernels.patch.apply_patch(torch.nn.Linear(2, 2))


def test_one_unpatch_for_every_family():
    x = vit_images()
    vit = small_vit()
    with torch.no_grad():
        expected = vit(x)
    tome_kernels.patch.unpatch(tome_kernels.patch.apply_patch(vit, r=8))
    assert type(vit).__name__ == "VisionTransformer" and not any(
        name.startswith("_tome") for module in vit.modules() for name in vars(module))
    with torch.no_grad():
        assert torch.equal(vit(x), expected)
    detr = tome_kernels.patch.unpatch(tome_kernels.patch.detr(small_detr(), er=4))
    assert type(detr).__module__.startswith("transformers")
    assert not detr.model.encoder._forward_pre_hooks and not detr.model.decoder._forward_pre_hooks


def test_generated_class_names_round_trip():
    cls = tk.patched_class(torch.nn.Linear, tk.Call)
    assert cls.__name__ == "ToMeLinear" and getattr(tk, cls.__qualname__) is cls
    assert tk.patched_class(cls, tk.Call) is cls
    del tk.__dict__[cls.__qualname__]  # as in a fresh process: rebuilt from its name
    assert getattr(tk, cls.__qualname__) is cls


# ----------------------------------------------------------------------------------------------------
# Forward checks
# ----------------------------------------------------------------------------------------------------
def test_fingerprint_ignores_layout_comments_and_docstrings(tmp_path, monkeypatch):
    sources = {"fp_doc": "def f(x):\n    '''doc'''\n    # why\n    return x + 1\n",
               "fp_layout": "def f(x):\n    return x \\\n            + 1  # same tokens\n",
               "fp_other": "def f(x):\n    return x + 2\n"}
    for name, source in sources.items():
        (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    doc, layout, other = (tk.fingerprint(importlib.import_module(name).f) for name in sources)
    assert doc == layout != other
    from timm.models.vision_transformer import Block

    assert tk.fingerprint(Block.forward) in tome_kernels.patch.timm_vit.KNOWN_CODE["Block.forward"]


def test_changed_library_code_is_refused(monkeypatch):
    monkeypatch.setitem(tome_kernels.patch.timm_vit.KNOWN_CODE, "Block.forward", {"0000000000000000"})
    with pytest.raises(RuntimeError, match=r"timm .*Block.forward is not a version this patch was written"):
        tome_kernels.patch.timm(small_vit())


# ----------------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------------
def run_threads(model, inputs, forward, calls: int = 40):
    """Two threads running ``model`` ``calls`` times each on their own inputs: outputs and errors."""
    barrier = threading.Barrier(2)
    outputs: dict[int, list] = {0: [], 1: []}
    errors: list = []

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for _ in range(calls):
                outputs[index].append(forward(model, inputs[index]))
        except Exception as error:  # noqa: BLE001  (collected and reported by the test)
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outputs, errors


def vit_forward(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", ROPE])
def test_threads_share_a_patched_vit(name):
    model = patched_vit(r=8, name=name)
    inputs = [vit_images(seed=1), vit_images(seed=2)]
    expected = [vit_forward(model, x) for x in inputs]
    outputs, errors = run_threads(model, inputs, vit_forward)
    assert not errors, errors[:3]
    for index in range(2):
        assert len(outputs[index]) == 40
        for out in outputs[index]:
            assert torch.equal(out, expected[index])


def test_threads_share_a_patched_detr():
    model = tome_kernels.patch.detr(small_detr(), er=20, mr=20, dr=2)
    inputs = [detr_images(seed=1), detr_images(seed=2)]
    expected = [detr_outputs(model, x) for x in inputs]
    outputs, errors = run_threads(model, inputs, detr_outputs)
    assert not errors, errors[:3]
    for index in range(2):
        assert len(outputs[index]) == 40
        for out in outputs[index]:
            assert torch.equal(out, expected[index])


def test_published_info_is_the_last_forward():
    model = patched_vit(r=8)
    with torch.no_grad():
        model(vit_images(batch=3))
    assert model._tome_info["size"].shape[0] == model._tome_info["source"].shape[0] == 3
    assert model._tome_info["r"] == [8] * 6


# ----------------------------------------------------------------------------------------------------
# Pickle, torch.save
# ----------------------------------------------------------------------------------------------------
def round_trips(model):
    yield pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    yield torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", ROPE])
def test_pickle_and_torch_save_vit(name):
    model = patched_vit(r=8, name=name)
    x = vit_images()
    expected = vit_forward(model, x)
    for loaded in round_trips(model):
        assert type(loaded) is type(model) and loaded.r == 8
        assert torch.equal(vit_forward(loaded, x), expected)
        assert torch.equal(loaded._tome_info["source"], model._tome_info["source"])


def test_pickle_and_torch_save_detr():
    model = tome_kernels.patch.detr(small_detr(), er=20, mr=20, dr=2)
    x = detr_images()
    expected = detr_outputs(model, x)
    for loaded in round_trips(model):
        assert type(loaded).__name__ == "DetrForObjectDetection" and (loaded.er, loaded.mr, loaded.dr) == (20, 20, 2)
        assert torch.equal(detr_outputs(loaded, x), expected)


def test_torch_load_in_a_fresh_process(tmp_path):
    model = patched_vit(r=8)
    x = vit_images()
    torch.save({"model": model, "x": x, "expected": vit_forward(model, x)}, tmp_path / "model.pt")
    code = ("import torch; saved = torch.load(r'%s', weights_only=False); model = saved['model']\n"
            "with torch.no_grad(): assert torch.equal(model(saved['x']), saved['expected'])\n"
            "print(type(model).__name__, model.r)" % (tmp_path / "model.pt"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ToMeVisionTransformer", "8"]


# ----------------------------------------------------------------------------------------------------
# torch.export
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, attn_impl", [("vit_tiny_patch16_224", "op"), ("vit_tiny_patch16_224", "sdpa"),
                                             (ROPE, "sdpa")])
def test_export_then_eager(name, attn_impl):
    model = patched_vit(r=8, name=name, attn_impl=attn_impl)
    x = vit_images()
    expected = vit_forward(model, x)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-5)
    for r in (8, 3, 0):  # the eager model keeps working, also with another schedule
        model.r = r
        out = vit_forward(model, x)
        if r == 8:
            assert torch.equal(out, expected)
        assert model._tome_info["size"] is None or model._tome_info["size"].shape[1] == 65 - 6 * r
    assert torch.equal(vit_forward(patched_vit(r=8, name=name, attn_impl=attn_impl), x), expected)
