"""Fast samplers: step grids, hand-computed steps, exact data, CFG / inpainting / upsampler models."""

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from glide_text2im.model_creation import (
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    model_and_diffusion_defaults_upsampler,
)
from glide_text2im.respace import space_timesteps
from glide_text2im.samplers import (
    SAMPLERS,
    SPACINGS,
    SPACINGS_OF,
    get_timesteps,
    is_step_count,
    sample_ancestral,
    sample_ddim,
    sample_dpmpp_2m,
    sample_plms,
)
from tests.conftest import load_golden
from tests.test_gaussian_diffusion import build_diffusion

ALL_SAMPLERS = [sample_ddim, sample_plms, sample_dpmpp_2m]
sampler_params = pytest.mark.parametrize("sampler", ALL_SAMPLERS, ids=lambda f: f.__name__)
# DDIM runs the original ddim_sample_loop, whose schedule coefficients are float32: float64
# inputs come out within float32 rounding of the formulas; the solvers compute in float64.
FLOAT64_TOLERANCE = {"sample_ddim": 1e-5}


def tolerance(sampler) -> float:
    return FLOAT64_TOLERANCE.get(sampler.__name__, 1e-10)


def own_spacing(sampler) -> str:
    """The grid the sampler places a step count on when a call names none."""
    return SPACINGS_OF[sampler.__name__[len("sample_"):]]


# ---------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models' ops are too small to split: one thread is faster, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def eps_model(fn):
    """Wrap eps = fn(x, t) into a GLIDE-shaped model: [eps, zero variance values]."""

    def model(x, t, **_kwargs):
        eps = fn(x, t)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)

    return model


def affine_eps_model(x, t, **_kwargs):
    """The fake network of the hand-computed tests: eps = 0.1 x + 0.05."""
    return eps_model(lambda x, t: 0.1 * x + 0.05)(x, t)


def record(trajectory):
    return lambda info: trajectory.append(info)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter (the zero-initialised output convs too) with seeded random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=generator)
                if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                    p.copy_(1 + 0.1 * noise if name == "weight" else 0.05 * noise)
                elif p.ndim >= 2:
                    p.copy_(noise / math.sqrt(p.numel() / p.shape[0]))
                else:
                    p.copy_(0.05 * noise)
    return model.eval()


@functools.lru_cache(maxsize=None)
def tiny_model(kind: str):
    """A 16x16 text-conditional U-Net ("base", "inpaint" or "upsample" from 4x4) with random weights."""
    options = model_and_diffusion_defaults_upsampler() if kind == "upsample" else model_and_diffusion_defaults()
    options.update(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", num_head_channels=16,
        attention_resolutions="8", text_ctx=16, xf_width=32, xf_layers=1, xf_heads=2,
        use_fp16=False, inpaint=kind == "inpaint",
    )
    model, diffusion = create_model_and_diffusion(**options)
    return randomize_(model, seed=len(kind)), diffusion


def prompt_kwargs(rows: int, unconditional_rows: int):
    """tokens/mask for ``rows`` prompts of 5 tokens followed by ``unconditional_rows`` empty prompts."""
    tokens = torch.full((rows + unconditional_rows, 16), 50256, dtype=torch.long)
    mask = torch.zeros(rows + unconditional_rows, 16, dtype=torch.bool)
    tokens[:rows, :5] = torch.tensor([64, 2266, 23441, 319, 1353])
    mask[:rows, :5] = True
    return dict(tokens=tokens, mask=mask)


def classifier_free_guidance(model, guidance_scale):
    """The notebooks' CFG model_fn: first half prompt rows, second half unconditional rows."""

    def model_fn(x_t, ts, **kwargs):
        half = x_t[: len(x_t) // 2]
        model_out = model(torch.cat([half, half], dim=0), ts, **kwargs)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    return model_fn


def scenario(name: str):
    """(model_fn, diffusion, shape, model_kwargs, denoised_fn) for "cfg", "inpaint" or "upsample"."""
    generator = torch.Generator().manual_seed(11)
    if name == "cfg":
        model, diffusion = tiny_model("base")
        return classifier_free_guidance(model, 3.0), diffusion, (4, 3, 16, 16), prompt_kwargs(2, 2), None
    if name == "inpaint":
        model, diffusion = tiny_model("inpaint")
        source = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1
        mask = torch.ones(1, 1, 16, 16)
        mask[:, :, 6:] = 0
        kwargs = prompt_kwargs(2, 2)
        kwargs.update(inpaint_image=(source * mask).repeat(4, 1, 1, 1), inpaint_mask=mask.repeat(4, 1, 1, 1))
        image, known = kwargs["inpaint_image"], kwargs["inpaint_mask"]
        return (
            classifier_free_guidance(model, 5.0), diffusion, (4, 3, 16, 16), kwargs,
            lambda x0: x0 * (1 - known) + image * known,
        )
    model, diffusion = tiny_model("upsample")
    kwargs = prompt_kwargs(2, 0)
    kwargs["low_res"] = torch.rand(2, 3, 4, 4, generator=generator) * 2 - 1
    return model, diffusion, (2, 3, 16, 16), kwargs, None


def start_noise(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---------------------------------------------------------------------- step grids


def test_default_grid_is_quadratic_in_t_from_999_to_0():
    diffusion = build_diffusion("linear")
    assert get_timesteps(diffusion, 10) == [999, 789, 604, 444, 308, 197, 111, 49, 12, 0]
    assert get_timesteps(diffusion, 10, "time") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert get_timesteps(diffusion, 1) == [999]
    assert get_timesteps(diffusion) == list(range(999, -1, -1))


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [2, 7, 25, 100, 999, 1000])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_every_grid_has_exactly_steps_distinct_decreasing_timesteps(schedule, steps, spacing):
    timesteps = get_timesteps(build_diffusion(schedule), steps, spacing)
    assert len(timesteps) == steps
    assert timesteps[0] == 999 and timesteps[-1] == 0
    assert all(a > b for a, b in zip(timesteps, timesteps[1:]))


def test_time_grid_is_the_original_respacing_of_every_step_count():
    diffusion = build_diffusion("linear")
    for steps in range(1, 1001):
        assert get_timesteps(diffusion, steps, "time") == sorted(space_timesteps(1000, str(steps)), reverse=True)


def test_digit_strings_are_step_counts_and_other_respacing_strings_are_the_originals():
    diffusion = build_diffusion("linear")
    assert get_timesteps(diffusion, "25") == get_timesteps(diffusion, 25)
    assert get_timesteps(diffusion, "25", "time") == get_timesteps(diffusion, 25, "time")
    assert get_timesteps(diffusion, "ddim10") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert get_timesteps(diffusion, "fast27") == sorted(space_timesteps(1000, "fast27"), reverse=True)
    assert get_timesteps(diffusion, "2,3") == [999, 750, 500, 499, 0]
    with pytest.raises(ValueError, match="spacing 'quadratic' places a step count; steps 'ddim10' is a respacing"):
        get_timesteps(diffusion, "ddim10", "quadratic")
    with pytest.raises(ValueError, match="invalid timestep respacing 'fast'"):
        get_timesteps(diffusion, "fast")
    assert is_step_count(25) and is_step_count("25")
    assert not any(is_step_count(steps) for steps in (None, True, "ddim25", "fast27", "10,10", 2.5))


def test_logsnr_grid_is_even_in_log_snr():
    diffusion = build_diffusion("linear")
    timesteps = get_timesteps(diffusion, 8, "logsnr")
    alphas_cumprod = diffusion.alphas_cumprod[timesteps]
    lambdas = 0.5 * np.log(alphas_cumprod / (1 - alphas_cumprod))
    gaps = np.diff(lambdas)
    assert np.all(gaps > 0) and gaps.max() / gaps.min() < 1.1


def test_respaced_diffusion_offers_only_its_own_timesteps():
    diffusion = build_diffusion("linear", "ddim10")
    assert get_timesteps(diffusion) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert get_timesteps(diffusion, 4, "time") == [900, 600, 300, 0]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(steps=0), ValueError, r"steps must be in 1 \.\. 1000"),
        (dict(steps=1001), ValueError, r"steps must be in 1 \.\. 1000"),
        (dict(steps=2.5), TypeError, "steps must be an int or a respacing string"),
        (dict(steps=5, timesteps=[999, 0]), ValueError, "either steps or timesteps"),
        (dict(timesteps=[]), ValueError, "timesteps is empty"),
        (dict(timesteps=[0, 999]), ValueError, "strictly decreasing"),
        (dict(timesteps=[999, 999, 0]), ValueError, "strictly decreasing"),
    ],
)
def test_bad_step_arguments_are_errors_naming_the_problem(kwargs, error, message):
    with pytest.raises(error, match=message):
        sample_ddim(affine_eps_model, build_diffusion("linear"), (1, 3, 4, 4), **kwargs)


def test_timesteps_a_respaced_diffusion_lacks_are_a_value_error():
    with pytest.raises(ValueError, match=r"\[950\] are not timesteps of this diffusion"):
        sample_plms(affine_eps_model, build_diffusion("linear", "ddim10"), (1, 3, 4, 4), timesteps=[950, 0])


def test_unknown_spacing_is_a_value_error():
    with pytest.raises(ValueError, match="'karras'"):
        get_timesteps(build_diffusion("linear"), 10, "karras")


@sampler_params
def test_wrong_noise_or_model_output_shape_is_a_value_error(sampler):
    diffusion = build_diffusion("linear")
    with pytest.raises(ValueError, match=r"noise has shape \(1, 3, 4, 4\), expected \(2, 3, 4, 4\)"):
        sampler(affine_eps_model, diffusion, (2, 3, 4, 4), steps=3, noise=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"model output has shape \(2, 3, 4, 4\), expected \(2, 6, 4, 4\)"):
        sampler(lambda x, t: x, diffusion, (2, 3, 4, 4), steps=3)


# ---------------------------------------------------------------------- hand-computed steps


def hand_computed(name, noise, timesteps, alphas_cumprod, clip):
    """Every x_i and the result of sampler ``name`` with eps = 0.1 x + 0.05, from the papers' formulas."""
    xs, x = [noise], noise
    eps_history, previous = [], None  # eps newest first (PLMS); (x_0, lambda) of the last step (DPM++)
    for i, t in enumerate(timesteps):
        alpha, sigma = math.sqrt(alphas_cumprod[t]), math.sqrt(1 - alphas_cumprod[t])
        eps = 0.1 * x + 0.05
        x0 = (x - sigma * eps) / alpha
        x0 = x0.clamp(-1, 1) if clip else x0
        if i == len(timesteps) - 1:
            return xs, x0
        a_next = alphas_cumprod[timesteps[i + 1]]
        alpha_next, sigma_next = math.sqrt(a_next), math.sqrt(1 - a_next)
        if name == "sample_ddim":
            x = alpha_next * x0 + sigma_next * (x - alpha * x0) / sigma
        elif name == "sample_plms":
            eps_history.insert(0, eps)
            e = eps_history
            if len(e) == 1:
                eps_prime = e[0]
            elif len(e) == 2:
                eps_prime = (3 * e[0] - e[1]) / 2
            elif len(e) == 3:
                eps_prime = (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
            else:
                eps_prime = (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24
            x0_prime = (x - sigma * eps_prime) / alpha
            x0_prime = x0_prime.clamp(-1, 1) if clip else x0_prime
            x = alpha_next * x0_prime + sigma_next * (x - alpha * x0_prime) / sigma
        else:
            lam, lam_next = math.log(alpha / sigma), math.log(alpha_next / sigma_next)
            h = lam_next - lam
            if previous is None:
                d = x0
            else:
                r = (lam - previous[1]) / h
                d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous[0]
            x = sigma_next / sigma * x - alpha_next * (math.exp(-h) - 1) * d
            previous = (x0, lam)
        xs.append(x)


@pytest.mark.parametrize("clip", [False, True])
@sampler_params
def test_steps_match_hand_computation(sampler, clip):
    diffusion = build_diffusion("linear")
    timesteps = [999, 800, 600, 450, 300, 150, 0]  # PLMS reaches its 4th order twice, DPM++ varies r
    noise = start_noise((2, 3, 4, 4), dtype=torch.float64)
    trajectory = []
    out = sampler(
        affine_eps_model, diffusion, noise.shape, timesteps=timesteps, noise=noise, clip_denoised=clip,
        callback=record(trajectory),
    )
    want_xs, want_out = hand_computed(sampler.__name__, noise, timesteps, diffusion.alphas_cumprod, clip)
    assert [info["t"] for info in trajectory] == timesteps
    assert [info["i"] for info in trajectory] == list(range(len(timesteps)))
    tol = tolerance(sampler)
    for info, want in zip(trajectory, want_xs):
        assert torch.allclose(info["x"], want, rtol=tol, atol=tol), (info["i"], (info["x"] - want).abs().max())
    assert torch.allclose(out, want_out, rtol=tol, atol=tol)
    assert torch.equal(out, trajectory[-1]["pred_xstart"])  # DDIM's last step lands on its x_0 exactly


def test_plms_and_dpmpp_steps_differ_from_ddim_after_the_first():
    diffusion = build_diffusion("linear")
    noise = start_noise((1, 3, 4, 4), dtype=torch.float64)
    runs = {}
    for sampler in ALL_SAMPLERS:
        trajectory = []
        sampler(
            affine_eps_model, diffusion, noise.shape, steps=5, noise=noise, clip_denoised=False,
            callback=record(trajectory), spacing="quadratic",
        )
        runs[sampler.__name__] = [info["x"] for info in trajectory]
    for name in ("sample_plms", "sample_dpmpp_2m"):
        assert torch.allclose(runs[name][1], runs["sample_ddim"][1], rtol=1e-6, atol=1e-8)
        assert (runs[name][2] - runs["sample_ddim"][2]).abs().max() > 1e-3


# ---------------------------------------------------------------------- exact data distributions


def exact_eps_model(diffusion, x0_of_xt):
    """The eps a perfect model predicts when E[x_0 | x_t] = x0_of_xt(x_t, alpha, sigma)."""
    alphas_cumprod = torch.from_numpy(diffusion.alphas_cumprod)

    def eps(x, t):
        a = alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        x0 = x0_of_xt(x, a.sqrt(), (1 - a).sqrt()).to(x.dtype)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return eps_model(eps)


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
@sampler_params
def test_single_point_data_is_recovered_along_the_exact_path(sampler, schedule, steps):
    diffusion = build_diffusion(schedule)
    x_data = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.8 - 0.9
    model = exact_eps_model(diffusion, lambda x, alpha, sigma: x_data)

    out = sampler(model, diffusion, x_data.shape, steps=steps, noise=start_noise(x_data.shape))
    assert (out - x_data.float()).abs().max() < 1e-4

    # In float64 every x_i lies on the ODE path alpha_t x_data + sigma_t eps of the start noise.
    noise = start_noise(x_data.shape, dtype=torch.float64)
    trajectory = []
    sampler(model, diffusion, x_data.shape, steps=steps, noise=noise, callback=record(trajectory))
    alpha_start, sigma_start = math.sqrt(diffusion.alphas_cumprod[999]), math.sqrt(1 - diffusion.alphas_cumprod[999])
    eps = (noise - alpha_start * x_data) / sigma_start
    for info in trajectory:
        a = diffusion.alphas_cumprod[info["t"]]
        assert torch.allclose(info["x"], math.sqrt(a) * x_data + math.sqrt(1 - a) * eps, atol=1e-8 if tolerance(sampler) < 1e-6 else 1e-5)


def test_multistep_samplers_are_far_more_accurate_than_ddim_on_gaussian_data():
    # x_0 ~ N(0, s^2) per pixel: E[x_0 | x_t] = alpha s^2 x_t / (alpha^2 s^2 + sigma^2), and the
    # probability-flow ODE keeps x_t / sqrt(alpha^2 s^2 + sigma^2) constant.
    s = 0.5
    diffusion = build_diffusion("squaredcos_cap_v2")
    model = exact_eps_model(diffusion, lambda x, alpha, sigma: alpha * s**2 * x / (alpha**2 * s**2 + sigma**2))
    noise = start_noise((1, 3, 16, 16), dtype=torch.float64)
    a_start, a_end = diffusion.alphas_cumprod[999], diffusion.alphas_cumprod[0]
    x_end = noise * math.sqrt((a_end * s**2 + 1 - a_end) / (a_start * s**2 + 1 - a_start))
    want = math.sqrt(a_end) * s**2 * x_end / (a_end * s**2 + 1 - a_end)

    errors = {
        sampler.__name__: (
            sampler(model, diffusion, noise.shape, steps=25, noise=noise, clip_denoised=False, spacing="quadratic") - want
        )
        .abs()
        .max()
        .item()
        for sampler in ALL_SAMPLERS
    }
    assert 0.01 < errors["sample_ddim"] < 0.1, errors
    assert errors["sample_plms"] < errors["sample_ddim"] / 5, errors
    assert errors["sample_dpmpp_2m"] < errors["sample_ddim"] / 5, errors


# ---------------------------------------------------------------------- real (tiny) models


@pytest.mark.parametrize("name", ["cfg", "inpaint", "upsample"])
@sampler_params
def test_first_step_with_a_tiny_model_matches_hand_computation(sampler, name):
    model_fn, diffusion, shape, model_kwargs, denoised_fn = scenario(name)
    noise = start_noise(shape)
    timesteps = get_timesteps(diffusion, 4, own_spacing(sampler))
    trajectory = []
    out = sampler(
        model_fn, diffusion, shape, steps=4, noise=noise, model_kwargs=model_kwargs, denoised_fn=denoised_fn,
        callback=record(trajectory),
    )

    a, a_next = diffusion.alphas_cumprod[timesteps[0]], diffusion.alphas_cumprod[timesteps[1]]
    with torch.no_grad():
        eps = model_fn(noise, torch.full((shape[0],), timesteps[0]), **model_kwargs)[:, :3]
    x0 = (noise - math.sqrt(1 - a) * eps) / math.sqrt(a)
    x0 = (denoised_fn(x0) if denoised_fn else x0).clamp(-1, 1)
    x1 = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * (noise - math.sqrt(a) * x0) / math.sqrt(1 - a)

    assert torch.allclose(trajectory[0]["pred_xstart"], x0, atol=1e-5)
    assert torch.allclose(trajectory[1]["x"], x1, atol=1e-5)
    assert torch.equal(out, trajectory[-1]["pred_xstart"])
    assert out.shape == shape and out.abs().max() <= 1 and out.std() > 0.1


@sampler_params
def test_inpainting_keeps_the_known_region_exactly(sampler):
    model_fn, diffusion, shape, model_kwargs, denoised_fn = scenario("inpaint")
    out = sampler(model_fn, diffusion, shape, steps=5, noise=start_noise(shape), model_kwargs=model_kwargs, denoised_fn=denoised_fn)
    known = model_kwargs["inpaint_mask"].expand(shape).bool()
    assert torch.equal(out[known], model_kwargs["inpaint_image"][known])
    assert (out[~known] - model_kwargs["inpaint_image"][~known]).abs().mean() > 0.1


@sampler_params
def test_cfg_rows_do_not_mix_and_guidance_matters(sampler):
    model_fn, diffusion, shape, model_kwargs, _ = scenario("cfg")
    noise = start_noise(shape)
    out = sampler(model_fn, diffusion, shape, steps=4, noise=noise, model_kwargs=model_kwargs)
    other_unconditional_noise = torch.cat([noise[:2], start_noise((2, 3, 16, 16), seed=5)])
    out_other = sampler(model_fn, diffusion, shape, steps=4, noise=other_unconditional_noise, model_kwargs=model_kwargs)
    assert torch.equal(out[:2], out_other[:2])

    unguided = classifier_free_guidance(tiny_model("base")[0], 1.0)
    out_unguided = sampler(unguided, diffusion, shape, steps=4, noise=noise, model_kwargs=model_kwargs)
    assert (out[:2] - out_unguided[:2]).abs().max() > 0.1


@sampler_params
def test_upsampler_sees_low_res(sampler):
    model, diffusion, shape, model_kwargs, _ = scenario("upsample")
    noise = start_noise(shape)
    out = sampler(model, diffusion, shape, steps=4, noise=noise, model_kwargs=model_kwargs)
    flipped = dict(model_kwargs, low_res=-model_kwargs["low_res"])
    out_flipped = sampler(model, diffusion, shape, steps=4, noise=noise, model_kwargs=flipped)
    assert (out - out_flipped).abs().max() > 0.1


def test_ddim_on_a_respaced_diffusion_matches_ddim_sample_loop_under_cfg():
    model_fn, _, shape, model_kwargs, _ = scenario("cfg")
    diffusion = build_diffusion("squaredcos_cap_v2", "5")
    noise = start_noise(shape)
    out = sample_ddim(model_fn, diffusion, shape, noise=noise, model_kwargs=model_kwargs)
    want = diffusion.ddim_sample_loop(model_fn, shape, noise=noise, model_kwargs=model_kwargs, device=torch.device("cpu"))
    assert torch.allclose(out, want, atol=1e-4)


def test_ddim_reproduces_the_golden_upsampler_loop():
    entry = load_golden("sampling.pt")["upsample_ddim_ddim10"]
    g = load_golden(entry["model"])
    model, _ = create_model_and_diffusion(**g["options"])
    model.load_state_dict(g["state_dict"])
    model.eval()
    diffusion = build_diffusion("linear", entry["timestep_respacing"])
    out = sample_ddim(model, diffusion, entry["noise"].shape, noise=entry["noise"], model_kwargs=dict(entry["model_kwargs"]))
    assert torch.allclose(out, entry["out"], atol=entry["recommended_atol"]["out"], rtol=1e-3)


# ---------------------------------------------------------------------- randomness and plumbing


@sampler_params
def test_generator_runs_are_bit_identical_and_leave_the_global_rng_alone(sampler):
    model_fn, diffusion, shape, model_kwargs, _ = scenario("cfg")
    global_state = torch.get_rng_state()
    runs = [
        sampler(model_fn, diffusion, shape, steps=3, model_kwargs=model_kwargs, generator=torch.Generator().manual_seed(seed))
        for seed in (7, 7, 8)
    ]
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    given = sampler(model_fn, diffusion, shape, steps=3, model_kwargs=model_kwargs, noise=torch.randn(shape, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(runs[0], given)


def test_without_generator_the_start_noise_is_one_global_draw():
    diffusion = build_diffusion("linear")
    torch.manual_seed(0)
    out = sample_dpmpp_2m(affine_eps_model, diffusion, (2, 3, 4, 4), steps=3)
    after = torch.randn(4)
    torch.manual_seed(0)
    noise = torch.randn(2, 3, 4, 4)
    assert torch.equal(after, torch.randn(4))
    assert torch.equal(out, sample_dpmpp_2m(affine_eps_model, diffusion, (2, 3, 4, 4), steps=3, noise=noise))


def test_samplers_are_registered_by_name_and_run_without_grad():
    assert SAMPLERS == {
        "ancestral": sample_ancestral, "ddim": sample_ddim, "plms": sample_plms, "dpmpp_2m": sample_dpmpp_2m,
    }
    assert SPACINGS_OF == {"ancestral": "time", "ddim": "time", "plms": "quadratic", "dpmpp_2m": "quadratic"}
    weight = torch.tensor(0.1, requires_grad=True)
    model = eps_model(lambda x, t: weight * x)
    assert not sample_plms(model, build_diffusion("linear"), (1, 3, 4, 4), steps=3).requires_grad


def test_progress_bar_runs(capsys):
    sample_ddim(affine_eps_model, build_diffusion("linear"), (1, 3, 4, 4), steps=3, progress=True)
    assert "3/3" in capsys.readouterr().err


@sampler_params
@pytest.mark.parametrize("name", ["cfg", "inpaint", "upsample"])
def test_a_v_prediction_model_samples_like_its_eps_model(sampler, name):
    from glide_text2im.model_creation import create_gaussian_diffusion
    from tests.test_gaussian_diffusion import v_of

    model_fn, diffusion, shape, kwargs, denoised_fn = scenario(name)
    v_diffusion = create_gaussian_diffusion(1000, "linear" if name == "upsample" else "squaredcos_cap_v2", prediction="v")
    assert v_diffusion.prediction == "v" and np.allclose(v_diffusion.alphas_cumprod, diffusion.alphas_cumprod)
    noise = start_noise(shape)
    with torch.no_grad():
        want = sampler(model_fn, diffusion, shape, steps=6, noise=noise, model_kwargs=kwargs, denoised_fn=denoised_fn)
        got = sampler(v_of(model_fn, diffusion), v_diffusion, shape, steps=6, noise=noise, model_kwargs=kwargs,
                      denoised_fn=denoised_fn)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-4)
