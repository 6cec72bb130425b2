"""The tokenizers' vocabulary files: shipped inside the package, or read from a folder the user names.

Lookup order for a file `name` (e.g. `encoder.json`):
1. the folder given as `vocab_dir`, else `$GLIDE_VOCAB_DIR`: `name` or `name.gz` (the file must
   be there once a folder is named);
2. otherwise the package's own gzip copy in `PACKAGED_VOCAB_DIR` (`glide_text2im/tokenizer/data`).
Nothing is downloaded. Every copy read is verified: the sha256 of its (decompressed) content must
be `VOCAB_SHA256[name]`; the packaged copy must also be byte-identical to the shipped file
(`VOCAB_SHA256[name + ".gz"]`).
"""

import gzip
import hashlib
import os
import zlib
from typing import Optional

import blobfile as bf

from glide_text2im.download import IntegrityError, is_cloud_path

ENCODER_JSON = "encoder.json"
VOCAB_BPE = "vocab.bpe"
CLIP_BPE = "bpe_simple_vocab_16e6.txt"
VOCAB_NAMES = (ENCODER_JSON, VOCAB_BPE, CLIP_BPE)

PACKAGED_VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# sha256 of each file as content (plain name) and as the gzip file GLIDE ships (`.gz` name).
# The content hashes of encoder.json and vocab.bpe are GPT-2's published ones (the same as
# tiktoken pins); the CLIP `.gz` is the file OpenAI's CLIP repository ships.
VOCAB_SHA256 = {
    ENCODER_JSON: "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ENCODER_JSON + ".gz": "4debc1cf25180021b07744bc9f4488d53c7bf112c8ce5de8097c6a7518f4ec7c",
    VOCAB_BPE: "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    VOCAB_BPE + ".gz": "ce239dd5a898827423fee00e3f7ab37de7900f247f2ba360753d860e8a46524d",
    CLIP_BPE: "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8",
    CLIP_BPE + ".gz": "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
}


def resolve_vocab_dir(vocab_dir: Optional[str] = None) -> Optional[str]:
    """The absolute folder named by `vocab_dir` or `$GLIDE_VOCAB_DIR`, or None if neither is set."""
    vocab_dir = vocab_dir or os.environ.get("GLIDE_VOCAB_DIR") or None
    if vocab_dir is None:
        return None
    vocab_dir = os.path.abspath(os.path.expanduser(os.fspath(vocab_dir)))
    if not os.path.isdir(vocab_dir):
        raise ValueError(f"vocabulary folder {vocab_dir} (from vocab_dir or $GLIDE_VOCAB_DIR) is not a directory")
    return vocab_dir


def vocab_file(name: str, vocab_dir: Optional[str] = None) -> str:
    """Path of a copy of vocabulary file `name` (one of `VOCAB_NAMES`): in the named folder
    (`vocab_dir`, else `$GLIDE_VOCAB_DIR`) if one is given, else the packaged copy."""
    if name not in VOCAB_NAMES:
        raise ValueError(f"unknown vocabulary file {name!r}: expected one of {', '.join(VOCAB_NAMES)}")
    directory = resolve_vocab_dir(vocab_dir)
    if directory is None:
        return os.path.join(PACKAGED_VOCAB_DIR, name + ".gz")
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"vocabulary folder {directory} (from vocab_dir or $GLIDE_VOCAB_DIR) has neither {name} nor {name}.gz; "
        "put the file there, or name no folder to use the copy shipped with the package"
    )


def read_vocab(name: str, vocab_dir: Optional[str] = None) -> str:
    """The verified UTF-8 text of vocabulary file `name` (see `vocab_file` for where it comes from)."""
    return read_vocab_file(vocab_file(name, vocab_dir), name)


def read_vocab_file(path: str, name: str) -> str:
    """The text of `path`, a copy of vocabulary file `name` (gzip-compressed if it ends in `.gz`),
    after checking that its content has the sha256 `VOCAB_SHA256[name]` (and, for the packaged
    copy, that the file itself is the shipped one)."""
    with (bf.BlobFile(path, "rb") if is_cloud_path(path) else open(path, "rb")) as f:
        data = f.read()
    if not is_cloud_path(path) and os.path.abspath(path) == os.path.join(PACKAGED_VOCAB_DIR, name + ".gz"):
        digest = hashlib.sha256(data).hexdigest()
        if digest != VOCAB_SHA256[name + ".gz"]:
            raise IntegrityError(
                f"the package's copy of {name}.gz ({path}) is damaged: its sha256 is {digest}, expected "
                f"{VOCAB_SHA256[name + '.gz']}; reinstall glide-text2im"
            )
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise IntegrityError(f"{path} is not a valid gzip copy of {name}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256[name]:
        raise IntegrityError(
            f"{path} is not a copy of {name}: the sha256 of its {'decompressed ' if path.endswith('.gz') else ''}"
            f"content is {digest}, expected {VOCAB_SHA256[name]}"
        )
    return data.decode("utf-8")
