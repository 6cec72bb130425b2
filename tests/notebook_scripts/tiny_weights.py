"""Tiny random stand-ins for the six official checkpoints, for running notebooks offline.

``write_notebook_weights(folder)`` writes what the notebooks read when ``GLIDE_NOTEBOOK_WEIGHTS``
names ``folder``: for each U-Net checkpoint ``<name>.json`` (options that replace the
defaults) and ``<name>.pt`` (its state dict); for the noised CLIP ``clip-config.yaml``,
``clip-image-enc.pt`` and ``clip-text-enc.pt`` ("/" in a checkpoint name becomes "-").

Every parameter is drawn from a seeded generator (scaled by 1/sqrt(fan-in)), so the
networks' outputs are neither zero nor different from run to run.
"""

import json
import math
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import yaml

import glide_text2im.clip.model_creation as clip_model_creation
import glide_text2im.download as download
import glide_text2im.model_creation as model_creation
from glide_text2im.clip.model_creation import create_clip_model
from glide_text2im.model_creation import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_and_diffusion_defaults_upsampler,
)

TINY_UNET = dict(
    num_channels=32,
    num_res_blocks=1,
    num_head_channels=16,
    attention_resolutions="16,8",
    xf_width=32,
    xf_layers=1,
    xf_heads=1,
    text_ctx=16,
)
TINY_BASE = dict(TINY_UNET, channel_mult="1,1,2,2")  # 64×64: 4 levels
# 256×256: 6 levels; one block per level (on the way up only) halves the cost of the
# 256×256 level, which dominates the whole test run.
TINY_UPSAMPLE = dict(TINY_UNET, channel_mult="1,1,1,1,2,2", num_res_blocks=0)

# checkpoint name -> (official defaults function, tiny size overrides, inpaint)
UNET_CHECKPOINTS: Dict[str, Tuple[Callable[[], dict], dict, bool]] = {
    "base": (model_and_diffusion_defaults, TINY_BASE, False),
    "base-inpaint": (model_and_diffusion_defaults, TINY_BASE, True),
    "upsample": (model_and_diffusion_defaults_upsampler, TINY_UPSAMPLE, False),
    "upsample-inpaint": (model_and_diffusion_defaults_upsampler, TINY_UPSAMPLE, True),
}

TINY_CLIP_CONFIG = dict(
    logit_scale=100.0,
    beta_schedule="squaredcos_cap_v2",
    n_timesteps=1000,
    image_size=64,
    patch_size=8,
    n_vocab=49408,  # every id the CLIP tokenizer produces
    max_text_len=16,
    n_embd=32,
    n_head_state_text=16,
    n_head_text=2,
    n_xf_blocks_text=1,
    n_head_state_image=16,
    n_head_image=2,
    n_xf_blocks_image=1,
)


def file_stem(name: str) -> str:
    """The file name (without suffix) of checkpoint ``name``: "clip/image-enc" -> "clip-image-enc"."""
    return name.replace("/", "-")


def tiny_options(name: str) -> dict:
    """All options of U-Net checkpoint ``name``: the official defaults with tiny sizes, float32."""
    defaults, sizes, inpaint = UNET_CHECKPOINTS[name]
    return dict(defaults(), **sizes, inpaint=inpaint, use_fp16=False)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter with N(0, 1/fan_in) values drawn from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            fan_in = param[0].numel() if param.dim() > 1 else 1
            param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
    return module


def tiny_state_dict(name: str) -> Dict[str, torch.Tensor]:
    """Random weights for U-Net checkpoint ``name`` in the layout of ``tiny_options(name)``."""
    model, _ = create_model_and_diffusion(**tiny_options(name))
    return randomize_(model, _seed(name)).state_dict()


def tiny_clip_state_dicts(config_path: Path) -> Dict[str, Dict[str, torch.Tensor]]:
    """Random weights for "clip/image-enc" and "clip/text-enc" built from the YAML ``config_path``."""
    clip = create_clip_model(config_path=config_path, device="cpu")
    return {
        "clip/image-enc": randomize_(clip.image_encoder, _seed("clip/image-enc")).state_dict(),
        "clip/text-enc": randomize_(clip.text_encoder, _seed("clip/text-enc")).state_dict(),
    }


def write_clip_config(path: Path) -> Path:
    path.write_text(yaml.safe_dump(TINY_CLIP_CONFIG, sort_keys=False))
    return path


def write_notebook_weights(folder: Path, timestep_respacing: Optional[Dict[str, str]] = None) -> Path:
    """Write tiny weights for all six checkpoints into ``folder`` (see the module docstring).

    :param timestep_respacing: per U-Net checkpoint name, a respacing written into its
        options file, replacing the notebook's own (fewer steps for a faster run).
    """
    folder.mkdir(parents=True, exist_ok=True)
    timestep_respacing = timestep_respacing or {}
    for name, (_, sizes, _) in UNET_CHECKPOINTS.items():
        overrides = dict(sizes)
        if name in timestep_respacing:
            overrides["timestep_respacing"] = timestep_respacing[name]
        (folder / f"{file_stem(name)}.json").write_text(json.dumps(overrides, indent=2))
        torch.save(tiny_state_dict(name), folder / f"{file_stem(name)}.pt")
    config_path = write_clip_config(folder / "clip-config.yaml")
    for name, state_dict in tiny_clip_state_dicts(config_path).items():
        torch.save(state_dict, folder / f"{file_stem(name)}.pt")
    return folder


def use_tiny_official_weights(monkeypatch, folder: Path) -> List[str]:
    """Make code that uses the official checkpoints run on the tiny ones in ``folder``.

    Patches ``glide_text2im.download.load_checkpoint`` (official names only), the
    ``model_and_diffusion_defaults*`` functions (official options with tiny sizes) and the
    packaged CLIP config. Code must import these names after the call (as a script does).
    Returns the list to which every loaded checkpoint name is appended.
    """
    loaded = []

    def load_checkpoint(name, device, progress=True, cache_dir=None, chunk_size=4096):
        if name not in download.MODEL_PATHS:
            raise ValueError(f"{name!r} is not an official checkpoint name")
        loaded.append(name)
        return torch.load(folder / f"{file_stem(name)}.pt", map_location=device, weights_only=True)

    monkeypatch.setattr(download, "load_checkpoint", load_checkpoint)
    monkeypatch.setattr(
        model_creation, "model_and_diffusion_defaults", lambda: dict(model_and_diffusion_defaults(), **TINY_BASE)
    )
    monkeypatch.setattr(
        model_creation,
        "model_and_diffusion_defaults_upsampler",
        lambda: dict(model_and_diffusion_defaults_upsampler(), **TINY_UPSAMPLE),
    )
    monkeypatch.setattr(clip_model_creation, "DEFAULT_CONFIG_PATH", folder / "clip-config.yaml")
    return loaded


def _seed(name: str) -> int:
    return zlib.crc32(name.encode())
