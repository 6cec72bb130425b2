import dataclasses
import itertools
import json
import random
import re

import numpy as np
import pytest

from glide_text2im.demo import shapes
from glide_text2im.demo.shapes import PartialSpec, ShapeSpec, caption, parse_prompt, render


def _words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def _attributes(spec):
    return {name: getattr(spec, name) for name in shapes.ATTRIBUTES}


def test_sample_spec_is_deterministic_and_covers_every_value():
    specs = [shapes.sample_spec(random.Random(seed)) for seed in range(1500)]
    assert specs[:20] == [shapes.sample_spec(random.Random(seed)) for seed in range(20)]
    for name, values in [
        ("shape", shapes.SHAPES),
        ("colour", shapes.COLOURS),
        ("size", shapes.SIZES),
        ("position", shapes.POSITIONS),
        ("background", shapes.BACKGROUNDS),
    ]:
        assert {getattr(spec, name) for spec in specs} == set(values)
    assert all(spec.background in shapes.backgrounds_for(spec.colour) for spec in specs)


def test_low_contrast_pairs_are_excluded():
    assert "gray" not in shapes.backgrounds_for("purple")
    assert "beige" not in shapes.backgrounds_for("pink")
    assert shapes.backgrounds_for("red") == ("white", "black", "gray", "beige", "yellow", "blue")
    assert "yellow" not in shapes.backgrounds_for("orange") and "blue" not in shapes.backgrounds_for("blue")
    for colour, background in itertools.product(shapes.COLOURS, shapes.BACKGROUNDS):
        contrast = np.linalg.norm(np.subtract(shapes.COLOURS[colour], shapes.BACKGROUNDS[background]))
        assert (background in shapes.backgrounds_for(colour)) == (contrast >= shapes.MIN_CONTRAST)


def test_shape_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        ShapeSpec("hexagon", "red", "small", "center", "white")
    with pytest.raises(ValueError, match="too close in colour"):
        ShapeSpec("circle", "purple", "small", "center", "gray")
    with pytest.raises(ValueError, match="POSITION_JITTER"):
        ShapeSpec("circle", "red", "small", "center", "white", dx=0.1)
    with pytest.raises(ValueError, match="SIZE_JITTER"):
        ShapeSpec("circle", "red", "small", "center", "white", scale=1.5)


def test_render_pixels_of_a_hand_checked_square():
    # extent 0.40 of 64 px = 25.6 px centred at 32: the square covers x in [19.2, 44.8].
    image = np.asarray(render(ShapeSpec("square", "red", "large", "center", "white"), 64))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image[32, 32].tolist() == [215, 25, 35]
    assert image[0, 0].tolist() == [255, 255, 255]
    # Column 19: three of the four sub-columns (19.375, 19.625, 19.875) are inside, so three
    # quarters of the red (82.5 rounds to the even 82).
    assert image[32, 19].tolist() == [225, 82, 90]
    assert image[32, 18].tolist() == [255, 255, 255]
    # Column 44 mirrors it: its first three sub-columns (up to 44.625) are inside.
    assert image[32, 43].tolist() == [215, 25, 35]
    assert image[32, 44].tolist() == [225, 82, 90]
    assert image[32, 45].tolist() == [255, 255, 255]


def test_render_areas_match_the_geometry():
    extent = shapes.SIZES["large"]
    for shape, area in [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)]:
        spec = ShapeSpec(shape, "blue", "large", "top right", "black")
        coverage = np.asarray(render(spec, 128))[..., 2].astype(np.float64) / 225.0
        assert coverage.mean() == pytest.approx(area * extent**2, rel=0.01)


def test_triangle_points_up_with_its_base_at_the_bottom():
    image = np.asarray(render(ShapeSpec("triangle", "green", "large", "center", "white"), 64))
    covered = (image != 255).any(axis=-1)
    widths = covered.sum(axis=1)
    rows = np.flatnonzero(widths)
    assert widths[rows[0]] <= 2 and widths[rows[-1]] >= 24
    assert np.all(np.diff(widths[rows]) >= 0)


@pytest.mark.parametrize("position", list(shapes.POSITIONS))
def test_shapes_never_touch_the_canvas_edge(position):
    jitter = shapes.POSITION_JITTER
    for shape, dx, dy in itertools.product(shapes.SHAPES, (-jitter, jitter), (-jitter, jitter)):
        spec = ShapeSpec(shape, "red", "large", position, "white", dx, dy, 1 + shapes.SIZE_JITTER)
        image = np.asarray(render(spec, 64))
        ring = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (ring == 255).all(), (shape, position, dx, dy)


def test_render_at_256_downsampled_matches_render_at_64():
    for seed in range(6):
        spec = shapes.sample_spec(random.Random(seed))
        small = np.asarray(render(spec, 64)).astype(np.float64)
        large = np.asarray(render(spec, 256).reduce(4)).astype(np.float64)
        assert np.abs(small - large).mean() < 0.6
        assert np.abs(small - large).max() <= 40


def test_render_is_deterministic():
    spec = shapes.sample_spec(random.Random(3))
    assert render(spec, 64).tobytes() == render(spec, 64).tobytes()


def test_captions_name_every_attribute_and_parse_back():
    rng = random.Random(0)
    for _ in range(400):
        spec = shapes.sample_spec(rng)
        for held_out in (False, True):
            text = caption(spec, rng, held_out=held_out)
            assert dataclasses.asdict(parse_prompt(text)) == _attributes(spec), text


def test_caption_examples():
    spec = ShapeSpec("circle", "orange", "large", "top left", "white")
    texts = {caption(spec, random.Random(seed)) for seed in range(200)}
    assert "a large orange circle in the top left on a white background" in texts
    assert "orange circle, large, top left, white background" in texts
    assert "top left: a big orange circle on white" in texts
    assert not any(" a orange" in text for text in texts)
    held_out = {caption(spec, random.Random(seed), held_out=True) for seed in range(200)}
    assert "an image of a large orange circle in the top left over white" in held_out


def test_held_out_templates_carry_a_word_no_training_caption_can_contain():
    training_words = set().union(*(_words(template) for template in shapes.TRAIN_TEMPLATES))
    phrases = [phrase for options in shapes.SCRAMBLED_PHRASES.values() for phrase in options]
    training_words |= set().union(*(_words(phrase) for phrase in phrases))
    training_words |= set().union(*(_words(word) for word in shapes.FILLER_WORDS))
    vocabulary = set().union(*(_words(word) for words in shapes.SYNONYMS.values() for word in words))
    names = [*shapes.SHAPES, *shapes.COLOURS, *shapes.BACKGROUNDS]
    vocabulary |= set().union(*(_words(name) for name in names))
    vocabulary |= _words(" ".join(shapes.POSITIONS)) | {"shape"}
    for template, marker in zip(shapes.HELD_OUT_TEMPLATES, shapes.HELD_OUT_MARKERS):
        assert marker in _words(re.sub(r"\[[^\]]*\]", "", template))
        assert marker not in training_words | vocabulary


def test_held_out_captions_never_equal_training_captions():
    rng = random.Random(1)
    train, held_out = set(), set()
    for _ in range(3000):
        spec = shapes.sample_spec(rng)
        omit = [name for name in shapes.ATTRIBUTES if rng.random() < 0.3]
        train.add(caption(spec, rng, omit=omit))
        held_out.add(caption(spec, rng, held_out=True, omit=omit))
    assert len(held_out) > 1000 and not train & held_out


def test_scrambled_captions_name_every_attribute_in_any_order():
    rng = random.Random(2)
    first_attribute = set()
    for _ in range(2000):
        spec = shapes.sample_spec(rng)
        text = shapes.scrambled_caption(spec, rng)
        assert dataclasses.asdict(parse_prompt(text)) == _attributes(spec), text
        assert not _words(text) & set(shapes.HELD_OUT_MARKERS), text
        found = parse_prompt(text)
        first_attribute.add(min(shapes.ATTRIBUTES, key=lambda name: _first_index(text, getattr(found, name))))
    assert first_attribute == set(shapes.ATTRIBUTES)  # every attribute sometimes leads
    spec = ShapeSpec("square", "cyan", "small", "bottom right", "black")
    assert shapes.scrambled_caption(spec, random.Random(5)) == shapes.scrambled_caption(spec, random.Random(5))
    text = shapes.scrambled_caption(spec, random.Random(0), omit=("shape", "colour"))
    assert parse_prompt(text) == PartialSpec(size="small", position="bottom right", background="black"), text
    assert "shape" in _words(text)
    with pytest.raises(ValueError, match="unknown attributes"):
        shapes.scrambled_caption(spec, random.Random(0), omit=("hue",))


def test_every_background_cue_has_a_scrambled_phrase():
    # held-out templates use cues the training templates do not: the scrambled phrases teach them all
    phrases = shapes.SCRAMBLED_PHRASES["background"]
    for cue in shapes.BACKGROUND_CUES_BEFORE:
        assert any(phrase.endswith(f"{cue} {{}}") for phrase in phrases), cue
    for cue in shapes.BACKGROUND_CUES_AFTER:
        assert any(phrase.startswith(f"{{}} {cue}") for phrase in phrases), cue
    unused_by_templates = ("over", "field", "scene")
    assert not any(cue in template for template in shapes.TRAIN_TEMPLATES for cue in unused_by_templates)


def _first_index(text, value):
    """Where the first word naming ``value`` starts in ``text``."""
    words = shapes.SYNONYMS.get(value, (value,))
    return min(text.find(word) for word in words if word in text)


def test_scrambled_prob_mixes_scrambled_and_template_captions():
    texts = [text for _, text, _ in shapes.iter_examples(200, seed=3, size=8, scrambled_prob=0.5)]
    plain = [text for _, text, _ in shapes.iter_examples(200, seed=3, size=8)]
    changed = sum(a != b for a, b in zip(texts, plain))
    assert 70 <= changed <= 130, changed
    with pytest.raises(ValueError, match="scrambled_prob"):
        list(shapes.iter_examples(1, seed=0, scrambled_prob=-0.1))


def test_partial_captions_leave_out_the_omitted_attributes():
    spec = ShapeSpec("square", "cyan", "small", "bottom right", "black")
    for seed in range(30):
        text = caption(spec, random.Random(seed), omit=("colour", "background", "shape"))
        assert parse_prompt(text) == PartialSpec(size="small", position="bottom right"), text
        assert "shape" in _words(text)
    text = caption(PartialSpec(colour="pink"), random.Random(0), held_out=True)
    assert parse_prompt(text) == PartialSpec(colour="pink")
    with pytest.raises(ValueError, match="unknown attributes"):
        caption(spec, random.Random(0), omit=("hue",))


def test_training_caption_states_what_its_caption_says():
    rng = random.Random(5)
    omitted = 0
    for _ in range(300):
        spec = shapes.sample_spec(rng)
        text, stated = shapes.training_caption(spec, rng, partial_prob=0.5, scrambled_prob=0.5)
        assert parse_prompt(text) == stated, text
        assert all(value in (None, getattr(spec, name)) for name, value in dataclasses.asdict(stated).items())
        omitted += None in dataclasses.asdict(stated).values()
    assert 110 <= omitted <= 190, omitted
    with pytest.raises(ValueError, match="partial_prob must lie in"):
        shapes.training_caption(spec, rng, partial_prob=1.5)


def test_parse_prompt_reads_free_text():
    assert parse_prompt("Draw a BIG Orange triangle in the upper-left corner, grey backdrop") == PartialSpec(
        "triangle", "orange", "large", "top left", "gray"
    )
    assert parse_prompt("little squares in the middle") == PartialSpec(size="small", position="center")
    assert parse_prompt("a red circle over white") == PartialSpec("circle", "red", None, None, "white")
    assert parse_prompt("an armchair in the shape of an avocado") == PartialSpec()
    with pytest.raises(TypeError):
        parse_prompt(None)


def test_parse_prompt_reads_yellow_and_blue_as_the_background_only_beside_a_cue():
    blue_on_yellow = PartialSpec("triangle", "blue", None, None, "yellow")
    assert parse_prompt("a blue triangle on a yellow background") == blue_on_yellow
    yellow_on_blue = PartialSpec("triangle", "yellow", None, None, "blue")
    assert parse_prompt("a yellow triangle on a blue background") == yellow_on_blue
    assert parse_prompt("the background is blue, the circle is yellow") == PartialSpec(
        "circle", "yellow", None, None, "blue"
    )
    assert parse_prompt("yellow scene showing a blue square") == PartialSpec("square", "blue", None, None, "yellow")
    assert parse_prompt("blue on yellow") == PartialSpec(colour="blue", background="yellow")
    assert parse_prompt("a square with yellow all around") == PartialSpec(shape="square", background="yellow")
    # Without a cue a shape colour is the shape's, a background-only colour the background's.
    assert parse_prompt("yellow black circle") == PartialSpec(shape="circle", colour="yellow", background="black")
    # Red is no background colour: a red background is not read at all.
    assert parse_prompt("a blue circle on a red background") == PartialSpec(shape="circle", colour="blue")


def test_no_random_filler_is_a_background_cue():
    rng = random.Random(0)
    fillers = {shapes._filler(rng) for _ in range(20000)}
    cues = (*shapes.BACKGROUND_CUES_BEFORE, *shapes.BACKGROUND_CUES_AFTER)
    cue_words = {word for cue in cues for word in cue.split()}
    assert not fillers & cue_words
    assert {"on", "is"} <= shapes._RESERVED_WORDS


def test_iter_examples_is_deterministic_and_prefix_stable():
    first = list(shapes.iter_examples(6, seed=7, size=32))
    again = list(shapes.iter_examples(3, seed=7, size=32))
    for (image, text, spec), (image2, text2, spec2) in zip(first, again):
        assert (image.tobytes(), text, spec) == (image2.tobytes(), text2, spec2)
        assert image.size == (32, 32)
        assert dataclasses.asdict(parse_prompt(text)) == _attributes(spec)
    other = [text for _, text, _ in shapes.iter_examples(6, seed=8, size=32)]
    assert other != [text for _, text, _ in first]


def test_partial_prob_one_omits_something_but_keeps_something():
    for _, text, spec in shapes.iter_examples(40, seed=0, size=16, partial_prob=1.0):
        asked = {name: value for name, value in dataclasses.asdict(parse_prompt(text)).items() if value}
        assert 0 < len(asked) < len(shapes.ATTRIBUTES), text
        assert all(getattr(spec, name) == value for name, value in asked.items())


def test_generate_dataset_layout_and_byte_identical_reruns(tmp_path):
    first = shapes.generate_dataset(tmp_path / "a", n=3, seed=5, sizes=(32, 64))
    second = shapes.generate_dataset(tmp_path / "b", n=3, seed=5, sizes=(32, 64))
    names = sorted(path.name for path in first.iterdir())
    assert names == [
        "00000.txt", "00000_32.png", "00000_64.png",
        "00001.txt", "00001_32.png", "00001_64.png",
        "00002.txt", "00002_32.png", "00002_64.png",
        "specs.jsonl",
    ]  # fmt: skip
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in names)

    records = [json.loads(line) for line in (first / "specs.jsonl").read_text().splitlines()]
    examples = list(shapes.iter_examples(3, seed=5, size=64))
    for index, (record, (image, text, spec)) in enumerate(zip(records, examples)):
        assert ShapeSpec(**record["spec"]) == spec
        assert record["caption"] == text == (first / f"{index:05d}.txt").read_text()
        with shapes.Image.open(first / f"{index:05d}_64.png") as saved:
            assert saved.mode == "RGB" and saved.tobytes() == image.tobytes()

    third = shapes.generate_dataset(tmp_path / "c", n=3, seed=6, sizes=(32,))
    assert (third / "00000_32.png").read_bytes() != (first / "00000_32.png").read_bytes()


def test_generate_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must"):
        shapes.generate_dataset(tmp_path, n=-1, seed=0)
    with pytest.raises(ValueError, match="sizes"):
        shapes.generate_dataset(tmp_path, n=1, seed=0, sizes=())
    with pytest.raises(ValueError, match="partial_prob"):
        list(shapes.iter_examples(1, seed=0, partial_prob=2.0))
