"""Noised CLIP encoders: checkpoint layout, golden outputs, attention maths and input checks."""

import json
import math

import pytest
import torch

from glide_text2im.clip.encoders import Attention, ImageEncoder, LayerNorm, TextEncoder
from tests.conftest import load_golden

ATOL = RTOL = 1e-4


def build_text_encoder(config: dict) -> TextEncoder:
    return TextEncoder(
        n_vocab=config["n_vocab"],
        max_text_len=config["max_text_len"],
        n_embd=config["n_embd"],
        n_head=config["n_head_text"],
        n_xf_blocks=config["n_xf_blocks_text"],
        n_head_state=config["n_head_state_text"],
    )


def build_image_encoder(config: dict) -> ImageEncoder:
    return ImageEncoder(
        image_size=config["image_size"],
        patch_size=config["patch_size"],
        n_embd=config["n_embd"],
        n_head=config["n_head_image"],
        n_xf_blocks=config["n_xf_blocks_image"],
        n_head_state=config["n_head_state_image"],
        n_timesteps=config["n_timesteps"],
    )


@pytest.fixture(scope="module")
def golden() -> dict:
    return load_golden("clip.pt")


@pytest.fixture(scope="module")
def text_encoder(golden) -> TextEncoder:
    encoder = build_text_encoder(golden["config"])
    encoder.load_state_dict(golden["text_state_dict"])
    return encoder.eval()


@pytest.fixture(scope="module")
def image_encoder(golden) -> ImageEncoder:
    encoder = build_image_encoder(golden["config"])
    encoder.load_state_dict(golden["image_state_dict"])
    return encoder.eval()


def assert_checkpoint_layout(encoder: torch.nn.Module, spec: dict) -> None:
    state_dict = encoder.state_dict()
    got = [[key, list(v.shape), str(v.dtype)[len("torch."):]] for key, v in state_dict.items()]
    assert got == spec["state_dict"]
    assert sum(p.numel() for p in encoder.parameters()) == spec["num_params"]
    zeros = {key: torch.zeros(shape) for key, shape, _ in spec["state_dict"]}
    encoder.load_state_dict(zeros, strict=True)
    assert all(torch.count_nonzero(p) == 0 for p in encoder.parameters())


def test_full_size_text_encoder_has_checkpoint_layout(spec_dir):
    spec = json.loads((spec_dir / "clip_text_enc.json").read_text())
    assert_checkpoint_layout(build_text_encoder(spec["options"]), spec)


def test_full_size_image_encoder_has_checkpoint_layout(spec_dir):
    spec = json.loads((spec_dir / "clip_image_enc.json").read_text())
    assert_checkpoint_layout(build_image_encoder(spec["options"]), spec)


def test_text_encoder_matches_golden(golden, text_encoder):
    with torch.no_grad():
        out = text_encoder(golden["tokens"], golden["lens"])
    torch.testing.assert_close(out, golden["text_encoder_out"], atol=ATOL, rtol=RTOL)


def test_image_encoder_matches_golden(golden, image_encoder):
    with torch.no_grad():
        out = image_encoder((golden["images"] + 1) * 127.5, golden["t"])
    torch.testing.assert_close(out, golden["image_encoder_out"], atol=ATOL, rtol=RTOL)


def test_text_encoder_ignores_tokens_after_the_last_real_one(golden, text_encoder):
    tokens, lens = golden["tokens"][:1].clone(), golden["lens"][:1]
    changed_padding = tokens.clone()
    changed_padding[0, lens[0]:] = 123
    changed_last = tokens.clone()
    changed_last[0, lens[0] - 1] = 123
    with torch.no_grad():
        reference = text_encoder(tokens, lens)
        same = text_encoder(changed_padding, lens)
        torch.testing.assert_close(same, reference, atol=1e-6, rtol=0)
        assert not torch.allclose(text_encoder(changed_last, lens), reference, atol=1e-3)


def test_image_encoder_depends_on_timestep(golden, image_encoder):
    images = (golden["images"][:1] + 1) * 127.5
    with torch.no_grad():
        early = image_encoder(images, torch.tensor([0]))
        late = image_encoder(images, torch.tensor([999]))
    assert not torch.allclose(early, late, atol=1e-3)


def test_encoders_follow_dtype_moves(golden):
    text_encoder = build_text_encoder(golden["config"])
    text_encoder.load_state_dict(golden["text_state_dict"])
    image_encoder = build_image_encoder(golden["config"])
    image_encoder.load_state_dict(golden["image_state_dict"])
    image_encoder.double()
    assert image_encoder.blocks["input"].channel_means.dtype == torch.float64
    with torch.no_grad():
        text_out = text_encoder.double()(golden["tokens"], golden["lens"])
        image_out = image_encoder((golden["images"].double() + 1) * 127.5, golden["t"])
    assert text_out.dtype == image_out.dtype == torch.float64
    torch.testing.assert_close(text_out.float(), golden["text_encoder_out"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(image_out.float(), golden["image_encoder_out"], atol=ATOL, rtol=RTOL)


def plain_attention(attn: Attention, h: torch.Tensor) -> torch.Tensor:
    """The reference formulation: q and k each scaled by d^(-1/4), masked softmax, residual."""
    n, length, n_state = h.shape
    head_width = n_state // attn.n_head
    x = attn.ln(h)

    def heads(y: torch.Tensor) -> torch.Tensor:
        return y.view(n, length, attn.n_head, head_width).permute(0, 2, 1, 3)

    scale = 1 / math.sqrt(math.sqrt(head_width))
    q, k, v = heads(attn.f_q(x)) * scale, heads(attn.f_k(x)) * scale, heads(attn.f_v(x))
    logits = q @ k.transpose(-1, -2)
    if attn.causal:
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v
    return h + attn.f_c(out.permute(0, 2, 1, 3).reshape(n, length, n_state))


@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_plain_formulation(causal):
    torch.manual_seed(0)
    attn = Attention(n_state=32, n_head=4, causal=causal)
    for param in (attn.f_q.b, attn.f_v.b, attn.f_c.b):
        torch.nn.init.normal_(param)
    h = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(h), plain_attention(attn, h), atol=1e-5, rtol=1e-5)


def test_causal_attention_sees_only_earlier_positions():
    torch.manual_seed(0)
    attn = Attention(n_state=16, n_head=2, causal=True)
    h = torch.randn(1, 6, 16)
    changed = h.clone()
    changed[0, 4:] = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn(changed)[0, :4], attn(h)[0, :4], atol=1e-6, rtol=0)


def test_layer_norm_computes_in_float32_and_keeps_input_dtype():
    torch.manual_seed(0)
    norm = LayerNorm(8)
    torch.nn.init.normal_(norm.g)
    torch.nn.init.normal_(norm.b)
    x = torch.randn(3, 8) * 50 + 10
    out = norm(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    want = (x.bfloat16().float() - x.bfloat16().float().mean(-1, keepdim=True)) / torch.sqrt(
        x.bfloat16().float().var(-1, unbiased=False, keepdim=True) + 1e-5
    ) * norm.g + norm.b
    torch.testing.assert_close(out, want.bfloat16(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 4, 64, 64), "3 x 64 x 64"),
        ((2, 3, 32, 32), "64x64 pixels"),
        ((3, 64, 64), "3 x 64 x 64"),
    ],
)
def test_image_encoder_rejects_bad_images(image_encoder, shape, message):
    with pytest.raises(ValueError, match=message):
        image_encoder(torch.zeros(shape), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "t, error, message",
    [
        (None, ValueError, "timesteps are missing"),
        (torch.tensor([0, 1, 2]), ValueError, r"shape \[2\]"),
        (torch.tensor(5), ValueError, r"shape \[2\]"),
        (torch.tensor([0.0, 1.0]), TypeError, "integer"),
        (torch.tensor([0, 1000]), ValueError, r"\[0, 1000\)"),
        (torch.tensor([-1, 3]), ValueError, r"\[0, 1000\)"),
    ],
)
def test_image_encoder_rejects_bad_timesteps(image_encoder, t, error, message):
    with pytest.raises(error, match=message):
        image_encoder(torch.zeros(2, 3, 64, 64), t)


@pytest.mark.parametrize(
    "tokens, lens, error, message",
    [
        (torch.zeros(2, 16, dtype=torch.long), torch.tensor([2, 2]), ValueError, r"\[N x 77\]"),
        (torch.zeros(2, 77, dtype=torch.long), torch.tensor([2]), ValueError, r"shape \[2\]"),
        (torch.zeros(2, 77, dtype=torch.long), torch.tensor([0, 2]), ValueError, r"\[1, 77\]"),
        (torch.zeros(2, 77, dtype=torch.long), torch.tensor([2, 78]), ValueError, r"\[1, 77\]"),
        (torch.zeros(2, 77), torch.tensor([2, 2]), TypeError, "integer"),
    ],
)
def test_text_encoder_rejects_bad_tokens(text_encoder, tokens, lens, error, message):
    with pytest.raises(error, match=message):
        text_encoder(tokens, lens)
