"""Text-conditional U-Nets: the four GLIDE (filtered) checkpoint classes.

The prompt's tokens go through a transformer (``xf.py``); its last position, projected to the
timestep-embedding width, is added to the timestep embedding, and all positions become the
context that every attention layer of the U-Net also attends to.
"""

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .fp16_util import convert_linear_to_f16, convert_linear_to_f32
from .nn import timestep_embedding
from .unet import InpaintUNetModel, SuperResInpaintUNetModel, SuperResUNetModel, UNetModel
from .xf import LayerNorm, Transformer


class Text2ImUNet(UNetModel):
    """A U-Net conditioned on a prompt.

    :param text_ctx: number of prompt tokens (128 for the official models).
    :param xf_width: width ``W`` of the text transformer (0 disables text conditioning).
    :param xf_layers: transformer blocks.
    :param xf_heads: attention heads of the transformer.
    :param xf_final_ln: LayerNorm after the last block.
    :param tokenizer: an encoder with ``encode``, ``n_vocab``, ``end_token`` and
        ``padded_tokens_and_mask``; ``None`` means the GPT-2 BPE encoder, loaded on first use of
        ``model.tokenizer`` (so building a model needs no vocabulary files).
    :param cache_text_emb: keep the first text embedding until ``del_cache()``.
    :param xf_padding: replace padding positions by a learned ``padding_embedding``.
    :param unet_kwargs: everything ``UNetModel`` takes.
    """

    def __init__(
        self,
        text_ctx: int,
        xf_width: int,
        xf_layers: int,
        xf_heads: int,
        xf_final_ln: bool,
        tokenizer: Any = None,
        *args,
        cache_text_emb: bool = False,
        xf_padding: bool = False,
        **unet_kwargs,
    ):
        use_fp16 = unet_kwargs.pop("use_fp16", False)
        encoder_channels = xf_width if xf_width else None
        super().__init__(*args, **unet_kwargs, encoder_channels=encoder_channels)
        self.text_ctx = text_ctx
        self.xf_width = xf_width
        self.xf_padding = xf_padding
        self.cache_text_emb = cache_text_emb
        self._tokenizer = tokenizer
        self.del_cache()
        if xf_width:
            self._build_text_encoder(xf_layers, xf_heads, xf_final_ln)
        if use_fp16:
            self.convert_to_fp16()

    def _build_text_encoder(self, xf_layers: int, xf_heads: int, xf_final_ln: bool) -> None:
        text_ctx, xf_width, tokenizer = self.text_ctx, self.xf_width, self._tokenizer
        n_vocab = tokenizer.n_vocab if tokenizer is not None else _BPE_N_VOCAB
        self.transformer = Transformer(text_ctx, xf_width, xf_layers, xf_heads)
        self.final_ln = LayerNorm(xf_width) if xf_final_ln else None
        # Token embeddings start as small as the positional ones (CLIP's init): with
        # nn.Embedding's unit variance the positions are drowned out and a model trained from
        # scratch reads its prompt as an unordered bag of tokens.
        self.token_embedding = nn.Embedding(n_vocab, xf_width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.positional_embedding = nn.Parameter(torch.randn(text_ctx, xf_width) * 0.01)
        if self.xf_padding:
            self.padding_embedding = nn.Parameter(torch.randn(text_ctx, xf_width) * 0.01)
        self.transformer_proj = nn.Linear(xf_width, self.model_channels * 4)

    @property
    def tokenizer(self) -> Any:
        """The prompt encoder (the lowercased GPT-2 BPE unless another was given)."""
        if self._tokenizer is None:
            from .tokenizer.bpe import get_encoder

            self._tokenizer = get_encoder()
        return self._tokenizer

    def convert_to_fp16(self) -> None:
        super().convert_to_fp16()
        self.del_cache()
        if self.xf_width:
            for module in (self.transformer, self.transformer_proj, self.token_embedding):
                module.apply(convert_linear_to_f16)

    def convert_to_fp32(self) -> None:
        super().convert_to_fp32()
        self.del_cache()
        if self.xf_width:
            for module in (self.transformer, self.transformer_proj, self.token_embedding):
                module.apply(convert_linear_to_f32)

    def text_encoder_parameters(self) -> List[nn.Parameter]:
        """The prompt encoder's weights up to ``transformer_proj`` (exclusive): the token,
        positional and padding embeddings, the transformer and its final LayerNorm; none
        without text conditioning."""
        if not self.xf_width:
            return []
        modules = [self.token_embedding, self.transformer] + ([self.final_ln] if self.final_ln is not None else [])
        params = [p for module in modules for p in module.parameters()] + [self.positional_embedding]
        return params + ([self.padding_embedding] if self.xf_padding else [])

    def del_cache(self) -> None:
        """Forget the cached text embedding."""
        self.cache: Optional[Dict[str, torch.Tensor]] = None
        self._step_cache: Optional[tuple] = None

    def _check_tokens(self, tokens: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> None:
        if tokens is None:
            raise ValueError("this text-conditional model needs tokens= ([N x text_ctx] token ids)")
        if tokens.dim() != 2 or tokens.shape[1] != self.text_ctx:
            raise ValueError(f"tokens must be [N x {self.text_ctx}] (text_ctx), got shape {tuple(tokens.shape)}")
        if self.xf_padding:
            if mask is None:
                raise ValueError("this model uses xf_padding and needs mask= ([N x text_ctx] bool, True on tokens)")
            if mask.shape != tokens.shape:
                raise ValueError(f"mask must have the shape of tokens {tuple(tokens.shape)}, got {tuple(mask.shape)}")

    def get_text_emb(self, tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Encode a batch of prompts.

        :param tokens: [N x text_ctx] int64 token ids, padded with the end token.
        :param mask: [N x text_ctx] bool, True on real tokens (needed with ``xf_padding``).
        :return: ``{"xf_proj": [N x 4C], "xf_out": [N x W x text_ctx]}``.
        """
        self._check_tokens(tokens, mask)
        if self.cache_text_emb and self.cache is not None:
            if not (tokens is self.cache["tokens"] or torch.equal(tokens, self.cache["tokens"])):
                raise ValueError("cache_text_emb is set and the tokens changed: call model.del_cache() first")
            return self.cache
        if self._step_cache is not None and not torch.is_grad_enabled():
            key, _, outputs = self._step_cache
            if key == self._prompt_key(tokens, mask):
                return outputs

        xf_in = self.token_embedding(tokens.long()) + self.positional_embedding[None]
        if self.xf_padding:
            xf_in = torch.where(mask[..., None], xf_in, self.padding_embedding[None])
        xf_out = self.transformer(xf_in.to(self.dtype))
        if self.final_ln is not None:
            xf_out = self.final_ln(xf_out)
        outputs = dict(xf_proj=self.transformer_proj(xf_out[:, -1]), xf_out=xf_out.permute(0, 2, 1))

        if self.cache_text_emb:
            self.cache = outputs = dict(outputs, tokens=tokens)
        elif not torch.is_grad_enabled():
            # Sampling calls the model many times with the same prompt tensors: encode them once.
            self._step_cache = (self._prompt_key(tokens, mask), (tokens, mask), outputs)
        return outputs

    def _text_parameters(self) -> list:
        modules = [self.token_embedding, self.transformer, self.final_ln, self.transformer_proj]
        params = [p for m in modules if m is not None for p in m.parameters()]
        return params + [p for p in (self.positional_embedding, getattr(self, "padding_embedding", None)) if p is not None]

    def _prompt_key(self, tokens: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple:
        """What the text embedding depends on, read without a device sync: the prompt tensors
        (by identity and in-place version; the cache holds them, so ids cannot be reused) and
        the storage and version of every text-side parameter (reloaded or updated weights)."""
        tensors = [tokens, mask] + self._text_parameters()
        return tuple((id(t), t.data_ptr(), t._version) for t in tensors if t is not None)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        tokens: Optional[torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        :param x: [N x in_channels x H x W] noisy images (in [-1, 1] scale).
        :param timesteps: [N] timesteps on the original 0..T-1 scale.
        :param tokens: [N x text_ctx] prompt token ids.
        :param mask: [N x text_ctx] bool, True on real tokens.
        :return: [N x 6 x H x W]: predicted eps (3 channels) and variance values in [-1, 1] (3).
        """
        self.check_input(x, timesteps)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if not self.xf_width:
            return self.run_torso(x, emb)
        if tokens is not None and tokens.shape[0] != x.shape[0]:
            raise ValueError(f"tokens have batch {tokens.shape[0]} but x has batch {x.shape[0]}")
        text = self.get_text_emb(tokens, mask)
        emb = emb + text["xf_proj"].to(emb)
        return self.run_torso(x, emb, text["xf_out"])


_BPE_N_VOCAB = 50257
_TORSO = ("time_embed.", "input_blocks.", "middle_block.", "output_blocks.", "out.")


class SuperResText2ImUNet(SuperResUNetModel, Text2ImUNet):
    """Text-conditional 4× upsampler: ``forward(x, timesteps, low_res=..., tokens=..., mask=...)``."""


class InpaintText2ImUNet(InpaintUNetModel, Text2ImUNet):
    """Text-conditional inpainting: ``forward(x, timesteps, inpaint_image=..., inpaint_mask=..., tokens=..., mask=...)``."""


class SuperResInpaintText2ImUnet(SuperResInpaintUNetModel, Text2ImUNet):
    """Text-conditional inpainting upsampler (the lower-case ``n`` is the original public name)."""
