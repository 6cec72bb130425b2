"""The noised CLIP model: text and noised-image embeddings, and the CLIP-guidance gradient.

CLIP guidance (GLIDE, Nichol et al. 2021) shifts each sampling step along
∇ₓ (f(x_t, t) · g(c)), the gradient of the similarity between the noised image x_t and the
caption c, scaled by a guidance scale.
"""

import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import yaml

from glide_text2im.clip.encoders import ImageEncoder, TextEncoder

DEFAULT_CONFIG_PATH = Path(__file__).with_name("config.yaml")

CONFIG_KEYS = (
    "logit_scale",
    "beta_schedule",
    "n_timesteps",
    "image_size",
    "patch_size",
    "n_vocab",
    "max_text_len",
    "n_embd",
    "n_head_state_text",
    "n_head_text",
    "n_xf_blocks_text",
    "n_head_state_image",
    "n_head_image",
    "n_xf_blocks_image",
)

CondFn = Callable[..., torch.Tensor]


class CLIPModel(nn.Module):
    """A text encoder and a noised-image encoder that embed into the same unit sphere.

    The original's attributes, with its meaning and constructor order:

    - ``config``: the dict read from the YAML config (``config["image_size"]``, ...);
    - ``text_encoder``, ``image_encoder``: the two encoders;
    - ``logit_scale``: float32 scalar tensor, the log of the similarity multiplier
      ``config["logit_scale"]`` (log 100 for the official model); a non-persistent buffer,
      so it follows ``.to()`` but is not a checkpoint weight;
    - ``device``: the device the model is on (given, the model is moved there);
    - ``tokenizer``: the caption tokenizer (the CLIP ``SimpleTokenizer``, built on first use
      unless one is given).
    """

    def __init__(
        self,
        config: Dict[str, Any],
        text_encoder: TextEncoder,
        image_encoder: ImageEncoder,
        logit_scale: Union[float, torch.Tensor],
        device: Optional[Union[str, torch.device]] = None,
        tokenizer: Optional[Any] = None,
    ):
        super().__init__()
        self.config = config
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.register_buffer(
            "logit_scale", torch.as_tensor(logit_scale, dtype=torch.float32).detach().clone(), persistent=False
        )
        self._tokenizer = tokenizer
        if device is not None:
            self.to(device)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def tokenizer(self) -> Any:
        """The caption tokenizer (the CLIP ``SimpleTokenizer`` is loaded lazily: it reads the BPE vocabulary)."""
        if self._tokenizer is None:
            from glide_text2im.tokenizer.simple_tokenizer import SimpleTokenizer

            self._tokenizer = SimpleTokenizer()
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def encode_prompts(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokenize prompts: -> (tokens [N x max_text_len] int64, lens [N] int64) on ``device``.

        Each row is ``[start] + tokens + [end]`` padded with 0; lens counts start and end.
        """
        _check_prompts(prompts)
        text_ctx = self.text_encoder.max_text_len
        rows: List[List[int]] = []
        lens: List[int] = []
        for prompt in prompts:
            tokens = self.tokenizer.encode(prompt)
            row, length = self.tokenizer.padded_tokens_and_len(tokens, text_ctx)
            rows.append(row)
            lens.append(length)
        tokens = torch.tensor(rows, dtype=torch.long, device=self.device)
        return tokens, torch.tensor(lens, dtype=torch.long, device=self.device)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm caption embeddings: N prompts -> [N x n_embd]."""
        tokens, lens = self.encode_prompts(prompts)
        return _l2_normalize(self.text_encoder(tokens, lens))

    def image_embeddings(self, images: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings of noised images.

        :param images: x_t, [N x 3 x image_size x image_size] in [-1, 1].
        :param t: [N] int64 timesteps of the original (un-respaced) diffusion chain.
        :return: [N x n_embd].
        """
        return _l2_normalize(self.image_encoder((images + 1) * 127.5, t))

    def cond_fn(self, prompts: Sequence[str], grad_scale: float) -> CondFn:
        """The CLIP-guidance gradient for a sampling loop, one prompt per image.

        Returns ``f(x, t, **model_kwargs)`` =
        grad_scale · ∇ₓ [exp(logit_scale) · Σᵢ zᵢ(text) · zᵢ(x, t)]
        with x [N x 3 x S x S] in [-1, 1] and t [N] original timesteps; model kwargs are ignored.
        The caption embeddings are computed once, here. The gradient is taken on a detached
        copy of x with autograd enabled, so ``f`` works inside ``torch.no_grad()``.
        """
        with torch.no_grad():
            z_text = self.text_embeddings(prompts)

        def clip_gradient(x: torch.Tensor, t: torch.Tensor, **_model_kwargs: Any) -> torch.Tensor:
            if x.shape[0] != z_text.shape[0]:
                raise ValueError(
                    f"cond_fn was made for {z_text.shape[0]} prompts but got a batch of "
                    f"{x.shape[0]} images"
                )
            with torch.enable_grad():
                x_var = x.detach().requires_grad_(True)
                z_image = self.image_embeddings(x_var, t)
                similarity = torch.exp(self.logit_scale) * (z_text * z_image).sum()
                grad = torch.autograd.grad(similarity, x_var)[0]
            return grad.detach() * grad_scale

        return clip_gradient


def load_clip_config(config_path: Optional[Union[str, Path]] = None) -> dict:
    """Read a noised-CLIP YAML config (default: the official one shipped with the package)."""
    path = Path(config_path) if config_path is not None else DEFAULT_CONFIG_PATH
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"CLIP config {path} must be a YAML mapping")
    missing = [key for key in CONFIG_KEYS if key not in config]
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if missing or unknown:
        raise ValueError(f"CLIP config {path}: missing keys {missing}, unknown keys {unknown}")
    return config


def create_clip_model(
    config_path: Optional[Union[str, Path]] = None,
    device: Optional[Union[str, torch.device]] = None,
    tokenizer: Optional[Any] = None,
) -> CLIPModel:
    """Build an untrained noised CLIP from a YAML config (default: the official sizes).

    :param config_path: YAML file with the keys of ``CONFIG_KEYS``.
    :param device: where to build it (default CPU).
    :param tokenizer: a CLIP ``SimpleTokenizer``; by default one is created on first use.
    """
    config = load_clip_config(config_path)
    with torch.device(device if device is not None else "cpu"):
        text_encoder = TextEncoder(
            n_vocab=config["n_vocab"],
            max_text_len=config["max_text_len"],
            n_embd=config["n_embd"],
            n_head=config["n_head_text"],
            n_xf_blocks=config["n_xf_blocks_text"],
            n_head_state=config["n_head_state_text"],
        )
        image_encoder = ImageEncoder(
            image_size=config["image_size"],
            patch_size=config["patch_size"],
            n_embd=config["n_embd"],
            n_head=config["n_head_image"],
            n_xf_blocks=config["n_xf_blocks_image"],
            n_head_state=config["n_head_state_image"],
            n_timesteps=config["n_timesteps"],
        )
        return CLIPModel(
            config,
            text_encoder,
            image_encoder,
            logit_scale=math.log(config["logit_scale"]),
            tokenizer=tokenizer,
        )


def _check_prompts(prompts: Sequence[str]) -> None:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"every prompt must be a str, got {type(prompt).__name__}")


def _l2_normalize(z: torch.Tensor) -> torch.Tensor:
    return z / (z.norm(dim=-1, keepdim=True) + 1e-12)
