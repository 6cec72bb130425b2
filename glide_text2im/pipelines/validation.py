"""The argument checks that the pipelines and the ``glide-text2im`` command share.

Each check raises a one-line error that names the argument (``name``: the keyword of a
pipeline call by default, the option when the command calls it, e.g. ``"--seed"``): a
TypeError for a value of the wrong kind, a ValueError for one out of range.
"""

import math
import numbers
from typing import Any, Dict, List, Mapping, Tuple

import torch

MAX_SEED = 2**63 - 1


def check_prompts(prompts: Any, name: str = "prompts") -> List[str]:
    """A prompt or a sequence of prompts as a non-empty list of str."""
    if isinstance(prompts, str):
        return [prompts]
    if prompts is None or isinstance(prompts, (bytes, Mapping)) or not hasattr(prompts, "__iter__"):
        raise TypeError(f"{name} must be a str or a sequence of str, got {_describe(prompts)}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{name} is empty: give at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"{name}[{i}] must be a str, got {_describe(prompt)}")
    return prompts


def check_count(value: Any, name: str) -> int:
    """``value`` if it is an int >= 1 (``num_images_per_prompt``, ``-n``, ``--batch-size``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {_describe(value)}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def check_seed(seed: Any, name: str = "seed") -> None:
    """Raise unless ``seed`` is None, an int in [0, 2**63 - 1], or a list / tuple of such ints."""
    if seed is None:
        return
    for value in seed if isinstance(seed, (list, tuple)) else [seed]:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int >= 0 (or a list of them, one per prompt), got {_describe(value)}")
        if not 0 <= value <= MAX_SEED:
            raise ValueError(f"{name} must be an int in [0, 2**63 - 1], got {value}")


def check_guidance_scale(scale: Any, name: str = "guidance_scale") -> float:
    """``scale`` as a float if it is a finite number >= 0 (0 turns the guidance off)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a finite number >= 0, got {_describe(scale)}")
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {scale}")
    return float(scale)


def check_square_image(size: Tuple[int, int], what: str = "image") -> None:
    """Raise unless a (width, height) image is square: the models would see it squashed."""
    width, height = size
    if width != height:
        raise ValueError(
            f"{what} is {width}x{height} pixels but must be square: the model sees a square image, "
            "so this one would be squashed; crop it to a square first"
        )


def load_weights(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], checkpoint: str) -> None:
    """``model.load_state_dict(state_dict)`` (strict), or a one-line ValueError saying how the two differ."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    resized = [key for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    if missing or unexpected or resized:
        problems = []
        if resized:
            key = resized[0]
            shapes = f"checkpoint {list(state_dict[key].shape)}, model {list(expected[key].shape)}"
            problems.append(f"{len(resized)} tensors have other shapes (first {key}: {shapes})")
        if missing:
            problems.append(f"{len(missing)} model tensors are missing (first {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors are not in the model (first {unexpected[0]})")
        advice = "build the model with the options the checkpoint was trained with"
        if checkpoint.startswith("demo/"):
            advice += f" (glide_text2im.demo.options({checkpoint!r}))"
        raise ValueError(f"checkpoint {checkpoint!r} does not fit the model: {'; '.join(problems)}: {advice}")
    model.load_state_dict(state_dict)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"
