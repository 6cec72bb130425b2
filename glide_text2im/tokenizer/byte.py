"""A byte-level tokenizer for small models: the UTF-8 bytes of the lowercased text.

Ids 0..255 are bytes and 256 is the end token, which also pads. The interface matches the
U-Net's BPE encoder (``encode``, ``decode``, ``n_vocab``, ``end_token``,
``padded_tokens_and_mask``), so a model built with a 257-entry token embedding can use it
in its place.
"""

from typing import List, Sequence, Tuple


class ByteEncoder:
    """Text to UTF-8 byte ids (lowercased first, like the BPE encoder) and back."""

    @property
    def n_vocab(self) -> int:
        return 257

    @property
    def end_token(self) -> int:
        return 256

    def encode(self, text: str) -> List[int]:
        """The UTF-8 bytes of ``text.lower()``, ids in [0, 255]; no end token is added."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.lower().encode("utf-8"))

    def decode(self, tokens: Sequence[int]) -> str:
        """Bytes back to text; end (padding) tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        ids = [int(token) for token in tokens]
        for token in ids:
            if not 0 <= token <= self.end_token:
                raise ValueError(f"token {token} is outside the byte vocabulary [0, {self.end_token}]")
        return bytes(token for token in ids if token != self.end_token).decode("utf-8", errors="replace")

    def padded_tokens_and_mask(self, tokens: Sequence[int], text_ctx: int) -> Tuple[List[int], List[bool]]:
        """Keep the first ``text_ctx`` tokens and right-pad with ``end_token`` to ``text_ctx``;
        the mask is True on kept tokens and False on padding."""
        if not isinstance(text_ctx, int) or text_ctx < 0:
            raise ValueError(f"text_ctx must be a non-negative int, got {text_ctx!r}")
        kept = list(tokens)[:text_ctx]
        padding = text_ctx - len(kept)
        return kept + [self.end_token] * padding, [True] * len(kept) + [False] * padding
