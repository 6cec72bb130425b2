"""The reference data in tests/data: small, without stored weights, and regenerating them exactly."""

import pytest
import torch

from tests.conftest import DATA_DIR, GOLDEN_DIR, load_golden
from tests.data.golden_weights import random_state_dict, regenerated_weights, state_dict_sha256, unet_state_dict

MAX_BYTES = 20_000_000
UNET_FILES = ["unet_base.pt", "unet_base_inpaint.pt", "unet_upsample.pt", "unet_upsample_inpaint.pt"]
STATE_DICT_KEYS = {"state_dict", "text_state_dict", "image_state_dict"}


def test_reference_data_stays_small():
    files = [p for p in DATA_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    total = sum(p.stat().st_size for p in files)
    assert 10_000_000 < total <= MAX_BYTES, f"tests/data holds {total} bytes"


@pytest.mark.parametrize("name", [*UNET_FILES, "clip.pt"])
def test_stored_files_hold_no_weights_but_their_checksums(name):
    stored = torch.load(GOLDEN_DIR / name, weights_only=True)
    assert not STATE_DICT_KEYS & set(stored)
    expected = {"state_dict"} if name in UNET_FILES else {"text_state_dict", "image_state_dict"}
    assert set(stored["weights_sha256"]) == expected


@pytest.mark.parametrize("name", [*UNET_FILES, "clip.pt"])
def test_regeneration_reproduces_the_checksum_of_the_original_weights(name):
    stored = torch.load(GOLDEN_DIR / name, weights_only=True)
    checksums = stored.pop("weights_sha256")
    weights = regenerated_weights(stored)
    assert {key: state_dict_sha256(sd) for key, sd in weights.items()} == checksums


def test_checksum_sees_a_change_of_seed_or_rule():
    golden = torch.load(GOLDEN_DIR / "unet_base.pt", weights_only=True)
    expected = golden["weights_sha256"]["state_dict"]
    model_weights = unet_state_dict(golden)
    assert state_dict_sha256(model_weights) == expected
    assert state_dict_sha256(unet_state_dict(dict(golden, randomization_seed=1002))) != expected
    nudged = dict(model_weights, **{"out.0.weight": model_weights["out.0.weight"] - 0.1})
    assert state_dict_sha256(nudged) != expected


def test_load_golden_gives_the_original_layout():
    unet = load_golden("unet_base.pt")
    assert set(unet) == {
        "variant", "model_class", "options", "channel_mult", "attention_ds", "in_channels", "num_params",
        "randomization_seed", "prompt", "state_dict", "inputs", "out", "text_emb",
        "out_float_timesteps_input", "out_float_timesteps",
    }  # fmt: skip
    assert len(unet["state_dict"]) == 339
    assert sum(v.numel() for v in unet["state_dict"].values()) == unet["num_params"] == 3_267_110
    assert all(v.dtype == torch.float32 for v in unet["state_dict"].values())
    clip = load_golden("clip.pt")
    assert (len(clip["text_state_dict"]), len(clip["image_state_dict"])) == (35, 38)
    assert "weights_sha256" not in clip and "weights_sha256" not in unet


def test_norm_gains_and_biases_follow_the_documented_rule():
    norm = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    weights = random_state_dict(norm, 7)
    generator = torch.Generator().manual_seed(7)
    draws = [torch.randn(v.shape, generator=generator) for v in norm.state_dict().values()]
    assert torch.equal(weights["0.weight"], draws[0] / 2.0)  # sqrt(numel / shape[0]) = sqrt(4)
    assert torch.equal(weights["0.bias"], 0.05 * draws[1])
    assert torch.equal(weights["1.weight"], 1 + 0.1 * draws[2])
    assert torch.equal(weights["1.bias"], 0.05 * draws[3])
