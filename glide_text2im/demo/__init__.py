"""The embedded demo: a procedural captioned dataset of coloured shapes, a pixel judge, and a
small GLIDE model family trained on it (shipped as package data in ``demo/weights``, as
``.safetensors`` files).

Importing this module (``glide_text2im.download`` does) registers the demo checkpoints, so
they load by name like the official ones, offline::

    load_checkpoint("demo/base", device)        # 64 x 64 text-to-image, classifier-free guidance
    load_checkpoint("demo/upsample", device)    # 64 -> 256 upsampler
    load_checkpoint("demo/base-inpaint", device)
    load_checkpoint("demo/clip/image-enc", device), load_checkpoint("demo/clip/text-enc", device)

``options(name)`` gives the ``create_model_and_diffusion`` options of a U-Net (the JSON
sidecar beside its weights, which the pipelines also read) and ``clip_config_path()`` the
YAML config of the noised CLIP, whose captions use ``clip_tokenizer.ByteCLIPTokenizer``.
``python -m glide_text2im.demo.train`` retrains them all.
"""

import json
import os
from typing import Any, Dict, Optional

from glide_text2im.download import register_checkpoint

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")

# Checkpoint name -> file in WEIGHTS_DIR (the U-Nets' options beside them in ``<file>.json``).
CHECKPOINT_FILES = {
    "demo/base": "base.safetensors",
    "demo/upsample": "upsample.safetensors",
    "demo/base-inpaint": "base_inpaint.safetensors",
    "demo/clip/image-enc": "clip_image_enc.safetensors",
    "demo/clip/text-enc": "clip_text_enc.safetensors",
}
UNET_CHECKPOINTS = ("demo/base", "demo/upsample", "demo/base-inpaint")
# The demo checkpoint that stands in for each official one; the demo has no inpainting
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
    """The demo checkpoint for official checkpoint ``name`` (None where the demo has none);
    any other name (a file, a demo or registered name, None) is returned unchanged."""
    return DEMO_EQUIVALENTS[name] if name in DEMO_EQUIVALENTS else name


def weights_path(name: str) -> str:
    """The package-data file of demo checkpoint ``name``."""
    if name not in CHECKPOINT_FILES:
        raise ValueError(f"unknown demo checkpoint {name!r}; expected one of {sorted(CHECKPOINT_FILES)}")
    path = os.path.join(WEIGHTS_DIR, CHECKPOINT_FILES[name])
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the demo weights {path} are missing; rebuild them with "
            f"`python -m glide_text2im.demo.train --out {WEIGHTS_DIR}`"
        )
    return path


def options(name: str) -> Dict[str, Any]:
    """The ``create_model_and_diffusion`` options (``tokenizer`` included) of demo U-Net ``name``."""
    if name not in UNET_CHECKPOINTS:
        raise ValueError(f"{name!r} is not a demo U-Net; expected one of {UNET_CHECKPOINTS}")
    with open(weights_path(name) + ".json", encoding="utf-8") as f:
        return json.load(f)


def clip_config_path() -> str:
    """The YAML config of the demo noised CLIP."""
    return weights_path("demo/clip/image-enc") + ".yaml"


for _name in CHECKPOINT_FILES:
    register_checkpoint(_name, lambda name=_name: weights_path(name))
