"""The accuracy study's pieces: the controls reduce tokens exactly where ToMe does (and are ToMe itself with
the keys as metric), the digits data, and the generating command end to end at toy size."""

import copy

import pytest
import torch

pytest.importorskip("sklearn")

import tome_kernels.patch  # noqa: E402
from tome_kernels.tools import accuracy, train  # noqa: E402
from tome_kernels.tools.bench_model import vit_token_counts  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def vit():
    return train.make_vit(seed=0).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 1, train.IMG_SIZE, train.IMG_SIZE, generator=torch.Generator().manual_seed(1))


def _mlp_token_counts(run, vit, images):
    """Tokens entering each block's MLP while ``run(images)`` runs ``vit``'s blocks."""
    counts = []
    hooks = [block.mlp.register_forward_hook(lambda m, i, o: counts.append(o.shape[1])) for block in vit.blocks]
    with torch.inference_mode():
        run(images)
    for hook in hooks:
        hook.remove()
    return counts


@pytest.mark.parametrize("r", [0, 4, 12, 40])
def test_control_with_keys_is_tome(vit, images, r):
    tome = tome_kernels.patch.timm(copy.deepcopy(vit))
    tome.r = r
    control = accuracy.Control(vit, "merge", lambda keys: keys)
    control.r = r
    with torch.inference_mode():
        torch.testing.assert_close(control(images), tome(images), rtol=0, atol=0)


@pytest.mark.parametrize("r", [4, 12, 40])
def test_controls_keep_tome_token_counts(vit, images, r):
    tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    expected = [mlp for _, mlp in vit_token_counts(tokens, [r] * len(vit.blocks), vit.num_prefix_tokens)]
    for control in (accuracy.Control(vit, "prune"), accuracy.Control(vit, "merge", accuracy.random_metric(0))):
        control.r = r
        assert _mlp_token_counts(control, vit, images) == expected
    tome = tome_kernels.patch.timm(copy.deepcopy(vit))
    tome.r = r
    assert _mlp_token_counts(tome, tome, images) == expected


def test_prune_keeps_the_most_attended(vit, images):
    """One block: the kept tokens are the class token and the most class-attended others, in order."""
    control = accuracy.Control(vit, "prune")
    control.r = 5
    block = vit.blocks[0]
    seen = []
    hook = block.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.inference_mode():
        control(images)
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
        y, q, k = accuracy._attention(block.attn, block.norm1(x), None)
        x = x + y
        scores = ((q[:, :, :1] * block.attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0, 1:]
        dropped = scores.argsort(dim=1)[:, :5] + 1
        for b in range(x.shape[0]):
            keep = [i for i in range(x.shape[1]) if i not in dropped[b].tolist()]
            torch.testing.assert_close(block.norm2(x[b, keep]), seen[0][b], rtol=0, atol=0)
    hook.remove()


def test_random_pairs_are_seeded(vit, images):
    control = accuracy.Control(vit, "merge", accuracy.random_metric(3))
    control.r = 12
    tome = tome_kernels.patch.timm(copy.deepcopy(vit))
    tome.r = 12
    with torch.inference_mode():
        first = control(images)
        control.metric.reset()
        again = control(images)
        assert not torch.equal(first, tome(images))
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_controls_refuse_other_models():
    from timm.models.vision_transformer import VisionTransformer

    pooled = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, global_pool="avg")
    with pytest.raises(ValueError, match="class-token"):
        accuracy.Control(pooled, "prune")
    with pytest.raises(ValueError, match="mode"):
        accuracy.Control(train.make_vit(), "drop")


def test_digits_split_is_seeded():
    first_train, first_test = train.digits(seed=0)
    again_train, _ = train.digits(seed=0)
    assert first_train.images.shape[1:] == (1, train.IMG_SIZE, train.IMG_SIZE)
    assert len(first_test.labels) == train.TEST_IMAGES and len(first_train.labels) == 1797 - train.TEST_IMAGES
    assert torch.equal(first_train.labels, again_train.labels)
    assert set(first_test.labels.tolist()) == set(range(train.NUM_CLASSES))


def test_shift_moves_each_image_by_its_offset():
    image = torch.zeros(1, 1, train.IMG_SIZE, train.IMG_SIZE)
    image[0, 0, 10, 20] = 1.0
    shifted = train.shift(image.expand(64, -1, -1, -1), torch.Generator().manual_seed(0))
    positions = {tuple((s[0] == 1).nonzero()[0].tolist()) for s in shifted}
    m = train.MAX_SHIFT
    assert positions == {(10 + dy, 20 + dx) for dy in range(-m, m + 1) for dx in range(-m, m + 1)}


def test_command_writes_table_and_plot(tmp_path):
    out, png = tmp_path / "ACCURACY.md", tmp_path / "accuracy.png"
    result = accuracy.main(["--steps", "3", "--r", "0", "8", "--rounds", "1", "--speed-batch", "8",
                            "--out", str(out), "--plot", str(png), "--no-progress"])
    assert result["r"] == [0, 8]
    assert set(result["accuracy"]) == set(accuracy.VARIANTS)
    text = out.read_text()
    assert "| 8 |" in text and "random merging" in text and "accuracy.png" in text
    assert png.stat().st_size > 1000
