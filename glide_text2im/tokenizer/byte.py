"""Byte-level tokenizers for small models: the UTF-8 bytes of the lowercased text.

Ids 0..255 are bytes; the ids above them are special tokens, which decoding drops
(``ByteVocabulary`` encodes and decodes for both tokenizers).

- ``ByteEncoder`` (the U-Net's, ``n_vocab`` 257): 256 is the end token, which also pads. Its
  interface matches the U-Net's BPE encoder (``encode``, ``decode``, ``n_vocab``,
  ``end_token``, ``padded_tokens_and_mask``), so a model built with a 257-entry token
  embedding can use it in its place.
- ``ByteCLIPTokenizer`` (the noised CLIP's, ``n_vocab`` 258): 256 is the start token, 257 the
  end token and 0 pads. Its interface is the part of the CLIP ``SimpleTokenizer`` that
  ``CLIPModel`` and the CLIP training use (``encode``, ``decode``, ``start_token``,
  ``end_token``, ``padded_tokens_and_len``), so the demo CLIP needs no BPE vocabulary.
"""

from typing import List, Sequence, Tuple

N_BYTES = 256  # ids 0..255 are the bytes themselves


class ByteVocabulary:
    """UTF-8 bytes of the lowercased text as ids 0..255, special ids from 256 to ``n_vocab - 1``."""

    n_vocab = N_BYTES

    def encode(self, text: str) -> List[int]:
        """The UTF-8 bytes of ``text.lower()``, ids in [0, 255]; no special token is added."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.lower().encode("utf-8"))

    def decode(self, tokens: Sequence[int]) -> str:
        """Ids in [0, ``n_vocab``) back to text: special ids (256 and up) are dropped, invalid
        UTF-8 becomes U+FFFD; an id outside the vocabulary raises a ValueError."""
        ids = [int(token) for token in tokens]
        for token in ids:
            if not 0 <= token < self.n_vocab:
                raise ValueError(f"token {token} is outside the byte vocabulary [0, {self.n_vocab - 1}]")
        return bytes(token for token in ids if token < N_BYTES).decode("utf-8", errors="replace")


class ByteEncoder(ByteVocabulary):
    """The U-Net's byte tokenizer: 256 ends and pads (``n_vocab`` 257)."""

    n_vocab = N_BYTES + 1

    @property
    def end_token(self) -> int:
        return N_BYTES

    def padded_tokens_and_mask(self, tokens: Sequence[int], text_ctx: int) -> Tuple[List[int], List[bool]]:
        """Keep the first ``text_ctx`` tokens and right-pad with ``end_token`` to ``text_ctx``;
        the mask is True on kept tokens and False on padding."""
        if not isinstance(text_ctx, int) or text_ctx < 0:
            raise ValueError(f"text_ctx must be a non-negative int, got {text_ctx!r}")
        kept = list(tokens)[:text_ctx]
        padding = text_ctx - len(kept)
        return kept + [self.end_token] * padding, [True] * len(kept) + [False] * padding


class ByteCLIPTokenizer(ByteVocabulary):
    """The noised CLIP's byte tokenizer: start (256) and end (257) tokens frame the bytes, 0 pads
    (``n_vocab`` 258)."""

    n_vocab = N_BYTES + 2

    @property
    def start_token(self) -> int:
        return N_BYTES

    @property
    def end_token(self) -> int:
        return N_BYTES + 1

    def padded_tokens_and_len(self, tokens: Sequence[int], text_ctx: int) -> Tuple[List[int], int]:
        """``[start] + tokens[:text_ctx - 2] + [end]`` right-padded with 0 to ``text_ctx``, and
        its length before padding (start and end included), like ``SimpleTokenizer``."""
        if not isinstance(text_ctx, int) or text_ctx < 2:
            raise ValueError(f"text_ctx must be an int of at least 2 (start and end tokens), got {text_ctx!r}")
        framed = [self.start_token] + list(tokens)[: text_ctx - 2] + [self.end_token]
        return framed + [0] * (text_ctx - len(framed)), len(framed)
