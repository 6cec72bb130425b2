"""Rebuild ``tests/data`` from a reference-data folder (the project's former ``shared`` folder).

    python -m tests.data.build_golden /path/to/shared

run from the repository root. It copies the tokenizer, diffusion and sampling golden files
and the checkpoint-spec JSONs byte for byte, and writes the U-Net and CLIP golden files
without their state dicts. Before writing anything it checks that ``golden_weights``
regenerates every stripped state dict exactly (``torch.equal`` on every key, same key order);
each stripped file records the sha256 of its weights (``weights_sha256``) so a later change
of the procedure is caught. Prints the sha256 of every source file it read.
"""

import argparse
import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Dict

import torch

from tests.data.golden_weights import regenerated_weights, state_dict_sha256

DATA_DIR = Path(__file__).resolve().parent

COPIED = {
    "golden": ["tokenizer_gpt2.json", "tokenizer_clip.json", "diffusion.pt", "sampling.pt"],
    "spec": [
        "checkpoints.json",
        "defaults.json",
        "fp16_dtypes.json",
        "base.json",
        "base_inpaint.json",
        "upsample.json",
        "upsample_inpaint.json",
        "clip_image_enc.json",
        "clip_text_enc.json",
    ],
}
STRIPPED = ["unet_base.pt", "unet_base_inpaint.pt", "unet_upsample.pt", "unet_upsample_inpaint.pt", "clip.pt"]


def strip_weights(source: Path) -> dict:
    """The golden file ``source`` without its state dicts, plus their sha256 under
    ``weights_sha256``; fails unless the regenerated weights equal the stored ones exactly."""
    golden = torch.load(source, weights_only=True)
    regenerated = regenerated_weights(golden)
    checksums: Dict[str, str] = {}
    for key, weights in regenerated.items():
        stored = golden.pop(key)
        if list(stored) != list(weights):
            raise SystemExit(f"{source}: regenerated {key} has other keys (or key order) than the stored one")
        differing = [name for name in stored if not torch.equal(stored[name], weights[name])]
        if differing:
            raise SystemExit(f"{source}: regenerated {key} differs from the stored one at {differing[0]}")
        checksums[key] = state_dict_sha256(stored)
    golden["weights_sha256"] = checksums
    return golden


def write_atomically(target: Path, data: bytes) -> None:
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, target)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shared", type=Path, help="folder holding golden/ and spec/")
    shared = parser.parse_args().shared.resolve()

    stripped = {name: strip_weights(shared / "golden" / name) for name in STRIPPED}  # check all first

    for folder in COPIED:
        (DATA_DIR / folder).mkdir(exist_ok=True)
    for name, golden in stripped.items():
        buffer = io.BytesIO()  # saved through memory: the archive's inner folder name is then fixed
        torch.save(golden, buffer)
        write_atomically(DATA_DIR / "golden" / name, buffer.getvalue())
        print(f"{file_sha256(shared / 'golden' / name)}  golden/{name} (stripped)")
    for folder, names in COPIED.items():
        for name in names:
            source = shared / folder / name
            write_atomically(DATA_DIR / folder / name, source.read_bytes())
            print(f"{file_sha256(source)}  {folder}/{name}")


if __name__ == "__main__":
    sys.exit(main())
