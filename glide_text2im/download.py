"""Named GLIDE checkpoints and a careful cached downloader.

`load_checkpoint(name, device)` resolves a checkpoint name (or a file path) to a local file,
downloading official checkpoints once into a per-user cache, and returns the state dict.
The checkpoints shipped inside the package (`glide_text2im.bundled`: "demo/base", ...) are
local files and load by name offline.

Each download is streamed under a file lock into a temporary file of its own beside the final
file, resumed with an HTTP `Range` request when the connection drops, checked (announced
length, not an HTML page, the sha256 when one is given, and for a checkpoint: a state dict
that `checkpoint_io.read_state_dict` reads, of the official size for an official name) and
only then renamed to the final name. Every failure removes the temporary file, so nothing
half-written or wrong ever appears in the cache. Official checkpoint hashes are not
published: the sha256 of the first complete download is stored in `<file>.sha256` and every
later use is checked against it. Every error message is one line.
"""

import errno
import functools
import hashlib
import os
import tempfile
import urllib.parse
from typing import BinaryIO, Callable, Dict, Optional, Tuple, Union

import blobfile as bf
import requests
import torch
import urllib3
from filelock import FileLock
from tqdm.auto import tqdm

from glide_text2im import bundled
from glide_text2im.checkpoint_io import (
    CHECKPOINT_SUFFIXES,
    CheckpointError,
    StateDict,
    first_line,
    read_state_dict,
    read_torch_file,
    temporary_path,
)

MODEL_PATHS: Dict[str, str] = {
    "base": "https://openaipublic.blob.core.windows.net/diffusion/dec-2021/base.pt",
    "upsample": "https://openaipublic.blob.core.windows.net/diffusion/dec-2021/upsample.pt",
    "base-inpaint": "https://openaipublic.blob.core.windows.net/diffusion/dec-2021/base_inpaint.pt",
    "upsample-inpaint": "https://openaipublic.blob.core.windows.net/diffusion/dec-2021/upsample_inpaint.pt",
    "clip/image-enc": "https://openaipublic.blob.core.windows.net/diffusion/dec-2021/clip_image_enc.pt",
    "clip/text-enc": "https://openaipublic.blob.core.windows.net/diffusion/dec-2021/clip_text_enc.pt",
}

# (state-dict entries, total tensor elements) of each official checkpoint: the
# `num_state_dict_entries` and `num_state_dict_elements` of tests/data/spec/<file>.json, the
# layouts of the modules the official notebooks load these files into strictly (so the files
# hold exactly these). The official sha256 values are not published, so none is pinned.
OFFICIAL_SIZES: Dict[str, Tuple[int, int]] = {
    "base": (783, 385_030_726),
    "upsample": (797, 398_361_286),
    "base-inpaint": (783, 385_037_638),
    "upsample-inpaint": (797, 398_368_198),
    "clip/image-enc": (188, 86_443_776),
    "clip/text-enc": (185, 71_679_488),
}

# Checkpoints that are local files: name -> function returning the path. The checkpoints
# shipped in the package (`bundled`, "demo/base", ...) are there from the start;
# `register_checkpoint` adds users' own.
LOCAL_CHECKPOINTS: Dict[str, Callable[[], str]] = {
    name: functools.partial(bundled.weights_path, name) for name in bundled.CHECKPOINT_FILES
}

CONNECT_TIMEOUT = 10.0  # seconds to establish a connection; an offline machine fails at once
READ_TIMEOUT = 60.0  # seconds without a byte before a stalled download counts as dropped
MAX_ATTEMPTS = 5  # one download plus resumes, each only after the previous one made progress

_CLOUD_PREFIXES = ("gs://", "az://")
_HASH_BLOCK = 1 << 20
_HTML_STARTS = (b"<!doctype html", b"<html")
_HTML_REASON = "the server sent an HTML page instead of the file (a login, portal or error page?)"


class DownloadError(RuntimeError):
    """A file could not be downloaded (unreachable server, HTTP error, incomplete body)."""


class CacheWriteError(DownloadError):
    """A download could not be written into the cache folder (disk full, no permission)."""


class IntegrityError(RuntimeError):
    """A file's content is not what it must be (sha256 mismatch, unreadable checkpoint)."""


def default_cache_dir() -> str:
    """`$GLIDE_CACHE_DIR`, else `$XDG_CACHE_HOME/glide_text2im`, else `~/.cache/glide_text2im`."""
    if os.environ.get("GLIDE_CACHE_DIR"):
        return os.path.expanduser(os.environ["GLIDE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "glide_text2im")


def is_cloud_path(path: str) -> bool:
    """True for `gs://` and `az://` paths, which are read and written through blobfile."""
    return path.startswith(_CLOUD_PREFIXES)


def register_checkpoint(name: str, resolver: Callable[[], str]) -> None:
    """Make `load_checkpoint(name, ...)` load the local file whose path `resolver()` returns."""
    if name in MODEL_PATHS:
        raise ValueError(f"checkpoint name {name!r} is already an official checkpoint")
    if name in bundled.CHECKPOINT_FILES:
        raise ValueError(f"checkpoint name {name!r} is already a checkpoint shipped in the package")
    LOCAL_CHECKPOINTS[name] = resolver


def known_checkpoints() -> list:
    """All checkpoint names `load_checkpoint` accepts."""
    return sorted(MODEL_PATHS) + sorted(LOCAL_CHECKPOINTS)


def checkpoint_path(
    name: str,
    progress: bool = True,
    cache_dir: Optional[str] = None,
    chunk_size: int = 4096,
) -> str:
    """The file of checkpoint `name` (official name, name of a checkpoint shipped in the package
    or registered with `register_checkpoint`, or existing file path), downloaded into the
    cache first when needed."""
    if name in LOCAL_CHECKPOINTS:
        return LOCAL_CHECKPOINTS[name]()
    if name in MODEL_PATHS:
        url = MODEL_PATHS[name]
        check = functools.partial(_check_official_file, name)
        try:
            return fetch_file_cached(url, progress=progress, cache_dir=cache_dir, chunk_size=chunk_size, check=check)
        except CacheWriteError:
            raise
        except DownloadError as exc:
            raise DownloadError(
                f"{exc}, or set $GLIDE_CACHE_DIR (or pass cache_dir) to a folder that holds "
                f"{_url_filename(url)}, or pass the file's path instead of {name!r}"
            ) from exc
    if os.path.isfile(name):
        return name
    if _looks_like_path(name):
        raise CheckpointError(f"no such file: {name}")
    raise ValueError(
        f"unknown checkpoint {name!r}: known names are {', '.join(known_checkpoints())}, "
        "or pass the path of an existing checkpoint file"
    )


def load_checkpoint(
    name: str,
    device: Union[str, torch.device],
    progress: bool = True,
    cache_dir: Optional[str] = None,
    chunk_size: int = 4096,
) -> Dict[str, torch.Tensor]:
    """Load checkpoint `name` (see `checkpoint_path`) as a state dict mapped to `device`."""
    path = checkpoint_path(name, progress=progress, cache_dir=cache_dir, chunk_size=chunk_size)
    if is_cloud_path(path):
        with bf.BlobFile(path, "rb") as f:
            state_dict = read_torch_file(f, path, device)
    else:
        state_dict = read_state_dict(path, device)
    check_official_size(name, state_dict, path)
    return state_dict


def check_official_size(name: str, state_dict: StateDict, path: str) -> None:
    """Raise `IntegrityError` when `name` is official and `state_dict` (read from `path`) does
    not have its number of entries and elements (`OFFICIAL_SIZES`)."""
    if name not in OFFICIAL_SIZES:
        return
    entries, elements = OFFICIAL_SIZES[name]
    found = (len(state_dict), sum(tensor.numel() for tensor in state_dict.values()))
    if found != (entries, elements):
        raise IntegrityError(
            f"{path} is not the {name} checkpoint: it has {found[0]} entries holding {found[1]} elements, "
            f"the official file has {entries} entries holding {elements}"
        )


def _check_official_file(name: str, path: str) -> None:
    check_official_size(name, read_state_dict(path), path)


def _looks_like_path(name: str) -> bool:
    """True when `name` is meant as a file: it ends like a checkpoint file, starts like a path
    (`/`, `.`, `~`) or names a file inside a folder that exists (unlike `clip/txet-enc`)."""
    folder = os.path.dirname(name)
    return name.endswith(CHECKPOINT_SUFFIXES) or name.startswith(("/", ".", "~")) or bool(folder and os.path.isdir(folder))


def fetch_file_cached(
    url: str,
    progress: bool = True,
    cache_dir: Optional[str] = None,
    chunk_size: int = 4096,
    sha256: Optional[str] = None,
    check: Optional[Callable[[str], object]] = None,
) -> str:
    """Return the path of `url`'s file in `cache_dir` (default `default_cache_dir()`),
    downloading it first if it is not there.

    A download is refused (and nothing kept) unless it is complete, not an HTML page, matches
    `sha256` when given and passes `check(path)`, which raises to refuse the file at `path`
    (default for names ending in `.pt`/`.safetensors`: it must be a state dict that
    `read_state_dict` reads). A cached file is checked against `sha256` when given, else
    against the sidecar `<file>.sha256` written when it was first downloaded (or first seen,
    for a file placed by hand).
    """
    cache_dir = cache_dir or default_cache_dir()
    filename = _url_filename(url)
    if check is None and filename.endswith(CHECKPOINT_SUFFIXES):
        check = read_state_dict
    if is_cloud_path(cache_dir):
        return _fetch_to_cloud(url, cache_dir.rstrip("/") + "/" + filename, progress, chunk_size, sha256, check)
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, filename)
    if not os.path.exists(path):
        with FileLock(path + ".lock"):
            if not os.path.exists(path):
                _download(url, path, progress, chunk_size, sha256, check)
                return path
    _verify_cached(path, sha256)
    return path


def _fetch_to_cloud(
    url: str, path: str, progress: bool, chunk_size: int, sha256: Optional[str], check: Optional[Callable]
) -> str:
    """`fetch_file_cached` for a blobfile path: download locally, then upload file and sidecar."""
    if bf.exists(path):
        _verify_cached(path, sha256)
        return path
    with tempfile.TemporaryDirectory() as staging_dir:
        staging_path = os.path.join(staging_dir, _url_filename(url))
        try:
            digest = _download(url, staging_path, progress, chunk_size, sha256, check)
        except DownloadError as exc:
            raise type(exc)(str(exc).replace(staging_path, path)) from exc
        _write_text(path + ".sha256", _sidecar_text(path, digest))
        bf.copy(staging_path, path, overwrite=True)
    return path


def _download(
    url: str, path: str, progress: bool, chunk_size: int, sha256: Optional[str], check: Optional[Callable]
) -> str:
    """Download `url` to `path` and return its sha256 (also written to `path.sha256`).

    The body goes to a temporary file of this call's own beside `path`, is checked, and only
    then renamed to `path`; the temporary file is removed on every failure. The caller holds
    the lock for `path`.
    """
    part_path = temporary_path(path)
    try:
        _receive(url, path, part_path, progress, chunk_size)
        digest = _sha256_of(part_path)
        _check_body(url, path, part_path, digest, sha256, check)
        _write_text(path + ".sha256", _sidecar_text(path, digest))
        os.replace(part_path, path)
        return digest
    finally:
        if os.path.exists(part_path):
            os.remove(part_path)


def _receive(url: str, path: str, part_path: str, progress: bool, chunk_size: int) -> None:
    """Fill `part_path` with the whole body of `url`, resuming up to `MAX_ATTEMPTS` times."""
    for _ in range(MAX_ATTEMPTS):
        shortfall = _download_attempt(url, path, part_path, progress, chunk_size)
        if shortfall is None:
            return
    reason = f"the download stayed incomplete after {MAX_ATTEMPTS} attempts (truncated: {shortfall})"
    raise DownloadError(_failure_message(url, path, reason))


def _check_body(
    url: str, path: str, part_path: str, digest: str, sha256: Optional[str], check: Optional[Callable]
) -> None:
    """Raise unless the complete download in `part_path` (for `path`) is the file wanted."""
    with open(part_path, "rb") as f:
        head = f.read(256).lstrip().lower()
    if head.startswith(_HTML_STARTS):
        raise DownloadError(_failure_message(url, path, _HTML_REASON))
    if sha256 is not None and digest != sha256.lower():
        raise IntegrityError(
            f"the download of {url} has sha256 {digest}, expected {sha256.lower()}; it was discarded"
        )
    if check is None:
        return
    try:
        check(part_path)
    except (CheckpointError, IntegrityError) as exc:
        raise IntegrityError(f"{str(exc).replace(part_path, url)}; the download was discarded") from None


def _download_attempt(url: str, path: str, part_path: str, progress: bool, chunk_size: int) -> Optional[str]:
    """Append the rest of `url` to `part_path` (restarting it if the server ignores `Range`).

    Returns None once `part_path` holds the whole body, else what is missing (the connection
    dropped after some progress, so a resume is worth trying); raises on every other failure.
    """
    offset = os.path.getsize(part_path) if os.path.exists(part_path) else 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = requests.get(url, headers=headers, stream=True, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
    except requests.RequestException as exc:
        raise DownloadError(_failure_message(url, path, f"the server could not be reached ({first_line(exc)})")) from exc
    with response:
        misplaced = response.status_code == 206 and not _resumes_at(response, offset)
        if offset and (response.status_code == 416 or misplaced):
            os.remove(part_path)  # the partial file does not fit the file the server has now
            return f"the server could not resume at byte {offset}"
        _check_response(response, url, path)
        if response.status_code == 200:
            offset = 0  # the server ignored Range and sends the whole file
        length = response.headers.get("Content-Length")
        expected_size = offset + int(length) if length is not None else None
        try:
            with open(part_path, "ab" if offset else "wb") as f, tqdm(
                total=expected_size,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=os.path.basename(path),
                disable=not progress,
            ) as bar:
                received, dropped = _copy_body(response, f, bar, chunk_size)
        except OSError as exc:
            raise CacheWriteError(_write_failure_message(path, exc)) from None
    size = offset + received
    if size == expected_size or (expected_size is None and not dropped):
        return None
    if expected_size is not None and size > expected_size:
        reason = f"the server sent {size} bytes but announced {expected_size}"
        raise DownloadError(_failure_message(url, path, reason))
    if received == 0:
        reason = f"the connection dropped with no new data ({size} of {expected_size or '?'} bytes)"
        raise DownloadError(_failure_message(url, path, reason))
    return f"{size} of {expected_size or '?'} bytes"


def _copy_body(response: requests.Response, f: BinaryIO, bar: tqdm, chunk_size: int) -> Tuple[int, bool]:
    """Write `response`'s body to `f` until it ends; returns (bytes written, whether it dropped)."""
    received = 0
    chunks = response.raw.stream(chunk_size, decode_content=False)
    while True:
        try:
            chunk = next(chunks)
        except StopIteration:
            return received, False
        except (urllib3.exceptions.HTTPError, requests.RequestException):
            return received, True
        f.write(chunk)
        received += len(chunk)
        bar.update(len(chunk))


def _check_response(response: requests.Response, url: str, path: str) -> None:
    if response.status_code not in (200, 206):
        reason = f"the server answered HTTP {response.status_code} {response.reason}"
        raise DownloadError(_failure_message(url, path, reason))
    if response.headers.get("Content-Type", "").startswith("text/html"):
        raise DownloadError(_failure_message(url, path, _HTML_REASON))


def _resumes_at(response: requests.Response, offset: int) -> bool:
    return response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")


def _failure_message(url: str, path: str, reason: str) -> str:
    return (
        f"could not download {os.path.basename(path)}: {reason} (URL {url}); "
        f"without network access, download it elsewhere and place it at {path}"
    )


def _write_failure_message(path: str, exc: OSError) -> str:
    folder = os.path.dirname(path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"could not download {os.path.basename(path)}: the disk is full (no space left in {folder}); "
            "free some space or set $GLIDE_CACHE_DIR (or pass cache_dir) to a folder on another disk"
        )
    return f"could not download {os.path.basename(path)}: writing to {folder} failed ({exc.strerror or exc})"


def _verify_cached(path: str, sha256: Optional[str]) -> None:
    """Check `path` against `sha256` or its sidecar; a file without either gets a sidecar."""
    sidecar = path + ".sha256"
    expected = sha256.lower() if sha256 is not None else _read_sidecar(sidecar)
    digest = _sha256_of(path)
    if expected is None:
        _write_text(sidecar, _sidecar_text(path, digest))
    elif digest != expected:
        source = "the expected value" if sha256 is not None else sidecar
        raise IntegrityError(
            f"cached file {path} is corrupt or not the expected file: its sha256 is {digest}, "
            f"but {source} says {expected}. Delete {path} and {sidecar} so that it is downloaded again."
        )


def _url_filename(url: str) -> str:
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise ValueError(f"URL {url!r} does not end in a file name")
    return name


def _open(path: str, mode: str):
    return bf.BlobFile(path, mode) if is_cloud_path(path) else open(path, mode)


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with _open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar_text(path: str, digest: str) -> str:
    """`sha256sum` format, so `sha256sum -c file.sha256` works in the cache folder."""
    return f"{digest}  {os.path.basename(path)}\n"


def _read_sidecar(sidecar: str) -> Optional[str]:
    if not (bf.exists(sidecar) if is_cloud_path(sidecar) else os.path.exists(sidecar)):
        return None
    with _open(sidecar, "r") as f:
        fields = f.read().split()
    return fields[0].lower() if fields else None


def _write_text(path: str, text: str) -> None:
    """Write `text` to `path`; a local file is replaced atomically."""
    if is_cloud_path(path):
        with bf.BlobFile(path, "w") as f:
            f.write(text)
        return
    tmp_path = temporary_path(path)
    try:
        with open(tmp_path, "w") as f:
            f.write(text)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
