"""The noised CLIP's tokenizer reproduces the reference CLIP ids, padding, lengths and decoding."""

import json

import pytest

from glide_text2im.tokenizer.simple_tokenizer import SimpleTokenizer, clean_text


@pytest.fixture(scope="module")
def golden(golden_dir) -> dict:
    return json.loads((golden_dir / "tokenizer_clip.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer(vocab_dir):
    return SimpleTokenizer(str(vocab_dir / "bpe_simple_vocab_16e6.txt.gz"))


def test_special_tokens_and_vocab_size(tokenizer, golden):
    assert tokenizer.start_token == golden["start_token"] == 49406
    assert tokenizer.end_token == golden["end_token"] == 49407
    assert len(tokenizer.encoder) == golden["vocab_size"] == 49408


def test_encode_matches_every_golden_case(tokenizer, golden):
    wrong = [case["text"] for case in golden["cases"] if tokenizer.encode(case["text"]) != case["tokens"]]
    assert len(golden["cases"]) == 55
    assert wrong == []


def test_padded_tokens_and_len_match_every_golden_case(tokenizer, golden):
    text_ctx = golden["text_ctx"]
    wrong = [
        case["text"]
        for case in golden["cases"]
        if tokenizer.padded_tokens_and_len(case["tokens"], text_ctx) != (case["padded_tokens"], case["text_len"])
    ]
    assert wrong == []
    assert any(len(case["tokens"]) > text_ctx - 2 for case in golden["cases"])  # truncation is covered


def test_decode_matches_every_golden_case(tokenizer, golden):
    wrong = [case["text"] for case in golden["cases"] if tokenizer.decode(case["tokens"]) != case["decoded"]]
    assert wrong == []


def test_default_tokenizer_reads_the_packaged_vocabulary(tokenizer, golden, monkeypatch):
    monkeypatch.delenv("GLIDE_VOCAB_DIR", raising=False)
    default = SimpleTokenizer()
    case = golden["cases"][0]
    assert default.encode(case["text"]) == case["tokens"]
    assert default.bpe_ranks == tokenizer.bpe_ranks


def test_special_tokens_in_text_are_recognised(tokenizer):
    hello = tokenizer.encode("hello")
    assert tokenizer.encode("<|startoftext|>hello<|endoftext|>") == [49406, *hello, 49407]
    assert tokenizer.decode([49406, *hello, 49407]) == "<|startoftext|>hello <|endoftext|>"


def test_padding_of_empty_prompt_and_bad_context(tokenizer):
    assert tokenizer.encode("  \n ") == []
    assert tokenizer.padded_tokens_and_len([], 5) == ([49406, 49407, 0, 0, 0], 2)
    assert tokenizer.padded_tokens_and_len([7, 8, 9], 4) == ([49406, 7, 8, 49407], 4)
    with pytest.raises(ValueError, match="text_ctx"):
        tokenizer.padded_tokens_and_len([], 1)


def test_clean_text():
    assert clean_text("  A&amp;amp;B \t\n Caf\u00c3\u00a9  ") == "a&b café"
