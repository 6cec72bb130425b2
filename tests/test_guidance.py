"""Guidance adapters: the classifier-free-guidance model_fn and the inpainting denoised_fn."""

import pytest
import torch

from glide_text2im.guidance import ClassifierFreeGuidance, inpaint_denoised_fn
from glide_text2im.model_creation import create_gaussian_diffusion, create_model_and_diffusion
from tests.conftest import load_golden
from tests.test_pipelines import one_thread  # noqa: F401  (autouse fixture)


def golden_unet(file_name):
    g = load_golden(file_name)
    model, _ = create_model_and_diffusion(**g["options"])
    model.load_state_dict(g["state_dict"])
    model.eval()
    return model, g["options"]


class RecordingModel:
    """eps = x * row_scale, variance channels = a constant; records every call."""

    def __init__(self, row_scale):
        self.row_scale = row_scale
        self.calls = []

    def __call__(self, x, t, **kwargs):
        self.calls.append((x.clone(), t.clone(), kwargs))
        eps = x * self.row_scale.view(-1, 1, 1, 1)
        return torch.cat([eps, torch.full_like(x, 0.25)], dim=1)


def test_cfg_loop_matches_golden_text2im_cfg_ddim10spacing():
    entry = load_golden("sampling.pt")["text2im_cfg_ddim10spacing"]
    model, options = golden_unet(entry["model"])
    diffusion = create_gaussian_diffusion(
        steps=options["diffusion_steps"], noise_schedule=options["noise_schedule"], timestep_respacing="ddim10"
    )
    torch.manual_seed(entry["seed"])
    out_full = diffusion.p_sample_loop(
        ClassifierFreeGuidance(model, entry["guidance_scale"]),
        entry["shape"],
        noise=entry["noise"],
        device=torch.device("cpu"),
        clip_denoised=True,
        model_kwargs=entry["model_kwargs"],
    )
    atol = entry["recommended_atol"]["out_full"]
    assert torch.allclose(out_full, entry["out_full"], atol=atol, rtol=1e-3), (out_full - entry["out_full"]).abs().max()
    assert torch.equal(torch.randn(4), entry["rng_after_loop"])


def test_cfg_evaluates_the_first_half_twice_and_mixes_eps():
    model = RecordingModel(torch.tensor([2.0, 3.0, 5.0, 7.0]))
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([10, 10, 10, 10])
    out = ClassifierFreeGuidance(model, guidance_scale=4.0)(x, t, tokens="kept")

    (seen_x, seen_t, seen_kwargs), = model.calls
    assert torch.equal(seen_x, torch.cat([x[:2], x[:2]]))
    assert torch.equal(seen_t, t) and seen_kwargs == {"tokens": "kept"}
    cond = x[:2] * torch.tensor([2.0, 3.0]).view(-1, 1, 1, 1)
    uncond = x[:2] * torch.tensor([5.0, 7.0]).view(-1, 1, 1, 1)
    guided = uncond + 4.0 * (cond - uncond)
    assert torch.equal(out[:, :3], torch.cat([guided, guided]))
    assert torch.equal(out[:, 3:], torch.full_like(x, 0.25))


def test_cfg_with_scale_one_is_the_conditional_model_and_zero_the_unconditional():
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([5, 5])
    model = RecordingModel(torch.tensor([2.0, 3.0]))
    assert torch.allclose(ClassifierFreeGuidance(model, 1.0)(x, t)[:, :3], torch.cat([2 * x[:1], 2 * x[:1]]))
    assert torch.allclose(ClassifierFreeGuidance(model, 0.0)(x, t)[:, :3], torch.cat([3 * x[:1], 3 * x[:1]]))


def test_cfg_rejects_an_odd_batch():
    with pytest.raises(ValueError, match="even batch"):
        ClassifierFreeGuidance(RecordingModel(torch.ones(3)), 3.0)(torch.zeros(3, 3, 4, 4), torch.zeros(3))


def test_inpaint_denoised_fn_matches_golden_p_mean_variance():
    pmv = load_golden("diffusion.pt")["p_mean_variance"]
    case = pmv["cases"]["respaced10_denoised_fn"]
    model, options = golden_unet(pmv["model"])
    diffusion = create_gaussian_diffusion(
        steps=options["diffusion_steps"], noise_schedule=pmv["noise_schedule"], timestep_respacing="10"
    )
    inputs = pmv["inputs"]
    with torch.no_grad():
        out = diffusion.p_mean_variance(
            model,
            inputs["x"],
            case["t"],
            clip_denoised=case["clip_denoised"],
            denoised_fn=inpaint_denoised_fn(inputs["inpaint_image"], inputs["inpaint_mask"]),
            model_kwargs=inputs["model_kwargs"],
        )
    for key in ("mean", "pred_xstart"):
        atol = case["recommended_atol"]["p_mean_variance"][key]
        assert torch.allclose(out[key], case["p_mean_variance"][key], atol=atol, rtol=1e-4), key


def test_inpaint_denoised_fn_keeps_the_image_where_the_mask_is_one():
    image = torch.rand(2, 3, 8, 8) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :3] = 1
    x0 = torch.randn(2, 3, 8, 8)
    out = inpaint_denoised_fn(image, mask)(x0)
    assert torch.equal(out[:, :, :3], image[:, :, :3])
    assert torch.equal(out[:, :, 3:], x0[:, :, 3:])


@pytest.mark.parametrize(
    "image_shape, mask_shape",
    [((2, 3, 8, 8), (2, 3, 8, 8)), ((2, 3, 8, 8), (1, 1, 8, 8)), ((2, 3, 8, 8), (2, 1, 4, 4))],
)
def test_inpaint_denoised_fn_rejects_mismatched_shapes(image_shape, mask_shape):
    with pytest.raises(ValueError, match="inpaint_"):
        inpaint_denoised_fn(torch.zeros(image_shape), torch.zeros(mask_shape))
