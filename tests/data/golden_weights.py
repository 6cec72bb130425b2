"""Regenerate the seeded random weights of the small golden models (see ``README.md`` here).

The golden U-Net and CLIP files under ``golden/`` store inputs and outputs only. Their weights
are rebuilt here, bit for bit, by the procedure that made them: build the module, then walk
its ``state_dict()`` in order drawing ``n = torch.randn(shape)`` from ONE generator seeded with
the file's seed, and set

* a parameter of a normalisation layer (``nn.GroupNorm``, ``nn.LayerNorm``, the CLIP
  ``LayerNorm``): ``1 + 0.1 n`` if its name ends in ``weight`` or ``g`` (a gain), else ``0.05 n``;
* any other tensor with ndim >= 2: ``n / sqrt(numel / shape[0])``;
* any other tensor: ``0.05 n``.

Every entry of these state dicts is a float32 parameter (non-persistent buffers such as the
CLIP channel means are not in them), so every entry is drawn.
"""

import hashlib
import math
import tempfile
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from glide_text2im.clip.encoders import LayerNorm as ClipLayerNorm
from glide_text2im.clip.model_creation import create_clip_model
from glide_text2im.model_creation import create_model_and_diffusion

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, ClipLayerNorm)

# golden file -> the keys its regenerated state dicts are stored under
CLIP_STATE_DICT_KEYS = {"text": "text_state_dict", "image": "image_state_dict"}


def norm_parameter_names(module: nn.Module) -> set:
    """Names (as in ``module.state_dict()``) of the parameters owned by normalisation layers."""
    return {
        f"{prefix}.{name}" if prefix else name
        for prefix, child in module.named_modules()
        if isinstance(child, NORM_TYPES)
        for name, _ in child.named_parameters(recurse=False)
    }


def random_state_dict(module: nn.Module, seed: int) -> Dict[str, torch.Tensor]:
    """The seeded random weights for ``module``: same keys, shapes and order as its state dict."""
    norms = norm_parameter_names(module)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, value in module.state_dict().items():
        noise = torch.randn(value.shape, generator=generator)
        if name in norms:
            is_gain = name.endswith("weight") or name.endswith("g")
            weights[name] = 1 + 0.1 * noise if is_gain else 0.05 * noise
        elif value.ndim >= 2:
            weights[name] = noise / math.sqrt(value.numel() / value.shape[0])
        else:
            weights[name] = 0.05 * noise
    return weights


def unet_state_dict(golden: dict) -> Dict[str, torch.Tensor]:
    """The weights of a golden ``unet_*.pt`` file (from its ``options`` and ``randomization_seed``)."""
    model, _ = create_model_and_diffusion(**golden["options"])
    return random_state_dict(model, golden["randomization_seed"])


def clip_state_dicts(golden: dict) -> Dict[str, Dict[str, torch.Tensor]]:
    """The ``text_state_dict`` and ``image_state_dict`` of the golden ``clip.pt`` (from its
    ``config_yaml`` and ``randomization_seeds``)."""
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "config.yaml"
        config_path.write_text(golden["config_yaml"], encoding="utf-8")
        clip = create_clip_model(config_path=config_path, device="cpu")
    encoders = {"text": clip.text_encoder, "image": clip.image_encoder}
    return {
        key: random_state_dict(encoders[part], golden["randomization_seeds"][part])
        for part, key in CLIP_STATE_DICT_KEYS.items()
    }


def regenerated_weights(golden: dict) -> Dict[str, Dict[str, torch.Tensor]]:
    """golden-file key -> regenerated state dict, for a stripped U-Net or CLIP golden file."""
    if "randomization_seeds" in golden:
        return clip_state_dicts(golden)
    return {"state_dict": unet_state_dict(golden)}


def state_dict_sha256(state_dict: Dict[str, torch.Tensor]) -> str:
    """sha256 over every entry in order: its name, shape, dtype and raw bytes."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(f"{name}|{list(tensor.shape)}|{tensor.dtype}\n".encode("utf-8"))
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()
