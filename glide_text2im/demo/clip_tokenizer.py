"""A byte-level tokenizer for the demo's noised CLIP, so that it needs no BPE vocabulary.

Ids 0..255 are the UTF-8 bytes of the lowercased text, 256 is the start token and 257 the
end token (``n_vocab`` 258). The interface is the part of the CLIP ``SimpleTokenizer`` that
``CLIPModel`` and the CLIP training use: ``encode``, ``decode``, ``start_token``,
``end_token`` and ``padded_tokens_and_len``.
"""

from typing import List, Sequence, Tuple

from glide_text2im.tokenizer.byte import ByteEncoder


class ByteCLIPTokenizer:
    """Text to UTF-8 byte ids framed by start and end tokens, padded with 0."""

    def __init__(self):
        self._bytes = ByteEncoder()

    @property
    def n_vocab(self) -> int:
        return 258

    @property
    def start_token(self) -> int:
        return 256

    @property
    def end_token(self) -> int:
        return 257

    def encode(self, text: str) -> List[int]:
        """The UTF-8 bytes of ``text.lower()``, ids in [0, 255]; no start or end token."""
        return self._bytes.encode(text)

    def decode(self, tokens: Sequence[int]) -> str:
        """Bytes back to text; start and end tokens are dropped."""
        ids = [int(token) for token in tokens]
        for token in ids:
            if not 0 <= token <= self.end_token:
                raise ValueError(f"token {token} is outside the byte CLIP vocabulary [0, {self.end_token}]")
        return bytes(token for token in ids if token < self.start_token).decode("utf-8", errors="replace")

    def padded_tokens_and_len(self, tokens: Sequence[int], text_ctx: int) -> Tuple[List[int], int]:
        """``[start] + tokens[:text_ctx - 2] + [end]`` right-padded with 0 to ``text_ctx``, and
        its length before padding (start and end included), like ``SimpleTokenizer``."""
        if not isinstance(text_ctx, int) or text_ctx < 2:
            raise ValueError(f"text_ctx must be an int of at least 2 (start and end tokens), got {text_ctx!r}")
        framed = [self.start_token] + list(tokens)[: text_ctx - 2] + [self.end_token]
        return framed + [0] * (text_ctx - len(framed)), len(framed)
