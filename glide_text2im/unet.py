"""The diffusion U-Net and its super-resolution and inpainting variants (ARCHITECTURE.md §2).

``UNetModel`` maps a noisy image ``x_t`` [N x C x H x W] and timesteps [N] to [N x 6 x H x W]:
the predicted noise (3 channels) and the variance interpolation values (3 channels). The
variants only change what is stacked onto ``x`` before the first convolution:

- ``SuperResUNetModel``: ``[x, upsampled low_res]``
- ``InpaintUNetModel``: ``[x, inpaint_image * inpaint_mask, inpaint_mask]``
- ``SuperResInpaintUNetModel``: ``[x, inpaint_image * inpaint_mask, inpaint_mask, upsampled low_res]``

They are written as cooperative subclasses so that the text-conditional classes in
``text2im_model`` reuse them unchanged.
"""

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fp16_util import convert_module_to_f16, convert_module_to_f32
from .nn import (
    attention,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    first_param_dtype,
    linear,
    normalization,
    set_fast_attention,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A block that takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of blocks; each receives what it needs: ``emb`` or the text context ``encoder_out``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, encoder_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, AttentionBlock):
                x = layer(x, encoder_out)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling, optionally followed by a 3×3 convolution."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """×2 downsampling: a strided 3×3 convolution, or 2×2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != self.channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep (+ text) embedding, optionally resampling.

    ``h = conv(norm_act(x))``; ``norm(h) * (1 + scale) + shift`` with ``(scale, shift)`` from
    the embedding (or ``h + emb`` without scale-shift); ``SiLU -> Dropout -> conv``; plus the
    skip path (identity, or a 1×1 convolution when the width changes).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: Optional[int] = None,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint

        self.in_layers = nn.Sequential(
            normalization(channels, swish=1.0, groups=norm_groups),
            nn.Identity(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, groups=norm_groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            norm_act, conv = self.in_layers[:-1], self.in_layers[-1]
            h = conv(self.h_upd(norm_act(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = out_rest(out_norm(h + emb_out))
        return self.skip_connection(x) + h


class QKVAttention(nn.Module):
    """Multi-head attention on packed qkv [N x (heads·3·d) x T], heads outermost.

    With ``encoder_kv`` [N x (heads·2·d) x S] the text keys/values are put in front of the
    image keys/values, so every image position attends to the prompt and to the image.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.fast_attention = True

    def forward(self, qkv: torch.Tensor, encoder_kv: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, width, length = qkv.shape
        d = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(n, self.n_heads, 3 * d, length).split(d, dim=2)  # [N x heads x d x T]
        if encoder_kv is not None:
            ek, ev = encoder_kv.reshape(n, self.n_heads, 2 * d, -1).split(d, dim=2)
            k = torch.cat([ek, k], dim=-1)
            v = torch.cat([ev, v], dim=-1)
        out = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2), fast=self.fast_attention)
        return out.transpose(-1, -2).reshape(n, self.n_heads * d, length)


class AttentionBlock(nn.Module):
    """Spatial self-attention (plus cross-attention to the text context when ``encoder_channels``)."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        encoder_channels: Optional[int] = None,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels are not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels, groups=norm_groups)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads)
        if encoder_channels is not None:
            self.encoder_kv = conv_nd(1, encoder_channels, channels * 2, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor, encoder_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        inputs = (x,) if encoder_out is None else (x, encoder_out)
        return checkpoint(self._forward, inputs, self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor, encoder_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x).reshape(n, c, -1))
        encoder_kv = None if encoder_out is None else self.encoder_kv(encoder_out)
        h = self.proj_out(self.attention(qkv, encoder_kv))
        return x + h.reshape(n, c, *spatial)


class UNetModel(nn.Module):
    """The GLIDE diffusion U-Net.

    :param in_channels: channels of the network input (variants stack more onto ``x``).
    :param model_channels: base width ``C``; level ``i`` has ``C * channel_mult[i]`` channels.
    :param out_channels: 6 for GLIDE (eps and variance values).
    :param num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    :param attention_resolutions: downsample factors (1, 2, 4, ...) at which attention is used.
    :param use_fp16: build the torso in float16 (the same as calling ``convert_to_fp16()``).
    :param num_head_channels: width of each attention head (-1: use ``num_heads`` heads).
    :param encoder_channels: width of the text context that attention layers also attend to.
    :param norm_groups: groups of every GroupNorm (32 in GLIDE). A group's mean is removed,
        so with one channel per group (a 32-channel level) the network cannot pass an image's
        overall colour to its output; narrow models need fewer groups.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        encoder_channels: Optional[int] = None,
        norm_groups: int = 32,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.dropout = dropout
        self.channel_mult = tuple(channel_mult)
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, emb_dim), nn.SiLU(), linear(emb_dim, emb_dim))

        def res_block(ch: int, out: int, **updown) -> ResBlock:
            return ResBlock(
                ch, emb_dim, dropout, out_channels=out, dims=dims, use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm, norm_groups=norm_groups, **updown,
            )

        def attention_block(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch, use_checkpoint=use_checkpoint, num_heads=heads,
                num_head_channels=num_head_channels, encoder_channels=encoder_channels, norm_groups=norm_groups,
            )

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in self.attention_resolutions:
                    layers.append(attention_block(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), attention_block(ch, num_heads), res_block(ch, ch)
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(attention_block(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    up = res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, swish=1.0, groups=norm_groups),
            nn.Identity(),
            zero_module(conv_nd(dims, int(channel_mult[0] * model_channels), out_channels, 3, padding=1)),
        )
        if use_fp16:
            self.convert_to_fp16()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the torso runs in (float16 after ``convert_to_fp16()``)."""
        return first_param_dtype(self.input_blocks)

    def convert_to_fp16(self) -> None:
        """Run the torso's convolutions in float16 (norms and the output head stay float32)."""
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            blocks.apply(convert_module_to_f16)

    def convert_to_fp32(self) -> None:
        for blocks in (self.input_blocks, self.middle_block, self.output_blocks):
            blocks.apply(convert_module_to_f32)

    def use_fast_attention(self, enabled: bool = True) -> None:
        """Use ``scaled_dot_product_attention`` (default) or the reference attention everywhere."""
        set_fast_attention(self, enabled)

    def check_input(self, x: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Raise a ValueError naming the problem if ``x`` or ``timesteps`` cannot be processed."""
        if x.dim() != 4:
            raise ValueError(f"expected an image batch [N x C x H x W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"image size {x.shape[2]}x{x.shape[3]} is not divisible by {factor}, "
                f"which this U-Net's {len(self.channel_mult)} levels need"
            )
        if timesteps.dim() != 1 or timesteps.shape[0] != x.shape[0]:
            raise ValueError(f"expected timesteps of shape [{x.shape[0]}], got {tuple(timesteps.shape)}")

    def run_torso(self, x: torch.Tensor, emb: torch.Tensor, encoder_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Input blocks, middle block, output blocks (with skips) and the output head."""
        h = x.to(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, encoder_out)
            skips.append(h)
        h = self.middle_block(h, emb, encoder_out)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, encoder_out)
        return self.out(h.to(x.dtype))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        :param x: [N x in_channels x H x W] noisy images.
        :param timesteps: [N] timesteps on the original 0..T-1 scale.
        :return: [N x out_channels x H x W].
        """
        self.check_input(x, timesteps)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        return self.run_torso(x, emb)


def _with_in_channels(args: tuple, kwargs: dict, scale) -> tuple:
    """Rewrite the ``in_channels`` constructor argument (positional or keyword) with ``scale(in_channels)``."""
    if "in_channels" in kwargs:
        kwargs = dict(kwargs, in_channels=scale(kwargs["in_channels"]))
    else:
        args = (scale(args[0]),) + tuple(args[1:])
    return args, kwargs


def upsample_low_res(low_res: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize ``low_res`` [N x C x h x w] to the height and width of ``x``."""
    if low_res is None:
        raise ValueError("this super-resolution model needs low_res= (the [N x 3 x h x w] image to upsample)")
    if low_res.dim() != 4 or low_res.shape[0] != x.shape[0]:
        raise ValueError(f"low_res must be [{x.shape[0]} x C x h x w], got shape {tuple(low_res.shape)}")
    return F.interpolate(low_res, x.shape[2:], mode="bilinear", align_corners=False)


def inpaint_channels(
    x: torch.Tensor, inpaint_image: Optional[torch.Tensor], inpaint_mask: Optional[torch.Tensor]
) -> list:
    """``[inpaint_image * inpaint_mask, inpaint_mask]`` (zeros when omitted); mask is 1 where the image is kept."""
    if inpaint_image is None:
        inpaint_image = torch.zeros_like(x)
    if inpaint_mask is None:
        inpaint_mask = torch.zeros_like(x[:, :1])
    if inpaint_image.shape != x.shape:
        raise ValueError(f"inpaint_image must have the shape of x {tuple(x.shape)}, got {tuple(inpaint_image.shape)}")
    if inpaint_mask.shape != (x.shape[0], 1, *x.shape[2:]):
        raise ValueError(
            f"inpaint_mask must be [{x.shape[0]} x 1 x {x.shape[2]} x {x.shape[3]}], got {tuple(inpaint_mask.shape)}"
        )
    return [inpaint_image * inpaint_mask, inpaint_mask]


class SuperResUNetModel(UNetModel):
    """A U-Net that also sees a low-resolution image, upsampled to the size of ``x``."""

    def __init__(self, *args, **kwargs):
        args, kwargs = _with_in_channels(args, kwargs, lambda c: c * 2)
        super().__init__(*args, **kwargs)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, low_res: Optional[torch.Tensor] = None, **kwargs):
        return super().forward(torch.cat([x, upsample_low_res(low_res, x)], dim=1), timesteps, **kwargs)


class InpaintUNetModel(UNetModel):
    """A U-Net that also sees the known part of the image and the mask of what is known."""

    def __init__(self, *args, **kwargs):
        args, kwargs = _with_in_channels(args, kwargs, lambda c: c * 2 + 1)
        super().__init__(*args, **kwargs)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        inpaint_image: Optional[torch.Tensor] = None,
        inpaint_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        inputs = [x, *inpaint_channels(x, inpaint_image, inpaint_mask)]
        return super().forward(torch.cat(inputs, dim=1), timesteps, **kwargs)


class SuperResInpaintUNetModel(UNetModel):
    """Super-resolution and inpainting together: ``[x, image * mask, mask, upsampled low_res]``."""

    def __init__(self, *args, **kwargs):
        args, kwargs = _with_in_channels(args, kwargs, lambda c: c * 3 + 1)
        super().__init__(*args, **kwargs)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        inpaint_image: Optional[torch.Tensor] = None,
        inpaint_mask: Optional[torch.Tensor] = None,
        low_res: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        inputs = [x, *inpaint_channels(x, inpaint_image, inpaint_mask), upsample_low_res(low_res, x)]
        return super().forward(torch.cat(inputs, dim=1), timesteps, **kwargs)
