"""Images in and out of the pipelines: sources, masks, PIL conversion, grids and PNG files.

Tensors follow the package convention: [N x 3 x H x W] in [-1, 1]. Outputs are quantized the
way the notebooks show them: ``((x + 1) * 127.5).round().clamp(0, 255)`` as uint8.

Masks given to the pipelines say what to REGENERATE: white / 1 / True marks the region the
model paints, black / 0 / False the region kept from the source image. The models themselves
take the opposite, ``inpaint_mask`` (1 = keep), which :func:`keep_masks` produces.
"""

import io
import json
import math
import os
import re
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


def quantize(samples: torch.Tensor) -> torch.Tensor:
    """[N x 3 x H x W] in [-1, 1] -> [N x H x W x 3] uint8 on the CPU."""
    scaled = ((samples + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu()


def to_pil_images(samples: torch.Tensor) -> List[Image.Image]:
    """[N x 3 x H x W] in [-1, 1] -> N RGB images."""
    return [Image.fromarray(array) for array in quantize(samples).numpy()]


def round_to_uint8_levels(samples: torch.Tensor) -> torch.Tensor:
    """Snap [-1, 1] values to the 256 levels an 8-bit image holds (the upsampler's ``low_res``)."""
    return ((samples + 1) * 127.5).round() / 127.5 - 1


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, an [H x W x 3] array (uint8, or float in
    [0, 1]) or a [3 x H x W] / [1 x 3 x H x W] tensor in [-1, 1] (quantized to 8 bits)."""
    if isinstance(image, (str, os.PathLike)):
        return _open_image(image).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        tensor = image.detach()
        if tensor.dim() == 3:
            tensor = tensor[None]
        if tensor.dim() != 4 or tensor.shape[:2] != (1, 3):
            raise ValueError(f"an image tensor must be [3 x H x W] or [1 x 3 x H x W], got shape {tuple(image.shape)}")
        return Image.fromarray(quantize(tensor.float())[0].numpy())
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be [H x W x 3], got shape {image.shape}")
        if image.dtype != np.uint8:
            image = (np.clip(image.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
        return Image.fromarray(image)
    raise TypeError(f"image must be a path, PIL image, numpy array or tensor, got {type(image).__name__}")


def load_mask(mask: ImageLike) -> np.ndarray:
    """A float32 [H x W] array in [0, 1], 1 where the image is regenerated.

    Accepts a path or PIL image (converted to grey levels: white = 1), a bool / uint8 (0..255)
    / float ([0, 1]) array of shape [H x W] (or [H x W x 1]), or a tensor [H x W], [1 x H x W]
    or [1 x 1 x H x W] (bool or float in [0, 1]).
    """
    if isinstance(mask, (str, os.PathLike)):
        mask = _open_image(mask)
    if isinstance(mask, Image.Image):
        return np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu()
        while mask.dim() > 2 and mask.shape[0] == 1:
            mask = mask[0]
        mask = mask.float().numpy()
    elif isinstance(mask, np.ndarray):
        if mask.ndim == 3 and mask.shape[2] == 1:
            mask = mask[..., 0]
        mask = mask.astype(np.float32) / 255.0 if mask.dtype == np.uint8 else mask.astype(np.float32)
    else:
        raise TypeError(f"mask must be a path, PIL image, numpy array or tensor, got {type(mask).__name__}")
    if mask.ndim != 2:
        raise ValueError(f"a mask must be a single-channel [H x W] image, got shape {mask.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 1):
        raise ValueError("mask values must lie in [0, 1] (or 0..255 for uint8)")
    return mask


def box_mask(box: Sequence[int], image_size: Tuple[int, int]) -> np.ndarray:
    """The mask regenerating the pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of a (width, height) image."""
    x0, y0, x1, y1 = box
    width, height = image_size
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {x0},{y0},{x1},{y1} is empty or lies outside the {width}x{height} image")
    mask = np.zeros((height, width), dtype=np.float32)
    mask[y0:y1, x0:x1] = 1.0
    return mask


def image_to_tensor(image: Image.Image, size: int, device: torch.device) -> torch.Tensor:
    """Resize (bicubic, as the inpainting notebook) to size x size: [1 x 3 x size x size] in [-1, 1]."""
    resized = image.resize((size, size), resample=Image.BICUBIC)
    array = torch.from_numpy(np.array(resized))
    return (array[None].permute(0, 3, 1, 2).float() / 127.5 - 1).to(device)


def keep_masks(
    regenerate: np.ndarray, image_size: Tuple[int, int], base_size: int, upsampled_size: int, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The models' ``inpaint_mask`` (1 = keep) at both sizes from a regenerate-mask [H x W].

    The mask may have any size with the image's aspect ratio (within 1%). It is area-averaged to
    base_size x base_size and a pixel is regenerated where at least half of it is; the upsampler's
    mask is that one enlarged with nearest neighbours (as in the notebook), so both stages
    agree on the region. Returns ([1 x 1 x base x base], [1 x 1 x up x up]) float32.
    """
    check_mask(regenerate, image_size)
    coverage = F.interpolate(torch.from_numpy(regenerate)[None, None], size=(base_size, base_size), mode="area")
    keep_base = (coverage < 0.5).float().to(device)
    if bool(keep_base.all()):
        raise ValueError(
            f"the mask's white region covers no pixel of the {base_size}x{base_size} model image by half: "
            "nothing to regenerate; make it larger"
        )
    keep_upsampled = F.interpolate(keep_base, size=(upsampled_size, upsampled_size), mode="nearest")
    return keep_base, keep_upsampled


def check_mask(regenerate: np.ndarray, image_size: Tuple[int, int]) -> None:
    """Raise a ValueError unless a regenerate-mask [H x W] fits the (width, height) image and selects something."""
    check_mask_fits(regenerate.shape, image_size)
    if not regenerate.any():
        raise ValueError("the mask has no white pixels: nothing to regenerate")


def check_mask_fits(mask_shape: Tuple[int, int], image_size: Tuple[int, int]) -> None:
    """Raise a ValueError unless a [H x W] mask has the aspect ratio of the (width, height) image (within 1%)."""
    width, height = image_size
    mask_height, mask_width = mask_shape
    if mask_height == 0 or abs(mask_width / mask_height - width / height) > 0.01 * width / height:
        raise ValueError(
            f"the {mask_width}x{mask_height} mask cannot be mapped onto the {width}x{height} image: "
            "it needs the image's size or aspect ratio"
        )


def make_grid(images: Sequence[Image.Image], columns: int = 0) -> Image.Image:
    """Tile equally sized images row by row (``columns`` = 0: a near-square grid)."""
    if not images:
        raise ValueError("no images to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


IMAGE_FILE = re.compile(r"(\d{5,})-(\d+)\.png")


def image_file_name(prompt_index: int, image_index: int) -> str:
    """The file name of image ``image_index`` of prompt ``prompt_index``: ``00012-0.png``."""
    return f"{prompt_index:05d}-{image_index}.png"


def next_free_index(folder: str) -> int:
    """One more than the highest prompt number of the ``NNNNN-j.png`` files in ``folder`` (0 if none)."""
    if not os.path.isdir(folder):
        return 0
    numbers = [int(match.group(1)) for match in map(IMAGE_FILE.fullmatch, os.listdir(folder)) if match]
    return max(numbers, default=-1) + 1


def save_png(image: Image.Image, path: str, metadata: Dict[str, object], overwrite: bool = False) -> None:
    """Write ``image`` as PNG with each metadata entry as a text chunk (non-strings as JSON).

    The folder is created if needed. An existing file is replaced only with ``overwrite``
    (else FileExistsError); a write that fails leaves no partial file.
    """
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, sort_keys=True))
    encoded = io.BytesIO()
    image.save(encoded, format="PNG", pnginfo=info)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "wb" if overwrite else "xb") as f:
        try:
            f.write(encoded.getbuffer())
        except BaseException:
            f.close()
            os.remove(path)
            raise


def _open_image(path: Union[str, os.PathLike]) -> Image.Image:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {os.fspath(path)}")
    image = Image.open(path)
    image.load()
    return image
