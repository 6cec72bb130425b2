"""The glide-text2im command, run in subprocesses on the tiny checkpoints of test_pipelines.

Covers every subcommand, byte-identical PNGs for a fixed seed, the one-line errors for bad
input (run concurrently, plus more cases through ``main`` in-process), downloads from a
local HTTP server, and prompt sharding under ``torchrun --nproc_per_node 2`` (gloo on CPU).
"""

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glide_text2im.pipelines import CLIPGuidedPipeline, InpaintPipeline, Text2ImPipeline
from glide_text2im.tokenizer.vocab import PACKAGED_VOCAB_DIR, VOCAB_NAMES, VOCAB_SHA256
from tests.test_pipelines import build_tiny_checkpoints, one_thread  # noqa: F401  (autouse fixture)

BIN = Path(sys.executable).parent
COMMAND = [str(BIN / "glide-text2im")]
TIMEOUT = 300
ERROR_LINE = re.compile(r"glide-text2im: error: \S.*")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return build_tiny_checkpoints(str(tmp_path_factory.mktemp("cli_tiny_checkpoints", numbered=False)))


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    environment = {key: value for key, value in os.environ.items() if key != "GLIDE_VOCAB_DIR"}
    environment.update(OMP_NUM_THREADS="1", GLIDE_CACHE_DIR=str(tmp_path_factory.mktemp("cache")))
    return environment


def run(args, env, command=COMMAND, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=TIMEOUT
    )


def run_concurrently(arg_lists, env, commands=None) -> list:
    """Run several commands at once (most of their time is spent importing torch)."""
    commands = commands or [COMMAND] * len(arg_lists)
    processes = [
        subprocess.Popen(
            [*command, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for command, args in zip(commands, arg_lists)
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def assert_ok(result: subprocess.CompletedProcess) -> list:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout.splitlines()


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and ERROR_LINE.fullmatch(lines[0]), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert result.stdout == ""


def png_text(path) -> dict:
    with Image.open(path) as image:
        return dict(image.text)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image)


def tiny_args(tiny: dict, upsample: bool, inpaint: bool = False) -> list:
    base, upsampler = ("base-inpaint", "upsample-inpaint") if inpaint else ("base", "upsample")
    args = ["--base-checkpoint", tiny[base], "--steps", "ddim5", "--quiet"]
    if upsample:
        return args + ["--upsample-checkpoint", tiny[upsampler], "--upsample-steps", "ddim2"]
    return args + ["--no-upsample"]


@functools.lru_cache(maxsize=None)
def pipeline(kind: str, tiny_dir: str):
    paths = build_tiny_checkpoints(tiny_dir)
    if kind == "text2im":
        return Text2ImPipeline.from_pretrained(paths["base"], None, device="cpu")
    if kind == "inpaint":
        return InpaintPipeline.from_pretrained(paths["base-inpaint"], None, device="cpu")
    return CLIPGuidedPipeline.from_pretrained(
        paths["base"], None, clip_image=paths["clip-image"], clip_text=paths["clip-text"], device="cpu"
    )


def in_process(kind: str, tiny: dict, *args, **kwargs):
    return pipeline(kind, os.path.dirname(tiny["base"]))(*args, steps="ddim5", upsample=False, **kwargs)


# ---------------------------------------------------------------------- generate


def test_generate_twice_with_a_seed_writes_identical_png_bytes(tiny, env, tmp_path):
    args = ["generate", "a red cube", "--seed", "5", *tiny_args(tiny, upsample=True)]
    first, second = map(
        assert_ok,
        run_concurrently(
            [[*args, "--out", tmp_path / "one"], [*args, "--out", tmp_path / "two"]],
            env,
            commands=[COMMAND, [sys.executable, "-m", "glide_text2im"]],
        ),
    )
    assert first == [str(tmp_path / "one" / "00000-0.png")]
    assert second == [str(tmp_path / "two" / "00000-0.png")]
    png = (tmp_path / "one" / "00000-0.png").read_bytes()
    assert png == (tmp_path / "two" / "00000-0.png").read_bytes()
    assert pixels(tmp_path / "one" / "00000-0.png").shape == (256, 256, 3)

    text = png_text(tmp_path / "one" / "00000-0.png")
    assert text["prompt"] == "a red cube" and text["seed"] == "5" and text["image_index"] == "0"
    settings = json.loads(text["settings"])
    assert settings["steps"] == "ddim5" and settings["upsample_steps"] == "ddim2"
    assert settings["guidance_scale"] == 3.0 and settings["sampler"] == "ancestral"
    assert settings["upsample_sampler"] == "ddim" and settings["upsample_temp"] == 0.997
    assert settings["dtype"] == "float32" and settings["base_checkpoint"] == tiny["base"]


def test_generate_from_a_prompts_file_matches_the_pipeline_batch_by_batch(tiny, env, tmp_path):
    prompts = ["a red cube", "a blue ball", "a cat"]
    (tmp_path / "prompts.txt").write_text("a red cube\n\na blue ball\n  a cat  \n", encoding="utf-8")
    out = tmp_path / "out"
    args = ["generate", "--prompts-file", tmp_path / "prompts.txt", "-n", "2", "--batch-size", "2", "--seed", "10"]
    lines = assert_ok(run([*args, "--grid", "--out", out, *tiny_args(tiny, upsample=False)], env))
    names = [f"{i:05d}-{j}.png" for i in range(3) for j in range(2)]
    assert lines == [str(out / name) for name in names] + [str(out / "grid.png")]

    expected = [
        *in_process("text2im", tiny, prompts[:2], num_images_per_prompt=2, seed=[10, 11]).images,
        *in_process("text2im", tiny, prompts[2:], num_images_per_prompt=2, seed=[12]).images,
    ]
    for name, image in zip(names, expected):
        assert np.array_equal(pixels(out / name), np.array(image)), name
    assert [png_text(out / name)["prompt"] for name in names] == [p for p in prompts for _ in range(2)]
    assert [png_text(out / name)["seed"] for name in names] == ["10", "10", "11", "11", "12", "12"]
    pipeline_settings = in_process("text2im", tiny, prompts[2:], num_images_per_prompt=2, seed=[12]).settings
    assert json.loads(png_text(out / names[5])["settings"]) == dict(pipeline_settings, command="generate")
    grid = pixels(out / "grid.png")
    assert grid.shape == (128, 192, 3)
    assert np.array_equal(grid[64:, 64:128], np.array(expected[4]))


def test_generate_without_a_seed_records_the_seed_it_drew_and_shows_progress(tiny, env, tmp_path):
    args = ["generate", "a cat", "--out", tmp_path, "--base-checkpoint", tiny["base"], "--steps", "ddim5"]
    result = run([*args, "--no-upsample"], env)
    assert_ok(result)
    assert "5/5" in result.stderr and "step" in result.stderr  # the progress bar
    seed = int(png_text(tmp_path / "00000-0.png")["seed"])
    again = in_process("text2im", tiny, "a cat", seed=seed).images[0]
    assert np.array_equal(pixels(tmp_path / "00000-0.png"), np.array(again))


# ---------------------------------------------------------------------- inpaint and clip-guided


def test_inpaint_with_a_box_or_a_mask_keeps_the_rest_of_the_image(tiny, env, tmp_path):
    source = np.random.default_rng(3).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(source).save(tmp_path / "source.png")
    mask = np.zeros((48, 48), dtype=np.uint8)
    mask[:, 24:] = 255  # right half at half resolution
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["inpaint", "a corgi", "--image", tmp_path / "source.png", "--seed", "2", *tiny_args(tiny, False, True)]

    by_box_args = [*common, "--box", "48,0,96,96", "--out", tmp_path / "box"]
    by_mask_args = [*common, "--mask", tmp_path / "mask.png", "--out", tmp_path / "mask"]
    for result in run_concurrently([by_box_args, by_mask_args], env):
        assert_ok(result)
    by_box, by_mask = pixels(tmp_path / "box" / "00000-0.png"), pixels(tmp_path / "mask" / "00000-0.png")
    assert np.array_equal(by_box, by_mask)
    resized = np.array(Image.fromarray(source).resize((64, 64), resample=Image.BICUBIC))
    assert np.array_equal(by_box[:, :32], resized[:, :32])  # the kept left half, exactly
    assert not np.array_equal(by_box[:, 32:], resized[:, 32:])
    expected = in_process("inpaint", tiny, "a corgi", Image.fromarray(source), mask, seed=2).images[0]
    assert np.array_equal(by_box, np.array(expected))
    settings = json.loads(png_text(tmp_path / "box" / "00000-0.png")["settings"])
    assert settings["box"] == "48,0,96,96" and settings["guidance_scale"] == 5.0


def test_clip_guided_writes_the_pipeline_images(tiny, env, tmp_path):
    args = [
        "clip-guided", "a corgi", "--seed", "4", "--guidance-scale", "2.5", "--out", tmp_path,
        "--clip-image-checkpoint", tiny["clip-image"], "--clip-text-checkpoint", tiny["clip-text"],
        *tiny_args(tiny, upsample=False),
    ]
    assert assert_ok(run(args, env)) == [str(tmp_path / "00000-0.png")]
    expected = in_process("clip", tiny, "a corgi", guidance_scale=2.5, seed=4).images[0]
    assert np.array_equal(pixels(tmp_path / "00000-0.png"), np.array(expected))
    assert json.loads(png_text(tmp_path / "00000-0.png")["settings"])["clip_image_checkpoint"] == tiny["clip-image"]


# ---------------------------------------------------------------------- download


def serve_directory(directory: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def download_with_url(url: str, env: dict) -> subprocess.CompletedProcess:
    """``glide-text2im download base`` with the official URL of "base" replaced by ``url``."""
    code = (
        "import sys; import glide_text2im.download as d; d.MODEL_PATHS['base'] = sys.argv[1]; "
        "d.OFFICIAL_SIZES['base'] = (1, 2500); "  # the size of the state dict served below
        "from glide_text2im.cli import main; sys.exit(main(['download', 'base']))"
    )
    return run([url], env, command=[sys.executable, "-c", code])


def test_download_fetches_a_checkpoint_from_the_server(env, tmp_path):
    (tmp_path / "site").mkdir()
    torch.save({"w": torch.ones(2500)}, tmp_path / "site" / "base.pt")  # a download must be a state dict
    payload = (tmp_path / "site" / "base.pt").read_bytes()
    server = serve_directory(tmp_path / "site")
    cache = tmp_path / "cache"
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/base.pt"
        result = download_with_url(url, dict(env, GLIDE_CACHE_DIR=str(cache)))
    finally:
        server.shutdown()
    assert assert_ok(result) == [str(cache / "base.pt")]
    assert (cache / "base.pt").read_bytes() == payload
    assert (cache / "base.pt.sha256").exists()


def test_download_reports_an_unreachable_server_in_one_line(env, tmp_path):
    result = download_with_url(f"http://127.0.0.1:{closed_port()}/base.pt", dict(env, GLIDE_CACHE_DIR=str(tmp_path)))
    assert_one_line_error(result, r"could not download base\.pt: the server could not be reached")
    assert not (tmp_path / "base.pt").exists()


def test_download_uses_cached_checkpoints_and_packaged_vocabularies(env, tmp_path):
    (tmp_path / "upsample.pt").write_bytes(b"already here")
    lines = assert_ok(run(["download", "upsample", "vocab"], dict(env, GLIDE_CACHE_DIR=str(tmp_path))))
    assert lines[0] == str(tmp_path / "upsample.pt")
    # The package's own copies: the checkout's or, after a non-editable install, the installed ones.
    for line in lines[1:]:
        path = Path(line)
        assert path.parent.parts[-3:] == Path(PACKAGED_VOCAB_DIR).parts[-3:] == ("glide_text2im", "tokenizer", "data")
        assert hashlib.sha256(path.read_bytes()).hexdigest() == VOCAB_SHA256[path.name]
    assert [Path(line).name.replace(".gz", "") for line in lines[1:]] == list(VOCAB_NAMES)


# ---------------------------------------------------------------------- one-line errors


def error_cases(tiny: dict, tmp: Path) -> dict:
    """name -> (arguments, expected message pattern): the bad input the issue lists."""
    source = tmp / "source.png"
    Image.fromarray(np.zeros((96, 96, 3), dtype=np.uint8)).save(source)
    Image.fromarray(np.zeros((64, 96, 3), dtype=np.uint8)).save(tmp / "wide.png")
    Image.fromarray(np.zeros((32, 50), dtype=np.uint8)).save(tmp / "odd-mask.png")
    Image.fromarray(np.zeros((96, 96), dtype=np.uint8)).save(tmp / "black-mask.png")
    speck = np.zeros((96, 96), dtype=np.uint8)
    speck[40, 40] = 255  # a quarter of a 64x64 pixel: regenerates nothing
    Image.fromarray(speck).save(tmp / "speck-mask.png")
    (tmp / "latin-1.txt").write_bytes("a caf\xe9\n".encode("latin-1"))
    (tmp / "a-file").write_text("not a folder")
    out = ["--out", tmp / "out"]
    fast = tiny_args(tiny, upsample=False)
    generate = ["generate", "a", *fast, *out]
    inpaint = ["inpaint", "a cat", "--image", source, *tiny_args(tiny, False, True), *out]
    return {
        "missing prompts file": (
            ["generate", "--prompts-file", tmp / "nope.txt", *fast, *out],
            r"prompts file not found: .*nope\.txt",
        ),
        "missing mask": ([*inpaint, "--mask", tmp / "nope.png"], r"mask not found: .*nope\.png"),
        "missing checkpoint file": ([*generate, "--base-checkpoint", tmp / "gone.pt"], r"no such file: .*gone\.pt$"),
        "unknown checkpoint": ([*generate, "--base-checkpoint", "base-v2"], r"unknown checkpoint 'base-v2': known names"),
        "mask size": ([*inpaint, "--mask", tmp / "odd-mask.png"], r"the 50x32 mask cannot be mapped onto the 96x96 image"),
        "empty mask": ([*inpaint, "--mask", tmp / "black-mask.png"], r"the mask has no white pixels: nothing to regenerate"),
        "mask too small": ([*inpaint, "--mask", tmp / "speck-mask.png"], r"covers no pixel of the 64x64 model image"),
        "non-square image": (
            ["inpaint", "a cat", "--image", tmp / "wide.png", "--box", "0,0,10,10", *tiny_args(tiny, False, True), *out],
            r"--image .*wide\.png is 96x64 pixels but must be square: .* crop it to a square first",
        ),
        "nan guidance": ([*generate, "--guidance-scale", "nan"], r"--guidance-scale must be a finite number >= 0, got nan$"),
        "negative guidance": ([*generate, "--guidance-scale", "-2"], r"--guidance-scale must be a finite number >= 0"),
        "prompts file not UTF-8": (
            ["generate", "--prompts-file", tmp / "latin-1.txt", *fast, *out],
            r"prompts file .*latin-1\.txt is not UTF-8 text: byte 0xe9 at offset 5",
        ),
        "unwritable out": ([*generate, "--out", tmp / "a-file" / "sub"], r"output directory .* is not writable"),
        "prompt too long": (["generate", "a rather long prompt", *fast, *out], r"has 20 tokens but the model reads at most 16"),
    }


@pytest.fixture(scope="module")
def error_results(tiny, env, tmp_path_factory) -> dict:
    """Every error case, run concurrently."""
    tmp = tmp_path_factory.mktemp("errors")
    cases = error_cases(tiny, tmp)
    results = run_concurrently([args for args, _ in cases.values()], env)
    results = {name: (result, pattern) for (name, (_, pattern)), result in zip(cases.items(), results)}
    results["out folder"] = tmp / "out"
    return results


@pytest.mark.parametrize(
    "case",
    [
        "missing prompts file", "missing mask", "missing checkpoint file", "unknown checkpoint", "mask size",
        "unwritable out", "prompt too long", "empty mask", "mask too small", "non-square image", "nan guidance",
        "negative guidance", "prompts file not UTF-8",
    ],
)
def test_bad_input_ends_with_a_one_line_error(error_results, case):
    result, pattern = error_results[case]
    assert_one_line_error(result, pattern)


def test_failed_runs_leave_no_output_folder(error_results):
    """Every error case writes to the same --out; "mask too small" fails after loading the models."""
    assert not error_results["out folder"].exists()


def test_a_second_run_numbers_on_and_overwrite_replaces(tiny, tmp_path, capsys):
    from glide_text2im.cli import main

    out = tmp_path / "new" / "out"
    args = ["generate", "a cat", "a dog", "--seed", "1", "--grid", *map(str, tiny_args(tiny, upsample=False))]
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(out), "--seed", "7"]) == 0
    first_run = ["00000-0.png", "00001-0.png", "grid.png"]
    second_run = ["00002-0.png", "00003-0.png", "grid-00002.png"]
    assert capsys.readouterr().out.splitlines() == [str(out / name) for name in first_run + second_run]
    assert sorted(os.listdir(out)) == sorted(first_run + second_run)
    assert png_text(out / "00000-0.png")["seed"] == "1" and png_text(out / "00002-0.png")["seed"] == "7"

    assert main([*args, "--out", str(out), "--seed", "9", "--overwrite"]) == 0
    assert capsys.readouterr().out.splitlines() == [str(out / name) for name in first_run]
    assert sorted(os.listdir(out)) == sorted(first_run + second_run)
    assert png_text(out / "00000-0.png")["seed"] == "9" and png_text(out / "00001-0.png")["seed"] == "10"
    assert png_text(out / "00002-0.png")["seed"] == "7"


def test_help_lists_the_registered_samplers_and_the_overwrite_option():
    from glide_text2im.cli import build_parser
    from glide_text2im.samplers import SAMPLERS

    subparsers = next(action for action in build_parser()._actions if action.dest == "command")
    help_text = " ".join(subparsers.choices["generate"].format_help().split())
    assert len(SAMPLERS) >= 4
    assert f"base sampler: {', '.join(SAMPLERS)} (default ancestral)" in help_text
    assert f"upsampler sampler: {', '.join(SAMPLERS)} (default ddim)" in help_text
    assert "--overwrite number the images from 00000 and replace files of those names" in help_text


@pytest.mark.parametrize(
    "prefix, suffix, pattern",
    [
        (["inpaint", "a", "--image", "nope.png"], ["--box", "0,0,1,1"], r"image not found: nope\.png"),
        (["inpaint", "a", "--image", "{source}"], ["--box", "1,2,3"], r"--box must be four integers"),
        (["inpaint", "a", "--image", "{source}"], ["--box", "0,0,97,10"], r"box 0,0,97,10 is empty or lies outside the 96x96 image"),
        (["generate"], [], r"give prompts as arguments or with --prompts-file"),
        (["generate", "a"], ["--sampler", "euler"], r"unknown sampler 'euler'"),
        (["generate", "a"], ["--steps", "fast"], r"invalid timestep respacing 'fast'"),
        (["generate", "a"], ["-n", "0"], r"-n must be a positive int, got 0"),
        (["generate", "a"], ["--batch-size", "0"], r"--batch-size must be a positive int, got 0"),
        (["generate", "a"], ["--seed", "-3"], r"--seed must be an int in \[0, 2\*\*63 - 1\], got -3"),
        (["generate", "a"], ["--guidance-scale", "inf"], r"--guidance-scale must be a finite number >= 0, got inf"),
        (["generate", "a"], ["--device", "gpu0"], r"unknown device 'gpu0'"),
        (["generate", "a"], ["--dtype", "float8"], r"unknown dtype 'float8'"),
        (["download", "base", "bigger"], None, r"unknown checkpoint 'bigger'"),
    ],
)
def test_more_bad_input_in_process(tiny, tmp_path, capsys, prefix, suffix, pattern):
    from glide_text2im.cli import main

    Image.fromarray(np.zeros((96, 96, 3), dtype=np.uint8)).save(tmp_path / "source.png")
    args = [arg.format(source=tmp_path / "source.png") for arg in prefix]
    if suffix is not None:
        model_args = tiny_args(tiny, upsample=False, inpaint=prefix[0] == "inpaint")
        args += [*map(str, model_args), "--out", str(tmp_path / "out"), *suffix]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert ERROR_LINE.fullmatch(captured.err.strip()) and re.search(pattern, captured.err)
    assert not (tmp_path / "out").exists()


def test_every_subcommand_is_registered():
    from glide_text2im.cli import build_parser

    subparsers = next(action for action in build_parser()._actions if action.dest == "command")
    assert list(subparsers.choices) == ["generate", "inpaint", "clip-guided", "download", "train", "convert"]


def test_usage_errors_are_one_line_too(env):
    result = run(["generate", "a", "-n", "many"], env)
    assert result.returncode == 2
    message = "glide-text2im generate: error: argument -n/--num-images: invalid int value: 'many'"
    assert result.stderr.splitlines() == [message]


# ---------------------------------------------------------------------- torchrun


def test_torchrun_shards_a_prompts_file_across_two_ranks(tiny, env, tmp_path):
    prompts = [f"prompt {i}" for i in range(5)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out"
    torchrun = shutil.which("torchrun", path=str(BIN)) or "torchrun"
    result = run(
        [
            "--standalone", "--nproc_per_node", "2", "-m", "glide_text2im", "generate",
            "--prompts-file", tmp_path / "prompts.txt", "--seed", "100", "--out", out, *tiny_args(tiny, upsample=False),
        ],
        env,
        command=[torchrun],
    )
    lines = assert_ok(result)
    written = [line for line in lines if line.endswith(".png")]
    assert sorted(written) == [str(out / f"{i:05d}-0.png") for i in range(5)]  # none lost, none twice
    assert sorted(os.listdir(out)) == [f"{i:05d}-0.png" for i in range(5)]
    for i, prompt in enumerate(prompts):
        text = png_text(out / f"{i:05d}-0.png")
        assert text["prompt"] == prompt and text["seed"] == str(100 + i)
    rank_0 = in_process("text2im", tiny, [prompts[0], prompts[2], prompts[4]], seed=[100, 102, 104]).images
    rank_1 = in_process("text2im", tiny, [prompts[1], prompts[3]], seed=[101, 103]).images
    for i, image in zip([0, 2, 4, 1, 3], [*rank_0, *rank_1]):
        assert np.array_equal(pixels(out / f"{i:05d}-0.png"), np.array(image)), i
