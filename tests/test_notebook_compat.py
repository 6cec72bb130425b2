"""Code written for the original package runs unchanged against this one.

``tests/notebook_scripts/*.py`` hold the original notebooks' flows as a user pastes them into
a script: official checkpoint names, ``model_and_diffusion_defaults*()`` options, the
notebooks' respacings ("100" and "fast27"). Only the weights are swapped, in-process, before
each script runs: ``glide_text2im.download.load_checkpoint`` serves tiny random state dicts
for the official names, the defaults functions return the official options with tiny sizes,
and the packaged CLIP config is replaced by a tiny one.
"""

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.conftest import REPO_ROOT
from tests.notebook_scripts.tiny_weights import tiny_state_dict, use_tiny_official_weights, write_notebook_weights

SCRIPTS_DIR = REPO_ROOT / "tests" / "notebook_scripts"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    return write_notebook_weights(tmp_path_factory.mktemp("tiny-weights"))


@pytest.fixture
def run_script(tiny_weights, tmp_path, monkeypatch):
    """Run ``tests/notebook_scripts/<name>`` in ``tmp_path`` with the tiny weights patched in.

    Returns the script's globals and the checkpoint names it loaded, in order.
    """
    loaded = use_tiny_official_weights(monkeypatch, tiny_weights)
    monkeypatch.chdir(tmp_path)

    def run(name: str):
        torch.manual_seed(0)
        return runpy.run_path(str(SCRIPTS_DIR / name), run_name="__main__"), loaded

    return run


def to_uint8(batch: torch.Tensor) -> np.ndarray:
    """[1 x 3 x H x W] in [-1, 1] -> [H x W x 3] uint8, as the scripts save it."""
    return ((batch[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def assert_saved_picture(path: Path, batch: torch.Tensor, size: int) -> np.ndarray:
    """``path`` is the PNG of ``batch`` [1 x 3 x size x size], a picture whose pixels vary."""
    assert batch.shape == (1, 3, size, size)
    assert torch.isfinite(batch).all()
    assert batch.abs().max() <= 1.01  # the last step adds (mean shift) x (a tiny variance) to x_0
    image = np.asarray(Image.open(path))
    assert image.shape == (size, size, 3)
    np.testing.assert_array_equal(image, to_uint8(batch))
    assert image.std() > 10, f"{path.name} is (nearly) a single colour"
    return image


def parameter_count(name: str) -> int:
    return sum(t.numel() for t in tiny_state_dict(name).values())


def test_text2im_script_runs_unchanged(run_script, capsys):
    namespace, loaded = run_script("text2im.py")

    assert loaded == ["base", "upsample"]
    assert namespace["diffusion"].num_timesteps == 100
    assert namespace["diffusion_up"].num_timesteps == 27
    printed = capsys.readouterr().out
    assert f"total base parameters {parameter_count('base')}" in printed
    assert f"total upsampler parameters {parameter_count('upsample')}" in printed
    assert_saved_picture(Path("base.png"), namespace["samples"], 64)
    assert_saved_picture(Path("upsampled.png"), namespace["up_samples"], 256)


def test_clip_guided_script_runs_unchanged(run_script, tiny_weights):
    namespace, loaded = run_script("clip_guided.py")

    assert loaded == ["base", "upsample", "clip/image-enc", "clip/text-enc"]
    image_encoder_weights = torch.load(tiny_weights / "clip-image-enc.pt", weights_only=True)
    for key, value in namespace["clip_model"].image_encoder.state_dict().items():
        assert torch.equal(value, image_encoder_weights[key]), key
    x = torch.zeros(1, 3, 64, 64)
    assert namespace["cond_fn"](x, torch.tensor([500])).abs().sum() > 0, "the CLIP gradient must steer sampling"
    assert_saved_picture(Path("base.png"), namespace["samples"], 64)
    assert_saved_picture(Path("upsampled.png"), namespace["up_samples"], 256)


def draw_source(path: Path) -> None:
    """A 256×256 test picture: a colour gradient with a few filled shapes."""
    gradient = np.linspace(0, 255, 256, dtype=np.float64)
    pixels = np.stack(np.broadcast_arrays(gradient[None, :], gradient[:, None], 255 - gradient[None, :]), axis=-1)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse([20, 10, 90, 70], fill=(240, 200, 40))
    draw.rectangle([150, 30, 230, 60], fill=(30, 60, 200))
    draw.polygon([(60, 250), (128, 120), (200, 250)], fill=(20, 140, 60))
    image.save(path)


def test_inpaint_script_runs_unchanged_and_keeps_the_unmasked_part(run_script):
    draw_source(Path("source.png"))
    namespace, loaded = run_script("inpaint.py")

    assert loaded == ["base-inpaint", "upsample-inpaint"]
    sample_64 = assert_saved_picture(Path("base.png"), namespace["samples"], 64)
    sample_256 = assert_saved_picture(Path("upsampled.png"), namespace["up_samples"], 256)

    # Rows 0..19 of 64 (0..79 of 256) are kept: equal to the source, bit for bit.
    source_64, source_256 = namespace["source_image_64"], namespace["source_image_256"]
    assert torch.equal(namespace["samples"][..., :20, :], source_64[..., :20, :])
    assert torch.equal(namespace["up_samples"][..., :80, :], source_256[..., :80, :])
    source_png = Image.open("source.png")
    np.testing.assert_array_equal(sample_64[:20], np.asarray(source_png.resize((64, 64), Image.BICUBIC))[:20])
    np.testing.assert_array_equal(sample_256[:80], np.asarray(source_png)[:80])
    repainted = np.any(sample_64[20:] != to_uint8(source_64)[20:], axis=-1)
    assert repainted.mean() > 0.5, "the masked part must be generated, not copied from the source"
