"""CLIP-guided generation with the noised CLIP (the clip_guided notebook).

The base model runs without classifier-free guidance; at every step the sampler applies the
gradient of the CLIP similarity between the noised image and the prompt, scaled by
``guidance_scale`` (``clip.cond_fn([prompt] * n, guidance_scale)``): the ancestral sampler
shifts its mean, the others the model's eps (``glide_text2im.samplers``). Upsampling is the
text2im notebook's. CLIP reads at most 75 prompt tokens of its own BPE and drops the rest,
as in the original.
"""

from typing import Any, Dict, Optional

import torch

from ..bundled import demo_equivalent
from ..clip.model_creation import CLIPModel
from .base import DiffusionPipeline, PromptBatch, StageInputs
from .loading import LoadedModel, load_clip


class CLIPGuidedPipeline(DiffusionPipeline):
    """GLIDE with CLIP guidance: ``CLIPGuidedPipeline.from_pretrained()("a corgi").images``.

    ``from_pretrained`` also loads the noised CLIP: ``clip_image``, ``clip_text`` (checkpoint
    names or files, default the official "clip/image-enc" and "clip/text-enc") and
    ``clip_config`` (its YAML config: this path, a ``<image checkpoint>.yaml`` sidecar, or the
    official one); CLIP always runs in float32.
    """

    def __init__(self, base: LoadedModel, clip: CLIPModel, upsampler: Optional[LoadedModel] = None):
        super().__init__(base, upsampler)
        if clip.device != base.device:
            raise ValueError(f"the CLIP model is on {clip.device} but the base model on {base.device}")
        self.clip = clip

    @classmethod
    def _load_components(
        cls,
        device: torch.device,
        progress: bool,
        demo: bool,
        clip_image: str = "clip/image-enc",
        clip_text: str = "clip/text-enc",
        clip_config: Optional[str] = None,
    ) -> Dict[str, Any]:
        if demo:
            clip_image, clip_text = demo_equivalent(clip_image), demo_equivalent(clip_text)
        return dict(clip=load_clip(clip_image, clip_text, clip_config, device, progress))

    def _base_inputs(self, batch: PromptBatch, condition: None, guidance_scale: float) -> StageInputs:
        return StageInputs(
            self.base.text_kwargs(batch.prompt_rows, batch.truncate_prompts),
            cond_fn=self.clip.cond_fn(batch.prompt_rows, guidance_scale),
        )
