"""The training loop for the GLIDE U-Nets and the noised CLIP, on one process or many (DDP).

A *task* holds what is trained and how its loss is computed:

- ``DiffusionTask`` ("base", "upsample", "inpaint"): a text-conditional U-Net and its
  diffusion; the loss is ``GaussianDiffusion.training_losses`` (Improved DDPM's hybrid
  ``mse + vb``) on each example's own ``(x_start, t, noise)``.
- ``CLIPTask`` ("clip"): the noised CLIP; the loss is the symmetric contrastive (InfoNCE)
  loss between caption embeddings and embeddings of ``q_sample(x_start, t)`` under the
  CLIP's own diffusion (squaredcos_cap_v2, 1000 steps), with the negatives of the whole
  global batch.

``Trainer`` runs AdamW with gradient clipping, an EMA copy of the weights, optional
autocast (bf16 on CUDA or the CPU, fp16 with loss scaling on CUDA), checkpoint + resume
and the logs. Under ``torchrun`` each process
takes ``batch_size / world_size`` examples of every global batch (``ExampleSampler``) and
DDP averages the gradients, so a run computes the same updates on any number of processes.
Only rank 0 writes files.

Output folder:

- U-Nets: ``model.pt``, the EMA weights as a plain state dict, and ``model.pt.json``, the
  options that rebuild it (``model_and_diffusion_defaults()`` keys plus ``tokenizer``,
  ``norm_groups`` and ``prediction``), the sidecar the pipelines load;
- CLIP: ``clip_image_enc.pt`` and ``clip_text_enc.pt`` (EMA state dicts) and the config
  sidecar ``clip_image_enc.pt.yaml``;
- ``state.pt``: everything needed to resume (weights, EMA, optimiser, loss scaler, step,
  data position, the RNG states of every rank);
- ``log.csv``: one row per ``log_every`` steps (means over those steps);
- ``samples/step_NNNNNN.png``: sample grids of the EMA model (U-Nets only).
"""

import copy
import csv
import dataclasses
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from glide_text2im.clip.model_creation import CLIPModel, create_clip_model, load_clip_config
from glide_text2im.download import MODEL_PATHS, checkpoint_path, load_checkpoint
from glide_text2im.gaussian_diffusion import GaussianDiffusion
from glide_text2im.guidance import ClassifierFreeGuidance, inpaint_denoised_fn
from glide_text2im.model_creation import (
    create_gaussian_diffusion,
    create_model,
    model_and_diffusion_defaults,
    model_and_diffusion_defaults_upsampler,
)
from glide_text2im.pipelines.loading import options_path, save_options
from glide_text2im.train.data import (
    CLIPCaptionEncoder,
    Example,
    ExampleSampler,
    TrainingExamples,
    UNetCaptionEncoder,
    as_source,
    image_to_tensor,
    low_res_of,
    random_inpaint_mask,
    random_square_crop,
)

TASKS = ("base", "upsample", "inpaint", "clip")
PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
STATE_FILE = "state.pt"
LOG_FILE = "log.csv"
STATE_FORMAT = 1
CLIP_CHECKPOINTS = ("clip/image-enc", "clip/text-enc")
UNET_FILE = "model.pt"
CLIP_FILES = ("clip_image_enc.pt", "clip_text_enc.pt")
# The input flags each U-Net task sets (the others keep the options' values).
TASK_FLAGS = {
    "base": dict(inpaint=False, super_res=False),
    "upsample": dict(super_res=True),
    "inpaint": dict(inpaint=True),
}


def require_at_least_one(settings: Any, names: Sequence[str]) -> None:
    """Raise a ValueError naming the first of the ``names`` attributes of ``settings`` below 1."""
    for name in names:
        if getattr(settings, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(settings, name)}")


@dataclasses.dataclass
class TrainConfig:
    """Settings of a training run.

    :param steps: optimiser steps to reach (a resumed run continues up to this count).
    :param batch_size: the global batch, split evenly over the processes.
    :param lr: AdamW learning rate after ``warmup_steps`` linear warm-up steps.
    :param lr_schedule: "constant" (``lr`` after the warm-up) or "cosine" (from ``lr`` down to 0
        at ``steps`` along a half cosine, after the warm-up).
    :param grad_clip: maximum global gradient norm (0 disables clipping).
    :param ema_rate: EMA decay; at step s the decay used is ``min(ema_rate, (1 + s) / (10 + s))``
        so that the EMA of a short run follows the weights.
    :param precision: "fp32", "bf16" (autocast; CUDA or CPU) or "fp16" (autocast with a
        dynamic loss scale; CUDA only). The weights and the optimiser stay float32.
    :param uncond_prob: probability of training a U-Net on the empty caption (classifier-free
        guidance); the CLIP always sees its captions.
    :param subject_mask_prob: inpainting U-Nets: probability that an example's mask erases the
        box around its subject (``data.subject_box_mask``) instead of random regions.
    :param seed: seed of the data order, every example's random draws and the initial weights.
    :param crop_min_fraction: smallest random crop, as a fraction of the shorter image side.
    :param patch_size: U-Nets: train on random ``patch_size`` squares (aligned to the 4-pixel
        grid) of the model-sized images instead of the whole images (0: whole images); see
        ``data.TrainingExamples``.
    :param log_every, save_every, sample_every: intervals in steps (``sample_every = 0``: no grids).
    :param sample_prompts: prompts of the base model's sample grids (default: the first
        captions of the data; the other U-Nets always use their data's first examples).
    :param num_samples: images per sample grid.
    :param sample_steps: the sampler's ``timestep_respacing`` for the grids.
    :param guidance_scale: classifier-free guidance scale of the grids.
    :param num_workers: data-loader worker processes per training process.
    :param freeze_text_encoder: keep the prompt encoder's weights fixed, e.g. after
        ``text_pretraining.pretrain_text_encoder``: a U-Net's up to ``transformer_proj``
        (``Text2ImUNet.text_encoder_parameters``), a CLIP's whole text encoder.
    """

    steps: int
    batch_size: int = 8
    lr: float = 1e-4
    lr_schedule: str = "constant"
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_rate: float = 0.9999
    precision: str = "fp32"
    uncond_prob: float = 0.2
    subject_mask_prob: float = 0.0
    seed: int = 0
    crop_min_fraction: float = 1.0
    patch_size: int = 0
    log_every: int = 10
    save_every: int = 1000
    sample_every: int = 0
    sample_prompts: Tuple[str, ...] = ()
    num_samples: int = 4
    sample_steps: str = "50"
    guidance_scale: float = 3.0
    num_workers: int = 0
    freeze_text_encoder: bool = False

    def __post_init__(self):
        self.sample_prompts = tuple(self.sample_prompts)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        require_at_least_one(self, ("steps", "batch_size", "log_every", "save_every", "num_samples"))
        if not 0.0 <= self.ema_rate < 1.0:
            raise ValueError(f"ema_rate must lie in [0, 1), got {self.ema_rate}")
        if self.patch_size < 0:
            raise ValueError(f"patch_size must be 0 (whole images) or positive, got {self.patch_size}")


# ---------------------------------------------------------------------- processes


@dataclasses.dataclass
class DistributedContext:
    """This process's place in the run: rank, world size, the local device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[Union[str, torch.device]] = None) -> DistributedContext:
    """Join the ``torchrun`` process group if the environment names one (``WORLD_SIZE`` > 1).

    The device defaults to ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU; the
    backend is nccl on CUDA and gloo on the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistributedContext(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' [b x D] tensors concatenated in rank order, [world_size * b x D]; the
    backward pass sums the gradients of every rank's loss and returns this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * rows : (rank + 1) * rows]


def gather_with_grad(x: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """(every rank's rows of ``x`` concatenated, the offset of this rank's rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _GatherWithGrad.apply(x), dist.get_rank() * x.shape[0]


# ---------------------------------------------------------------------- tasks


class _Autocast(nn.Module):
    """Runs ``module`` under autocast (when ``dtype`` is set) and returns float32 outputs,
    so that the losses are computed in float32."""

    def __init__(self, module: Callable[..., Any], device_type: str, dtype: Optional[torch.dtype]):
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.module(*args, **kwargs)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


class DiffusionTask:
    """A text-conditional U-Net trained with the hybrid diffusion loss.

    :param model: the U-Net (float32 weights).
    :param diffusion: the full training chain (no respacing).
    :param options: ``model_and_diffusion_defaults()``-style options plus ``tokenizer``,
        ``norm_groups`` and ``prediction``; saved beside the weights.
    """

    terms = ("loss", "mse", "vb")

    def __init__(self, kind: str, model: nn.Module, diffusion: GaussianDiffusion, options: Dict[str, Any]):
        self.kind = kind
        self.model = model
        self.diffusion = diffusion
        self.options = dict(options)

    @property
    def image_size(self) -> int:
        return self.options["image_size"]

    def make_examples(self, source: Sequence[Example], config: TrainConfig) -> TrainingExamples:
        return TrainingExamples(
            source,
            image_size=self.image_size,
            encode_caption=UNetCaptionEncoder(self.model.tokenizer, self.options["text_ctx"]),
            diffusion=self.diffusion,
            uncond_prob=config.uncond_prob,
            inpaint=self.options["inpaint"],
            subject_mask_prob=config.subject_mask_prob,
            super_res=self.options["super_res"],
            seed=config.seed,
            crop_min_fraction=config.crop_min_fraction,
            patch_size=config.patch_size or None,
        )

    def train_module(self) -> nn.Module:
        return self.model

    def losses(self, module: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Per-example [b] "loss", "mse" and "vb" of a (local) batch on the model's device."""
        kwargs = {k: batch[k] for k in ("tokens", "mask", "inpaint_image", "inpaint_mask", "low_res") if k in batch}
        return self.diffusion.training_losses(
            module, batch["x_start"], batch["t"], model_kwargs=kwargs, noise=batch["noise"]
        )

    def save_inference_files(self, ema_model: nn.Module, out_dir: Path) -> None:
        """``model.pt`` (the EMA state dict) and its options sidecar ``model.pt.json``."""
        _save_atomically(ema_model.state_dict(), out_dir / UNET_FILE)
        save_options(os.fspath(out_dir / UNET_FILE), self.options)

    def sample_grid(
        self, ema_model: nn.Module, source: Sequence[Example], config: TrainConfig, device: torch.device
    ) -> Image.Image:
        """A PNG-ready grid of ``num_samples`` classifier-free-guided samples of the EMA model.

        The conditions are the first examples of the data (the prompts, for the base model,
        ``sample_prompts`` when given); inpainting and upsampling grids show the masked or
        low-res inputs in a first row. The start noise is the same at every call.
        """
        count = min(config.num_samples, len(source))
        size = self.image_size
        images = torch.stack(
            [image_to_tensor(random_square_crop(source[i][0], size, random.Random(i))) for i in range(count)]
        ).to(device)
        prompts = [source[i][1] for i in range(count)]
        if self.kind == "base" and config.sample_prompts:
            prompts = [config.sample_prompts[i % len(config.sample_prompts)] for i in range(config.num_samples)]
            count = len(prompts)
        encode = UNetCaptionEncoder(ema_model.tokenizer, self.options["text_ctx"])
        captions = [encode(p) for p in prompts] + [encode("")] * count
        kwargs = {key: torch.stack([c[key] for c in captions]).to(device) for key in ("tokens", "mask")}
        rows = []
        if self.options["inpaint"]:
            mask = torch.stack([random_inpaint_mask(size, random.Random(i)) for i in range(count)]).to(device)
            kwargs["inpaint_image"] = (images * mask).repeat(2, 1, 1, 1)
            kwargs["inpaint_mask"] = mask.repeat(2, 1, 1, 1)
            rows.append(images * mask)
        if self.options["super_res"]:
            low_res = low_res_of(images)
            kwargs["low_res"] = low_res.repeat(2, 1, 1, 1)
            rows.append(F.interpolate(low_res, scale_factor=4, mode="nearest"))

        sampler = create_gaussian_diffusion(
            steps=self.options["diffusion_steps"],
            noise_schedule=self.options["noise_schedule"],
            timestep_respacing=config.sample_steps,
            prediction=self.options["prediction"],
        )
        generator = torch.Generator(device).manual_seed(config.seed)
        noise = torch.randn((count, 3, size, size), generator=generator, device=device).repeat(2, 1, 1, 1)

        samples = sampler.p_sample_loop(
            ClassifierFreeGuidance(ema_model, config.guidance_scale),
            noise.shape,
            noise=noise,
            device=device,
            clip_denoised=True,
            model_kwargs=kwargs,
            denoised_fn=inpaint_denoised_fn(kwargs["inpaint_image"], kwargs["inpaint_mask"])
            if self.options["inpaint"]
            else None,
            generator=generator,
        )[:count]
        return image_grid(rows + [samples])


def image_grid(rows: List[torch.Tensor]) -> Image.Image:
    """Rows of [N x 3 x H x W] images in [-1, 1] -> one RGB image, a row per tensor."""
    grid = torch.cat([torch.cat(list(row.clamp(-1, 1)), dim=2) for row in rows], dim=1)
    pixels = ((grid + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)


class NoisedCLIPEmbedder(nn.Module):
    """(x_t [b x 3 x S x S] in [-1, 1], t [b], tokens [b x L], lens [b]) -> unit-norm
    (text embeddings [b x D], image embeddings [b x D]); the module that DDP wraps."""

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.clip = clip

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, lens: torch.Tensor):
        z_text = self.clip.text_encoder(tokens, lens)
        z_image = self.clip.image_encoder((x_t + 1) * 127.5, t)
        return F.normalize(z_text, dim=-1, eps=1e-12), F.normalize(z_image, dim=-1, eps=1e-12)


def contrastive_losses(
    z_text: torch.Tensor, z_image: torch.Tensor, logit_scale: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Symmetric InfoNCE of this rank's b pairs against the whole global batch (CLIP's loss).

    For example i, ``loss_i = (CE(text_i -> images) + CE(image_i -> texts)) / 2`` with logits
    ``exp(logit_scale) * cosine similarity`` over the B examples of all ranks; "accuracy" is
    1 where text i ranks its own image first. Returns [b] tensors.
    """
    all_text, offset = gather_with_grad(z_text)
    all_image, _ = gather_with_grad(z_image)
    scale = logit_scale.exp()
    labels = torch.arange(z_text.shape[0], device=z_text.device) + offset
    text_to_image = scale * z_text @ all_image.t()
    image_to_text = scale * z_image @ all_text.t()
    text_loss = F.cross_entropy(text_to_image, labels, reduction="none")
    image_loss = F.cross_entropy(image_to_text, labels, reduction="none")
    loss = 0.5 * (text_loss + image_loss)
    return {"loss": loss, "accuracy": (text_to_image.argmax(dim=1) == labels).float()}


class CLIPTask:
    """The noised CLIP trained with ``contrastive_losses`` on noised images.

    :param config: the CLIP config (``config.yaml`` keys), kept as ``options`` and saved
        beside the image encoder's weights.
    """

    kind = "clip"
    terms = ("loss", "accuracy")

    def __init__(self, clip: CLIPModel, config: Dict[str, Any]):
        self.model = clip
        self.options = dict(config)
        self.diffusion = create_gaussian_diffusion(steps=config["n_timesteps"], noise_schedule=config["beta_schedule"])
        self.embedder = NoisedCLIPEmbedder(clip)

    @property
    def image_size(self) -> int:
        return self.options["image_size"]

    def make_examples(self, source: Sequence[Example], config: TrainConfig) -> TrainingExamples:
        if config.patch_size:
            raise ValueError("patch_size applies to the U-Net tasks only; the CLIP sees whole images")
        return TrainingExamples(
            source,
            image_size=self.image_size,
            encode_caption=CLIPCaptionEncoder(self.model.tokenizer, self.options["max_text_len"]),
            diffusion=self.diffusion,
            uncond_prob=0.0,
            seed=config.seed,
            crop_min_fraction=config.crop_min_fraction,
        )

    def train_module(self) -> nn.Module:
        return self.embedder

    def losses(self, module: nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        x_t = self.diffusion.q_sample(batch["x_start"], batch["t"], noise=batch["noise"])
        z_text, z_image = module(x_t, batch["t"], batch["tokens"], batch["lens"])
        return contrastive_losses(z_text, z_image, self.model.logit_scale)

    def save_inference_files(self, ema_model: nn.Module, out_dir: Path) -> None:
        """``clip_image_enc.pt`` and ``clip_text_enc.pt`` (EMA state dicts) and the config
        sidecar ``clip_image_enc.pt.yaml`` that ``pipelines.loading.load_clip`` reads."""
        _save_atomically(ema_model.image_encoder.state_dict(), out_dir / CLIP_FILES[0])
        _save_atomically(ema_model.text_encoder.state_dict(), out_dir / CLIP_FILES[1])
        (out_dir / f"{CLIP_FILES[0]}.yaml").write_text(yaml.safe_dump(self.options), encoding="utf-8")


Task = Union[DiffusionTask, CLIPTask]


# ---------------------------------------------------------------------- building


def default_options(kind: str) -> Dict[str, Any]:
    """The official options a task starts from: the base model's for "base" and "inpaint",
    the upsampler's for "upsample"; ``tokenizer`` is "bpe", ``norm_groups`` 32 and
    ``prediction`` "eps"."""
    if kind not in TASKS[:3]:
        raise ValueError(f"unknown U-Net task {kind!r}; expected one of {TASKS[:3]}")
    options = model_and_diffusion_defaults_upsampler() if kind == "upsample" else model_and_diffusion_defaults()
    return dict(options, tokenizer="bpe", norm_groups=32, prediction="eps")


def official_options(name: str) -> Dict[str, Any]:
    """The options an official U-Net checkpoint was built with."""
    options = default_options("upsample" if name.startswith("upsample") else "base")
    return dict(options, inpaint=name.endswith("inpaint"))


def parse_option_value(key: str, text: str, reference: Any) -> Any:
    """``text`` converted to the type of ``reference`` (bool accepts true/false/1/0/yes/no)."""
    if isinstance(reference, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"option {key} expects a boolean (true/false), got {text!r}")
    for kind in (int, float):
        if isinstance(reference, kind):
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"option {key} expects {kind.__name__}, got {text!r}") from None
    return text


def apply_overrides(options: Dict[str, Any], overrides: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``options`` updated with ``overrides``; strings are converted to the option's type and
    unknown keys are an error."""
    options = dict(options)
    for key, value in (overrides or {}).items():
        if key not in options:
            raise ValueError(f"unknown option {key!r}; known options: {', '.join(sorted(options))}")
        options[key] = parse_option_value(key, value, options[key]) if isinstance(value, str) else value
    return options


def read_sidecar(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The options saved beside a U-Net weights file (``<file>.json``), or None."""
    sidecar = Path(options_path(os.fspath(path)))
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{sidecar} is not valid JSON: {exc}") from None


def input_layout(in_channels: int) -> Tuple[str, ...]:
    """The groups stacked into a U-Net's first convolution, from its input channel count."""
    layouts = {
        3: ("x",),
        6: ("x", "low_res"),
        7: ("x", "inpaint_image", "inpaint_mask"),
        10: ("x", "inpaint_image", "inpaint_mask", "low_res"),
    }
    if in_channels not in layouts:
        raise ValueError(f"no GLIDE U-Net has {in_channels} input channels (expected 3, 6, 7 or 10)")
    return layouts[in_channels]


_GROUP_CHANNELS = {"x": 3, "inpaint_image": 3, "inpaint_mask": 1, "low_res": 3}


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """The first convolution's weight [C_out x C_in x 3 x 3] for a model with ``in_channels``
    inputs: the input groups both layouts have (see ``input_layout``) are copied, the new
    ones are zero (so an inpainting model starts out computing what the base model did)."""
    source = input_layout(weight.shape[1])
    target = input_layout(in_channels)
    adapted = weight.new_zeros(weight.shape[0], in_channels, *weight.shape[2:])

    def offsets(layout):
        starts, position = {}, 0
        for group in layout:
            starts[group] = position
            position += _GROUP_CHANNELS[group]
        return starts

    source_at, target_at = offsets(source), offsets(target)
    for group in set(source) & set(target):
        width = _GROUP_CHANNELS[group]
        adapted[:, target_at[group] : target_at[group] + width] = weight[:, source_at[group] : source_at[group] + width]
    return adapted


def load_unet_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load ``state_dict`` strictly, adapting the first convolution when the checkpoint has
    another input layout (e.g. a base model into an inpainting model)."""
    key = "input_blocks.0.0.weight"
    state_dict = dict(state_dict)
    wanted = model.state_dict()[key].shape[1]
    if key in state_dict and state_dict[key].shape[1] != wanted:
        state_dict[key] = adapt_input_channels(state_dict[key], wanted)
    model.load_state_dict(state_dict)


def build_diffusion_task(
    kind: str,
    init: Optional[str] = None,
    overrides: Optional[Dict[str, Any]] = None,
    use_checkpoint: bool = False,
) -> DiffusionTask:
    """The U-Net of task ``kind`` ("base", "upsample" or "inpaint") and its training diffusion.

    :param init: None (random weights), an official checkpoint name ("base", "upsample",
        "base-inpaint", "upsample-inpaint") or a weights file (its ``<file>.json`` options are
        used when present; so are names registered with ``download.register_checkpoint``).
        The options start from the checkpoint's (else ``default_options``),
        then ``overrides`` apply, then the task's flags: "base" has neither inpaint nor
        super_res, "upsample" has super_res, "inpaint" has inpaint.
    :param overrides: option values (strings are parsed to the option's type).
    :param use_checkpoint: gradient checkpointing.
    """
    state_dict = None
    options = default_options(kind)
    if init is not None:
        if init in CLIP_CHECKPOINTS:
            raise ValueError(f"{init!r} is a CLIP checkpoint; the {kind!r} task trains a U-Net")
        if init in MODEL_PATHS:
            options = official_options(init)
        else:
            options = apply_overrides(default_options(kind), read_sidecar(checkpoint_path(init)))
        state_dict = load_checkpoint(init, "cpu")
    options = apply_overrides(options, overrides)
    flags = TASK_FLAGS[kind]
    for key, value in flags.items():
        if overrides and key in overrides and options[key] != value:
            raise ValueError(f"task {kind!r} needs {key}={value}; remove the option {key}")
        options[key] = value

    build = dict(options)
    tokenizer = build.pop("tokenizer")
    prediction = build.pop("prediction")
    for key in ("diffusion_steps", "noise_schedule", "timestep_respacing"):
        build.pop(key)
    # Train float32 weights (autocast does the mixed precision) and never cache text embeddings.
    build.update(use_fp16=False, cache_text_emb=False)
    model = create_model(**build, tokenizer=tokenizer, use_checkpoint=use_checkpoint)
    if state_dict is not None:
        load_unet_weights(model, state_dict)
    diffusion = create_gaussian_diffusion(
        steps=options["diffusion_steps"], noise_schedule=options["noise_schedule"], prediction=prediction
    )
    return DiffusionTask(kind, model, diffusion, options)


def build_clip_task(
    init: Optional[str] = None,
    overrides: Optional[Dict[str, Any]] = None,
    config_path: Optional[Union[str, Path]] = None,
) -> CLIPTask:
    """The noised CLIP to train.

    :param init: None (random weights), "clip" (the official ``clip/image-enc`` and
        ``clip/text-enc``) or "IMAGE_ENC,TEXT_ENC": two checkpoint names or files.
    :param overrides: config values over the config read from ``config_path``, else the
        ``<image encoder file>.yaml`` sidecar of a local ``init``, else the official config.
    """
    sources = None
    if init is not None:
        sources = CLIP_CHECKPOINTS if init == "clip" else tuple(part.strip() for part in init.split(","))
        if len(sources) != 2:
            raise ValueError(f"--init for clip must be 'clip' or 'IMAGE_ENC,TEXT_ENC', got {init!r}")
        sidecar = Path(f"{checkpoint_path(sources[0])}.yaml") if sources[0] not in MODEL_PATHS else None
        if config_path is None and sidecar is not None and sidecar.is_file():
            config_path = sidecar
    config = apply_overrides(load_clip_config(config_path), overrides)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        clip = create_clip_model(config_path=path)
    if sources is not None:
        clip.image_encoder.load_state_dict(load_checkpoint(sources[0], "cpu"))
        clip.text_encoder.load_state_dict(load_checkpoint(sources[1], "cpu"))
    return CLIPTask(clip, config)


def build_task(
    kind: str,
    init: Optional[str] = None,
    overrides: Optional[Dict[str, Any]] = None,
    use_checkpoint: bool = False,
    clip_config: Optional[Union[str, Path]] = None,
) -> Task:
    """``build_clip_task`` for "clip", else ``build_diffusion_task``."""
    if kind not in TASKS:
        raise ValueError(f"unknown task {kind!r}; expected one of {TASKS}")
    if kind == "clip":
        if use_checkpoint:
            raise ValueError("gradient checkpointing is available for the U-Net tasks only")
        return build_clip_task(init, overrides, clip_config)
    if clip_config is not None:
        raise ValueError("a CLIP config only applies to the clip task")
    return build_diffusion_task(kind, init, overrides, use_checkpoint)


# ---------------------------------------------------------------------- the loop


def rng_state() -> Dict[str, Any]:
    """This process's torch (CPU and CUDA), NumPy and Python RNG states."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": position,
            "has_gauss": has_gauss,
            "cached": cached_gaussian,
        },
        "python": random.getstate(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    random.setstate(state["python"])


def read_state(path: Union[str, Path]) -> Dict[str, Any]:
    """A training state saved by ``Trainer.save``: ``state.pt`` or the folder that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise ValueError(f"no training state at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a training state (format {STATE_FORMAT})")
    return state


def _save_atomically(obj: Any, path: Path) -> None:
    partial = path.with_name(path.name + ".part")
    torch.save(obj, partial)
    os.replace(partial, path)


class Trainer:
    """Trains ``task`` on ``source`` into ``out_dir``.

    ``source`` is a folder or a sequence / iterable of (PIL image, caption) pairs (see
    ``data.as_source``). Call ``load_state(read_state(path))`` to resume, then ``train()``.
    Every process of a ``torchrun`` run builds the same Trainer and passes its
    ``DistributedContext`` (default: one process on the task model's device).
    """

    def __init__(
        self,
        task: Task,
        source: Sequence[Example],
        out_dir: Union[str, Path],
        config: TrainConfig,
        context: Optional[DistributedContext] = None,
    ):
        self.task = task
        self.source = as_source(source)
        self.out_dir = Path(out_dir)
        self.config = config
        self.context = context or DistributedContext(device=next(task.model.parameters()).device)
        device = self.context.device
        if config.precision == "fp16" and device.type != "cuda":
            raise ValueError("fp16 training needs CUDA; use precision 'bf16' or 'fp32' on the CPU")

        task.model.to(device)
        if config.freeze_text_encoder:
            if task.kind == "clip":
                frozen = list(task.model.text_encoder.parameters())
            elif task.model.xf_width:
                frozen = task.model.text_encoder_parameters()
            else:
                raise ValueError("freeze_text_encoder needs a text-conditional U-Net or a CLIP task")
            for param in frozen:
                param.requires_grad_(False)
        module = task.train_module().train()
        if self.context.distributed:
            # Wrapping broadcasts rank 0's weights, so the EMA copy below is the same on every rank.
            module = DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        self.ema = copy.deepcopy(task.model).requires_grad_(False).eval()
        autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
        self.module = _Autocast(module, device.type, autocast_dtype)
        self.params = [p for p in task.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.precision == "fp16")

        self.dataset = task.make_examples(self.source, config)
        self.sampler = ExampleSampler(
            self.dataset, config.batch_size, self.context.world_size, self.context.rank, seed=config.seed
        )
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.sampler.local_batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
            # Examples carry their own seeds; a private generator keeps the loader's worker
            # seeding off the global RNG, whose state (dropout) must not depend on when a
            # loader iterator was started.
            generator=torch.Generator().manual_seed(config.seed),
        )
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self._log_sums: Optional[torch.Tensor] = None
        self._log_count = 0
        self._log_started = time.time()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> Dict[str, Any]:
        """Everything to resume from; collective (every rank must call it), since it gathers
        the RNG states of all ranks."""
        states: List[Any] = [rng_state()]
        if self.context.distributed:
            states = [None] * self.context.world_size
            dist.all_gather_object(states, rng_state())
        return {
            "format": STATE_FORMAT,
            "task": self.task.kind,
            "options": self.task.options,
            "config": dataclasses.asdict(self.config),
            "step": self.step,
            "data": {
                "epoch": self.epoch,
                "batch": self.batch_in_epoch,
                "batches_per_epoch": self.sampler.batches_per_epoch,
            },
            "model": self.task.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": states,
        }

    def load_state(self, state: Dict[str, Any]) -> None:
        """Resume from a state read by ``read_state``."""
        if state["task"] != self.task.kind:
            raise ValueError(f"the training state is of a {state['task']!r} run, not {self.task.kind!r}")
        self.task.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.epoch, self.batch_in_epoch = state["data"]["epoch"], state["data"]["batch"]
        if state["data"]["batches_per_epoch"] != self.sampler.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        rng = state["rng"]
        set_rng_state(rng[self.context.rank] if self.context.rank < len(rng) else rng[0])
        if self.context.is_main:
            self._truncate_log()

    def save(self) -> None:
        """Write ``state.pt`` and the EMA inference weights (rank 0; collective)."""
        state = self.state_dict()
        if not self.context.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.task.save_inference_files(self.ema, self.out_dir)
        _save_atomically(state, self.out_dir / STATE_FILE)

    # ------------------------------------------------------------------ steps

    def batches(self) -> Iterator[Dict[str, torch.Tensor]]:
        """Local batches from the current data position on, on the training device
        (``train_step`` advances the position, into the next epoch after its last batch)."""
        while True:
            self.sampler.set_position(self.epoch, self.batch_in_epoch)
            for batch in self.loader:
                yield {k: v.to(self.context.device, non_blocking=True) for k, v in batch.items()}

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based)."""
        config = self.config
        if config.warmup_steps and step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        if config.lr_schedule == "cosine":
            progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
            return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return config.lr

    def train_step(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimiser step on a local batch; returns [means of the task's terms..., lr, grad norm]."""
        lr = self.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = self.task.losses(self.module, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"].mean()).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.params, self.config.grad_clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.update_ema()

        self.step += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.sampler.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        terms = [losses[name].detach().float().mean() for name in self.task.terms]
        return torch.stack(terms + [torch.tensor(lr, device=grad_norm.device), grad_norm.detach().float()])

    @torch.no_grad()
    def update_ema(self) -> None:
        rate = min(self.config.ema_rate, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.task.model.parameters()), 1.0 - rate)

    @torch.no_grad()
    def evaluate(self, batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Mean loss terms of the current (non-EMA) weights on a local batch, without training."""
        module = self.task.train_module()
        module.eval()
        try:
            losses = self.task.losses(module, {k: v.to(self.context.device) for k, v in batch.items()})
        finally:
            module.train()
        return {name: losses[name].mean().item() for name in self.task.terms}

    def train(self) -> None:
        """Run until ``config.steps``: log, sample and save at their intervals and at the end."""
        config = self.config
        progress = tqdm(
            total=config.steps, initial=self.step, disable=not self.context.is_main, desc=f"train {self.task.kind}"
        )
        batches = self.batches()
        while self.step < config.steps:
            metrics = self.train_step(next(batches))
            self._log_sums = metrics if self._log_sums is None else self._log_sums + metrics
            self._log_count += 1
            progress.update(1)
            last = self.step == config.steps
            if self.step % config.log_every == 0 or self.step % config.save_every == 0 or last:
                row = self.flush_log()
                progress.set_postfix(loss=f"{row['loss']:.4g}")
            if config.sample_every and self.step % config.sample_every == 0 and self.context.is_main:
                self.write_samples()
            if self.step % config.save_every == 0 or last:
                self.save()
        progress.close()

    # ------------------------------------------------------------------ output

    @property
    def log_columns(self) -> List[str]:
        return ["step", "epoch", *self.task.terms, "lr", "grad_norm", "examples_per_sec"]

    def flush_log(self) -> Dict[str, float]:
        """Average the metrics since the last row over steps and ranks and append a row to
        ``log.csv`` (rank 0). Raises on a non-finite loss, before anything is saved."""
        means = self._log_sums / self._log_count
        if self.context.distributed:
            dist.all_reduce(means)
            means = means / self.context.world_size
        elapsed = time.time() - self._log_started
        values = means.tolist()
        row = {"step": self.step, "epoch": self.epoch}
        row.update(zip([*self.task.terms, "lr", "grad_norm"], values))
        row["examples_per_sec"] = self._log_count * self.config.batch_size / max(elapsed, 1e-9)
        self._log_sums, self._log_count, self._log_started = None, 0, time.time()
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"the training loss became {row['loss']} by step {self.step}")
        if self.context.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            path = self.out_dir / LOG_FILE
            new = not path.exists()
            with open(path, "a", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=self.log_columns)
                if new:
                    writer.writeheader()
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        return row

    def _truncate_log(self) -> None:
        """Drop log rows past the resumed step (written after the last save)."""
        path = self.out_dir / LOG_FILE
        if not path.exists():
            return
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.DictReader(f) if int(row["step"]) <= self.step]
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.log_columns)
            writer.writeheader()
            writer.writerows(rows)

    def write_samples(self) -> Optional[Path]:
        """Save a sample grid of the EMA model as ``samples/step_NNNNNN.png`` (U-Nets only)."""
        if not isinstance(self.task, DiffusionTask):
            return None
        grid = self.task.sample_grid(self.ema, self.source, self.config, self.context.device)
        path = self.out_dir / "samples" / f"step_{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed torch, NumPy and Python (per rank, so ranks draw different dropout masks)."""
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    random.seed(seed + rank)
