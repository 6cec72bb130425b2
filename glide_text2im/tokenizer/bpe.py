"""The U-Net's text tokenizer: GPT-2 byte-level BPE applied to the lower-cased text.

`get_encoder().encode("A corgi")` gives GPT-2 ids (0..50256) with no special tokens;
`padded_tokens_and_mask` turns them into the fixed-length `tokens` / `mask` the U-Net takes.
"""

import functools
import json
from typing import Dict, List, Optional, Sequence, Tuple

import regex

from glide_text2im.tokenizer.vocab import ENCODER_JSON, VOCAB_BPE, read_vocab, resolve_vocab_dir

# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other-symbol runs (each with
# at most one leading space) and whitespace.
PRETOKEN_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

_WORD_CACHE_SIZE = 100_000


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> character table.

    Printable bytes 33-126, 161-172 and 174-255 map to the character of the same code; the
    other 68 bytes, in increasing order, map to chr(256), chr(257), ... Dict order is the
    printable bytes first, then the others (the order CLIP uses for its first 256 ids).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def merge_symbols(symbols: Tuple[str, ...], bpe_ranks: Dict[Tuple[str, str], int]) -> Tuple[str, ...]:
    """Apply BPE to one word: repeatedly merge every occurrence (left to right, without overlap)
    of the adjacent pair with the lowest rank, until no adjacent pair has a rank."""
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda pair: bpe_ranks.get(pair, float("inf")))
        if best not in bpe_ranks:
            break
        merged = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = tuple(merged)
    return symbols


class Encoder:
    """GPT-2 byte-level BPE over lower-cased text.

    :param encoder: BPE symbol -> id (50257 entries for GPT-2).
    :param bpe_merges: merge rules in rank order.
    """

    def __init__(self, encoder: Dict[str, int], bpe_merges: Sequence[Tuple[str, str]]):
        self.encoder = encoder
        self.decoder = {i: symbol for symbol, i in encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(bpe_merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._word_cache: Dict[str, List[int]] = {}

    @property
    def n_vocab(self) -> int:
        return len(self.encoder)

    @property
    def end_token(self) -> int:
        """`<|endoftext|>`, the last id; also the padding token."""
        return self.n_vocab - 1

    def encode(self, text: str) -> List[int]:
        """Ids of `text` after lower-casing; no start/end tokens are added."""
        tokens = []
        for word in PRETOKEN_PATTERN.findall(text.lower()):
            tokens.extend(self._encode_word(word))
        return tokens

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of `tokens` (invalid UTF-8 becomes U+FFFD)."""
        chars = "".join(self.decoder[int(t)] for t in tokens)
        return bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")

    def padded_tokens_and_mask(self, tokens: Sequence[int], text_ctx: int) -> Tuple[List[int], List[bool]]:
        """The first `text_ctx` tokens right-padded with `end_token` to length `text_ctx`, and a
        mask that is True on the kept tokens and False on the padding."""
        if text_ctx < 0:
            raise ValueError(f"text_ctx must be non-negative, got {text_ctx}")
        kept = list(tokens)[:text_ctx]
        padding = text_ctx - len(kept)
        return kept + [self.end_token] * padding, [True] * len(kept) + [False] * padding

    def _encode_word(self, word: str) -> List[int]:
        ids = self._word_cache.get(word)
        if ids is None:
            symbols = tuple(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids = [self.encoder[s] for s in merge_symbols(symbols, self.bpe_ranks)]
            if len(self._word_cache) >= _WORD_CACHE_SIZE:
                self._word_cache.clear()
            self._word_cache[word] = ids
        return ids


def get_encoder(vocab_dir: Optional[str] = None) -> Encoder:
    """The U-Net tokenizer, built once per vocabulary folder (`vocab_dir`, else
    `$GLIDE_VOCAB_DIR`, else the copy shipped with the package; see `glide_text2im.tokenizer.vocab`)."""
    return _load_encoder(resolve_vocab_dir(vocab_dir))


@functools.lru_cache(maxsize=None)
def _load_encoder(vocab_dir: Optional[str]) -> Encoder:
    encoder = json.loads(read_vocab(ENCODER_JSON, vocab_dir))
    merge_lines = read_vocab(VOCAB_BPE, vocab_dir).split("\n")[1:-1]
    return Encoder(encoder, [tuple(line.split()) for line in merge_lines])
