"""The two towers of the noised CLIP model: a causal text transformer and a timestep-aware ViT.

Module and parameter names are the state-dict keys of the official ``clip/text-enc`` and
``clip/image-enc`` checkpoints (``blocks.block_3.f_attn.f_q.w`` ...), so those checkpoints
load strictly. Both towers share one pre-LN transformer block:

    h = h + f_c(attention(f_q(ln(h)), f_k(ln(h)), f_v(ln(h))))
    h = h + f_2(gelu(f_1(ln(h))))

The image tower sees noised images x_t together with their diffusion timestep t, so it can
guide sampling at every step (GLIDE, Nichol et al. 2021).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Per-channel statistics of the CLIP training images, on the [0, 255] pixel scale.
IMAGE_CHANNEL_MEANS = (122.77093945, 116.74601272, 104.09373519)
IMAGE_CHANNEL_STDS = (68.50053285, 66.63215831, 70.32316309)


class LayerNorm(nn.Module):
    """Layer norm over the last axis with gain ``g`` and bias ``b``, computed in float32."""

    def __init__(self, n_state: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(n_state))
        self.b = nn.Parameter(torch.zeros(n_state))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.layer_norm(x.float(), self.g.shape, self.g.float(), self.b.float(), self.eps)
        return out.to(x.dtype)


class Affine(nn.Module):
    """y = x·wᵀ + b with ``w`` [n_out x n_in] and an optional bias ``b`` [n_out]."""

    def __init__(self, n_in: int, n_out: int, use_bias: bool = True):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in) / math.sqrt(n_in))
        self.b = nn.Parameter(torch.zeros(n_out)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w, self.b)


class Attention(nn.Module):
    """Pre-LN multi-head self-attention with a residual connection: [N x L x C] -> [N x L x C].

    C = n_head · n_head_state. Keys carry no bias. Logits are q·k / sqrt(n_head_state); the
    reference scales q and k by n_head_state^(-1/4) each, which is the same up to rounding
    (the tests compare this fused path with that plain formulation).
    ``causal`` lets position i attend only to positions 0..i.
    """

    def __init__(self, n_state: int, n_head: int, causal: bool):
        super().__init__()
        if n_state % n_head != 0:
            raise ValueError(f"n_state={n_state} is not divisible by n_head={n_head}")
        self.n_head = n_head
        self.causal = causal
        self.ln = LayerNorm(n_state)
        self.f_q = Affine(n_state, n_state)
        self.f_k = Affine(n_state, n_state, use_bias=False)
        self.f_v = Affine(n_state, n_state)
        self.f_c = Affine(n_state, n_state)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, length, n_state = h.shape
        x = self.ln(h)
        q, k, v = (
            f(x).view(n, length, self.n_head, n_state // self.n_head).transpose(1, 2)
            for f in (self.f_q, self.f_k, self.f_v)
        )
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return h + self.f_c(a.transpose(1, 2).reshape(n, length, n_state))


class MLP(nn.Module):
    """Pre-LN feed-forward layer with a residual connection: C -> 4C -> C with exact GELU."""

    def __init__(self, n_state: int):
        super().__init__()
        self.ln = LayerNorm(n_state)
        self.f_1 = Affine(n_state, 4 * n_state)
        self.f_2 = Affine(4 * n_state, n_state)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.f_2(F.gelu(self.f_1(self.ln(h))))


class TransformerBlock(nn.Module):
    """One residual attention layer followed by one residual MLP: [N x L x C] -> [N x L x C]."""

    def __init__(self, n_state: int, n_head: int, causal: bool):
        super().__init__()
        self.f_attn = Attention(n_state, n_head, causal)
        self.f_mlp = MLP(n_state)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.f_mlp(self.f_attn(h))


class TextEmbedding(nn.Module):
    """Token plus position embedding: tokens [N x L] int64 -> h [N x L x C]."""

    def __init__(self, n_vocab: int, max_text_len: int, n_state: int):
        super().__init__()
        self.w_voc = nn.Parameter(0.02 * torch.randn(n_vocab, n_state))
        self.w_pos = nn.Parameter(0.01 * torch.randn(max_text_len, n_state))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.w_voc[tokens] + self.w_pos


class TextOutput(nn.Module):
    """Pools each sequence at its last real token (position lens − 1): h -> [N x n_embd]."""

    def __init__(self, n_state: int, n_embd: int):
        super().__init__()
        self.ln = LayerNorm(n_state)
        self.f = Affine(n_state, n_embd, use_bias=False)

    def forward(self, h: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        pooled = h[torch.arange(h.shape[0], device=h.device), lens - 1]
        return self.f(self.ln(pooled))


class TextEncoder(nn.Module):
    """Causal text transformer: (tokens [N x max_text_len] int64, lens [N] int64) -> [N x n_embd].

    ``lens`` counts the real tokens of each row including the start and end tokens (as returned
    by ``SimpleTokenizer.padded_tokens_and_len``); the embedding is read at position lens − 1.
    """

    def __init__(
        self,
        n_vocab: int,
        max_text_len: int,
        n_embd: int,
        n_head: int,
        n_xf_blocks: int,
        n_head_state: int,
    ):
        super().__init__()
        self.n_vocab = n_vocab
        self.max_text_len = max_text_len
        self.n_xf_blocks = n_xf_blocks
        n_state = n_head * n_head_state
        self.blocks = nn.ModuleDict({"input": TextEmbedding(n_vocab, max_text_len, n_state)})
        for i in range(n_xf_blocks):
            self.blocks[f"block_{i}"] = TransformerBlock(n_state, n_head, causal=True)
        self.blocks["output"] = TextOutput(n_state, n_embd)

    def forward(self, tokens: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        self._check_inputs(tokens, lens)
        h = self.blocks["input"](tokens)
        for i in range(self.n_xf_blocks):
            h = self.blocks[f"block_{i}"](h)
        return self.blocks["output"](h, lens)

    def _check_inputs(self, tokens: torch.Tensor, lens: torch.Tensor) -> None:
        if tokens.ndim != 2 or tokens.shape[1] != self.max_text_len:
            raise ValueError(
                f"tokens must be [N x {self.max_text_len}], got shape {tuple(tokens.shape)}"
            )
        if tokens.dtype.is_floating_point or lens.dtype.is_floating_point:
            raise TypeError("tokens and lens must be integer tensors")
        if lens.shape != tokens.shape[:1]:
            raise ValueError(
                f"lens must have shape [{tokens.shape[0]}] to match tokens, got {tuple(lens.shape)}"
            )
        if len(lens) > 0 and (lens.min() < 1 or lens.max() > self.max_text_len):
            raise ValueError(f"lens must lie in [1, {self.max_text_len}], got {lens.tolist()}")


class ImageEmbedding(nn.Module):
    """Pixels [N x 3 x S x S] in [0, 255] and timesteps [N] -> tokens [N x (1 + (S/P)^2) x C].

    Pixels are standardised per channel with CLIP's image statistics. The first token is the timestep embedding ``w_t[t]``; the others are the non-overlapping
    P×P patches in row-major order, projected by ``patch_proj`` (a stride-P convolution).
    """

    def __init__(self, image_size: int, patch_size: int, n_state: int, n_timesteps: int):
        super().__init__()
        n_patches = (image_size // patch_size) ** 2
        self.patch_size = patch_size
        self.w_t = nn.Parameter(0.02 * torch.randn(n_timesteps, n_state))
        fan_in = 3 * patch_size * patch_size
        self.patch_proj = nn.Parameter(
            torch.randn(n_state, 3, patch_size, patch_size) / math.sqrt(fan_in)
        )
        self.w_pos = nn.Parameter(0.01 * torch.randn(n_patches + 1, n_state))
        self.ln = LayerNorm(n_state)
        means = torch.tensor(IMAGE_CHANNEL_MEANS).view(1, 3, 1, 1)
        stds = torch.tensor(IMAGE_CHANNEL_STDS).view(1, 3, 1, 1)
        self.register_buffer("channel_means", means, persistent=False)
        self.register_buffer("channel_stds", stds, persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = (x - self.channel_means.to(x.dtype)) / self.channel_stds.to(x.dtype)
        patches = F.conv2d(x, self.patch_proj, stride=self.patch_size)
        patches = patches.flatten(2).transpose(1, 2)
        h = torch.cat([self.w_t[t].unsqueeze(1).to(patches.dtype), patches], dim=1)
        return self.ln(h + self.w_pos)


class ImageOutput(nn.Module):
    """Reads the timestep token (position 0): h [N x L x C] -> [N x n_embd]."""

    def __init__(self, n_state: int, n_embd: int):
        super().__init__()
        self.ln = LayerNorm(n_state)
        self.f = Affine(n_state, n_embd, use_bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.f(self.ln(h[:, 0]))


class ImageEncoder(nn.Module):
    """Noised-image ViT: (x [N x 3 x S x S] in [0, 255], t [N] int64) -> [N x n_embd].

    ``t`` is the timestep of the original (un-respaced) diffusion chain, in [0, n_timesteps).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        n_embd: int,
        n_head: int,
        n_xf_blocks: int,
        n_head_state: int,
        n_timesteps: int,
    ):
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        self.image_size = image_size
        self.n_timesteps = n_timesteps
        self.n_xf_blocks = n_xf_blocks
        n_state = n_head * n_head_state
        self.blocks = nn.ModuleDict(
            {"input": ImageEmbedding(image_size, patch_size, n_state, n_timesteps)}
        )
        for i in range(n_xf_blocks):
            self.blocks[f"block_{i}"] = TransformerBlock(n_state, n_head, causal=False)
        self.blocks["output"] = ImageOutput(n_state, n_embd)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._check_inputs(x, t)
        h = self.blocks["input"](x, t)
        for i in range(self.n_xf_blocks):
            h = self.blocks[f"block_{i}"](h)
        return self.blocks["output"](h)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor) -> None:
        size = self.image_size
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"images must be [N x 3 x {size} x {size}], got shape {tuple(x.shape)}"
            )
        if x.shape[2:] != (size, size):
            raise ValueError(
                f"images must be {size}x{size} pixels, got {x.shape[2]}x{x.shape[3]}"
            )
        if t is None:
            raise ValueError("timesteps are missing: the noised CLIP needs t for every image")
        if not isinstance(t, torch.Tensor) or t.shape != x.shape[:1]:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"timesteps must be a tensor of shape [{x.shape[0]}], got {shape}")
        if t.dtype.is_floating_point:
            raise TypeError("timesteps must be an integer tensor (indices into the chain)")
        if len(t) > 0 and (t.min() < 0 or t.max() >= self.n_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.n_timesteps}), got {t.tolist()}")
