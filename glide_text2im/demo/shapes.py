"""A procedural captioned dataset: one coloured shape on a plain background.

Every image shows a single axis-aligned circle, square or upward triangle of one of eight
named colours, small or large, centred on one of five named regions of the canvas, over a
plain background of one of six named colours (two of them, yellow and blue, also shape
colours). The bounding box of every shape is an
``extent x extent`` square (the canvas is the unit square) centred on its region's centre,
so a shape never leaves the canvas. Small random offsets and scales (``dx``, ``dy``,
``scale``) vary the pixels without changing any named attribute.

Captions come from templates. The training templates and the held-out templates share the
attribute words but no caption can be written by both: every held-out template carries a
word that no training template uses (see ``HELD_OUT_MARKERS``). Training captions may also be
scrambled (``scrambled_caption``): the attribute phrases in random order among filler words.

Everything is deterministic: specs and captions are drawn from a ``random.Random`` the
caller passes in, and ``iter_examples`` / ``generate_dataset`` derive one such generator
per example from ``(seed, index)``.
"""

import dataclasses
import json
import numbers
import random
import re
from pathlib import Path
from typing import Collection, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

ATTRIBUTES = ("shape", "colour", "size", "position", "background")

SHAPES = ("circle", "square", "triangle")

COLOURS = {
    "red": (215, 25, 35),
    "orange": (245, 125, 15),
    "yellow": (245, 230, 40),
    "green": (40, 170, 60),
    "cyan": (20, 200, 220),
    "blue": (30, 80, 225),
    "purple": (150, 40, 170),
    "pink": (245, 130, 190),
}
BACKGROUNDS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "beige": (235, 220, 190),
    "yellow": COLOURS["yellow"],
    "blue": COLOURS["blue"],
}
# A colour word names the background when one of these comes just before it ("on yellow",
# "the background is yellow") or just after it ("a yellow backdrop", "yellow all around");
# otherwise it names the shape's colour if it can (white, black, gray and beige cannot).
BACKGROUND_CUES_BEFORE = ("on", "over", "background is")
BACKGROUND_CUES_AFTER = ("background", "backdrop", "field", "scene", "all around")
# A shape colour is only drawn on backgrounds at least this far away (Euclidean, uint8 RGB).
MIN_CONTRAST = 110.0

# Nominal extent (side of the bounding box, as a fraction of the canvas side) per size. At
# 0.2 (13 px at 64 px) the demo base drew small squares and triangles with corners so round
# that 14 of 33 read as circles (3 of 31 large ones).
SIZES = {"small": 0.26, "large": 0.40}

# Centre of each named region, (x, y) with y pointing down, as fractions of the canvas.
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}

# The names each attribute can take, in ``ATTRIBUTES`` order.
ATTRIBUTE_VALUES: Dict[str, Tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "background": tuple(BACKGROUNDS),
}

# Largest offset of the centre (canvas fractions) and relative change of the extent.
POSITION_JITTER = 0.02
SIZE_JITTER = 0.05

SUPERSAMPLING = 4

# Words a caption may use for each attribute value, the canonical name first.
SYNONYMS = {
    "large": ("large", "big"),
    "small": ("small", "little"),
    "center": ("center", "middle", "centre"),
    "top left": ("top left", "upper left"),
    "top right": ("top right", "upper right"),
    "bottom left": ("bottom left", "lower left"),
    "bottom right": ("bottom right", "lower right"),
    "gray": ("gray", "grey"),
}

# Templates: a segment in [...] holds one attribute and is dropped when that attribute is
# omitted; an omitted shape is written as "shape".
TRAIN_TEMPLATES = (
    "a[ {size}][ {colour}] {shape}[ in the {position}][ on a {background} background]",
    "[{colour} ]{shape}[, {size}][, {position}][, {background} background]",
    "[{background} background with ]a[ {size}][ {colour}] {shape}[ in the {position}]",
    "there is a[ {size}][ {colour}] {shape}[ in the {position}][, the background is {background}]",
    "a[ {size}][ {colour}] {shape}[ at the {position}][ against a {background} backdrop]",
    "[{position}: ]a[ {size}][ {colour}] {shape}[ on {background}]",
    "a picture of a[ {size}][ {colour}] {shape}[ in the {position}][ on a {background} background]",
    "draw a[ {size}][ {colour}] {shape}[ in the {position}][, {background} background]",
    "a drawing of a[ {colour}] {shape}[ that is {size}][, placed in the {position}][, on {background}]",
    "an illustration of a[ {size}][ {colour}] {shape}[ in the {position}][ on a {background} background]",
    "the {shape}[ is {colour}][, it is {size}][, it sits in the {position}][, the background is {background}]",
    "[on a {background} background, ]a[ {size}][ {colour}] {shape}[ appears in the {position}]",
    "a {shape}[ coloured {colour}][, {size} in size][, located in the {position}][, with a {background} background]",
    "a rendering of a[ {size}][ {colour}] {shape}[ positioned at the {position}][ with {background} all around]",
    "simple flat art: a[ {size}][ {colour}] {shape}[ in the {position}][ on a {background} background]",
    "[{size} ][{colour} ]{shape}[ {position}][ on {background}]",
    "[{background} backdrop, ]a[ {colour}] {shape}[ of {size} size][ at the {position}]",
)
HELD_OUT_TEMPLATES = (
    "an image of a[ {size}][ {colour}] {shape}[ in the {position}][ over {background}]",
    "[{position}: ]one[ {size}][ {colour}] {shape}[ on a plain {background} field]",
    "[{background} scene ]showing a[ {colour}] {shape}[ ({size})][ near the {position}]",
)
# One word outside the optional segments of each held-out template that no training
# template contains: no held-out caption can equal a training caption.
HELD_OUT_MARKERS = ("image", "one", "showing")

# Scrambled training captions (``scrambled_caption``): each attribute as one of its phrases,
# the phrases in random order with filler words between them, half of the fillers random
# strings of letters. They teach a text encoder to find the attribute words wherever they are
# and to pass over words it has never seen; one trained on the templates alone read "an image
# of a red circle" as orange. No filler is an attribute word, a background cue or a held-out
# marker. Every background phrase carries a cue, and every cue has a phrase: the templates use
# only some of the cues (the held-out ones use others), and an encoder that never saw "over
# yellow" read it as a yellow shape. ("the background is", not "background is": a colour just
# before "background" would be read as the background.)
SCRAMBLED_PHRASES = {
    "shape": ("{}",),
    "colour": ("{}", "{} coloured", "in {}"),
    "size": ("{}", "{} sized", "of {} size"),
    "position": ("in the {}", "at the {}", "{}", "placed {}"),
    "background": ("on {}", "over {}", "the background is {}", "{} background", "{} backdrop", "{} field",
                   "{} scene", "{} all around", "on a {} background"),
}  # fmt: skip
FILLER_WORDS = ("a", "an", "the", "with", "and", "of", "this", "just", "simple", "flat", "drawn", "picture",
                "art", "here", "very", "nice", "some", "thing", "see", "look", ",", ":", ";", "-")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """Everything that determines an image: the named attributes and the small jitter.

    ``dx`` and ``dy`` move the centre (canvas fractions, at most ``POSITION_JITTER``),
    ``scale`` multiplies the nominal extent (within ``1 +- SIZE_JITTER``).
    """

    shape: str
    colour: str
    size: str
    position: str
    background: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        _check_name("shape", self.shape, SHAPES)
        _check_name("colour", self.colour, COLOURS)
        _check_name("size", self.size, SIZES)
        _check_name("position", self.position, POSITIONS)
        _check_name("background", self.background, BACKGROUNDS)
        if self.background not in backgrounds_for(self.colour):
            raise ValueError(
                f"a {self.colour} shape is too close in colour to a {self.background} background"
            )
        if max(abs(self.dx), abs(self.dy)) > POSITION_JITTER + 1e-12:
            raise ValueError(f"offset ({self.dx}, {self.dy}) exceeds POSITION_JITTER={POSITION_JITTER}")
        if abs(self.scale - 1.0) > SIZE_JITTER + 1e-12:
            raise ValueError(f"scale {self.scale} is outside 1 +- SIZE_JITTER={SIZE_JITTER}")

    @property
    def centre(self) -> Tuple[float, float]:
        """Centre of the bounding box, (x, y) as fractions of the canvas side."""
        x, y = POSITIONS[self.position]
        return x + self.dx, y + self.dy

    @property
    def extent(self) -> float:
        """Side of the (square) bounding box as a fraction of the canvas side."""
        return SIZES[self.size] * self.scale


@dataclasses.dataclass(frozen=True)
class PartialSpec:
    """The attributes a prompt asks for; None where it does not say."""

    shape: Optional[str] = None
    colour: Optional[str] = None
    size: Optional[str] = None
    position: Optional[str] = None
    background: Optional[str] = None


def _check_name(attribute: str, value: str, allowed: Collection[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {attribute} {value!r}; expected one of {sorted(allowed)}")


def backgrounds_for(colour: str) -> Tuple[str, ...]:
    """The background names a ``colour`` shape may be drawn on (contrast >= MIN_CONTRAST)."""
    _check_name("colour", colour, COLOURS)
    rgb = np.array(COLOURS[colour], dtype=np.float64)
    return tuple(
        name for name, bg in BACKGROUNDS.items() if np.linalg.norm(rgb - np.array(bg)) >= MIN_CONTRAST
    )


def sample_spec(rng: random.Random) -> ShapeSpec:
    """Draw uniform attributes (the background among those that suit the colour) and jitter."""
    shape = rng.choice(SHAPES)
    colour = rng.choice(list(COLOURS))
    size = rng.choice(list(SIZES))
    position = rng.choice(list(POSITIONS))
    background = rng.choice(backgrounds_for(colour))
    dx = rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    scale = rng.uniform(1.0 - SIZE_JITTER, 1.0 + SIZE_JITTER)
    return ShapeSpec(shape, colour, size, position, background, dx, dy, scale)


def caption(
    spec: Union[ShapeSpec, PartialSpec],
    rng: random.Random,
    held_out: bool = False,
    omit: Collection[str] = (),
) -> str:
    """Describe ``spec`` with a random template (held-out or training) and random synonyms.

    Attributes named in ``omit``, and those a PartialSpec leaves None, are left out.
    """
    _check_omit(omit)
    template = rng.choice(HELD_OUT_TEMPLATES if held_out else TRAIN_TEMPLATES)
    words = {}
    for name in ATTRIBUTES:
        value = getattr(spec, name)
        words[name] = None if name in omit or value is None else rng.choice(SYNONYMS.get(value, (value,)))
    if words["shape"] is None:
        words["shape"] = "shape"
    return _fill(template, words)


def scrambled_caption(spec: Union[ShapeSpec, PartialSpec], rng: random.Random, omit: Collection[str] = ()) -> str:
    """Describe ``spec`` without a template: its attributes' phrases (``SCRAMBLED_PHRASES``,
    random synonyms) in random order, each after 0 to 2 random ``FILLER_WORDS``.

    Attributes named in ``omit``, and those a PartialSpec leaves None, are left out; an
    omitted shape is written as "shape".
    """
    _check_omit(omit)
    phrases = []
    for name in ATTRIBUTES:
        value = getattr(spec, name)
        if name in omit or value is None:
            if name == "shape":
                phrases.append("shape")
            continue
        word = rng.choice(SYNONYMS.get(value, (value,)))
        phrases.append(rng.choice(SCRAMBLED_PHRASES[name]).format(word))
    rng.shuffle(phrases)
    words = []
    for phrase in phrases:
        words += [_filler(rng) for _ in range(rng.randint(0, 2))]
        words.append(phrase)
    return " ".join(words)


# Words a random filler must not be: the attribute words, "shape", the background cues and the
# held-out markers.
_RESERVED_WORDS = frozenset(
    word
    for value in (*SHAPES, *COLOURS, *SIZES, *POSITIONS, *BACKGROUNDS, "shape", *HELD_OUT_MARKERS)
    for synonym in SYNONYMS.get(value, (value,))
    for word in synonym.split()
) | frozenset(word for cue in (*BACKGROUND_CUES_BEFORE, *BACKGROUND_CUES_AFTER) for word in cue.split())


def _filler(rng: random.Random) -> str:
    """A ``FILLER_WORDS`` word or, half of the time, 2 to 8 random letters that are neither an
    attribute word nor a held-out marker."""
    if rng.random() < 0.5:
        return rng.choice(FILLER_WORDS)
    while True:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
        if word not in _RESERVED_WORDS:
            return word


def _check_omit(omit: Collection[str]) -> None:
    unknown = set(omit) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"cannot omit unknown attributes {sorted(unknown)}; expected some of {ATTRIBUTES}")


def _fill(template: str, words: dict) -> str:
    def segment(match: "re.Match") -> str:
        text = match.group(1)
        (name,) = re.findall(r"\{(\w+)\}", text)
        return "" if words[name] is None else text

    text = re.sub(r"\[([^\[\]]*)\]", segment, template).format(**words)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _omitted(rng: random.Random, partial_prob: float) -> Tuple[str, ...]:
    """With probability ``partial_prob`` keep a random 1 to 4 of the five attributes."""
    if rng.random() >= partial_prob:
        return ()
    kept = rng.sample(ATTRIBUTES, rng.randint(1, len(ATTRIBUTES) - 1))
    return tuple(name for name in ATTRIBUTES if name not in kept)


def render(spec: ShapeSpec, size: int) -> Image.Image:
    """Draw ``spec`` as a ``size x size`` RGB image, anti-aliased by 4x4 supersampling.

    Coverage is measured at the pixel centres of a 4x larger grid and box-averaged, so a
    256 px render box-downsampled to 64 px closely matches the 64 px render.
    """
    if not isinstance(size, numbers.Integral) or size < 8:
        raise ValueError(f"size must be an int >= 8, got {size!r}")
    size = int(size)
    fine = size * SUPERSAMPLING
    coords = (np.arange(fine, dtype=np.float64) + 0.5) / fine
    x, y = coords[None, :], coords[:, None]
    cx, cy = spec.centre
    half = spec.extent / 2
    if spec.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif spec.shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:
        # Apex at the top centre of the bounding box, base along its bottom edge.
        inside = (y <= cy + half) & (np.abs(x - cx) <= (y - (cy - half)) / 2)
    coverage = inside.reshape(size, SUPERSAMPLING, size, SUPERSAMPLING).mean(axis=(1, 3))
    background = np.array(BACKGROUNDS[spec.background], dtype=np.float64)
    colour = np.array(COLOURS[spec.colour], dtype=np.float64)
    pixels = background + coverage[..., None] * (colour - background)
    return Image.fromarray(np.round(pixels).astype(np.uint8), mode="RGB")


def parse_prompt(text: str) -> PartialSpec:
    """Find the attribute words in free text (synonyms included); None for those absent.

    A colour word is the background's when a ``BACKGROUND_CUES_BEFORE`` / ``_AFTER`` phrase
    stands next to it, else the shape's (if it is a shape colour). The first shape colour and
    the first background colour win; so does the first word (or phrase) of each other attribute.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    words = re.sub(r"[^a-z]+", " ", text.lower()).split()
    normalised = " " + " ".join(words) + " "
    found = {}
    for name in ("shape", "size", "position"):
        hits = []
        for value in ATTRIBUTE_VALUES[name]:
            for word in SYNONYMS.get(value, (value,)):
                index = normalised.find(f" {word} ")
                if index >= 0:
                    hits.append((index, value))
        found[name] = min(hits)[1] if hits else None
    found["colour"], found["background"] = _colour_and_background(words)
    return PartialSpec(**found)


# Every word that names a shape or background colour (synonyms included) -> that colour.
_COLOUR_WORDS = {word: value for value in (*COLOURS, *BACKGROUNDS) for word in SYNONYMS.get(value, (value,))}


def _colour_and_background(words: Sequence[str]) -> Tuple[Optional[str], Optional[str]]:
    """The first shape colour and the first background colour named in ``words``."""
    colour = background = None
    for index, word in enumerate(words):
        value = _COLOUR_WORDS.get(word)
        if value is None:
            continue
        before = " " + " ".join(words[max(0, index - 2) : index])
        after = " ".join(words[index + 1 : index + 3]) + " "
        cued = any(before.endswith(" " + cue) for cue in BACKGROUND_CUES_BEFORE) or any(
            after.startswith(cue + " ") for cue in BACKGROUND_CUES_AFTER
        )
        if cued or value not in COLOURS:
            if background is None and value in BACKGROUNDS:
                background = value
        elif colour is None:
            colour = value
    return colour, background


def iter_examples(
    n: int, seed: int, size: int = 64, partial_prob: float = 0.0, scrambled_prob: float = 0.0
) -> Iterator[Tuple[Image.Image, str, ShapeSpec]]:
    """Yield ``n`` (image, training caption, spec) triples, example ``i`` fixed by (seed, i).

    ``partial_prob`` is the chance that a caption leaves some attributes out, ``scrambled_prob``
    the chance that it is a ``scrambled_caption`` rather than a training template's.
    """
    for index in range(_check_count(n)):
        spec, text = _example(seed, index, partial_prob, scrambled_prob)
        yield render(spec, size), text, spec


def generate_dataset(
    out_dir: Union[str, Path],
    n: int,
    seed: int,
    sizes: Sequence[int] = (64, 256),
    partial_prob: float = 0.0,
    scrambled_prob: float = 0.0,
) -> Path:
    """Write ``n`` examples to ``out_dir``; the same arguments give byte-identical files.

    Layout, for example ``i`` written as five digits ``NNNNN``::

        NNNNN.txt          the caption (UTF-8, no newline)
        NNNNN_{size}.png   the image at each of ``sizes``
        specs.jsonl        line i: {"caption": ..., "spec": {ShapeSpec fields}}
    """
    if not sizes:
        raise ValueError("sizes must name at least one image size")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(_check_count(n)):
        spec, text = _example(seed, index, partial_prob, scrambled_prob)
        stem = f"{index:05d}"
        (out_dir / f"{stem}.txt").write_text(text, encoding="utf-8")
        for size in sizes:
            render(spec, size).save(out_dir / f"{stem}_{size}.png")
        lines.append(json.dumps({"caption": text, "spec": dataclasses.asdict(spec)}, sort_keys=True))
    (out_dir / "specs.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return out_dir


def _check_count(n: int) -> int:
    if not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return int(n)


def training_caption(
    spec: ShapeSpec, rng: random.Random, partial_prob: float = 0.0, scrambled_prob: float = 0.0
) -> Tuple[str, PartialSpec]:
    """A training caption of ``spec`` and what it states (None for the attributes it leaves out).

    ``partial_prob`` is the chance that the caption leaves some attributes out,
    ``scrambled_prob`` the chance that it is a ``scrambled_caption`` rather than a training
    template's.
    """
    for name, prob in (("partial_prob", partial_prob), ("scrambled_prob", scrambled_prob)):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {prob}")
    omit = _omitted(rng, partial_prob)
    if rng.random() < scrambled_prob:
        text = scrambled_caption(spec, rng, omit=omit)
    else:
        text = caption(spec, rng, omit=omit)
    stated = PartialSpec(**{name: None if name in omit else getattr(spec, name) for name in ATTRIBUTES})
    return text, stated


def _example(seed: int, index: int, partial_prob: float, scrambled_prob: float) -> Tuple[ShapeSpec, str]:
    rng = random.Random(f"glide_text2im.demo.shapes/{seed}/{index}")
    spec = sample_spec(rng)
    text, _ = training_caption(spec, rng, partial_prob, scrambled_prob)
    return spec, text
