"""Sampling with fewer steps: keep a subset of a diffusion's timesteps (Nichol & Dhariwal, section 4).

A respaced process keeps the alphas_cumprod of the chosen original timesteps, so its betas
are ``1 - alphas_cumprod[kept_i] / alphas_cumprod[kept_{i-1}]``. Its samplers index steps
0 .. K-1; the model and any ``cond_fn`` still receive the ORIGINAL timestep of each step,
``timestep_map[i]``, because that is what they were trained on.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Sequence, Set, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> Set[int]:
    """The set of original timesteps in 0 .. num_timesteps - 1 to keep.

    ``section_counts`` is one of:
    - "ddimN": every s-th step for the first integer stride s that gives exactly N steps;
    - "fast27": the steps of "10,10,3,2,2" with num_timesteps - 1 swapped for num_timesteps - 3;
    - comma-separated counts ("10,15,20") or a list of ints: the steps are cut into that many
      near-equal sections (the first ``num_timesteps % n`` one step longer) and a section of
      S steps taking c of them keeps ``round(k (S - 1) / (c - 1))``, k = 0 .. c - 1 (with
      Python's round-half-to-even on repeatedly added float strides); c <= 1 keeps its first.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _ddim_timesteps(num_timesteps, section_counts)
        if section_counts == "fast27":
            steps = space_timesteps(num_timesteps, "10,10,3,2,2")
            steps.remove(num_timesteps - 1)
            steps.add(num_timesteps - 3)
            return steps
        try:
            counts = [int(count) for count in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"invalid timestep respacing {section_counts!r}: expected 'ddimN', 'fast27' "
                "or comma-separated step counts"
            ) from None
    else:
        counts = list(section_counts)
    return _sectioned_timesteps(num_timesteps, counts, section_counts)


def _ddim_timesteps(num_timesteps: int, spec: str) -> Set[int]:
    try:
        desired_count = int(spec[len("ddim") :])
    except ValueError:
        raise ValueError(f"invalid timestep respacing {spec!r}: expected 'ddim' followed by a step count") from None
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired_count:
            return set(range(0, num_timesteps, stride))
    raise ValueError(
        f"invalid timestep respacing {spec!r}: no integer stride gives exactly {desired_count} "
        f"of {num_timesteps} steps"
    )


def _sectioned_timesteps(num_timesteps: int, counts: List[int], spec: Any) -> Set[int]:
    if not counts:
        raise ValueError(f"invalid timestep respacing {spec!r}: no section counts")
    size_per_section, extra = divmod(num_timesteps, len(counts))
    steps = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per_section + (1 if i < extra else 0)
        if count < 0 or count > size:
            raise ValueError(
                f"invalid timestep respacing {spec!r}: cannot divide section of {size} steps into {count}"
            )
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return set(steps)


class _OriginalTimesteps:
    """Calls ``fn(x, t, **kwargs)`` with respaced step indices t replaced by original timesteps."""

    def __init__(self, fn: Callable[..., torch.Tensor], diffusion: SpacedDiffusion):
        self.fn = fn
        self.diffusion = diffusion

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.fn(x, self.diffusion._timestep_map_on(t.device)[t], **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """The diffusion of ``betas`` (the full original chain) reduced to the steps in ``use_timesteps``."""

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.use_timesteps = set(use_timesteps)
        original = GaussianDiffusion(**kwargs)
        self.original_num_steps = original.num_timesteps
        self.original_betas = original.betas  # the full chain's, so a sampler can respace it again
        if not self.use_timesteps <= set(range(self.original_num_steps)):
            raise ValueError(f"use_timesteps must lie in 0 .. {self.original_num_steps - 1}")
        self.timestep_map = sorted(self.use_timesteps)

        kept_alphas_cumprod = original.alphas_cumprod[self.timestep_map]
        previous_alphas_cumprod = np.append(1.0, kept_alphas_cumprod[:-1])
        kwargs["betas"] = 1.0 - kept_alphas_cumprod / previous_alphas_cumprod
        super().__init__(**kwargs)
        self._timestep_map_cache: Dict[torch.device, torch.Tensor] = {}

    def _timestep_map_on(self, device: torch.device) -> torch.Tensor:
        """``timestep_map`` as an int64 tensor on ``device``, made once per device."""
        cached = self._timestep_map_cache.get(device)
        if cached is None:
            cached = torch.tensor(self.timestep_map, dtype=torch.long, device=device)
            self._timestep_map_cache[device] = cached
        return cached

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(_OriginalTimesteps(model, self), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(_OriginalTimesteps(cond_fn, self), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(_OriginalTimesteps(cond_fn, self), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(_OriginalTimesteps(model, self), *args, **kwargs)
