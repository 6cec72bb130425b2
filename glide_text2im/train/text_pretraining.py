"""Pretraining a text-conditional U-Net's text encoder on its own, before the U-Net.

A U-Net trained from scratch learns what its prompt says only through the denoising loss.
Early on that loss is dominated by the image's largest areas, so the text encoder is pulled
towards encoding those (the demo's background colour) and the few bytes that name a shape's
colour, class or position end up with almost no weight in ``xf_proj``; the U-Net then never
learns to use them. Here the U-Net's own text path (token and positional embeddings, the
transformer, its final LayerNorm and ``transformer_proj``) is first trained with CLIP's
contrastive loss against a small convolutional image encoder on the same (image, caption)
pairs, so that ``xf_proj`` tells every attribute of a caption apart. The image encoder is
then thrown away and the U-Net is trained with ``TrainConfig(freeze_text_encoder=True)``,
which keeps what the text path learned.

    model = build_task("base", overrides=options).model
    pretrain_text_encoder(model, examples, TextPretrainConfig(steps=1000))

Where every caption comes with discrete labels of what it says (a synthetic dataset's
attributes), ``pretrain_text_encoder_on_labels`` trains the same text path to predict them
from ``xf_proj`` instead, on captions drawn afresh for every step; no images are needed. It
trains a noised CLIP's text encoder the same way (then ``TrainConfig(freeze_text_encoder=True)``
keeps it while the contrastive loss trains the image encoder to meet it).
Both can first set the positional embeddings to sinusoids (``sinusoidal_positions``), which
lets a small byte-level transformer recognise a word wherever it stands in the caption.
"""

import dataclasses
import math
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from glide_text2im.clip.model_creation import CLIPModel
from glide_text2im.text2im_model import Text2ImUNet
from glide_text2im.train.data import Example, UNetCaptionEncoder, image_to_tensor, random_square_crop
from glide_text2im.train.trainer import contrastive_losses, require_at_least_one

# The models whose text path can be pretrained here.
TextModel = Union[Text2ImUNet, CLIPModel]


@dataclasses.dataclass
class TextPretrainConfig:
    """Settings of a pretraining run (either objective).

    :param steps: optimiser steps.
    :param batch_size: captions per step (for the contrastive objective every other pair of a
        batch is a negative).
    :param lr: AdamW learning rate, after ``warmup_steps`` linear warm-up steps, decaying to 0
        along a half cosine.
    :param sinusoidal_positions: if positive, the positional and padding embeddings are first
        set to sine and cosine waves of this amplitude (``init_sinusoidal_positions``); 0
        keeps their random initialisation.
    :param seed: seed of the objective's own weights and of the batches.
    :param log_every: steps between log rows.
    """

    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    sinusoidal_positions: float = 0.0
    seed: int = 0
    log_every: int = 250

    def __post_init__(self):
        require_at_least_one(self, ("steps", "batch_size", "log_every"))
        if self.sinusoidal_positions < 0:
            raise ValueError(f"sinusoidal_positions must be >= 0, got {self.sinusoidal_positions}")


def sinusoids(length: int, width: int) -> torch.Tensor:
    """The Transformer paper's sine (even columns) and cosine (odd columns) waves
    [length x width], wavelengths from 2 pi to 200 pi tokens."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(-math.log(100.0) * torch.arange(0, width, 2, dtype=torch.float32) / width)
    waves = torch.zeros(length, width)
    waves[:, 0::2] = torch.sin(position * frequency)
    waves[:, 1::2] = torch.cos(position * frequency)
    return waves


def init_sinusoidal_positions(model: TextModel, amplitude: float) -> None:
    """Set the positional embedding of ``model``'s text path [text_ctx x width] to
    ``amplitude`` x ``sinusoids``: a U-Net's ``positional_embedding`` (and its
    ``padding_embedding``, which replaces it at padding positions, gets the same waves added)
    or a CLIP text encoder's ``w_pos``.

    A random positional embedding has to be learned per position, so a byte-level encoder
    trained on a few wordings reads a word differently at positions those wordings rarely put
    it; with sinusoids, moving a word shifts every position by the same rotation.
    """
    if isinstance(model, CLIPModel):
        positions, padding = model.text_encoder.blocks["input"].w_pos, None
    else:
        positions = model.positional_embedding
        padding = model.padding_embedding if model.xf_padding else None
    waves = amplitude * sinusoids(*positions.shape).to(positions)
    with torch.no_grad():
        positions.copy_(waves)
        if padding is not None:
            padding.add_(waves)


class ConvImageEncoder(nn.Module):
    """[N x 3 x S x S] in [-1, 1] -> [N x D]: stride-2 convolutions down to 4 x 4, then a linear
    map of the flattened features (flattening, not pooling, so that the position is kept)."""

    def __init__(self, image_size: int, embed_dim: int, widths: Sequence[int] = (32, 64, 128, 128)):
        super().__init__()
        layers: List[nn.Module] = []
        channels, side = 3, image_size
        for width in widths:
            if side <= 4:
                break
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
            channels, side = width, (side + 1) // 2
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(channels * side * side, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x).flatten(1))


def pretrain_text_encoder(
    model: Text2ImUNet,
    source: Sequence[Example],
    config: TextPretrainConfig,
    image_size: int = 32,
    embed_dim: int = 64,
    log: Optional[Callable[[Dict[str, float]], None]] = None,
) -> List[Dict[str, float]]:
    """Train ``model``'s text path in place, contrastively, on ``source``'s (PIL image, caption)
    pairs.

    The caption side is ``model.get_text_emb(...)["xf_proj"]`` [N x 4C] followed by a linear
    map to ``embed_dim``; the image side is a ``ConvImageEncoder`` on ``image_size`` crops; both
    are L2-normalised and compared with a learned temperature (``trainer.contrastive_losses``).
    The U-Net's other weights are not touched.

    :return: the log rows ``{"step", "loss", "accuracy"}`` (means over ``log_every`` steps),
        each also passed to ``log``.
    """
    if config.batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (the other pairs are negatives), got {config.batch_size}")
    if len(source) < config.batch_size:
        raise ValueError(f"{len(source)} examples are fewer than one batch of {config.batch_size}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    rng = random.Random(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        image_encoder = ConvImageEncoder(image_size, embed_dim).to(device)
        text_head = nn.Linear(model.transformer_proj.out_features, embed_dim).to(device)
    logit_scale = nn.Parameter(torch.tensor(math.log(10.0), device=device))
    embed, _ = _caption_embedder(model, device)
    order: List[int] = []

    def step_terms() -> Tuple[torch.Tensor, float]:
        nonlocal order
        if len(order) < config.batch_size:
            order += torch.randperm(len(source), generator=generator).tolist()
        batch, order = order[: config.batch_size], order[config.batch_size :]
        pairs = [source[index] for index in batch]
        images = torch.stack([image_to_tensor(random_square_crop(image, image_size, rng)) for image, _ in pairs])
        xf_proj = embed([caption for _, caption in pairs])
        z_text = F.normalize(text_head(xf_proj.float()), dim=-1)
        z_image = F.normalize(image_encoder(images.to(device)), dim=-1)
        terms = contrastive_losses(z_text, z_image, logit_scale.clamp(max=math.log(100.0)))
        return terms["loss"].mean(), terms["accuracy"].mean().item()

    extra_params = list(image_encoder.parameters()) + list(text_head.parameters()) + [logit_scale]
    return _optimise_text_path(model, extra_params, step_terms, config, log)


def pretrain_text_encoder_on_labels(
    model: TextModel,
    draw: Callable[[random.Random], Tuple[str, Sequence[int]]],
    num_classes: Sequence[int],
    config: TextPretrainConfig,
    log: Optional[Callable[[Dict[str, float]], None]] = None,
) -> List[Dict[str, float]]:
    """Train ``model``'s text path in place to predict each caption's labels from its embeddings.

    ``model`` is a text-conditional U-Net or a noised CLIP. A U-Net's captions are read twice:
    from ``xf_proj`` [N x 4C] (the last token, added to the timestep embedding) and from the
    mean of ``xf_out`` over the caption's tokens [N x W] (what its attention layers read). A
    CLIP's are read from the unit-norm caption embedding [N x n_embd] its contrastive loss
    compares. ``draw(rng)`` returns a fresh caption and its labels, label ``k`` in
    ``range(num_classes[k])``; every step draws ``batch_size`` of them from one
    ``random.Random(config.seed)``. One linear head per label and embedding reads it; the loss
    is the sum of their cross-entropies. The model's other weights are not touched.

    :return: the log rows ``{"step", "loss", "accuracy"}`` (accuracy: the mean over labels of
        the fraction the first embedding's heads predict right; means over ``log_every``
        steps), each also passed to ``log``.
    """
    if not num_classes or min(num_classes) < 2:
        raise ValueError(f"num_classes must list at least one label of at least 2 classes, got {list(num_classes)}")
    device = next(model.parameters()).device
    rng = random.Random(config.seed)
    embed, widths = _label_embedder(model, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        heads = nn.ModuleList(nn.ModuleList(nn.Linear(width, n) for n in num_classes) for width in widths).to(device)

    def step_terms() -> Tuple[torch.Tensor, float]:
        captions, labels = [], []
        for _ in range(config.batch_size):
            caption, caption_labels = draw(rng)
            if len(caption_labels) != len(num_classes):
                raise ValueError(f"draw gave {len(caption_labels)} labels for {caption!r}; expected {len(num_classes)}")
            captions.append(caption)
            labels.append(list(caption_labels))
        targets = torch.tensor(labels, device=device)
        loss, correct = torch.zeros((), device=device), 0.0
        for view, (embeddings, view_heads) in enumerate(zip(embed(captions), heads)):
            for k, head in enumerate(view_heads):
                logits = head(embeddings.float())
                loss = loss + F.cross_entropy(logits, targets[:, k])
                if view == 0:
                    correct += (logits.argmax(-1) == targets[:, k]).float().mean().item()
        return loss, correct / len(num_classes)

    return _optimise_text_path(model, list(heads.parameters()), step_terms, config, log)


def text_path_parameters(model: TextModel) -> List[nn.Parameter]:
    """What the pretraining trains: a U-Net's prompt encoder up to and including
    ``transformer_proj``, or a CLIP's whole text encoder."""
    if isinstance(model, CLIPModel):
        return list(model.text_encoder.parameters())
    return model.text_encoder_parameters() + list(model.transformer_proj.parameters())


def _caption_embedder(
    model: TextModel, device: torch.device
) -> Tuple[Callable[[Sequence[str]], torch.Tensor], int]:
    """(captions -> embeddings [N x width], width) of ``model``'s text path."""
    if isinstance(model, CLIPModel):
        return model.text_embeddings, model.text_encoder.blocks["output"].f.w.shape[0]
    encode = UNetCaptionEncoder(model.tokenizer, model.text_ctx)
    return (lambda captions: _xf_proj(model, encode, captions, device)), model.transformer_proj.out_features


def _label_embedder(
    model: TextModel, device: torch.device
) -> Tuple[Callable[[Sequence[str]], Tuple[torch.Tensor, ...]], Tuple[int, ...]]:
    """(captions -> the embeddings the label heads read, their widths): a CLIP's caption
    embedding; a U-Net's ``xf_proj`` and its mean ``xf_out`` token."""
    if isinstance(model, CLIPModel):
        embed, width = _caption_embedder(model, device)
        return (lambda captions: (embed(captions),)), (width,)
    encode = UNetCaptionEncoder(model.tokenizer, model.text_ctx)

    def embed_twice(captions: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        outputs, mask = _unet_text_emb(model, encode, captions, device)
        return outputs["xf_proj"], _mean_token(outputs["xf_out"], mask)

    return embed_twice, (model.transformer_proj.out_features, model.xf_width)


def _xf_proj(
    model: Text2ImUNet, encode: UNetCaptionEncoder, captions: Sequence[str], device: torch.device
) -> torch.Tensor:
    return _unet_text_emb(model, encode, captions, device)[0]["xf_proj"]


def _unet_text_emb(
    model: Text2ImUNet, encode: UNetCaptionEncoder, captions: Sequence[str], device: torch.device
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """``get_text_emb`` of the captions (``xf_proj`` [N x 4C], ``xf_out`` [N x W x T]) and their
    token mask, bool [N x T]."""
    encoded = [encode(caption) for caption in captions]
    tokens = torch.stack([item["tokens"] for item in encoded]).to(device)
    mask = torch.stack([item["mask"] for item in encoded]).to(device)
    return model.get_text_emb(tokens, mask), mask


def _mean_token(xf_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``xf_out`` [N x W x T] over each caption's tokens (``mask`` [N x T]): [N x W],
    zeros for an empty caption."""
    weights = mask[:, None, :].to(xf_out.dtype)
    return (xf_out * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)


def _optimise_text_path(
    model: TextModel,
    extra_params: List[nn.Parameter],
    step_terms: Callable[[], Tuple[torch.Tensor, float]],
    config: TextPretrainConfig,
    log: Optional[Callable[[Dict[str, float]], None]],
) -> List[Dict[str, float]]:
    """AdamW on the text path and ``extra_params`` for ``config.steps`` steps of the loss
    ``step_terms()`` returns (with its accuracy); returns the log rows."""
    if config.sinusoidal_positions > 0:
        init_sinusoidal_positions(model, config.sinusoidal_positions)
    params = text_path_parameters(model) + extra_params
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rows, totals = [], {"loss": 0.0, "accuracy": 0.0}
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
            group["lr"] *= 0.5 * (1.0 + math.cos(math.pi * step / config.steps))
        loss, accuracy = step_terms()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        totals["loss"] += loss.item()
        totals["accuracy"] += accuracy
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            count = (step % config.log_every) + 1
            row = {"step": step + 1, **{key: value / count for key, value in totals.items()}}
            rows.append(row)
            totals = {key: 0.0 for key in totals}
            if log is not None:
                log(row)
    return rows
