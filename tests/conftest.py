"""Shared fixtures: the reference data in ``tests/data`` (see ``tests/data/README.md``).

Everything the tests read lives in the repository: the golden vectors (``tests/data/golden``),
the checkpoint spec (``tests/data/spec``) and the tokenizer vocabularies, which ship inside
the package (``glide_text2im/tokenizer/data``). The golden U-Net and CLIP weights are not
stored; ``load_golden`` regenerates them from their seeds.
"""

from pathlib import Path

import pytest
import torch

from glide_text2im.tokenizer.vocab import PACKAGED_VOCAB_DIR
from tests.data.golden_weights import regenerated_weights, state_dict_sha256

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "tests" / "data"
GOLDEN_DIR = DATA_DIR / "golden"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    return DATA_DIR / "spec"


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    """The package's own copy of the three vocabulary files (``*.gz``)."""
    return Path(PACKAGED_VOCAB_DIR)


def load_golden(name: str) -> dict:
    """Load ``tests/data/golden/<name>`` (a ``.pt`` file) with ``weights_only=True``.

    For the U-Net and CLIP files the regenerated weights are filled in under the keys the
    original files had (``state_dict``; ``text_state_dict`` / ``image_state_dict``) after
    checking them against the sha256 stored in the file."""
    golden = torch.load(GOLDEN_DIR / name, weights_only=True)
    expected = golden.pop("weights_sha256", None)
    if expected is None:
        return golden
    weights = regenerated_weights(golden)
    for key, state_dict in weights.items():
        if state_dict_sha256(state_dict) != expected[key]:
            raise AssertionError(f"golden/{name}: the regenerated {key} does not match its stored sha256")
    golden.update(weights)
    return golden
