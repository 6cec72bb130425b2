"""The text transformer that encodes a prompt for the U-Net (ARCHITECTURE.md §2).

Pre-LayerNorm residual blocks without any attention mask: every position, padding included,
attends to every other. Module names match the checkpoints (``resblocks.{i}.attn.c_qkv``, ...).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import attention


class LayerNorm(nn.LayerNorm):
    """LayerNorm (eps 1e-5) computed in float32 and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class MultiheadAttention(nn.Module):
    """Self-attention over [N x T x width]; ``c_qkv`` packs q, k, v contiguously per head."""

    def __init__(self, n_ctx: int, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"xf_width {width} is not divisible by xf_heads {heads}")
        self.n_ctx = n_ctx
        self.width = width
        self.heads = heads
        self.c_qkv = nn.Linear(width, width * 3)
        self.c_proj = nn.Linear(width, width)
        self.fast_attention = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        qkv = self.c_qkv(x).view(n, t, self.heads, -1).transpose(1, 2)  # [N x heads x T x 3d]
        q, k, v = qkv.chunk(3, dim=-1)
        out = attention(q, k, v, fast=self.fast_attention)  # [N x heads x T x d]
        return self.c_proj(out.transpose(1, 2).reshape(n, t, self.width))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, width * 4)
        self.c_proj = nn.Linear(width * 4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_ctx: int, width: int, heads: int):
        super().__init__()
        self.attn = MultiheadAttention(n_ctx, width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = MLP(width)
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """``layers`` residual attention blocks over [N x n_ctx x width]."""

    def __init__(self, n_ctx: int, width: int, layers: int, heads: int):
        super().__init__()
        self.n_ctx = n_ctx
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(n_ctx, width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x
