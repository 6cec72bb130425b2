"""A GLIDE network seen as a denoiser: the one place that reads a model's output.

A GLIDE U-Net returns [N x 2C x H x W] for x_t [N x C x H x W]: in the first C channels eps
(or v, for a diffusion with ``prediction="v"``), in the other C the learned-variance values.
:class:`Denoiser` turns that into what a sampler steps with, at one timestep:

- ``eps``: the noise prediction, with classifier guidance ``cond_fn`` folded in as
  ``eps - sigma_t cond_fn(x_t, t)`` (Dhariwal & Nichol 2021, algorithm 2; the original's
  ``condition_score``);
- ``pred_xstart``: the x_0 that eps implies, through ``denoised_fn`` (inpainting pastes the
  known pixels here) and the clamp to [-1, 1] (``clip_denoised``).

The variance half is dropped: the few-step samplers need only the mean. The original
``GaussianDiffusion.p_mean_variance`` keeps its own reading (with the variance), unchanged, so
the original loops give the original numbers; :func:`classifier_guided` lets those loops take
the same guided eps.

Notation: ``alpha_cumprod`` is alphas_cumprod_t of the full chain, ``sigma_t = sqrt(1 - alpha_cumprod)``.
"""

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from .gaussian_diffusion import eps_from_prediction, split_model_output

# model(x_t [N x C x ...], t [N] int64 original timesteps, **model_kwargs) -> [N x 2C x ...]
Model = Callable[..., torch.Tensor]
DenoisedFn = Callable[[torch.Tensor], torch.Tensor]
# cond_fn(x_t, t [N] int64 original timesteps, **model_kwargs) -> grad_x log p(y | x_t), scaled
CondFn = Callable[..., torch.Tensor]


class Denoiser:
    """``denoiser(x_t, t, alpha_cumprod) -> (eps, pred_xstart)``, each [N x C x H x W].

    :param model: a GLIDE U-Net or any ``model(x_t, t, **model_kwargs)`` -> [N x 2C x H x W]
        (a classifier-free-guidance ``model_fn`` included).
    :param prediction: what the first C output channels hold, "eps" or "v".
    :param model_kwargs: passed to ``model`` and ``cond_fn`` at every call.
    :param cond_fn: classifier guidance (optional), e.g. the noised CLIP's ``clip_model.cond_fn``.
    :param denoised_fn: applied to every x_0 prediction before the clamp (optional).
    :param clip_denoised: clamp x_0 to [-1, 1].
    """

    def __init__(
        self,
        model: Model,
        prediction: str = "eps",
        model_kwargs: Optional[Dict[str, Any]] = None,
        cond_fn: Optional[CondFn] = None,
        denoised_fn: Optional[DenoisedFn] = None,
        clip_denoised: bool = True,
    ):
        self.model = model
        self.prediction = prediction
        self.model_kwargs = model_kwargs or {}
        self.cond_fn = cond_fn
        self.denoised_fn = denoised_fn
        self.clip_denoised = clip_denoised

    def __call__(self, x: torch.Tensor, t: int, alpha_cumprod: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """The guided eps at (x_t, t) and the processed x_0 it implies; ``t`` an original timestep."""
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        mean_output, _ = split_model_output(self.model(x, t_batch, **self.model_kwargs), x)
        eps = eps_from_prediction(self.prediction, mean_output, x, alpha_cumprod)
        if self.cond_fn is not None:
            eps = eps - math.sqrt(1.0 - alpha_cumprod) * self.cond_fn(x, t_batch, **self.model_kwargs)
        return eps, self.process_xstart(xstart_from_eps(x, eps, alpha_cumprod))

    def process_xstart(self, pred_xstart: torch.Tensor) -> torch.Tensor:
        """x_0 -> ``denoised_fn(x_0)``, clamped to [-1, 1] with ``clip_denoised``."""
        if self.denoised_fn is not None:
            pred_xstart = self.denoised_fn(pred_xstart)
        if self.clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        return pred_xstart


def xstart_from_eps(x: torch.Tensor, eps: torch.Tensor, alpha_cumprod: float) -> torch.Tensor:
    """x_0 = sqrt(1 / alphas_cumprod) x_t - sqrt(1 / alphas_cumprod - 1) eps."""
    return math.sqrt(1.0 / alpha_cumprod) * x - math.sqrt(1.0 / alpha_cumprod - 1.0) * eps


def classifier_guided(model: Model, cond_fn: CondFn, alphas_cumprod: Sequence[float], prediction: str = "eps") -> Model:
    """``model`` with ``cond_fn`` folded into its mean channels, as :class:`Denoiser` does.

    The result returns [N x 2C x ...] like ``model``: eps' = eps - sigma_t cond_fn (or the v
    that gives eps', ``v' = v - sqrt((1 - alphas_cumprod_t) / alphas_cumprod_t) cond_fn``) and
    the variance values unchanged. So an original loop (``ddim_sample_loop``) run on it with
    ``cond_fn=None`` clamps the guided x_0, where its own ``cond_fn`` handling guides after the
    clamp. ``alphas_cumprod``: the full chain's, indexed by the original timestep t.
    """
    scales = [math.sqrt(1.0 - a) / (math.sqrt(a) if prediction == "v" else 1.0) for a in alphas_cumprod]
    scales_on: Dict[torch.device, torch.Tensor] = {}

    def guided(x: torch.Tensor, t: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        mean_output, variance_values = split_model_output(model(x, t, **model_kwargs), x)
        if x.device not in scales_on:
            scales_on[x.device] = torch.tensor(scales, dtype=torch.float32, device=x.device)
        scale = scales_on[x.device][t].to(mean_output.dtype).view(-1, *([1] * (x.ndim - 1)))
        return torch.cat([mean_output - scale * cond_fn(x, t, **model_kwargs), variance_values], dim=1)

    return guided
