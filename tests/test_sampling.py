"""Sampling loops: golden/sampling.pt whole runs, global-RNG draw order, generators, progress bars."""

import functools

import pytest
import torch
import torch.nn as nn

from tests.conftest import load_golden
from tests.test_gaussian_diffusion import build_diffusion, fake_model

SHAPE = (2, 3, 8, 8)


@pytest.fixture(scope="module")
def golden():
    return load_golden("sampling.pt")


@functools.lru_cache(maxsize=None)
def load_unet(file_name):
    """A small golden U-Net in eval mode, shared by the tests that use it (they do not modify it)."""
    from glide_text2im.model_creation import create_model_and_diffusion

    g = load_golden(file_name)
    model, _ = create_model_and_diffusion(**g["options"])
    model.load_state_dict(g["state_dict"])
    model.eval()
    return model


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


def inpaint_denoised_fn(model_kwargs):
    image, mask = model_kwargs["inpaint_image"], model_kwargs["inpaint_mask"]
    return lambda x0: x0 * (1 - mask) + image * mask


def assert_close(got, want, atol, rtol=1e-3):
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = (got - want).abs().max().item()
    assert torch.allclose(got, want, atol=atol, rtol=rtol), f"max abs diff {diff} (atol {atol})"


def assert_rng_after_loop(entry):
    assert torch.equal(torch.randn(4), entry["rng_after_loop"]), "global RNG draws differ from the reference"


def loop_kwargs(entry, **extra):
    return dict(
        noise=entry["noise"],
        device=torch.device("cpu"),
        clip_denoised=True,
        progress=False,
        model_kwargs=dict(entry["model_kwargs"]),
        cond_fn=None,
        **extra,
    )


# ---------------------------------------------------------------------- golden loops


def test_text2im_cfg_matches_golden(golden):
    entry = golden["text2im_cfg"]
    diffusion = build_diffusion("squaredcos_cap_v2", entry["timestep_respacing"])
    assert diffusion.timestep_map == entry["timestep_map"]
    model_fn = classifier_free_guidance(load_unet(entry["model"]), entry["guidance_scale"])

    torch.manual_seed(entry["seed"])
    out_full = diffusion.p_sample_loop(model_fn, entry["shape"], **loop_kwargs(entry))
    assert_rng_after_loop(entry)
    assert_close(out_full, entry["out_full"], entry["recommended_atol"]["out_full"])
    assert_close(out_full[:2], entry["samples"], entry["recommended_atol"]["samples"])


def test_text2im_cfg_ddim10spacing_matches_golden_at_every_step(golden):
    entry = golden["text2im_cfg_ddim10spacing"]
    diffusion = build_diffusion("squaredcos_cap_v2", entry["timestep_respacing"])
    assert diffusion.timestep_map == entry["timestep_map"]
    model_fn = classifier_free_guidance(load_unet(entry["model"]), entry["guidance_scale"])

    torch.manual_seed(entry["seed"])
    steps = list(diffusion.p_sample_loop_progressive(model_fn, entry["shape"], **loop_kwargs(entry)))
    assert_rng_after_loop(entry)
    assert len(steps) == 10
    for i, step in enumerate(steps):
        assert set(step) == {"sample", "pred_xstart"}
        atol = entry["recommended_atol"]["per_step_samples_first_half"][i]
        assert_close(step["sample"][:2], entry["per_step_samples_first_half"][i], atol)
    assert_close(steps[-1]["sample"], entry["out_full"], entry["recommended_atol"]["out_full"])
    assert_close(steps[-1]["sample"][:2], entry["samples"], entry["recommended_atol"]["samples"])


def test_upsample_ddim_ddim10_matches_golden_at_every_step(golden):
    entry = golden["upsample_ddim_ddim10"]
    diffusion = build_diffusion("linear", entry["timestep_respacing"])
    assert diffusion.timestep_map == entry["timestep_map"]
    model = load_unet(entry["model"])

    torch.manual_seed(entry["seed"])
    steps = list(
        diffusion.ddim_sample_loop_progressive(model, entry["shape"], eta=entry["eta"], **loop_kwargs(entry))
    )
    assert_rng_after_loop(entry)
    assert len(steps) == 10
    for i, step in enumerate(steps):
        assert_close(step["sample"], entry["per_step_samples"][i], entry["recommended_atol"]["per_step_samples"][i])
    assert_close(steps[-1]["sample"], entry["out"], entry["recommended_atol"]["out"])


def test_upsample_ddim_fast27_matches_golden(golden):
    entry = golden["upsample_ddim_fast27"]
    diffusion = build_diffusion("linear", entry["timestep_respacing"])
    assert diffusion.timestep_map == entry["timestep_map"]
    model = load_unet(entry["model"])

    torch.manual_seed(entry["seed"])
    out = diffusion.ddim_sample_loop(model, entry["shape"], eta=entry["eta"], **loop_kwargs(entry))
    assert_rng_after_loop(entry)
    assert_close(out, entry["out"], entry["recommended_atol"]["out"])


def test_inpaint_cfg_without_noise_matches_golden(golden):
    entry = golden["inpaint_cfg"]
    assert entry["noise"] is None
    diffusion = build_diffusion("squaredcos_cap_v2", entry["timestep_respacing"])
    model_fn = classifier_free_guidance(load_unet(entry["model"]), entry["guidance_scale"])
    kwargs = loop_kwargs(entry)
    kwargs["denoised_fn"] = inpaint_denoised_fn(kwargs["model_kwargs"])

    torch.manual_seed(entry["seed"])
    out_full = diffusion.p_sample_loop(model_fn, entry["shape"], **kwargs)
    assert_rng_after_loop(entry)
    assert_close(out_full, entry["out_full"], entry["recommended_atol"]["out_full"])
    assert_close(out_full[:2], entry["samples"], entry["recommended_atol"]["samples"])


def test_upsample_inpaint_fast27_matches_golden(golden):
    entry = golden["upsample_inpaint_fast27"]
    diffusion = build_diffusion("linear", entry["timestep_respacing"])
    assert diffusion.timestep_map == entry["timestep_map"]
    model = load_unet(entry["model"])
    kwargs = loop_kwargs(entry)
    kwargs["denoised_fn"] = inpaint_denoised_fn(kwargs["model_kwargs"])

    torch.manual_seed(entry["seed"])
    out = diffusion.p_sample_loop(model, entry["shape"], **kwargs)
    assert_rng_after_loop(entry)
    assert_close(out, entry["out"], entry["recommended_atol"]["out"])


def test_clip_guided_matches_golden(golden, tmp_path):
    from glide_text2im.clip.model_creation import create_clip_model

    entry = golden["clip_guided"]
    g = load_golden(entry["clip"])
    config_path = tmp_path / "config.yaml"
    config_path.write_text(g["config_yaml"])
    clip = create_clip_model(config_path=config_path, device=torch.device("cpu"))
    clip.text_encoder.load_state_dict(g["text_state_dict"])
    clip.image_encoder.load_state_dict(g["image_state_dict"])
    clip.eval()
    cond_fn = clip.cond_fn([entry["prompt"]] * 2, entry["guidance_scale"])
    diffusion = build_diffusion("squaredcos_cap_v2", entry["timestep_respacing"])
    model = load_unet(entry["model"])
    kwargs = loop_kwargs(entry)
    kwargs["cond_fn"] = cond_fn

    torch.manual_seed(entry["seed"])
    out = diffusion.p_sample_loop(model, entry["shape"], **kwargs)
    assert_rng_after_loop(entry)
    assert_close(out, entry["out"], entry["recommended_atol"]["out"])


# ---------------------------------------------------------------------- global RNG order (fake model)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
@pytest.mark.parametrize("given_noise", [True, False])
def test_loops_draw_one_start_image_and_one_noise_per_step(loop, given_noise):
    diffusion = build_diffusion("linear", "7")
    noise = torch.randn(SHAPE) if given_noise else None

    torch.manual_seed(11)
    out = getattr(diffusion, loop)(fake_model, SHAPE, noise=noise)
    after = torch.randn(4)

    torch.manual_seed(11)
    start = noise if given_noise else torch.randn(*SHAPE)
    step_noises = [torch.randn_like(start) for _ in range(7)]
    assert torch.equal(after, torch.randn(4))

    x = start
    for i, step_noise in zip(range(6, -1, -1), step_noises):
        t = torch.tensor([i] * SHAPE[0])
        if loop == "p_sample_loop":
            pmv = diffusion.p_mean_variance(fake_model, x, t)
            x = pmv["mean"] + (t != 0).float().view(-1, 1, 1, 1) * torch.exp(0.5 * pmv["log_variance"]) * step_noise
        else:
            torch.manual_seed(0)  # eta = 0: the drawn noise does not matter
            x = diffusion.ddim_sample(fake_model, x, t)["sample"]
    assert torch.equal(out, x)


def test_ddim_with_eta_uses_the_step_noise():
    diffusion = build_diffusion("linear", "7")
    noise = torch.randn(SHAPE)
    torch.manual_seed(5)
    a = diffusion.ddim_sample_loop(fake_model, SHAPE, noise=noise, eta=1.0)
    b = diffusion.ddim_sample_loop(fake_model, SHAPE, noise=noise, eta=1.0)
    torch.manual_seed(5)
    c = diffusion.ddim_sample_loop(fake_model, SHAPE, noise=noise, eta=1.0)
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


# ---------------------------------------------------------------------- explicit generators


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_generator_runs_are_bit_identical_and_leave_global_rng_alone(loop):
    diffusion = build_diffusion("squaredcos_cap_v2", "6")
    kwargs = {"eta": 0.5} if loop == "ddim_sample_loop" else {}
    state = torch.get_rng_state()
    first = getattr(diffusion, loop)(fake_model, SHAPE, generator=torch.Generator().manual_seed(3), **kwargs)
    second = getattr(diffusion, loop)(fake_model, SHAPE, generator=torch.Generator().manual_seed(3), **kwargs)
    other = getattr(diffusion, loop)(fake_model, SHAPE, generator=torch.Generator().manual_seed(4), **kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_generator_draws_start_then_step_noise():
    diffusion = build_diffusion("linear", "4")
    out = diffusion.p_sample_loop(fake_model, SHAPE, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(9)  # the global CPU generator draws the same stream for the same seed
    assert torch.equal(out, diffusion.p_sample_loop(fake_model, SHAPE))


# ---------------------------------------------------------------------- loop behaviour


def test_progressive_generators_yield_every_step_and_end_at_the_loop_result():
    diffusion = build_diffusion("linear", "5")
    for loop in ("p_sample_loop", "ddim_sample_loop"):
        torch.manual_seed(2)
        steps = list(getattr(diffusion, loop + "_progressive")(fake_model, SHAPE))
        torch.manual_seed(2)
        final = getattr(diffusion, loop)(fake_model, SHAPE)
        assert len(steps) == 5
        assert all(set(step) == {"sample", "pred_xstart"} and step["sample"].shape == SHAPE for step in steps)
        assert all(not torch.equal(a["sample"], b["sample"]) for a, b in zip(steps, steps[1:]))
        assert torch.equal(steps[-1]["sample"], final)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_progress_true_shows_a_tqdm_bar(capsys, loop):
    diffusion = build_diffusion("linear", "6")
    getattr(diffusion, loop)(fake_model, SHAPE, progress=True)
    assert "6/6" in capsys.readouterr().err
    getattr(diffusion, loop)(fake_model, SHAPE, progress=False)
    assert capsys.readouterr().err == ""


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 6, 1)

    def forward(self, x, t):
        return self.proj(x)


def test_loops_run_without_grad_on_the_model_device():
    diffusion = build_diffusion("linear", "3")
    out = diffusion.p_sample_loop(TinyModel(), SHAPE)
    assert out.device.type == "cpu" and not out.requires_grad
    out = diffusion.ddim_sample_loop(fake_model, SHAPE)
    assert out.device.type == "cpu"


def test_noise_of_the_wrong_shape_is_a_value_error():
    diffusion = build_diffusion("linear", "3")
    with pytest.raises(ValueError, match="noise has shape"):
        diffusion.p_sample_loop(fake_model, SHAPE, noise=torch.randn(1, 3, 8, 8))


def test_wrong_model_output_in_a_loop_is_a_value_error():
    diffusion = build_diffusion("linear", "3")
    with pytest.raises(ValueError, match="model output has shape"):
        diffusion.ddim_sample_loop(lambda x, t: x, SHAPE)
