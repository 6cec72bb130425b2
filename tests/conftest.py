"""Shared fixtures: where the reference data in ``../shared`` lives.

The golden vectors, the checkpoint spec and the tokenizer vocabularies are not part of the
repository. They are looked up in ``$GLIDE_SHARED_DIR`` or, by default, in the ``shared``
folder beside the repository checkout. A test that needs them fails with a clear message
when they are missing.
"""

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("GLIDE_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()

# The package reads its vocabularies from here instead of downloading them.
os.environ.setdefault("GLIDE_VOCAB_DIR", str(SHARED_DIR / "vocab"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"reference data {path} is missing: put the project's 'shared' folder beside the "
            "repository or point GLIDE_SHARED_DIR at it",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED_DIR)


@pytest.fixture(scope="session")
def golden_dir(shared_dir: Path) -> Path:
    return _require(shared_dir / "golden")


@pytest.fixture(scope="session")
def spec_dir(shared_dir: Path) -> Path:
    return _require(shared_dir / "spec")


@pytest.fixture(scope="session")
def vocab_dir(shared_dir: Path) -> Path:
    return _require(shared_dir / "vocab")


def load_golden(name: str) -> dict:
    """Load ``golden/<name>`` (a ``.pt`` file) with ``weights_only=True``."""
    return torch.load(_require(SHARED_DIR / "golden" / name), weights_only=True)
