"""The noised CLIP's text tokenizer: CLIP's BPE over cleaned, lower-cased text.

Ids: 0..255 the byte characters, 256..511 the same with the end-of-word mark `</w>`,
512..49405 the 48 894 merged symbols, 49406 `<|startoftext|>`, 49407 `<|endoftext|>`.
"""

import functools
import html
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import ftfy
import regex

from glide_text2im.download import is_cloud_path
from glide_text2im.tokenizer.bpe import bytes_to_unicode, merge_symbols
from glide_text2im.tokenizer.vocab import CLIP_BPE, read_vocab_file, vocab_file

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"
NUM_MERGES = 49152 - 256 - 2  # vocabulary size before CLIP added its own two special tokens

PRETOKEN_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)

_WORD_CACHE_SIZE = 100_000


def clean_text(text: str) -> str:
    """ftfy repair, HTML-unescape twice, collapse whitespace runs to one space, strip, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class SimpleTokenizer:
    """CLIP's BPE tokenizer.

    :param bpe_path: a copy of `bpe_simple_vocab_16e6.txt` (or `.txt.gz`); default: the one in
        `$GLIDE_VOCAB_DIR`, else the package's copy (see `glide_text2im.tokenizer.vocab`).
    """

    def __init__(self, bpe_path: Optional[str] = None):
        path = bpe_path if bpe_path is not None else vocab_file(CLIP_BPE)
        merges = _load_merges(path if is_cloud_path(path) else os.path.abspath(path))
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        byte_chars = list(self.byte_encoder.values())
        vocab = byte_chars + [c + END_OF_WORD for c in byte_chars] + ["".join(pair) for pair in merges]
        vocab += [START_OF_TEXT, END_OF_TEXT]
        self.encoder = {symbol: i for i, symbol in enumerate(vocab)}
        self.decoder = {i: symbol for symbol, i in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._word_cache: Dict[str, List[int]] = {}

    @property
    def start_token(self) -> int:
        return self.encoder[START_OF_TEXT]

    @property
    def end_token(self) -> int:
        return self.encoder[END_OF_TEXT]

    def encode(self, text: str) -> List[int]:
        """Ids of the cleaned text (see `clean_text`); `<|startoftext|>` / `<|endoftext|>` written
        in the text become their special ids, no others are added."""
        tokens = []
        for word in PRETOKEN_PATTERN.findall(clean_text(text)):
            tokens.extend(self._encode_word(word))
        return tokens

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of `tokens`, with every end-of-word mark turned into a space."""
        chars = "".join(self.decoder[int(t)] for t in tokens)
        text = bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ")

    def padded_tokens_and_len(self, tokens: Sequence[int], text_ctx: int) -> Tuple[List[int], int]:
        """`[start] + tokens[:text_ctx - 2] + [end]` right-padded with 0 to length `text_ctx`,
        and its length before padding (start and end included)."""
        if text_ctx < 2:
            raise ValueError(f"text_ctx must be at least 2 (start and end tokens), got {text_ctx}")
        framed = [self.start_token] + list(tokens)[: text_ctx - 2] + [self.end_token]
        return framed + [0] * (text_ctx - len(framed)), len(framed)

    def _encode_word(self, word: str) -> List[int]:
        ids = self._word_cache.get(word)
        if ids is None:
            if word in (START_OF_TEXT, END_OF_TEXT):
                ids = [self.encoder[word]]
            else:
                chars = [self.byte_encoder[b] for b in word.encode("utf-8")]
                symbols = (*chars[:-1], chars[-1] + END_OF_WORD)
                ids = [self.encoder[s] for s in merge_symbols(symbols, self.bpe_ranks)]
            if len(self._word_cache) >= _WORD_CACHE_SIZE:
                self._word_cache.clear()
            self._word_cache[word] = ids
        return ids


@functools.lru_cache(maxsize=None)
def _load_merges(bpe_path: str) -> Tuple[Tuple[str, str], ...]:
    """The first `NUM_MERGES` merge rules of `bpe_path` (file lines 1.. after the header)."""
    lines = read_vocab_file(bpe_path, CLIP_BPE).split("\n")[1 : NUM_MERGES + 1]
    return tuple(tuple(line.split()) for line in lines)
