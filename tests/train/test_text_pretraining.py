"""Pretraining a U-Net's text encoder, contrastively or on caption labels, and a CLIP's on
caption labels: it learns to tell captions apart and touches nothing but the text path."""

import math

import pytest
import torch

from glide_text2im.train.text_pretraining import (
    ConvImageEncoder,
    TextPretrainConfig,
    init_sinusoidal_positions,
    pretrain_text_encoder,
    pretrain_text_encoder_on_labels,
    sinusoids,
)
from glide_text2im.train.trainer import build_task
from tests.train import TINY_CLIP_OPTIONS, TINY_UNET_OPTIONS, draw_shape, single_thread

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
    config = TextPretrainConfig(steps=60, batch_size=8, lr=3e-3, warmup_steps=10, log_every=1)

    rows = pretrain_text_encoder(model, colour_pairs(), config, image_size=16)

    # log(8) = 2.08 is the loss of a text encoder that cannot tell the eight captions apart.
    assert [row["step"] for row in rows] == list(range(1, 61))
    assert rows[0]["loss"] > 1.8 and rows[-1]["loss"] < 0.1, (rows[0], rows[-1])
    assert rows[-1]["accuracy"] == 1.0, rows
    assert colour_spread(model) > 3 * spread_before, (spread_before, colour_spread(model))
    assert_only_the_text_path_changed(model, before)


def assert_only_the_text_path_changed(model, before):
    trained = {id(p) for p in model.text_encoder_parameters() + list(model.transformer_proj.parameters())}
    text_names = {name for name, p in model.named_parameters() if id(p) in trained}
    unet_prefixes = ("input_blocks.", "middle_block.", "output_blocks.", "out.", "time_embed.")
    assert text_names == {name for name, _ in model.named_parameters() if not name.startswith(unet_prefixes)}
    for key, value in model.state_dict().items():
        changed = not torch.equal(value, before[key])
        assert changed == (key in text_names), key


def test_pretraining_is_deterministic_for_a_seed():
    config = TextPretrainConfig(steps=5, batch_size=4)
    first, second = tiny_model(), tiny_model()
    pretrain_text_encoder(first, colour_pairs(), config, image_size=16)
    pretrain_text_encoder(second, colour_pairs(), config, image_size=16)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        pretrain_text_encoder(tiny_model(), colour_pairs(), TextPretrainConfig(steps=1, batch_size=1), image_size=16)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        TextPretrainConfig(steps=0)
    with pytest.raises(ValueError, match="sinusoidal_positions must be >= 0"):
        TextPretrainConfig(steps=1, sinusoidal_positions=-0.1)
    with pytest.raises(ValueError, match="8 examples are fewer than one batch of 16"):
        pretrain_text_encoder(tiny_model(), colour_pairs(), TextPretrainConfig(steps=1, batch_size=16), image_size=16)
    config = TextPretrainConfig(steps=1, batch_size=2)
    with pytest.raises(ValueError, match="at least one label of at least 2 classes"):
        pretrain_text_encoder_on_labels(tiny_model(), draw_colour_shape, [4, 1], config)
    with pytest.raises(ValueError, match="draw gave 2 labels for '.*'; expected 3"):
        pretrain_text_encoder_on_labels(tiny_model(), draw_colour_shape, [4, 2, 2], config)


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


def draw_colour_shape(rng):
    """A caption like "the big red square" with its labels (colour index, shape index)."""
    colour, shape = rng.randrange(len(COLOURS)), rng.randrange(2)
    prefix = rng.choice(["a", "the", "one", "a big", "the tiny"])
    return f"{prefix} {list(COLOURS)[colour]} {('square', 'circle')[shape]}", [colour, shape]


def test_label_pretraining_learns_what_captions_say_and_changes_only_the_text_path():
    model = tiny_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    spread_before = colour_spread(model)
    config = TextPretrainConfig(
        steps=120, batch_size=16, lr=3e-3, warmup_steps=10, sinusoidal_positions=0.1, log_every=20
    )

    rows = pretrain_text_encoder_on_labels(model, draw_colour_shape, [len(COLOURS), 2], config)

    # log(4) + log(2) = 2.08 is the loss of heads that read nothing from the caption, once for
    # xf_proj and once for the mean xf_out token. Chance accuracy is (1/4 + 1/2) / 2.
    assert [row["step"] for row in rows] == [20, 40, 60, 80, 100, 120]
    assert rows[0]["loss"] > 3.0 and rows[-1]["loss"] < 0.3, (rows[0], rows[-1])
    assert rows[0]["accuracy"] < 0.6 and rows[-1]["accuracy"] >= 0.95, rows
    assert colour_spread(model) > 3 * spread_before, (spread_before, colour_spread(model))
    assert_only_the_text_path_changed(model, before)


def test_label_pretraining_is_deterministic_for_a_seed():
    config = TextPretrainConfig(steps=4, batch_size=4, seed=3)
    first, second = tiny_model(), tiny_model()
    pretrain_text_encoder_on_labels(first, draw_colour_shape, [len(COLOURS), 2], config)
    pretrain_text_encoder_on_labels(second, draw_colour_shape, [len(COLOURS), 2], config)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_sinusoidal_positions_are_waves_whose_products_depend_only_on_the_offset():
    model = tiny_model()
    padding_before = model.padding_embedding.detach().clone()
    init_sinusoidal_positions(model, 0.5)
    waves = model.positional_embedding.detach()
    ctx, width = waves.shape
    assert (ctx, width) == (16, 32)
    # Position 3, pair 2: frequency 100^(-4/32).
    assert waves[3, 4].item() == pytest.approx(0.5 * math.sin(3 * 100.0 ** (-4 / 32)), abs=1e-6)
    assert waves[3, 5].item() == pytest.approx(0.5 * math.cos(3 * 100.0 ** (-4 / 32)), abs=1e-6)
    assert torch.allclose(waves[:, 1::2][0], torch.full((width // 2,), 0.5))
    products = [(waves[i] @ waves[i + 4]).item() for i in range(ctx - 4)]
    assert max(products) - min(products) < 1e-5, products
    assert torch.allclose(model.padding_embedding.detach(), padding_before + waves)


def test_sinusoidal_positions_setting_initialises_before_training():
    model = tiny_model()
    config = TextPretrainConfig(steps=1, batch_size=2, lr=1e-9, warmup_steps=1, sinusoidal_positions=0.2)
    pretrain_text_encoder_on_labels(model, draw_colour_shape, [len(COLOURS), 2], config)
    reference = tiny_model()
    init_sinusoidal_positions(reference, 0.2)
    assert torch.allclose(model.positional_embedding, reference.positional_embedding, atol=1e-6)
    assert not torch.allclose(model.positional_embedding, tiny_model().positional_embedding, atol=1e-3)


def test_label_pretraining_trains_a_clip_text_encoder_and_nothing_else():
    torch.manual_seed(0)
    clip = build_task("clip", overrides=TINY_CLIP_OPTIONS).model
    before = {key: value.clone() for key, value in clip.state_dict().items()}
    config = TextPretrainConfig(
        steps=120, batch_size=16, lr=3e-3, warmup_steps=10, sinusoidal_positions=0.1, log_every=20
    )

    rows = pretrain_text_encoder_on_labels(clip, draw_colour_shape, [len(COLOURS), 2], config)

    assert rows[0]["accuracy"] < 0.6 and rows[-1]["accuracy"] >= 0.95, rows
    # The heads read the unit-norm embeddings the contrastive loss compares: the four colours
    # of "a <colour> square" now point apart.
    with torch.no_grad():
        z = clip.text_embeddings([f"a {name} square" for name in COLOURS])
    off_diagonal = (z @ z.T)[~torch.eye(len(COLOURS), dtype=torch.bool)]
    assert off_diagonal.max() < 0.9, z @ z.T
    for key, value in clip.state_dict().items():
        changed = not torch.equal(value, before[key])
        assert changed == key.startswith("text_encoder."), key


def test_sinusoidal_positions_of_a_clip_text_encoder():
    torch.manual_seed(0)
    clip = build_task("clip", overrides=TINY_CLIP_OPTIONS).model
    init_sinusoidal_positions(clip, 0.5)
    w_pos = clip.text_encoder.blocks["input"].w_pos.detach()
    assert w_pos.shape == (16, 32)
    assert torch.allclose(w_pos, 0.5 * sinusoids(16, 32))
    assert w_pos[3, 4].item() == pytest.approx(0.5 * math.sin(3 * 100.0 ** (-4 / 32)), abs=1e-6)
