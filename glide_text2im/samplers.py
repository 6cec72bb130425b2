"""Every sampler of the package, as plain functions with one signature, and their registry.

Every sampler has the same signature and returns a sample [shape] in [-1, 1] (with
``clip_denoised``)::

    sample_<name>(model, diffusion, shape, steps=None, timesteps=None, noise=None,
                  model_kwargs=None, denoised_fn=None, clip_denoised=True, device=None,
                  progress=False, callback=None, generator=None, cond_fn=None, spacing=None)

``SAMPLERS`` holds them by name: "ancestral" and "ddim" (the notebooks' loops, run by the
original ``p_sample_loop`` / ``ddim_sample_loop`` code on exactly the timesteps asked, so they
give the notebooks' numbers), "plms", "dpmpp_2m" (few-step solvers); :func:`register_sampler`
adds more.

- ``model(x_t, t, **model_kwargs)`` returns [N x 2C x H x W]: eps (or v, for a diffusion with
  ``prediction="v"``) in the first C channels (the variance values in the other C are used by
  "ancestral" only). ``t`` [N] int64 holds ORIGINAL timesteps (0 .. 999), so a GLIDE U-Net, a
  classifier-free-guidance ``model_fn``, an inpainting or an upsampler model (``low_res`` in
  ``model_kwargs``) all plug in unchanged. :class:`glide_text2im.denoiser.Denoiser` reads it.
- ``diffusion`` supplies the schedule only: its ``alphas_cumprod`` at its timesteps (the
  original ones in ``timestep_map`` for a respaced diffusion) and its ``prediction``.
- The model is evaluated at ``timesteps`` (original timesteps, strictly decreasing) or else at
  ``get_timesteps(diffusion, steps, spacing)``: one network evaluation per timestep. A step
  count goes on ``spacing``, default the sampler's own (``SPACINGS_OF``: "time", the
  notebooks' respacing, for "ancestral" and "ddim", so ``steps="100"`` is the notebooks' grid;
  "quadratic" for the few-step solvers); a respacing string ("ddim25", "fast27") keeps the
  original's timesteps; ``None``: every timestep of the diffusion.
- ``cond_fn(x_t, t, **model_kwargs)`` [N x C x H x W] (optional) is classifier guidance, e.g. the
  noised CLIP's ``clip_model.cond_fn``: the gradient of log p(y | x_t) times a scale. "ancestral"
  shifts the step's mean by variance times it (the original's ``condition_mean``, the CLIP
  notebook); every other sampler shifts the model's eps to ``eps - sigma_t cond_fn(x_t, t)``
  (Dhariwal & Nichol 2021, algorithm 2) before the x_0 below is formed, so the guided x_0 is
  the one clamped. (The original DDIM loop clamps first; near t = 999, where alphas_cumprod is
  ~1e-8, its unclamped guided x_0 is the gradient times ~1e4, and the sample turns to noise.)
- At every evaluation the predicted x_0 goes through ``denoised_fn`` (e.g. pasting in the known
  part of an image for inpainting) and then the clamp to [-1, 1] (``clip_denoised``), as in
  ``GaussianDiffusion.p_mean_variance``. The few-step solvers return that x_0 prediction at the
  last timestep, the notebooks' loops their last sample.
- ``noise`` is x_T [shape] (default: a normal draw from ``generator`` or the global RNG).
  ``generator`` is a torch.Generator, or a noise source such as
  glide_text2im.noise.GroupedNoise. The few-step solvers draw nothing else; the notebooks'
  loops draw one noise tensor per step, as the original does (DDIM too, which multiplies it by
  eta = 0). ``callback({"i", "t", "x", "pred_xstart"})`` runs after every evaluation: step i
  of ``len(timesteps)``, its timestep, the x_t the model saw and its x_0 prediction.

Notation: ``alpha_t = sqrt(alphas_cumprod_t)``, ``sigma_t = sqrt(1 - alphas_cumprod_t)``, so
``x_t = alpha_t x_0 + sigma_t eps``, and the log signal-to-noise ratio
``lambda_t = log(alpha_t / sigma_t)``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .denoiser import CondFn, DenoisedFn, Denoiser, Model, classifier_guided, xstart_from_eps
from .gaussian_diffusion import GaussianDiffusion
from .noise import NoiseGenerator, randn
from .respace import SpacedDiffusion, space_timesteps

# callback({"i": step index, "t": original timestep, "x": x_t [N x C x ...], "pred_xstart": x_0 [N x C x ...]})
Callback = Callable[[Dict[str, Any]], None]
SamplerFn = Callable[..., torch.Tensor]

# Adams-Bashforth weights of orders 1..4 for eps_i, eps_{i-1}, ... (newest first).
ADAMS_BASHFORTH = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)
SPACINGS = ("quadratic", "time", "logsnr")
NOTEBOOK_SPACING = "time"  # the notebooks' loops: a step count is the original respacing
FAST_SPACING = "quadratic"  # the few-step solvers' grid


Steps = Union[int, str]


def is_step_count(steps: Optional[Steps]) -> bool:
    """True for a number of steps (an int, or a string of digits such as ``"25"``), False for
    ``None`` and for the original's other respacing strings (``"ddim25"``, ``"fast27"``, ``"10,10,5"``)."""
    if isinstance(steps, bool):
        return False
    return isinstance(steps, int) or (isinstance(steps, str) and steps.isdigit())


def get_timesteps(
    diffusion: GaussianDiffusion, steps: Optional[Steps] = None, spacing: Optional[str] = None
) -> List[int]:
    """Original timesteps to evaluate the model at, strictly decreasing: the one timestep grid
    of the package (the samplers, the pipelines, the CLI and the benchmark all take it from here).

    ``steps`` picks from the diffusion's K timesteps (999 .. 0 for the full chain):
    - ``None``: all of them;
    - a step count (an int or a string of digits) placed on ``spacing`` (default "quadratic").
      With ``u_k = 1 - k / (steps - 1)`` the k-th step takes index (into the diffusion's
      timesteps; = t for the full chain):
      - "quadratic": ``(K - 1) u_k^2``, DPM-Solver's "time_quadratic" grid: even steps in
        sqrt(t), so more of them near t = 0, where the fine detail is made;
      - "time": evenly in t, exactly the indices the original respacing ``str(steps)`` keeps
        (``respace.space_timesteps``), the grid of the DDIM and PLMS papers and the notebooks;
      - "logsnr": the index whose lambda_t is nearest to an even grid in lambda, DPM-Solver's
        suggestion for pixel-space models (with the cosine schedule's capped last beta, many
        steps land in t > 990, where the image is still pure noise);
      rounded indices that coincide are moved apart to stay distinct;
    - another respacing string of the original ("ddim25", "fast27", "10,10,5"): the indices
      ``respace.space_timesteps(K, steps)`` keeps (``spacing`` must then be None).
    """
    available = _available_timesteps(diffusion)
    if steps is None:
        return available[::-1]
    if not is_step_count(steps):
        if not isinstance(steps, str):
            raise TypeError(f"steps must be an int or a respacing string, got {steps!r}")
        if spacing is not None:
            raise ValueError(f"spacing {spacing!r} places a step count; steps {steps!r} is a respacing string")
        return _respaced(available, steps)
    spacing = "quadratic" if spacing is None else spacing
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: expected one of {SPACINGS}")
    steps = int(steps)
    if not 1 <= steps <= len(available):
        raise ValueError(f"steps must be in 1 .. {len(available)} (the diffusion's timesteps), got {steps}")
    if spacing == "time":
        return _respaced(available, str(steps))
    u = np.linspace(1.0, 0.0, steps)
    if spacing == "quadratic":
        targets = np.round((len(available) - 1) * u**2)
    else:
        alphas_cumprod = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
        lambdas = 0.5 * (np.log(alphas_cumprod) - np.log1p(-alphas_cumprod))
        grid = lambdas[0] + (lambdas[-1] - lambdas[0]) * u
        targets = np.abs(lambdas[None, :] - grid[:, None]).argmin(axis=1)
    positions: List[int] = []
    for k, target in enumerate(targets.astype(int)):
        highest = positions[-1] - 1 if positions else len(available) - 1
        lowest = steps - 1 - k  # one index left for each step still to come
        positions.append(min(max(int(target), lowest), highest))
    return [available[p] for p in positions]


@torch.no_grad()
def sample_ancestral(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    steps: Optional[Steps] = None,
    timesteps: Optional[Sequence[int]] = None,
    noise: Optional[torch.Tensor] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    denoised_fn: Optional[DenoisedFn] = None,
    clip_denoised: bool = True,
    device: Optional[Union[torch.device, str]] = None,
    progress: bool = False,
    callback: Optional[Callback] = None,
    generator: Optional[NoiseGenerator] = None,
    cond_fn: Optional[CondFn] = None,
    spacing: Optional[str] = None,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020), the notebooks' base sampler: ``p_sample_loop`` of the
    diffusion respaced to the timesteps, with the original's ``cond_fn`` (a shifted mean)."""
    timesteps = _timesteps(diffusion, steps, timesteps, spacing, NOTEBOOK_SPACING)
    noise = _start_image(model, shape, noise, device, generator)
    loop = _keeping(diffusion, timesteps).p_sample_loop_progressive(
        model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
        model_kwargs=model_kwargs, device=device, progress=progress, generator=generator,
    )
    return _run_original_loop(loop, timesteps, noise, callback)


@torch.no_grad()
def sample_ddim(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    steps: Optional[Steps] = None,
    timesteps: Optional[Sequence[int]] = None,
    noise: Optional[torch.Tensor] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    denoised_fn: Optional[DenoisedFn] = None,
    clip_denoised: bool = True,
    device: Optional[Union[torch.device, str]] = None,
    progress: bool = False,
    callback: Optional[Callback] = None,
    generator: Optional[NoiseGenerator] = None,
    cond_fn: Optional[CondFn] = None,
    spacing: Optional[str] = None,
) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2020, eq. 12 with eta = 0), the text2im notebook's
    upsampler: ``ddim_sample_loop`` of the diffusion respaced to the timesteps. A ``cond_fn`` is
    folded into the model's eps first (``denoiser.classifier_guided``), so the guided x_0 is clamped."""
    timesteps = _timesteps(diffusion, steps, timesteps, spacing, NOTEBOOK_SPACING)
    if cond_fn is not None:
        model = classifier_guided(model, cond_fn, _full_alphas_cumprod(diffusion), diffusion.prediction)
    noise = _start_image(model, shape, noise, device, generator)
    loop = _keeping(diffusion, timesteps).ddim_sample_loop_progressive(
        model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
        model_kwargs=model_kwargs, device=device, progress=progress, eta=0.0, generator=generator,
    )
    return _run_original_loop(loop, timesteps, noise, callback)


@torch.no_grad()
def sample_plms(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    steps: Optional[Steps] = None,
    timesteps: Optional[Sequence[int]] = None,
    noise: Optional[torch.Tensor] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    denoised_fn: Optional[DenoisedFn] = None,
    clip_denoised: bool = True,
    device: Optional[Union[torch.device, str]] = None,
    progress: bool = False,
    callback: Optional[Callback] = None,
    generator: Optional[NoiseGenerator] = None,
    cond_fn: Optional[CondFn] = None,
    spacing: Optional[str] = None,
) -> torch.Tensor:
    """PLMS, pseudo linear multistep (Liu et al. 2022, "PNDM"): 4th-order Adams-Bashforth on eps.

    Each step combines the model's last four eps, ``eps' = (55 eps_i - 59 eps_{i-1} +
    37 eps_{i-2} - 9 eps_{i-3}) / 24``, and moves along the DDIM transfer with eps' (the x_0
    it implies goes through ``denoised_fn`` and the clamp). Warm-up: the first three steps use
    the lower Adams-Bashforth orders 1, 2 and 3 (order 1 is plain DDIM), so every step costs one
    network evaluation; the paper's Runge-Kutta warm-up (and the pseudo improved Euler first
    step of the latent-diffusion code) would spend extra evaluations instead.
    """
    timesteps = _timesteps(diffusion, steps, timesteps, spacing, FAST_SPACING)
    alphas_cumprod = _alphas_cumprod_at(diffusion, timesteps)
    x = _start_image(model, shape, noise, device, generator)
    denoiser = Denoiser(model, diffusion.prediction, model_kwargs, cond_fn, denoised_fn, clip_denoised)
    last = len(timesteps) - 1
    eps_history: List[torch.Tensor] = []
    for i in _iterate(timesteps, progress):
        eps, pred_xstart = denoiser(x, timesteps[i], alphas_cumprod[i])
        _report(callback, i, timesteps[i], x, pred_xstart)
        if i < last:
            eps_history = (eps_history + [eps])[-len(ADAMS_BASHFORTH) :]
            weights = ADAMS_BASHFORTH[len(eps_history) - 1]
            eps_prime = sum(w * e for w, e in zip(weights, reversed(eps_history)))
            xstart_prime = denoiser.process_xstart(xstart_from_eps(x, eps_prime, alphas_cumprod[i]))
            x = _ddim_step(x, xstart_prime, alphas_cumprod[i], alphas_cumprod[i + 1])
    return pred_xstart


@torch.no_grad()
def sample_dpmpp_2m(
    model: Model,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    steps: Optional[Steps] = None,
    timesteps: Optional[Sequence[int]] = None,
    noise: Optional[torch.Tensor] = None,
    model_kwargs: Optional[Dict[str, Any]] = None,
    denoised_fn: Optional[DenoisedFn] = None,
    clip_denoised: bool = True,
    device: Optional[Union[torch.device, str]] = None,
    progress: bool = False,
    callback: Optional[Callback] = None,
    generator: Optional[NoiseGenerator] = None,
    cond_fn: Optional[CondFn] = None,
    spacing: Optional[str] = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, algorithm 2): second-order multistep on the x_0 prediction in log-SNR time.

    With ``h_i = lambda_{i+1} - lambda_i``, ``r = h_{i-1} / h_i`` and the x_0 predictions D:
    ``x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} (1 - exp(-h_i)) D'`` where
    ``D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}`` (``D' = D_0`` at the first step, which makes it a
    DDIM step).
    """
    timesteps = _timesteps(diffusion, steps, timesteps, spacing, FAST_SPACING)
    alphas_cumprod = _alphas_cumprod_at(diffusion, timesteps)
    x = _start_image(model, shape, noise, device, generator)
    denoiser = Denoiser(model, diffusion.prediction, model_kwargs, cond_fn, denoised_fn, clip_denoised)
    alphas = np.sqrt(alphas_cumprod)
    sigmas = np.sqrt(1.0 - alphas_cumprod)
    lambdas = np.log(alphas) - np.log(sigmas)
    last = len(timesteps) - 1
    previous_xstart = None
    for i in _iterate(timesteps, progress):
        _, pred_xstart = denoiser(x, timesteps[i], alphas_cumprod[i])
        _report(callback, i, timesteps[i], x, pred_xstart)
        if i < last:
            h = float(lambdas[i + 1] - lambdas[i])
            if previous_xstart is None:
                denoised = pred_xstart
            else:
                r = float(lambdas[i] - lambdas[i - 1]) / h
                denoised = pred_xstart + (1 / (2 * r)) * (pred_xstart - previous_xstart)
            x = float(sigmas[i + 1] / sigmas[i]) * x + float(-alphas[i + 1] * math.expm1(-h)) * denoised
            previous_xstart = pred_xstart
    return pred_xstart


SAMPLERS: Dict[str, SamplerFn] = {}
# name -> the spacing a step count of that sampler goes on when a call names none
SPACINGS_OF: Dict[str, str] = {}


def register_sampler(name: str, sample_fn: SamplerFn, spacing: str = FAST_SPACING) -> None:
    """Make ``sample_fn`` (the signature of the module docstring) available as sampler ``name``
    (to the pipelines and the command too); ``spacing``: where its step counts go by default,
    as ``sample_fn`` itself places them."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: expected one of {SPACINGS}")
    SAMPLERS[name] = sample_fn
    SPACINGS_OF[name] = spacing


def get_sampler(name: str) -> SamplerFn:
    """The sampler registered as ``name``; an unknown name is a ValueError listing the known ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sampler_spacing(name: str, steps: Optional[Steps], spacing: Optional[str] = None) -> Optional[str]:
    """The spacing sampler ``name`` places ``steps`` on: ``spacing`` if given, else the
    sampler's own for a step count (None for a respacing string such as "ddim25")."""
    if spacing is None and is_step_count(steps):
        return SPACINGS_OF[name]
    return spacing


register_sampler("ancestral", sample_ancestral, NOTEBOOK_SPACING)
register_sampler("ddim", sample_ddim, NOTEBOOK_SPACING)
register_sampler("plms", sample_plms)
register_sampler("dpmpp_2m", sample_dpmpp_2m)


# ---------------------------------------------------------------------- shared steps


def _available_timesteps(diffusion: GaussianDiffusion) -> List[int]:
    """The original timesteps whose alphas_cumprod the diffusion knows, increasing."""
    return [int(t) for t in getattr(diffusion, "timestep_map", range(diffusion.num_timesteps))]


def _respaced(available: List[int], respacing: str) -> List[int]:
    """The timesteps of ``available`` (increasing) that ``respace.space_timesteps`` keeps, decreasing."""
    return [available[i] for i in sorted(space_timesteps(len(available), respacing), reverse=True)]


def _timesteps(
    diffusion: GaussianDiffusion,
    steps: Optional[Steps],
    timesteps: Optional[Sequence[int]],
    spacing: Optional[str],
    default_spacing: str,
) -> List[int]:
    """The timesteps a sampler call evaluates: ``timesteps`` checked, or those of ``steps``."""
    if timesteps is None:
        if spacing is None and is_step_count(steps):
            spacing = default_spacing
        return get_timesteps(diffusion, steps, spacing)
    if steps is not None or spacing is not None:
        raise ValueError("pass either steps or timesteps, not both (spacing places steps)")
    return _check_timesteps(timesteps, _available_timesteps(diffusion))


def _check_timesteps(timesteps: Sequence[int], available: List[int]) -> List[int]:
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
        raise ValueError("timesteps is empty")
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"timesteps must be strictly decreasing, got {timesteps}")
    unknown = sorted(set(timesteps) - set(available))
    if unknown:
        raise ValueError(
            f"timesteps {unknown} are not timesteps of this diffusion "
            f"({len(available)} steps from {available[0]} to {available[-1]})"
        )
    return timesteps


def _alphas_cumprod_at(diffusion: GaussianDiffusion, timesteps: List[int]) -> np.ndarray:
    """The diffusion's float64 alphas_cumprod at the original ``timesteps``."""
    index = {t: i for i, t in enumerate(_available_timesteps(diffusion))}
    return np.array([diffusion.alphas_cumprod[index[t]] for t in timesteps], dtype=np.float64)


def _full_alphas_cumprod(diffusion: GaussianDiffusion) -> np.ndarray:
    """alphas_cumprod of the full chain the diffusion was respaced from (indexed by original t)."""
    return np.cumprod(1.0 - _full_betas(diffusion))


def _keeping(diffusion: GaussianDiffusion, timesteps: List[int]) -> GaussianDiffusion:
    """The diffusion whose steps are exactly ``timesteps``: ``diffusion`` itself when it has no
    others (so the original loops on a notebook's respaced diffusion are the notebook's), else
    its full chain respaced to them, as ``create_gaussian_diffusion(timestep_respacing=...)`` does."""
    if sorted(timesteps) == _available_timesteps(diffusion):
        return diffusion
    return SpacedDiffusion(use_timesteps=timesteps, betas=_full_betas(diffusion), prediction=diffusion.prediction)


def _full_betas(diffusion: GaussianDiffusion) -> np.ndarray:
    """The betas of the full chain the diffusion was respaced from (its own for an unrespaced one)."""
    return getattr(diffusion, "original_betas", diffusion.betas)


def _run_original_loop(
    loop: Iterator[Dict[str, torch.Tensor]],
    timesteps: List[int],
    noise: torch.Tensor,
    callback: Optional[Callback],
) -> torch.Tensor:
    """Run an original ``*_progressive`` loop started at x_T = ``noise``, reporting each step; its last sample."""
    x = noise
    out = None
    for i, out in enumerate(loop):
        _report(callback, i, timesteps[i], x, out["pred_xstart"])
        x = out["sample"]
    return out["sample"]


def _start_image(
    model: Model,
    shape: Sequence[int],
    noise: Optional[torch.Tensor],
    device: Optional[Union[torch.device, str]],
    generator: Optional[NoiseGenerator],
) -> torch.Tensor:
    """``noise`` on ``device``, or a normal draw; the device defaults to the noise's, else the model's."""
    shape = tuple(int(s) for s in shape)
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {shape}")
        return noise if device is None else noise.to(device)
    if device is None:
        parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        device = parameter.device if parameter is not None else torch.device("cpu")
    return randn(shape, generator, device)


def _iterate(timesteps: List[int], progress: bool):
    indices = range(len(timesteps))
    return tqdm(indices) if progress else indices


def _ddim_step(x: torch.Tensor, pred_xstart: torch.Tensor, alpha_cumprod: float, alpha_cumprod_next: float) -> torch.Tensor:
    """x_next = alpha_next x_0 + sigma_next eps, with the eps that maps x_t to this x_0."""
    eps = (math.sqrt(1.0 / alpha_cumprod) * x - pred_xstart) / math.sqrt(1.0 / alpha_cumprod - 1.0)
    return math.sqrt(alpha_cumprod_next) * pred_xstart + math.sqrt(1.0 - alpha_cumprod_next) * eps


def _report(callback: Optional[Callback], i: int, t: int, x: torch.Tensor, pred_xstart: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "pred_xstart": pred_xstart})
