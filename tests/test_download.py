"""The checkpoint downloader against a real HTTP server on 127.0.0.1 that can misbehave."""

import collections
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from glide_text2im import download
from glide_text2im.checkpoint_io import CheckpointError
from glide_text2im.download import (
    MAX_ATTEMPTS,
    MODEL_PATHS,
    OFFICIAL_SIZES,
    DownloadError,
    IntegrityError,
    default_cache_dir,
    fetch_file_cached,
    is_cloud_path,
    load_checkpoint,
    register_checkpoint,
)


class FileServer:
    """Serves `files` at `/<route>/<name>`; the route picks the behaviour:

    ok (Content-Length, Range -> 206), slow (ok after a pause), drop-once (first response stops
    mid-body, later ones as ok), drop-once-norange (same, but later ones ignore Range -> 200),
    wrong (same length, wrong bytes), truncated (always half the announced body),
    html (200 text/html error page), 404, 500.
    """

    def __init__(self, files: Dict[str, bytes]):
        self.files = files
        self.requests: List[Tuple[str, Optional[str]]] = []  # (path, Range header)
        self.bodies_sent: Dict[str, int] = collections.Counter()  # name -> responses with a body
        self._dropped = set()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def url(self, route: str, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{route}/{name}"

    def drop_first(self, key: str) -> bool:
        with self._lock:
            first = key not in self._dropped
            self._dropped.add(key)
            return first


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        owner: FileServer = self.server.owner
        range_header = self.headers.get("Range")
        with owner._lock:
            owner.requests.append((self.path, range_header))
        _, route, name = self.path.split("/", 2)
        if route in ("404", "500"):
            self.send_error(int(route))
            return
        if route == "html":
            self._send(200, b"<html><body>Service unavailable</body></html>", content_type="text/html")
            return
        data = owner.files[name]
        with owner._lock:
            owner.bodies_sent[name] += 1
        if route == "wrong":
            self._send(200, data[::-1])
        elif route == "truncated":
            self._send(200, data, stop_at=len(data) // 2)
        elif route.startswith("drop-once") and owner.drop_first(route + name):
            self._send(200, data, stop_at=len(data) // 3)
        elif route == "drop-once-norange":
            self._send(200, data)
        else:
            if route == "slow":
                time.sleep(0.5)
            self._send_range(data, range_header)

    def _send_range(self, data: bytes, range_header: Optional[str]) -> None:
        if range_header is None:
            self._send(200, data)
            return
        start = int(range_header.removeprefix("bytes=").rstrip("-"))
        if start >= len(data):
            self._send(416, b"")
            return
        self._send(206, data[start:], content_range=f"bytes {start}-{len(data) - 1}/{len(data)}")

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/octet-stream",
        content_range: Optional[str] = None,
        stop_at: Optional[int] = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if content_range is not None:
            self.send_header("Content-Range", content_range)
        self.end_headers()
        self.wfile.write(body[:stop_at])
        self.wfile.flush()
        self.close_connection = True


BLOB = random.Random(0).randbytes(200_000)
STATE_DICT = {"weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "bias": torch.full((3,), -0.5)}


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.fixture
def server():
    with FileServer({"blob.bin": BLOB, "weights.pt": _saved(STATE_DICT)}) as srv:
        yield srv


def closed_port_url(name: str) -> str:
    """A URL on 127.0.0.1 where nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def assert_nothing_left(cache_dir, name: str) -> None:
    """Nothing in `cache_dir` but (at most) the lock file of `name`: no file under the final
    name, no checksum sidecar, no temporary download."""
    left = os.listdir(cache_dir) if os.path.isdir(cache_dir) else []
    assert set(left) <= {name + ".lock"}, left


def test_download_shows_progress_writes_sidecar_and_is_cached(server, tmp_path, capsys):
    path = fetch_file_cached(server.url("ok", "blob.bin"), cache_dir=str(tmp_path))

    assert path == str(tmp_path / "blob.bin")
    assert (tmp_path / "blob.bin").read_bytes() == BLOB
    digest = hashlib.sha256(BLOB).hexdigest()
    assert (tmp_path / "blob.bin.sha256").read_text() == f"{digest}  blob.bin\n"
    assert sorted(os.listdir(tmp_path)) == ["blob.bin", "blob.bin.lock", "blob.bin.sha256"]
    progress = capsys.readouterr().err
    assert "blob.bin" in progress and "100%" in progress and "195k/195k" in progress

    assert fetch_file_cached(server.url("ok", "blob.bin"), progress=False, cache_dir=str(tmp_path)) == path
    assert server.bodies_sent["blob.bin"] == 1
    assert capsys.readouterr().err == ""


def test_download_accepts_matching_sha256(server, tmp_path):
    digest = hashlib.sha256(BLOB).hexdigest()
    path = fetch_file_cached(server.url("ok", "blob.bin"), progress=False, cache_dir=str(tmp_path), sha256=digest)
    assert open(path, "rb").read() == BLOB


def test_dropped_connection_is_resumed_with_range(server, tmp_path):
    path = fetch_file_cached(server.url("drop-once", "blob.bin"), progress=False, cache_dir=str(tmp_path))

    assert open(path, "rb").read() == BLOB
    assert server.requests == [
        ("/drop-once/blob.bin", None),
        ("/drop-once/blob.bin", f"bytes={len(BLOB) // 3}-"),
    ]


def test_download_restarts_when_server_ignores_range(server, tmp_path):
    path = fetch_file_cached(server.url("drop-once-norange", "blob.bin"), progress=False, cache_dir=str(tmp_path))

    assert open(path, "rb").read() == BLOB
    assert [r for _, r in server.requests] == [None, f"bytes={len(BLOB) // 3}-"]
    assert server.bodies_sent["blob.bin"] == 2


@pytest.mark.parametrize("status", [404, 500])
def test_http_error_is_reported_and_leaves_nothing(server, tmp_path, status):
    url = server.url(str(status), "blob.bin")
    with pytest.raises(DownloadError) as info:
        fetch_file_cached(url, progress=False, cache_dir=str(tmp_path))

    message = str(info.value)
    assert f"HTTP {status}" in message
    assert url in message and f"place it at {tmp_path / 'blob.bin'}" in message
    assert_nothing_left(tmp_path, "blob.bin")
    assert "\n" not in message
    assert len(server.requests) == 1  # no retry loop


def test_html_error_page_is_refused(server, tmp_path):
    with pytest.raises(DownloadError, match="HTML page"):
        fetch_file_cached(server.url("html", "blob.bin"), progress=False, cache_dir=str(tmp_path))
    assert_nothing_left(tmp_path, "blob.bin")


def test_checksum_mismatch_is_refused(server, tmp_path):
    digest = hashlib.sha256(BLOB).hexdigest()
    with pytest.raises(IntegrityError, match=digest):
        fetch_file_cached(server.url("wrong", "blob.bin"), progress=False, cache_dir=str(tmp_path), sha256=digest)

    assert_nothing_left(tmp_path, "blob.bin")


def test_truncated_body_is_refused(server, tmp_path):
    with pytest.raises(DownloadError, match="incomplete"):
        fetch_file_cached(server.url("truncated", "blob.bin"), progress=False, cache_dir=str(tmp_path))

    assert_nothing_left(tmp_path, "blob.bin")
    assert server.bodies_sent["blob.bin"] == MAX_ATTEMPTS


def test_corrupted_cached_file_is_detected(server, tmp_path):
    path = fetch_file_cached(server.url("ok", "blob.bin"), progress=False, cache_dir=str(tmp_path))
    with open(path, "r+b") as f:
        f.write(b"\0")

    with pytest.raises(IntegrityError) as info:
        fetch_file_cached(server.url("ok", "blob.bin"), progress=False, cache_dir=str(tmp_path))
    assert path in str(info.value) and "Delete" in str(info.value)


def test_concurrent_fetches_download_once(server, tmp_path):
    url = server.url("slow", "blob.bin")
    results, errors = [], []

    def fetch():
        try:
            results.append(fetch_file_cached(url, progress=False, cache_dir=str(tmp_path)))
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert results == [str(tmp_path / "blob.bin")] * 3
    assert (tmp_path / "blob.bin").read_bytes() == BLOB
    assert server.bodies_sent["blob.bin"] == 1
    left = sorted(name for name in os.listdir(tmp_path) if not name.endswith(".lock"))
    assert left == ["blob.bin", "blob.bin.sha256"]


def test_load_checkpoint_downloads_official_name_into_env_cache(server, tmp_path, monkeypatch):
    monkeypatch.setitem(MODEL_PATHS, "base", server.url("ok", "weights.pt"))
    monkeypatch.setitem(OFFICIAL_SIZES, "base", (2, 15))  # the sizes of STATE_DICT
    monkeypatch.setenv("GLIDE_CACHE_DIR", str(tmp_path / "cache"))

    state_dict = load_checkpoint("base", "cpu", progress=False)

    assert state_dict.keys() == STATE_DICT.keys()
    for key, value in STATE_DICT.items():
        assert torch.equal(state_dict[key], value)
    assert (tmp_path / "cache" / "weights.pt").is_file()


def test_load_checkpoint_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    url = closed_port_url("base.pt")
    monkeypatch.setitem(MODEL_PATHS, "base", url)

    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        load_checkpoint("base", "cpu", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 3.0

    message = str(info.value)
    assert "base.pt" in message and url in message and "\n" not in message
    assert f"place it at {tmp_path / 'base.pt'}" in message and "set $GLIDE_CACHE_DIR" in message
    assert_nothing_left(tmp_path, "base.pt")


def test_load_checkpoint_accepts_file_path_and_registered_name(tmp_path, monkeypatch):
    path = tmp_path / "mine.pt"
    torch.save(STATE_DICT, path)
    monkeypatch.setattr(download, "LOCAL_CHECKPOINTS", {})
    register_checkpoint("demo/test", lambda: str(path))

    for name in (str(path), "demo/test"):
        state_dict = load_checkpoint(name, torch.device("cpu"))
        assert torch.equal(state_dict["weight"], STATE_DICT["weight"])
    assert "demo/test" in download.known_checkpoints()
    with pytest.raises(ValueError, match="already an official checkpoint"):
        register_checkpoint("base", lambda: str(path))


def test_unknown_checkpoint_lists_known_names():
    with pytest.raises(ValueError) as info:
        load_checkpoint("bsae", "cpu")
    for name in MODEL_PATHS:
        assert name in str(info.value)


def test_unreadable_checkpoint_file_is_reported(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(CheckpointError, match="broken.pt is not a checkpoint") as raised:
        load_checkpoint(str(path), "cpu")
    assert "\n" not in str(raised.value) and "weights_only" not in str(raised.value)


def test_model_paths_match_spec(spec_dir):
    checkpoints = json.loads((spec_dir / "checkpoints.json").read_text())["checkpoints"]
    assert MODEL_PATHS == {c["name"]: c["url"] for c in checkpoints}
    assert [download._url_filename(c["url"]) for c in checkpoints] == [c["cached_filename"] for c in checkpoints]


def test_official_sizes_match_spec(spec_dir):
    checkpoints = json.loads((spec_dir / "checkpoints.json").read_text())["checkpoints"]
    for checkpoint in checkpoints:
        spec = json.loads((spec_dir / checkpoint["spec_file"]).read_text())
        elements = sum(math.prod(shape) for _, shape, _ in spec["state_dict"])
        assert spec["num_state_dict_entries"] == len(spec["state_dict"])
        assert OFFICIAL_SIZES[checkpoint["name"]] == (len(spec["state_dict"]), elements)
    assert sorted(OFFICIAL_SIZES) == sorted(MODEL_PATHS)


def test_missing_file_path_is_not_called_an_unknown_name(tmp_path):
    (tmp_path / "models").mkdir()
    for name in (str(tmp_path / "gone.pt"), "gone.safetensors", str(tmp_path / "models" / "mine"), "./mine"):
        with pytest.raises(CheckpointError, match=f"^no such file: {re.escape(name)}$"):
            load_checkpoint(name, "cpu")
    with pytest.raises(ValueError, match="^unknown checkpoint 'clip/txet-enc': known names are"):
        load_checkpoint("clip/txet-enc", "cpu")


def test_default_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("GLIDE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "glide_text2im")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "glide_text2im")
    monkeypatch.setenv("GLIDE_CACHE_DIR", str(tmp_path / "glide"))
    assert default_cache_dir() == str(tmp_path / "glide")


class FakeBlobfile:
    """Stands in for blobfile, keeping `gs://bucket/...` objects under a local folder."""

    def __init__(self, root):
        self.root = root

    def local(self, path: str) -> str:
        assert path.startswith("gs://bucket/"), path
        return os.path.join(self.root, path.removeprefix("gs://bucket/"))

    def exists(self, path: str) -> bool:
        return os.path.exists(self.local(path))

    def BlobFile(self, path: str, mode: str):
        if "w" in mode:
            os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
        return open(self.local(path), mode)

    def copy(self, src: str, dst: str, overwrite: bool = False) -> None:
        os.makedirs(os.path.dirname(self.local(dst)), exist_ok=True)
        shutil.copyfile(src, self.local(dst))


def test_cloud_cache_dir_goes_through_blobfile(server, tmp_path, monkeypatch):
    assert is_cloud_path("gs://bucket/x") and is_cloud_path("az://account/container/x")
    assert not is_cloud_path(str(tmp_path)) and not is_cloud_path("https://example.com/x.pt")
    monkeypatch.setattr(download, "bf", FakeBlobfile(str(tmp_path / "bucket")))
    monkeypatch.setitem(MODEL_PATHS, "base", server.url("ok", "weights.pt"))
    monkeypatch.delitem(OFFICIAL_SIZES, "base")

    for _ in range(2):
        state_dict = load_checkpoint("base", "cpu", progress=False, cache_dir="gs://bucket/cache/")
        assert torch.equal(state_dict["bias"], STATE_DICT["bias"])

    stored = tmp_path / "bucket" / "cache"
    assert sorted(os.listdir(stored)) == ["weights.pt", "weights.pt.sha256"]
    assert (stored / "weights.pt").read_bytes() == server.files["weights.pt"]
    assert server.bodies_sent["weights.pt"] == 1


def test_wrong_file_under_an_official_name_is_refused_on_load(tmp_path):
    torch.save(STATE_DICT, tmp_path / "base.pt")  # placed by hand, as the error messages suggest
    expected = (
        r"base\.pt is not the base checkpoint: it has 2 entries holding 15 elements, "
        r"the official file has 783 entries holding 385030726$"
    )
    with pytest.raises(IntegrityError, match=expected):
        load_checkpoint("base", "cpu", cache_dir=str(tmp_path))
