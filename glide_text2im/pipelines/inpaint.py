"""Inpainting: regenerate the masked part of an image from a prompt (the inpaint notebook).

The base stage runs the inpainting model at 64×64 with classifier-free guidance, the source
image and keep-mask as ``inpaint_image`` / ``inpaint_mask`` and a ``denoised_fn`` that pastes
the kept pixels into every x_0 prediction, so they come out unchanged. The upsampling stage runs
the inpainting upsampler at 256×256 conditioned the same way, with ``low_res`` = the 64×64 result.
"""

from typing import Optional, Sequence, Union

import torch

from ..demo import demo_equivalent
from ..guidance import inpaint_denoised_fn
from .base import DiffusionPipeline, Generators, PipelineOutput, Seed, StepCallback
from .images import ImageLike, image_to_tensor, keep_masks, load_image, load_mask
from .loading import Options, load_model, pick_device
from .validation import check_count, check_guidance_scale, check_prompts, check_square_image


class InpaintPipeline(DiffusionPipeline):
    """GLIDE inpainting: ``InpaintPipeline.from_pretrained()("a corgi", image, mask).images``.

    Masks mark the region to REGENERATE (white / 1 / True); black / 0 / False is kept.
    """

    inpainting = True

    @classmethod
    def from_pretrained(
        cls,
        base: str = "base-inpaint",
        upsampler: Optional[str] = "upsample-inpaint",
        *,
        base_options: Optional[Options] = None,
        upsampler_options: Optional[Options] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
        progress: bool = True,
        demo: bool = False,
    ) -> "InpaintPipeline":
        """Load the inpainting base model and upsampler; see ``Text2ImPipeline.from_pretrained``."""
        if demo:
            base, upsampler = demo_equivalent(base), demo_equivalent(upsampler)
        device = pick_device(device)
        loaded_base = load_model(base, base_options, device, dtype, progress)
        loaded_up = load_model(upsampler, upsampler_options, device, dtype, progress) if upsampler else None
        return cls(loaded_base, loaded_up)

    def __call__(
        self,
        prompts: Union[str, Sequence[str]],
        image: ImageLike,
        mask: ImageLike,
        num_images_per_prompt: int = 1,
        guidance_scale: float = 5.0,
        steps: Union[str, int] = "100",
        sampler: str = "ancestral",
        spacing: Optional[str] = None,
        upsample: Optional[bool] = None,
        upsample_steps: Union[str, int] = "fast27",
        upsample_sampler: str = "ancestral",
        upsample_temp: float = 0.997,
        seed: Optional[Seed] = None,
        generator: Optional[Generators] = None,
        callback: Optional[StepCallback] = None,
        progress: bool = False,
        return_tensors: bool = False,
        truncate_prompts: bool = False,
    ) -> PipelineOutput:
        """Regenerate the masked region of ``image`` for each prompt.

        :param image: a square path, PIL image, [H x W x 3] array or [3 x H x W] tensor in
            [-1, 1]; it is resized (bicubic) to 64×64 and 256×256 like the notebook does. A
            non-square image is an error (it would be squashed): crop it first.
        :param mask: the region to regenerate (see ``images.load_mask``), of the image's size
            or any size with its aspect ratio; it must select at least half of one 64×64 pixel.
        The other parameters are those of ``Text2ImPipeline.__call__`` (the defaults follow
        the inpaint notebook: guidance 5, ancestral upsampling).
        """
        prompts = check_prompts(prompts)
        check_count(num_images_per_prompt, "num_images_per_prompt")
        check_guidance_scale(guidance_scale)
        self.check_prompts(prompts, truncate_prompts)
        source = load_image(image)
        check_square_image(source.size)
        regenerate = load_mask(mask)
        up_size = self.upsampler.image_size if self.upsampler is not None else 4 * self.base.image_size
        keep_64, keep_256 = keep_masks(regenerate, source.size, self.base.image_size, up_size, self.device)
        image_64 = image_to_tensor(source, self.base.image_size, self.device)
        diffusion, base_sampler = self._base_stage(steps, sampler, spacing)
        upsampling = self._upsampling(upsample, upsample_steps, upsample_sampler, upsample_temp)
        inpaint_256 = (image_to_tensor(source, up_size, self.device), keep_256) if upsampling else None
        batch = self._prompt_batch(prompts, num_images_per_prompt, seed, generator, truncate_prompts)
        with self._reporter(diffusion, upsampling, callback, progress) as report:
            model_kwargs = self.base.text_kwargs(batch.prompt_rows + [None] * batch.rows, truncate_prompts)
            model_kwargs["inpaint_image"] = (image_64 * keep_64).repeat(2 * batch.rows, 1, 1, 1)
            model_kwargs["inpaint_mask"] = keep_64.repeat(2 * batch.rows, 1, 1, 1)
            samples_64 = self._sample(
                self.base, batch, diffusion, base_sampler, report,
                model_kwargs=model_kwargs, guidance_scale=guidance_scale,
                denoised_fn=inpaint_denoised_fn(model_kwargs["inpaint_image"], model_kwargs["inpaint_mask"]),
            )
            samples_256 = self._upsample(batch, samples_64, upsampling, report, inpaint_256)
        settings = self._settings(num_images_per_prompt, guidance_scale, steps, base_sampler, spacing, upsampling)
        return batch.output(samples_64, samples_256, return_tensors, settings)
