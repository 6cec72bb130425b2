"""GroupedNoise: row layouts, equality with plain torch.randn, and the sampling loops drawing from it."""

import pytest
import torch

from glide_text2im.guidance import ClassifierFreeGuidance
from glide_text2im.noise import GroupedNoise, randn
from glide_text2im.samplers import sample_plms
from tests.test_gaussian_diffusion import build_diffusion

ROW_SHAPE = (3, 4, 4)


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_one_group_in_order_is_plain_randn_bit_for_bit():
    source = GroupedNoise(generators(5), [[0, 1, 2]])
    g = torch.Generator().manual_seed(5)
    for dtype in (None, torch.float64):
        want = torch.randn((3,) + ROW_SHAPE, generator=g, dtype=dtype)
        got = source.randn((3,) + ROW_SHAPE, torch.device("cpu"), dtype)
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("classifier_free", [False, True])
def test_one_prompt_layouts_are_plain_randn(classifier_free):
    rows = 4 if classifier_free else 2
    source = GroupedNoise.for_prompts(generators(9), 2, classifier_free)
    assert source.rows == [list(range(rows))]
    g = torch.Generator().manual_seed(9)
    for _ in range(2):  # later draws continue the generator's stream
        want = torch.randn((rows,) + ROW_SHAPE, generator=g)
        assert torch.equal(source.randn((rows,) + ROW_SHAPE, torch.device("cpu")), want)


def test_classifier_free_layout_scatters_each_prompts_draw_to_its_cond_and_uncond_rows():
    k, seeds = 2, (3, 4, 5)
    source = GroupedNoise.for_prompts(generators(*seeds), k, classifier_free=True)
    assert source.rows == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    references = generators(*seeds)
    for _ in range(2):
        noise = source.randn((12,) + ROW_SHAPE, torch.device("cpu"))
        for i, g in enumerate(references):
            alone = torch.randn((2 * k,) + ROW_SHAPE, generator=g)  # a one-prompt run: [cond (k), uncond (k)]
            assert torch.equal(noise[i * k : (i + 1) * k], alone[:k])
            assert torch.equal(noise[6 + i * k : 6 + (i + 1) * k], alone[k:])


def test_unguided_layout_gives_each_prompt_consecutive_rows():
    source = GroupedNoise.for_prompts(generators(1, 2), 3)
    assert source.rows == [[0, 1, 2], [3, 4, 5]]
    noise = source.randn((6,) + ROW_SHAPE, torch.device("cpu"), torch.float64)
    for i, g in enumerate(generators(1, 2)):
        assert torch.equal(noise[3 * i : 3 * (i + 1)], torch.randn((3,) + ROW_SHAPE, generator=g, dtype=torch.float64))


def test_any_layout_puts_drawn_row_j_at_its_listed_row():
    source = GroupedNoise(generators(7, 8), [[2, 0], [1]])
    noise = source.randn((3, 2), torch.device("cpu"))
    first, second = (torch.randn((n, 2), generator=g) for n, g in zip((2, 1), generators(7, 8)))
    assert torch.equal(noise, torch.stack([first[1], second[0], first[0]]))


def test_randn_helper_takes_a_generator_a_source_or_the_global_rng():
    want = torch.randn((2, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(randn((2, 3), torch.Generator().manual_seed(0), "cpu"), want)
    assert torch.equal(randn([2, 3], GroupedNoise(generators(0), [[0, 1]]), "cpu"), want)
    torch.manual_seed(1)
    from_global = randn((2, 3), None, "cpu")
    torch.manual_seed(1)
    assert torch.equal(from_global, torch.randn(2, 3))


def test_bad_layouts_and_shapes_are_value_errors():
    with pytest.raises(ValueError, match="cover rows 0 .. N-1 once each"):
        GroupedNoise(generators(0, 1), [[0, 1], [1]])
    with pytest.raises(ValueError, match="cover rows 0 .. N-1 once each"):
        GroupedNoise(generators(0), [[1]])
    with pytest.raises(ValueError, match="one list of rows per generator: got 1 for 2"):
        GroupedNoise(generators(0, 1), [[0]])
    with pytest.raises(TypeError, match="torch.Generator objects, got int"):
        GroupedNoise([0], [[0]])
    with pytest.raises(ValueError, match="batches of 4 rows, got shape \\(3, 2\\)"):
        GroupedNoise.for_prompts(generators(0, 1), 2).randn((3, 2), torch.device("cpu"))


# ---------------------------------------------------------------------- in the sampling loops


def biased_model(x, t, bias, **_kwargs):
    """A row-independent stand-in for a text-conditioned U-Net: each row's ``bias`` plays its prompt."""
    scale = (t.float() / 1000).view(-1, 1, 1, 1)
    bias = bias.view(-1, 1, 1, 1)
    return torch.cat([0.3 * x + scale + bias, torch.tanh(x) * (1 - scale)], dim=1)


def test_a_single_group_source_runs_the_loops_exactly_like_its_generator():
    diffusion = build_diffusion("squaredcos_cap_v2", "ddim4")
    shape = (2,) + ROW_SHAPE
    kwargs = dict(model_kwargs=dict(bias=torch.tensor([0.1, -0.2])))
    for loop in (diffusion.p_sample_loop, diffusion.ddim_sample_loop):
        want = loop(biased_model, shape, generator=torch.Generator().manual_seed(3), **kwargs)
        got = loop(biased_model, shape, generator=GroupedNoise(generators(3), [[0, 1]]), **kwargs)
        assert torch.equal(got, want)
    want = sample_plms(biased_model, diffusion, shape, generator=torch.Generator().manual_seed(3), **kwargs)
    got = sample_plms(biased_model, diffusion, shape, generator=GroupedNoise(generators(3), [[0, 1]]), **kwargs)
    assert torch.equal(got, want)


def test_a_guided_batch_of_prompts_samples_each_prompt_as_it_would_alone():
    diffusion = build_diffusion("squaredcos_cap_v2", "ddim4")
    k, cond, uncond = 2, [0.5, -0.5], 0.0
    guided = ClassifierFreeGuidance(biased_model, guidance_scale=3.0)
    bias = torch.tensor([b for b in cond for _ in range(k)] + [uncond] * (2 * k))
    batched = diffusion.p_sample_loop(
        guided, (4 * k,) + ROW_SHAPE, model_kwargs=dict(bias=bias),
        generator=GroupedNoise.for_prompts(generators(10, 11), k, classifier_free=True),
    )
    for i, seed in enumerate((10, 11)):
        alone = diffusion.p_sample_loop(
            guided, (2 * k,) + ROW_SHAPE, model_kwargs=dict(bias=torch.tensor([cond[i]] * k + [uncond] * k)),
            generator=torch.Generator().manual_seed(seed),
        )
        torch.testing.assert_close(batched[i * k : (i + 1) * k], alone[:k], rtol=0, atol=1e-6)
    assert (batched[:k] - batched[k : 2 * k]).abs().max() > 0.1
