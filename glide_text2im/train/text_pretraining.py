"""Contrastive pretraining of a text-conditional U-Net's text encoder.

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
"""

import dataclasses
import math
import random
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from glide_text2im.text2im_model import Text2ImUNet
from glide_text2im.train.data import Example, UNetCaptionEncoder, image_to_tensor, random_square_crop
from glide_text2im.train.trainer import contrastive_losses, require_at_least_one


@dataclasses.dataclass
class TextPretrainConfig:
    """Settings of a contrastive pretraining run.

    :param steps: optimiser steps.
    :param batch_size: (image, caption) pairs per step; every other pair is a negative.
    :param lr: AdamW learning rate, after ``warmup_steps`` linear warm-up steps, decaying to 0
        along a half cosine.
    :param image_size: side the images are resized to for the image encoder (only the text
        encoder is kept, so this can be well below the U-Net's).
    :param embed_dim: width of the shared embedding space.
    :param seed: seed of the image encoder's weights and of the batches.
    :param log_every: steps between log rows.
    """

    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    image_size: int = 32
    embed_dim: int = 64
    seed: int = 0
    log_every: int = 250

    def __post_init__(self):
        require_at_least_one(self, ("steps", "batch_size", "image_size", "embed_dim", "log_every"))
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (the other pairs are negatives), got {self.batch_size}")


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
    log: Optional[Callable[[Dict[str, float]], None]] = None,
) -> List[Dict[str, float]]:
    """Train ``model``'s text path in place on ``source``'s (PIL image, caption) pairs.

    The caption side is ``model.get_text_emb(...)["xf_proj"]`` [N x 4C] followed by a linear
    map to ``embed_dim``; the image side is a ``ConvImageEncoder``; both are L2-normalised and
    compared with a learned temperature (``trainer.contrastive_losses``). The U-Net's other
    weights are not touched.

    :return: the log rows ``{"step", "loss", "accuracy"}`` (means over ``log_every`` steps),
        each also passed to ``log``.
    """
    if len(source) < config.batch_size:
        raise ValueError(f"{len(source)} examples are fewer than one batch of {config.batch_size}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    rng = random.Random(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        image_encoder = ConvImageEncoder(config.image_size, config.embed_dim).to(device)
        text_head = nn.Linear(model.transformer_proj.out_features, config.embed_dim).to(device)
    logit_scale = nn.Parameter(torch.tensor(math.log(10.0), device=device))
    text_params = model.text_encoder_parameters() + list(model.transformer_proj.parameters())
    extra_params = list(image_encoder.parameters()) + list(text_head.parameters()) + [logit_scale]
    optimizer = torch.optim.AdamW(text_params + extra_params, lr=config.lr, weight_decay=config.weight_decay)
    encode = UNetCaptionEncoder(model.tokenizer, model.text_ctx)

    rows, totals, order = [], {"loss": 0.0, "accuracy": 0.0}, []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / max(1, config.warmup_steps))
            group["lr"] *= 0.5 * (1.0 + math.cos(math.pi * step / config.steps))
        if len(order) < config.batch_size:
            order += torch.randperm(len(source), generator=generator).tolist()
        batch, order = order[: config.batch_size], order[config.batch_size :]

        images, tokens, masks = [], [], []
        for index in batch:
            image, caption = source[index]
            images.append(image_to_tensor(random_square_crop(image, config.image_size, rng)))
            encoded = encode(caption)
            tokens.append(encoded["tokens"])
            masks.append(encoded["mask"])
        xf_proj = model.get_text_emb(torch.stack(tokens).to(device), torch.stack(masks).to(device))["xf_proj"]
        z_text = F.normalize(text_head(xf_proj.float()), dim=-1)
        z_image = F.normalize(image_encoder(torch.stack(images).to(device)), dim=-1)
        terms = contrastive_losses(z_text, z_image, logit_scale.clamp(max=math.log(100.0)))
        loss = terms["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        totals["loss"] += loss.item()
        totals["accuracy"] += terms["accuracy"].mean().item()
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            count = (step % config.log_every) + 1
            row = {"step": step + 1, **{key: value / count for key, value in totals.items()}}
            rows.append(row)
            totals = {key: 0.0 for key in totals}
            if log is not None:
                log(row)
    return rows
