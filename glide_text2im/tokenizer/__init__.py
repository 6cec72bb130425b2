"""Tokenizers: the U-Net's lowercased GPT-2 BPE and the noised CLIP's SimpleTokenizer."""
