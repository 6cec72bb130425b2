"""The demo CLIP's byte-level tokenizer, now ``glide_text2im.tokenizer.byte.ByteCLIPTokenizer``
(re-exported here so that the old import path keeps working)."""

from glide_text2im.tokenizer.byte import ByteCLIPTokenizer  # noqa: F401  (re-exported)
