"""What every pipeline shares: seeds and generators, streams, step reports, the upsampling stage, outputs.

A pipeline call samples each prompt as the notebooks do for a single prompt (see
``lockstep.py``): prompt k draws every random number, in the notebooks' order, from its own
``torch.Generator`` (seeded with ``seed + k``, or one the caller passes), and all prompts'
network calls are batched.
"""

import secrets
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..guidance import inpaint_denoised_fn
from ..respace import SpacedDiffusion
from .images import round_to_uint8_levels, to_pil_images
from .lockstep import BatchedModel, StreamGroup
from .loading import LoadedModel, check_model_kind
from .sampling import Sampler, get_sampler

# callback(step, total_steps, sample, pred_xstart): after each step of every stage, with the
# current samples of all prompts ([N x 3 x S x S], S = 64 for the base stage, 256 for the upsampler).
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
Seed = Union[int, Sequence[int]]
Generators = Union[torch.Generator, Sequence[torch.Generator]]

MAX_SEED = 2**63 - 1


@dataclass
class PipelineOutput:
    """The images of one call, prompt by prompt (all images of prompt 0, then of prompt 1, ...).

    ``images`` are the final images (upsampled when the call upsampled, else the base ones);
    ``prompts`` and ``seeds`` give each image's prompt and the seed of its prompt's generator
    (None when the caller passed generators). The tensors, [N x 3 x S x S] in [-1, 1], are
    kept with ``return_tensors=True``.
    """

    images: List[Image.Image]
    images_64: List[Image.Image]
    images_256: Optional[List[Image.Image]]
    prompts: List[str]
    seeds: List[Optional[int]]
    samples_64: Optional[torch.Tensor] = None
    samples_256: Optional[torch.Tensor] = None


@dataclass
class Stream:
    """What one prompt's run sees: its prompt and generator, the batched models, the step reporter."""

    prompt: str
    generator: torch.Generator
    base: BatchedModel
    upsampler: Optional[BatchedModel]
    report: Callable[[torch.Tensor, torch.Tensor], None]

    def step_callback(self, rows: int) -> Callable[[Dict[str, torch.Tensor]], None]:
        """A sampler callback reporting the first ``rows`` samples of each step."""
        return lambda out: self.report(out["sample"][:rows], out["pred_xstart"][:rows])


def stream_generators(
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
    if seed is None:
        seed = secrets.randbelow(2**31)
    seeds = [seed + k for k in range(num_prompts)] if isinstance(seed, int) else list(seed)
    if len(seeds) != num_prompts:
        raise ValueError(f"pass one seed per prompt: got {len(seeds)} for {num_prompts} prompts")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED:
            raise ValueError(f"seeds must be integers in [0, 2**63 - 1], got {s!r}")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds], seeds


class StepReporter:
    """Gathers every stream's step into one ``callback`` call and one progress-bar tick."""

    def __init__(self, group: StreamGroup, total_steps: int, callback: Optional[StepCallback], progress: bool):
        self.total_steps = total_steps
        self.callback = callback
        self.step = 0
        self._bar = tqdm(total=total_steps, disable=not progress, unit="step")
        self._rendezvous = group.rendezvous(self._report_all) if callback or progress else None

    def __call__(self, sample: torch.Tensor, pred_xstart: torch.Tensor) -> None:
        if self._rendezvous is not None:
            self._rendezvous((sample, pred_xstart))

    def _report_all(self, steps: List[Tuple[torch.Tensor, torch.Tensor]]) -> List[None]:
        if self.callback is not None:
            sample = torch.cat([step[0] for step in steps])
            pred_xstart = torch.cat([step[1] for step in steps])
            self.callback(self.step, self.total_steps, sample, pred_xstart)
        self.step += 1
        self._bar.update(1)
        return [None] * len(steps)

    def close(self) -> None:
        self._bar.close()


class DiffusionPipeline:
    """A base U-Net (64×64) and an optional upsampler (64→256) on one device."""

    inpainting = False

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

    def _upsample_setup(
        self, upsample: Optional[bool], upsample_steps: Union[str, int], upsample_sampler: str
    ) -> Tuple[bool, Optional[SpacedDiffusion], Optional[Sampler]]:
        """(upsample?, the upsampler's diffusion, its sampler) for a call."""
        if upsample is None:
            upsample = self.upsampler is not None
        if not upsample:
            return False, None, None
        if self.upsampler is None:
            raise ValueError("this pipeline has no upsampler: load one or pass upsample=False")
        return True, self.upsampler.diffusion(upsample_steps), get_sampler(upsample_sampler)

    def _run(
        self,
        prompts: List[str],
        seed: Optional[Seed],
        generator: Optional[Generators],
        total_steps: int,
        callback: Optional[StepCallback],
        progress: bool,
        run_stream: Callable[[Stream], Tuple[torch.Tensor, Optional[torch.Tensor]]],
        num_images_per_prompt: int,
        return_tensors: bool,
    ) -> PipelineOutput:
        """Run ``run_stream`` for every prompt (in lockstep) and collect the images."""
        generators, seeds = stream_generators(len(prompts), seed, generator, self.device)
        group = StreamGroup(len(prompts))
        base = BatchedModel(self.base.model, group, self.base.model.dtype)
        upsampler = BatchedModel(self.upsampler.model, group, self.upsampler.model.dtype) if self.upsampler else None
        reporter = StepReporter(group, total_steps, callback, progress)

        def stream_main(k: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
            with torch.no_grad():
                return run_stream(Stream(prompts[k], generators[k], base, upsampler, reporter))

        try:
            results = group.run(stream_main)
        finally:
            reporter.close()
        samples_64 = torch.cat([result[0] for result in results])
        upsampled = results[0][1] is not None
        samples_256 = torch.cat([result[1] for result in results]) if upsampled else None
        images_64 = to_pil_images(samples_64)
        images_256 = to_pil_images(samples_256) if upsampled else None
        n = num_images_per_prompt
        return PipelineOutput(
            images=images_256 if upsampled else images_64,
            images_64=images_64,
            images_256=images_256,
            prompts=[prompt for prompt in prompts for _ in range(n)],
            seeds=[s for s in seeds for _ in range(n)],
            samples_64=samples_64 if return_tensors else None,
            samples_256=samples_256 if return_tensors else None,
        )

    def _upsample_stream(
        self,
        stream: Stream,
        samples_64: torch.Tensor,
        diffusion: SpacedDiffusion,
        sampler: Sampler,
        upsample_temp: float,
        truncate_prompts: bool,
        inpaint: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """The notebooks' upsampling of one prompt's base samples [n x 3 x 64 x 64] -> [n x 3 x 256 x 256].

        ``low_res`` is the base samples snapped to 8-bit levels; x_T is drawn from the prompt's
        generator right after the base loop, times ``upsample_temp``. ``inpaint`` = (source
        image [1 x 3 x 256 x 256], keep mask [1 x 1 x 256 x 256]) conditions the
        inpainting upsampler and pastes the kept region into every x_0 prediction.
        """
        n = len(samples_64)
        model_kwargs = self.upsampler.text_kwargs([stream.prompt] * n, truncate_prompts)
        model_kwargs["low_res"] = round_to_uint8_levels(samples_64)
        denoised_fn = None
        if inpaint is not None:
            image, keep = inpaint
            model_kwargs["inpaint_image"] = (image * keep).repeat(n, 1, 1, 1)
            model_kwargs["inpaint_mask"] = keep.repeat(n, 1, 1, 1)
            denoised_fn = inpaint_denoised_fn(model_kwargs["inpaint_image"], model_kwargs["inpaint_mask"])
        shape = shape_for(self.upsampler, n)
        noise = torch.randn(shape, generator=stream.generator, device=self.device) * upsample_temp
        return sampler.run(
            diffusion,
            stream.upsampler,
            shape,
            noise=noise,
            generator=stream.generator,
            device=self.device,
            model_kwargs=model_kwargs,
            denoised_fn=denoised_fn,
            cond_fn=None,
            callback=stream.step_callback(n),
        )


def check_num_images(num_images_per_prompt: int) -> None:
    if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int):
        raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
    if num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")


def split_prompts(prompts: Union[str, Sequence[str]]) -> List[str]:
    """A prompt or a list of prompts as a non-empty list of strings."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"every prompt must be a str, got {type(prompt).__name__}")
    return prompts


def shape_for(loaded: LoadedModel, batch_size: int) -> Tuple[int, int, int, int]:
    """[batch_size x 3 x S x S] with S the model's image size."""
    return (batch_size, 3, loaded.image_size, loaded.image_size)
