"""GaussianDiffusion: schedules, q_* maths and single reverse steps against golden/diffusion.pt."""

import math

import numpy as np
import pytest
import torch

from glide_text2im.gaussian_diffusion import (
    COEFFICIENT_ARRAYS,
    GaussianDiffusion,
    betas_for_alpha_bar,
    eps_from_prediction,
    get_named_beta_schedule,
)
from glide_text2im.respace import SpacedDiffusion, space_timesteps
from tests.conftest import load_golden

SCHEDULES = ("linear", "squaredcos_cap_v2")


def build_diffusion(noise_schedule: str, timestep_respacing="", steps: int = 1000) -> SpacedDiffusion:
    """What ``model_creation.create_gaussian_diffusion`` builds."""
    betas = get_named_beta_schedule(noise_schedule, steps)
    return SpacedDiffusion(use_timesteps=space_timesteps(steps, timestep_respacing or [steps]), betas=betas)


def fake_model(x, t, **_kwargs):
    """A deterministic stand-in for the U-Net: eps and v both depend on x and t."""
    scale = (t.float() / 1000).view(-1, *([1] * (x.ndim - 1)))
    return torch.cat([0.3 * x + scale, torch.tanh(x) * (1 - scale)], dim=1)


@pytest.fixture(scope="module")
def golden():
    return load_golden("diffusion.pt")


def assert_close(got, want, atol, rtol=1e-4):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    diff = (got - want).abs().max().item()
    assert torch.allclose(got, want, atol=atol, rtol=rtol), f"max abs diff {diff} (atol {atol})"


# ---------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("steps", [100, 1000, 4000])
def test_named_beta_schedule_matches_golden(golden, name, steps):
    betas = get_named_beta_schedule(name, steps)
    assert betas.dtype == np.float64
    want = golden["schedules"][name][f"betas_{steps}"]
    assert torch.allclose(torch.from_numpy(betas), want, atol=1e-12, rtol=1e-10)


def test_unknown_schedule_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="'cosine'"):
        get_named_beta_schedule("cosine", 1000)


def test_betas_for_alpha_bar_follows_ratios_and_caps():
    betas = betas_for_alpha_bar(4, lambda tau: 1 - tau, max_beta=0.9)
    # alpha_bar = 1, 0.75, 0.5, 0.25, 0 -> betas 1 - 0.75, 1 - 0.5/0.75, 1 - 0.25/0.5, min(1, 0.9)
    np.testing.assert_allclose(betas, [0.25, 1 / 3, 0.5, 0.9], rtol=1e-15)
    assert betas.dtype == np.float64


@pytest.mark.parametrize("name", SCHEDULES)
def test_full_chain_arrays_match_golden(golden, name):
    diffusion = build_diffusion(name)
    want = golden["schedules"][name]
    assert diffusion.num_timesteps == 1000
    assert diffusion.timestep_map == want["diffusion_1000_timestep_map"]
    for attr in COEFFICIENT_ARRAYS:
        got = getattr(diffusion, attr)
        assert isinstance(got, np.ndarray) and got.dtype == np.float64, attr
        assert torch.allclose(torch.from_numpy(got), want["diffusion_1000_arrays"][attr], atol=1e-12, rtol=1e-10), attr


@pytest.mark.parametrize("betas", [[], [0.5], [[0.1, 0.2]], [0.1, 0.0], [0.5, 1.5]])
def test_invalid_betas_are_rejected(betas):
    with pytest.raises(ValueError, match="beta"):
        GaussianDiffusion(betas=betas)


# ---------------------------------------------------------------------- forward process


@pytest.mark.parametrize("name", SCHEDULES)
def test_q_functions_match_golden(golden, name):
    q = golden["q"]
    want = q[name]
    diffusion = build_diffusion(name)
    x_start, x_t, noise, t = q["x_start"], q["x_t"], q["noise"], q["t"]

    assert_close(diffusion.q_sample(x_start, t, noise=noise), want["q_sample"], atol=1e-4)
    mean, variance, log_variance = diffusion.q_mean_variance(x_start, t)
    assert_close(mean, want["q_mean_variance"]["mean"], atol=1e-4)
    assert_close(variance, want["q_mean_variance"]["variance"], atol=1e-4)
    assert_close(log_variance, want["q_mean_variance"]["log_variance"], atol=1e-4)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    assert_close(mean, want["q_posterior_mean_variance"]["mean"], atol=1e-4)
    assert_close(variance, want["q_posterior_mean_variance"]["variance"], atol=1e-4)
    assert_close(log_variance, want["q_posterior_mean_variance"]["log_variance_clipped"], atol=1e-4)
    assert_close(diffusion._predict_xstart_from_eps(x_t, t, noise), want["predict_xstart_from_eps"], atol=1e-4)
    assert_close(diffusion._predict_eps_from_xstart(x_t, t, x_start), want["predict_eps_from_xstart"], atol=1e-4)


@pytest.mark.parametrize("name", SCHEDULES)
def test_q_functions_on_respaced_chain_match_golden(golden, name):
    q = golden["q"]
    want = q[name]["respaced_10"]
    diffusion = build_diffusion(name, "10")
    x_start, x_t, noise, t = q["x_start"], q["x_t"], q["noise"], want["t"]

    assert_close(diffusion.q_sample(x_start, t, noise=noise), want["q_sample"], atol=1e-4)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    assert_close(mean, want["q_posterior_mean_variance"]["mean"], atol=1e-4)
    assert_close(variance, want["q_posterior_mean_variance"]["variance"], atol=1e-4)
    assert_close(log_variance, want["q_posterior_mean_variance"]["log_variance_clipped"], atol=1e-4)


def test_q_sample_without_noise_draws_one_randn_like():
    diffusion = build_diffusion("linear", "10")
    x_start = torch.rand(2, 3, 4, 4)
    t = torch.tensor([3, 9])
    torch.manual_seed(7)
    got = diffusion.q_sample(x_start, t)
    after = torch.randn(4)
    torch.manual_seed(7)
    want = diffusion.q_sample(x_start, t, noise=torch.randn_like(x_start))
    assert torch.equal(got, want)
    assert torch.equal(after, torch.randn(4))


def test_coefficients_are_float32_tensors_cached_per_device():
    diffusion = build_diffusion("squaredcos_cap_v2", "27")
    cpu = torch.device("cpu")
    coefficients = diffusion._coefficients(cpu)
    assert diffusion._coefficients(cpu) is coefficients
    for name in COEFFICIENT_ARRAYS:
        assert coefficients[name].dtype == torch.float32
        assert torch.equal(coefficients[name], torch.from_numpy(getattr(diffusion, name)).float())


def test_outputs_are_float32_like_the_inputs():
    diffusion = build_diffusion("squaredcos_cap_v2")
    x = torch.randn(2, 3, 8, 8)
    out = diffusion.p_mean_variance(fake_model, x, torch.tensor([5, 900]))
    assert all(v.dtype == torch.float32 and v.shape == x.shape for v in out.values())


# ---------------------------------------------------------------------- reverse process


def test_wrong_model_output_shape_is_a_value_error():
    diffusion = build_diffusion("linear", "10")
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"model output has shape \(2, 3, 8, 8\), expected \(2, 6, 8, 8\)"):
        diffusion.p_mean_variance(lambda x, t: x, x, torch.tensor([1, 2]))


def test_learned_variance_interpolates_between_posterior_and_beta():
    diffusion = build_diffusion("linear", "10")
    x = torch.zeros(2, 3, 4, 4)
    t = torch.tensor([5, 5])
    for v, array in ((-1.0, diffusion.posterior_log_variance_clipped), (1.0, np.log(diffusion.betas))):
        out = diffusion.p_mean_variance(lambda x, t: torch.cat([x, torch.full_like(x, v)], 1), x, t)
        assert torch.allclose(out["log_variance"], torch.full_like(x, float(array[5])), atol=1e-6)


def test_denoised_fn_runs_before_the_clamp():
    diffusion = build_diffusion("linear", "10")
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([9, 4])
    out = diffusion.p_mean_variance(fake_model, x, t, denoised_fn=lambda x0: x0 * 0 + 5.0)
    assert torch.equal(out["pred_xstart"], torch.ones_like(x))
    out = diffusion.p_mean_variance(fake_model, x, t, clip_denoised=False, denoised_fn=lambda x0: x0 * 0 + 5.0)
    assert torch.equal(out["pred_xstart"], torch.full_like(x, 5.0))


def test_ddim_reverse_sample_rejects_nonzero_eta():
    diffusion = build_diffusion("linear", "10")
    with pytest.raises(ValueError, match="eta"):
        diffusion.ddim_reverse_sample(fake_model, torch.zeros(1, 3, 4, 4), torch.tensor([2]), eta=0.5)


# ---------------------------------------------------------------------- golden single steps with the small U-Net


@pytest.fixture(scope="module")
def unet_base():
    from glide_text2im.model_creation import create_model_and_diffusion

    g = load_golden("unet_base.pt")
    model, _ = create_model_and_diffusion(**g["options"])
    model.load_state_dict(g["state_dict"])
    model.eval()
    return model


def golden_cases():
    return list(load_golden("diffusion.pt")["p_mean_variance"]["cases"])


@pytest.fixture(scope="module")
def pmv_golden(golden):
    return golden["p_mean_variance"]


def _case_setup(pmv_golden, case_name):
    case = pmv_golden["cases"][case_name]
    inputs = pmv_golden["inputs"]
    diffusion = build_diffusion(pmv_golden["noise_schedule"], case["timestep_respacing"])
    kwargs = dict(clip_denoised=case["clip_denoised"], model_kwargs=dict(inputs["model_kwargs"]))
    if case["uses_denoised_fn"]:
        image, mask = inputs["inpaint_image"], inputs["inpaint_mask"]
        kwargs["denoised_fn"] = lambda x0: x0 * (1 - mask) + image * mask
    return case, diffusion, inputs["x"], kwargs


def golden_cond_fn(x, t, **_kwargs):
    return -0.5 * x * (t.float() / 1000 + 0.1).view(-1, 1, 1, 1)


@pytest.mark.parametrize("case_name", golden_cases())
def test_p_mean_variance_matches_golden(unet_base, pmv_golden, case_name):
    case, diffusion, x, kwargs = _case_setup(pmv_golden, case_name)
    with torch.no_grad():
        out = diffusion.p_mean_variance(unet_base, x, case["t"], **kwargs)
    for key in ("mean", "variance", "log_variance", "pred_xstart"):
        assert_close(out[key], case["p_mean_variance"][key], atol=case["recommended_atol"]["p_mean_variance"][key])


CONDITIONED_CASES = [name for name in golden_cases() if name in ("full_clip", "respaced10_clip", "respaced10_low")]


@pytest.mark.parametrize("case_name", CONDITIONED_CASES)
def test_guidance_and_single_steps_match_golden(unet_base, pmv_golden, case_name):
    case, diffusion, x, kwargs = _case_setup(pmv_golden, case_name)
    t, atol, seed = case["t"], case["recommended_atol"], case["p_sample_seed"]
    assert "condition_mean" in case

    with torch.no_grad():
        out = diffusion.p_mean_variance(unet_base, x, t, **kwargs)
        mk = kwargs["model_kwargs"]
        mean = diffusion.condition_mean(golden_cond_fn, out, x, t, model_kwargs=mk)
        assert_close(mean, case["condition_mean"], atol["condition_mean"])
        score = diffusion.condition_score(golden_cond_fn, out, x, t, model_kwargs=mk)
        for key in ("mean", "pred_xstart"):
            assert_close(score[key], case["condition_score"][key], atol["condition_score"][key])

        steps = {
            "p_sample": lambda: diffusion.p_sample(unet_base, x, t, **kwargs)["sample"],
            "p_sample_cond_fn": lambda: diffusion.p_sample(unet_base, x, t, cond_fn=golden_cond_fn, **kwargs)["sample"],
            "ddim_sample_eta0": lambda: diffusion.ddim_sample(unet_base, x, t, eta=0.0, **kwargs)["sample"],
            "ddim_sample_eta05": lambda: diffusion.ddim_sample(unet_base, x, t, eta=0.5, **kwargs)["sample"],
        }
        for name, step in steps.items():
            torch.manual_seed(seed)
            assert_close(step(), case[name], atol[name])

        torch.manual_seed(seed)
        guided = diffusion.ddim_sample(unet_base, x, t, cond_fn=golden_cond_fn, eta=0.0, **kwargs)
        for key in ("sample", "pred_xstart"):
            assert_close(guided[key], case["ddim_sample_eta0_cond_fn"][key], atol["ddim_sample_eta0_cond_fn"][key])

        reverse = diffusion.ddim_reverse_sample(unet_base, x, t, eta=0.0, **kwargs)
        assert_close(reverse["sample"], case["ddim_reverse_sample"], atol["ddim_reverse_sample"])


def test_p_sample_adds_no_noise_at_t0_but_still_draws():
    diffusion = build_diffusion("linear", "10")
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 0])
    torch.manual_seed(3)
    sample = diffusion.p_sample(fake_model, x, t)["sample"]
    after = torch.randn(4)
    assert torch.equal(sample, diffusion.p_mean_variance(fake_model, x, t)["mean"])
    torch.manual_seed(3)
    torch.randn_like(x)
    assert torch.equal(after, torch.randn(4))


def test_condition_mean_adds_variance_times_gradient():
    diffusion = build_diffusion("squaredcos_cap_v2", "10")
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([6, 2])
    out = diffusion.p_mean_variance(fake_model, x, t)
    gradient = torch.randn_like(x)
    got = diffusion.condition_mean(lambda x, t, **kw: gradient, out, x, t)
    assert torch.allclose(got, out["mean"] + out["variance"] * gradient, atol=1e-6)


def test_condition_score_shifts_eps_by_scaled_gradient():
    diffusion = build_diffusion("squaredcos_cap_v2", "10")
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([6, 2])
    out = diffusion.p_mean_variance(fake_model, x, t, clip_denoised=False)
    gradient = torch.randn_like(x)
    got = diffusion.condition_score(lambda x, t, **kw: gradient, out, x, t)

    alpha_bar = torch.from_numpy(diffusion.alphas_cumprod[t.numpy()]).view(-1, 1, 1, 1)
    eps = fake_model(x, torch.tensor(diffusion.timestep_map)[t])[:, :3].double()
    guided_eps = eps - torch.sqrt(1 - alpha_bar) * gradient.double()
    want_xstart = (x.double() - torch.sqrt(1 - alpha_bar) * guided_eps) / torch.sqrt(alpha_bar)
    assert torch.allclose(got["pred_xstart"].double(), want_xstart, atol=1e-4)
    assert got["variance"] is out["variance"]
    assert math.isfinite(got["mean"].abs().max().item())


def test_shifted_cosine_divides_the_cosine_snr_by_the_squared_shift():
    cosine = np.cumprod(1 - get_named_beta_schedule("squaredcos_cap_v2", 1000))
    shifted = np.cumprod(1 - get_named_beta_schedule("squaredcos_shift_4", 1000))
    snr = lambda alphas_cumprod: alphas_cumprod / (1 - alphas_cumprod)  # noqa: E731
    # alpha_bar(0) of the cosine formula is not exactly 1, so the ratio is 16 up to that offset.
    ratio = snr(cosine[:-1]) / snr(shifted[:-1])
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-6)
    assert 15.9 < ratio[0] < 16.0
    assert np.all(np.diff(shifted) < 0) and shifted[-1] < 1e-9
    np.testing.assert_allclose(
        get_named_beta_schedule("squaredcos_shift_1", 1000), get_named_beta_schedule("squaredcos_cap_v2", 1000)
    )
    for bad in ("squaredcos_shift_", "squaredcos_shift_0", "squaredcos_shift_-2", "squaredcos_shift_x"):
        with pytest.raises(ValueError, match="squaredcos_shift_<s>"):
            get_named_beta_schedule(bad, 1000)


# ---------------------------------------------------------------------- v-prediction


def v_of(eps_model, diffusion):
    """The v-prediction model that makes the same eps as ``eps_model`` on ``diffusion``:
    v = (eps - sqrt(1 - alphas_cumprod) x_t) / sqrt(alphas_cumprod), computed in float64."""

    def model(x, t, **kwargs):
        out = eps_model(x, t, **kwargs)
        eps, rest = out[:, :3].double(), out[:, 3:]
        abar = torch.from_numpy(diffusion.alphas_cumprod)[t].view(-1, 1, 1, 1)
        v = (eps - (1 - abar).sqrt() * x.double()) / abar.sqrt()
        return torch.cat([v.float(), rest], dim=1)

    return model


def test_eps_from_prediction_inverts_the_definition_of_v():
    generator = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    for abar in (0.999, 0.5, 1e-4):
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        x_t, v = alpha * x0 + sigma * eps, alpha * eps - sigma * x0
        torch.testing.assert_close(eps_from_prediction("v", v, x_t, abar), eps, rtol=0, atol=1e-12)
        torch.testing.assert_close(eps_from_prediction("v", v, x_t, torch.tensor(abar, dtype=torch.float64)), eps)
        assert eps_from_prediction("eps", eps, x_t, abar) is eps
    with pytest.raises(ValueError, match="unknown prediction 'x0'"):
        eps_from_prediction("x0", eps, x_t, 0.5)
    with pytest.raises(ValueError, match="unknown prediction 'x0'; expected one of"):
        GaussianDiffusion(betas=np.linspace(1e-4, 0.02, 10), prediction="x0")


@pytest.mark.parametrize("respacing", ["", "25"])
def test_a_v_model_gives_the_mean_and_pred_xstart_of_its_eps_model(respacing):
    eps_diffusion = build_diffusion("squaredcos_cap_v2", respacing)
    v_diffusion = SpacedDiffusion(
        use_timesteps=eps_diffusion.use_timesteps, betas=get_named_beta_schedule("squaredcos_cap_v2", 1000),
        prediction="v",
    )
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, len(eps_diffusion.timestep_map) // 2, len(eps_diffusion.timestep_map) - 1])
    # The model sees original timesteps; v_of needs the alphas_cumprod of those.
    original = build_diffusion("squaredcos_cap_v2")
    want = eps_diffusion.p_mean_variance(fake_model, x, t, clip_denoised=False)
    got = v_diffusion.p_mean_variance(v_of(fake_model, original), x, t, clip_denoised=False)
    for key in ("mean", "pred_xstart", "log_variance"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=2e-4)


def test_v_training_loss_is_the_mse_to_the_hand_computed_v_target():
    diffusion = SpacedDiffusion(
        use_timesteps=range(1000), betas=get_named_beta_schedule("linear", 1000), prediction="v"
    )
    generator = torch.Generator().manual_seed(2)
    x_start = torch.rand(2, 3, 4, 4, generator=generator) * 2 - 1
    noise = torch.randn(2, 3, 4, 4, generator=generator)
    t = torch.tensor([10, 900])
    abar = torch.from_numpy(diffusion.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
    v_target = abar.sqrt() * noise - (1 - abar).sqrt() * x_start

    def zero_model(x, t, **_kwargs):
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    def exact_model(x, t, **_kwargs):
        return torch.cat([v_target, torch.zeros_like(x)], dim=1)

    losses = diffusion.training_losses(zero_model, x_start, t, noise=noise)
    torch.testing.assert_close(losses["mse"], v_target.pow(2).mean(dim=(1, 2, 3)))
    assert diffusion.training_losses(exact_model, x_start, t, noise=noise)["mse"].abs().max() < 1e-12
    # The exact v is the exact eps too: the vb term equals the eps model's.
    eps_diffusion = build_diffusion("linear")
    eps_vb = eps_diffusion.training_losses(
        lambda x, t: torch.cat([noise, torch.zeros_like(x)], dim=1), x_start, t, noise=noise
    )["vb"]
    torch.testing.assert_close(diffusion.training_losses(exact_model, x_start, t, noise=noise)["vb"], eps_vb,
                               rtol=1e-3, atol=1e-5)


# Recorded with the commit before the sampling-layer redesign (e64c811) for the shipped demo
# base, 10 respaced steps, seed 0: sample sum and sample[0, :, 10, 20]. The redesign moved no
# number of the original loops (bit-identical on the machine that recorded them; the tolerance
# only allows for another CPU's float32 kernels).
RECORDED_LOOPS = {
    "p_sample_loop": (-11292.613122844137, [-0.9895851612091064, -0.9483606815338135, -0.9653220176696777]),
    "ddim_sample_loop": (-11316.09135607304, [-1.0, -0.9685431718826294, -0.9954091310501099]),
}


@pytest.mark.parametrize("loop", sorted(RECORDED_LOOPS))
def test_original_loops_give_the_values_recorded_before_the_redesign(loop):
    from glide_text2im import demo
    from glide_text2im.download import load_checkpoint
    from glide_text2im.model_creation import create_model_and_diffusion

    options = dict(demo.options("demo/base"), timestep_respacing="10")
    model, diffusion = create_model_and_diffusion(**options)
    model.load_state_dict(load_checkpoint("demo/base", "cpu"))
    model.eval()
    tokenizer = model.tokenizer
    tokens, mask = tokenizer.padded_tokens_and_mask(
        tokenizer.encode("a red circle on a black background"), options["text_ctx"]
    )
    model_kwargs = dict(tokens=torch.tensor([tokens]), mask=torch.tensor([mask], dtype=torch.bool))
    with torch.no_grad():
        sample = getattr(diffusion, loop)(
            model, (1, 3, 64, 64), model_kwargs=model_kwargs, device="cpu", progress=False,
            generator=torch.Generator().manual_seed(0),
        )
    total, pixel = RECORDED_LOOPS[loop]
    assert sample.double().sum().item() == pytest.approx(total, abs=0.05)
    assert sample[0, :, 10, 20].tolist() == pytest.approx(pixel, abs=1e-4)
