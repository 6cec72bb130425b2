"""The embedded demo models do what their prompts ask, as judged from pixels (issue 9's list).

Each test samples a batch with a 25-step sampler at fixed seeds and judges the 64 x 64
results with ``demo.judge``; the measured figures are in the assertion messages and printed
(``pytest -s``). Held-out prompts use the shapes module's held-out templates, whose wording no
training caption has (checked against the demo's training captions).
"""

import collections
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from glide_text2im import demo
from glide_text2im.demo import shapes
from glide_text2im.demo.clip_tokenizer import ByteCLIPTokenizer
from glide_text2im.demo.judge import judge
from glide_text2im.demo.train import DATA_SEED, STAGE_RECIPES, RenderedShapes
from glide_text2im.download import load_checkpoint
from glide_text2im.guidance import ClassifierFreeGuidance, inpaint_denoised_fn
from glide_text2im.model_creation import create_gaussian_diffusion
from glide_text2im.pipelines import CLIPGuidedPipeline, InpaintPipeline, Text2ImPipeline
from glide_text2im.pipelines.loading import load_clip, load_model
from glide_text2im.samplers import sample_dpmpp_2m
from glide_text2im.train.data import low_res_of

SAMPLE_STEPS = 25
GUIDANCE_SCALE = 3.0
CLIP_GUIDANCE_SCALE = 30.0
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(previous)


def load_unet(name):
    """A demo U-Net as the pipelines load it on a CPU (float32, eval mode, channels-last
    convolution weights, freed memory kept) and its unrespaced diffusion."""
    loaded = load_model(name, device="cpu", progress=False)
    return loaded.model, loaded.diffusion


@pytest.fixture(scope="module")
def base():
    return load_unet("demo/base")


def text_kwargs(model, prompts):
    """{"tokens", "mask"} rows for ``prompts`` (None: the empty, unconditional caption)."""
    encode = model.tokenizer
    rows = [encode.padded_tokens_and_mask(encode.encode(p) if p else [], model.text_ctx) for p in prompts]
    return dict(
        tokens=torch.tensor([tokens for tokens, _ in rows]), mask=torch.tensor([mask for _, mask in rows])
    )


def held_out_cases(count, seed):
    """``count`` (spec, held-out prompt) pairs."""
    rng = random.Random(f"demo-tests/{seed}")
    specs = [shapes.sample_spec(rng) for _ in range(count)]
    return [(spec, shapes.caption(spec, rng, held_out=True)) for spec in specs]


def accuracy(images, wanted):
    """Per attribute, the fraction of ``images`` [N x 3 x H x W] whose judgement agrees with ``wanted``."""
    right, asked = collections.Counter(), collections.Counter()
    for image, spec in zip(images, wanted):
        for name, ok in judge(image).agrees_with(spec).items():
            asked[name] += 1
            right[name] += ok
    return {name: right[name] / asked[name] for name in asked}


@torch.no_grad()
def guided_samples(model, diffusion, prompts, seed, **extra_kwargs):
    """Classifier-free-guided samples [N x 3 x 64 x 64] in [-1, 1] for N prompts."""
    n = len(prompts)
    kwargs = dict(text_kwargs(model, list(prompts) + [None] * n), **extra_kwargs)
    denoised_fn = None
    if "inpaint_image" in kwargs:
        denoised_fn = inpaint_denoised_fn(kwargs["inpaint_image"], kwargs["inpaint_mask"])
    return sample_dpmpp_2m(
        ClassifierFreeGuidance(model, GUIDANCE_SCALE),
        diffusion,
        (2 * n, 3, 64, 64),
        steps=SAMPLE_STEPS,
        model_kwargs=kwargs,
        denoised_fn=denoised_fn,
        generator=torch.Generator().manual_seed(seed),
    )[:n]


def test_checkpoints_load_by_name_in_float16_and_fit_the_size_budget():
    total = 0
    for name in demo.CHECKPOINT_FILES:
        state = load_checkpoint(name, "cpu")
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
        total += os.path.getsize(demo.weights_path(name))
    assert total <= 20 * 2**20, f"the demo weights take {total / 2**20:.1f} MiB"
    assert demo.options("demo/base")["tokenizer"] == "byte"
    assert demo.options("demo/upsample")["super_res"] and demo.options("demo/base-inpaint")["inpaint"]


def test_demo_names_load_in_a_fresh_process_without_other_imports():
    names = ["demo/base", "demo/upsample", "demo/base-inpaint", "demo/clip/image-enc", "demo/clip/text-enc"]
    code = (
        "import sys; from glide_text2im.download import load_checkpoint; "
        "print(*[sum(v.numel() for v in load_checkpoint(n, 'cpu').values()) for n in sys.argv[1:]])"
    )
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert result.returncode == 0, result.stderr
    counts = [int(word) for word in result.stdout.split()]
    assert counts == [sum(v.numel() for v in load_checkpoint(name, "cpu").values()) for name in names]
    assert all(count > 100_000 for count in counts)


def test_byte_clip_tokenizer_frames_utf8_bytes():
    tokenizer = ByteCLIPTokenizer()
    assert tokenizer.encode("Red é") == [114, 101, 100, 32, 195, 169]
    assert tokenizer.padded_tokens_and_len([114, 101, 100], 7) == ([256, 114, 101, 100, 257, 0, 0], 5)
    assert tokenizer.padded_tokens_and_len([1, 2, 3, 4], 4) == ([256, 1, 2, 257], 4)
    assert tokenizer.decode([256, 114, 101, 100, 257]) == "red"
    with pytest.raises(ValueError, match="text_ctx"):
        tokenizer.padded_tokens_and_len([1], 1)
    with pytest.raises(ValueError, match="outside"):
        tokenizer.decode([258])
    assert load_clip("demo/clip/image-enc", "demo/clip/text-enc", device="cpu").tokenizer.n_vocab == 258


def test_held_out_prompts_are_not_training_captions():
    stage = STAGE_RECIPES["base"]
    training = {text for _, text in RenderedShapes(stage.num_examples, DATA_SEED, 8).items}
    prompts = [prompt for _, prompt in held_out_cases(64, seed=1)]
    assert not training & set(prompts)
    assert len(max(prompts, key=len)) <= demo.options("demo/base")["text_ctx"]


def test_base_with_classifier_free_guidance_draws_the_held_out_shape_and_place(held_out_judgements):
    scores, _, _ = held_out_judgements
    print("base + CFG, DPM-Solver++(2M) 25 steps, 64 held-out prompts:", scores)
    assert scores["shape"] >= 0.8 and scores["position"] >= 0.8, scores


def test_base_with_classifier_free_guidance_draws_the_held_out_colour(held_out_judgements):
    scores, _, _ = held_out_judgements
    assert scores["colour"] >= 0.9, scores


def test_25_dpm_solver_steps_judge_as_well_as_100_ancestral_steps(base, held_out_judgements):
    # Issue 10: the fast sampler is within 2 points of the notebook's 100 ancestral steps on the
    # attributes a prompt asks for (judged on the 64 x 64 base samples, same prompts and seeds).
    fast, cases, _ = held_out_judgements
    mean = lambda scores: sum(scores[k] for k in ("colour", "shape", "position")) / 3  # noqa: E731
    model, _ = base
    prompts = [prompt for _, prompt in cases]
    options = demo.options("demo/base")
    respaced = create_gaussian_diffusion(
        options["diffusion_steps"], options["noise_schedule"], "100", prediction=options["prediction"]
    )
    with torch.no_grad():
        samples = respaced.p_sample_loop(
            ClassifierFreeGuidance(model, GUIDANCE_SCALE),
            (2 * len(prompts), 3, 64, 64),
            model_kwargs=text_kwargs(model, prompts + [None] * len(prompts)),
            generator=torch.Generator().manual_seed(0),
        )[: len(prompts)]
    ancestral = accuracy(samples, [spec for spec, _ in cases])
    print("judge, DPM-Solver++(2M) 25 steps:", fast, "ancestral 100 steps:", ancestral)
    assert mean(fast) >= mean(ancestral) - 0.02, (fast, ancestral)


@pytest.fixture(scope="module")
def held_out_judgements(base):
    """(judge accuracies, cases, samples [64 x 3 x 64 x 64]) of the base with classifier-free
    guidance and the 25-step DPM-Solver++(2M) sampler on 64 held-out prompts."""
    model, diffusion = base
    cases = held_out_cases(64, seed=1)
    samples = guided_samples(model, diffusion, [prompt for _, prompt in cases], seed=0)
    return accuracy(samples, [spec for spec, _ in cases]), cases, samples


def test_10_dpm_solver_upsampler_steps_keep_what_the_judge_sees_like_fast27_ddim(held_out_judgements):
    # Issue 10, second half of the sampler comparison: the end-to-end figure is the base's
    # (compared above) as long as the upsampler keeps every judged attribute of its input. On 8
    # of the base samples, 10 DPM-Solver++ steps must keep them as often as the notebook's
    # fast27 DDIM (temperature 0.997 for both).
    _, cases, samples = held_out_judgements
    specs, prompts, low_res = [spec for spec, _ in cases[:8]], [p for _, p in cases[:8]], samples[:8]
    low_res = ((low_res + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1  # 8 bits, as the pipelines pass it
    model, diffusion = load_unet("demo/upsample")
    options = demo.options("demo/upsample")
    fast27 = create_gaussian_diffusion(
        options["diffusion_steps"], options["noise_schedule"], "fast27", prediction=options["prediction"]
    )
    shape = (len(specs), 3, 256, 256)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.997
    kwargs = dict(text_kwargs(model, prompts), low_res=low_res)
    with torch.no_grad():
        fast = sample_dpmpp_2m(model, diffusion, shape, steps=10, noise=noise, model_kwargs=kwargs)
        notebook = fast27.ddim_sample_loop(model, shape, noise=noise, model_kwargs=kwargs)

    def kept(images):
        """The fraction of images judged (after box-downsampling) as their low-res input is."""
        before = [judge(image).agrees_with(spec) for image, spec in zip(low_res, specs)]
        after = [judge(image).agrees_with(spec) for image, spec in zip(F.avg_pool2d(images, 4), specs)]
        return sum(a == b for a, b in zip(before, after)) / len(specs)

    fast_kept, notebook_kept = kept(fast), kept(notebook)
    print(f"judged attributes kept by the upsampler: 10 DPM-Solver++ steps {fast_kept:.3f}, fast27 {notebook_kept:.3f}")
    assert fast_kept >= notebook_kept and fast_kept >= 7 / 8


def test_upsampler_keeps_the_low_res_image_and_sharpens_it():
    model, diffusion = load_unet("demo/upsample")
    specs = [spec for spec, _ in held_out_cases(2, seed=2)]
    high_res = torch.stack([shapes_tensor(spec, 256) for spec in specs])
    low_res = low_res_of(high_res)  # the 64 x 64 image, quantised like a base sample
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(high_res.shape, generator=generator) * 0.997
    with torch.no_grad():
        up = sample_dpmpp_2m(
            model,
            diffusion,
            high_res.shape,
            steps=SAMPLE_STEPS,
            noise=noise,
            model_kwargs=dict(text_kwargs(model, [""] * len(specs)), low_res=low_res),
        )
    bilinear = F.interpolate(low_res, scale_factor=4, mode="bilinear", align_corners=False)
    round_trip = (F.avg_pool2d(up, 4) - low_res).abs().mean().item()
    sharpness, bilinear_sharpness = edge_energy(up), edge_energy(bilinear)
    print(
        f"upsampler: box-downsampled MAE {round_trip:.4f}; mean |Laplacian| {sharpness:.4f} "
        f"vs bilinear {bilinear_sharpness:.4f}; MAE to the 256 px render {(up - high_res).abs().mean():.4f} "
        f"vs bilinear {(bilinear - high_res).abs().mean():.4f}"
    )
    assert round_trip <= 0.05
    assert sharpness > bilinear_sharpness


def shapes_tensor(spec, size):
    """``shapes.render`` as [3 x size x size] in [-1, 1]."""
    return torch.from_numpy(np.asarray(shapes.render(spec, size), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def edge_energy(images):
    """Mean absolute 3 x 3 Laplacian of [N x 3 x H x W] images."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).expand(3, 1, 3, 3)
    return F.conv2d(images, kernel, groups=3).abs().mean().item()


@pytest.fixture(scope="module")
def inpainted():
    """(sources, masks, samples, wanted specs) of 32 "replace the shape" inpaintings at 64 x 64."""
    model, diffusion = load_unet("demo/base-inpaint")
    rng = random.Random("demo-tests/inpaint")
    sources, masks, wanted, prompts = [], [], [], []
    for spec, _ in held_out_cases(32, seed=3):
        colour = rng.choice([c for c in shapes.COLOURS if c != spec.colour and spec.background in shapes.backgrounds_for(c)])
        shape = rng.choice([s for s in shapes.SHAPES if s != spec.shape])
        new = shapes.ShapeSpec(shape, colour, spec.size, spec.position, spec.background)
        sources.append(shapes_tensor(spec, 64))
        masks.append(box_mask(spec, 64))
        wanted.append(new)
        prompts.append(shapes.caption(new, rng, held_out=True))
    source, mask = torch.stack(sources), torch.stack(masks)
    known = dict(inpaint_image=(source * mask).repeat(2, 1, 1, 1), inpaint_mask=mask.repeat(2, 1, 1, 1))
    return source, mask, guided_samples(model, diffusion, prompts, seed=0, **known), wanted


def test_inpainting_keeps_every_known_pixel_exactly(inpainted):
    source, mask, samples, _ = inpainted
    kept = mask.expand_as(source).bool()
    assert 0.1 < kept.float().mean() < 0.95
    assert torch.equal(samples[kept], source[kept])
    assert not torch.equal(samples[~kept], source[~kept])


def test_inpainting_draws_the_requested_shape_and_colour(inpainted):
    _, _, samples, wanted = inpainted
    scores = accuracy(samples, [shapes.PartialSpec(shape=w.shape, colour=w.colour) for w in wanted])
    print("inpainting, 32 replaced shapes:", scores)
    assert scores["colour"] >= 0.8 and scores["shape"] >= 0.8, scores


def box_mask(spec, size):
    """[1 x size x size]: 0 (to generate) on the shape's bounding box grown by 4 px, 1 elsewhere."""
    cx, cy = spec.centre
    half = spec.extent * size / 2 + 4
    rows = torch.arange(size).view(-1, 1) + 0.5
    cols = torch.arange(size).view(1, -1) + 0.5
    inside = ((rows - cy * size).abs() <= half) & ((cols - cx * size).abs() <= half)
    return (~inside).float().unsqueeze(0)


def test_clip_guidance_gives_the_unconditional_base_the_asked_colour(base):
    model, _ = base
    clip = load_clip("demo/clip/image-enc", "demo/clip/text-enc", device="cpu")
    options = demo.options("demo/base")
    diffusion = create_gaussian_diffusion(
        options["diffusion_steps"],
        options["noise_schedule"],
        timestep_respacing=str(SAMPLE_STEPS),
        prediction=options["prediction"],
    )
    colours = [list(shapes.COLOURS)[i % len(shapes.COLOURS)] for i in range(24)]
    rng = random.Random("demo-tests/clip")
    prompts = [shapes.caption(shapes.PartialSpec(colour=c), rng, held_out=True) for c in colours]
    empty = text_kwargs(model, [None] * len(prompts))
    shape = (len(prompts), 3, 64, 64)

    def sample(cond_fn):
        return diffusion.p_sample_loop(
            model, shape, cond_fn=cond_fn, model_kwargs=empty, generator=torch.Generator().manual_seed(0)
        )

    cond_fn = clip.cond_fn(prompts, CLIP_GUIDANCE_SCALE)
    with torch.no_grad():
        unguided = sample(None)
        guided = sample(cond_fn)
    # DPM-Solver++ takes the same cond_fn (on the full chain's quadratic 25-step grid).
    guided_dpmpp = sample_dpmpp_2m(
        model, base[1], shape, steps=SAMPLE_STEPS, model_kwargs=empty, cond_fn=cond_fn,
        generator=torch.Generator().manual_seed(0),
    )
    wanted = [shapes.PartialSpec(colour=c) for c in colours]
    before, after = accuracy(unguided, wanted)["colour"], accuracy(guided, wanted)["colour"]
    after_dpmpp = accuracy(guided_dpmpp, wanted)["colour"]
    print(f"CLIP guidance on the unconditional base: colour {before:.3f} -> {after:.3f} (ancestral), "
          f"{after_dpmpp:.3f} (dpmpp_2m)")
    # Measured: 0.125 -> 0.667 (ancestral, 25 respaced steps), 0.583 (dpmpp_2m, 25 steps).
    assert before <= 0.35 and after >= 0.6 and after_dpmpp >= 0.5, (before, after, after_dpmpp)


# (steps, sampler) of CLIPGuidedPipeline: the notebook's 100 ancestral steps first, then every
# other registered sampler; ddim at "25" and "100" starts at t = 999, which the original DDIM
# loop turned into noise under CLIP guidance.
CLIP_PIPELINE_SETTINGS = [
    ("100", "ancestral"), ("25", "ddim"), ("100", "ddim"), ("ddim25", "ddim"),
    (SAMPLE_STEPS, "dpmpp_2m"), (15, "dpmpp_2m"), (SAMPLE_STEPS, "plms"),
]


def test_clip_guided_pipeline_gives_the_asked_colour_with_every_sampler():
    from glide_text2im.samplers import SAMPLERS

    assert {sampler for _, sampler in CLIP_PIPELINE_SETTINGS} == set(SAMPLERS)
    pipe = CLIPGuidedPipeline.from_pretrained(demo=True, upsampler=None, device="cpu", progress=False)
    colours = list(shapes.COLOURS)[:8]
    rng = random.Random("demo-tests/clip-pipeline")
    prompts = [shapes.caption(shapes.PartialSpec(colour=c), rng, held_out=True) for c in colours]
    wanted = [shapes.PartialSpec(colour=c) for c in colours]
    found = {}
    for steps, sampler in CLIP_PIPELINE_SETTINGS:
        out = pipe(prompts, steps=steps, sampler=sampler, seed=0, return_tensors=True)
        found[f"{sampler}@{steps}"] = accuracy(out.samples_64, wanted)["colour"]
    print("CLIPGuidedPipeline colour accuracy:", found)
    reference = found["ancestral@100"]
    assert reference >= 0.6, found
    assert all(value >= reference for value in found.values()), found
    # Prompts with which the original DDIM loop's unclamped guided x_0 showed most: at
    # steps="25" it gave a blue and a yellow image (judged) instead of red and green.
    plain = ["a red circle on a black background", "a green square on a white background"]
    out = pipe(plain, steps="25", sampler="ddim", seed=0, return_tensors=True)
    assert [judge(image).colour for image in out.samples_64] == ["red", "green"]


def test_pipeline_cli_benchmark_and_quality_tests_evaluate_the_same_timesteps(base, monkeypatch, tmp_path):
    """``steps=25`` with DPM-Solver++ is one list of timesteps for a user of the pipeline or the
    CLI, for the benchmark's timed images and for the quality tests here (issue 25)."""
    import importlib.util

    from glide_text2im.cli import main
    from glide_text2im.samplers import get_timesteps
    from glide_text2im.text2im_model import Text2ImUNet

    calls = {}  # path -> the timestep of each base-model evaluation, in order
    path = "pipeline"
    forward = Text2ImUNet.forward

    def recording_forward(self, x, timesteps, *args, **kwargs):
        calls.setdefault(path, []).append(int(timesteps[0]))
        return forward(self, x, timesteps, *args, **kwargs)

    monkeypatch.setattr(Text2ImUNet, "forward", recording_forward)
    prompt = "a red circle on a black background"
    pipe = Text2ImPipeline.from_pretrained(demo=True, upsampler=None, device="cpu", progress=False)
    pipe(prompt, steps=SAMPLE_STEPS, sampler="dpmpp_2m", seed=0)
    path = "cli"
    flags = ["--steps", str(SAMPLE_STEPS), "--sampler", "dpmpp_2m", "--no-upsample", "--seed", "0", "--quiet"]
    assert main(["generate", prompt, "--demo", *flags, "--out", str(tmp_path)]) == 0
    path = "quality tests"
    guided_samples(base[0], base[1], [prompt], seed=0)

    spec = importlib.util.spec_from_file_location("bench_sampling", REPO_ROOT / "benchmarks" / "bench_sampling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    small_base, base_options = bench.build_model("base", True, torch.device("cpu"), torch.float32, 0)
    small_up, up_options = bench.build_model("upsample", True, torch.device("cpu"), torch.float32, 1)

    def recording_model_fn(x, t, **kwargs):
        calls.setdefault("benchmark", []).append(int(t[0]))
        return torch.zeros(x.shape[0], 6, *x.shape[2:])

    setting = dict(name="dpmpp_2m", path="fast", base="dpmpp_2m", base_steps=SAMPLE_STEPS, up="dpmpp_2m", up_steps=10)
    bench.generate_image(setting, small_base, base_options, small_up, up_options, torch.device("cpu"),
                         torch.Generator().manual_seed(0), model_fn=recording_model_fn, up_model=bench.stand_in())

    expected = get_timesteps(base[1], SAMPLE_STEPS, "quadratic")
    assert len(expected) == SAMPLE_STEPS and expected[0] == 999 and expected[-1] == 0
    assert calls == {name: expected for name in ("pipeline", "cli", "quality tests", "benchmark")}


CLI_PROMPT = "a blue triangle on a yellow background"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """(seconds, PNG image) of ``glide-text2im generate --demo CLI_PROMPT`` run offline: an
    empty checkpoint cache, no vocabulary folder and a proxy that refuses every connection."""
    tmp_path = tmp_path_factory.mktemp("cli_demo")
    env = dict(os.environ, GLIDE_CACHE_DIR=str(tmp_path / "empty-cache"), HTTPS_PROXY="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", PYTHONPATH=str(REPO_ROOT))
    env.pop("GLIDE_VOCAB_DIR", None)
    command = [sys.executable, "-m", "glide_text2im", "generate", "--demo", CLI_PROMPT, "--seed", "0", "--quiet",
               "--out", str(tmp_path / "out")]  # fmt: skip
    started = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - started
    assert result.returncode == 0, result.stderr
    return elapsed, Image.open(result.stdout.split()[0])


def test_cli_generate_demo_runs_offline_in_under_a_minute(cli_run):
    elapsed, image = cli_run
    print(f"CLI --demo: {elapsed:.1f} s")
    assert image.size == (256, 256) and image.mode == "RGB"
    assert elapsed < 60


def test_cli_generate_demo_draws_the_prompt(cli_run):
    _, image = cli_run
    judgement = judge(image.convert("RGB").resize((64, 64), Image.BOX))
    print(f"CLI --demo: judged a {judgement.colour} {judgement.shape} on {judgement.background}")
    assert judgement.agrees_with(shapes.parse_prompt(CLI_PROMPT)) == {"shape": True, "colour": True, "background": True}


def test_pipelines_put_the_demo_models_in_place_of_the_official_defaults_with_demo_true():
    text2im = Text2ImPipeline.from_pretrained(demo=True, device="cpu", progress=False)
    assert (text2im.base.name, text2im.upsampler.name) == ("demo/base", "demo/upsample")
    assert text2im.base.options == demo.options("demo/base")
    inpaint = InpaintPipeline.from_pretrained(demo=True, device="cpu", progress=False)
    assert inpaint.base.name == "demo/base-inpaint" and inpaint.upsampler is None  # no demo inpainting upsampler
    guided = CLIPGuidedPipeline.from_pretrained(demo=True, upsampler=None, device="cpu", progress=False)
    assert guided.clip.tokenizer.n_vocab == ByteCLIPTokenizer().n_vocab
    # A name that is not an official default is kept.
    assert Text2ImPipeline.from_pretrained("demo/base", None, demo=True, device="cpu", progress=False).upsampler is None
    assert demo.demo_equivalent("base") == "demo/base" and demo.demo_equivalent("my.pt") == "my.pt"
