"""Tokenizers: the U-Net's lowercased GPT-2 BPE, the noised CLIP's SimpleTokenizer, and the
byte-level ones of the small models (``byte``: ``ByteEncoder``, ``ByteCLIPTokenizer``)."""
