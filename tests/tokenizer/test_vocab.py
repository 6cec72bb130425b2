"""Vocabulary files: read from a named folder (plain or gzip), verified, or downloaded and cached."""

import gzip
import hashlib
import json
import time

import pytest

from glide_text2im.download import DownloadError, IntegrityError
from glide_text2im.tokenizer import bpe, vocab
from glide_text2im.tokenizer.bpe import get_encoder
from glide_text2im.tokenizer.simple_tokenizer import SimpleTokenizer
from glide_text2im.tokenizer.vocab import CLIP_BPE, ENCODER_JSON, VOCAB_BPE, VOCAB_SHA256, read_vocab, vocab_file
from tests.test_download import FileServer, closed_port_url

NAMES = (ENCODER_JSON, VOCAB_BPE, CLIP_BPE)


@pytest.fixture(scope="module")
def golden_cases(golden_dir) -> dict:
    """The first three golden cases of each tokenizer."""
    return {
        name: json.loads((golden_dir / f"tokenizer_{name}.json").read_text(encoding="utf-8"))["cases"][:3]
        for name in ("gpt2", "clip")
    }


@pytest.fixture
def plain_vocab_dir(vocab_dir, tmp_path):
    """A folder with uncompressed copies of the three vocabulary files."""
    folder = tmp_path / "plain"
    folder.mkdir()
    for name in NAMES:
        (folder / name).write_bytes(gzip.decompress((vocab_dir / f"{name}.gz").read_bytes()))
    return folder


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty vocabulary folder, an empty cache and download URLs where nothing listens."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("GLIDE_VOCAB_DIR", str(empty))
    monkeypatch.setenv("GLIDE_CACHE_DIR", str(tmp_path / "cache"))
    for name in NAMES:
        monkeypatch.setitem(vocab.VOCAB_URLS, name, closed_port_url(name))
    return tmp_path / "cache" / "vocab"


def assert_encodes_golden(encoder, tokenizer, golden_cases) -> None:
    assert [encoder.encode(c["text"]) for c in golden_cases["gpt2"]] == [c["tokens"] for c in golden_cases["gpt2"]]
    assert [tokenizer.encode(c["text"]) for c in golden_cases["clip"]] == [c["tokens"] for c in golden_cases["clip"]]


def test_compressed_files_are_read_and_verified(vocab_dir):
    for name in NAMES:
        assert vocab_file(name, str(vocab_dir)) == str(vocab_dir / f"{name}.gz")
        assert hashlib.sha256(read_vocab(name, str(vocab_dir)).encode("utf-8")).hexdigest() == VOCAB_SHA256[name]
    assert read_vocab(VOCAB_BPE, str(vocab_dir)).startswith("#version: 0.2\n")


def test_uncompressed_files_are_read_and_verified(plain_vocab_dir, golden_cases, monkeypatch):
    for name in NAMES:
        assert vocab_file(name, str(plain_vocab_dir)) == str(plain_vocab_dir / name)
    monkeypatch.setenv("GLIDE_VOCAB_DIR", str(plain_vocab_dir))
    assert_encodes_golden(get_encoder(), SimpleTokenizer(), golden_cases)
    explicit = get_encoder(str(plain_vocab_dir)), SimpleTokenizer(str(plain_vocab_dir / CLIP_BPE))
    assert_encodes_golden(*explicit, golden_cases)


def test_modified_plain_file_is_refused(plain_vocab_dir):
    path = plain_vocab_dir / ENCODER_JSON
    path.write_bytes(path.read_bytes().replace(b'"!": 0', b'"!": 1'))
    with pytest.raises(IntegrityError) as info:
        get_encoder(str(plain_vocab_dir))
    assert str(path) in str(info.value) and VOCAB_SHA256[ENCODER_JSON] in str(info.value)


def test_modified_compressed_file_is_refused(vocab_dir, tmp_path):
    bad = tmp_path / f"{CLIP_BPE}.gz"
    bad.write_bytes(gzip.compress(gzip.decompress((vocab_dir / f"{CLIP_BPE}.gz").read_bytes()) + b"extra\n"))
    with pytest.raises(IntegrityError, match="sha256 of its decompressed content"):
        SimpleTokenizer(str(bad))
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(IntegrityError, match="not a valid gzip"):
        SimpleTokenizer(str(bad))


def test_bad_names_and_folders_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown vocabulary file"):
        vocab_file("merges.txt", str(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        get_encoder(str(tmp_path / "missing"))


def test_missing_files_are_downloaded_verified_and_cached(vocab_dir, offline, golden_cases, monkeypatch):
    files = {
        ENCODER_JSON: gzip.decompress((vocab_dir / f"{ENCODER_JSON}.gz").read_bytes()),
        VOCAB_BPE: gzip.decompress((vocab_dir / f"{VOCAB_BPE}.gz").read_bytes()),
        f"{CLIP_BPE}.gz": (vocab_dir / f"{CLIP_BPE}.gz").read_bytes(),
    }
    with FileServer(files) as server:
        for name in NAMES:
            monkeypatch.setitem(vocab.VOCAB_URLS, name, server.url("ok", name + ("" if name in files else ".gz")))
        assert_encodes_golden(get_encoder(), SimpleTokenizer(), golden_cases)
        for name in NAMES:
            vocab_file(name, progress=False)
        assert server.bodies_sent == {name: 1 for name in files}
    assert sorted(p.name for p in offline.iterdir() if not p.name.endswith(".lock")) == sorted(
        [*files, *(f"{name}.sha256" for name in files)]
    )


def test_download_with_wrong_bytes_is_refused(vocab_dir, offline, monkeypatch):
    data = gzip.decompress((vocab_dir / f"{ENCODER_JSON}.gz").read_bytes())
    with FileServer({ENCODER_JSON: data}) as server:
        monkeypatch.setitem(vocab.VOCAB_URLS, ENCODER_JSON, server.url("wrong", ENCODER_JSON))
        with pytest.raises(IntegrityError, match=VOCAB_SHA256[ENCODER_JSON]):
            get_encoder()
    assert not (offline / ENCODER_JSON).exists()


@pytest.mark.parametrize("unset_vocab_dir", [False, True])
def test_offline_without_files_fails_fast_with_instructions(offline, monkeypatch, unset_vocab_dir):
    if unset_vocab_dir:
        monkeypatch.delenv("GLIDE_VOCAB_DIR")
        bpe._load_encoder.cache_clear()
    for build, name in ((get_encoder, ENCODER_JSON), (SimpleTokenizer, CLIP_BPE)):
        start = time.monotonic()
        with pytest.raises(DownloadError) as info:
            build()
        assert time.monotonic() - start < 3.0
        message = str(info.value)
        assert vocab.VOCAB_URLS[name] in message
        assert "GLIDE_VOCAB_DIR" in message and str(offline) in message
