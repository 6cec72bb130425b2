"""Samplers by name, all called the same way by the pipelines.

A sampler runs a whole loop::

    run(diffusion, model, shape, *, noise, generator, device, model_kwargs, denoised_fn,
        cond_fn, callback) -> final sample [shape]

``noise`` may be None (the sampler draws x_T from ``generator``); ``generator`` is a
torch.Generator, or a noise source such as glide_text2im.noise.GroupedNoise (the pipelines
pass one); ``callback`` receives ``{"sample", "pred_xstart"}`` after every step. Built in:

- ``"ancestral"``: ``diffusion.p_sample_loop`` (the notebooks' base sampler);
- ``"ddim"``: ``diffusion.ddim_sample_loop`` with eta = 0 (the text2im notebook's upsampler).
  With a ``cond_fn`` (CLIP guidance) it runs ``samplers.sample_ddim`` on the same timesteps
  instead: the same DDIM step, but with the guided x_0 clamped to [-1, 1] (see
  ``glide_text2im.samplers``; the original loop's unclamped guided x_0 turns a grid that
  starts at t = 999, such as ``steps="25"``, into noise);
- the few-step samplers of ``glide_text2im.samplers`` under their names there ("plms",
  "dpmpp_2m", ...; its deterministic DDIM stays reachable as ``"ddim"`` of that module only,
  since the name here means the notebooks' loop). They walk every timestep of the (respaced)
  diffusion they are given, and take a ``cond_fn`` too.

Which timesteps a call evaluates is ``samplers.get_timesteps`` of the model's full chain for
its ``steps`` and ``spacing``: a step count goes on the sampler's own grid (``Sampler.spacing``:
"time", the original respacing, for the two notebook loops, so ``steps="100"`` is the notebooks'
grid; "quadratic" for the few-step solvers) unless the call names a spacing, and a respacing
string ("ddim25", "fast27") keeps the original's steps. The diffusion a sampler is handed keeps
exactly those timesteps, and every sampler walks all of them.

:func:`register_sampler` adds more.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Union

import torch

from .. import samplers as fast_samplers
from ..gaussian_diffusion import GaussianDiffusion
from ..noise import NoiseGenerator

StepCallback = Callable[[Dict[str, torch.Tensor]], None]


@dataclass(frozen=True)
class Sampler:
    name: str
    run: Callable[..., torch.Tensor]
    supports_cond_fn: bool
    spacing: str  # the grid a step count is placed on unless the call names one


SAMPLERS: Dict[str, Sampler] = {}


def register_sampler(
    name: str, run: Callable[..., torch.Tensor], supports_cond_fn: bool = False, spacing: str = "quadratic"
) -> None:
    """Make ``run`` (see the module docstring for its signature) available as sampler ``name``;
    a step count is placed on ``spacing`` (see ``samplers.get_timesteps``) unless a call names one."""
    if spacing not in fast_samplers.SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: expected one of {fast_samplers.SPACINGS}")
    SAMPLERS[name] = Sampler(name, run, supports_cond_fn, spacing)


def sampler_spacing(sampler: Sampler, steps: Union[int, str], spacing: Optional[str]) -> Optional[str]:
    """The spacing a call's ``steps`` get: ``spacing`` if named, else the sampler's own for a
    step count (a respacing string such as "ddim25" needs none)."""
    if spacing is None and fast_samplers.is_step_count(steps):
        return sampler.spacing
    return spacing


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def run_ancestral(
    diffusion: GaussianDiffusion,
    model: Callable[..., torch.Tensor],
    shape: Sequence[int],
    *,
    noise: Optional[torch.Tensor],
    generator: NoiseGenerator,
    device: torch.device,
    model_kwargs: Dict[str, Any],
    denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]],
    cond_fn: Optional[Callable[..., torch.Tensor]],
    callback: StepCallback,
) -> torch.Tensor:
    """``p_sample_loop``, reporting every step."""
    steps = diffusion.p_sample_loop_progressive(
        model,
        shape,
        noise=noise,
        clip_denoised=True,
        denoised_fn=denoised_fn,
        cond_fn=cond_fn,
        model_kwargs=model_kwargs,
        device=device,
        generator=generator,
    )
    return _report_each(steps, callback)


def run_ddim(
    diffusion: GaussianDiffusion,
    model: Callable[..., torch.Tensor],
    shape: Sequence[int],
    *,
    noise: Optional[torch.Tensor],
    generator: NoiseGenerator,
    device: torch.device,
    model_kwargs: Dict[str, Any],
    denoised_fn: Optional[Callable[[torch.Tensor], torch.Tensor]],
    cond_fn: Optional[Callable[..., torch.Tensor]],
    callback: StepCallback,
) -> torch.Tensor:
    """``ddim_sample_loop`` with eta = 0, reporting every step; with ``cond_fn``, ``samplers.sample_ddim``."""
    if cond_fn is not None:
        guided_ddim = fast_sampler(fast_samplers.sample_ddim)
        return guided_ddim(
            diffusion, model, shape, noise=noise, generator=generator, device=device,
            model_kwargs=model_kwargs, denoised_fn=denoised_fn, cond_fn=cond_fn, callback=callback,
        )
    steps = diffusion.ddim_sample_loop_progressive(
        model,
        shape,
        noise=noise,
        clip_denoised=True,
        denoised_fn=denoised_fn,
        cond_fn=cond_fn,
        model_kwargs=model_kwargs,
        device=device,
        eta=0.0,
        generator=generator,
    )
    return _report_each(steps, callback)


def _report_each(steps: Iterator[Dict[str, torch.Tensor]], callback: StepCallback) -> torch.Tensor:
    """Pass every step's {"sample", "pred_xstart"} to ``callback``; return the last sample."""
    final = None
    for final in steps:
        callback(final)
    return final["sample"]


def fast_sampler(sample_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Adapt a ``glide_text2im.samplers`` function (all of the diffusion's timesteps)."""

    def run(diffusion, model, shape, *, noise, generator, device, model_kwargs, denoised_fn, cond_fn, callback):
        return sample_fn(
            model,
            diffusion,
            shape,
            noise=noise,
            model_kwargs=model_kwargs,
            denoised_fn=denoised_fn,
            clip_denoised=True,
            device=device,
            callback=lambda step: callback({"sample": step["x"], "pred_xstart": step["pred_xstart"]}),
            generator=generator,
            cond_fn=cond_fn,
        )

    return run


# The notebooks' loops keep the original's even respacing for a step count ("100" is the
# notebooks' grid); the few-step solvers use the quadratic grid they were judged on.
register_sampler("ancestral", run_ancestral, supports_cond_fn=True, spacing="time")
register_sampler("ddim", run_ddim, supports_cond_fn=True, spacing="time")
for _name, _sample_fn in fast_samplers.SAMPLERS.items():
    if _name not in SAMPLERS:
        register_sampler(_name, fast_sampler(_sample_fn), supports_cond_fn=True)
