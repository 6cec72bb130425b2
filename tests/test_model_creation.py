"""Options, factories and the official checkpoint layouts."""

import json

import pytest
import torch

from glide_text2im.model_creation import (
    create_model,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_and_diffusion_defaults_upsampler,
    resolve_channel_mult,
)


def test_defaults_equal_the_official_ones(spec_dir):
    spec = json.loads((spec_dir / "defaults.json").read_text())
    assert model_and_diffusion_defaults() == spec["model_and_diffusion_defaults"]
    assert model_and_diffusion_defaults_upsampler() == spec["model_and_diffusion_defaults_upsampler"]


def notebook_options(name: str) -> dict:
    """Options as the official notebooks build them on a machine without CUDA."""
    upsampler = name.startswith("upsample")
    options = model_and_diffusion_defaults_upsampler() if upsampler else model_and_diffusion_defaults()
    options["inpaint"] = name.endswith("inpaint")
    options["use_fp16"] = False
    options["timestep_respacing"] = "fast27" if upsampler else "100"
    return options


@pytest.mark.parametrize("name", ["base", "upsample", "base_inpaint", "upsample_inpaint"])
def test_official_checkpoint_layout_and_fp16_split(name, spec_dir):
    spec = json.loads((spec_dir / f"{name}.json").read_text())
    fp16 = json.loads((spec_dir / "fp16_dtypes.json").read_text())[name.replace("_", "-")]
    model, _ = create_model_and_diffusion(**notebook_options(name))
    model.eval()

    assert type(model).__name__ == spec["model_class"]
    layout = [[key, list(value.shape), str(value.dtype).replace("torch.", "")] for key, value in model.state_dict().items()]
    assert layout == spec["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == spec["num_params"]

    checkpoint = {key: torch.full(shape, 0.5) for key, shape, _ in spec["state_dict"]}
    model.load_state_dict(checkpoint, strict=True)
    model.convert_to_fp16()
    model.load_state_dict(checkpoint, strict=True)
    dtypes = {key: value.dtype for key, value in model.state_dict().items()}
    assert [k for k, d in dtypes.items() if d == torch.float16] == fp16["float16_keys"]
    assert [k for k, d in dtypes.items() if d == torch.float32] == fp16["float32_keys"]
    assert model.dtype == torch.float16
    assert model.state_dict()["input_blocks.0.0.weight"].flatten()[0].item() == 0.5


def test_use_fp16_option_builds_a_float16_torso():
    options = dict(model_and_diffusion_defaults(), num_channels=32, num_res_blocks=1, xf_width=32, xf_layers=1,
                   xf_heads=1, text_ctx=8, num_head_channels=16)
    model, _ = create_model_and_diffusion(**options)
    assert model.dtype == torch.float16
    assert model.out[2].weight.dtype == torch.float32
    assert model.time_embed[0].weight.dtype == torch.float32


@pytest.mark.parametrize(
    "image_size, channel_mult, expected",
    [(64, "", (1, 2, 3, 4)), (128, "", (1, 1, 2, 3, 4)), (256, "", (1, 1, 2, 2, 4, 4)), (32, "1,2,2", (1, 2, 2))],
)
def test_channel_mult_resolution(image_size, channel_mult, expected):
    assert resolve_channel_mult(image_size, channel_mult) == expected


def test_channel_mult_that_does_not_fit_image_size():
    with pytest.raises(ValueError, match="image_size must be 2\\*\\*\\(levels \\+ 2\\)"):
        resolve_channel_mult(64, "1,2,3")
    with pytest.raises(ValueError, match="no default channel_mult for image_size 96"):
        resolve_channel_mult(96, "")


def test_unknown_tokenizer_option():
    options = dict(model_and_diffusion_defaults(), num_channels=32, xf_width=32, num_head_channels=16)
    options.pop("diffusion_steps"), options.pop("noise_schedule"), options.pop("timestep_respacing")
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt4'"):
        create_model(**options, tokenizer="gpt4")


def test_respacing_reaches_the_diffusion():
    options = dict(model_and_diffusion_defaults(), num_channels=32, num_res_blocks=1, xf_width=0,
                   num_head_channels=16, use_fp16=False, timestep_respacing="fast27")
    model, diffusion = create_model_and_diffusion(**options)
    assert diffusion.num_timesteps == 27
    assert not hasattr(model, "transformer")
