"""The checkpoints shipped in the package (``glide_text2im.bundled``) load by name, and the
product code stays apart from the demo's dataset, judge and training code
(``glide_text2im.demo``): no product module imports it, and no modules import each other."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest
import torch

from glide_text2im import bundled, demo
from glide_text2im.download import checkpoint_path, known_checkpoints, load_checkpoint, register_checkpoint
from glide_text2im.model_creation import create_model_and_diffusion

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "glide_text2im"
DEMO = "glide_text2im.demo"


def module_files() -> Dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imported_modules(name: str, path: Path, top_level_only: bool) -> Set[str]:
    """The absolute names that module ``name`` (file ``path``) imports, relative imports resolved;
    ``from a import b`` gives both ``a`` and ``a.b`` (``b`` may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def is_demo(name: str) -> bool:
    return name == DEMO or name.startswith(DEMO + ".")


def import_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The groups of two or more modules that import each other, directly or in a ring."""
    reaches = {name: set() for name in graph}
    for start in graph:
        todo = list(graph[start])
        while todo:
            name = todo.pop()
            if name not in reaches[start]:
                reaches[start].add(name)
                todo.extend(graph[name])
    groups = {frozenset(other for other in reaches[name] if name in reaches[other]) for name in graph}
    return sorted(sorted(group) for group in groups if len(group) > 1)


def test_no_product_module_imports_the_demo():
    """Only glide_text2im/demo/ itself may import glide_text2im.demo, lazily or not."""
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(filter(is_demo, imported_modules(name, path, top_level_only=False)))
        for name, path in module_files().items()
        if not is_demo(name)
    }
    offenders = {file: names for file, names in offenders.items() if names}
    assert offenders == {}, f"product modules that import the demo: {offenders}"


def test_the_package_has_no_import_cycle():
    files = module_files()
    graph = {
        name: {other for other in imported_modules(name, path, top_level_only=True) if other in files and other != name}
        for name, path in files.items()
    }
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the finder finds
    assert import_cycles(graph) == []


@pytest.mark.parametrize(
    "module", ["glide_text2im.bundled", "glide_text2im.download", "glide_text2im.pipelines", "glide_text2im.cli"]
)
def test_importing_the_checkpoint_modules_leaves_the_demo_unimported(module):
    code = f"import json, sys, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('glide_text2im'))))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert module in loaded and not any(map(is_demo, loaded)), loaded
    if module == "glide_text2im.bundled":
        assert loaded == ["glide_text2im", "glide_text2im.bundled"]


def test_bundled_checkpoints_are_known_and_resolve_to_the_package_data():
    names = ["demo/base", "demo/upsample", "demo/base-inpaint", "demo/clip/image-enc", "demo/clip/text-enc"]
    assert sorted(bundled.CHECKPOINT_FILES) == sorted(names)
    assert set(names) <= set(known_checkpoints())
    for name in names:
        assert checkpoint_path(name) == os.path.join(PACKAGE, "demo", "weights", bundled.CHECKPOINT_FILES[name])
        assert os.path.isfile(checkpoint_path(name))
    with pytest.raises(ValueError, match="already a checkpoint shipped in the package"):
        register_checkpoint("demo/base", lambda: "elsewhere.pt")
    assert checkpoint_path("demo/base").endswith("base.safetensors")


def test_bundled_base_loads_by_name_into_a_model_of_its_options():
    state = load_checkpoint("demo/base", "cpu")
    assert len(state) == 315 and sum(v.numel() for v in state.values()) == 1_774_790
    assert state["token_embedding.weight"].shape == (257, 64)  # the byte vocabulary, xf_width 64
    assert state["input_blocks.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["out.2.weight"].shape == (6, 32, 3, 3)  # eps / v and the variance interpolation
    options = bundled.options("demo/base")
    assert (options["tokenizer"], options["image_size"], options["text_ctx"]) == ("byte", 64, 96)
    model, _ = create_model_and_diffusion(**options)
    model.load_state_dict(state)  # strict: the same keys and shapes
    assert torch.equal(model.token_embedding.weight.to(torch.float16), state["token_embedding.weight"])


def test_the_demo_package_keeps_its_public_names():
    assert demo.options is bundled.options and demo.weights_path is bundled.weights_path
    assert demo.demo_equivalent is bundled.demo_equivalent and demo.clip_config_path is bundled.clip_config_path
    assert demo.CHECKPOINT_FILES is bundled.CHECKPOINT_FILES and demo.UNET_CHECKPOINTS is bundled.UNET_CHECKPOINTS
    assert demo.demo_equivalent("base") == "demo/base" and demo.demo_equivalent("upsample-inpaint") is None
    assert demo.demo_equivalent("my.pt") == "my.pt" and demo.demo_equivalent(None) is None
    assert demo.clip_config_path() == bundled.weights_path("demo/clip/image-enc") + ".yaml"
    from glide_text2im.demo.clip_tokenizer import ByteCLIPTokenizer
    from glide_text2im.tokenizer.byte import ByteCLIPTokenizer as moved

    assert ByteCLIPTokenizer is moved


def test_bad_bundled_names_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^unknown bundled checkpoint 'demo/nope'; expected one of \[") as info:
        bundled.weights_path("demo/nope")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="'demo/clip/text-enc' is not a bundled U-Net"):
        bundled.options("demo/clip/text-enc")
