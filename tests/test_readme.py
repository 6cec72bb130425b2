"""Every command in README.md is run here or by CI, offline.

The README's fenced ``bash`` and ``python`` blocks are grouped by the heading they stand under,
and each such section has a check below; a section with commands and no check fails
``test_every_readme_section_with_commands_is_checked``, so a new command cannot go unnoticed.

- "Install" (``pip install .``): tests/test_package.py installs a copy of the repository with
  pip into a fresh virtual environment (``--no-deps --no-build-isolation``: the dependencies
  come from the test environment), and .ci/run installs it, with the test extra, into a
  fresh one with its dependencies.
- "The low-level API, as in the original notebooks": run in-process; the official
  checkpoint names and default options are patched to tiny random weights (no download);
  run again with ``demo = True`` on the shipped demo weights (offline, unpatched).
- "Weights and vocabularies": the shell lines run in bash with ``$HOME`` in a temporary
  folder; the Python block runs in a folder holding ``glide-weights/base.pt`` (tiny) and
  ``vocab/`` (the reference vocabulary).
- "Checkpoint files: `.pt` and `.safetensors`": the ``convert`` lines run, in a folder holding
  ``my.pt`` (tiny) and its options sidecar, through the command's entry point.
- "Running the tests": the lines must be exactly commands that .ci/run runs.
- "One call: pipelines and the `glide-text2im` command": the Python block runs in-process on
  tiny random weights put in place of the official names; the command lines (which download
  the official weights) are parsed by the command's own parser, and tests/test_cli.py runs
  every subcommand for real on local weights.
"""

import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image

from glide_text2im import download
from glide_text2im.tokenizer.bpe import get_encoder
from glide_text2im.tokenizer.simple_tokenizer import SimpleTokenizer
from tests.conftest import REPO_ROOT
from tests.notebook_scripts.tiny_weights import (
    tiny_options,
    tiny_state_dict,
    use_tiny_official_weights,
    write_notebook_weights,
)

README = REPO_ROOT / "README.md"
CI_SCRIPT = REPO_ROOT / ".ci" / "run"

INSTALL = "Install"
QUICK_START = "The low-level API, as in the original notebooks"
LOCAL_FILES = "Weights and vocabularies"
TESTS = "Running the tests"
PIPELINES = "One call: pipelines and the `glide-text2im` command"
DEMO = "Offline demo model"
FORMATS = "Checkpoint files: `.pt` and `.safetensors`"
CHECKED_SECTIONS = {INSTALL, QUICK_START, LOCAL_FILES, TESTS, PIPELINES, DEMO, FORMATS}


def readme_blocks() -> Dict[str, List[tuple]]:
    """heading -> [(language, code), ...] for the fenced code blocks under it."""
    blocks: Dict[str, List[tuple]] = {}
    heading, language, lines = None, None, []
    for line in README.read_text(encoding="utf-8").splitlines():
        fence = re.match(r"^```(\w*)\s*$", line)
        if language is None and fence:
            language, lines = fence.group(1) or "text", []
        elif language is not None and line.startswith("```"):
            blocks.setdefault(heading, []).append((language, "\n".join(lines) + "\n"))
            language = None
        elif language is not None:
            lines.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


def block(section: str, language: str) -> str:
    (code,) = [code for lang, code in readme_blocks()[section] if lang == language]
    return code


def commands(code: str) -> List[str]:
    """The shell commands of a block: its lines without comments and blank lines."""
    return [line.split("#")[0].strip() for line in code.splitlines() if line.split("#")[0].strip()]


def ci_commands() -> List[List[str]]:
    """The commands .ci/run runs through its ``step NAME COMMAND...`` lines, as argv lists."""
    steps = [shlex.split(line)[2:] for line in CI_SCRIPT.read_text().splitlines() if line.startswith("step ")]
    return [argv for argv in steps if argv]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    return write_notebook_weights(tmp_path_factory.mktemp("tiny-weights"))


def test_every_readme_section_with_commands_is_checked():
    sections = {heading for heading, blocks in readme_blocks().items() if any(lang != "text" for lang, _ in blocks)}
    assert sections == CHECKED_SECTIONS, "a README section with commands has no check in tests/test_readme.py"
    languages = {lang for blocks in readme_blocks().values() for lang, _ in blocks}
    assert languages <= {"bash", "python"}


def section_text(section: str) -> str:
    """The README text under heading ``section``, up to the next heading, on one line."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {section}\n")
    return " ".join(re.split(r"\n#", text[start + len(section) + 4 :])[0].split())


def test_install_command_is_the_one_ci_runs_with_the_test_extra():
    assert commands(block(INSTALL, "bash")) == ["pip install ."]
    assert ["pip", "install", ".[test]"] in ci_commands()
    cpu_torch = "`pip install torch --index-url https://download.pytorch.org/whl/cpu`"
    assert f"install the CPU-only PyTorch build first, with {cpu_torch}, and then the package" in section_text(INSTALL)


def test_test_commands_are_exactly_what_ci_runs():
    readme_commands = commands(block(TESTS, "bash"))
    assert readme_commands == ['pip install ".[test]"', "python -m pytest"]
    for command in readme_commands:
        assert shlex.split(command) in ci_commands(), f"{command!r} is not run by .ci/run"


def test_quick_start_generates_a_256_image_from_its_seeded_generator(tiny_weights, tmp_path, monkeypatch):
    loaded = use_tiny_official_weights(monkeypatch, tiny_weights)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(block(QUICK_START, "python"), str(README), "exec"), namespace)

    assert loaded == ["base", "upsample"]
    generator = namespace["generator"]
    assert generator.initial_seed() == 0
    assert not torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state()), "unused generator"
    image = np.asarray(Image.open(tmp_path / "sample.png"))
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    assert image.std() > 10
    assert namespace["diffusion"].num_timesteps == 100 and namespace["diffusion_up"].num_timesteps == 27


def test_quick_start_with_demo_true_runs_offline_on_the_demo_weights(tmp_path, monkeypatch):
    from glide_text2im.demo.judge import judge

    code = block(QUICK_START, "python")
    assert code.count("\ndemo = False  #") == 1
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLIDE_CACHE_DIR", str(tmp_path / "empty-cache"))  # nothing to download
    namespace = {"__name__": "__main__"}
    exec(compile(code.replace("\ndemo = False  #", "\ndemo = True  #"), str(README), "exec"), namespace)

    assert (namespace["base_name"], namespace["upsample_name"]) == ("demo/base", "demo/upsample")
    assert namespace["options"]["prediction"] == "v" and namespace["options"]["tokenizer"] == "byte"
    image = np.asarray(Image.open(tmp_path / "sample.png"))
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    seen = judge(image)
    assert (seen.colour, seen.background) == ("red", "black"), seen  # the prompt's colours
    assert not (tmp_path / "empty-cache").exists()


def test_cache_and_vocab_variables_take_effect(tmp_path, vocab_dir):
    vocab_copy = tmp_path / "models" / "glide-vocab"
    vocab_copy.mkdir(parents=True)
    for path in vocab_dir.glob("*.gz"):
        (vocab_copy / path.name).symlink_to(path)
    probe = (
        "from glide_text2im.download import default_cache_dir\n"
        "from glide_text2im.tokenizer.bpe import get_encoder\n"
        "from glide_text2im.tokenizer.simple_tokenizer import SimpleTokenizer\n"
        "print(default_cache_dir())\n"
        "print(get_encoder().encode('a corgi'), SimpleTokenizer().encode('a corgi'))\n"
    )
    script = block(LOCAL_FILES, "bash") + f"{shlex.quote(sys.executable)} -c {shlex.quote(probe)}\n"
    env = {k: v for k, v in os.environ.items() if k not in ("GLIDE_CACHE_DIR", "GLIDE_VOCAB_DIR", "XDG_CACHE_HOME")}
    env["HOME"] = str(tmp_path)

    result = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    cache_dir, tokens = result.stdout.splitlines()
    assert cache_dir == str(tmp_path / "models" / "glide")
    expected_tokens = (get_encoder(vocab_dir=str(vocab_dir)).encode("a corgi"), SimpleTokenizer().encode("a corgi"))
    assert tokens == "{} {}".format(*expected_tokens)
    assert not (tmp_path / "models" / "glide").exists(), "nothing may be downloaded"


def test_local_files_snippet_reads_checkpoints_and_vocabulary_from_folders(tmp_path, vocab_dir, monkeypatch, capsys):
    (tmp_path / "glide-weights").mkdir()
    torch.save(tiny_state_dict("base"), tmp_path / "glide-weights" / "base.pt")
    (tmp_path / "vocab").mkdir()
    for name in ("encoder.json.gz", "vocab.bpe.gz"):
        (tmp_path / "vocab" / name).symlink_to(vocab_dir / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GLIDE_CACHE_DIR", raising=False)
    monkeypatch.delenv("GLIDE_VOCAB_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # The tiny file stands in for the official base.pt, whose pinned size it does not have.
    monkeypatch.delitem(download.OFFICIAL_SIZES, "base")

    namespace = {"__name__": "__main__"}
    exec(compile(block(LOCAL_FILES, "python"), str(README), "exec"), namespace)

    assert capsys.readouterr().out == f"{tmp_path / 'xdg' / 'glide_text2im'}\n"
    expected = tiny_state_dict("base")
    assert namespace["weights"].keys() == expected.keys()
    assert all(torch.equal(namespace["weights"][k], expected[k]) for k in expected)
    digest = hashlib.sha256((tmp_path / "glide-weights" / "base.pt").read_bytes()).hexdigest()
    assert (tmp_path / "glide-weights" / "base.pt.sha256").read_text() == f"{digest}  base.pt\n"
    assert namespace["encoder"].decode(namespace["encoder"].encode("A Corgi")) == "a corgi"
    assert not (tmp_path / "xdg").exists(), "nothing may be downloaded"


def test_pipeline_example_writes_one_image_per_prompt_and_seed(tiny_weights, tmp_path, monkeypatch):
    import glide_text2im.pipelines.loading as loading

    loaded = []

    def load_checkpoint(name, device, progress=True, cache_dir=None, chunk_size=4096):
        loaded.append(name)
        return torch.load(tiny_weights / f"{name}.pt", map_location=device, weights_only=True)

    for name in ("base", "upsample"):
        monkeypatch.setitem(loading.CHECKPOINT_OPTIONS, name, lambda name=name: tiny_options(name))
    monkeypatch.setattr(loading, "load_checkpoint", load_checkpoint)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    exec(compile(block(PIPELINES, "python"), str(README), "exec"), namespace)

    assert loaded == ["base", "upsample"]
    out = namespace["out"]
    assert out.seeds == [0, 0, 1, 1]
    assert out.prompts == ["an oil painting of a corgi"] * 2 + ["a red cube on top of a blue sphere"] * 2
    images = [np.asarray(Image.open(tmp_path / f"glide-{i}.png")) for i in range(4)]
    assert all(image.shape == (256, 256, 3) and image.std() > 10 for image in images)
    assert not np.array_equal(images[0], images[1]), "two images of one prompt must differ"


def test_pipeline_command_lines_parse():
    from glide_text2im.cli import build_parser

    parser = build_parser()
    lines = [line.split("#")[0].strip() for line in block(PIPELINES, "bash").splitlines() if line.strip()]
    assert len(lines) == 6
    for line in lines:
        argv = shlex.split(line)
        if argv[0] == "torchrun":
            assert argv[1:4] == ["--nproc_per_node", "2", "-m"] and argv[4] == "glide_text2im"
            argv = argv[4:]
        assert argv[0] in ("glide-text2im", "glide_text2im")
        args = parser.parse_args(argv[1:])
        assert callable(args.func)


def test_demo_example_draws_a_256_image_offline_with_the_package_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLIDE_CACHE_DIR", str(tmp_path / "empty-cache"))  # nothing to download
    namespace = {"__name__": "__main__"}
    exec(compile(block(DEMO, "python"), str(README), "exec"), namespace)

    assert namespace["pipe"].base.name == "demo/base"
    image = np.asarray(Image.open(tmp_path / "demo.png"))
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    assert image.std() > 10
    assert not (tmp_path / "empty-cache").exists()


def test_convert_lines_write_safetensors_and_back_with_the_same_tensors(tmp_path, monkeypatch):
    from glide_text2im.checkpoint_io import is_safetensors_file, read_state_dict
    from glide_text2im.cli import main
    from glide_text2im.pipelines.loading import save_options

    torch.save(tiny_state_dict("base"), tmp_path / "my.pt")
    save_options(str(tmp_path / "my.pt"), tiny_options("base"))
    monkeypatch.chdir(tmp_path)
    lines = commands(block(FORMATS, "bash"))
    assert [shlex.split(line)[:2] for line in lines] == [["glide-text2im", "convert"]] * 2
    for line in lines:
        assert main(shlex.split(line)[1:]) == 0, line

    assert is_safetensors_file(str(tmp_path / "my.safetensors"))
    assert (tmp_path / "my.safetensors.json").read_text() == (tmp_path / "my.pt.json").read_text()
    assert not is_safetensors_file(str(tmp_path / "back.pt"))
    expected = tiny_state_dict("base")
    for name in ("my.safetensors", "back.pt"):
        weights = read_state_dict(str(tmp_path / name))
        assert weights.keys() == expected.keys(), name
        assert all(torch.equal(weights[k], expected[k]) for k in expected), name
