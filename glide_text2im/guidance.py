"""Small adapters that turn a GLIDE U-Net into what a sampling loop expects.

- :class:`ClassifierFreeGuidance`: the classifier-free-guidance ``model_fn`` of the official
  notebooks (Ho & Salimans 2021; GLIDE section 2.3). The batch holds the prompt rows first
  and as many unconditional rows second; :func:`guided_prompts`, :func:`both_halves` and
  :func:`cond_half` build and read that layout (every caller goes through them).
- :func:`inpaint_denoised_fn`: the ``denoised_fn`` that pastes the known part of the image
  into every x_0 prediction, as the inpainting notebook does.

Both work with ``GaussianDiffusion.p_sample_loop`` / ``ddim_sample_loop`` and with the
samplers of ``glide_text2im.samplers``.
"""

from typing import Any, Callable, List, Optional, Sequence

import torch

DenoisedFn = Callable[[torch.Tensor], torch.Tensor]


class ClassifierFreeGuidance:
    """``model_fn(x_t, t, **model_kwargs)`` returning guided eps for a [prompt rows; unconditional rows] batch.

    The first half of ``x_t`` is evaluated twice, once with the prompt rows of the model
    kwargs and once with the unconditional rows (the model sees ``cat([h, h])``). With
    ``eps_c`` and ``eps_u`` the two predictions,

        eps = eps_u + guidance_scale * (eps_c - eps_u)

    is returned for both halves, followed by the model's variance channels unchanged, so the
    output is [N x 2C x H x W] like the model's. The second half of ``x_t`` is ignored: only
    the first ``N / 2`` samples of a loop are meaningful.

    :param model: a U-Net (or any ``model(x, t, **kwargs)`` -> [N x 2C x H x W]).
    :param guidance_scale: 1 gives the conditional model, 0 the unconditional one.
    """

    def __init__(self, model: Callable[..., torch.Tensor], guidance_scale: float):
        self.model = model
        self.guidance_scale = guidance_scale

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **model_kwargs: Any) -> torch.Tensor:
        model_out = self.model(both_halves(cond_half(x_t)), t, **model_kwargs)
        channels = x_t.shape[1]
        eps, rest = model_out[:, :channels], model_out[:, channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + self.guidance_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


def guided_prompts(prompts: Sequence[Optional[str]]) -> List[Optional[str]]:
    """The prompts of a [cond; uncond] batch: ``prompts``, then one empty prompt (None) per prompt."""
    return list(prompts) + [None] * len(prompts)


def both_halves(x: torch.Tensor) -> torch.Tensor:
    """[N x ...] -> [2N x ...]: the same rows for the cond half and the uncond half (start noise,
    ``low_res``, ``inpaint_image`` / ``inpaint_mask``)."""
    return torch.cat([x, x], dim=0)


def cond_half(x: torch.Tensor) -> torch.Tensor:
    """[2N x ...] -> [N x ...]: the rows of the cond half, the samples a guided loop is run for."""
    if len(x) % 2:
        raise ValueError(
            f"classifier-free guidance needs an even batch (prompt rows, then unconditional rows), got {len(x)}"
        )
    return x[: len(x) // 2]


def inpaint_denoised_fn(inpaint_image: torch.Tensor, inpaint_mask: torch.Tensor) -> DenoisedFn:
    """x_0 -> x_0 * (1 - inpaint_mask) + inpaint_image * inpaint_mask.

    :param inpaint_image: [N x C x H x W] in [-1, 1]: the known image (the notebooks pass the
        image already multiplied by the mask, which gives the same result).
    :param inpaint_mask: [N x 1 x H x W], 1 where the image is kept and 0 where it is generated.
    """
    if inpaint_mask.dim() != 4 or inpaint_mask.shape[1] != 1:
        raise ValueError(f"inpaint_mask must be [N x 1 x H x W], got shape {tuple(inpaint_mask.shape)}")
    if inpaint_image.shape[0] != inpaint_mask.shape[0] or inpaint_image.shape[2:] != inpaint_mask.shape[2:]:
        raise ValueError(
            f"inpaint_image {tuple(inpaint_image.shape)} and inpaint_mask {tuple(inpaint_mask.shape)} "
            "must share batch size, height and width"
        )

    def denoised_fn(x_start: torch.Tensor) -> torch.Tensor:
        return x_start * (1 - inpaint_mask) + inpaint_image * inpaint_mask

    return denoised_fn
