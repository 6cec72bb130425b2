"""Contrastive pretraining of a U-Net's text encoder: it learns to tell captions apart and
touches nothing but the text path."""

import pytest
import torch

from glide_text2im.train.text_pretraining import ConvImageEncoder, TextPretrainConfig, pretrain_text_encoder
from glide_text2im.train.trainer import build_task
from tests.train import TINY_UNET_OPTIONS, draw_shape, single_thread

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (240, 220, 40)}


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def colour_pairs():
    """Eight (image, caption) pairs, e.g. "a red square": four colours x two shapes on white."""
    return [
        (draw_shape(shape, rgb, (255, 255, 255), 16), f"a {name} {shape}")
        for name, rgb in COLOURS.items()
        for shape in ("square", "circle")
    ]


def tiny_model():
    torch.manual_seed(0)
    return build_task("base", overrides=TINY_UNET_OPTIONS).model


def pooled(model, captions):
    encoded = [model.tokenizer.padded_tokens_and_mask(model.tokenizer.encode(c), model.text_ctx) for c in captions]
    with torch.no_grad():
        emb = model.get_text_emb(torch.tensor([t for t, _ in encoded]), torch.tensor([m for _, m in encoded]))
    return emb["xf_proj"]


def colour_spread(model):
    """How far apart "a <colour> square" lie in xf_proj, relative to their mean's length."""
    emb = pooled(model, [f"a {name} square" for name in COLOURS])
    return (torch.pdist(emb).mean() / emb.mean(0).norm()).item()


def test_pretraining_separates_captions_and_changes_only_the_text_path():
    model = tiny_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    spread_before = colour_spread(model)
    config = TextPretrainConfig(steps=60, batch_size=8, lr=3e-3, warmup_steps=10, image_size=16, log_every=1)

    rows = pretrain_text_encoder(model, colour_pairs(), config)

    # log(8) = 2.08 is the loss of a text encoder that cannot tell the eight captions apart.
    assert [row["step"] for row in rows] == list(range(1, 61))
    assert rows[0]["loss"] > 1.8 and rows[-1]["loss"] < 0.1, (rows[0], rows[-1])
    assert rows[-1]["accuracy"] == 1.0, rows
    assert colour_spread(model) > 3 * spread_before, (spread_before, colour_spread(model))
    trained = {id(p) for p in model.text_encoder_parameters() + list(model.transformer_proj.parameters())}
    text_names = {name for name, p in model.named_parameters() if id(p) in trained}
    unet_prefixes = ("input_blocks.", "middle_block.", "output_blocks.", "out.", "time_embed.")
    assert text_names == {name for name, _ in model.named_parameters() if not name.startswith(unet_prefixes)}
    for key, value in model.state_dict().items():
        changed = not torch.equal(value, before[key])
        assert changed == (key in text_names), key


def test_pretraining_is_deterministic_for_a_seed():
    config = TextPretrainConfig(steps=5, batch_size=4, image_size=16)
    first, second = tiny_model(), tiny_model()
    pretrain_text_encoder(first, colour_pairs(), config)
    pretrain_text_encoder(second, colour_pairs(), config)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        TextPretrainConfig(steps=1, batch_size=1)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        TextPretrainConfig(steps=0)
    with pytest.raises(ValueError, match="8 examples are fewer than one batch of 16"):
        pretrain_text_encoder(tiny_model(), colour_pairs(), TextPretrainConfig(steps=1, batch_size=16, image_size=16))


@pytest.mark.parametrize("size", [16, 32, 20])
def test_image_encoder_maps_images_to_embeddings_and_sees_position(size):
    torch.manual_seed(0)
    encoder = ConvImageEncoder(size, 24)
    left = torch.full((1, 3, size, size), -1.0)
    left[..., : size // 4, : size // 4] = 1.0
    right = left.flip(-1)
    out = encoder(torch.cat([left, right]))
    assert out.shape == (2, 24)
    assert (out[0] - out[1]).abs().max() > 1e-3
