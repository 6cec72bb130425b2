"""CUDAGraphStep: replayed steps equal eager steps, per input signature, with new inputs each call."""

import pytest
import torch

from glide_text2im.cuda_graphs import CUDAGraphStep
from glide_text2im.guidance import ClassifierFreeGuidance
from glide_text2im.samplers import sample_dpmpp_2m
from tests.test_samplers import prompt_kwargs, scenario, start_noise, tiny_model

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; none is available here"
)


def to_cuda(kwargs):
    return {name: value.cuda() for name, value in kwargs.items()}


def test_cpu_tensors_and_gradients_are_refused_with_clear_errors():
    model, _ = tiny_model("base")
    step = CUDAGraphStep(model)
    x, t = torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long)
    with torch.no_grad(), pytest.raises(ValueError, match="x_t is on cpu"):
        step(x, t, **prompt_kwargs(1, 1))
    with pytest.raises(TypeError, match="guidance_scale is a float"):
        step(x, t, guidance_scale=3.0)


@pytest.fixture
def on_cuda():
    """Moves the (cached) tiny models to CUDA for one test and back afterwards."""
    models = [tiny_model(kind)[0] for kind in ("base", "inpaint", "upsample")]
    for model in models:
        model.cuda()
    yield
    for model in models:
        model.cpu()


@needs_cuda
def test_replayed_steps_equal_eager_steps_for_changing_inputs(on_cuda):
    model_fn = ClassifierFreeGuidance(tiny_model("base")[0], 3.0)
    step = CUDAGraphStep(model_fn)
    kwargs = to_cuda(prompt_kwargs(2, 2))
    other_prompt = dict(kwargs, tokens=kwargs["tokens"].flip(1))
    with torch.no_grad():
        for seed, t, prompt in [(0, 999, kwargs), (1, 500, kwargs), (2, 10, other_prompt)]:
            x = start_noise((4, 3, 16, 16), seed).cuda()
            ts = torch.full((4,), t, dtype=torch.long, device="cuda")
            expected = model_fn(x, ts, **prompt)
            got = step(x, ts, **prompt)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        assert len(step._recordings) == 1
        step(start_noise((2, 3, 16, 16)).cuda(), ts[:2], **to_cuda(prompt_kwargs(1, 1)))
        assert len(step._recordings) == 2


@needs_cuda
@pytest.mark.parametrize("name", ["cfg", "inpaint", "upsample"])
def test_a_graphed_sampler_run_equals_the_eager_run(on_cuda, name):
    model_fn, diffusion, shape, kwargs, denoised_fn = scenario(name)
    kwargs = to_cuda(kwargs)
    if denoised_fn is not None:
        known, image = kwargs["inpaint_mask"], kwargs["inpaint_image"]
        denoised_fn = lambda x0: x0 * (1 - known) + image * known  # noqa: E731
    noise = start_noise(shape).cuda()
    with torch.no_grad():
        runs = [
            sample_dpmpp_2m(fn, diffusion, shape, steps=8, noise=noise, model_kwargs=kwargs, denoised_fn=denoised_fn)
            for fn in (model_fn, CUDAGraphStep(model_fn))
        ]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)
    assert runs[0].std() > 0.1


def test_pipelines_and_cli_refuse_cuda_graphs_off_cuda(tmp_path):
    from glide_text2im.cli import main
    from glide_text2im.pipelines import Text2ImPipeline

    pipe = Text2ImPipeline.from_pretrained(demo=True, upsampler=None, device="cpu", progress=False)
    pipe.cuda_graphs = True
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device; this pipeline is on cpu"):
        pipe("a red circle", steps=2, seed=0)
    code = main(["generate", "--demo", "--no-upsample", "--device", "cpu", "--cuda-graphs", "--steps", "2",
                 "--out", str(tmp_path), "--quiet", "a red circle"])
    assert code != 0 and not list(tmp_path.glob("*.png"))


@needs_cuda
def test_pipeline_with_cuda_graphs_gives_the_same_images(on_cuda):
    from glide_text2im.pipelines import Text2ImPipeline

    pipe = Text2ImPipeline.from_pretrained(demo=True, device="cuda", dtype="float32", progress=False)
    kwargs = dict(steps=10, sampler="dpmpp_2m", upsample_steps=5, upsample_sampler="dpmpp_2m", seed=3,
                  return_tensors=True)
    eager = pipe(["a red circle", "a blue square"], **kwargs)
    pipe.cuda_graphs = True
    graphed = pipe(["a red circle", "a blue square"], **kwargs)
    torch.testing.assert_close(graphed.samples_256, eager.samples_256, rtol=1e-4, atol=1e-4)
