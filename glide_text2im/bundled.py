"""The checkpoints shipped inside the package: the small demo model family.

The files are package data in ``glide_text2im/demo/weights`` (``.safetensors``, the U-Nets'
``create_model_and_diffusion`` options beside them in ``<file>.json`` and the noised CLIP's
YAML config in ``clip_image_enc.safetensors.yaml``). ``glide_text2im.download`` resolves
these names to the files here, so they load by name, offline::

    load_checkpoint("demo/base", device)        # 64 x 64 text-to-image, classifier-free guidance
    load_checkpoint("demo/upsample", device)    # 64 -> 256 upsampler
    load_checkpoint("demo/base-inpaint", device)
    load_checkpoint("demo/clip/image-enc", device), load_checkpoint("demo/clip/text-enc", device)

This module only knows where the files are; the code that made them (dataset, pixel judge,
training) is ``glide_text2im.demo``, which nothing outside it imports.
"""

import json
import os
from typing import Any, Dict, Optional

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo", "weights")

# Checkpoint name -> file in WEIGHTS_DIR.
CHECKPOINT_FILES: Dict[str, str] = {
    "demo/base": "base.safetensors",
    "demo/upsample": "upsample.safetensors",
    "demo/base-inpaint": "base_inpaint.safetensors",
    "demo/clip/image-enc": "clip_image_enc.safetensors",
    "demo/clip/text-enc": "clip_text_enc.safetensors",
}
UNET_CHECKPOINTS = ("demo/base", "demo/upsample", "demo/base-inpaint")
# The bundled checkpoint that stands in for each official one; there is no bundled inpainting
# upsampler, so demo inpainting stops at 64 x 64.
DEMO_EQUIVALENTS: Dict[str, Optional[str]] = {
    "base": "demo/base",
    "upsample": "demo/upsample",
    "base-inpaint": "demo/base-inpaint",
    "upsample-inpaint": None,
    "clip/image-enc": "demo/clip/image-enc",
    "clip/text-enc": "demo/clip/text-enc",
}


def demo_equivalent(name: Optional[str]) -> Optional[str]:
    """The bundled checkpoint for official checkpoint ``name`` (None where there is none);
    any other name (a file, a bundled or registered name, None) is returned unchanged."""
    return DEMO_EQUIVALENTS[name] if name in DEMO_EQUIVALENTS else name


def weights_path(name: str) -> str:
    """The package-data file of bundled checkpoint ``name``."""
    if name not in CHECKPOINT_FILES:
        raise ValueError(f"unknown bundled checkpoint {name!r}; expected one of {sorted(CHECKPOINT_FILES)}")
    path = os.path.join(WEIGHTS_DIR, CHECKPOINT_FILES[name])
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the bundled weights {path} are missing; rebuild them with "
            f"`python -m glide_text2im.demo.train --out {WEIGHTS_DIR}`"
        )
    return path


def options(name: str) -> Dict[str, Any]:
    """The ``create_model_and_diffusion`` options (``tokenizer`` included) of bundled U-Net ``name``."""
    if name not in UNET_CHECKPOINTS:
        raise ValueError(f"{name!r} is not a bundled U-Net; expected one of {UNET_CHECKPOINTS}")
    with open(weights_path(name) + ".json", encoding="utf-8") as f:
        return json.load(f)


def clip_config_path() -> str:
    """The YAML config of the bundled noised CLIP."""
    return weights_path("demo/clip/image-enc") + ".yaml"
