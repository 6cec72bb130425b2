"""``glide-text2im train {base,upsample,inpaint,clip} --data DIR --out DIR ...``

Also ``python -m glide_text2im.train TASK ...``, and the same command under
``torchrun --nproc_per_node N [--nnodes M ...] -m glide_text2im.train TASK ...`` for
data-parallel training (``--batch-size`` is the global batch, split over the processes).

Examples::

    # fine-tune the official base model on a folder of images with .txt captions
    glide-text2im train base --data photos --out runs/base --init base --steps 5000 --precision bf16
    # an inpainting model started from the base model (new input channels zeroed)
    glide-text2im train inpaint --data photos --out runs/inpaint --init base
    # a small model from scratch
    glide-text2im train base --data photos --out runs/tiny --option image_size=32 --option channel_mult=1,2,2
    # resume (the model options and weights come from the state)
    glide-text2im train base --data photos --out runs/base --steps 10000 --resume runs/base
"""

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from glide_text2im.train.data import as_source
from glide_text2im.train.trainer import (
    PRECISIONS,
    TASKS,
    DistributedContext,
    TrainConfig,
    Trainer,
    build_task,
    init_distributed,
    read_state,
    seed_everything,
)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of the train command (the task is the first positional)."""
    d = TrainConfig(steps=1)
    add = parser.add_argument
    add("task", choices=TASKS, help="the base U-Net, the upsampler, an inpainting U-Net or the noised CLIP")
    add("--data", required=True, help="folder of images with same-named .txt captions (searched recursively)")
    add("--out", required=True, help="output folder: weights, state.pt, log.csv, samples/")
    add("--steps", type=int, default=1000, help="optimiser steps to reach (default 1000)")
    add("--batch-size", type=int, default=d.batch_size, help="global batch size, split over the processes")
    add("--lr", type=float, default=d.lr, help="AdamW learning rate")
    add("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    add("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warm-up steps")
    add("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: no clipping)")
    add("--ema-rate", type=float, default=d.ema_rate, help="EMA decay of the saved weights")
    add("--precision", choices=PRECISIONS, default=d.precision, help="autocast precision (fp16 needs CUDA)")
    add("--freeze-text-encoder", action="store_true", help="U-Nets: keep the prompt encoder's weights fixed "
        "(all of it but transformer_proj), e.g. when fine-tuning")  # fmt: skip
    add("--grad-checkpoint", action="store_true", help="gradient checkpointing (U-Nets; less memory, more compute)")
    add("--uncond-prob", type=float, default=d.uncond_prob, help="probability of the empty caption (U-Nets)")
    add("--subject-mask-prob", type=float, default=d.subject_mask_prob,
        help="inpaint: probability of erasing the box around the image's subject (on a plain background) "
        "instead of random regions")
    add("--seed", type=int, default=d.seed, help="seed of the weights, the data order and each example's draws")
    add("--crop-min", type=float, default=d.crop_min_fraction, help="smallest random crop (fraction of short side)")
    add("--log-every", type=int, default=d.log_every, help="steps between log.csv rows")
    add("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    add("--sample-every", type=int, default=d.sample_every, help="steps between sample grids (0: none)")
    add("--sample-prompt", action="append", default=[], help="prompt of the base model's grids (repeatable)")
    add("--num-samples", type=int, default=d.num_samples, help="images per sample grid")
    add("--sample-steps", default=d.sample_steps, help="timestep respacing of the sample grids")
    add("--guidance-scale", type=float, default=d.guidance_scale, help="classifier-free guidance scale of the grids")
    add("--num-workers", type=int, default=2, help="data-loader workers per process")
    add("--init", help="an official checkpoint name or a weights file (clip: 'clip' or 'IMAGE_ENC,TEXT_ENC'); "
        "default: random weights")  # fmt: skip
    add("--options", help="JSON object (or JSON file) of model options over the defaults")
    add("--option", action="append", default=[], metavar="KEY=VALUE", help="one model option (repeatable)")
    add("--clip-config", help="CLIP config YAML to start from (clip task; default: the official sizes)")
    add("--resume", help="state.pt or a folder holding one; the model options and weights come from it")
    add("--device", help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")


def add_train_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` on the ``glide-text2im`` subparsers; the parsed namespace's ``func``
    runs it (``args.func(args)`` returns the exit code)."""
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a U-Net or the noised CLIP",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def parse_overrides(options: Optional[str], option: Sequence[str]) -> Dict[str, Any]:
    """The model-option overrides of ``--options`` (JSON text or file) then each ``--option KEY=VALUE``."""
    overrides: Dict[str, Any] = {}
    if options:
        text = Path(options).read_text(encoding="utf-8") if Path(options).is_file() else options
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--options is neither a JSON file nor a JSON object: {exc}") from None
        if not isinstance(loaded, dict):
            raise ValueError("--options must be a JSON object of option names to values")
        overrides.update(loaded)
    for item in option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value
    return overrides


def build_trainer(args: argparse.Namespace, context: DistributedContext) -> Trainer:
    """The model (from ``--init``/``--options``/``--option``, or the ``--resume`` state) and its Trainer."""
    source = as_source(args.data)  # check the data before building a large model
    state = read_state(args.resume) if args.resume else None
    overrides = state["options"] if state else parse_overrides(args.options, args.option)
    torch.manual_seed(args.seed)
    task = build_task(
        args.task,
        init=None if state else args.init,
        overrides=overrides,
        use_checkpoint=args.grad_checkpoint,
        clip_config=None if state else args.clip_config,
    )
    seed_everything(args.seed, context.rank)
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        grad_clip=args.grad_clip,
        ema_rate=args.ema_rate,
        precision=args.precision,
        uncond_prob=args.uncond_prob,
        subject_mask_prob=args.subject_mask_prob,
        seed=args.seed,
        crop_min_fraction=args.crop_min,
        log_every=args.log_every,
        save_every=args.save_every,
        sample_every=args.sample_every,
        sample_prompts=tuple(args.sample_prompt),
        num_samples=args.num_samples,
        sample_steps=args.sample_steps,
        guidance_scale=args.guidance_scale,
        num_workers=args.num_workers,
        freeze_text_encoder=args.freeze_text_encoder,
    )
    trainer = Trainer(task, source, args.out, config, context)
    if state is not None:
        trainer.load_state(state)
    return trainer


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` say; every process of a torchrun run calls this."""
    context = init_distributed(args.device)
    try:
        build_trainer(args, context).train()
    finally:
        if context.distributed:
            dist.destroy_process_group()
    return 0


def make_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m glide_text2im.train``."""
    parser = argparse.ArgumentParser(
        prog="python -m glide_text2im.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_train_arguments(parser)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m glide_text2im.train TASK --data DIR --out DIR ...``"""
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:
        parser.error(str(exc))
