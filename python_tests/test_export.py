"""Export: the ATen compositions of the tome ops equal the ops; exported programs and ONNX models of patched
models equal eager, through one graph with a dynamic batch."""

import pytest
import torch

from tome_testing import random_windows

import tome_kernels
from tome_kernels import export

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
timm = pytest.importorskip("timm")

import tome_kernels.patch  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


def tied_metric(batch, num_tokens, channels, seed=0):
    """Rows that are one-hot vectors scaled by powers of two, and some zero rows: their cosines are exactly 0
    or 1 in any summation order, so best scores tie exactly and often (the contract's tie rules decide)."""
    generator = torch.Generator().manual_seed(seed)
    hot = torch.randint(0, channels, (batch, num_tokens), generator=generator)
    scale = 2.0 ** torch.randint(-2, 3, (batch, num_tokens), generator=generator)
    metric = torch.nn.functional.one_hot(hot, channels).float() * scale.unsqueeze(-1)
    metric[:, 3::7] = 0
    return metric


# ----------------------------------------------------------------------------------------------------
# Op level: composition == op (indices exactly), in PyTorch and in onnxruntime
# ----------------------------------------------------------------------------------------------------
CASES = [(197, 16, 1), (197, 16, 0), (198, 16, 2), (11, 3, 1), (9, 100, 0), (64, 0, 1), (33, 7, 4)]


@pytest.mark.parametrize("num_tokens,r,protected", CASES)
@pytest.mark.parametrize("pos_mode", ["keep", "mean"])
def test_bipartite_merge_composition_equals_op(num_tokens, r, protected, pos_mode):
    x = torch.randn(3, num_tokens, 8)
    pos = torch.randn(3, num_tokens, 4)
    size = torch.randint(1, 5, (3, num_tokens, 1)).float()
    metric = tied_metric(3, num_tokens, 6)
    expected = torch.ops.tome.bipartite_merge(x, pos, size, r, metric, protected, pos_mode)
    got = export.decompositions()[torch.ops.tome.bipartite_merge.default](x, pos, size, r, metric, protected,
                                                                            pos_mode)
    for name, e, g in zip(("x", "pos", "size", "unm_idx", "src_idx", "dst_idx"), expected, got):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("num_tokens,r,protected", CASES[:4])
def test_other_compositions_equal_ops(num_tokens, r, protected):
    table = export.decompositions()
    metric = tied_metric(2, num_tokens, 6, seed=1)
    indices = torch.ops.tome.bipartite_match(metric, r, protected)
    for e, g in zip(indices, table[torch.ops.tome.bipartite_match.default](metric, r, protected)):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    num_out = num_tokens - indices[1].shape[1]
    y = torch.randn(2, num_out, 5)
    torch.testing.assert_close(table[torch.ops.tome.unmerge.default](y, *indices, protected),
                               torch.ops.tome.unmerge(y, *indices, protected), rtol=0, atol=0)
    source = torch.eye(num_tokens).expand(2, -1, -1).contiguous()
    torch.testing.assert_close(table[torch.ops.tome.merge_source.default](source, *indices, protected),
                               torch.ops.tome.merge_source(source, *indices, protected), rtol=0, atol=0)
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, num_tokens, 8), torch.randn(2, 3, num_tokens, 8)
    size = torch.rand(2, num_tokens) + 0.5
    size[1] = 0  # every key masked: output 0, lse -inf
    out, lse = torch.ops.tome._prop_attention(q, k, v, size, 0.3)
    out_c, lse_c = table[torch.ops.tome._prop_attention.default](q, k, v, size, 0.3)
    torch.testing.assert_close(out_c, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse_c, lse, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_tokens,num_windows,width,r", [(64, 8, 8, 12), (37, 5, 4, 100), (50, 6, 2, 0)])
def test_window_match_composition_equals_op(num_tokens, num_windows, width, r):
    windows = random_windows(num_tokens, num_windows, width, seed=num_tokens)
    for metric in (tied_metric(3, num_tokens, 6, seed=2), torch.randn(3, num_tokens, 16)):
        expected = torch.ops.tome.window_match(metric, windows, r)
        got = export.decompositions()[torch.ops.tome.window_match.default](metric, windows, r)
        for e, g in zip(expected, got):
            assert g.dtype == torch.int64
            torch.testing.assert_close(g, e, rtol=0, atol=0)


class _Defaults(torch.nn.Module):
    """Every op with its optional arguments left out (the graph then omits them)."""

    def forward(self, x, metric):
        indices = torch.ops.tome.bipartite_match(metric, 7)
        merged, size = torch.ops.tome.merge(x, None, *indices)
        source = torch.ops.tome.merge_source(torch.eye(x.shape[1]).expand(x.shape[0], -1, -1), *indices)
        return torch.ops.tome.unmerge(merged * size, *indices), source, *indices


def test_compositions_keep_the_schema_defaults():
    inputs = (torch.randn(2, 21, 4), tied_metric(2, 21, 6, seed=5))
    program = export.export_program(_Defaults(), inputs, dynamic_batch=False, decompose=True)
    assert not [node for node in program.graph.nodes if "tome" in str(node.target)]
    for e, g in zip(_Defaults()(*inputs), program.module()(*inputs)):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)


class _Step(torch.nn.Module):
    def __init__(self, r, protected):
        super().__init__()
        self.r, self.protected = r, protected

    def forward(self, x, size, metric):
        return torch.ops.tome.bipartite_merge(x, None, size, self.r, metric, self.protected)


@pytest.mark.parametrize("num_tokens,r,protected", [(197, 16, 1), (198, 20, 0), (40, 9, 2)])
def test_onnx_op_follows_the_contract_on_ties(tmp_path, num_tokens, r, protected):
    """onnxruntime's results of the exported op equal the op's, indices included, on tie-heavy metrics,
    for batches other than the example's."""
    step = _Step(r, protected)
    example = (torch.randn(2, num_tokens, 8), torch.ones(2, num_tokens, 1), tied_metric(2, num_tokens, 6))
    path = str(tmp_path / "step.onnx")
    export.export_onnx(step, example, path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch, seed in ((1, 3), (5, 4)):
        inputs = (torch.randn(batch, num_tokens, 8), torch.randint(1, 4, (batch, num_tokens, 1)).float(),
                  tied_metric(batch, num_tokens, 6, seed=seed))
        expected = step(*inputs)
        got = session.run(None, {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), inputs)})
        assert len(got) == len(expected)
        for e, g in zip(expected, got):
            torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-6, atol=1e-6)


class _WindowStep(torch.nn.Module):
    """The dense form (match, merge, unmerge) with windows as a constant of the graph."""

    def __init__(self, windows, r):
        super().__init__()
        self.register_buffer("windows", windows)
        self.r = r

    def forward(self, x, metric):
        indices = torch.ops.tome.window_match(metric, self.windows, self.r)
        merged, size = torch.ops.tome.merge(x, None, *indices)  # protected left at its default
        return (torch.ops.tome.unmerge(merged * size, *indices), *indices)


def test_onnx_window_match_follows_the_contract_on_ties(tmp_path):
    step = _WindowStep(random_windows(90, 9, 8, seed=1), 25)
    path = str(tmp_path / "window.onnx")
    export.export_onnx(step, (torch.randn(2, 90, 8), tied_metric(2, 90, 6)), path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch, seed in ((1, 3), (4, 4)):
        inputs = (torch.randn(batch, 90, 8), tied_metric(batch, 90, 6, seed=seed))
        got = session.run(None, {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), inputs)})
        for e, g in zip(step(*inputs), got):
            torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Models: torch.export and ONNX equal eager for two batch sizes through one graph
# ----------------------------------------------------------------------------------------------------
def timm_model(name, r):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=64, depth=4).eval()
    tome_kernels.patch.timm(model)
    model.r = r
    return model


TIMM_MODELS = [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)]


@pytest.mark.parametrize("name,protected", TIMM_MODELS)
@pytest.mark.parametrize("decompose", [False, True])
def test_timm_export_program_equals_eager(name, protected, decompose):
    model = timm_model(name, r=6)
    assert model._tome_info["num_prefix_tokens"] == protected
    batches = {batch: torch.randn(batch, 3, 64, 64) for batch in (2, 3)}
    with torch.no_grad():
        expected = {batch: model(images) for batch, images in batches.items()}
    program = export.export_program(model, (batches[2],), decompose=decompose)
    assert any("tome" in str(node.target) for node in program.graph.nodes) != decompose
    for batch, images in batches.items():
        torch.testing.assert_close(program.module()(images), expected[batch], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,protected", TIMM_MODELS)
def test_timm_onnx_equals_eager(tmp_path, name, protected):
    model = timm_model(name, r=6)
    batches = {batch: torch.randn(batch, 3, 64, 64) for batch in (2, 5)}
    with torch.no_grad():
        expected = {batch: model(images) for batch, images in batches.items()}
    path = str(tmp_path / "model.onnx")
    export.export_onnx(model, (batches[2],), path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    domains = {node.domain for node in __import__("onnx").load(path).graph.node}
    assert domains <= {"", "ai.onnx"}, domains  # standard operators only
    for batch, images in batches.items():
        got = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), expected[batch], rtol=1e-4, atol=1e-5)


def test_export_cli(tmp_path, capsys):
    path = str(tmp_path / "cli.onnx")
    from tome_kernels.tools.export import main

    main(["--model", "vit_tiny_patch16_224", "--img-size", "64", "--r", "4", "--onnx", path,
                 "--check", "1"])
    printed = capsys.readouterr().out
    assert "max abs difference" in printed and "onnxruntime" in printed


class _Detections(torch.nn.Module):
    def __init__(self, detector):
        super().__init__()
        self.detector = detector

    def forward(self, pixel_values):
        out = self.detector(pixel_values=pixel_values)
        return out.logits, out.pred_boxes


def _patched_detector(family):
    if family == "detr":
        from test_patch_detr import images, make_model

        return tome_kernels.patch.detr(make_model(), er=20, mr=20, dr=2), images
    from test_patch_deformable_detr import images, make_model

    return tome_kernels.patch.deformable_detr(make_model(encoder_layers=1), ratio=0.75), images


@pytest.mark.parametrize("family", ["detr", "deformable_detr"])
def test_detector_export_and_onnx_equal_eager(tmp_path, family):
    """DETR with merged encoder tokens, memory and queries; Deformable DETR with merged encoder queries (two
    steps of windowed matching). No pixel_mask: no padding, so the patches read no data to choose r."""
    pytest.importorskip("transformers")
    model, images = _patched_detector(family)
    wrapped = _Detections(model).eval()
    batches = {batch: images(batch, seed=batch) for batch in (1, 3)}
    with torch.no_grad():
        expected = {batch: wrapped(pixels) for batch, pixels in batches.items()}
    program = export.export_program(wrapped, (batches[1],))
    assert any("tome" in str(node.target) for node in program.graph.nodes)
    for batch, pixels in batches.items():
        for got, want in zip(program.module()(pixels), expected[batch]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    path = str(tmp_path / "detector.onnx")
    export.export_onnx(wrapped, (batches[1],), path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch, pixels in batches.items():
        got = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
        for g, want in zip(got, expected[batch]):
            torch.testing.assert_close(torch.from_numpy(g), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case,r", [("vit", 4), ("deit_teacher", 4)])
def test_hf_vit_export_and_onnx_equal_eager(tmp_path, case, r):
    """Hugging Face ViT (protected 1) and DeiT with teacher (protected 2), merged, through one ONNX graph."""
    pytest.importorskip("transformers")
    from test_patch_hf import images, make

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).logits

    model = make(case, dtype=torch.float32)
    tome_kernels.patch.apply_patch(model, r=r)
    wrapped = Logits(model).eval()
    batches = {batch: images(model, batch, seed=batch) for batch in (2, 3)}
    with torch.no_grad():
        expected = {batch: wrapped(pixels) for batch, pixels in batches.items()}
    program = export.export_program(wrapped, (batches[2],))
    for batch, pixels in batches.items():
        torch.testing.assert_close(program.module()(pixels), expected[batch], rtol=1e-5, atol=1e-5)
    path = str(tmp_path / f"{case}.onnx")
    export.export_onnx(wrapped, (batches[2],), path)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch, pixels in batches.items():
        got = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), expected[batch], rtol=1e-4, atol=1e-5)
