"""A pixel judge for the shapes dataset: which shape, colour, size, position and background.

No model is involved. The image is box-downsampled to at most 64 x 64 and smoothed with a
3 x 3 binomial filter against noise. The background colour is the median of the two-pixel
border ring. A pixel's alpha is its colour distance from the background relative to the
shape's own distance (a high percentile of the distances of clearly non-background pixels),
ramped so that a half-covered pixel counts about one half. The largest 4-connected blob of
pixels with alpha >= 1/2 (grown by one pixel to keep its soft edge) is the shape:

- colour: the named shape colour nearest to the median of the blob's most distant quarter
  of pixels (the purest ones; edge pixels are mixed with the background);
- shape: the nearest prototype of two features: area / (longest column x longest row), the
  largest sums of alpha down a column and along a row, which for these axis-aligned shapes
  is the bounding box's fill ratio (square 1, circle pi/4, triangle 1/2) but, unlike a
  thresholded bounding box, barely changes under blur and noise; and the skewness of the
  mass along y (0 for the symmetric shapes, negative for the upward triangle);
- size: the geometric mean of the longest column and row (the bounding box's sides; a
  triangle reads 5-12% small as the smoothing blunts its tip) against the geometric mean of
  the nominal small and large extents;
- position: the named region whose centre is nearest to the centre of mass.
"""

import dataclasses
import math
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

from glide_text2im.demo.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SIZES,
    PartialSpec,
    ShapeSpec,
)

NONE = "none"

WORK_SIZE = 64
# A pixel this far (Euclidean, uint8 RGB) from the background may belong to a shape.
CANDIDATE_DISTANCE = 50.0
# Smallest blob, as a fraction of the canvas, that counts as a shape.
MIN_AREA = 0.004
# alpha rises linearly from 0 to 1 between these fractions of the shape's colour distance.
ALPHA_RAMP = (0.3, 0.7)

# Prototype (area / (longest column x longest row), skewness of the mass along y) of each
# shape as measured on dataset renders at 64 px after a 1 px Gaussian blur. Ideal shapes give
# (pi/4, 0), (1, 0) and (1/2, -2 sqrt(2) / 5); blur rounds corners and the triangle's tip.
SHAPE_FEATURES = {"circle": (0.79, 0.0), "square": (0.96, 0.0), "triangle": (0.62, -0.47)}
LARGE_EXTENT = math.sqrt(SIZES["small"] * SIZES["large"])

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Judgement:
    """What the judge sees; shape, colour, size and position are "none" when no shape is found.

    Measurements: ``area`` (fraction of the canvas), ``extent`` (bounding-box side as a
    fraction of the canvas side), ``centre`` (centre of mass, (x, y) in [0, 1], y down),
    ``fill`` and ``skew`` (the shape features), ``colour_rgb`` / ``background_rgb``
    (measured colours in uint8 units), ``colour_error`` (distance from ``colour_rgb`` to the
    named colour) and ``blobs`` (number of blobs of at least ``MIN_AREA``; 1 when clean).
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


def judge(image: ImageLike) -> Judgement:
    """Judge one square RGB image: a PIL image, a uint8 array [H x W x 3] or a float tensor
    [3 x H x W] in [-1, 1]; the side must be at least 16."""
    rgb = _smooth(_working_copy(_to_rgb(image)))
    background_rgb = np.median(_border_ring(rgb), axis=0)
    background = _nearest(background_rgb, BACKGROUNDS)

    distance = np.linalg.norm(rgb - background_rgb, axis=-1)
    alpha, blob, blobs = _segment(distance)
    if blob is None:
        return Judgement(NONE, NONE, NONE, NONE, background, background_rgb=_as_tuple(background_rgb))

    side = rgb.shape[0]
    coords = (np.arange(side) + 0.5) / side
    mass = alpha.sum()
    column_mass, row_mass = alpha.sum(axis=0), alpha.sum(axis=1)
    height, width = column_mass.max() / side, row_mass.max() / side
    area = float(mass) / side**2
    fill = area / (width * height)
    centre = (float(column_mass @ coords / mass), float(row_mass @ coords / mass))
    spread = coords - centre[1]
    skew = float((row_mass @ spread**3) / mass) / float((row_mass @ spread**2) / mass) ** 1.5
    extent = math.sqrt(width * height)

    core = blob & (distance >= np.percentile(distance[blob], 75))
    colour_rgb = np.median(rgb[core], axis=0)
    colour = _nearest(colour_rgb, COLOURS)
    return Judgement(
        shape=min(SHAPE_FEATURES, key=lambda name: math.dist((fill, skew), SHAPE_FEATURES[name])),
        colour=colour,
        size="large" if extent >= LARGE_EXTENT else "small",
        position=min(POSITIONS, key=lambda name: math.dist(centre, POSITIONS[name])),
        background=background,
        area=area,
        extent=extent,
        centre=centre,
        fill=fill,
        skew=skew,
        colour_rgb=_as_tuple(colour_rgb),
        colour_error=float(np.linalg.norm(colour_rgb - np.array(COLOURS[colour]))),
        background_rgb=_as_tuple(background_rgb),
        blobs=blobs,
    )


def judge_batch(images: torch.Tensor) -> List[Judgement]:
    """Judge each image of a float tensor [N x 3 x H x W] in [-1, 1]."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected a tensor [N x 3 x H x W], got {got}")
    return [judge(image) for image in images]


def _to_rgb(image: ImageLike) -> np.ndarray:
    """Any accepted input as float64 [H x W x 3] in [0, 255]."""
    if isinstance(image, Image.Image):
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 array [H x W x 3], got {image.dtype} {image.shape}")
        rgb = image.astype(np.float64)
    elif isinstance(image, torch.Tensor):
        if not image.is_floating_point() or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(
                f"expected a float tensor [3 x H x W] in [-1, 1], got {image.dtype} {tuple(image.shape)}"
            )
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
        Image.fromarray(rgb[..., c].astype(np.float32), mode="F").resize((WORK_SIZE, WORK_SIZE), Image.BOX)
        for c in range(3)
    ]
    return np.stack([np.asarray(channel) for channel in channels], axis=-1).astype(np.float64)


def _smooth(rgb: np.ndarray) -> np.ndarray:
    """Per-channel 3 x 3 binomial filter ([1, 2, 1] / 4 in both directions), edges replicated."""
    side = rgb.shape[0]
    padded = np.pad(rgb, ((1, 1), (1, 1), (0, 0)), mode="edge")
    weights = (0.25, 0.5, 0.25)
    return sum(
        weights[i] * weights[j] * padded[i : i + side, j : j + side] for i in range(3) for j in range(3)
    )


def _border_ring(rgb: np.ndarray) -> np.ndarray:
    """The pixels of the two outermost rows and columns, [P x 3]."""
    columns = rgb.transpose(1, 0, 2)
    return np.concatenate([rgb[:2], rgb[-2:], columns[:2], columns[-2:]]).reshape(-1, 3)


def _segment(distance: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray], int]:
    """Soft mask of the largest blob from the distance map [H x W] to the background.

    Returns alpha [H x W] in [0, 1] (zero away from the blob), the blob's boolean mask (None
    when nothing of at least MIN_AREA stands out) and the number of such blobs.
    """
    min_pixels = MIN_AREA * distance.size
    candidates = distance > CANDIDATE_DISTANCE
    if candidates.sum() < min_pixels:
        return np.zeros_like(distance), None, 0
    shape_distance = np.percentile(distance[candidates], 75)
    low, high = ALPHA_RAMP
    alpha = np.clip((distance / shape_distance - low) / (high - low), 0.0, 1.0)

    labels = _components(alpha >= 0.5)
    pixels_per_label = np.bincount(labels.ravel())
    pixels_per_label[0] = 0
    blobs = int((pixels_per_label >= min_pixels).sum())
    if blobs == 0:
        return np.zeros_like(distance), None, 0
    blob = labels == pixels_per_label.argmax()
    return alpha * _dilate(blob), blob, blobs


def _shifts(array: np.ndarray) -> List[np.ndarray]:
    """The array and its four 4-connected neighbours (zero outside): self, up, down, left, right."""
    padded = np.pad(array, 1)
    return [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]


def _components(mask: np.ndarray) -> np.ndarray:
    """Label the 4-connected components of a boolean mask (0 outside, a distinct label > 0 each)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        spread = np.where(mask, np.maximum.reduce(_shifts(labels)), 0)
        if np.array_equal(spread, labels):
            return labels
        labels = spread


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a boolean mask by one pixel in all eight directions."""
    columns = np.maximum.reduce(_shifts(mask.astype(np.uint8))[:3])
    return np.maximum.reduce([columns, *_shifts(columns)[3:]]).astype(bool)


def _nearest(rgb: np.ndarray, palette: Dict[str, Tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.linalg.norm(rgb - np.array(palette[name]))))


def _as_tuple(rgb: np.ndarray) -> Tuple[float, float, float]:
    return tuple(float(v) for v in rgb)
