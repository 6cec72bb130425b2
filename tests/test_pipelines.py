"""Pipelines on tiny seeded-random checkpoints: notebook equivalence, seeds, batching, loading, errors.

The tiny U-Nets (64×64 base, 64→256 upsampler with six levels) are saved as ``.pt`` state
dicts with ``.json`` option sidecars, like trained checkpoints. Every floating weight is
overwritten from a seeded generator (the zero-initialised output convs too, so nothing is
trivially zero): norm gains 1 + 0.1·N(0,1), biases 0.05·N(0,1), matrices
0.3·N(0,1)/sqrt(fan_in). The 0.3 keeps the random nets about as well conditioned as trained
ones; with unit-variance weights a 1/127.5 change of one ``low_res`` pixel can move upsampled
pixels by several levels, which would hide what the batching test checks.
"""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import glide_text2im
from glide_text2im import samplers as fast_samplers
from glide_text2im.download import LOCAL_CHECKPOINTS, register_checkpoint
from glide_text2im.model_creation import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_and_diffusion_defaults_upsampler,
)
from glide_text2im.pipelines import (
    CHECKPOINT_OPTIONS,
    CLIPGuidedPipeline,
    InpaintPipeline,
    LoadedModel,
    NonFiniteOutputError,
    PromptTooLongError,
    Text2ImPipeline,
    checkpoint_options,
    load_model,
    register_checkpoint_options,
    save_options,
)
from glide_text2im.pipelines.images import box_mask, keep_masks, load_image, load_mask, quantize
from glide_text2im.pipelines.loading import pick_device, pick_dtype
from glide_text2im.samplers import SAMPLERS, SPACINGS_OF, get_timesteps, register_sampler

CPU = torch.device("cpu")
STEPS = "ddim5"  # base: timesteps 0, 200, ..., 800
UPSAMPLE_STEPS = "ddim2"  # upsampler: timesteps 0, 500
WEIGHT_SCALE = 0.3

TINY_UNET = dict(
    num_channels=32,
    num_res_blocks=1,
    num_head_channels=16,
    attention_resolutions="8",
    text_ctx=16,
    xf_width=32,
    xf_layers=1,
    xf_heads=1,
    use_fp16=False,
    tokenizer="byte",
)
TINY_BASE = dict(model_and_diffusion_defaults(), image_size=64, channel_mult="1,1,2,2", **TINY_UNET)
TINY_UPSAMPLER = dict(model_and_diffusion_defaults_upsampler(), channel_mult="1,1,1,1,1,1", **TINY_UNET)
TINY_CLIP_CONFIG = """\
logit_scale: 100.0
beta_schedule: "squaredcos_cap_v2"
n_timesteps: 1000
image_size: 64
patch_size: 8
n_vocab: 49408
max_text_len: 77
n_embd: 16
n_head_state_text: 8
n_head_text: 2
n_xf_blocks_text: 1
n_head_state_image: 8
n_head_image: 2
n_xf_blocks_image: 1
"""


# ---------------------------------------------------------------------- tiny checkpoints


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every floating state-dict entry, in order, from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            continue
        noise = torch.randn(value.shape, generator=generator)
        if value.ndim >= 2:
            value.copy_(WEIGHT_SCALE * noise / (value.numel() / value.shape[0]) ** 0.5)
        elif key.endswith(".weight"):
            value.copy_(1 + 0.1 * noise)
        else:
            value.copy_(0.05 * noise)
    return model


@functools.lru_cache(maxsize=None)
def build_tiny_checkpoints(directory: str) -> dict:
    """Write the tiny checkpoints (+ sidecars) into ``directory``; returns {name: path}."""
    paths = {}
    unets = {
        "base": TINY_BASE,
        "upsample": TINY_UPSAMPLER,
        "base-inpaint": dict(TINY_BASE, inpaint=True),
        "upsample-inpaint": dict(TINY_UPSAMPLER, inpaint=True),
    }
    for seed, (name, options) in enumerate(unets.items()):
        model, _ = create_model_and_diffusion(**options)
        path = os.path.join(directory, f"{name}.pt")
        torch.save(randomize(model, seed).state_dict(), path)
        save_options(path, options)
        paths[name] = path

    from glide_text2im.clip.model_creation import create_clip_model

    config = os.path.join(directory, "clip-image.pt.yaml")
    Path(config).write_text(TINY_CLIP_CONFIG)
    with torch.random.fork_rng():
        torch.manual_seed(10)
        clip = create_clip_model(config_path=config)
    paths["clip-image"] = os.path.join(directory, "clip-image.pt")
    paths["clip-text"] = os.path.join(directory, "clip-text.pt")
    torch.save(clip.image_encoder.state_dict(), paths["clip-image"])
    torch.save(clip.text_encoder.state_dict(), paths["clip-text"])
    return paths


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    return build_tiny_checkpoints(str(tmp_path_factory.mktemp("tiny_checkpoints", numbered=False)))


@pytest.fixture(autouse=True)
def one_thread():
    """Sample with one intra-op thread: on a shared 2-core machine two threads mostly wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text2im(tiny) -> Text2ImPipeline:
    return Text2ImPipeline.from_pretrained(tiny["base"], tiny["upsample"], device="cpu")


@pytest.fixture(scope="module")
def inpaint(tiny) -> InpaintPipeline:
    return InpaintPipeline.from_pretrained(tiny["base-inpaint"], tiny["upsample-inpaint"], device="cpu")


@pytest.fixture(scope="module")
def clip_guided(tiny) -> CLIPGuidedPipeline:
    return CLIPGuidedPipeline.from_pretrained(
        tiny["base"], None, clip_image=tiny["clip-image"], clip_text=tiny["clip-text"], device="cpu"
    )


# ---------------------------------------------------------------------- the notebooks, written out


def notebook_models(path: str, timestep_respacing: str, channels_last: bool = True):
    """model, diffusion, options as the notebooks build them (options from the sidecar).

    ``channels_last``: store the convolution weights NHWC, as the pipelines do on a CPU, so that
    the two compute the same numbers; what that layout changes is bounded by
    ``test_cpu_models_keep_channels_last_weights_within_rounding_of_nchw``."""
    options = checkpoint_options(path)
    options["timestep_respacing"] = timestep_respacing
    model, diffusion = create_model_and_diffusion(**options)
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, diffusion, options


def notebook_tokens(model, options, prompts):
    tokenizer = model.tokenizer
    rows = [tokenizer.padded_tokens_and_mask(tokenizer.encode(p) if p else [], options["text_ctx"]) for p in prompts]
    return dict(
        tokens=torch.tensor([row[0] for row in rows], device=CPU),
        mask=torch.tensor([row[1] for row in rows], dtype=torch.bool, device=CPU),
    )


def notebook_model_fn(model, guidance_scale):
    def model_fn(x_t, ts, **kwargs):
        half = x_t[: len(x_t) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = model(combined, ts, **kwargs)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    return model_fn


def notebook_upsample(tiny_path, prompt, samples, generator, loop, denoised_inpaint=None):
    """The notebooks' upsampling: low_res snapped to uint8 levels, noise * 0.997 drawn after the base loop."""
    model_up, diffusion_up, options_up = notebook_models(tiny_path, UPSAMPLE_STEPS)
    batch_size = len(samples)
    model_kwargs = dict(
        low_res=((samples + 1) * 127.5).round() / 127.5 - 1,
        **notebook_tokens(model_up, options_up, [prompt] * batch_size),
    )
    denoised_fn = None
    if denoised_inpaint is not None:
        source_image_256, source_mask_256 = denoised_inpaint
        model_kwargs["inpaint_image"] = (source_image_256 * source_mask_256).repeat(batch_size, 1, 1, 1)
        model_kwargs["inpaint_mask"] = source_mask_256.repeat(batch_size, 1, 1, 1)

        def denoised_fn(x_start):
            mask = model_kwargs["inpaint_mask"]
            return x_start * (1 - mask) + model_kwargs["inpaint_image"] * mask

    up_shape = (batch_size, 3, options_up["image_size"], options_up["image_size"])
    sample_loop = diffusion_up.ddim_sample_loop if loop == "ddim" else diffusion_up.p_sample_loop
    kwargs = dict(denoised_fn=denoised_fn) if denoised_fn is not None else {}
    return sample_loop(
        model_up,
        up_shape,
        noise=torch.randn(up_shape, generator=generator, device=CPU) * 0.997,
        device=CPU,
        clip_denoised=True,
        progress=False,
        model_kwargs=model_kwargs,
        cond_fn=None,
        generator=generator,
        **kwargs,
    )[:batch_size]


def notebook_read_image(image: Image.Image, size: int) -> torch.Tensor:
    pil_img = image.resize((size, size), resample=Image.BICUBIC)
    return torch.from_numpy(np.array(pil_img))[None].permute(0, 3, 1, 2).float() / 127.5 - 1


def test_text2im_equals_the_notebook_loop_bit_for_bit(tiny, text2im):
    prompt, batch_size, guidance_scale, seed = "a red cube", 2, 3.0, 7
    out = text2im(
        prompt, num_images_per_prompt=batch_size, guidance_scale=guidance_scale, steps=STEPS,
        upsample_steps=UPSAMPLE_STEPS, seed=seed, return_tensors=True,
    )

    generator = torch.Generator().manual_seed(seed)
    model, diffusion, options = notebook_models(tiny["base"], STEPS)
    model_kwargs = notebook_tokens(model, options, [prompt] * batch_size + [""] * batch_size)
    samples = diffusion.p_sample_loop(
        notebook_model_fn(model, guidance_scale), (2 * batch_size, 3, 64, 64), device=CPU, clip_denoised=True,
        progress=False, model_kwargs=model_kwargs, cond_fn=None, generator=generator,
    )[:batch_size]
    up_samples = notebook_upsample(tiny["upsample"], prompt, samples, generator, loop="ddim")

    assert torch.equal(out.samples_64, samples)
    assert torch.equal(out.samples_256, up_samples)
    assert [image.size for image in out.images] == [(256, 256)] * 2
    assert np.array_equal(np.stack([np.array(image) for image in out.images]), quantize(up_samples).numpy())
    assert np.array_equal(np.array(out.images_64[1]), quantize(samples)[1].numpy())
    assert out.prompts == [prompt, prompt] and out.seeds == [seed, seed]


def test_inpaint_equals_the_notebook_loop_and_keeps_the_unmasked_area(tiny, inpaint):
    prompt, batch_size, guidance_scale, seed = "a corgi", 1, 5.0, 3
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    mask = np.zeros((96, 96), dtype=bool)
    mask[30:, :] = True  # regenerate from row 30 of 96 = row 20 of 64
    out = inpaint(
        prompt, source, mask, num_images_per_prompt=batch_size, guidance_scale=guidance_scale, steps=STEPS,
        upsample_steps=UPSAMPLE_STEPS, seed=seed, return_tensors=True,
    )

    generator = torch.Generator().manual_seed(seed)
    source_image_64, source_image_256 = notebook_read_image(source, 64), notebook_read_image(source, 256)
    source_mask_64 = torch.ones_like(source_image_64)[:, :1]
    source_mask_64[:, :, 20:] = 0
    source_mask_256 = torch.nn.functional.interpolate(source_mask_64, (256, 256), mode="nearest")
    model, diffusion, options = notebook_models(tiny["base-inpaint"], STEPS)
    full_batch_size = 2 * batch_size
    model_kwargs = dict(
        **notebook_tokens(model, options, [prompt] * batch_size + [""] * batch_size),
        inpaint_image=(source_image_64 * source_mask_64).repeat(full_batch_size, 1, 1, 1),
        inpaint_mask=source_mask_64.repeat(full_batch_size, 1, 1, 1),
    )

    def denoised_fn(x_start):
        mask = model_kwargs["inpaint_mask"]
        return x_start * (1 - mask) + model_kwargs["inpaint_image"] * mask

    samples = diffusion.p_sample_loop(
        notebook_model_fn(model, guidance_scale), (full_batch_size, 3, 64, 64), device=CPU, clip_denoised=True,
        progress=False, model_kwargs=model_kwargs, cond_fn=None, denoised_fn=denoised_fn, generator=generator,
    )[:batch_size]
    up_samples = notebook_upsample(
        tiny["upsample-inpaint"], prompt, samples, generator, loop="ancestral",
        denoised_inpaint=(source_image_256, source_mask_256),
    )

    assert torch.equal(out.samples_64, samples)
    assert torch.equal(out.samples_256, up_samples)
    assert torch.equal(out.samples_64[:, :, :20], source_image_64[:, :, :20])  # kept exactly
    assert not torch.equal(out.samples_64[:, :, 20:], source_image_64[:, :, 20:])
    kept_pixels = np.array(out.images_64[0])[:20]
    assert np.array_equal(kept_pixels, np.array(source.resize((64, 64), resample=Image.BICUBIC))[:20])


def test_clip_guided_equals_the_notebook_loop_bit_for_bit(tiny, clip_guided):
    prompt, batch_size, guidance_scale, seed = "a corgi", 2, 3.0, 11
    out = clip_guided(
        prompt, num_images_per_prompt=batch_size, guidance_scale=guidance_scale, steps=STEPS, seed=seed,
        return_tensors=True,
    )
    assert out.images_256 is None and out.images == out.images_64

    generator = torch.Generator().manual_seed(seed)
    model, diffusion, options = notebook_models(tiny["base"], STEPS)
    cond_fn = clip_guided.clip.cond_fn([prompt] * batch_size, guidance_scale)
    samples = diffusion.p_sample_loop(
        model, (batch_size, 3, 64, 64), device=CPU, clip_denoised=True, progress=False,
        model_kwargs=notebook_tokens(model, options, [prompt] * batch_size), cond_fn=cond_fn, generator=generator,
    )
    assert torch.equal(out.samples_64, samples)
    unguided = diffusion.p_sample_loop(
        model, (batch_size, 3, 64, 64), device=CPU, model_kwargs=notebook_tokens(model, options, [prompt] * batch_size),
        generator=torch.Generator().manual_seed(seed),
    )
    assert (unguided - samples).abs().max() > 0.01  # the CLIP gradient matters


def test_batched_prompts_match_one_by_one_with_the_same_per_prompt_seeds(text2im):
    prompts = ["a red cube", "a blue ball"]
    kwargs = dict(steps=STEPS, upsample_steps=UPSAMPLE_STEPS)
    batched = text2im(prompts, seed=20, **kwargs)
    alone = [text2im(prompts[0], seed=20, **kwargs), text2im(prompts[1], seed=21, **kwargs)]
    assert batched.seeds == [20, 21]
    for k in range(2):
        for stage in ("images_64", "images_256"):
            got = np.array(getattr(batched, stage)[k], dtype=int)
            want = np.array(getattr(alone[k], stage)[0], dtype=int)
            assert np.abs(got - want).max() <= 1, (k, stage)
    swapped = np.array(text2im(prompts[1], seed=20, steps=STEPS, upsample=False).images_64[0], dtype=int)
    assert np.abs(swapped - np.array(batched.images_64[1], dtype=int)).max() > 50


@pytest.mark.parametrize("name", ["inpaint", "clip_guided"])
def test_other_pipelines_batch_prompts_like_one_by_one_too(request, name):
    """Inpainting: guided base and inpainting upsampler; CLIP guidance: unguided rows, prompt by prompt."""
    pipe = request.getfixturevalue(name)
    prompts = ["a red cube", "a blue ball"]
    kwargs = dict(num_images_per_prompt=2, steps=STEPS, upsample_steps=UPSAMPLE_STEPS)
    if name == "inpaint":
        kwargs.update(image=np.full((64, 64, 3), 200, dtype=np.uint8), mask=box_mask((0, 20, 64, 64), (64, 64)))
    batched = pipe(prompts, seed=30, **kwargs)
    for k, prompt in enumerate(prompts):
        alone = pipe(prompt, seed=30 + k, **kwargs)
        got = np.stack([np.array(image, dtype=int) for image in batched.images[2 * k : 2 * k + 2]])
        want = np.stack([np.array(image, dtype=int) for image in alone.images])
        assert np.abs(got - want).max() <= 1, k
    assert np.abs(got - np.stack([np.array(image, dtype=int) for image in batched.images[:2]])).max() > 50


def test_generator_argument_equals_seed_and_the_global_rng_is_untouched(text2im):
    torch.manual_seed(123)
    expected_next = torch.randn(3)
    torch.manual_seed(123)
    by_seed = text2im(["a", "b"], seed=[5, 9], steps=STEPS, upsample=False, return_tensors=True)
    generators = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(9)]
    by_generator = text2im(["a", "b"], generator=generators, steps=STEPS, upsample=False, return_tensors=True)
    assert torch.equal(torch.randn(3), expected_next)
    assert torch.equal(by_seed.samples_64, by_generator.samples_64)
    assert by_generator.seeds == [None, None]
    other = text2im(["a", "b"], seed=[6, 9], steps=STEPS, upsample=False, return_tensors=True)
    assert not torch.equal(other.samples_64[0], by_seed.samples_64[0])
    assert torch.equal(other.samples_64[1], by_seed.samples_64[1])


def test_callback_sees_every_step_of_both_stages(text2im):
    calls = []
    out = text2im(
        ["a", "b"], steps=STEPS, upsample_steps=UPSAMPLE_STEPS, seed=0, callback=calls.append, return_tensors=True
    )
    assert [c["step"] for c in calls] == list(range(7)) and {c["total_steps"] for c in calls} == {7}
    assert [c["stage"] for c in calls] == ["base"] * 5 + ["upsample"] * 2
    assert [c["i"] for c in calls] == [0, 1, 2, 3, 4, 0, 1]
    assert [c["t"] for c in calls[:5]] == get_timesteps(text2im.base.diffusion, STEPS)
    assert [tuple(c["x"].shape) for c in calls] == [(2, 3, 64, 64)] * 5 + [(2, 3, 256, 256)] * 2
    assert tuple(calls[4]["pred_xstart"].shape) == (2, 3, 64, 64)  # the images' rows only, not the uncond half
    # the ancestral loop's last step adds no noise: its sample is the posterior mean at t = 0, x_0
    assert torch.allclose(calls[4]["pred_xstart"], out.samples_64, atol=1e-6)
    assert torch.equal(calls[6]["pred_xstart"], out.samples_256)  # DDIM's last step lands on x_0 exactly


def test_a_registered_sampler_runs_in_the_pipelines_on_its_own_spacing(text2im):
    seen = {}

    def sample_recording(model, diffusion, shape, timesteps=None, **kwargs):
        seen["timesteps"], seen["shape"] = timesteps, shape
        return torch.zeros(shape)

    register_sampler("recording", sample_recording, spacing="logsnr")
    try:
        out = text2im("a", sampler="recording", steps=5, upsample=False, seed=0, return_tensors=True)
    finally:
        del SAMPLERS["recording"], SPACINGS_OF["recording"]
    assert seen["timesteps"] == get_timesteps(text2im.base.diffusion, 5, "logsnr")
    assert seen["shape"] == (2, 3, 64, 64)  # [cond; uncond]
    assert out.settings["sampler"] == "recording" and out.settings["spacing"] == "logsnr"
    assert out.samples_64.abs().max() == 0


@pytest.mark.parametrize("name", ["plms", "dpmpp_2m"])
def test_fast_samplers_plug_in_by_name(tiny, text2im, name):
    out = text2im("a cube", steps="ddim4", sampler=name, upsample=False, seed=4, return_tensors=True)
    model, diffusion, options = notebook_models(tiny["base"], "ddim4")
    expected = fast_samplers.SAMPLERS[name](
        notebook_model_fn(model, 3.0), diffusion, (2, 3, 64, 64),
        model_kwargs=notebook_tokens(model, options, ["a cube", ""]), device=CPU,
        generator=torch.Generator().manual_seed(4),
    )[:1]
    assert torch.equal(out.samples_64, expected)


def test_unknown_sampler_is_an_error_listing_the_registered_ones(text2im, clip_guided):
    for pipe in (text2im, clip_guided):
        with pytest.raises(ValueError, match="unknown sampler 'euler'.*ancestral, ddim, plms, dpmpp_2m"):
            pipe("a", sampler="euler", steps=STEPS, upsample=False)


@pytest.mark.parametrize("name", ["plms", "dpmpp_2m", "ddim"])
def test_clip_guided_fast_samplers_equal_the_sampler_functions_with_the_cond_fn(tiny, clip_guided, name):
    prompt, seed = "a corgi", 5
    out = clip_guided(prompt, steps="ddim4", sampler=name, guidance_scale=3.0, seed=seed, return_tensors=True)
    model, diffusion, options = notebook_models(tiny["base"], "ddim4")
    cond_fn = clip_guided.clip.cond_fn([prompt], 3.0)
    unguided, guided = (
        fast_samplers.SAMPLERS[name](
            model, diffusion, (1, 3, 64, 64), model_kwargs=notebook_tokens(model, options, [prompt]),
            device=CPU, generator=torch.Generator().manual_seed(seed), cond_fn=fn,
        )
        for fn in (None, cond_fn)
    )
    assert torch.equal(out.samples_64, guided)
    assert (guided - unguided).abs().max() > 0.01  # the CLIP gradient matters


def test_prompt_longer_than_the_context_raises_unless_truncation_is_asked(text2im):
    long_prompt = "a very long prompt indeed"  # 25 bytes > text_ctx 16
    with pytest.raises(PromptTooLongError, match="25 tokens but the model reads at most 16"):
        text2im(long_prompt, steps=STEPS, upsample=False, seed=0)
    truncated = text2im(long_prompt, steps=STEPS, upsample=False, seed=0, truncate_prompts=True, return_tensors=True)
    cut = text2im(long_prompt[:16], steps=STEPS, upsample=False, seed=0, return_tensors=True)
    assert torch.equal(truncated.samples_64, cut.samples_64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=1, generator=torch.Generator()), "not both"),
        (dict(generator=torch.Generator()), "one torch.Generator per prompt"),
        (dict(seed=[1]), "one seed per prompt"),
        (dict(seed=-1), r"seed must be an int in \[0, 2\*\*63 - 1\], got -1"),
        (dict(seed=[1, 2**63]), r"seed must be an int in \[0, 2\*\*63 - 1\]"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive int, got 0"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0, got nan"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number >= 0, got inf"),
        (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0, got -1.0"),
        (dict(steps="fast"), "invalid timestep respacing"),
    ],
)
def test_bad_call_arguments_raise_value_errors(text2im, kwargs, message):
    with pytest.raises(ValueError, match=message):
        text2im(["a", "b"], **dict(dict(steps=STEPS, upsample=False), **kwargs))


def one_line_error(error: type, call, *args, **kwargs) -> str:
    """The message of the ``error`` that ``call(*args, **kwargs)`` raises, checked to be one line."""
    with pytest.raises(error) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(prompts=None), TypeError, "prompts must be a str or a sequence of str, got None"),
        (dict(prompts=123), TypeError, "prompts must be a str or a sequence of str, got 123"),
        (dict(prompts=["a", 3]), TypeError, r"prompts\[1\] must be a str, got 3"),
        (dict(prompts=[]), ValueError, "prompts is empty"),
        (dict(seed=1.5), TypeError, r"seed must be an int >= 0 \(or a list of them, one per prompt\), got 1.5"),
        (dict(seed=[1, "2"]), TypeError, "seed must be an int >= 0.*got '2'"),
        (dict(guidance_scale="3"), TypeError, "guidance_scale must be a finite number >= 0, got '3'"),
        (dict(num_images_per_prompt=1.0), TypeError, "num_images_per_prompt must be a positive int, got 1.0"),
    ],
)
def test_arguments_of_the_wrong_kind_get_one_line_errors_naming_them(text2im, kwargs, error, message):
    kwargs = dict(dict(prompts=["a", "b"], steps=STEPS, upsample=False), **kwargs)
    assert re.search(message, one_line_error(error, text2im, kwargs.pop("prompts"), **kwargs))


@pytest.mark.parametrize("name", ["inpaint", "clip_guided"])
def test_every_pipeline_rejects_a_non_finite_guidance_scale(request, name):
    pipe = request.getfixturevalue(name)
    region = dict(image=np.zeros((64, 64, 3), np.uint8), mask=np.ones((64, 64))) if name == "inpaint" else {}
    message = one_line_error(ValueError, pipe, "a", **region, guidance_scale=float("nan"), steps=STEPS)
    assert message == "guidance_scale must be a finite number >= 0, got nan"


def test_inpainting_rejects_a_non_square_image_and_a_mask_that_selects_nothing(inpaint):
    square, wide = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 96, 3), np.uint8)
    message = one_line_error(ValueError, inpaint, "a", wide, np.ones((64, 96)), steps=STEPS)
    assert message.startswith("image is 96x64 pixels but must be square") and "crop it to a square" in message
    message = one_line_error(ValueError, inpaint, "a", square, np.zeros((64, 64)), steps=STEPS)
    assert message == "the mask has no white pixels: nothing to regenerate"
    speck = np.zeros((256, 256), np.float32)
    speck[10, 10] = 1.0  # 1/16 of a 64x64 pixel
    message = one_line_error(ValueError, inpaint, "a", square, speck, steps=STEPS)
    assert "covers no pixel of the 64x64 model image" in message and "nothing to regenerate" in message


def test_output_save_writes_the_commands_metadata_and_never_overwrites_by_default(text2im, tiny, tmp_path):
    out = text2im(["a red cube", "a cat"], num_images_per_prompt=2, steps=STEPS, upsample_steps=UPSAMPLE_STEPS, seed=3)
    folder = tmp_path / "new" / "folder"
    names = ["00000-0.png", "00000-1.png", "00001-0.png", "00001-1.png"]
    assert out.save(str(folder)) == [str(folder / name) for name in names]
    with Image.open(folder / "00001-1.png") as image:
        text = dict(image.text)
        assert np.array_equal(np.array(image), np.array(out.images[3]))
    assert text["prompt"] == "a cat" and text["seed"] == "4" and text["image_index"] == "1"
    settings = json.loads(text["settings"])
    assert settings == dict(
        base_checkpoint=tiny["base"], upsample_checkpoint=tiny["upsample"], num_images_per_prompt=2,
        guidance_scale=3.0, steps=STEPS, spacing=None, sampler="ancestral", upsample_steps=UPSAMPLE_STEPS,
        upsample_spacing=None, upsample_sampler="ddim", upsample_temp=0.997, dtype="float32", device="cpu",
        version=glide_text2im.__version__,
    )

    second = out.save(str(folder))  # numbered on: nothing replaced
    assert [os.path.basename(p) for p in second] == ["00002-0.png", "00002-1.png", "00003-0.png", "00003-1.png"]
    first_bytes = (folder / "00000-0.png").read_bytes()
    base_only = text2im("a dog", steps=STEPS, upsample=False, seed=9)
    assert base_only.save(str(folder), overwrite=True) == [str(folder / "00000-0.png")]
    assert (folder / "00000-0.png").read_bytes() != first_bytes
    assert sorted(os.listdir(folder)) == [f"{i:05d}-{j}.png" for i in range(4) for j in range(2)]
    settings = json.loads(png_text(folder / "00000-0.png")["settings"])
    assert settings["upsample_checkpoint"] is None and settings["upsample_steps"] is None


def test_output_save_of_generator_runs_leaves_out_the_seed(text2im, tmp_path):
    out = text2im("a", generator=torch.Generator().manual_seed(1), steps=STEPS, upsample=False)
    (path,) = out.save(str(tmp_path))
    assert "seed" not in png_text(path) and png_text(path)["prompt"] == "a"


def png_text(path) -> dict:
    with Image.open(path) as image:
        return dict(image.text)


def test_a_checkpoint_built_with_other_options_gets_a_short_error(tiny):
    message = one_line_error(ValueError, load_model, tiny["base"], TINY_UPSAMPLER, "cpu")
    assert message.startswith(f"checkpoint {tiny['base']!r} does not fit the model: ")
    assert re.search(r"\d+ tensors have other shapes \(first [\w.]+: checkpoint \[\d+(, \d+)*\], model \[", message)
    assert message.endswith("build the model with the options the checkpoint was trained with")
    assert len(message) < 400 + len(tiny["base"])
    demo_message = one_line_error(ValueError, load_model, "demo/base", model_and_diffusion_defaults(), "cpu")
    assert "tensors have other shapes" in demo_message and "missing" in demo_message
    assert demo_message.endswith("(glide_text2im.demo.options('demo/base'))") and len(demo_message) < 500


def test_upsample_without_an_upsampler_is_an_error(clip_guided):
    with pytest.raises(ValueError, match="no upsampler"):
        clip_guided("a", upsample=True, steps=STEPS)


# ---------------------------------------------------------------------- loading


def test_options_come_from_argument_registry_or_sidecar(tiny, tmp_path):
    assert checkpoint_options(tiny["base"]) == TINY_BASE
    assert checkpoint_options("base") == model_and_diffusion_defaults()
    assert checkpoint_options("upsample-inpaint")["inpaint"] is True
    assert checkpoint_options("anything", options=TINY_UPSAMPLER) == TINY_UPSAMPLER

    bare = tmp_path / "bare.pt"
    bare.write_bytes(Path(tiny["base"]).read_bytes())
    with pytest.raises(ValueError, match=r"pass options= or write them as JSON to .*bare\.pt\.json"):
        checkpoint_options(str(bare))
    (tmp_path / "bare.pt.json").write_text('{"image_size": 64, "num_chanels": 3}')
    with pytest.raises(ValueError, match=r"unknown keys \['num_chanels'\], missing keys \['attention_resolutions'"):
        checkpoint_options(str(bare))
    with pytest.raises(ValueError, match="unknown checkpoint 'no-such-model'"):
        checkpoint_options("no-such-model")


def test_registered_names_load_like_the_demo_model_will(tiny):
    name = "test/tiny-base"
    register_checkpoint(name, lambda: tiny["base"])
    try:
        assert checkpoint_options(name) == TINY_BASE  # from the sidecar of the resolved file
        register_checkpoint_options(name, dict(TINY_BASE, dropout=0.0))
        loaded = load_model(name, device="cpu")
        assert loaded.options["dropout"] == 0.0 and loaded.name == name
        assert not loaded.model.training
    finally:
        LOCAL_CHECKPOINTS.pop(name, None)
        CHECKPOINT_OPTIONS.pop(name, None)
    with pytest.raises(ValueError, match="official checkpoint"):
        register_checkpoint_options("base", TINY_BASE)


@pytest.mark.parametrize("name", ["base", "upsample"])
def test_cpu_models_keep_channels_last_weights_within_rounding_of_nchw(tiny, name):
    loaded = load_model(tiny[name], device="cpu")
    conv_weights = [p for p in loaded.model.parameters() if p.ndim == 4]
    assert len(conv_weights) > 10
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    assert not any(p.is_contiguous() for p in conv_weights if p.shape[1] > 1 and p.shape[2] > 1)

    nchw, _, options = notebook_models(tiny[name], "", channels_last=False)
    generator = torch.Generator().manual_seed(0)
    size = options["image_size"]
    x_t = torch.randn(2, 3, size, size, generator=generator)
    kwargs = notebook_tokens(nchw, options, ["a red cube", ""])
    if options["super_res"]:
        kwargs["low_res"] = torch.rand(2, 3, size // 4, size // 4, generator=generator) * 2 - 1
    with torch.no_grad():
        fast = loaded.model(x_t, torch.tensor([500, 500]), **kwargs)
        reference = nchw(x_t, torch.tensor([500, 500]), **kwargs)
    # The fast path's tolerance (issue 10); measured 2e-5 here, 1e-6 to 4e-6 on the demo and full-size models.
    assert (fast - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_pipelines_check_the_kind_of_model(tiny):
    base = load_model(tiny["base"], device="cpu")
    inpaint_base = load_model(tiny["base-inpaint"], device="cpu")
    with pytest.raises(ValueError, match="base model must be a text-to-image base model, but .* is an inpainting"):
        Text2ImPipeline(inpaint_base)
    with pytest.raises(ValueError, match="the upsampler must be an inpainting upsampler"):
        InpaintPipeline(inpaint_base, load_model(tiny["upsample"], device="cpu"))
    with pytest.raises(ValueError, match="the upsampler must be an upsampler"):
        Text2ImPipeline(base, base)


def test_precision_casts_the_torso_and_text_linears_only(tiny):
    loaded = load_model(tiny["upsample"], device="cpu", dtype="bfloat16")
    model = loaded.model
    assert model.dtype == torch.bfloat16
    assert model.input_blocks[0][0].weight.dtype == torch.bfloat16
    assert model.transformer_proj.weight.dtype == torch.bfloat16
    assert model.out[0].weight.dtype == torch.float32  # the output norm stays float32
    assert model.positional_embedding.dtype == torch.float32
    assert load_model(tiny["base"], device="cpu").model.dtype == torch.float32


def test_device_and_dtype_defaults():
    assert pick_device(None) == pick_device("auto") == (
        torch.device("cuda") if torch.cuda.is_available() else
        torch.device("mps") if torch.backends.mps.is_available() else CPU
    )
    assert pick_device("cpu") == CPU
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    assert pick_dtype(None, CPU) == torch.float32
    assert pick_dtype(None, torch.device("cuda")) == torch.float16
    assert pick_dtype("bf16", CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        pick_dtype("float8", CPU)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def micro_base(dtype: str) -> LoadedModel:
    """A 16×16 two-level base model: fast enough to sample in float16 on a CPU."""
    options = dict(TINY_BASE, image_size=16, channel_mult="1,1")
    model, _ = create_model_and_diffusion(**options)
    randomize(model, 0).eval()
    loaded = LoadedModel(model, options, name="micro")
    from glide_text2im.pipelines.loading import set_precision

    set_precision(model, pick_dtype(dtype, CPU))
    return loaded


def test_half_precision_overflow_is_reported_with_advice():
    loaded = micro_base("float16")
    pipe = Text2ImPipeline(loaded)
    assert torch.isfinite(pipe("a", steps="ddim2", seed=0, return_tensors=True).samples_64).all()
    loaded.model.input_blocks[0][0].weight.data *= 1e5  # activations beyond float16's 65504
    with pytest.raises(NonFiniteOutputError, match="NaN or infinite values in float16.*float32 or bfloat16"):
        pipe("a", steps="ddim2", seed=0)


def test_non_finite_float32_outputs_are_reported_too():
    loaded = micro_base("float32")
    loaded.model.out[2].bias.data.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputError, match="in float32: check the checkpoint"):
        Text2ImPipeline(loaded)("a", steps="ddim2", seed=0)


def test_infinite_output_clamped_away_by_ddim_is_still_reported():
    loaded = micro_base("float32")
    loaded.model.out[2].bias.data[0] = float("inf")  # eps = inf: pred_xstart is clamped to -1, finite
    with pytest.raises(NonFiniteOutputError, match="in float32"):
        Text2ImPipeline(loaded)("a", steps="ddim2", sampler="ddim", seed=0)


# ---------------------------------------------------------------------- images and masks


def test_masks_of_every_form_give_the_same_keep_masks():
    regenerate = np.zeros((32, 48), dtype=np.float32)
    regenerate[8:, 12:30] = 1.0
    forms = [
        regenerate,
        regenerate.astype(bool),
        (regenerate * 255).astype(np.uint8),
        torch.from_numpy(regenerate)[None, None],
        Image.fromarray((regenerate * 255).astype(np.uint8)),
        box_mask((12, 8, 30, 32), (48, 32)),
    ]
    reference = keep_masks(load_mask(forms[0]), (96, 64), 64, 256, CPU)
    for form in forms[1:]:
        got = keep_masks(load_mask(form), (96, 64), 64, 256, CPU)
        assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])
    keep_64, keep_256 = reference
    assert keep_64.shape == (1, 1, 64, 64) and keep_256.shape == (1, 1, 256, 256)
    assert keep_64[0, 0, :15].eq(1).all() and keep_64[0, 0, 17:, 17:39].eq(0).all()
    assert torch.equal(keep_256, keep_64.repeat_interleave(4, 2).repeat_interleave(4, 3))


def test_mask_with_another_aspect_ratio_cannot_be_mapped():
    keep_64, _ = keep_masks(np.ones((250, 333), dtype=np.float32), (1000, 750), 64, 256, CPU)  # within 1%
    assert keep_64.eq(0).all()
    with pytest.raises(ValueError, match="the 50x32 mask cannot be mapped onto the 96x64 image"):
        keep_masks(np.zeros((32, 50), dtype=np.float32), (96, 64), 64, 256, CPU)
    with pytest.raises(ValueError, match="single-channel"):
        load_mask(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="outside the 48x32 image"):
        box_mask((0, 0, 49, 10), (48, 32))


def test_images_of_every_form_load_to_the_same_pixels(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "source.png")
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    for form in (pixels, Image.fromarray(pixels), str(tmp_path / "source.png"), tensor, tensor[None], pixels / 255.0):
        assert np.array_equal(np.array(load_image(form)), pixels)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image(str(tmp_path / "missing.png"))


# ---------------------------------------------------------------------- package


def test_importing_the_package_stays_light_and_reexports_lazily():
    code = "import sys, glide_text2im; print('torch' in sys.modules, 'Text2ImPipeline' in dir(glide_text2im))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]

    import glide_text2im

    assert glide_text2im.Text2ImPipeline is Text2ImPipeline
    assert glide_text2im.InpaintPipeline is InpaintPipeline and glide_text2im.CLIPGuidedPipeline is CLIPGuidedPipeline
    with pytest.raises(AttributeError, match="no attribute 'Text2Im'"):
        glide_text2im.Text2Im
