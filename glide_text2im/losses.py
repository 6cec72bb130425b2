"""Likelihood terms of the diffusion training objective (Ho et al. 2020; Nichol & Dhariwal 2021).

Every function works elementwise and broadcasts its arguments; results are in nats.
"""

from __future__ import annotations

import math
from typing import Union

import torch

TensorOrFloat = Union[torch.Tensor, float]

# Images are 8-bit: 256 levels spread over [-1, 1], so each bin is 2 / 255 wide.
HALF_BIN_WIDTH = 1.0 / 255.0
# Bins whose centre lies beyond these are the edge bins, which take the whole tail.
LOWEST_BIN_BOUND = -0.999
HIGHEST_BIN_BOUND = 0.999


def normal_kl(
    mean1: TensorOrFloat, logvar1: TensorOrFloat, mean2: TensorOrFloat, logvar2: TensorOrFloat
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    At least one argument must be a tensor; floats broadcast against it.
    """
    reference = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if reference is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (
        torch.as_tensor(v, dtype=reference.dtype, device=reference.device) for v in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) of N(0, 1) by the tanh approximation 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Within 2e-4 of the exact CDF everywhere.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log P(x) of 8-bit images under N(means, exp(log_scales)^2) discretised to 256 bins (Ho et al. eq. 13).

    x: images in [-1, 1] on the k / 127.5 - 1 grid; means and log_scales (log standard
    deviations) broadcast against x. Each value owns the probability mass of its bin
    [x - 1/255, x + 1/255]; the lowest bin extends to -inf and the highest to +inf, so
    the 256 probabilities sum to 1. Returns log-probabilities shaped like x.
    """
    if x.shape != means.shape:
        raise ValueError(f"x {tuple(x.shape)} and means {tuple(means.shape)} differ in shape")
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_stdv * (centered_x + HALF_BIN_WIDTH))
    cdf_lower = approx_standard_normal_cdf(inv_stdv * (centered_x - HALF_BIN_WIDTH))

    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin_mass = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(
        x < LOWEST_BIN_BOUND,
        log_cdf_upper,
        torch.where(x > HIGHEST_BIN_BOUND, log_one_minus_cdf_lower, log_bin_mass),
    )
