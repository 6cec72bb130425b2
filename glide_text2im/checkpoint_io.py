"""Reading and writing checkpoint files: a state dict in PyTorch's zip format or in safetensors.

Neither reader can run code: `.pt` files are read with ``torch.load(weights_only=True)``, which
accepts only tensors and plain containers, and `.safetensors` files hold nothing but tensors.
The format is told by the file's first bytes, not its name, so a renamed file still loads.
"""

import os
import pickle
import re
import stat
import uuid
import zipfile
from typing import BinaryIO, Dict, Union

import torch

StateDict = Dict[str, torch.Tensor]

SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_SUFFIXES = (".pt", SAFETENSORS_SUFFIX)  # the file names of state-dict files
_ZIP_MAGIC = b"PK\x03\x04"
_MIN_TORCH = (2, 6)  # torch.load(weights_only=True) can run code before 2.6 (CVE-2025-32434)


class CheckpointError(ValueError):
    """A file is not a readable checkpoint (missing, truncated, not a state dict, wrong format)."""


def check_torch_version(version: str = torch.__version__) -> None:
    """Refuse to read checkpoints with a torch whose ``weights_only`` loader is not safe."""
    release = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    if release < _MIN_TORCH:
        raise RuntimeError(
            f"torch {version} can run code from a checkpoint file (CVE-2025-32434); "
            "install torch>=2.6 to load checkpoints"
        )


def is_safetensors_file(path: str) -> bool:
    """True when ``path`` starts like a safetensors file (an 8-byte header length, then '{')."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(_ZIP_MAGIC)


def read_state_dict(path: str, device: Union[str, torch.device] = "cpu") -> StateDict:
    """The state dict stored in ``path`` (a `.pt` or `.safetensors` file), on ``device``.

    Raises `CheckpointError` with a one-line message naming the file and the problem.
    """
    check_torch_version()
    if not os.path.exists(path):
        raise CheckpointError(f"no such file: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty, not a checkpoint")
    if is_safetensors_file(path):
        state_dict = _read_safetensors(path, device)
    else:
        state_dict = _read_torch(path, device)
    _check_state_dict(state_dict, path)
    return state_dict


def write_state_dict(state_dict: StateDict, path: str) -> str:
    """Write ``state_dict`` to ``path``: safetensors if it ends in `.safetensors`, else torch's format.

    The tensors are written as they are (dtype, shape, values); safetensors keeps no key order
    (it reads back sorted) and no shared storage (tensors that share memory are written apart).
    The file is written under a temporary name beside ``path`` and renamed when complete, so
    ``path`` never holds half a file.
    """
    _check_state_dict(state_dict, path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temporary_path(path)
    try:
        if path.endswith(SAFETENSORS_SUFFIX):
            from safetensors.torch import save_file

            with open(tmp, "wb"):
                mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what the umask gives a new file
            save_file(_unshared(state_dict), tmp)
            os.chmod(tmp, mode)  # safetensors writes its files readable by their owner only
        else:
            torch.save({key: value.detach().cpu().contiguous() for key, value in state_dict.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def temporary_path(path: str) -> str:
    """A new hidden file name beside ``path`` to write to before renaming it to ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")


def _unshared(state_dict: StateDict) -> StateDict:
    """Contiguous CPU tensors, each with its own memory (safetensors refuses shared storage)."""
    tensors, seen = {}, set()
    for key, value in state_dict.items():
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return tensors


def _read_torch(path: str, device: Union[str, torch.device]) -> StateDict:
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == _ZIP_MAGIC:
                raise CheckpointError(f"{path} is truncated or damaged: its zip directory is missing")
        raise CheckpointError(f"{path} is not a checkpoint: neither a PyTorch (zip) nor a safetensors file")
    return _torch_load(path, device, path)


def read_torch_file(f: BinaryIO, name: str, device: Union[str, torch.device] = "cpu") -> StateDict:
    """The state dict in the open PyTorch-format file ``f`` (e.g. a blobfile), on ``device``.

    Like `read_state_dict`, but for a file that is not a local path; ``name`` is used in errors.
    """
    check_torch_version()
    state_dict = _torch_load(f, device, name)
    _check_state_dict(state_dict, name)
    return state_dict


def _torch_load(source: Union[str, BinaryIO], device: Union[str, torch.device], name: str) -> object:
    try:
        return torch.load(source, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        # older torch says "Unsupported global: GLOBAL x.y", torch 2.13 "unsupported GLOBAL x.y whose module"
        found = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(exc), re.IGNORECASE)
        what = f"it would call {found.group(1)}" if found else "it holds more than tensors"
        raise CheckpointError(f"{name} was refused: {what}, and a checkpoint may hold only tensors") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, KeyError, OSError) as exc:
        raise CheckpointError(f"{name} is damaged or truncated: {first_line(exc)}") from None


def _read_safetensors(path: str, device: Union[str, torch.device]) -> StateDict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is a damaged safetensors file: {first_line(exc)}") from None


def _check_state_dict(state_dict: object, path: str) -> None:
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError(f"{path} does not hold a state dict (a non-empty dict of tensors)")
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path} does not hold a state dict: entry {key!r} is not a named tensor")


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (at most 200 characters), else its class name."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
