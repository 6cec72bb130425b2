"""Text to image: classifier-free-guided base model, then the upsampler (the text2im notebook)."""

from typing import Optional, Sequence, Union

import torch

from ..demo import demo_equivalent
from .base import DiffusionPipeline, Generators, PipelineOutput, Seed, StepCallback
from .loading import Options, load_model, pick_device
from .validation import check_count, check_guidance_scale, check_prompts


class Text2ImPipeline(DiffusionPipeline):
    """GLIDE text-to-image: ``Text2ImPipeline.from_pretrained()(["a corgi", "a red cube"]).images``."""

    @classmethod
    def from_pretrained(
        cls,
        base: str = "base",
        upsampler: Optional[str] = "upsample",
        *,
        base_options: Optional[Options] = None,
        upsampler_options: Optional[Options] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
        progress: bool = True,
        demo: bool = False,
    ) -> "Text2ImPipeline":
        """Load the base model and (unless ``upsampler`` is None) the upsampler.

        Checkpoints are official names (downloaded on first use), registered names or ``.pt``
        files (options from ``*_options`` or their ``.json`` sidecar). ``device`` defaults to
        CUDA, then MPS, then CPU; ``dtype`` to float16 on CUDA and float32 elsewhere.
        ``demo=True`` puts the small demo models shipped in the package (offline, see
        ``glide_text2im.demo``) in place of official checkpoint names.
        """
        if demo:
            base, upsampler = demo_equivalent(base), demo_equivalent(upsampler)
        device = pick_device(device)
        loaded_base = load_model(base, base_options, device, dtype, progress)
        loaded_up = load_model(upsampler, upsampler_options, device, dtype, progress) if upsampler else None
        return cls(loaded_base, loaded_up)

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
        """Generate ``num_images_per_prompt`` images for each prompt.

        :param steps: the base model's steps: a count (25, or "100") or a respacing string of the
            original ("ddim25", "fast27"); ``samplers.get_timesteps`` says which timesteps each picks.
        :param sampler: a name of ``pipelines.sampling.SAMPLERS`` ("ancestral", "ddim", "dpmpp_2m", ...).
        :param spacing: the grid a step count is placed on ("time", "quadratic", "logsnr");
            default: the sampler's own ("time", the notebooks' respacing, for "ancestral" and
            "ddim"; "quadratic" for the few-step solvers). ``upsample_steps`` always use the
            upsample sampler's own.
        :param upsample: run the upsampler (default: when the pipeline has one).
        :param upsample_temp: scale of the upsampler's start noise.
        :param seed: prompt k uses a generator seeded with ``seed + k`` (or ``seed[k]`` for a list).
        :param generator: instead of ``seed``, one ``torch.Generator`` per prompt.
        :param callback: ``callback(step, total_steps, sample, pred_xstart)`` after every step.
        :param truncate_prompts: cut prompts longer than the text context, as the original
            notebooks do silently; by default they raise :class:`PromptTooLongError`.
        """
        prompts = check_prompts(prompts)
        check_count(num_images_per_prompt, "num_images_per_prompt")
        check_guidance_scale(guidance_scale)
        self.check_prompts(prompts, truncate_prompts)
        diffusion, base_sampler = self._base_stage(steps, sampler, spacing)
        upsampling = self._upsampling(upsample, upsample_steps, upsample_sampler, upsample_temp)
        batch = self._prompt_batch(prompts, num_images_per_prompt, seed, generator, truncate_prompts)
        with self._reporter(diffusion, upsampling, callback, progress) as report:
            model_kwargs = self.base.text_kwargs(batch.prompt_rows + [None] * batch.rows, truncate_prompts)
            samples_64 = self._sample(
                self.base, batch, diffusion, base_sampler, report,
                model_kwargs=model_kwargs, guidance_scale=guidance_scale,
            )
            samples_256 = self._upsample(batch, samples_64, upsampling, report)
        settings = self._settings(num_images_per_prompt, guidance_scale, steps, base_sampler, spacing, upsampling)
        return batch.output(samples_64, samples_256, return_tensors, settings)
