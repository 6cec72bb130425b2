"""The U-Net tokenizer reproduces the reference GPT-2 BPE ids, padding, masks and decoding."""

import json

import pytest

from glide_text2im.tokenizer import bpe
from glide_text2im.tokenizer.bpe import Encoder, bytes_to_unicode, get_encoder, merge_symbols


@pytest.fixture(scope="module")
def golden(golden_dir) -> dict:
    return json.loads((golden_dir / "tokenizer_gpt2.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def encoder(vocab_dir):
    return get_encoder(str(vocab_dir))


def test_vocab_size_and_end_token(encoder, golden):
    assert encoder.n_vocab == golden["n_vocab"] == 50257
    assert encoder.end_token == golden["end_token"] == 50256


def test_encode_matches_every_golden_case(encoder, golden):
    wrong = [case["text"] for case in golden["cases"] if encoder.encode(case["text"]) != case["tokens"]]
    assert len(golden["cases"]) == 55
    assert wrong == []


def test_padded_tokens_and_mask_match_every_golden_case(encoder, golden):
    text_ctx = golden["text_ctx"]
    wrong = [
        case["text"]
        for case in golden["cases"]
        if encoder.padded_tokens_and_mask(case["tokens"], text_ctx) != (case["padded_tokens"], case["mask"])
    ]
    assert wrong == []
    assert any(len(case["tokens"]) > text_ctx for case in golden["cases"])  # truncation is covered


def test_decode_matches_every_golden_case(encoder, golden):
    wrong = [case["text"] for case in golden["cases"] if encoder.decode(case["tokens"]) != case["decoded"]]
    assert wrong == []


def test_text_is_lowercased_and_endoftext_is_ordinary_text(encoder):
    assert encoder.encode("A Red CUBE") == encoder.encode("a red cube")
    ids = encoder.encode("<|endoftext|>")
    assert len(ids) == 7 and encoder.end_token not in ids


def test_empty_text_pads_to_all_end_tokens(encoder):
    assert encoder.encode("") == []
    assert encoder.padded_tokens_and_mask([], 4) == ([50256] * 4, [False] * 4)
    assert encoder.padded_tokens_and_mask([1, 2, 3], 2) == ([1, 2], [True, True])
    with pytest.raises(ValueError, match="text_ctx"):
        encoder.padded_tokens_and_mask([1], -1)


def test_repeated_words_are_merged_once(monkeypatch):
    calls = []

    def counting_merge(symbols, ranks):
        calls.append(symbols)
        return merge_symbols(symbols, ranks)

    monkeypatch.setattr(bpe, "merge_symbols", counting_merge)
    tiny = Encoder({"a": 0, "b": 1, "ab": 2, "\u0120": 3, "\u0120ab": 4}, [("a", "b"), ("\u0120", "ab")])
    assert tiny.encode("AB ab ab") == [2, 4, 4]
    assert tiny.encode("ab ab") == [2, 4]
    assert calls == [("a", "b"), ("\u0120", "a", "b")]
    assert tiny.n_vocab == 5 and tiny.end_token == 4 and tiny.decode([2, 4]) == "ab ab"


def test_get_encoder_is_built_once_per_vocab_dir(vocab_dir, monkeypatch):
    monkeypatch.setenv("GLIDE_VOCAB_DIR", str(vocab_dir))
    assert get_encoder() is get_encoder() is get_encoder(str(vocab_dir))


def test_byte_to_unicode_table():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord("!")] == "!" and table[0xFF] == "\xff"
    assert table[0] == chr(256) and table[ord(" ")] == "\u0120" and table[0xAD] == chr(256 + 67)
    assert list(table)[:3] == [33, 34, 35] and list(table)[-1] == 0xAD


def test_merge_symbols_takes_lowest_rank_first_and_all_occurrences():
    ranks = {("a", "b"): 1, ("b", "c"): 0, ("a", "a"): 2}
    assert merge_symbols(("a", "b", "c"), ranks) == ("a", "bc")
    assert merge_symbols(("a", "b", "x", "a", "b"), ranks) == ("ab", "x", "ab")
    assert merge_symbols(("a", "a", "a"), ranks) == ("aa", "a")
    assert merge_symbols(("x",), ranks) == ("x",)
