"""What every pipeline shares: seeds and generators, step reports, the sampling stages, outputs.

A pipeline call samples all its prompts in one batched loop per stage, yet prompt i's images
depend only on its own ``torch.Generator`` (seeded with ``seed + i``, or one the caller
passes): a :class:`~glide_text2im.noise.GroupedNoise` draws every noise tensor prompt by
prompt, each prompt's rows from its generator, in the calls a one-prompt notebook run makes.
So one prompt gives the notebook's images bit for bit, and a batch of prompts gives the images
of running them one by one (up to the rounding of batched kernels).
"""

import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import __version__
from ..cuda_graphs import CUDAGraphStep
from ..guidance import ClassifierFreeGuidance, DenoisedFn, inpaint_denoised_fn
from ..noise import GroupedNoise
from ..respace import SpacedDiffusion
from .images import image_file_name, next_free_index, round_to_uint8_levels, save_png, to_pil_images
from .loading import LoadedModel, check_model_kind
from .sampling import Sampler, get_sampler, sampler_spacing
from .validation import check_seed

# callback(step, total_steps, sample, pred_xstart): after each step of every stage, with the
# current samples of all prompts ([N x 3 x S x S], S = 64 for the base stage, 256 for the upsampler).
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
Seed = Union[int, Sequence[int]]
Generators = Union[torch.Generator, Sequence[torch.Generator]]


class NonFiniteOutputError(FloatingPointError):
    """The network produced NaN or infinite values."""


class FiniteWatch:
    """Calls ``model`` and keeps, on the device, whether every output so far was finite."""

    def __init__(self, model: Callable[..., torch.Tensor]):
        self.model = model
        self.finite: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = self.model(x, t, **kwargs)
        finite = torch.isfinite(out).all()
        self.finite = finite if self.finite is None else self.finite & finite
        return out

    def all_finite(self) -> bool:
        """True if every output was finite (one device sync)."""
        return self.finite is None or bool(self.finite)


def non_finite_message(dtype: torch.dtype) -> str:
    """The error text for NaN / inf outputs of a model running in ``dtype``."""
    name = str(dtype).replace("torch.", "")
    if dtype == torch.float16:
        return (
            "the model produced NaN or infinite values in float16 (half precision overflows on some GPUs): "
            "run it in float32 or bfloat16 instead (dtype='float32' or 'bfloat16'; --dtype on the command line)"
        )
    if dtype == torch.bfloat16:
        return "the model produced NaN or infinite values in bfloat16: run it in float32 instead (dtype='float32')"
    return f"the model produced NaN or infinite values in {name}: check the checkpoint and its options"


@dataclass
class PipelineOutput:
    """The images of one call, prompt by prompt (all images of prompt 0, then of prompt 1, ...).

    ``images`` are the final images (upsampled when the call upsampled, else the base ones);
    ``prompts`` and ``seeds`` give each image's prompt and the seed of its prompt's generator
    (None when the caller passed generators). The tensors, [N x 3 x S x S] in [-1, 1], are
    kept with ``return_tensors=True``. ``settings`` holds the call's settings (checkpoints,
    sampler, steps, guidance scale, precision, package version), which :meth:`save` writes
    into every PNG.
    """

    images: List[Image.Image]
    images_64: List[Image.Image]
    images_256: Optional[List[Image.Image]]
    prompts: List[str]
    seeds: List[Optional[int]]
    samples_64: Optional[torch.Tensor] = None
    samples_256: Optional[torch.Tensor] = None
    num_images_per_prompt: int = 1
    settings: Dict[str, Any] = field(default_factory=dict)

    def metadata(self, k: int, extra_settings: Optional[Dict[str, Any]] = None) -> Dict[str, object]:
        """The PNG text of image ``k``: its prompt, seed and index within its prompt, and the settings."""
        metadata: Dict[str, object] = dict(prompt=self.prompts[k])
        if self.seeds[k] is not None:
            metadata["seed"] = str(self.seeds[k])
        metadata["image_index"] = str(k % self.num_images_per_prompt)
        metadata["settings"] = dict(self.settings, **(extra_settings or {}))
        return metadata

    def save_image(
        self, k: int, path: str, overwrite: bool = False, extra_settings: Optional[Dict[str, Any]] = None
    ) -> None:
        """Write image ``k`` to ``path`` as a PNG with :meth:`metadata` (the command writes its files this way)."""
        save_png(self.images[k], path, self.metadata(k, extra_settings), overwrite=overwrite)

    def save(self, folder: str = ".", overwrite: bool = False) -> List[str]:
        """Write every image as ``<folder>/<NNNNN>-<j>.png`` (prompt number NNNNN, its image j) with
        its prompt, seed and the settings as PNG text; returns the paths.

        Prompts are numbered on from the highest number already in ``folder`` (from 0 with
        ``overwrite=True``, replacing files of those names), so a second call adds files. The
        folder is created when the first image is written.
        """
        first = 0 if overwrite else next_free_index(folder)
        paths = []
        for k in range(len(self.images)):
            prompt_index, j = divmod(k, self.num_images_per_prompt)
            path = os.path.join(folder, image_file_name(first + prompt_index, j))
            self.save_image(k, path, overwrite)
            paths.append(path)
        return paths


def prompt_generators(
    num_prompts: int, seed: Optional[Seed], generator: Optional[Generators], device: torch.device
) -> Tuple[List[torch.Generator], List[Optional[int]]]:
    """One generator per prompt, and its seed.

    ``seed`` an int: prompt k gets ``seed + k``; a list: one seed per prompt; neither seed nor
    generator: a random base seed (reported in the output). ``generator``: one
    ``torch.Generator`` per prompt (a single one for a single prompt), on the pipeline's device.
    """
    if generator is not None:
        if seed is not None:
            raise ValueError("pass seed or generator, not both")
        generators = [generator] if isinstance(generator, torch.Generator) else list(generator)
        if len(generators) != num_prompts:
            raise ValueError(f"pass one torch.Generator per prompt: got {len(generators)} for {num_prompts} prompts")
        for g in generators:
            if not isinstance(g, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(g).__name__}")
            if g.device.type != device.type:
                raise ValueError(f"a generator on {g.device} cannot draw noise on {device}: create it on {device}")
        return generators, [None] * num_prompts
    check_seed(seed)
    if seed is None:
        seed = secrets.randbelow(2**31)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [int(seed) + k for k in range(num_prompts)]
    if len(seeds) != num_prompts:
        raise ValueError(f"pass one seed per prompt: got {len(seeds)} for {num_prompts} prompts")
    check_seed(seeds, "seed + prompt index")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds], seeds


@dataclass
class PromptBatch:
    """One call's prompts, each with its generator (and seed) and ``num_images_per_prompt`` rows."""

    prompts: List[str]
    num_images_per_prompt: int
    generators: List[torch.Generator]
    seeds: List[Optional[int]]
    truncate_prompts: bool

    @property
    def rows(self) -> int:
        """The number of images: the rows of a batch without classifier-free guidance."""
        return len(self.prompts) * self.num_images_per_prompt

    @property
    def prompt_rows(self) -> List[str]:
        """Each image's prompt, prompt by prompt."""
        return [prompt for prompt in self.prompts for _ in range(self.num_images_per_prompt)]

    def noise(self, classifier_free: bool) -> GroupedNoise:
        """The noise source for a batch of this call: prompt i's rows draw from ``generators[i]``."""
        return GroupedNoise.for_prompts(self.generators, self.num_images_per_prompt, classifier_free)

    def output(
        self,
        samples_64: torch.Tensor,
        samples_256: Optional[torch.Tensor],
        return_tensors: bool,
        settings: Dict[str, Any],
    ) -> PipelineOutput:
        """The call's output from its samples [rows x 3 x S x S] in [-1, 1] (``samples_256``: None if not upsampled)."""
        images_64 = to_pil_images(samples_64)
        images_256 = to_pil_images(samples_256) if samples_256 is not None else None
        return PipelineOutput(
            images=images_256 if images_256 is not None else images_64,
            images_64=images_64,
            images_256=images_256,
            prompts=self.prompt_rows,
            seeds=[s for s in self.seeds for _ in range(self.num_images_per_prompt)],
            samples_64=samples_64 if return_tensors else None,
            samples_256=samples_256 if return_tensors else None,
            num_images_per_prompt=self.num_images_per_prompt,
            settings=settings,
        )


@dataclass
class Upsampling:
    """The settings of a call's upsampling stage; x_T is N(0, I) times ``temp``."""

    diffusion: SpacedDiffusion
    steps: str
    spacing: Optional[str]  # None for a respacing string
    sampler: Sampler
    temp: float


class StepReporter:
    """One ``callback`` call and one progress-bar tick per step, counted over all stages."""

    def __init__(self, total_steps: int, callback: Optional[StepCallback], progress: bool):
        self.total_steps = total_steps
        self.callback = callback
        self.step = 0
        self._bar = tqdm(total=total_steps, disable=not progress, unit="step")

    def __call__(self, sample: torch.Tensor, pred_xstart: torch.Tensor) -> None:
        if self.callback is not None:
            self.callback(self.step, self.total_steps, sample, pred_xstart)
        self.step += 1
        self._bar.update(1)

    def __enter__(self) -> "StepReporter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._bar.close()


class DiffusionPipeline:
    """A base U-Net (64×64) and an optional upsampler (64→256) on one device.

    ``cuda_graphs`` (CUDA only; default False): replay each sampling step from a CUDA graph
    (``glide_text2im.cuda_graphs``), recorded at the start of every sampling loop. Same
    results; on an H100 a 100-step base + 27-step upsampler image takes about a third of the time.
    """

    inpainting = False
    cuda_graphs = False

    def __init__(self, base: LoadedModel, upsampler: Optional[LoadedModel] = None):
        check_model_kind(base, "the base model", inpaint=self.inpainting, super_res=False)
        if upsampler is not None:
            check_model_kind(upsampler, "the upsampler", inpaint=self.inpainting, super_res=True)
            if upsampler.device != base.device:
                raise ValueError(f"the upsampler is on {upsampler.device} but the base model on {base.device}")
        self.base = base
        self.upsampler = upsampler

    @property
    def device(self) -> torch.device:
        return self.base.device

    def check_prompts(self, prompts: Sequence[str], truncate: bool = False) -> None:
        """Raise :class:`PromptTooLongError` if a prompt has more tokens than a model reads."""
        for loaded in (self.base, self.upsampler):
            if loaded is not None:
                loaded.text_kwargs(prompts, truncate=truncate)

    def _prompt_batch(
        self,
        prompts: List[str],
        num_images_per_prompt: int,
        seed: Optional[Seed],
        generator: Optional[Generators],
        truncate_prompts: bool,
    ) -> PromptBatch:
        """The call's prompts with one generator each, on the pipeline's device (see :func:`prompt_generators`)."""
        generators, seeds = prompt_generators(len(prompts), seed, generator, self.device)
        return PromptBatch(prompts, num_images_per_prompt, generators, seeds, truncate_prompts)

    def _upsampling(
        self, upsample: Optional[bool], steps: Union[str, int], sampler: str, temp: float
    ) -> Optional[Upsampling]:
        """A call's upsampling stage (default: when the pipeline has an upsampler), or None."""
        if upsample is None:
            upsample = self.upsampler is not None
        if not upsample:
            return None
        if self.upsampler is None:
            raise ValueError("this pipeline has no upsampler: load one or pass upsample=False")
        up_sampler = get_sampler(sampler)
        spacing = sampler_spacing(up_sampler, steps, None)
        return Upsampling(self.upsampler.diffusion(steps, spacing), str(steps), spacing, up_sampler, temp)

    def _base_stage(
        self, steps: Union[str, int], sampler: str, spacing: Optional[str]
    ) -> Tuple[SpacedDiffusion, Sampler]:
        """A call's base diffusion, keeping the timesteps its ``steps`` and ``spacing`` pick, and its sampler."""
        base_sampler = get_sampler(sampler)
        return self.base.diffusion(steps, sampler_spacing(base_sampler, steps, spacing)), base_sampler

    def _settings(
        self, num_images_per_prompt: int, guidance_scale: float, steps: Union[str, int], sampler: Sampler,
        spacing: Optional[str], upsampling: Optional[Upsampling],
    ) -> Dict[str, Any]:
        """A call's settings as its PNG files record them (JSON-serialisable)."""
        return dict(
            base_checkpoint=self.base.name,
            upsample_checkpoint=self.upsampler.name if upsampling else None,
            num_images_per_prompt=num_images_per_prompt,
            guidance_scale=guidance_scale,
            steps=str(steps),
            spacing=sampler_spacing(sampler, steps, spacing),
            sampler=sampler.name,
            upsample_steps=upsampling.steps if upsampling else None,
            upsample_spacing=upsampling.spacing if upsampling else None,
            upsample_sampler=upsampling.sampler.name if upsampling else None,
            upsample_temp=upsampling.temp if upsampling else None,
            dtype=str(self.base.model.dtype).replace("torch.", ""),
            device=self.device.type,
            version=__version__,
        )

    @staticmethod
    def _reporter(
        diffusion: SpacedDiffusion, upsampling: Optional[Upsampling], callback: Optional[StepCallback], progress: bool
    ) -> StepReporter:
        total_steps = diffusion.num_timesteps + (upsampling.diffusion.num_timesteps if upsampling else 0)
        return StepReporter(total_steps, callback, progress)

    @torch.no_grad()
    def _sample(
        self,
        loaded: LoadedModel,
        batch: PromptBatch,
        diffusion: SpacedDiffusion,
        sampler: Sampler,
        report: StepReporter,
        *,
        model_kwargs: Dict[str, torch.Tensor],
        guidance_scale: Optional[float] = None,
        noise_scale: Optional[float] = None,
        denoised_fn: Optional[DenoisedFn] = None,
        cond_fn: Optional[Callable[..., torch.Tensor]] = None,
    ) -> torch.Tensor:
        """One sampling loop over all prompts' rows: the images [rows x 3 x S x S] in [-1, 1].

        With ``guidance_scale`` the loop runs classifier-free guidance on [cond rows; uncond
        rows] (``model_kwargs`` must hold both); with ``noise_scale`` x_T is drawn here, times
        that scale, else the sampler draws it. Raises :class:`NonFiniteOutputError` if any
        network output of the stage held NaN or inf (checked on the device at every call,
        read back once per stage, so the step loop never waits for the device).
        """
        rows = batch.rows
        classifier_free = guidance_scale is not None
        shape = (2 * rows if classifier_free else rows, 3, loaded.image_size, loaded.image_size)
        model = ClassifierFreeGuidance(loaded.model, guidance_scale) if classifier_free else loaded.model
        if self.cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graphs needs a CUDA device; this pipeline is on {self.device}")
            model = CUDAGraphStep(model)
        model = FiniteWatch(model)
        noise_source = batch.noise(classifier_free)
        noise = None if noise_scale is None else noise_source.randn(shape, self.device) * noise_scale

        def on_step(out: Dict[str, torch.Tensor]) -> None:
            report(out["sample"][:rows], out["pred_xstart"][:rows])

        sample = sampler.run(
            diffusion,
            model,
            shape,
            noise=noise,
            generator=noise_source,
            device=self.device,
            model_kwargs=model_kwargs,
            denoised_fn=denoised_fn,
            cond_fn=cond_fn,
            callback=on_step,
        )[:rows]
        if not model.all_finite():
            raise NonFiniteOutputError(non_finite_message(loaded.model.dtype))
        return sample

    def _upsample(
        self,
        batch: PromptBatch,
        samples_64: torch.Tensor,
        upsampling: Optional[Upsampling],
        report: StepReporter,
        inpaint: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Optional[torch.Tensor]:
        """The notebooks' upsampling of the base samples [rows x 3 x 64 x 64] -> [rows x 3 x 256 x 256].

        ``low_res`` is the base samples snapped to 8-bit levels; x_T is drawn right after the
        base loop, times ``upsampling.temp``. ``inpaint`` = (source image [1 x 3 x 256 x 256],
        keep mask [1 x 1 x 256 x 256]) conditions the inpainting upsampler and pastes the kept
        region into every x_0 prediction. None when the call does not upsample.
        """
        if upsampling is None:
            return None
        model_kwargs = self.upsampler.text_kwargs(batch.prompt_rows, batch.truncate_prompts)
        model_kwargs["low_res"] = round_to_uint8_levels(samples_64)
        denoised_fn = None
        if inpaint is not None:
            image, keep = inpaint
            model_kwargs["inpaint_image"] = (image * keep).repeat(batch.rows, 1, 1, 1)
            model_kwargs["inpaint_mask"] = keep.repeat(batch.rows, 1, 1, 1)
            denoised_fn = inpaint_denoised_fn(model_kwargs["inpaint_image"], model_kwargs["inpaint_mask"])
        return self._sample(
            self.upsampler,
            batch,
            upsampling.diffusion,
            upsampling.sampler,
            report,
            model_kwargs=model_kwargs,
            noise_scale=upsampling.temp,
            denoised_fn=denoised_fn,
        )

