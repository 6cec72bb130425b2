"""Gaussian diffusion with a learned-range variance (Ho et al. 2020; Nichol & Dhariwal 2021).

The forward process adds noise, ``q(x_t | x_0) = N(sqrt(alphas_cumprod_t) x_0,
(1 - alphas_cumprod_t) I)``; the model predicts the noise ``eps`` and an interpolation
weight between the smallest and largest sensible reverse-process variances. Images are
``[N x C x H x W]`` tensors in ``[-1, 1]``; model outputs are ``[N x 2C x H x W]``
(the mean prediction in the first ``C`` channels, the variance weight in ``[-1, 1]`` in the
last ``C``).

The mean prediction is ``eps`` for every official GLIDE model (``prediction="eps"``). With
``prediction="v"`` it is the velocity of Salimans & Ho (2022), ``v = sqrt(alphas_cumprod_t) eps
- sqrt(1 - alphas_cumprod_t) x_0``: at high noise that is about ``-x_0``, so a small network does
not have to copy ``x_t`` through to its output to predict ``eps``. The diffusion turns it into
``eps = sqrt(alphas_cumprod_t) v + sqrt(1 - alphas_cumprod_t) x_t`` before anything else, so
samplers, guidance and inpainting see eps either way.

Every schedule array is a float64 NumPy array. Values gathered for a batch of timesteps are
float32 tensors on the timesteps' device, cut from a per-device float32 copy of each array
(gathering then casting equals casting then gathering), so no sampling step copies from the
host.

Random numbers: with ``generator=None`` the samplers draw from the global RNG in the
reference order (one ``torch.randn`` start image when ``noise`` is None, then one
``torch.randn_like(x)`` per step, the last step and ``eta = 0`` included). ``generator`` may
instead be a torch.Generator, or a noise source such as glide_text2im.noise.GroupedNoise
(anything with ``randn(shape, device, dtype)``): every draw, in the same order, then comes
from it and the global RNG is left untouched.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .losses import discretized_gaussian_log_likelihood, normal_kl
from .noise import NoiseGenerator, randn

# model(x_t [N x C x ...], t [N] int64, **model_kwargs) -> [N x 2C x ...]
Model = Callable[..., torch.Tensor]
# cond_fn(x_t, t, **model_kwargs) -> gradient of log p(y | x_t), shaped like x_t
CondFn = Callable[..., torch.Tensor]
DenoisedFn = Callable[[torch.Tensor], torch.Tensor]

PREDICTIONS = ("eps", "v")

COEFFICIENT_ARRAYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "alphas_cumprod_next",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Float64 betas [T] of a named schedule.

    "linear": Ho et al.'s 1e-4 .. 0.02 for 1000 steps, scaled by 1000 / T so that any T
    describes the same process. "squaredcos_cap_v2": the cosine schedule of Nichol &
    Dhariwal (eq. 17) with each beta capped at 0.999. "squaredcos_shift_<s>" (s > 0, e.g.
    "squaredcos_shift_4"): that cosine schedule with its signal-to-noise ratio divided by s^2
    at every step (Hoogeboom et al. 2023, "simple diffusion"), so that more of the steps lie at
    the high noise levels where the layout of simple, flat images is decided.
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_diffusion_timesteps, cosine_alpha_bar)
    shift = _cosine_shift(schedule_name)
    if shift is not None:

        def shifted_alpha_bar(tau: float) -> float:
            alpha_bar = cosine_alpha_bar(tau)
            return alpha_bar / (alpha_bar + shift**2 * (1 - alpha_bar))

        return betas_for_alpha_bar(num_diffusion_timesteps, shifted_alpha_bar)
    raise ValueError(
        f"unknown beta schedule {schedule_name!r}: expected 'linear', 'squaredcos_cap_v2' or "
        "'squaredcos_shift_<s>' with a number s > 0"
    )


def cosine_alpha_bar(tau: float) -> float:
    """The cosine schedule's alphas_cumprod at tau in [0, 1] (Nichol & Dhariwal, eq. 17)."""
    return math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2


def _cosine_shift(schedule_name: str) -> Optional[float]:
    """s of a "squaredcos_shift_<s>" name, None for other names."""
    prefix = "squaredcos_shift_"
    if not schedule_name.startswith(prefix):
        return None
    try:
        shift = float(schedule_name[len(prefix):])
    except ValueError:
        return None
    return shift if math.isfinite(shift) and shift > 0 else None


def betas_for_alpha_bar(
    num_diffusion_timesteps: int,
    alpha_bar: Callable[[float], float],
    max_beta: float = 0.999,
) -> np.ndarray:
    """Float64 betas [T] of the process whose alphas_cumprod follows ``alpha_bar(tau)``.

    ``alpha_bar`` maps tau in [0, 1] to the fraction of signal left; step i takes
    ``beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)``.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        tau_start = i / num_diffusion_timesteps
        tau_end = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(tau_end) / alpha_bar(tau_start), max_beta))
    return np.array(betas, dtype=np.float64)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: [N x ...] -> [N]."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def split_model_output(model_output: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A GLIDE model's output [N x 2C x ...] for x [N x C x ...] -> (eps, v), each [N x C x ...].

    Raises ValueError when the output does not have that shape.
    """
    channels = x.shape[1]
    expected = (x.shape[0], 2 * channels, *x.shape[2:])
    if tuple(model_output.shape) != expected:
        raise ValueError(
            f"model output has shape {tuple(model_output.shape)}, expected {expected}: "
            f"eps and variance values for each of the {channels} input channels"
        )
    return torch.split(model_output, channels, dim=1)


def eps_from_prediction(
    prediction: str, mean_output: torch.Tensor, x_t: torch.Tensor, alpha_cumprod: Union[float, torch.Tensor]
) -> torch.Tensor:
    """The eps of a model's mean channels (``prediction`` "eps" or "v"), all shaped like x_t.

    ``alpha_cumprod``: alphas_cumprod_t as a float or a tensor that broadcasts against x_t.
    For "v": eps = sqrt(alphas_cumprod) v + sqrt(1 - alphas_cumprod) x_t.
    """
    if prediction == "eps":
        return mean_output
    if prediction == "v":
        return alpha_cumprod**0.5 * mean_output + (1 - alpha_cumprod) ** 0.5 * x_t
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def _last(steps: Iterator[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The last item of a sampling loop's steps."""
    out = None
    for out in steps:
        pass
    return out


def _default_device(model: Model, noise: Optional[torch.Tensor]) -> torch.device:
    """The model's parameter device, else the given noise's device, else the CPU."""
    if isinstance(model, nn.Module):
        parameter = next(model.parameters(), None)
        if parameter is not None:
            return parameter.device
    if noise is not None:
        return noise.device
    return torch.device("cpu")


def _randn_like(x: torch.Tensor, generator: Optional[NoiseGenerator]) -> torch.Tensor:
    """Standard normal noise shaped like x, from ``generator`` (a torch.Generator, or a noise
    source such as glide_text2im.noise.GroupedNoise) or else the global RNG."""
    if generator is None:
        return torch.randn_like(x)
    return randn(x.shape, generator, x.device, x.dtype)


class GaussianDiffusion:
    """A diffusion process with T = len(betas) steps and its samplers.

    :param betas: float64 [T], each in (0, 1]; step t adds noise of variance betas[t].
    :param prediction: what the model's mean channels predict, "eps" (every official model)
        or "v" (see the module docstring).
    """

    def __init__(self, *, betas: Union[np.ndarray, Sequence[float]], prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")
        self.prediction = prediction
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D array of at least 2 steps, got shape {betas.shape}")
        if not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("every beta must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0) (Ho et al. eqs. 6-7). The variance is 0 at t = 0, so its log
        # there is replaced by the value at t = 1.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        self._coefficient_cache: Dict[torch.device, Dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ coefficients

    def _coefficients(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """Float32 copies of the schedule arrays on ``device``, made once per device."""
        cached = self._coefficient_cache.get(device)
        if cached is None:
            arrays = {name: getattr(self, name) for name in COEFFICIENT_ARRAYS}
            arrays["one_minus_alphas_cumprod"] = 1.0 - self.alphas_cumprod
            arrays["log_betas"] = np.log(self.betas)
            # Cast on the host: some devices (Apple MPS) have no float64.
            cached = {name: torch.from_numpy(array).float().to(device) for name, array in arrays.items()}
            self._coefficient_cache[device] = cached
        return cached

    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Float32 values of array ``name`` at timesteps t [N], shaped [N x 1 x ...] (ndim dims)."""
        values = self._coefficients(t.device)[name][t]
        return values.view(-1, *([1] * (ndim - 1)))

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(
        self, x_start: torch.Tensor, t: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log variance of q(x_t | x_0), each shaped like x_start."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.ndim).expand(x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.ndim).expand(x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) for x_start [N x C x ...] at timesteps t [N].

        ``noise`` (shaped like x_start) defaults to one ``torch.randn_like(x_start)`` draw.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.ndim) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0), each shaped like x_t."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ in shape")
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.ndim) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.ndim) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t.ndim).expand(x_t.shape)
        log_variance_clipped = self._extract("posterior_log_variance_clipped", t, x_t.ndim).expand(x_t.shape)
        return mean, variance, log_variance_clipped

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(1 / alphas_cumprod) x_t - sqrt(1 / alphas_cumprod - 1) eps."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps
        )

    def _predict_eps_from_xstart(
        self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
    ) -> torch.Tensor:
        """The eps that ``_predict_xstart_from_eps`` maps to pred_xstart."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim)

    def split_output(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """A model's output [N x 2C x ...] at (x_t, t) -> (eps, variance values), each like x_t."""
        mean_output, model_var_values = split_model_output(model_output, x_t)
        if self.prediction == "eps":
            return mean_output, model_var_values
        alpha_cumprod = self._extract("alphas_cumprod", t, x_t.ndim)
        return eps_from_prediction(self.prediction, mean_output, x_t, alpha_cumprod), model_var_values

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Run the model and return p(x_{t-1} | x_t) for x [N x C x ...] at timesteps t [N].

        Returns "mean", "variance", "log_variance" and "pred_xstart", each shaped like x.
        ``denoised_fn`` (then the clamp to [-1, 1] if ``clip_denoised``) is applied to the
        predicted x_0 before the mean is computed from it.
        """
        model_output = model(x, t, **(model_kwargs or {}))
        return self._p_mean_variance_from_output(model_output, x, t, clip_denoised, denoised_fn)

    def _p_mean_variance_from_output(
        self,
        model_output: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool,
        denoised_fn: Optional[DenoisedFn],
    ) -> Dict[str, torch.Tensor]:
        eps, model_var_values = self.split_output(model_output, x, t)

        # Learned range (Nichol & Dhariwal eq. 15): log-space interpolation between the
        # posterior variance (v = -1) and beta_t (v = 1).
        min_log = self._extract("posterior_log_variance_clipped", t, x.ndim)
        max_log = self._extract("log_betas", t, x.ndim)
        frac = (model_var_values + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        model_variance = torch.exp(model_log_variance)

        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
        }

    def condition_mean(
        self,
        cond_fn: CondFn,
        p_mean_var: Dict[str, torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> torch.Tensor:
        """Shift the mean by variance * grad log p(y | x_t) (Dhariwal & Nichol, algorithm 1)."""
        gradient = cond_fn(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(
        self,
        cond_fn: CondFn,
        p_mean_var: Dict[str, torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Guide the score instead: eps <- eps - sqrt(1 - alphas_cumprod_t) grad log p(y | x_t).

        (Dhariwal & Nichol, algorithm 2.) Returns a copy of ``p_mean_var`` with "pred_xstart"
        and "mean" recomputed from the guided eps.
        """
        alpha_bar = self._extract("alphas_cumprod", t, x.ndim)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **(model_kwargs or {}))

        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    def _nonzero_mask(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """1.0 where t != 0 else 0.0, shaped [N x 1 x ...]: no noise is added at the last step."""
        return (t != 0).float().view(-1, *([1] * (ndim - 1)))

    def p_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        cond_fn: Optional[CondFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        generator: Optional[NoiseGenerator] = None,
    ) -> Dict[str, torch.Tensor]:
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); returns "sample" and "pred_xstart"."""
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        noise = _randn_like(x, generator)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + self._nonzero_mask(t, x.ndim) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        cond_fn: Optional[CondFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        eta: float = 0.0,
        generator: Optional[NoiseGenerator] = None,
    ) -> Dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2020, eq. 12); returns "sample" and "pred_xstart".

        ``eta`` = 0 is deterministic (the noise is still drawn, as in the reference);
        ``eta`` = 1 matches the variance of ancestral sampling.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])

        alpha_bar = self._extract("alphas_cumprod", t, x.ndim)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.ndim)
        sigma = (
            eta
            * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        noise = _randn_like(x, generator)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        sample = mean_pred + self._nonzero_mask(t, x.ndim) * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        eta: float = 0.0,
    ) -> Dict[str, torch.Tensor]:
        """One deterministic DDIM step forwards, x_t -> x_{t+1}; returns "sample" and "pred_xstart"."""
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample is deterministic and needs eta == 0, got {eta}")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.ndim)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    # ------------------------------------------------------------------ sampling loops

    def _start_image(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor],
        device: Optional[Union[torch.device, str]],
        generator: Optional[NoiseGenerator],
    ) -> torch.Tensor:
        """x_T: ``noise`` (moved to ``device``), or else one normal draw of ``shape`` on ``device``
        from ``generator`` (a torch.Generator, or a noise source such as
        glide_text2im.noise.GroupedNoise) or the global RNG."""
        device = torch.device(device) if device is not None else _default_device(model, noise)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
            return noise.to(device)
        if generator is None:
            return torch.randn(*shape, device=device)
        return randn(shape, generator, device)

    def _reverse_timesteps(self, batch_size: int, device: torch.device, progress: bool) -> Iterator[torch.Tensor]:
        """t = [i] * batch_size (int64, on ``device``) for i from T - 1 down to 0."""
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            indices = tqdm(indices)
        for i in indices:
            yield torch.full((batch_size,), i, dtype=torch.long, device=device)

    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        cond_fn: Optional[CondFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[Union[torch.device, str]] = None,
        progress: bool = False,
        generator: Optional[NoiseGenerator] = None,
    ) -> torch.Tensor:
        """Ancestral sampling from x_T to x_0; returns the final sample [shape] (about [-1, 1]).

        ``noise`` is the start image x_T (default: a fresh normal draw on ``device``, which
        defaults to the model's parameter device, else the CPU). ``generator`` (a
        torch.Generator, or a noise source such as glide_text2im.noise.GroupedNoise) supplies
        every normal draw instead of the global RNG.
        """
        steps = self.p_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, generator
        )
        return _last(steps)["sample"]

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        cond_fn: Optional[CondFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[Union[torch.device, str]] = None,
        progress: bool = False,
        generator: Optional[NoiseGenerator] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Like ``p_sample_loop``, but yield every step's {"sample", "pred_xstart"}."""
        step = functools.partial(
            self.p_sample,
            model,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            generator=generator,
        )
        yield from self._progressive(step, model, shape, noise, device, progress, generator)

    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        cond_fn: Optional[CondFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[Union[torch.device, str]] = None,
        progress: bool = False,
        eta: float = 0.0,
        generator: Optional[NoiseGenerator] = None,
    ) -> torch.Tensor:
        """DDIM sampling from x_T to x_0; returns the final sample [shape]. See ``p_sample_loop``."""
        steps = self.ddim_sample_loop_progressive(
            model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, eta, generator
        )
        return _last(steps)["sample"]

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        clip_denoised: bool = True,
        denoised_fn: Optional[DenoisedFn] = None,
        cond_fn: Optional[CondFn] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: Optional[Union[torch.device, str]] = None,
        progress: bool = False,
        eta: float = 0.0,
        generator: Optional[NoiseGenerator] = None,
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Like ``ddim_sample_loop``, but yield every step's {"sample", "pred_xstart"}."""
        step = functools.partial(
            self.ddim_sample,
            model,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            model_kwargs=model_kwargs,
            eta=eta,
            generator=generator,
        )
        yield from self._progressive(step, model, shape, noise, device, progress, generator)

    def _progressive(
        self,
        step: Callable[[torch.Tensor, torch.Tensor], Dict[str, torch.Tensor]],
        model: Model,
        shape: Sequence[int],
        noise: Optional[torch.Tensor],
        device: Optional[Union[torch.device, str]],
        progress: bool,
        generator: Optional[NoiseGenerator],
    ) -> Iterator[Dict[str, torch.Tensor]]:
        """Run ``step(x, t)`` from x_T down to t = 0 (each step without gradients), yielding its outputs."""
        x = self._start_image(model, shape, noise, device, generator)
        for t in self._reverse_timesteps(shape[0], x.device, progress):
            with torch.no_grad():
                out = step(x, t)
            yield out
            x = out["sample"]

    # ------------------------------------------------------------------ training

    def sample_timesteps(
        self,
        batch_size: int,
        device: Optional[Union[torch.device, str]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Training timesteps [batch_size] (int64), uniform over 0 .. T - 1."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def training_losses(
        self,
        model: Model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[Dict[str, Any]] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """The hybrid loss L_simple + L_vb of Improved DDPM (Nichol & Dhariwal, section 3.1), per example.

        x_start [N x C x ...] in [-1, 1]; t [N] timesteps; ``noise`` defaults to one
        ``torch.randn_like(x_start)`` draw. Returns [N] tensors: "mse" (mean squared error
        of the mean prediction: eps, or v = sqrt(alphas_cumprod) noise - sqrt(1 -
        alphas_cumprod) x_start), "vb" (the variational-bound term of step t in bits per dim,
        scaled by T / 1000; computed with the mean channels detached, so it trains only the
        variance channels) and "loss" = mse + vb.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = model(x_t, t, **(model_kwargs or {}))
        mean_output, model_var_values = split_model_output(model_output, x_t)
        if self.prediction == "v":
            target = (
                self._extract("sqrt_alphas_cumprod", t, x_t.ndim) * noise
                - self._extract("sqrt_one_minus_alphas_cumprod", t, x_t.ndim) * x_start
            )
        else:
            target = noise

        frozen_mean_output = torch.cat([mean_output.detach(), model_var_values], dim=1)
        vb = self._vb_terms_bpd(frozen_mean_output, x_start, x_t, t) * (self.num_timesteps / 1000.0)
        mse = mean_flat((target - mean_output) ** 2)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    def _vb_terms_bpd(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Term t of the variational bound in bits per dim, [N] (Ho et al. eq. 5).

        L_0 = -log p(x_0 | x_1) (discretised decoder) where t == 0, else
        L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)).
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False, denoised_fn=None)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)
