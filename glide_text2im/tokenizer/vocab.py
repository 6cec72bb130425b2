"""The tokenizers' vocabulary files: found in a folder the user names, else downloaded once.

Lookup order for a file `name` (e.g. `encoder.json`):
1. the folder given as `vocab_dir`, else `$GLIDE_VOCAB_DIR`: `name` or `name.gz`;
2. the cache folder `<default_cache_dir()>/vocab`, where the file is downloaded from its public
   home (`VOCAB_URLS`) on first use and checked against its published sha256.
Every copy read is verified: the sha256 of its (decompressed) content must be `VOCAB_SHA256[name]`.
"""

import gzip
import hashlib
import os
import zlib
from typing import Optional

import blobfile as bf

from glide_text2im.download import DownloadError, IntegrityError, default_cache_dir, fetch_file_cached, is_cloud_path

ENCODER_JSON = "encoder.json"
VOCAB_BPE = "vocab.bpe"
CLIP_BPE = "bpe_simple_vocab_16e6.txt"

# Where each file is downloaded from; the last URL component is the cached file name.
VOCAB_URLS = {
    ENCODER_JSON: "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    VOCAB_BPE: "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    CLIP_BPE: "https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz",
}

# sha256 of each file as content (plain name) and as the gzip file GLIDE ships (`.gz` name).
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


def vocab_cache_dir() -> str:
    """`<default_cache_dir()>/vocab`: where downloaded vocabulary files are kept."""
    base = default_cache_dir()
    return base.rstrip("/") + "/vocab" if is_cloud_path(base) else os.path.join(base, "vocab")


def vocab_file(name: str, vocab_dir: Optional[str] = None, progress: bool = True) -> str:
    """Path of a copy of vocabulary file `name` (one of `VOCAB_URLS`), downloading it if needed."""
    if name not in VOCAB_URLS:
        raise ValueError(f"unknown vocabulary file {name!r}: expected one of {', '.join(VOCAB_URLS)}")
    directory = resolve_vocab_dir(vocab_dir)
    if directory is not None:
        for candidate in (name, name + ".gz"):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                return path
    url = VOCAB_URLS[name]
    try:
        return fetch_file_cached(
            url, progress=progress, cache_dir=vocab_cache_dir(), sha256=VOCAB_SHA256[os.path.basename(url)]
        )
    except DownloadError as exc:
        raise DownloadError(
            f"{exc}\n  Alternatively put {name} or {name}.gz in a folder and pass it as vocab_dir "
            "or set $GLIDE_VOCAB_DIR to it."
        ) from exc


def read_vocab(name: str, vocab_dir: Optional[str] = None) -> str:
    """The verified UTF-8 text of vocabulary file `name` (see `vocab_file` for where it comes from)."""
    return read_vocab_file(vocab_file(name, vocab_dir), name)


def read_vocab_file(path: str, name: str) -> str:
    """The text of `path`, a copy of vocabulary file `name` (gzip-compressed if it ends in `.gz`),
    after checking that its content has the sha256 `VOCAB_SHA256[name]`."""
    with (bf.BlobFile(path, "rb") if is_cloud_path(path) else open(path, "rb")) as f:
        data = f.read()
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise IntegrityError(f"{path} is not a valid gzip copy of {name}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256[name]:
        raise IntegrityError(
            f"{path} is not a copy of {name}: the sha256 of its {'decompressed ' if path.endswith('.gz') else ''}"
            f"content is {digest}, expected {VOCAB_SHA256[name]}. Replace it with the file from {VOCAB_URLS[name]}."
        )
    return data.decode("utf-8")
