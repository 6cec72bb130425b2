"""Text to image: classifier-free-guided base model, then the upsampler (the text2im notebook)."""

from .base import DiffusionPipeline


class Text2ImPipeline(DiffusionPipeline):
    """GLIDE text-to-image: ``Text2ImPipeline.from_pretrained()(["a corgi", "a red cube"]).images``.

    The stages are conditioned as :class:`DiffusionPipeline` does by default: the prompt with
    classifier-free guidance at 64×64, then the prompt and the 64×64 image in the upsampler.
    """
