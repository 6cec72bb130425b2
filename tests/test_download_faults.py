"""Every way a checkpoint download can go wrong, against a local HTTP server (issue 24).

Each fault must give a one-line error naming the problem and leave nothing in the cache (no
file under the final name, no `.sha256` sidecar, no temporary download); once the server is
fixed, the same call must download and load the checkpoint.
"""

import dataclasses
import errno
import io
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from glide_text2im import download
from glide_text2im.checkpoint_io import CheckpointError, read_state_dict
from glide_text2im.download import CacheWriteError, DownloadError, IntegrityError, load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
NAME = "base.pt"  # the file name under which the server offers everything

STATE_DICT = {
    "weight": torch.randn(64, 48, generator=torch.Generator().manual_seed(0)),
    "bias": torch.linspace(-1.0, 1.0, 48),
}


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


GOOD = saved(STATE_DICT)


@dataclasses.dataclass
class Behaviour:
    """How the server answers for one file."""

    status: int = 200
    body: bytes = GOOD
    content_type: str = "application/octet-stream"
    extra_length: int = 0  # announce this many bytes more than the body holds
    drop_after: Optional[int] = None  # close every response after this many body bytes
    ranges: bool = True  # answer `Range: bytes=N-` with 206 (else ignore it and send everything)
    gate: Optional[threading.Event] = None  # hold the body back until this is set


class Server:
    """A `ThreadingHTTPServer` on 127.0.0.1 serving `/<name>` as `behaviours[name]` says."""

    def __init__(self) -> None:
        self.behaviours: Dict[str, Behaviour] = {}
        self.requests: List[Tuple[str, Optional[str]]] = []  # (name, Range header)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self

    def serve(self, name: str = NAME, **behaviour) -> str:
        """Set how `name` is served and return its URL."""
        self.behaviours[name] = Behaviour(**behaviour)
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        owner: Server = self.server.owner
        name, range_header = self.path.lstrip("/"), self.headers.get("Range")
        with owner.lock:
            owner.requests.append((name, range_header))
        behaviour = owner.behaviours[name]
        status, start = behaviour.status, 0
        if range_header and behaviour.ranges and status == 200:
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            if start >= len(behaviour.body):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = behaviour.body[start:]
        self.send_response(status)
        self.send_header("Content-Type", behaviour.content_type)
        self.send_header("Content-Length", str(len(body) + behaviour.extra_length))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(behaviour.body) - 1}/{len(behaviour.body)}")
        self.end_headers()
        if behaviour.gate is not None:
            behaviour.gate.wait(30)
        self.wfile.write(body[: behaviour.drop_after])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def server():
    srv = Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture(autouse=True)
def fast_downloads(monkeypatch):
    """Three attempts, short timeouts, and `base` has the tiny STATE_DICT's size."""
    monkeypatch.setattr(download, "MAX_ATTEMPTS", 3)
    monkeypatch.setattr(download, "CONNECT_TIMEOUT", 2.0)
    monkeypatch.setattr(download, "READ_TIMEOUT", 5.0)
    monkeypatch.setitem(download.OFFICIAL_SIZES, "base", (2, 64 * 48 + 48))
    monkeypatch.setitem(download.MODEL_PATHS, "base", download.MODEL_PATHS["base"])  # load_base changes it


def load_base(server: Server, tmp_path: Path, **behaviour) -> Dict[str, torch.Tensor]:
    """`load_checkpoint("base")` with its URL pointing at the server, served as `behaviour`."""
    download.MODEL_PATHS["base"] = server.serve(**behaviour)
    return load_checkpoint("base", "cpu", progress=False, cache_dir=str(tmp_path))


def assert_refused(info: pytest.ExceptionInfo, cache_dir: Path, *words: str) -> str:
    """The error is one line naming the problem, and the cache holds nothing but the lock."""
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    assert "weights_only" not in message, message
    left = set(os.listdir(cache_dir)) if cache_dir.exists() else set()
    assert left <= {NAME + ".lock"}, left
    return message


def assert_retry_loads(server: Server, tmp_path: Path) -> None:
    """With the server fixed, the same call downloads and loads the original tensors."""
    state_dict = load_base(server, tmp_path)
    assert state_dict.keys() == STATE_DICT.keys()
    for key, value in STATE_DICT.items():
        assert torch.equal(state_dict[key], value), key
    assert sorted(os.listdir(tmp_path)) == [NAME, NAME + ".lock", NAME + ".sha256"]


@pytest.mark.parametrize("status, reason", [(404, "Not Found"), (500, "Internal Server Error")])
def test_http_error(server, tmp_path, status, reason):
    with pytest.raises(DownloadError) as info:
        load_base(server, tmp_path, status=status, body=b"nope", content_type="text/plain")
    message = assert_refused(info, tmp_path, f"HTTP {status} {reason}", download.MODEL_PATHS["base"])
    assert f"place it at {tmp_path / NAME}" in message and "set $GLIDE_CACHE_DIR" in message
    assert len(server.requests) == 1
    assert_retry_loads(server, tmp_path)


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_html_page_instead_of_the_file(server, tmp_path, content_type):
    page = b"\n  <!DOCTYPE html><html><body>Please log in to the Wi-Fi</body></html>"
    with pytest.raises(DownloadError) as info:
        load_base(server, tmp_path, body=page, content_type=content_type)
    assert_refused(info, tmp_path, "HTML page instead of the file")
    assert_retry_loads(server, tmp_path)


@pytest.mark.parametrize("ranges", [False, True])
def test_truncated_body(server, tmp_path, ranges):
    """Content-Length announces 500 bytes more than the server sends before closing."""
    with pytest.raises(DownloadError) as info:
        load_base(server, tmp_path, extra_length=500, ranges=ranges)
    assert_refused(info, tmp_path, "incomplete after 3 attempts", "truncated")
    assert len(server.requests) == 3
    assert_retry_loads(server, tmp_path)


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    third = len(GOOD) // 3 + 1
    state_dict = load_base(server, tmp_path, drop_after=third)
    assert torch.equal(state_dict["weight"], STATE_DICT["weight"])
    assert server.requests == [(NAME, None), (NAME, f"bytes={third}-"), (NAME, f"bytes={2 * third}-")]
    assert sorted(os.listdir(tmp_path)) == [NAME, NAME + ".lock", NAME + ".sha256"]


@pytest.mark.parametrize("ranges", [True, False])
def test_connection_that_keeps_dropping(server, tmp_path, ranges):
    with pytest.raises(DownloadError) as info:
        load_base(server, tmp_path, drop_after=1000, ranges=ranges)
    message = assert_refused(info, tmp_path, "incomplete after 3 attempts")
    assert f"{3000 if ranges else 1000} of {len(GOOD)} bytes" in message
    assert [r is not None for _, r in server.requests] == [False, True, True]
    assert_retry_loads(server, tmp_path)


def test_garbage_of_the_announced_length(server, tmp_path):
    garbage = bytes(range(256)) * (len(GOOD) // 256)
    with pytest.raises(IntegrityError) as info:
        load_base(server, tmp_path, body=garbage)
    assert_refused(info, tmp_path, "is not a checkpoint", "the download was discarded")
    assert_retry_loads(server, tmp_path)


def test_a_state_dict_of_the_wrong_size_is_not_the_official_checkpoint(server, tmp_path):
    other = saved({"weight": STATE_DICT["weight"]})
    with pytest.raises(IntegrityError) as info:
        load_base(server, tmp_path, body=other)
    assert_refused(info, tmp_path, "is not the base checkpoint: it has 1 entries holding 3072 elements")
    assert_retry_loads(server, tmp_path)


class RunsCode:
    """Unpickling this runs `touch <marker>` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running_it(server, tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    evil = saved({**STATE_DICT, "payload": RunsCode(marker)})
    with pytest.raises(IntegrityError) as info:
        load_base(server, cache, body=evil)
    assert_refused(info, cache, "was refused: it would call posix.system", "may hold only tensors")
    (tmp_path / "evil.pt").write_bytes(evil)
    with pytest.raises(CheckpointError, match="evil.pt was refused: it would call posix.system"):
        load_checkpoint(str(tmp_path / "evil.pt"), "cpu")
    assert not marker.exists()
    assert_retry_loads(server, cache)

    control = tmp_path / "control"  # the payload is real: a plain unpickler runs it
    torch.load(io.BytesIO(saved(RunsCode(control))), weights_only=False)
    assert control.exists()


class FullDisk:
    """A binary file whose writes fail with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self) -> "FullDisk":
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def test_disk_full(server, tmp_path, monkeypatch):
    def open_on_full_disk(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        return FullDisk(f) if mode in ("wb", "ab") else f

    monkeypatch.setattr(download, "open", open_on_full_disk, raising=False)
    with pytest.raises(CacheWriteError) as info:
        load_base(server, tmp_path)
    message = assert_refused(info, tmp_path, "the disk is full", f"no space left in {tmp_path}")
    assert "place it at" not in message  # downloading elsewhere does not help
    monkeypatch.delattr(download, "open")
    assert_retry_loads(server, tmp_path)


CHILD = (
    "import sys\n"
    "from glide_text2im.download import fetch_file_cached\n"
    "print('ready', flush=True)\n"
    "print(fetch_file_cached(sys.argv[1], progress=False, cache_dir=sys.argv[2]), flush=True)\n"
)


def test_two_processes_download_the_same_file(server, tmp_path):
    """The first process downloads (its body held back until both run); the second waits on
    the lock and then finds the file."""
    gate = threading.Event()
    url = server.serve(gate=gate)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, url, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    try:
        assert [child.stdout.readline() for child in children] == ["ready\n"] * 2
        deadline = time.monotonic() + 30
        while not server.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the other process is now waiting on the lock
        assert len(server.requests) == 1
    finally:
        gate.set()
    outputs = [child.communicate(timeout=60)[0] for child in children]

    assert [child.returncode for child in children] == [0, 0]
    assert outputs == [f"{tmp_path / NAME}\n"] * 2
    assert len(server.requests) == 1
    assert (tmp_path / NAME).read_bytes() == GOOD
    assert sorted(os.listdir(tmp_path)) == [NAME, NAME + ".lock", NAME + ".sha256"]
    assert torch.equal(read_state_dict(str(tmp_path / NAME))["bias"], STATE_DICT["bias"])
