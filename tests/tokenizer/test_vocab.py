"""Vocabulary files: the package's own verified copies, or a named folder (plain or gzip); never a download."""

import gzip
import hashlib
import json
import shutil
import socket
import urllib.request

import pytest

from glide_text2im.download import IntegrityError
from glide_text2im.tokenizer import bpe, simple_tokenizer, vocab
from glide_text2im.tokenizer.bpe import get_encoder
from glide_text2im.tokenizer.simple_tokenizer import SimpleTokenizer
from glide_text2im.tokenizer.vocab import (
    CLIP_BPE,
    ENCODER_JSON,
    PACKAGED_VOCAB_DIR,
    VOCAB_BPE,
    VOCAB_NAMES,
    VOCAB_SHA256,
    read_vocab,
    vocab_file,
)


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
    for name in VOCAB_NAMES:
        (folder / name).write_bytes(gzip.decompress((vocab_dir / f"{name}.gz").read_bytes()))
    return folder


@pytest.fixture
def fresh_tokenizers():
    """Forget the tokenizers built so far, so the next ones read their files again."""
    bpe._load_encoder.cache_clear()
    simple_tokenizer._load_merges.cache_clear()
    yield
    bpe._load_encoder.cache_clear()
    simple_tokenizer._load_merges.cache_clear()


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection and urllib request raises (and is recorded)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test that must work offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return attempts


def assert_encodes_golden(encoder, tokenizer, golden_cases) -> None:
    assert [encoder.encode(c["text"]) for c in golden_cases["gpt2"]] == [c["tokens"] for c in golden_cases["gpt2"]]
    assert [tokenizer.encode(c["text"]) for c in golden_cases["clip"]] == [c["tokens"] for c in golden_cases["clip"]]


def test_package_ships_the_three_pinned_files():
    for name in VOCAB_NAMES:
        path = f"{PACKAGED_VOCAB_DIR}/{name}.gz"
        with open(path, "rb") as f:
            data = f.read()
        assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256[name + ".gz"]
        assert hashlib.sha256(gzip.decompress(data)).hexdigest() == VOCAB_SHA256[name]


def test_tokenizers_use_the_packaged_copy_offline(golden_cases, fresh_tokenizers, no_network, monkeypatch):
    monkeypatch.delenv("GLIDE_VOCAB_DIR", raising=False)
    monkeypatch.setenv("GLIDE_CACHE_DIR", "/nonexistent/glide-cache")  # a download would have to fail here
    assert [vocab_file(name) for name in VOCAB_NAMES] == [f"{PACKAGED_VOCAB_DIR}/{name}.gz" for name in VOCAB_NAMES]
    assert_encodes_golden(get_encoder(), SimpleTokenizer(), golden_cases)
    assert no_network == []


def test_no_network_fixture_really_blocks(no_network):
    with pytest.raises(OSError, match="network access attempted"):
        socket.create_connection(("127.0.0.1", 9))
    assert len(no_network) == 1


def test_compressed_files_are_read_and_verified(vocab_dir):
    for name in VOCAB_NAMES:
        assert vocab_file(name, str(vocab_dir)) == str(vocab_dir / f"{name}.gz")
        assert hashlib.sha256(read_vocab(name, str(vocab_dir)).encode("utf-8")).hexdigest() == VOCAB_SHA256[name]
    assert read_vocab(VOCAB_BPE, str(vocab_dir)).startswith("#version: 0.2\n")


def test_named_folder_overrides_the_packaged_copy(plain_vocab_dir, golden_cases, fresh_tokenizers, monkeypatch):
    for name in VOCAB_NAMES:
        assert vocab_file(name, str(plain_vocab_dir)) == str(plain_vocab_dir / name)
    monkeypatch.setenv("GLIDE_VOCAB_DIR", str(plain_vocab_dir))
    assert [vocab_file(name) for name in VOCAB_NAMES] == [str(plain_vocab_dir / name) for name in VOCAB_NAMES]
    assert_encodes_golden(get_encoder(), SimpleTokenizer(), golden_cases)
    explicit = get_encoder(str(plain_vocab_dir)), SimpleTokenizer(str(plain_vocab_dir / CLIP_BPE))
    assert_encodes_golden(*explicit, golden_cases)


def test_modified_file_in_named_folder_is_refused(plain_vocab_dir, fresh_tokenizers, monkeypatch):
    path = plain_vocab_dir / ENCODER_JSON
    path.write_bytes(path.read_bytes().replace(b'"!": 0', b'"!": 1'))
    for build in (lambda: get_encoder(str(plain_vocab_dir)), get_encoder):  # the argument, then the variable
        monkeypatch.setenv("GLIDE_VOCAB_DIR", str(plain_vocab_dir))
        with pytest.raises(IntegrityError) as info:
            build()
        assert str(path) in str(info.value) and VOCAB_SHA256[ENCODER_JSON] in str(info.value)
        assert "\n" not in str(info.value)


def test_modified_compressed_file_is_refused(vocab_dir, tmp_path):
    bad = tmp_path / f"{CLIP_BPE}.gz"
    bad.write_bytes(gzip.compress(gzip.decompress((vocab_dir / f"{CLIP_BPE}.gz").read_bytes()) + b"extra\n"))
    with pytest.raises(IntegrityError, match="sha256 of its decompressed content"):
        SimpleTokenizer(str(bad))
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(IntegrityError, match="not a valid gzip"):
        SimpleTokenizer(str(bad))


def test_damaged_packaged_copy_is_refused_in_one_line(golden_cases, tmp_path, fresh_tokenizers, monkeypatch):
    """A packaged file that is not byte-identical to the shipped one is refused even when its
    content would be right (here: re-compressed with another gzip header)."""
    packaged = tmp_path / "data"
    shutil.copytree(PACKAGED_VOCAB_DIR, packaged)
    content = gzip.decompress((packaged / f"{VOCAB_BPE}.gz").read_bytes())
    (packaged / f"{VOCAB_BPE}.gz").write_bytes(gzip.compress(content, mtime=1))
    monkeypatch.setattr(vocab, "PACKAGED_VOCAB_DIR", str(packaged))
    monkeypatch.delenv("GLIDE_VOCAB_DIR", raising=False)
    with pytest.raises(IntegrityError) as info:
        get_encoder()
    message = str(info.value)
    assert f"{VOCAB_BPE}.gz" in message and VOCAB_SHA256[VOCAB_BPE + ".gz"] in message and "\n" not in message
    case = golden_cases["clip"][0]
    assert SimpleTokenizer().encode(case["text"]) == case["tokens"]  # the untouched CLIP file still reads


def test_named_folder_without_the_file_fails_in_one_line(vocab_dir, tmp_path, fresh_tokenizers, monkeypatch):
    shutil.copy(vocab_dir / f"{ENCODER_JSON}.gz", tmp_path)  # vocab.bpe is missing
    monkeypatch.setenv("GLIDE_VOCAB_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        get_encoder()
    message = str(info.value)
    assert VOCAB_BPE in message and str(tmp_path) in message and "\n" not in message


def test_bad_names_and_folders_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown vocabulary file"):
        vocab_file("merges.txt", str(tmp_path))
    with pytest.raises(ValueError, match="not a directory"):
        get_encoder(str(tmp_path / "missing"))
