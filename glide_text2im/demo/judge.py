"""A pixel judge for the shapes dataset: which shape, colour, size, position and background.

No model is involved. The image is box-downsampled to at most 64 x 64 and median-filtered
(3 x 3) against noise; the background is the median of the two-pixel border ring; a pixel's
"alpha" is its colour distance from the background relative to the shape's own distance,
ramped so that half-covered pixels count one half. The largest connected blob is the shape:

- colour: the named shape colour nearest to the median of the blob's fully covered pixels;
- shape: nearest prototype of (fill ratio of the bounding box, how far the centre of mass
  sits below the bounding-box centre): square (1, 0), circle (pi/4, 0), triangle (1/2, 1/6);
- size: the geometric mean of the bounding box's sides against the geometric mean of the
  nominal small and large extents;
- position: the named region whose centre is nearest to the bounding-box centre.

The bounding box is measured softly: its width is the sum over columns of the largest alpha
in each column (and likewise for the height), so it has sub-pixel precision.
"""

import dataclasses
import math
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from glide_text2im.demo.shapes import ATTRIBUTES, BACKGROUNDS, COLOURS, POSITIONS, SIZES, PartialSpec, ShapeSpec

NONE = "none"

WORK_SIZE = 64
# A pixel this far (Euclidean, uint8 RGB) from the background may belong to a shape.
CANDIDATE_DISTANCE = 50.0
# Smallest blob, as a fraction of the canvas, that counts as a shape.
MIN_AREA = 0.004
# alpha rises linearly from 0 to 1 between these fractions of the shape's colour distance.
ALPHA_RAMP = (0.3, 0.7)

# Prototype (area / (longest row x longest column), skewness of the mass along y) of each
# shape, as measured on dataset renders at 64 px after a Gaussian blur of 1 px (the ideal
# shapes give (1, 0), (pi/4, 0) and (1/2, -2 sqrt(2) / 5); blur rounds corners and tips).
SHAPE_FEATURES = {"circle": (0.79, 0.0), "square": (0.96, 0.0), "triangle": (0.62, -0.47)}
SKEW_WEIGHT = 1.0
LARGE_EXTENT = math.sqrt(SIZES["small"] * SIZES["large"])


@dataclasses.dataclass(frozen=True)
class Judgement:
    """What the judge sees; the shape attributes are "none" when no shape was found.

    ``area`` and ``extent`` are fractions of the canvas (area) and of its side (extent:
    geometric mean of the bounding box's sides); ``centre`` is the bounding-box centre
    (x, y); ``fill`` the area over the bounding box's area; ``colour_rgb`` and
    ``background_rgb`` are measured colours in uint8 units, ``colour_error`` the distance
    from ``colour_rgb`` to the named colour; ``blobs`` the number of blobs of at least
    ``MIN_AREA`` (1 for a clean image).
    """

    shape: str
    colour: str
    size: str
    position: str
    background: str
    area: float = 0.0
    extent: float = 0.0
    centre: Optional[Tuple[float, float]] = None
    fill: float = 0.0
    skew: float = 0.0
    colour_rgb: Optional[Tuple[float, float, float]] = None
    colour_error: float = 0.0
    background_rgb: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    blobs: int = 0

    @property
    def found(self) -> bool:
        return self.shape != NONE

    def agrees_with(self, wanted: Union[ShapeSpec, PartialSpec]) -> Dict[str, bool]:
        """For each attribute ``wanted`` names (not None), whether the judge saw it."""
        return {
            name: getattr(self, name) == getattr(wanted, name)
            for name in ATTRIBUTES
            if getattr(wanted, name) is not None
        }


def judge(image: Union[Image.Image, np.ndarray, torch.Tensor]) -> Judgement:
    """Judge one square RGB image: a PIL image, a uint8 array [H x W x 3] or a float tensor
    [3 x H x W] in [-1, 1]."""
    rgb = _smooth(_working_copy(_to_rgb(image)))
    side = rgb.shape[0]
    ring = np.concatenate([rgb[:2].reshape(-1, 3), rgb[-2:].reshape(-1, 3), rgb[:, :2].reshape(-1, 3), rgb[:, -2:].reshape(-1, 3)])
    background_rgb = np.median(ring, axis=0)
    background = _nearest(background_rgb, BACKGROUNDS)
    nothing = Judgement(NONE, NONE, NONE, NONE, background, background_rgb=_as_tuple(background_rgb))

    distance = np.linalg.norm(rgb - background_rgb, axis=-1)
    min_pixels = MIN_AREA * side * side
    candidates = distance > CANDIDATE_DISTANCE
    if candidates.sum() < min_pixels:
        return nothing
    shape_distance = np.percentile(distance[candidates], 75)
    low, high = ALPHA_RAMP
    alpha = np.clip((distance / shape_distance - low) / (high - low), 0.0, 1.0)

    labels = _components(alpha >= 0.5)
    pixels_per_label = np.bincount(labels.ravel())
    pixels_per_label[0] = 0
    blobs = int((pixels_per_label >= min_pixels).sum())
    if blobs == 0:
        return nothing
    blob = labels == pixels_per_label.argmax()
    alpha = alpha * _dilate(blob)

    coords = (np.arange(side) + 0.5) / side
    area = alpha.sum() / side**2
    # Longest column and row of the blob: its bounding box's height and width.
    height, width = alpha.sum(axis=0).max() / side, alpha.sum(axis=1).max() / side
    fill = area / (width * height)
    centre = (float(alpha.sum(axis=0) @ coords) / alpha.sum(), float(alpha.sum(axis=1) @ coords) / alpha.sum())
    rows = alpha.sum(axis=1) / alpha.sum()
    spread = coords - centre[1]
    skew = float(rows @ spread**3) / float(rows @ spread**2) ** 1.5
    shape = min(
        SHAPE_FEATURES,
        key=lambda name: math.hypot(fill - SHAPE_FEATURES[name][0], SKEW_WEIGHT * (skew - SHAPE_FEATURES[name][1])),
    )
    extent = math.sqrt(width * height)
    position = min(POSITIONS, key=lambda name: math.dist(centre, POSITIONS[name]))

    core = blob & (distance >= np.percentile(distance[blob], 75))
    colour_rgb = np.median(rgb[core], axis=0)
    colour = _nearest(colour_rgb, COLOURS)
    return Judgement(
        shape=shape,
        colour=colour,
        size="large" if extent >= LARGE_EXTENT else "small",
        position=position,
        background=background,
        area=float(area),
        extent=extent,
        centre=centre,
        fill=float(fill),
        skew=skew,
        colour_rgb=_as_tuple(colour_rgb),
        colour_error=float(np.linalg.norm(colour_rgb - np.array(COLOURS[colour]))),
        background_rgb=_as_tuple(background_rgb),
        blobs=blobs,
    )


def judge_batch(images: torch.Tensor) -> list:
    """Judge each image of a float tensor [N x 3 x H x W] in [-1, 1]; a list of Judgements."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"expected a tensor [N x 3 x H x W], got {getattr(images, 'shape', type(images))}")
    return [judge(image) for image in images]


def _to_rgb(image: Union[Image.Image, np.ndarray, torch.Tensor]) -> np.ndarray:
    """Any accepted input as float64 [H x W x 3] in [0, 255]."""
    if isinstance(image, Image.Image):
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 array [H x W x 3], got {image.dtype} {image.shape}")
        rgb = image.astype(np.float64)
    elif isinstance(image, torch.Tensor):
        if not image.is_floating_point() or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a float tensor [3 x H x W] in [-1, 1], got {image.dtype} {tuple(image.shape)}")
        scaled = (image.detach().to("cpu", torch.float64).clamp(-1, 1) + 1) * 127.5
        rgb = scaled.permute(1, 2, 0).numpy()
    else:
        raise TypeError(f"expected a PIL image, a uint8 array or a float tensor, got {type(image).__name__}")
    height, width = rgb.shape[:2]
    if height != width or height < 16:
        raise ValueError(f"expected a square image of side >= 16, got {height} x {width}")
    return rgb


def _working_copy(rgb: np.ndarray) -> np.ndarray:
    """Box-downsample to WORK_SIZE x WORK_SIZE when larger."""
    side = rgb.shape[0]
    if side <= WORK_SIZE:
        return rgb
    if side % WORK_SIZE == 0:
        factor = side // WORK_SIZE
        return rgb.reshape(WORK_SIZE, factor, WORK_SIZE, factor, 3).mean(axis=(1, 3))
    channels = [
        np.asarray(Image.fromarray(rgb[..., c].astype(np.float32), mode="F").resize((WORK_SIZE,) * 2, Image.BOX))
        for c in range(3)
    ]
    return np.stack(channels, axis=-1).astype(np.float64)


def _smooth(rgb: np.ndarray) -> np.ndarray:
    """Per-channel 3 x 3 binomial filter ([1, 2, 1] / 4 in both directions), edges replicated."""
    side = rgb.shape[0]
    padded = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    weights = (0.25, 0.5, 0.25)
    return sum(weights[i] * weights[j] * padded[i : i + side, j : j + side] for i in range(3) for j in range(3))


def _shifts(array: np.ndarray) -> list:
    """The array and its four 4-connected neighbours (zero outside)."""
    padded = np.pad(array, 1)
    return [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]


def _components(mask: np.ndarray) -> np.ndarray:
    """Label the 4-connected components of a boolean mask (0 = outside, labels > 0)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        spread = np.where(mask, np.maximum.reduce(_shifts(labels)), 0)
        if np.array_equal(spread, labels):
            return labels
        labels = spread


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a boolean mask by one pixel in all eight directions."""
    rows = np.maximum.reduce(_shifts(mask.astype(np.uint8))[:3])
    return np.maximum.reduce([rows, *_shifts(rows)[3:]]).astype(bool)


def _nearest(rgb: np.ndarray, palette: Dict[str, Tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.linalg.norm(rgb - np.array(palette[name]))))


def _as_tuple(rgb: np.ndarray) -> tuple:
    return tuple(float(v) for v in rgb)
