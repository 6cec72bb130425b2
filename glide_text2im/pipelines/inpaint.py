"""Inpainting: regenerate the masked part of an image from a prompt (the inpaint notebook).

The base stage runs the inpainting model at 64×64 with classifier-free guidance, the source
image and keep-mask as ``inpaint_image`` / ``inpaint_mask`` and a ``denoised_fn`` that pastes
the kept pixels into every x_0 prediction, so they come out unchanged. The upsampling stage runs
the inpainting upsampler at 256×256 conditioned the same way, with ``low_res`` = the 64×64 result.
"""

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch

from ..guidance import both_halves, inpaint_denoised_fn
from .base import DiffusionPipeline, PipelineOutput, PromptBatch, StageInputs
from .images import ImageLike, image_to_tensor, keep_masks, load_image, load_mask
from .validation import check_square_image


@dataclass
class InpaintInputs:
    """The source image at both sizes, [1 x 3 x S x S] in [-1, 1], and its keep masks [1 x 1 x S x S] (1 = keep)."""

    image_64: torch.Tensor
    keep_64: torch.Tensor
    image_256: torch.Tensor
    keep_256: torch.Tensor


class InpaintPipeline(DiffusionPipeline):
    """GLIDE inpainting: ``InpaintPipeline.from_pretrained()("a corgi", image, mask).images``.

    Masks mark the region to REGENERATE (white / 1 / True); black / 0 / False is kept. The
    defaults follow the inpaint notebook: guidance 5, ancestral upsampling.
    """

    CHECKPOINTS = ("base-inpaint", "upsample-inpaint")
    DEFAULTS = dict(DiffusionPipeline.DEFAULTS, guidance_scale=5.0, upsample_sampler="ancestral")
    inpainting = True

    def __call__(
        self, prompts: Union[str, Sequence[str]], image: ImageLike, mask: ImageLike, **kwargs: Any
    ) -> PipelineOutput:
        """Regenerate the masked region of ``image`` for each prompt.

        :param image: a square path, PIL image, [H x W x 3] array or [3 x H x W] tensor in
            [-1, 1]; it is resized (bicubic) to 64×64 and 256×256 like the notebook does. A
            non-square image is an error (it would be squashed): crop it first.
        :param mask: the region to regenerate (see ``images.load_mask``), of the image's size
            or any size with its aspect ratio; it must select at least half of one 64×64 pixel.
        The other parameters are those of ``DiffusionPipeline.__call__``.
        """
        return super().__call__(prompts, image=image, mask=mask, **kwargs)

    def _prepare(self, image: ImageLike, mask: ImageLike) -> InpaintInputs:
        source = load_image(image)
        check_square_image(source.size)
        regenerate = load_mask(mask)
        up_size = self.upsampler.image_size if self.upsampler is not None else 4 * self.base.image_size
        keep_64, keep_256 = keep_masks(regenerate, source.size, self.base.image_size, up_size, self.device)
        return InpaintInputs(
            image_to_tensor(source, self.base.image_size, self.device), keep_64,
            image_to_tensor(source, up_size, self.device), keep_256,
        )

    def _base_inputs(self, batch: PromptBatch, condition: InpaintInputs, guidance_scale: float) -> StageInputs:
        inputs = super()._base_inputs(batch, condition, guidance_scale)
        self._add_inpainting(inputs, condition.image_64, condition.keep_64, 2 * batch.rows)
        return inputs

    def _upsample_inputs(
        self, batch: PromptBatch, samples_64: torch.Tensor, condition: InpaintInputs, temp: float
    ) -> StageInputs:
        inputs = super()._upsample_inputs(batch, samples_64, condition, temp)
        self._add_inpainting(inputs, condition.image_256, condition.keep_256, batch.rows)
        return inputs

    @staticmethod
    def _add_inpainting(inputs: StageInputs, image: torch.Tensor, keep: torch.Tensor, rows: int) -> None:
        """Condition on the kept part of ``image`` and paste it into every x_0 prediction of ``rows`` rows."""
        inputs.model_kwargs["inpaint_image"] = (image * keep).repeat(rows, 1, 1, 1)
        inputs.model_kwargs["inpaint_mask"] = keep.repeat(rows, 1, 1, 1)
        inputs.denoised_fn = inpaint_denoised_fn(inputs.model_kwargs["inpaint_image"], inputs.model_kwargs["inpaint_mask"])
