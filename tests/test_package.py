"""`pip install .` (not editable) into a fresh virtual environment gives a working package.

The repository's packaging files and package are copied to a temporary folder (so the build
writes nothing into the checkout), built into a wheel with pip's ``--no-deps
--no-build-isolation`` and installed from that wheel into a new virtual environment. That
environment sees the test environment's packages (torch, numpy, ...) through a ``.pth`` file,
after its own site-packages, so the package is imported from the new install. A subprocess
outside the repository, with ``$GLIDE_VOCAB_DIR`` unset, then imports every public module path
of the networks, diffusion, tokenizer and CLIP issues and tokenizes the golden cases with the
vocabularies the wheel ships.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

from glide_text2im.tokenizer.vocab import VOCAB_NAMES, VOCAB_SHA256
from tests.conftest import GOLDEN_DIR, REPO_ROOT

PACKAGING_FILES = ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE")

# module path -> names it must define (the original package's public API)
PUBLIC_API = {
    "glide_text2im": ["__version__"],
    "glide_text2im.text2im_model": [
        "Text2ImUNet",
        "SuperResText2ImUNet",
        "InpaintText2ImUNet",
        "SuperResInpaintText2ImUnet",
    ],
    "glide_text2im.unet": ["UNetModel", "SuperResUNetModel", "InpaintUNetModel", "SuperResInpaintUNetModel"],
    "glide_text2im.xf": ["Transformer", "LayerNorm"],
    "glide_text2im.nn": ["timestep_embedding", "GroupNorm32"],
    "glide_text2im.fp16_util": ["convert_module_to_f16", "convert_module_to_f32"],
    "glide_text2im.model_creation": [
        "model_and_diffusion_defaults",
        "model_and_diffusion_defaults_upsampler",
        "create_model_and_diffusion",
        "create_model",
        "create_gaussian_diffusion",
    ],
    "glide_text2im.gaussian_diffusion": ["get_named_beta_schedule", "betas_for_alpha_bar", "GaussianDiffusion"],
    "glide_text2im.respace": ["space_timesteps", "SpacedDiffusion"],
    "glide_text2im.tokenizer.bpe": ["get_encoder"],
    "glide_text2im.tokenizer.simple_tokenizer": ["SimpleTokenizer"],
    "glide_text2im.download": ["MODEL_PATHS", "load_checkpoint", "fetch_file_cached", "default_cache_dir"],
    "glide_text2im.clip.model_creation": ["create_clip_model"],
    "glide_text2im.clip.encoders": ["TextEncoder", "ImageEncoder"],
}

# Run by the new environment's python: import everything and report what was found where.
PROBE = textwrap.dedent(
    """
    import importlib, json, sys

    public_api = json.loads(sys.argv[1])
    report = {"files": {}, "missing": []}
    for module_name, names in public_api.items():
        module = importlib.import_module(module_name)
        report["files"][module_name] = module.__file__
        report["missing"] += [f"{module_name}.{name}" for name in names if not hasattr(module, name)]

    import glide_text2im
    from glide_text2im.clip.model_creation import DEFAULT_CONFIG_PATH, load_clip_config
    from glide_text2im.download import MODEL_PATHS
    from glide_text2im.model_creation import model_and_diffusion_defaults

    report["version"] = glide_text2im.__version__
    report["clip_config_path"] = str(DEFAULT_CONFIG_PATH)
    report["clip_n_embd"] = load_clip_config()["n_embd"]
    report["model_names"] = sorted(MODEL_PATHS)
    report["xf_width"] = model_and_diffusion_defaults()["xf_width"]

    from glide_text2im.tokenizer.bpe import get_encoder
    from glide_text2im.tokenizer.simple_tokenizer import SimpleTokenizer
    from glide_text2im.tokenizer.vocab import VOCAB_NAMES, vocab_file

    texts = json.loads(sys.argv[2])
    report["vocab_files"] = [vocab_file(name) for name in VOCAB_NAMES]
    report["gpt2_tokens"] = [get_encoder().encode(text) for text in texts["gpt2"]]
    report["clip_tokens"] = [SimpleTokenizer().encode(text) for text in texts["clip"]]
    print(json.dumps(report))
    """
)


def golden_tokenizer_cases() -> dict:
    """tokenizer ("gpt2", "clip") -> its 55 golden cases."""
    return {
        name: json.loads((GOLDEN_DIR / f"tokenizer_{name}.json").read_text(encoding="utf-8"))["cases"]
        for name in ("gpt2", "clip")
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the repository's packaging files and package."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"
    source.mkdir()
    for name in PACKAGING_FILES:
        if (REPO_ROOT / name).exists():
            shutil.copy2(REPO_ROOT / name, source / name)
    shutil.copytree(
        REPO_ROOT / "glide_text2im",
        source / "glide_text2im",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
         str(root / "wheel"), str(source)],
        check=True,
        cwd=root,
    )
    (wheel_path,) = (root / "wheel").glob("glide_text2im-*.whl")
    return wheel_path


@pytest.fixture(scope="module")
def installed_env(wheel, tmp_path_factory) -> Path:
    """A new virtual environment with the package installed from ``wheel``."""
    env_dir = tmp_path_factory.mktemp("installed") / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(subprocess.check_output([str(python), "-c", purelib], text=True).strip())
    (site_packages / "_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--ignore-installed", str(wheel)],
        check=True,
        cwd=env_dir,
    )
    return env_dir


@pytest.fixture(scope="module")
def probe_report(installed_env, tmp_path_factory) -> dict:
    outside = tmp_path_factory.mktemp("outside-the-repository")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "GLIDE_VOCAB_DIR")}
    texts = {name: [case["text"] for case in cases] for name, cases in golden_tokenizer_cases().items()}
    result = subprocess.run(
        [str(installed_env / "bin" / "python"), "-c", PROBE, json.dumps(PUBLIC_API), json.dumps(texts)],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_public_module_path_imports_from_the_installed_package(probe_report, installed_env):
    assert probe_report["missing"] == []
    assert set(probe_report["files"]) == set(PUBLIC_API)
    for module_name, file_name in probe_report["files"].items():
        path = Path(file_name).resolve()
        assert path.is_relative_to(installed_env.resolve()), f"{module_name} was imported from {path}"
        assert not path.is_relative_to(REPO_ROOT), f"{module_name} was imported from the source tree"


def test_installed_package_has_version_and_data(probe_report, installed_env):
    import glide_text2im

    assert probe_report["version"] == glide_text2im.__version__
    assert probe_report["version"].count(".") == 2
    config_path = Path(probe_report["clip_config_path"])
    assert config_path.is_file() and config_path.resolve().is_relative_to(installed_env.resolve())
    assert probe_report["clip_n_embd"] == 512
    assert probe_report["xf_width"] == 512
    assert probe_report["model_names"] == sorted(
        ["base", "upsample", "base-inpaint", "upsample-inpaint", "clip/image-enc", "clip/text-enc"]
    )


def test_installed_package_has_the_console_command(installed_env):
    script = installed_env / "bin" / "glide-text2im"
    assert script.is_file()
    assert "glide_text2im.cli" in script.read_text()


def test_wheel_ships_the_three_pinned_vocabularies(wheel):
    with zipfile.ZipFile(wheel) as archive:
        shipped = {
            Path(name).name: archive.read(name)
            for name in archive.namelist()
            if name.startswith("glide_text2im/tokenizer/data/")
        }
    assert sorted(shipped) == sorted(f"{name}.gz" for name in VOCAB_NAMES)
    for file_name, data in shipped.items():
        assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256[file_name], file_name


def test_installed_package_tokenizes_the_golden_cases_with_its_own_vocabularies(probe_report, installed_env):
    for path in probe_report["vocab_files"]:
        assert Path(path).resolve().is_relative_to(installed_env.resolve()), path
    golden = golden_tokenizer_cases()
    assert len(golden["gpt2"]) == len(golden["clip"]) == 55
    assert probe_report["gpt2_tokens"] == [case["tokens"] for case in golden["gpt2"]]
    assert probe_report["clip_tokens"] == [case["tokens"] for case in golden["clip"]]
