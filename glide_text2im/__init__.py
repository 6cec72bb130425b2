"""GLIDE (filtered) text-to-image diffusion: checkpoint-compatible models, samplers and pipelines."""

__version__ = "0.2.0"
