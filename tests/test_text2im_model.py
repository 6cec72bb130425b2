"""The text-conditional U-Nets against the golden forwards of the original implementation."""

import pytest
import torch

from glide_text2im.model_creation import create_model_and_diffusion, model_and_diffusion_defaults
from glide_text2im.text2im_model import (
    InpaintText2ImUNet,
    SuperResInpaintText2ImUnet,
    SuperResText2ImUNet,
    Text2ImUNet,
)
from tests.conftest import load_golden

VARIANTS = {
    "base": Text2ImUNet,
    "base_inpaint": InpaintText2ImUNet,
    "upsample": SuperResText2ImUNet,
    "upsample_inpaint": SuperResInpaintText2ImUnet,
}


def build(golden: dict) -> torch.nn.Module:
    model, _ = create_model_and_diffusion(**golden["options"])
    model.load_state_dict(golden["state_dict"])
    return model.eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def golden_model(request):
    golden = load_golden(f"unet_{request.param}.pt")
    return request.param, golden, build(golden)


def split_inputs(golden: dict):
    inputs = dict(golden["inputs"])
    return inputs.pop("x"), inputs.pop("timesteps"), inputs


@pytest.mark.parametrize("fast_attention", [False, True], ids=["reference_attention", "sdpa"])
def test_forward_matches_golden(golden_model, fast_attention):
    variant, golden, model = golden_model
    assert type(model) is VARIANTS[variant]
    assert sum(p.numel() for p in model.parameters()) == golden["num_params"]
    model.use_fast_attention(fast_attention)
    x, t, kwargs = split_inputs(golden)
    with torch.no_grad():
        out = model(x, t, **kwargs)
    assert out.shape == (2, 6, 64, 64)
    torch.testing.assert_close(out, golden["out"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["base_inpaint", "upsample_inpaint"])
def test_inpaint_inputs_default_to_zeros(variant):
    golden = load_golden(f"unet_{variant}.pt")
    model = build(golden)
    x, t, kwargs = split_inputs(golden)
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("inpaint")}
    with torch.no_grad():
        out = model(x, t, **kwargs)
    torch.testing.assert_close(out, golden["out_no_inpaint_kwargs"], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def base():
    golden = load_golden("unet_base.pt")
    return golden, build(golden)


def test_text_embedding_matches_golden(base):
    golden, model = base
    _, _, kwargs = split_inputs(golden)
    with torch.no_grad():
        emb = model.get_text_emb(kwargs["tokens"], kwargs["mask"])
    torch.testing.assert_close(emb["xf_proj"], golden["text_emb"]["xf_proj"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(emb["xf_out"], golden["text_emb"]["xf_out"], atol=1e-4, rtol=1e-4)


def test_fractional_timesteps_match_golden(base):
    golden, model = base
    x, _, kwargs = split_inputs(golden)
    with torch.no_grad():
        out = model(x, golden["out_float_timesteps_input"], **kwargs)
    torch.testing.assert_close(out, golden["out_float_timesteps"], atol=1e-4, rtol=1e-4)


def test_cfg_unconditional_row_is_independent_of_the_prompt_row(base):
    golden, model = base
    x, t, kwargs = split_inputs(golden)
    with torch.no_grad():
        alone = model(x[1:], t[1:], tokens=kwargs["tokens"][1:], mask=kwargs["mask"][1:])
    torch.testing.assert_close(alone, golden["out"][1:], atol=1e-4, rtol=1e-4)


def test_prompt_is_encoded_once_per_sampling_run(base):
    golden, model = base
    x, t, kwargs = split_inputs(golden)
    calls = []
    handle = model.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            first = model(x, t, **kwargs)
            second = model(x, t, **kwargs)
            assert len(calls) == 1
            torch.testing.assert_close(first, second, atol=0, rtol=0)
            # Changing the prompt tensors in place must not reuse the stale encoding.
            tokens = kwargs["tokens"].clone()
            model(x, t, tokens=tokens, mask=kwargs["mask"])
            tokens[0, :9] = golden["inputs"]["tokens"][1, :9]
            changed = model(x, t, tokens=tokens, mask=kwargs["mask"])
            assert len(calls) == 3
            assert not torch.allclose(changed[0], first[0])
        with torch.enable_grad():
            model(x, t, **kwargs)
        assert len(calls) == 4
    finally:
        handle.remove()
        model.del_cache()


def test_cache_text_emb_keeps_first_embedding_until_del_cache(base):
    golden, model = base
    x, t, kwargs = split_inputs(golden)
    model.cache_text_emb = True
    try:
        with torch.no_grad():
            first = model.get_text_emb(kwargs["tokens"], kwargs["mask"])
            assert model.get_text_emb(kwargs["tokens"].clone(), kwargs["mask"]) is first
            other = kwargs["tokens"].flip(0)
            with pytest.raises(ValueError, match="del_cache"):
                model.get_text_emb(other, kwargs["mask"].flip(0))
            model.del_cache()
            assert model.get_text_emb(other, kwargs["mask"].flip(0)) is not first
    finally:
        model.cache_text_emb = False
        model.del_cache()


def test_fp16_conversion_runs_and_stays_close_to_fp32(base):
    golden, _ = base
    model = build(golden)
    x, t, kwargs = split_inputs(golden)
    model.convert_to_fp16()
    assert model.dtype == torch.float16
    assert model.positional_embedding.dtype == torch.float32
    assert model.transformer.resblocks[0].attn.c_qkv.weight.dtype == torch.float16
    with torch.no_grad():
        out = model(x, t, **kwargs)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert (out - golden["out"]).abs().mean() < 5e-3
    model.convert_to_fp32()
    assert model.dtype == torch.float32
    model.load_state_dict(golden["state_dict"])  # the float16 round trip rounded the weights
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, **kwargs), golden["out"], atol=1e-4, rtol=1e-4)


class TestBadInput:
    def test_tokens_of_wrong_length(self, base):
        golden, model = base
        x, t, kwargs = split_inputs(golden)
        with pytest.raises(ValueError, match=r"tokens must be \[N x 16\]"):
            model(x, t, tokens=kwargs["tokens"][:, :10], mask=kwargs["mask"][:, :10])

    def test_tokens_of_wrong_batch(self, base):
        golden, model = base
        x, t, kwargs = split_inputs(golden)
        with pytest.raises(ValueError, match="batch"):
            model(x, t, tokens=kwargs["tokens"][:1], mask=kwargs["mask"][:1])

    def test_mask_missing_or_of_wrong_shape(self, base):
        golden, model = base
        x, t, kwargs = split_inputs(golden)
        with pytest.raises(ValueError, match="needs mask="):
            model(x, t, tokens=kwargs["tokens"])
        with pytest.raises(ValueError, match="mask must have the shape of tokens"):
            model(x, t, tokens=kwargs["tokens"], mask=kwargs["mask"][:, :8])

    def test_tokens_missing(self, base):
        golden, model = base
        x, t, _ = split_inputs(golden)
        with pytest.raises(ValueError, match="needs tokens="):
            model(x, t)

    def test_image_size_the_unet_cannot_take(self, base):
        golden, model = base
        _, t, kwargs = split_inputs(golden)
        with pytest.raises(ValueError, match="not divisible by 8"):
            model(torch.zeros(2, 3, 60, 60), t, **kwargs)

    def test_wrong_channel_count(self, base):
        golden, model = base
        _, t, kwargs = split_inputs(golden)
        with pytest.raises(ValueError, match="expects 3 input channels, got 4"):
            model(torch.zeros(2, 4, 64, 64), t, **kwargs)

    def test_timesteps_of_wrong_batch(self, base):
        golden, model = base
        x, t, kwargs = split_inputs(golden)
        with pytest.raises(ValueError, match="timesteps"):
            model(x, t[:1], **kwargs)

    def test_super_res_without_low_res(self):
        golden = load_golden("unet_upsample.pt")
        model = build(golden)
        x, t, kwargs = split_inputs(golden)
        kwargs.pop("low_res")
        with pytest.raises(ValueError, match="needs low_res="):
            model(x, t, **kwargs)

    def test_inpaint_mask_of_wrong_shape(self):
        golden = load_golden("unet_base_inpaint.pt")
        model = build(golden)
        x, t, kwargs = split_inputs(golden)
        kwargs["inpaint_mask"] = kwargs["inpaint_mask"][:, :, :32]
        with pytest.raises(ValueError, match="inpaint_mask must be"):
            model(x, t, **kwargs)


def test_reloaded_weights_invalidate_the_prompt_encoding(base):
    golden, model = base
    x, t, kwargs = split_inputs(golden)
    with torch.no_grad():
        before = model(x, t, **kwargs)
        state = {k: v.clone() for k, v in golden["state_dict"].items()}
        state["transformer_proj.bias"] += 1.0
        model.load_state_dict(state)
        after = model(x, t, **kwargs)
        model.load_state_dict(golden["state_dict"])
        restored = model(x, t, **kwargs)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(restored, before, atol=0, rtol=0)


def test_fresh_text_encoder_sees_token_order():
    # Trained from scratch, the prompt's word order must be visible from the start: the token
    # embeddings start at std 0.02 beside positional embeddings of std 0.01 (CLIP's init), not
    # at nn.Embedding's std 1, next to which the positions would be rounding noise.
    torch.manual_seed(0)
    options = dict(model_and_diffusion_defaults(), image_size=16, num_channels=32, num_res_blocks=1,
                   channel_mult="1,1", num_head_channels=16, attention_resolutions="2", text_ctx=16, xf_width=32,
                   xf_layers=1, xf_heads=1, use_fp16=False, tokenizer="byte")  # fmt: skip
    model, _ = create_model_and_diffusion(**options)
    assert model.token_embedding.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.positional_embedding.std().item() == pytest.approx(0.01, rel=0.1)

    def embedding(text):
        tokens, mask = model.tokenizer.padded_tokens_and_mask(model.tokenizer.encode(text), 16)
        return model.get_text_emb(torch.tensor([tokens]), torch.tensor([mask]))["xf_proj"]

    with torch.no_grad():
        forward, swapped, other = embedding("red on blue"), embedding("blue on red"), embedding("tan on gray")
    # The pooled prompt vector (read from the last, padding position): the same bytes in
    # another order move it 0.22-0.42 times as far as other bytes do (seeds 0-2); with unit
    # token embeddings, 0.007-0.011 times.
    assert (forward - swapped).norm() > 0.1 * (forward - other).norm()
