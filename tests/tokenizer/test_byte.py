import pytest

from glide_text2im.tokenizer.byte import ByteCLIPTokenizer, ByteEncoder


@pytest.fixture
def encoder():
    return ByteEncoder()


def test_vocab_size_and_end_token(encoder):
    assert encoder.n_vocab == 257
    assert encoder.end_token == 256


def test_encode_gives_utf8_bytes_of_lowercased_text(encoder):
    assert encoder.encode("A Red circle!") == [97, 32, 114, 101, 100, 32, 99, 105, 114, 99, 108, 101, 33]
    assert encoder.encode("Straße é") == [115, 116, 114, 97, 195, 159, 101, 32, 195, 169]
    assert encoder.encode("€") == [226, 130, 172]
    assert encoder.encode("") == []


def test_decode_inverts_encode(encoder):
    assert encoder.decode([115, 116, 114, 97, 195, 159, 101]) == "straße"
    text = "top left: a big red circle over white"
    assert encoder.decode(encoder.encode(text)) == text


def test_decode_drops_end_tokens_and_replaces_invalid_utf8(encoder):
    assert encoder.decode([104, 105, 256, 256]) == "hi"
    assert encoder.decode([104, 195]) == "h\ufffd"
    assert encoder.decode([255]) == "\ufffd"


def test_padded_tokens_and_mask_pads_with_end_token(encoder):
    tokens, mask = encoder.padded_tokens_and_mask([97, 98], 5)
    assert tokens == [97, 98, 256, 256, 256]
    assert mask == [True, True, False, False, False]


def test_padded_tokens_and_mask_truncates_to_text_ctx(encoder):
    tokens, mask = encoder.padded_tokens_and_mask(encoder.encode("abcdef"), 4)
    assert tokens == [97, 98, 99, 100]
    assert mask == [True] * 4
    assert encoder.padded_tokens_and_mask([], 2) == ([256, 256], [False, False])


def test_bad_input_is_rejected(encoder):
    with pytest.raises(TypeError, match="str"):
        encoder.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        encoder.decode([257])
    with pytest.raises(ValueError, match="text_ctx"):
        encoder.padded_tokens_and_mask([1], -1)


def test_clip_tokenizer_frames_the_same_bytes_with_start_and_end_tokens(encoder):
    clip = ByteCLIPTokenizer()
    assert (clip.n_vocab, clip.start_token, clip.end_token) == (258, 256, 257)
    assert clip.encode("Straße é") == encoder.encode("Straße é") == [115, 116, 114, 97, 195, 159, 101, 32, 195, 169]
    assert clip.padded_tokens_and_len([114, 101, 100], 7) == ([256, 114, 101, 100, 257, 0, 0], 5)
    assert clip.padded_tokens_and_len([1, 2, 3, 4], 4) == ([256, 1, 2, 257], 4)
    assert clip.decode([256, 114, 101, 100, 257, 0]) == "red\x00"  # 0 is the byte NUL, as in the CLIP's padding
    assert clip.decode([256, 104, 195, 257]) == "h\ufffd"


def test_clip_tokenizer_rejects_bad_input():
    clip = ByteCLIPTokenizer()
    with pytest.raises(TypeError, match="str"):
        clip.encode(None)
    with pytest.raises(ValueError, match=r"token 258 is outside the byte vocabulary \[0, 257\]"):
        clip.decode([258])
    with pytest.raises(ValueError, match="text_ctx must be an int of at least 2"):
        clip.padded_tokens_and_len([1], 1)
