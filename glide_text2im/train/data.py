"""Training examples: captioned images turned into the inputs of one training step.

A *source* is any sequence of ``(PIL image, caption)`` pairs; ``ImageCaptionFolder`` is the
one for a folder of images with same-named ``.txt`` captions. ``TrainingExamples`` wraps a
source and makes, per example, everything the loss needs:

- ``x_start`` [3 x S x S] in [-1, 1]: a random square crop, resized to the model's size S;
- ``noise`` [3 x S x S] and ``t`` (int64 scalar): the forward-process draw of this example;
- the caption's tokens (U-Net: ``tokens``/``mask`` padded to ``text_ctx``; noised CLIP:
  ``tokens``/``lens``), replaced by the empty sequence with probability ``uncond_prob``
  (classifier-free guidance training, 20% in the GLIDE paper);
- inpainting: ``inpaint_image`` = x_start * inpaint_mask and ``inpaint_mask`` [1 x S x S]
  (1 = known, 0 = erased by random rectangles and ellipses or, with probability
  ``subject_mask_prob``, by the box around the image's subject), as the sampler feeds them;
- super-resolution: ``low_res`` [3 x S/4 x S/4] (see ``low_res_of``).

With a ``patch_size`` P, ``x_start`` is instead a random P x P patch of the S x S image, at
a position that is a multiple of 4 (so ``low_res`` [3 x P/4 x P/4] is exactly the matching
part of the whole image's low-res version), and the inpainting mask is P x P. The U-Nets are
fully convolutional, so a model of image size S trains on patches at a fraction of the cost.

Every random choice of an example (crop, caption drop, mask, t, noise) comes from a
generator seeded by ``(seed, epoch, index)``. An example is therefore the same whatever the
number of data-loader workers or processes, and after a resume; a sampler chooses examples
by yielding ``(epoch, index)`` keys.
"""

import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
UPSAMPLE_FACTOR = 4
# How far (in [-1, 1] units, any channel) a pixel's colour must lie from the border's to
# count as part of ``subject_box_mask``'s subject: about 13 of 255 levels.
SUBJECT_THRESHOLD = 0.1

Example = Tuple[Image.Image, str]
ExampleKey = Union[int, Tuple[int, int]]


class ImageCaptionFolder(Sequence):
    """The images under ``root`` (searched recursively) that have a same-named ``.txt`` caption.

    ``photos/cat.jpg`` pairs with ``photos/cat.txt``; the caption is the file's text with
    surrounding whitespace removed. Images without a caption file are left out. Items are
    ``(RGB PIL image, caption)``, read when indexed; the order is sorted by path.
    """

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"data folder {self.root} does not exist or is not a folder")
        self.pairs: List[Tuple[Path, Path]] = []
        for path in sorted(self.root.rglob("*")):
            caption_path = path.with_suffix(".txt")
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and caption_path.is_file():
                self.pairs.append((path, caption_path))
        if not self.pairs:
            raise ValueError(
                f"no captioned images in {self.root}: expected image files ({', '.join(IMAGE_EXTENSIONS)}) "
                "each with a same-named .txt caption"
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Example:
        image_path, caption_path = self.pairs[index]
        with Image.open(image_path) as image:
            rgb = image.convert("RGB")
        return rgb, caption_path.read_text(encoding="utf-8").strip()


def as_source(data: Union[str, Path, Sequence[Example], Iterable[Example]]) -> Sequence[Example]:
    """A folder path becomes an ``ImageCaptionFolder``; a sequence is used as it is; any other
    iterable of ``(PIL image, caption)`` is read once into a list (so it must fit in memory)."""
    if isinstance(data, (str, Path)):
        return ImageCaptionFolder(data)
    if isinstance(data, Sequence):
        return data
    if isinstance(data, Iterable):
        return list(data)
    raise TypeError(f"data must be a folder path or an iterable of (PIL image, caption), got {type(data).__name__}")


def random_square_crop(image: Image.Image, size: int, rng: random.Random, min_fraction: float = 1.0) -> Image.Image:
    """A random square of side ``uniform(min_fraction, 1) * shorter side`` at a random
    position, resized to ``size x size`` (box filter when shrinking, bicubic when growing).

    With ``min_fraction = 1`` the crop keeps the whole shorter side and only slides along
    the longer one.
    """
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction must lie in (0, 1], got {min_fraction}")
    width, height = image.size
    side = max(1, round(min(width, height) * rng.uniform(min_fraction, 1.0)))
    left = rng.randint(0, width - side)
    top = rng.randint(0, height - side)
    crop = image.crop((left, top, left + side, top + side))
    resample = Image.BOX if side >= size else Image.BICUBIC
    return crop.resize((size, size), resample=resample)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> float32 [3 x H x W] in [-1, 1] (uint8 value v maps to v / 127.5 - 1)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def low_res_of(x: torch.Tensor) -> torch.Tensor:
    """The upsampler's input for a high-res target: [... x 3 x S x S] -> [... x 3 x S/4 x S/4] in [-1, 1].

    Each 4 x 4 block is averaged (area / box filtering, no further blur), then the result is
    quantised to the 8-bit grid (``round((v + 1) * 127.5) / 127.5 - 1``), as the notebooks
    quantise the base model's samples before upsampling them.
    """
    if x.shape[-1] % UPSAMPLE_FACTOR or x.shape[-2] % UPSAMPLE_FACTOR:
        raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by {UPSAMPLE_FACTOR}")
    batched = x if x.dim() == 4 else x.unsqueeze(0)
    low = F.avg_pool2d(batched, UPSAMPLE_FACTOR)
    low = ((low + 1.0) * 127.5).round().clamp(0, 255) / 127.5 - 1.0
    return low if x.dim() == 4 else low.squeeze(0)


def random_aligned_patch(x: torch.Tensor, size: int, rng: random.Random) -> torch.Tensor:
    """A random ``size x size`` patch of ``x`` [C x H x W] whose top-left corner lies on the
    ``UPSAMPLE_FACTOR`` grid (so its 4 x 4 blocks are blocks of ``x``)."""
    height, width = x.shape[-2:]
    if size % UPSAMPLE_FACTOR or size > min(height, width):
        raise ValueError(f"patch size {size} must be a multiple of {UPSAMPLE_FACTOR} and fit in {height} x {width}")
    top = rng.randint(0, (height - size) // UPSAMPLE_FACTOR) * UPSAMPLE_FACTOR
    left = rng.randint(0, (width - size) // UPSAMPLE_FACTOR) * UPSAMPLE_FACTOR
    return x[..., top : top + size, left : left + size]


def random_inpaint_mask(size: int, rng: random.Random, max_regions: int = 3) -> torch.Tensor:
    """Float32 [1 x size x size]: 1 where the image is known, 0 in 1..max_regions erased
    regions, each an axis-aligned rectangle or ellipse with sides of 20-60% of the image."""
    rows = torch.arange(size, dtype=torch.float32).view(-1, 1) + 0.5
    cols = torch.arange(size, dtype=torch.float32).view(1, -1) + 0.5
    erased = torch.zeros(size, size, dtype=torch.bool)
    for _ in range(rng.randint(1, max_regions)):
        height = rng.uniform(0.2, 0.6) * size
        width = rng.uniform(0.2, 0.6) * size
        top = rng.uniform(0, size - height)
        left = rng.uniform(0, size - width)
        if rng.random() < 0.5:
            region = (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
        else:
            dy = (rows - (top + height / 2)) / (height / 2)
            dx = (cols - (left + width / 2)) / (width / 2)
            region = dy**2 + dx**2 <= 1.0
        erased |= region
    return (~erased).float().unsqueeze(0)


def subject_box_mask(
    x_start: torch.Tensor, rng: random.Random, margins: Tuple[int, int] = (2, 8)
) -> Optional[torch.Tensor]:
    """Float32 [1 x S x S]: 0 on the box around the subject of ``x_start`` [3 x S x S] in
    [-1, 1], 1 elsewhere; None where the image has no such subject.

    The subject is every pixel whose colour differs by more than ``SUBJECT_THRESHOLD`` (in any
    channel) from the median colour of the image's border, as an object on a plain
    background; its bounding box is grown by a margin of ``margins[0]..margins[1]`` pixels on
    every side (the same margin; clipped at the image's edges). This is the mask of "replace
    the object" edits, which random regions rarely match. None where no pixel differs or the
    grown box covers the whole image.
    """
    size = x_start.shape[-1]
    border = torch.cat([x_start[:, 0], x_start[:, -1], x_start[:, :, 0], x_start[:, :, -1]], dim=1)
    background = border.median(dim=1).values.view(3, 1, 1)
    subject = ((x_start - background).abs() > SUBJECT_THRESHOLD).any(dim=0)
    if not subject.any():
        return None
    rows, cols = subject.any(dim=1).nonzero()[:, 0], subject.any(dim=0).nonzero()[:, 0]
    margin = rng.randint(*margins)
    top, bottom = max(rows[0].item() - margin, 0), min(rows[-1].item() + margin + 1, size)
    left, right = max(cols[0].item() - margin, 0), min(cols[-1].item() + margin + 1, size)
    if (bottom - top) * (right - left) == size * size:
        return None
    mask = torch.ones(1, size, size)
    mask[:, top:bottom, left:right] = 0.0
    return mask


class UNetCaptionEncoder:
    """Captions -> ``{"tokens": int64 [text_ctx], "mask": bool [text_ctx]}`` with a U-Net's tokenizer
    (``model.tokenizer``); the empty caption gives all padding and an all-False mask."""

    def __init__(self, tokenizer: Any, text_ctx: int):
        self.tokenizer = tokenizer
        self.text_ctx = text_ctx

    def __call__(self, caption: str) -> Dict[str, torch.Tensor]:
        ids = self.tokenizer.encode(caption) if caption else []
        tokens, mask = self.tokenizer.padded_tokens_and_mask(ids, self.text_ctx)
        return {"tokens": torch.tensor(tokens, dtype=torch.long), "mask": torch.tensor(mask, dtype=torch.bool)}


class CLIPCaptionEncoder:
    """Captions -> ``{"tokens": int64 [max_text_len], "lens": int64 scalar}`` with the noised
    CLIP's tokenizer (start and end tokens included, as ``CLIPModel.encode_prompts``)."""

    def __init__(self, tokenizer: Any, max_text_len: int):
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len

    def __call__(self, caption: str) -> Dict[str, torch.Tensor]:
        tokens, length = self.tokenizer.padded_tokens_and_len(self.tokenizer.encode(caption), self.max_text_len)
        return {"tokens": torch.tensor(tokens, dtype=torch.long), "lens": torch.tensor(length, dtype=torch.long)}


class TrainingExamples(Dataset):
    """Training examples of a source of ``(PIL image, caption)`` pairs; see the module docstring.

    :param source: a sequence of ``(PIL image, caption)``.
    :param image_size: side S of ``x_start`` (the model's image size; for an upsampler the
        high-res size).
    :param encode_caption: caption -> dict of token tensors (``UNetCaptionEncoder`` or
        ``CLIPCaptionEncoder``).
    :param diffusion: anything with ``sample_timesteps(batch_size, device, generator)``;
        each example draws its ``t`` from it.
    :param uncond_prob: probability of training on the empty caption instead.
    :param inpaint: add ``inpaint_image`` / ``inpaint_mask``.
    :param subject_mask_prob: probability that an inpainting mask is ``subject_box_mask``
        (where the image has a subject) instead of ``random_inpaint_mask``.
    :param super_res: add ``low_res``.
    :param seed: the base of every example's random choices.
    :param crop_min_fraction: see ``random_square_crop``.
    :param patch_size: train on random aligned ``patch_size`` squares of the S x S image
        (None: the whole image).
    """

    def __init__(
        self,
        source: Sequence[Example],
        image_size: int,
        encode_caption: Callable[[str], Dict[str, torch.Tensor]],
        diffusion: Any,
        uncond_prob: float = 0.2,
        inpaint: bool = False,
        subject_mask_prob: float = 0.0,
        super_res: bool = False,
        seed: int = 0,
        crop_min_fraction: float = 1.0,
        patch_size: Optional[int] = None,
    ):
        if not 0.0 <= uncond_prob <= 1.0:
            raise ValueError(f"uncond_prob must lie in [0, 1], got {uncond_prob}")
        if not 0.0 <= subject_mask_prob <= 1.0:
            raise ValueError(f"subject_mask_prob must lie in [0, 1], got {subject_mask_prob}")
        if patch_size is not None and not (
            isinstance(patch_size, int) and 0 < patch_size <= image_size and patch_size % UPSAMPLE_FACTOR == 0
        ):
            raise ValueError(
                f"patch_size must be a multiple of {UPSAMPLE_FACTOR} in [{UPSAMPLE_FACTOR}, {image_size}], got {patch_size!r}"
            )
        if len(source) == 0:
            raise ValueError("the training data is empty")
        self.source = source
        self.image_size = image_size
        self.encode_caption = encode_caption
        self.diffusion = diffusion
        self.uncond_prob = uncond_prob
        self.inpaint = inpaint
        self.subject_mask_prob = subject_mask_prob
        self.super_res = super_res
        self.seed = seed
        self.crop_min_fraction = crop_min_fraction
        self.patch_size = patch_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: ExampleKey) -> Dict[str, torch.Tensor]:
        """Example ``index`` as drawn in ``epoch``; ``key`` is ``(epoch, index)`` or an index (epoch 0)."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, caption = self.source[index]
        if not isinstance(image, Image.Image) or not isinstance(caption, str):
            raise TypeError(
                f"example {index} must be (PIL image, caption str), "
                f"got ({type(image).__name__}, {type(caption).__name__})"
            )
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        generator = torch.Generator().manual_seed(rng.getrandbits(63))

        x_start = image_to_tensor(random_square_crop(image, self.image_size, rng, self.crop_min_fraction))
        if self.patch_size is not None:
            x_start = random_aligned_patch(x_start, self.patch_size, rng)
        if rng.random() < self.uncond_prob:
            caption = ""
        example = dict(self.encode_caption(caption), x_start=x_start)
        example["t"] = self.diffusion.sample_timesteps(1, generator=generator)[0]
        example["noise"] = torch.randn(x_start.shape, generator=generator)
        if self.inpaint:
            mask = None
            if self.subject_mask_prob and rng.random() < self.subject_mask_prob:
                mask = subject_box_mask(x_start, rng)
            if mask is None:
                mask = random_inpaint_mask(x_start.shape[-1], rng)
            example["inpaint_mask"] = mask
            example["inpaint_image"] = x_start * mask
        if self.super_res:
            example["low_res"] = low_res_of(x_start)
        return example


class ExampleSampler(DistributedSampler):
    """The data order: a ``DistributedSampler`` that yields ``(epoch, index)`` keys and can
    start in the middle of an epoch.

    Epoch e shuffles the examples with ``seed + e`` (the ``DistributedSampler`` rule); its
    global batch k is the examples ``perm[k B : (k + 1) B]`` of ``batch_size`` B, of which
    rank r takes every ``num_replicas``-th one, so the global batches do not depend on the
    number of processes (when ``num_replicas`` divides the dataset size). Each epoch has
    ``len(dataset) // B`` whole global batches; the rest are left out.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if batch_size % num_replicas:
            raise ValueError(f"batch size {batch_size} is not divisible by the {num_replicas} processes")
        if batch_size > len(dataset):
            raise ValueError(f"batch size {batch_size} is larger than the {len(dataset)} training examples")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.local_batch_size = batch_size // num_replicas
        self.batches_per_epoch = len(dataset) // batch_size
        self.start_batch = 0

    def set_position(self, epoch: int, batch: int) -> None:
        """Make the next iteration yield epoch ``epoch`` from its global batch ``batch`` on."""
        if not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"batch {batch} is outside the epoch's {self.batches_per_epoch} batches")
        self.set_epoch(epoch)
        self.start_batch = batch

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices = list(super().__iter__())
        start, stop = self.start_batch * self.local_batch_size, self.batches_per_epoch * self.local_batch_size
        return iter([(self.epoch, index) for index in indices[start:stop]])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.local_batch_size
