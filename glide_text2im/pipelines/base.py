"""What every pipeline shares: loading, the call skeleton, seeds, step reports, the sampling stages, outputs.

:class:`DiffusionPipeline` holds a base U-Net (64×64) and an optional upsampler (64→256) and
runs every call the same way: check the arguments, pick each stage's timesteps
(``samplers.get_timesteps``), sample the base stage, then the upsampling stage, and return a
:class:`PipelineOutput`. A pipeline class only says how its stages are conditioned
(``_prepare``, ``_base_inputs``, ``_upsample_inputs``: text, inpainting, CLIP guidance) and its
defaults (``DEFAULTS``).

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
from ..bundled import demo_equivalent
from ..cuda_graphs import CUDAGraphStep
from ..denoiser import CondFn, DenoisedFn
from ..guidance import ClassifierFreeGuidance, cond_half, guided_prompts
from ..noise import GroupedNoise
from ..samplers import Steps, get_sampler, get_timesteps, sampler_spacing
from .images import image_file_name, next_free_index, round_to_uint8_levels, save_png, to_pil_images
from .loading import LoadedModel, Options, check_model_kind, load_model, pick_device
from .validation import check_count, check_guidance_scale, check_prompts, check_seed

# callback(step) after every network evaluation of every stage, with ``step`` the samplers'
# dict {"i", "t", "x", "pred_xstart"} (x_t and its x_0 prediction for the call's images only,
# [N x 3 x S x S], S = 64 in the base stage and 256 in the upsampler's) and three more keys:
# "stage" ("base" or "upsample"), "step" (counted over both stages, from 0) and "total_steps".
StepCallback = Callable[[Dict[str, Any]], None]
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
class Stage:
    """One sampling stage of a call: its model, sampler and the timesteps the sampler evaluates."""

    name: str  # "base" or "upsample"
    loaded: LoadedModel
    sampler: str
    steps: str
    spacing: Optional[str]  # None for a respacing string such as "fast27"
    timesteps: List[int]


@dataclass
class StageInputs:
    """How a stage is conditioned: model kwargs for every row of its batch, and optionally
    classifier-free guidance (``guidance_scale``: the batch is [cond rows; uncond rows]), a
    ``denoised_fn`` applied to every x_0, classifier guidance ``cond_fn``, and ``noise_scale``
    (x_T is drawn before the loop, times that scale; else the sampler draws it)."""

    model_kwargs: Dict[str, torch.Tensor]
    guidance_scale: Optional[float] = None
    denoised_fn: Optional[DenoisedFn] = None
    cond_fn: Optional[CondFn] = None
    noise_scale: Optional[float] = None


class StepReporter:
    """One ``callback`` call and one progress-bar tick per network evaluation, counted over all stages."""

    def __init__(self, total_steps: int, callback: Optional[StepCallback], progress: bool):
        self.total_steps = total_steps
        self.callback = callback
        self.step = 0
        self._bar = tqdm(total=total_steps, disable=not progress, unit="step")

    def __call__(self, stage: str, info: Dict[str, Any], rows: int) -> None:
        if self.callback is not None:
            self.callback(
                dict(info, x=info["x"][:rows], pred_xstart=info["pred_xstart"][:rows], stage=stage,
                     step=self.step, total_steps=self.total_steps)
            )
        self.step += 1
        self._bar.update(1)

    def __enter__(self) -> "StepReporter":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._bar.close()


class _Default:
    def __repr__(self) -> str:
        return "<the pipeline's default>"


DEFAULT = _Default()


class DiffusionPipeline:
    """A base U-Net (64×64) and an optional upsampler (64→256) on one device.

    Subclasses set ``CHECKPOINTS`` (the names ``from_pretrained`` loads by default), ``DEFAULTS``
    (the call's defaults) and the conditioning hooks. ``cuda_graphs`` (CUDA only; default
    False): replay each sampling step from a CUDA graph (``glide_text2im.cuda_graphs``),
    recorded at the start of every sampling loop. Same results; on an H100 a 100-step base +
    27-step upsampler image takes about a third of the time.
    """

    CHECKPOINTS = ("base", "upsample")
    DEFAULTS: Dict[str, Any] = dict(
        guidance_scale=3.0, steps="100", sampler="ancestral", upsample_steps="fast27", upsample_sampler="ddim"
    )
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

    @classmethod
    def from_pretrained(
        cls,
        base: Any = DEFAULT,
        upsampler: Any = DEFAULT,
        *,
        base_options: Optional[Options] = None,
        upsampler_options: Optional[Options] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[Union[str, torch.dtype]] = None,
        progress: bool = True,
        demo: bool = False,
        **components: Any,
    ) -> "DiffusionPipeline":
        """Load the base model and (unless ``upsampler`` is None) the upsampler, by default the
        pipeline's ``CHECKPOINTS``.

        Checkpoints are official names (downloaded on first use), registered names or ``.pt`` /
        ``.safetensors`` files (options from ``*_options`` or their ``.json`` sidecar).
        ``device`` defaults to CUDA, then MPS, then CPU; ``dtype`` to float16 on CUDA and
        float32 elsewhere. ``demo=True`` puts the small demo models shipped in the package
        (offline, see ``glide_text2im.demo``) in place of official checkpoint names.
        ``components``: what a pipeline loads besides (the CLIP pipeline's ``clip_*`` names).
        """
        base = cls.CHECKPOINTS[0] if base is DEFAULT else base
        upsampler = cls.CHECKPOINTS[1] if upsampler is DEFAULT else upsampler
        if demo:
            base, upsampler = demo_equivalent(base), demo_equivalent(upsampler)
        device = pick_device(device)
        loaded_base = load_model(base, base_options, device, dtype, progress)
        loaded_up = load_model(upsampler, upsampler_options, device, dtype, progress) if upsampler else None
        return cls(loaded_base, upsampler=loaded_up, **cls._load_components(device, progress, demo, **components))

    @classmethod
    def _load_components(cls, device: torch.device, progress: bool, demo: bool) -> Dict[str, Any]:
        """The constructor arguments a pipeline loads besides its U-Nets (none here)."""
        return {}

    @property
    def device(self) -> torch.device:
        return self.base.device

    def check_prompts(self, prompts: Sequence[str], truncate: bool = False) -> None:
        """Raise :class:`PromptTooLongError` if a prompt has more tokens than a model reads."""
        for loaded in (self.base, self.upsampler):
            if loaded is not None:
                loaded.text_kwargs(prompts, truncate=truncate)

    def __call__(
        self,
        prompts: Union[str, Sequence[str]],
        num_images_per_prompt: int = 1,
        guidance_scale: Optional[float] = None,
        steps: Optional[Steps] = None,
        sampler: Optional[str] = None,
        spacing: Optional[str] = None,
        upsample: Optional[bool] = None,
        upsample_steps: Optional[Steps] = None,
        upsample_sampler: Optional[str] = None,
        upsample_temp: float = 0.997,
        seed: Optional[Seed] = None,
        generator: Optional[Generators] = None,
        callback: Optional[StepCallback] = None,
        progress: bool = False,
        return_tensors: bool = False,
        truncate_prompts: bool = False,
        **conditioning: Any,
    ) -> PipelineOutput:
        """Generate ``num_images_per_prompt`` images for each prompt.

        Arguments left None take the pipeline's ``DEFAULTS``.

        :param guidance_scale: classifier-free guidance scale (CLIP guidance for the CLIP pipeline).
        :param steps: the base model's steps: a count (25, or "100") or a respacing string of the
            original ("ddim25", "fast27"); ``samplers.get_timesteps`` says which timesteps each picks.
        :param sampler: a name of ``samplers.SAMPLERS`` ("ancestral", "ddim", "plms", "dpmpp_2m", ...).
        :param spacing: the grid a step count is placed on ("time", "quadratic", "logsnr");
            default: the sampler's own ("time", the notebooks' respacing, for "ancestral" and
            "ddim"; "quadratic" for the few-step solvers). ``upsample_steps`` always use the
            upsample sampler's own.
        :param upsample: run the upsampler (default: when the pipeline has one).
        :param upsample_temp: scale of the upsampler's start noise.
        :param seed: prompt k uses a generator seeded with ``seed + k`` (or ``seed[k]`` for a list).
        :param generator: instead of ``seed``, one ``torch.Generator`` per prompt.
        :param callback: ``callback(step)`` after every network evaluation (see ``StepCallback``).
        :param truncate_prompts: cut prompts longer than the text context, as the original
            notebooks do silently; by default they raise :class:`PromptTooLongError`.
        :param conditioning: the pipeline's own inputs (the inpainting pipeline's image and mask).
        """
        guidance_scale = self.DEFAULTS["guidance_scale"] if guidance_scale is None else guidance_scale
        prompts = check_prompts(prompts)
        check_count(num_images_per_prompt, "num_images_per_prompt")
        check_guidance_scale(guidance_scale)
        self.check_prompts(prompts, truncate_prompts)
        condition = self._prepare(**conditioning)
        base_stage = self._stage("base", self.base, steps, sampler, spacing)
        up_stage = None
        if upsample if upsample is not None else self.upsampler is not None:
            if self.upsampler is None:
                raise ValueError("this pipeline has no upsampler: load one or pass upsample=False")
            up_stage = self._stage("upsample", self.upsampler, upsample_steps, upsample_sampler, None)
        batch = self._prompt_batch(prompts, num_images_per_prompt, seed, generator, truncate_prompts)
        total_steps = sum(len(stage.timesteps) for stage in (base_stage, up_stage) if stage is not None)
        with StepReporter(total_steps, callback, progress) as report:
            base_inputs = self._base_inputs(batch, condition, guidance_scale)
            samples_64 = self._sample(base_stage, batch, base_inputs, report)
            samples_256 = None
            if up_stage is not None:
                up_inputs = self._upsample_inputs(batch, samples_64, condition, upsample_temp)
                samples_256 = self._sample(up_stage, batch, up_inputs, report)
        settings = self._settings(num_images_per_prompt, guidance_scale, base_stage, up_stage, upsample_temp)
        return batch.output(samples_64, samples_256, return_tensors, settings)

    # ------------------------------------------------------------------ conditioning (per pipeline)

    def _prepare(self, **unknown: Any) -> Any:
        """Check and load the pipeline's own call inputs before anything is sampled (none here)."""
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments: {', '.join(sorted(unknown))}")
        return None

    def _base_inputs(self, batch: PromptBatch, condition: Any, guidance_scale: float) -> StageInputs:
        """The base stage's conditioning (here: text with classifier-free guidance)."""
        return StageInputs(self.base.text_kwargs(guided_prompts(batch.prompt_rows), batch.truncate_prompts),
                           guidance_scale=guidance_scale)

    def _upsample_inputs(
        self, batch: PromptBatch, samples_64: torch.Tensor, condition: Any, temp: float
    ) -> StageInputs:
        """The notebooks' upsampling of the base samples [rows x 3 x 64 x 64]: the prompts, and
        ``low_res`` = the samples snapped to 8-bit levels; x_T is drawn right after the base
        loop, times ``temp``."""
        model_kwargs = self.upsampler.text_kwargs(batch.prompt_rows, batch.truncate_prompts)
        model_kwargs["low_res"] = round_to_uint8_levels(samples_64)
        return StageInputs(model_kwargs, noise_scale=temp)

    # ------------------------------------------------------------------ the shared steps

    def _stage(
        self, name: str, loaded: LoadedModel, steps: Optional[Steps], sampler: Optional[str], spacing: Optional[str]
    ) -> Stage:
        """A stage's sampler and timesteps (``steps`` / ``sampler`` None: the pipeline's defaults)."""
        prefix = "" if name == "base" else "upsample_"
        steps = self.DEFAULTS[prefix + "steps"] if steps is None else steps
        sampler = self.DEFAULTS[prefix + "sampler"] if sampler is None else sampler
        get_sampler(sampler)
        spacing = sampler_spacing(sampler, steps, spacing)
        return Stage(name, loaded, sampler, str(steps), spacing, get_timesteps(loaded.diffusion, steps, spacing))

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

    def _settings(
        self, num_images_per_prompt: int, guidance_scale: float, base: Stage, up: Optional[Stage], upsample_temp: float
    ) -> Dict[str, Any]:
        """A call's settings as its PNG files record them (JSON-serialisable)."""
        return dict(
            base_checkpoint=self.base.name,
            upsample_checkpoint=up.loaded.name if up else None,
            num_images_per_prompt=num_images_per_prompt,
            guidance_scale=guidance_scale,
            steps=base.steps,
            spacing=base.spacing,
            sampler=base.sampler,
            upsample_steps=up.steps if up else None,
            upsample_spacing=up.spacing if up else None,
            upsample_sampler=up.sampler if up else None,
            upsample_temp=upsample_temp if up else None,
            dtype=str(self.base.model.dtype).replace("torch.", ""),
            device=self.device.type,
            version=__version__,
        )

    @torch.no_grad()
    def _sample(self, stage: Stage, batch: PromptBatch, inputs: StageInputs, report: StepReporter) -> torch.Tensor:
        """One sampling loop over all prompts' rows: the images [rows x 3 x S x S] in [-1, 1].

        Raises :class:`NonFiniteOutputError` if any network output of the stage held NaN or inf
        (checked on the device at every call, read back once per stage, so the step loop never
        waits for the device).
        """
        rows = batch.rows
        classifier_free = inputs.guidance_scale is not None
        size = stage.loaded.image_size
        shape = (2 * rows if classifier_free else rows, 3, size, size)
        model = stage.loaded.model
        if classifier_free:
            model = ClassifierFreeGuidance(model, inputs.guidance_scale)
        if self.cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graphs needs a CUDA device; this pipeline is on {self.device}")
            model = CUDAGraphStep(model)
        model = FiniteWatch(model)
        noise_source = batch.noise(classifier_free)
        noise = None if inputs.noise_scale is None else noise_source.randn(shape, self.device) * inputs.noise_scale
        sample = get_sampler(stage.sampler)(
            model,
            stage.loaded.diffusion,
            shape,
            timesteps=stage.timesteps,
            noise=noise,
            model_kwargs=inputs.model_kwargs,
            denoised_fn=inputs.denoised_fn,
            clip_denoised=True,
            device=self.device,
            callback=lambda info: report(stage.name, info, rows),
            generator=noise_source,
            cond_fn=inputs.cond_fn,
        )
        if not model.all_finite():
            raise NonFiniteOutputError(non_finite_message(stage.loaded.model.dtype))
        return cond_half(sample) if classifier_free else sample
