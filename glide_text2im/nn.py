"""Small building blocks shared by the U-Net and the text transformer.

Normalisation layers compute in float32 whatever the activation dtype (the fp16 models keep
their norms in float32), and attention has a reference form (explicit softmax in float32)
and a fast form (``torch.nn.functional.scaled_dot_product_attention``) that gives the same
numbers within float rounding.
"""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype, optionally followed by SiLU."""

    def __init__(self, num_groups: int, num_channels: int, swish: float = 0.0, eps: float = 1e-5):
        super().__init__(num_groups=num_groups, num_channels=num_channels, eps=eps)
        if swish not in (0.0, 1.0):
            raise ValueError(f"swish must be 0.0 (no activation) or 1.0 (SiLU), got {swish}")
        self.swish = swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x.float()).to(x.dtype)
        if self.swish:
            y = F.silu(y)
        return y


def normalization(channels: int, swish: float = 0.0, groups: int = 32) -> GroupNorm32:
    """The U-Net's norm layer: GroupNorm with ``groups`` groups (32 in GLIDE; eps 1e-5), SiLU
    after it if ``swish == 1``."""
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} normalization groups")
    return GroupNorm32(num_groups=groups, num_channels=channels, swish=swish)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution."""
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"unsupported number of dimensions: {dims}")
    return convs[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D average pooling."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"unsupported number of dimensions: {dims}")
    return pools[dims](*args, **kwargs)


def linear(*args, **kwargs) -> nn.Linear:
    return nn.Linear(*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (used for output layers, so a fresh block is the identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep embedding.

    :param timesteps: [N] timesteps (integer or fractional) on the ORIGINAL 0..T-1 scale.
    :param dim: embedding width; an odd width gets one zero column at the end.
    :return: [N x dim] float32, the cosines first: ``[cos(t * f_i), sin(t * f_i)]`` with
        ``f_i = exp(-ln(max_period) * i / (dim // 2))``.
    """
    half = dim // 2
    exponents = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(exponents)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fast: bool = True, causal: bool = False
) -> torch.Tensor:
    """Softmax attention with scale ``1/sqrt(d)``.

    :param q: [... x T x d] queries.
    :param k: [... x S x d] keys.
    :param v: [... x S x d] values.
    :param fast: use ``scaled_dot_product_attention``; otherwise the reference form, which
        scales q and k by ``d^(-1/4)`` each and takes the softmax in float32.
    :param causal: query ``i`` sees keys ``0..i`` only (requires T == S).
    :return: [... x T x d] in the dtype of ``q``.
    """
    if fast:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scale = 1.0 / math.sqrt(math.sqrt(q.shape[-1]))
    weights = (q * scale) @ (k * scale).transpose(-1, -2)
    if causal:
        t, s = weights.shape[-2:]
        keep = torch.ones(t, s, dtype=torch.bool, device=weights.device).tril()
        weights = weights.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
    return weights @ v


def checkpoint(function, inputs: tuple, enabled: bool) -> torch.Tensor:
    """Run ``function(*inputs)``, recomputing its activations in the backward pass when ``enabled``."""
    if not enabled:
        return function(*inputs)
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    return torch_checkpoint(function, *inputs, use_reentrant=False)


def set_fast_attention(module: nn.Module, enabled: bool) -> None:
    """Switch every attention layer below ``module`` between the fast and the reference form."""
    for child in module.modules():
        if hasattr(child, "fast_attention"):
            child.fast_attention = enabled


def first_param_dtype(module: nn.Module, default: Optional[torch.dtype] = None) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    if default is None:
        raise ValueError("module has no parameters")
    return default
