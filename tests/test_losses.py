"""Training objective: likelihood terms and the hybrid loss, checked against independently written formulas."""

import math

import pytest
import torch
import torch.nn as nn
from torch.distributions import Normal, kl_divergence

from glide_text2im.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from tests.test_gaussian_diffusion import build_diffusion

LN2 = math.log(2.0)


def pixel_grid_images(generator, shape=(4, 3, 8, 8)):
    """8-bit images mapped to [-1, 1] (values k / 127.5 - 1), including both extreme bins."""
    images = torch.randint(0, 256, shape, generator=generator).float() / 127.5 - 1
    images[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])
    return images


# ---------------------------------------------------------------------- likelihood terms


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean1, mean2 = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    logvar1, logvar2 = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    want = kl_divergence(Normal(mean1, (0.5 * logvar1).exp()), Normal(mean2, (0.5 * logvar2).exp()))
    assert torch.allclose(normal_kl(mean1, logvar1, mean2, logvar2), want, rtol=1e-12, atol=1e-12)


def test_normal_kl_broadcasts_floats():
    mean, logvar = torch.tensor([0.5, -1.0]), torch.tensor([0.2, -0.3])
    want = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0))
    assert torch.allclose(normal_kl(mean, logvar, 0.0, 0.0), want, atol=1e-6)
    with pytest.raises(TypeError, match="tensor"):
        normal_kl(0.0, 0.0, 1.0, 1.0)


def test_approx_standard_normal_cdf_is_within_2e_4():
    x = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    error = (approx_standard_normal_cdf(x) - Normal(0.0, 1.0).cdf(x)).abs().max().item()
    assert error < 2e-4


def test_discretized_log_likelihood_matches_bin_masses():
    g = torch.Generator().manual_seed(1)
    x = pixel_grid_images(g).double()
    means = (x + 0.03 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    log_scales = torch.empty_like(x).uniform_(-5, -2, generator=g)

    normal = Normal(means, log_scales.exp())
    upper = torch.where(x > 0.999, torch.ones_like(x), normal.cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros_like(x), normal.cdf(x - 1 / 255))
    want_mass = upper - lower

    got = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales)
    assert got.shape == x.shape
    # The tanh CDF approximation is off by < 2e-4 at each bin edge.
    assert (got.exp() - want_mass).abs().max().item() < 4e-4
    well_resolved = want_mass > 0.05
    assert well_resolved.sum() > 50
    assert torch.allclose(got[well_resolved], want_mass[well_resolved].log(), rtol=0, atol=1e-2)


@pytest.mark.parametrize("mean, log_scale", [(0.3, -3.0), (-0.99, -4.5), (0.0, 0.5), (1.0, -2.0)])
def test_discretized_likelihood_sums_to_one_over_the_256_bins(mean, log_scale):
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    log_probs = discretized_gaussian_log_likelihood(
        grid, means=torch.full_like(grid, mean), log_scales=torch.full_like(grid, log_scale)
    )
    assert abs(log_probs.exp().sum().item() - 1) < 1e-8


# ---------------------------------------------------------------------- hybrid loss


class SplitModel(nn.Module):
    """eps from one parameter, the variance values from another: eps = a x + t/1000, v = tanh(b x)."""

    def __init__(self):
        super().__init__()
        self.eps_weight = nn.Parameter(torch.tensor(0.7))
        self.var_weight = nn.Parameter(torch.tensor(0.4))

    def forward(self, x, t):
        scale = (t.float() / 1000).view(-1, 1, 1, 1)
        return torch.cat([self.eps_weight * x + scale, torch.tanh(self.var_weight * x)], dim=1)


def independent_losses(diffusion, model, x_start, t, noise):
    """The hybrid loss written out in float64 from the betas alone, with torch.distributions."""
    betas = torch.from_numpy(diffusion.betas)
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    view = lambda a: a[t].view(-1, 1, 1, 1)  # noqa: E731
    beta, ab, ab_prev = view(betas), view(alphas_cumprod), view(alphas_cumprod_prev)
    x0 = x_start.double()

    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise.double()
    with torch.no_grad():
        out = model(x_t.float(), torch.tensor(diffusion.timestep_map)[t]).double()
    eps, v = out[:, :3], out[:, 3:]
    mse = ((noise.double() - eps) ** 2).flatten(1).mean(1)

    def posterior_mean(start):
        return (ab_prev.sqrt() * beta * start + (1 - beta).sqrt() * (1 - ab_prev) * x_t) / (1 - ab)

    posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
    posterior_variance[0] = posterior_variance[1]
    log_variance = (v + 1) / 2 * beta.log() + (1 - v) / 2 * view(posterior_variance).log()
    pred_x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
    p = Normal(posterior_mean(pred_x0), (0.5 * log_variance).exp())

    q_std = (beta * (1 - ab_prev) / (1 - ab)).clamp(min=1e-30).sqrt()
    kl = kl_divergence(Normal(posterior_mean(x0), q_std), p).flatten(1).mean(1) / LN2
    upper = torch.where(x0 > 0.999, torch.ones_like(x0), p.cdf(x0 + 1 / 255))
    lower = torch.where(x0 < -0.999, torch.zeros_like(x0), p.cdf(x0 - 1 / 255))
    decoder_nll = -(upper - lower).log().flatten(1).mean(1) / LN2
    vb = torch.where(t == 0, decoder_nll, kl) * diffusion.num_timesteps / 1000
    return mse, vb


@pytest.mark.parametrize("respacing", ["", "100"])
def test_training_losses_match_independent_formulas(respacing):
    diffusion = build_diffusion("linear", respacing)
    g = torch.Generator().manual_seed(2)
    x_start = pixel_grid_images(g)
    noise = torch.randn(x_start.shape, generator=g)
    t = torch.tensor([0, 1, diffusion.num_timesteps // 2, diffusion.num_timesteps - 1])
    model = SplitModel()

    terms = diffusion.training_losses(model, x_start, t, noise=noise)
    want_mse, want_vb = independent_losses(diffusion, model, x_start, t, noise)

    assert set(terms) == {"mse", "vb", "loss"}
    assert all(value.shape == (4,) for value in terms.values())
    assert torch.allclose(terms["mse"].double(), want_mse, rtol=1e-4)
    assert torch.allclose(terms["vb"][1:].double(), want_vb[1:], rtol=1e-3)
    # t == 0: the decoder uses the tanh CDF approximation, the reference value the exact CDF.
    assert torch.allclose(terms["vb"][:1].double(), want_vb[:1], rtol=2e-3)
    assert torch.equal(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_is_scaled_by_num_timesteps_over_1000():
    full, spaced = build_diffusion("squaredcos_cap_v2"), build_diffusion("squaredcos_cap_v2", "100")
    g = torch.Generator().manual_seed(3)
    x_start = pixel_grid_images(g, (2, 3, 4, 4))
    noise = torch.randn(x_start.shape, generator=g)
    model = SplitModel()
    # Respaced step 50 is original step 505 but with a 10x longer stride: compare with the
    # respaced chain's own unscaled term instead.
    t = torch.tensor([50, 99])
    _, unscaled = independent_losses(spaced, model, x_start, t, noise)
    got = spaced.training_losses(model, x_start, t, noise=noise)["vb"]
    assert torch.allclose(got.double(), unscaled, rtol=1e-3)
    assert full.num_timesteps / 1000 == 1 and spaced.num_timesteps / 1000 == 0.1


def test_vb_trains_only_the_variance_channels():
    diffusion = build_diffusion("linear")
    g = torch.Generator().manual_seed(4)
    x_start = pixel_grid_images(g)
    t = torch.tensor([0, 10, 400, 999])
    model = SplitModel()
    terms = diffusion.training_losses(model, x_start, t, noise=torch.randn(x_start.shape, generator=g))

    parameters = [model.eps_weight, model.var_weight]
    vb_grads = torch.autograd.grad(terms["vb"].sum(), parameters, allow_unused=True, retain_graph=True)
    assert vb_grads[0] is None or vb_grads[0].item() == 0.0
    assert vb_grads[1].abs().item() > 0
    mse_grads = torch.autograd.grad(terms["mse"].sum(), parameters, allow_unused=True)
    assert mse_grads[0].abs().item() > 0
    assert mse_grads[1] is None or mse_grads[1].item() == 0.0


def test_training_losses_draw_noise_with_randn_like_when_not_given():
    diffusion = build_diffusion("linear")
    x_start = pixel_grid_images(torch.Generator().manual_seed(5))
    t = torch.tensor([3, 30, 300, 900])
    model = SplitModel()
    torch.manual_seed(6)
    got = diffusion.training_losses(model, x_start, t)
    torch.manual_seed(6)
    want = diffusion.training_losses(model, x_start, t, noise=torch.randn_like(x_start))
    assert torch.equal(got["loss"], want["loss"])


def test_training_losses_reject_a_wrong_model_output():
    diffusion = build_diffusion("linear")
    x_start = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="model output has shape"):
        diffusion.training_losses(lambda x, t: x, x_start, torch.tensor([1, 2]))


def test_sample_timesteps_is_uniform_over_the_chain_and_reproducible():
    diffusion = build_diffusion("linear")
    state = torch.get_rng_state()
    t = diffusion.sample_timesteps(20000, "cpu", generator=torch.Generator().manual_seed(7))
    again = diffusion.sample_timesteps(20000, "cpu", generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(t, again)
    assert t.dtype == torch.int64 and t.shape == (20000,)
    assert t.min().item() == 0 and t.max().item() == 999
    counts = torch.bincount(t, minlength=1000).reshape(10, 100).sum(1).float()
    assert (counts - 2000).abs().max().item() < 200
