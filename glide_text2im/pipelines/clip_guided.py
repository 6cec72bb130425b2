"""CLIP-guided generation with the noised CLIP (the clip_guided notebook).

The base model runs without classifier-free guidance; every step's mean is shifted along the
gradient of the CLIP similarity between the noised image and the prompt, scaled by
``guidance_scale`` (``clip.cond_fn([prompt] * n, guidance_scale)``). Upsampling is the
text2im notebook's. CLIP reads at most 75 prompt tokens of its own BPE and drops the rest,
as in the original.
"""

from typing import Optional, Sequence, Union

import torch

from ..demo import demo_equivalent
from ..clip.model_creation import CLIPModel
from .base import DiffusionPipeline, Generators, PipelineOutput, Seed, StepCallback
from .loading import LoadedModel, Options, load_clip, load_model, pick_device
from .validation import check_count, check_guidance_scale, check_prompts


class CLIPGuidedPipeline(DiffusionPipeline):
    """GLIDE with CLIP guidance: ``CLIPGuidedPipeline.from_pretrained()("a corgi").images``."""

    def __init__(self, base: LoadedModel, clip: CLIPModel, upsampler: Optional[LoadedModel] = None):
        super().__init__(base, upsampler)
        if clip.device != base.device:
            raise ValueError(f"the CLIP model is on {clip.device} but the base model on {base.device}")
        self.clip = clip

    @classmethod
    def from_pretrained(
        cls,
        base: str = "base",
        upsampler: Optional[str] = "upsample",
        *,
        clip_image: str = "clip/image-enc",
        clip_text: str = "clip/text-enc",
        clip_config: Optional[str] = None,
        base_options: Optional[Options] = None,
        upsampler_options: Optional[Options] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
        progress: bool = True,
        demo: bool = False,
    ) -> "CLIPGuidedPipeline":
        """Load the base model, the upsampler and the noised CLIP (always float32; its YAML
        config from ``clip_config``, a ``<image checkpoint>.yaml`` sidecar, or the official one)."""
        if demo:
            base, upsampler = demo_equivalent(base), demo_equivalent(upsampler)
            clip_image, clip_text = demo_equivalent(clip_image), demo_equivalent(clip_text)
        device = pick_device(device)
        loaded_base = load_model(base, base_options, device, dtype, progress)
        loaded_up = load_model(upsampler, upsampler_options, device, dtype, progress) if upsampler else None
        clip = load_clip(clip_image, clip_text, clip_config, device, progress)
        return cls(loaded_base, clip, loaded_up)

    def __call__(
        self,
        prompts: Union[str, Sequence[str]],
        num_images_per_prompt: int = 1,
        guidance_scale: float = 3.0,
        steps: Union[str, int] = "100",
        sampler: str = "ancestral",
        spacing: Optional[str] = None,
        upsample: Optional[bool] = None,
        upsample_steps: Union[str, int] = "fast27",
        upsample_sampler: str = "ddim",
        upsample_temp: float = 0.997,
        seed: Optional[Seed] = None,
        generator: Optional[Generators] = None,
        callback: Optional[StepCallback] = None,
        progress: bool = False,
        return_tensors: bool = False,
        truncate_prompts: bool = False,
    ) -> PipelineOutput:
        """Generate with CLIP guidance of strength ``guidance_scale``; the other parameters are
        those of ``Text2ImPipeline.__call__`` (every built-in ``sampler`` applies the CLIP cond_fn)."""
        prompts = check_prompts(prompts)
        check_count(num_images_per_prompt, "num_images_per_prompt")
        check_guidance_scale(guidance_scale)
        self.check_prompts(prompts, truncate_prompts)
        diffusion, base_sampler = self._base_stage(steps, sampler, spacing)
        if not base_sampler.supports_cond_fn:
            raise ValueError(f"sampler {sampler!r} takes no cond_fn, so it cannot apply CLIP guidance")
        upsampling = self._upsampling(upsample, upsample_steps, upsample_sampler, upsample_temp)
        batch = self._prompt_batch(prompts, num_images_per_prompt, seed, generator, truncate_prompts)
        with self._reporter(diffusion, upsampling, callback, progress) as report:
            samples_64 = self._sample(
                self.base, batch, diffusion, base_sampler, report,
                model_kwargs=self.base.text_kwargs(batch.prompt_rows, truncate_prompts),
                cond_fn=self.clip.cond_fn(batch.prompt_rows, guidance_scale),
            )
            samples_256 = self._upsample(batch, samples_64, upsampling, report)
        settings = self._settings(num_images_per_prompt, guidance_scale, steps, base_sampler, spacing, upsampling)
        return batch.output(samples_64, samples_256, return_tensors, settings)
