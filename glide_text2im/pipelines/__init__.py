"""High-level GLIDE pipelines built on the low-level API.

    from glide_text2im.pipelines import Text2ImPipeline

    pipe = Text2ImPipeline.from_pretrained()            # official "base" + "upsample"
    out = pipe(["a corgi in a field", "a red cube"], num_images_per_prompt=2, seed=0)
    out.images[0].save("corgi.png")                     # 256×256 PIL images, prompt by prompt
    out.save("outputs")                                 # all of them, with prompt, seed and settings as PNG text

- :class:`Text2ImPipeline`, :class:`InpaintPipeline`, :class:`CLIPGuidedPipeline`
  (``from_pretrained`` loads official names, registered names or local ``.pt`` files with a
  ``.json`` options sidecar);
- :func:`load_model`, :func:`register_checkpoint_options`, :func:`save_options`: checkpoints
  and their options;
- :func:`register_sampler` and ``SAMPLERS``: samplers by name (those of ``glide_text2im.samplers``);
- :class:`PipelineOutput` (``save``: PNG files with the command's metadata); the argument
  checks the command shares are in ``validation``; errors :class:`PromptTooLongError`, :class:`NonFiniteOutputError`.
"""

from ..samplers import SAMPLERS, register_sampler
from .base import DiffusionPipeline, NonFiniteOutputError, PipelineOutput
from .clip_guided import CLIPGuidedPipeline
from .inpaint import InpaintPipeline
from .loading import (
    CHECKPOINT_OPTIONS,
    LoadedModel,
    PromptTooLongError,
    checkpoint_options,
    load_clip,
    load_model,
    register_checkpoint_options,
    save_options,
)
from .text2im import Text2ImPipeline

__all__ = [
    "CHECKPOINT_OPTIONS",
    "CLIPGuidedPipeline",
    "DiffusionPipeline",
    "InpaintPipeline",
    "LoadedModel",
    "NonFiniteOutputError",
    "PipelineOutput",
    "PromptTooLongError",
    "SAMPLERS",
    "Text2ImPipeline",
    "checkpoint_options",
    "load_clip",
    "load_model",
    "register_checkpoint_options",
    "register_sampler",
    "save_options",
]
