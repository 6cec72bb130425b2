"""The noised CLIP model used for CLIP-guided sampling."""
