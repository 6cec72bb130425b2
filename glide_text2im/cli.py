"""The ``glide-text2im`` command (also ``python -m glide_text2im``).

    glide-text2im generate "a corgi in a field" -n 4 --seed 0 --out images/
    glide-text2im generate --prompts-file prompts.txt --grid
    glide-text2im inpaint "a cat" --image photo.png --box 10,10,120,90
    glide-text2im clip-guided "an oil painting of a corgi"
    glide-text2im download
    glide-text2im convert base.pt base.safetensors
    glide-text2im generate --demo "a blue triangle on a white background"

``--demo`` swaps the official checkpoints for the small demo models shipped inside the
package (``demo/base``, ``demo/upsample``, ``demo/base-inpaint``, ``demo/clip/...``): no
download, seconds on a CPU, but they only know coloured shapes. Checkpoints named explicitly
still win.

Images are written as ``<prompt number>-<image index>.png`` (``00000-0.png``, ...) with the
prompt, its seed and the settings as PNG text chunks (``PipelineOutput.save_image``, as the
pipelines save them); the written paths are printed, one per line. Prompts are numbered on
from the highest number already in ``--out``, so a second run adds files; ``--overwrite``
numbers from 0 and replaces them. The output folder is created with the first image. Bad input ends the
command with exit status 1 and a one-line message on stderr. Under ``torchrun`` the prompts
are shared out across the ranks (prompt i goes to rank i mod WORLD_SIZE), each rank writing
its own images.

Subcommands are registered in ``SUBCOMMANDS``: each entry adds its parser to the subparsers
and sets ``func=function(args) -> exit status``. ``train`` comes from ``glide_text2im.train.cli``.
"""

import argparse
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import __version__

PROG = "glide-text2im"


class CommandError(ValueError):
    """Bad input found by the command itself."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------- subcommands


def add_generate_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("generate", help="text to image with classifier-free guidance")
    parser.add_argument("prompts", nargs="*", help="prompts (or use --prompts-file)")
    parser.add_argument("--prompts-file", help="UTF-8 file with one prompt per line (blank lines are skipped)")
    _add_pipeline_arguments(parser, "Text2ImPipeline")
    _add_output_arguments(parser)
    parser.set_defaults(func=run_generate)


def add_inpaint_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("inpaint", help="regenerate part of an image from a prompt")
    parser.add_argument("prompts", nargs="+", help="prompts")
    parser.add_argument("--image", required=True, help="the source image")
    region = parser.add_mutually_exclusive_group(required=True)
    region.add_argument("--mask", help="image marking the region to regenerate in white (image size or aspect ratio)")
    region.add_argument("--box", help="pixel box x0,y0,x1,y1 of the source image to regenerate (x1, y1 exclusive)")
    _add_pipeline_arguments(parser, "InpaintPipeline")
    _add_output_arguments(parser)
    parser.set_defaults(func=run_inpaint)


def add_clip_guided_command(subparsers: Any) -> None:
    parser = subparsers.add_parser("clip-guided", help="text to image guided by the noised CLIP")
    parser.add_argument("prompts", nargs="+", help="prompts")
    parser.add_argument("--clip-image-checkpoint", help="noised CLIP image encoder (default clip/image-enc)")
    parser.add_argument("--clip-text-checkpoint", help="CLIP text encoder (default clip/text-enc)")
    parser.add_argument(
        "--clip-config", help="CLIP YAML config (default: sidecar <image checkpoint>.yaml, else the official one)"
    )
    _add_pipeline_arguments(parser, "CLIPGuidedPipeline")
    _add_output_arguments(parser)
    parser.set_defaults(
        func=run_clip_guided,
        default_checkpoints=dict(
            base_checkpoint="base",
            upsample_checkpoint="upsample",
            clip_image_checkpoint="clip/image-enc",
            clip_text_checkpoint="clip/text-enc",
        ),
    )


def add_download_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "download",
        help="prefetch checkpoints and vocabularies into the cache ($GLIDE_CACHE_DIR, else ~/.cache/glide_text2im)",
    )
    parser.add_argument(
        "names", nargs="*", help="checkpoint names and/or 'vocab' (default: all official checkpoints and vocab)"
    )
    parser.set_defaults(func=run_download)


def add_convert_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert", help="rewrite a checkpoint as .safetensors or .pt (same tensors; sidecars carried along)"
    )
    parser.add_argument("source", help="a .pt or .safetensors file, or a checkpoint name (base, demo/base, ...)")
    parser.add_argument("destination", help="the file to write: ends in .safetensors or .pt")
    parser.add_argument("--overwrite", action="store_true", help="replace the destination (and its sidecars)")
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Convert ``args.source`` to ``args.destination``; prints what was written, one file per line."""
    from .pipelines.loading import convert_checkpoint

    written = convert_checkpoint(args.source, args.destination, overwrite=args.overwrite)
    print(f"{written.path}: {written.num_tensors} tensors, {written.num_bytes} bytes")
    for sidecar in written.sidecars:
        print(sidecar)
    return 0


def add_train_command(subparsers: Any) -> None:
    from .train.cli import add_train_subcommand

    add_train_subcommand(subparsers)


SUBCOMMANDS: Tuple[Callable[[Any], None], ...] = (
    add_generate_command,
    add_inpaint_command,
    add_clip_guided_command,
    add_download_command,
    add_train_command,
    add_convert_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="GLIDE (filtered) text-to-image diffusion")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in SUBCOMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command; returns the exit status (0, 1 for bad input, 130 when interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, _input_errors()):
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _input_errors() -> Tuple[type, ...]:
    """The exceptions that report bad input (or an unusable environment) rather than a bug."""
    errors: Tuple[type, ...] = (ValueError, OSError, FloatingPointError)
    download = sys.modules.get(f"{__package__}.download")  # imported only once models are involved
    if download is not None:
        errors += (download.DownloadError, download.IntegrityError)
    return errors


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in message:
        message = f"{message}: {exc.filename}"
    return message


# ---------------------------------------------------------------------- shared arguments


def _add_pipeline_arguments(parser: argparse.ArgumentParser, pipeline: str) -> None:
    """The model and sampling arguments of a command that runs ``pipelines.<pipeline>``, with its defaults."""
    from . import pipelines

    pipeline_class = getattr(pipelines, pipeline)
    _add_model_arguments(parser, *pipeline_class.CHECKPOINTS)
    _add_sampling_arguments(parser, pipeline_class.DEFAULTS)


def _add_model_arguments(parser: argparse.ArgumentParser, base: str, upsampler: str) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--demo", action="store_true", help="default to the small demo models shipped in the package")
    group.add_argument("--base-checkpoint", help=f"name, .pt or .safetensors file (default {base}; demo/{base} with --demo)")
    group.add_argument("--upsample-checkpoint", help=f"name, .pt or .safetensors file (default {upsampler})")
    group.add_argument("--no-upsample", action="store_true", help="stop at the 64x64 base images")
    group.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: the best available)")
    group.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float16 on CUDA, else float32)")
    group.add_argument(
        "--cuda-graphs", action="store_true", help="replay every sampling step from a CUDA graph (CUDA only; faster)"
    )
    parser.set_defaults(default_checkpoints=dict(base_checkpoint=base, upsample_checkpoint=upsampler))


def _add_sampling_arguments(parser: argparse.ArgumentParser, defaults: Dict[str, Any]) -> None:
    from .samplers import SAMPLERS, SPACINGS

    samplers = ", ".join(SAMPLERS)
    guidance_scale, steps, sampler = defaults["guidance_scale"], defaults["steps"], defaults["sampler"]
    upsample_steps, upsample_sampler = defaults["upsample_steps"], defaults["upsample_sampler"]
    group = parser.add_argument_group("sampling")
    group.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt (default 1)")
    group.add_argument("--seed", type=int, help="seed of the first prompt; prompt i uses seed + i (default: random)")
    group.add_argument(
        "--guidance-scale", type=float, default=guidance_scale, help=f"a finite number >= 0 (default {guidance_scale})"
    )
    group.add_argument(
        "--steps", default=steps, help=f"base steps: a count (25, 100) or a respacing: ddim25, fast27, ... (default {steps})"
    )
    group.add_argument("--sampler", default=sampler, help=f"base sampler: {samplers} (default {sampler})")
    group.add_argument(
        "--spacing",
        choices=SPACINGS,
        help="grid of a step count (default: the sampler's own: time for ancestral and ddim, else quadratic)",
    )
    group.add_argument(
        "--upsample-steps", default=upsample_steps,
        help=f"upsampler steps: a count or a respacing (default {upsample_steps})",
    )
    group.add_argument(
        "--upsample-sampler", default=upsample_sampler, help=f"upsampler sampler: {samplers} (default {upsample_sampler})"
    )
    group.add_argument("--upsample-temp", type=float, default=0.997, help="upsampler start-noise scale (default 0.997)")
    group.add_argument("--batch-size", type=int, default=4, help="prompts sampled together (default 4)")


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", default="outputs", help="output folder, created with the first image (default ./outputs)")
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="number the images from 00000 and replace files of those names "
        "(default: number on from the highest number already in --out)",
    )
    group.add_argument(
        "--grid", action="store_true", help="also write grid.png with all images (grid-NNNNN.png when numbering on)"
    )
    group.add_argument("--quiet", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------- runs


def run_generate(args: argparse.Namespace) -> int:
    if bool(args.prompts) == bool(args.prompts_file):
        raise CommandError("give prompts as arguments or with --prompts-file (one of the two)")
    if args.prompts_file is not None:
        _require_file(args.prompts_file, "prompts file")
    _check_common_arguments(args)
    prompts = _read_prompts_file(args.prompts_file) if args.prompts_file else list(args.prompts)
    if not prompts:
        raise CommandError(f"prompts file {args.prompts_file} holds no prompts (only blank lines)")
    return _generate(args, prompts, _load_text2im, {}, {})


def run_inpaint(args: argparse.Namespace) -> int:
    _require_file(args.image, "image")
    if args.mask is not None:
        _require_file(args.mask, "mask")
    box = _parse_box(args.box) if args.box is not None else None
    _check_common_arguments(args)

    from .pipelines.images import box_mask, check_mask, load_image, load_mask
    from .pipelines.validation import check_square_image

    image = load_image(args.image)
    check_square_image(image.size, f"--image {args.image}")
    mask = box_mask(box, image.size) if box is not None else load_mask(args.mask)
    check_mask(mask, image.size)
    region = {"box": args.box} if box is not None else {"mask": args.mask}
    settings = dict(image=args.image, **region)
    return _generate(args, list(args.prompts), _load_inpaint, dict(image=image, mask=mask), settings)


def run_clip_guided(args: argparse.Namespace) -> int:
    if args.clip_config is not None:
        _require_file(args.clip_config, "CLIP config")
    _check_common_arguments(args)

    from .pipelines.loading import check_checkpoint_name

    check_checkpoint_name(args.clip_image_checkpoint)
    check_checkpoint_name(args.clip_text_checkpoint)
    settings = dict(clip_image_checkpoint=args.clip_image_checkpoint, clip_text_checkpoint=args.clip_text_checkpoint)
    return _generate(args, list(args.prompts), _load_clip_guided, {}, settings)


def run_download(args: argparse.Namespace) -> int:
    from .download import LOCAL_CHECKPOINTS, MODEL_PATHS, checkpoint_path
    from .tokenizer.vocab import VOCAB_NAMES, vocab_file

    names = args.names or [*MODEL_PATHS, "vocab"]
    for name in names:
        if name != "vocab" and name not in MODEL_PATHS and name not in LOCAL_CHECKPOINTS:
            known = ", ".join([*MODEL_PATHS, *LOCAL_CHECKPOINTS, "vocab"])
            raise CommandError(f"unknown checkpoint {name!r}: known names are {known}")
    for name in names:
        paths = [vocab_file(f) for f in VOCAB_NAMES] if name == "vocab" else [checkpoint_path(name)]
        for path in paths:
            print(path, flush=True)
    return 0


def _load_text2im(args: argparse.Namespace, device: Any, upsampler: Optional[str], progress: bool) -> Any:
    from .pipelines import Text2ImPipeline

    return Text2ImPipeline.from_pretrained(
        args.base_checkpoint, upsampler, device=device, dtype=args.dtype, progress=progress
    )


def _load_inpaint(args: argparse.Namespace, device: Any, upsampler: Optional[str], progress: bool) -> Any:
    from .pipelines import InpaintPipeline

    return InpaintPipeline.from_pretrained(
        args.base_checkpoint, upsampler, device=device, dtype=args.dtype, progress=progress
    )


def _load_clip_guided(args: argparse.Namespace, device: Any, upsampler: Optional[str], progress: bool) -> Any:
    from .pipelines import CLIPGuidedPipeline

    return CLIPGuidedPipeline.from_pretrained(
        args.base_checkpoint,
        upsampler,
        clip_image=args.clip_image_checkpoint,
        clip_text=args.clip_text_checkpoint,
        clip_config=args.clip_config,
        device=device,
        dtype=args.dtype,
        progress=progress,
    )


def _generate(
    args: argparse.Namespace,
    prompts: List[str],
    load: Callable[[argparse.Namespace, Any, Optional[str], bool], Any],
    call_kwargs: Dict[str, Any],
    extra_settings: Dict[str, Any],
) -> int:
    """Check the models and prompts, load the pipeline, sample this rank's prompts and write the PNG files."""
    from .pipelines.loading import check_checkpoint_name, check_prompt_lengths, check_steps, checkpoint_options

    if not prompts:
        raise CommandError("no prompts given")
    upsampler = None if args.no_upsample else args.upsample_checkpoint
    stages = ((args.base_checkpoint, args.steps, args.spacing), (upsampler, args.upsample_steps, None))
    for checkpoint, steps, spacing in stages:
        if checkpoint is None:
            continue
        check_checkpoint_name(checkpoint)
        options = checkpoint_options(checkpoint)
        check_steps(steps, options, spacing)
        check_prompt_lengths(prompts, options)
    _check_samplers(args, upsampler)

    rank, world_size, local_rank = _distributed_env()
    if world_size > 1:
        return _generate_distributed(args, prompts, load, call_kwargs, extra_settings, rank, world_size, local_rank)
    first = _first_index(args)
    indices = range(len(prompts))
    written = _sample_and_write(args, prompts, load, call_kwargs, extra_settings, indices, first, args.device, True)
    if args.grid and written:
        _write_grid(args, written, prompts, "grid.png" if first == 0 else f"grid-{first:05d}.png")
    return 0


def _generate_distributed(args, prompts, load, call_kwargs, extra_settings, rank, world_size, local_rank) -> int:
    """One rank of a torchrun job: the seed and first file number come from rank 0, prompts i = rank (mod world_size) are ours."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        shared = [args.seed if args.seed is not None else _random_seed(), _first_index(args)]
        dist.broadcast_object_list(shared, src=0)
        args.seed, first = shared
        device = args.device
        if device is None and torch.cuda.is_available():
            device = f"cuda:{local_rank}"
        indices = range(rank, len(prompts), world_size)
        written = _sample_and_write(args, prompts, load, call_kwargs, extra_settings, indices, first, device, rank == 0)
        if args.grid and written:
            name = f"grid-rank{rank}.png" if first == 0 else f"grid-{first:05d}-rank{rank}.png"
            _write_grid(args, written, [prompts[i] for i in indices], name)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def _sample_and_write(args, prompts, load, call_kwargs, extra_settings, indices, first, device, show_progress) -> list:
    """Sample prompts[i] for i in ``indices`` (batch by batch) and write one PNG per image, numbered from ``first``."""
    from .pipelines.images import image_file_name

    indices = list(indices)
    if not indices:
        return []
    upsampler = None if args.no_upsample else args.upsample_checkpoint
    show_progress = show_progress and not args.quiet
    pipe = load(args, device, upsampler, show_progress)
    if args.cuda_graphs:
        if pipe.device.type != "cuda":
            raise CommandError(f"--cuda-graphs needs a CUDA device; the models are on {pipe.device}")
        pipe.cuda_graphs = True
    seed = args.seed if args.seed is not None else _random_seed()
    extra_settings = dict(command=args.command, **extra_settings)
    written = []
    for start in range(0, len(indices), args.batch_size):
        batch = indices[start : start + args.batch_size]
        out = pipe(
            [prompts[i] for i in batch],
            num_images_per_prompt=args.num_images,
            guidance_scale=args.guidance_scale,
            steps=args.steps,
            sampler=args.sampler,
            spacing=args.spacing,
            upsample=upsampler is not None,
            upsample_steps=args.upsample_steps,
            upsample_sampler=args.upsample_sampler,
            upsample_temp=args.upsample_temp,
            seed=[seed + i for i in batch],
            progress=show_progress,
            **call_kwargs,
        )
        for k, image in enumerate(out.images):
            index, j = batch[k // args.num_images], k % args.num_images
            path = os.path.join(args.out, image_file_name(first + index, j))
            out.save_image(k, path, overwrite=args.overwrite, extra_settings=extra_settings)
            print(path, flush=True)
            written.append((path, image))
    return written


def _first_index(args: argparse.Namespace) -> int:
    """The number of the first prompt's files: 0 with ``--overwrite``, else the next one free in ``--out``."""
    from .pipelines.images import next_free_index

    return 0 if args.overwrite else next_free_index(args.out)


def _write_grid(args: argparse.Namespace, written: list, prompts: List[str], name: str) -> None:
    from .pipelines.images import make_grid, save_png

    grid_path = os.path.join(args.out, name)
    save_png(make_grid([image for _, image in written]), grid_path, {"prompts": prompts}, overwrite=args.overwrite)
    print(grid_path)


def _check_samplers(args: argparse.Namespace, upsampler: Optional[str]) -> None:
    from .samplers import get_sampler

    get_sampler(args.sampler)
    if upsampler is not None:
        get_sampler(args.upsample_sampler)


def _resolve_checkpoints(args: argparse.Namespace) -> None:
    """Fill in the checkpoint arguments left out: the official defaults, or the demo's with ``--demo``."""
    from .bundled import demo_equivalent

    for key, official in args.default_checkpoints.items():
        if getattr(args, key) is None:
            setattr(args, key, demo_equivalent(official) if args.demo else official)
    if args.upsample_checkpoint is None:
        args.no_upsample = True


def _check_common_arguments(args: argparse.Namespace) -> None:
    """The checks that need no model: done first, so bad input fails before anything is loaded."""
    from .pipelines.validation import check_count, check_guidance_scale, check_seed

    _resolve_checkpoints(args)
    check_count(args.num_images, "-n")
    check_count(args.batch_size, "--batch-size")
    check_seed(args.seed, "--seed")
    check_guidance_scale(args.guidance_scale, "--guidance-scale")
    _check_out_dir(args.out)


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")


def _read_prompts_file(path: str) -> List[str]:
    """The non-blank lines of a UTF-8 file (a byte-order mark is allowed), stripped."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise CommandError(
            f"prompts file {path} is not UTF-8 text: byte {exc.object[exc.start]:#04x} at offset {exc.start} "
            "cannot be decoded; save it as UTF-8"
        ) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _parse_box(text: str) -> Tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(value) for value in text.split(","))
    except ValueError:
        raise CommandError(f"--box must be four integers x0,y0,x1,y1, got {text!r}") from None
    return x0, y0, x1, y1


def _check_out_dir(path: str) -> None:
    """Check that files can be written in the output folder, or in the folder it will be created in; create nothing."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CommandError(f"output directory {path} is not writable: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"output directory {path} is not writable: no permission to write in {existing}")


def _distributed_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from the environment torchrun sets; (0, 1, 0) otherwise."""
    try:
        return (
            int(os.environ.get("RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError:
        raise CommandError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None


def _random_seed() -> int:
    import secrets

    return secrets.randbelow(2**31)


if __name__ == "__main__":
    sys.exit(main())
