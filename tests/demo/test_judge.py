import collections

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from glide_text2im.demo import shapes
from glide_text2im.demo.judge import NONE, judge, judge_batch
from glide_text2im.demo.shapes import PartialSpec, ShapeSpec, render


def _to_tensor(image):
    """PIL image -> float tensor [3 x H x W] in [-1, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).double() / 127.5 - 1


def _accuracy(pairs):
    """Fraction of (judgement, spec) pairs judged right, per attribute."""
    right = collections.Counter()
    for judgement, spec in pairs:
        right.update(name for name, ok in judgement.agrees_with(spec).items() if ok)
    return {name: right[name] / len(pairs) for name in shapes.ATTRIBUTES}


@pytest.fixture(scope="module")
def examples_64():
    return [(image, spec) for image, _, spec in shapes.iter_examples(300, seed=2024, size=64)]


def test_clean_renders_at_64_are_judged_right(examples_64):
    accuracy = _accuracy([(judge(image), spec) for image, spec in examples_64])
    assert min(accuracy.values()) >= 0.99, accuracy


def test_clean_renders_at_256_are_judged_right():
    pairs = [(judge(image), spec) for image, _, spec in shapes.iter_examples(40, seed=7, size=256)]
    accuracy = _accuracy(pairs)
    assert min(accuracy.values()) >= 0.99, accuracy


def test_blurred_noisy_renders_at_64_are_judged_right(examples_64):
    generator = torch.Generator().manual_seed(0)
    pairs = []
    for image, spec in examples_64:
        blurred = _to_tensor(image.filter(ImageFilter.GaussianBlur(1.0)))
        noisy = blurred + 0.1 * torch.randn(blurred.shape, generator=generator, dtype=torch.float64)
        pairs.append((judge(noisy.float()), spec))
    accuracy = _accuracy(pairs)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_noisy_then_blurred_colour_shifted_renders_are_judged_right(examples_64):
    generator = torch.Generator().manual_seed(1)
    pairs = []
    for image, spec in examples_64[:150]:
        noisy = _to_tensor(image) + 0.1 * torch.randn(3, 64, 64, generator=generator, dtype=torch.float64)
        shifted = noisy + 0.1 * (2 * torch.rand(3, 1, 1, generator=generator, dtype=torch.float64) - 1)
        pixels = ((shifted.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        pairs.append((judge(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1.0))), spec))
    accuracy = _accuracy(pairs)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_blurred_noisy_renders_at_256_are_judged_right():
    generator = torch.Generator().manual_seed(2)
    pairs = []
    for image, _, spec in shapes.iter_examples(20, seed=8, size=256):
        blurred = _to_tensor(image.filter(ImageFilter.GaussianBlur(4.0)))
        noise = torch.randn(blurred.shape, generator=generator, dtype=torch.float64)
        pairs.append((judge(blurred + 0.1 * noise), spec))
    accuracy = _accuracy(pairs)
    assert min(accuracy.values()) >= 0.95, accuracy


@pytest.mark.parametrize(
    "spec, centre",
    [
        (ShapeSpec("triangle", "red", "large", "top left", "white"), (0.25, 0.25 + 0.38 / 6)),
        (ShapeSpec("circle", "blue", "small", "bottom right", "black"), (0.75, 0.75)),
        (ShapeSpec("square", "yellow", "large", "center", "beige"), (0.5, 0.5)),
        (ShapeSpec("circle", "green", "large", "top right", "gray", dx=-0.02, scale=0.95), (0.73, 0.25)),
        (ShapeSpec("triangle", "purple", "small", "bottom left", "white", dy=0.02), (0.25, 0.77 + 0.2 / 6)),
        (ShapeSpec("square", "pink", "small", "top right", "black", scale=0.96), (0.75, 0.25)),
    ],
)
def test_hand_chosen_specs(spec, centre):
    judgement = judge(render(spec, 64))
    assert (judgement.shape, judgement.colour, judgement.size, judgement.position, judgement.background) == (
        spec.shape,
        spec.colour,
        spec.size,
        spec.position,
        spec.background,
    )
    assert judgement.centre == pytest.approx(centre, abs=0.01)
    assert judgement.extent == pytest.approx(spec.extent, rel=0.15)  # the smoothing blunts triangle tips
    assert judgement.colour_rgb == pytest.approx(shapes.COLOURS[spec.colour], abs=3)
    assert judgement.background_rgb == pytest.approx(shapes.BACKGROUNDS[spec.background], abs=1)
    assert judgement.blobs == 1 and judgement.colour_error < 3


@pytest.mark.parametrize("background", list(shapes.BACKGROUNDS))
def test_blank_images_hold_no_shape(background):
    blank = Image.new("RGB", (64, 64), shapes.BACKGROUNDS[background])
    judgement = judge(blank)
    assert not judgement.found
    assert (judgement.shape, judgement.colour, judgement.size, judgement.position) == (NONE,) * 4
    assert judgement.background == background
    noise = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert judge(_to_tensor(blank) + 0.1 * noise).shape == NONE


def test_specks_smaller_than_a_shape_are_not_a_shape():
    pixels = np.full((64, 64, 3), 255, dtype=np.uint8)
    pixels[10:13, 40:43] = shapes.COLOURS["red"]
    assert judge(pixels).shape == NONE


def test_the_largest_of_two_blobs_is_judged():
    big = np.array(render(ShapeSpec("square", "blue", "large", "bottom right", "white"), 64))
    small = np.array(render(ShapeSpec("circle", "red", "small", "top left", "white"), 64))
    both = np.where((small != 255).any(axis=-1, keepdims=True), small, big)
    judgement = judge(both)
    seen = (judgement.shape, judgement.colour, judgement.position, judgement.blobs)
    assert seen == ("square", "blue", "bottom right", 2)


def test_every_input_type_gives_the_same_judgement():
    image = render(ShapeSpec("triangle", "cyan", "small", "center", "black"), 64)
    from_pil = judge(image)
    assert judge(np.asarray(image)) == from_pil
    from_tensor = judge(_to_tensor(image).float())
    assert (from_tensor.shape, from_tensor.colour, from_tensor.position) == ("triangle", "cyan", "center")
    assert from_tensor.area == pytest.approx(from_pil.area, rel=1e-3)
    circle = render(ShapeSpec("circle", "red", "large", "center", "white"), 64)
    batch = torch.stack([_to_tensor(image), _to_tensor(circle)])
    assert [j.shape for j in judge_batch(batch.float())] == ["triangle", "circle"]


def test_sizes_that_are_not_a_multiple_of_64_are_judged():
    spec = ShapeSpec("square", "orange", "large", "bottom left", "gray")
    for size in (48, 96):
        judgement = judge(render(spec, size))
        assert judgement.agrees_with(spec) == dict.fromkeys(shapes.ATTRIBUTES, True), size


def test_agrees_with_checks_only_the_attributes_asked_for():
    judgement = judge(render(ShapeSpec("circle", "red", "small", "center", "white"), 64))
    asked = shapes.parse_prompt("a red square on a black background")
    assert judgement.agrees_with(asked) == {"shape": False, "colour": True, "background": False}
    assert judgement.agrees_with(PartialSpec()) == {}


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="square"):
        judge(np.zeros((64, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        judge(np.zeros((64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[3 x H x W\]"):
        judge(torch.zeros(1, 3, 64, 64))
    with pytest.raises(TypeError, match="PIL image"):
        judge([[0]])
    with pytest.raises(ValueError, match=r"\[N x 3 x H x W\]"):
        judge_batch(torch.zeros(3, 64, 64))
