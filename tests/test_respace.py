"""Timestep respacing: space_timesteps and SpacedDiffusion against golden/diffusion.pt."""

import numpy as np
import pytest
import torch

from glide_text2im.gaussian_diffusion import COEFFICIENT_ARRAYS, get_named_beta_schedule
from glide_text2im.respace import SpacedDiffusion, space_timesteps
from tests.conftest import load_golden
from tests.test_gaussian_diffusion import build_diffusion


@pytest.fixture(scope="module")
def golden():
    return load_golden("diffusion.pt")


def space_timesteps_cases():
    return [
        pytest.param(case, id=f"{case['num_timesteps']}-{case['section_counts']!r}"[:40])
        for case in load_golden("diffusion.pt")["space_timesteps"]
    ]


@pytest.mark.parametrize("case", space_timesteps_cases())
def test_space_timesteps_matches_golden(case):
    if case["error"] is None:
        steps = space_timesteps(case["num_timesteps"], case["section_counts"])
        assert isinstance(steps, set)
        assert sorted(steps) == case["result"]
    else:
        assert case["error"] == "ValueError"
        with pytest.raises(ValueError, match=repr(case["section_counts"])):
            space_timesteps(case["num_timesteps"], case["section_counts"])


def test_section_positions_round_half_to_even():
    # 9 steps into 5: positions 0, 2.25, 4.5, 6.75, 9 -> 4.5 rounds to 4 (half-up would give 5).
    assert sorted(space_timesteps(10, "5")) == [0, 2, 4, 7, 9]


@pytest.mark.parametrize("spec", ["", "ddimx", "10,,5", "-3"])
def test_bad_specs_are_value_errors_naming_the_spec(spec):
    with pytest.raises(ValueError, match=repr(spec)):
        space_timesteps(100, spec)


def test_fast27_swaps_the_last_step_for_t_minus_3():
    steps = space_timesteps(1000, "fast27")
    assert len(steps) == 27 and 997 in steps and 999 not in steps


@pytest.mark.parametrize("key", list(load_golden("diffusion.pt")["respaced"]))
def test_spaced_diffusion_matches_golden(golden, key):
    schedule, respacing = key.split("|")
    want = golden["respaced"][key]
    diffusion = build_diffusion(schedule, respacing)

    assert sorted(diffusion.use_timesteps) == want["use_timesteps"]
    assert diffusion.timestep_map == want["timestep_map"]
    assert diffusion.num_timesteps == want["num_timesteps"]
    assert diffusion.original_num_steps == want["original_num_steps"]
    assert torch.allclose(torch.from_numpy(diffusion.betas), want["betas"], atol=1e-12, rtol=1e-10)
    for attr in COEFFICIENT_ARRAYS:
        got = getattr(diffusion, attr)
        assert got.dtype == np.float64, attr
        assert torch.allclose(torch.from_numpy(got), want["arrays"][attr], atol=1e-12, rtol=1e-10), attr


def test_respaced_chain_keeps_the_original_alphas_cumprod():
    betas = get_named_beta_schedule("squaredcos_cap_v2", 1000)
    full = SpacedDiffusion(use_timesteps=range(1000), betas=betas)
    spaced = SpacedDiffusion(use_timesteps={0, 300, 999}, betas=betas)
    np.testing.assert_allclose(spaced.alphas_cumprod, full.alphas_cumprod[[0, 300, 999]], rtol=1e-7)


def test_use_timesteps_outside_the_chain_are_rejected():
    with pytest.raises(ValueError, match="use_timesteps"):
        SpacedDiffusion(use_timesteps=[0, 10], betas=get_named_beta_schedule("squaredcos_cap_v2", 10))


class RecordingModel:
    """A fake model that remembers the timesteps it was called with."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, t, **kwargs):
        self.seen.append(t.clone())
        return torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)


def test_model_and_cond_fn_receive_original_timesteps():
    diffusion = build_diffusion("linear", "10")
    model = RecordingModel()
    cond_seen = []

    def cond_fn(x, t, **kwargs):
        cond_seen.append(t.clone())
        return torch.zeros_like(x)

    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([9, 1])
    diffusion.p_sample(model, x, t, cond_fn=cond_fn)
    diffusion.ddim_sample(model, x, t, cond_fn=cond_fn)
    diffusion.ddim_reverse_sample(model, x, t)
    want = torch.tensor([999, 111])
    assert len(model.seen) == 3 and len(cond_seen) == 2
    for seen in model.seen + cond_seen:
        assert seen.dtype == torch.int64
        assert torch.equal(seen, want)


def test_sampling_loop_visits_the_timestep_map_in_reverse():
    diffusion = build_diffusion("squaredcos_cap_v2", "ddim10")
    model = RecordingModel()
    diffusion.ddim_sample_loop(model, (1, 3, 4, 4), noise=torch.zeros(1, 3, 4, 4))
    assert [int(t) for t in model.seen] == list(range(900, -1, -100))
