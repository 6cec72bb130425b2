"""Shared pieces of the training tests: tiny models and a handful of drawn captioned images."""

import contextlib
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch
from PIL import Image, ImageDraw

# A U-Net small enough to train a few hundred steps on a CPU in seconds: 16 x 16 images,
# two levels of 32 channels, one res block per level, a one-layer text transformer over
# byte tokens.
TINY_UNET_OPTIONS: Dict[str, object] = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,1",
    num_head_channels=16,
    attention_resolutions="2",
    dropout=0.0,
    text_ctx=16,
    xf_width=32,
    xf_layers=1,
    xf_heads=1,
    tokenizer="byte",
)

# A noised CLIP of the same scale (the vocabulary must hold the CLIP BPE's 49408 ids).
TINY_CLIP_OPTIONS: Dict[str, object] = dict(
    image_size=16,
    patch_size=4,
    n_embd=32,
    n_head_state_text=16,
    n_head_text=2,
    n_xf_blocks_text=1,
    n_head_state_image=16,
    n_head_image=2,
    n_xf_blocks_image=1,
    max_text_len=16,
    n_vocab=49408,
)

SHAPES = [
    ("a red square", "square", (220, 30, 30), (255, 255, 255)),
    ("a blue circle", "circle", (30, 60, 220), (240, 240, 200)),
    ("a green triangle", "triangle", (30, 170, 60), (40, 40, 40)),
    ("a yellow bar", "bar", (240, 220, 40), (120, 120, 120)),
]


def draw_shape(shape: str, fg: Tuple[int, int, int], bg: Tuple[int, int, int], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    s = size
    if shape == "square":
        draw.rectangle([s * 0.25, s * 0.25, s * 0.75, s * 0.75], fill=fg)
    elif shape == "circle":
        draw.ellipse([s * 0.2, s * 0.2, s * 0.8, s * 0.8], fill=fg)
    elif shape == "triangle":
        draw.polygon([(s * 0.5, s * 0.15), (s * 0.85, s * 0.85), (s * 0.15, s * 0.85)], fill=fg)
    else:
        draw.rectangle([s * 0.1, s * 0.4, s * 0.9, s * 0.6], fill=fg)
    return image


def shape_images(size: int = 16) -> List[Tuple[Image.Image, str]]:
    """Four (image, caption) pairs: one coloured shape each on its own background."""
    return [(draw_shape(shape, fg, bg, size), caption) for caption, shape, fg, bg in SHAPES]


def write_image_folder(root: Path, size: int = 16) -> Path:
    """The shape images as ``root/<i>.png`` + ``root/<i>.txt`` (in two subfolders)."""
    for i, (image, caption) in enumerate(shape_images(size)):
        folder = root / ("a" if i % 2 == 0 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption + "\n", encoding="utf-8")
    return root


def option_args(options: Dict[str, object]) -> List[str]:
    """``--option key=value`` command-line arguments for an options dict."""
    args: List[str] = []
    for key, value in options.items():
        args += ["--option", f"{key}={value}"]
    return args


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread: for these tiny models, thread hand-offs on a shared CPU cost
    more than the arithmetic."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
