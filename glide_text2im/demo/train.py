"""Regenerate the shapes dataset and retrain the four demo checkpoints.

    python -m glide_text2im.demo.train --out glide_text2im/demo/weights

Every stage uses the project's training code (``glide_text2im.train``) on examples rendered
in memory from ``shapes.iter_examples`` with a fixed seed:

1. ``text``: the base U-Net's text encoder, pretrained to read every attribute (or "not
   stated") from fresh training captions (``glide_text2im.train.text_pretraining``);
2. ``base``: the 64 x 64 text-to-image U-Net (byte tokenizer, 10% empty captions for
   classifier-free guidance), started from the ``text`` stage with the text encoder frozen;
3. ``upsample``: the 64 -> 256 upsampler, trained on random 64 x 64 patches of the 256 x 256
   renders (with the matching 16 x 16 low-res patches);
4. ``inpaint``: the 64 x 64 inpainting U-Net, started from the exported base weights
   (``<out>/base.safetensors``; its new input channels zeroed), with half of its masks the box around
   the shape (``TrainConfig.subject_mask_prob``), as in "replace the shape" edits;
5. ``clip``: a small noised CLIP with byte-level captions; its text encoder is first
   pretrained like the base's (``text``) and then kept frozen while the contrastive loss
   trains its image encoder.

Each stage trains in ``<work>/<stage>`` (``state.pt``, ``log.csv``, ...) and the EMA weights
are exported in float16 to ``--out`` as safetensors files with their options sidecars:
``base.safetensors``, ``upsample.safetensors``, ``base_inpaint.safetensors`` (+ ``.json``),
``clip_image_enc.safetensors`` (+ ``.yaml``) and ``clip_text_enc.safetensors``. The run is
deterministic for a given machine and thread count.

The run is sized for the project's 2-core CPU (both cores, one stage after another; see the
comment above ``STAGE_RECIPES`` for the measured stage times). ``--stages`` reruns
some stages (``base`` reads the ``text`` run in ``--work``; ``inpaint`` reads ``base.safetensors`` in ``--out``,
so ``--stages inpaint --out glide_text2im/demo/weights`` retrains it from the shipped base);
``--steps`` shortens every stage for trials.
"""

import argparse
import dataclasses
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from PIL import Image

from glide_text2im.bundled import CHECKPOINT_FILES
from glide_text2im.checkpoint_io import write_state_dict
from glide_text2im.clip.model_creation import create_clip_model
from glide_text2im.demo import shapes
from glide_text2im.pipelines.loading import save_options
from glide_text2im.tokenizer.byte import ByteCLIPTokenizer
from glide_text2im.train.text_pretraining import TextPretrainConfig, pretrain_text_encoder_on_labels
from glide_text2im.train.trainer import UNET_FILE, CLIPTask, TrainConfig, Trainer, build_task, seed_everything

DATA_SEED = 0
PARTIAL_PROB = 0.25
SCRAMBLED_PROB = 0.5
STAGES = ("text", "base", "upsample", "inpaint", "clip")

# Flat shapes on plain backgrounds stay recognisable under far more noise than photos: with
# the cosine schedule a 64 x 64 image's colours and layout are fixed only above t = 980, too
# few training steps and sampling steps for the prompt to matter. Dividing the
# signal-to-noise ratio by 4^2 spreads that decision over more of the chain.
BASE_SCHEDULE = "squaredcos_shift_4"

BASE_OPTIONS: Dict[str, Any] = dict(
    image_size=64,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,1,2,2",
    num_heads=1,
    num_head_channels=32,
    attention_resolutions="16,8",
    dropout=0.0,
    text_ctx=96,
    xf_width=64,
    xf_layers=2,
    xf_heads=2,
    use_fp16=False,
    tokenizer="byte",
    norm_groups=8,
    noise_schedule=BASE_SCHEDULE,
    # v-prediction: at high noise the network predicts about -x_0 instead of copying x_t to
    # predict eps, whose small errors there turn into large colour errors in x_0.
    prediction="v",
)


@dataclasses.dataclass(frozen=True)
class Stage:
    """How one checkpoint is trained: its examples, model options and ``TrainConfig`` values."""

    num_examples: int
    image_size: int
    options: Dict[str, Any]
    config: Dict[str, Any]


# The upsampler sharpens what its low-res input shows: no attention (256 // 512 = 0 is no
# level's downsampling factor; attention would also see other sizes on the training patches
# than on whole images) and a small text transformer. With eps-prediction its flat backgrounds
# drifted in colour (round-trip MAE 0.95 after 400 steps); with v-prediction and the cosine
# schedule the same run keeps them (0.015; linear schedule 0.028).
UPSAMPLE_OPTIONS: Dict[str, Any] = dict(
    BASE_OPTIONS,
    image_size=256,
    channel_mult="1,1,2,2,2,2",
    attention_resolutions="512",
    xf_width=32,
    xf_layers=1,
    xf_heads=1,
    noise_schedule="squaredcos_cap_v2",
)

# A lower fixed temperature than the official 100 keeps the first steps of a small batch stable.
CLIP_CONFIG: Dict[str, Any] = dict(
    logit_scale=30.0,
    beta_schedule=BASE_SCHEDULE,  # the CLIP guides the base model: the same noise levels
    n_timesteps=1000,
    image_size=64,
    patch_size=8,
    n_vocab=ByteCLIPTokenizer().n_vocab,
    max_text_len=96,
    n_embd=64,
    n_head_state_text=32,
    n_head_text=2,
    n_xf_blocks_text=2,
    n_head_state_image=32,
    n_head_image=2,
    n_xf_blocks_image=2,
)

# Measured for the shipped weights on the project's 2-core CPU (both cores): text 288 s,
# base 2017 s, upsample 196 s, inpaint 185 s, clip 589 s; 54.6 min in all. Over 64 held-out
# prompts the base draws the asked class for 0.86, place 1.0, size 0.98, colour 0.98 and
# background 1.0 (see tests/demo/test_demo_models.py). Yellow and blue are both shape and
# background colours, so the text encoder reads a colour word's role from the words beside
# it; before every background cue had a scrambled phrase (``shapes.SCRAMBLED_PHRASES``) the
# held-out cues "over", "field" and "scene" were unseen and held-out background was 0.67.
# With label heads on ``xf_proj`` alone (not also on the mean ``xf_out`` token the U-Net's
# attention reads) held-out colour was 0.81 (0.94 for the same specs in training wording).
# The upsampler's round-trip MAE is 0.017. Over six draws of 32 "replace the shape" edits
# the inpainting U-Net draws the asked class for 0.88 and colour for 0.99 (0.81 / 0.97 on the
# test's draw); at lr 1e-3 with random masks only it was 0.87 / 0.98 (0.78 on the test's
# draw), at lr 3e-4 with random masks only 0.87 / 0.98 (0.72). CLIP guidance (scale 30) gives the unconditional
# base the asked colour for 0.67 (0.42 before the CLIP's text encoder was pretrained on labels
# and frozen, 0.54 with 2000 instead of 3000 pretraining steps).
# What held the base back was its text encoder. Trained only through the denoising loss, it
# learned the background colour (the largest area of the image) and let the few bytes naming
# the shape's colour, class and place fade from ``xf_proj``: with the same U-Net and 4500
# steps, colour 0.17, class 0.39, place 0.125; GPU trials with 190k examples, wider or 8-head
# text transformers, coordinate channels or positional embeddings in the U-Net left colour and
# place at chance. With the caption's parsed attributes as learned embeddings in place of
# ``xf_proj`` the same U-Net drew the asked colour for 0.91 of held-out prompts, which pointed
# at the text side. So the ``text`` stage pretrains the text encoder and ``base`` keeps it
# frozen. Pretrained contrastively against a small image encoder, it read held-out wording
# badly: a linear probe on its last token read colour / place / size for 0.69 / 0.76 / 0.89
# of held-out captions (1.0 on training wording), and the base drew colour 0.625, class 0.55,
# place 0.72. Trained instead to predict every attribute (or "not stated") from 384k fresh
# captions (``train.text_pretraining.pretrain_text_encoder_on_labels``; half of them scrambled
# among random filler words, ``SCRAMBLED_PROB``), with sinusoidal positional embeddings so that
# a word reads the same wherever it stands, the shipped encoder's probe reads 0.998 / 1.0 /
# 1.0. In 1000-step trials the sinusoids alone raised the held-out colour probe from 0.63 to
# 0.79; amplitudes of 0.3 and 1.0 trained worse than 0.1, a 4-layer text transformer did not
# help.
BASE_CONFIG: Dict[str, Any] = dict(
    steps=4500,
    batch_size=16,
    lr=1e-3,
    lr_schedule="cosine",
    warmup_steps=100,
    ema_rate=0.995,
    uncond_prob=0.1,
    freeze_text_encoder=True,
)
STAGE_RECIPES: Dict[str, Stage] = {
    "base": Stage(num_examples=20000, image_size=64, options=BASE_OPTIONS, config=BASE_CONFIG),
    "upsample": Stage(
        num_examples=10000,
        image_size=256,
        options=UPSAMPLE_OPTIONS,
        config=dict(
            steps=400, batch_size=16, lr=2e-3, lr_schedule="cosine", warmup_steps=50, ema_rate=0.99, patch_size=64
        ),
    ),
    # A short fine-tune of the shipped base with its batch, guidance dropout and frozen text
    # encoder, at a lower learning rate.
    "inpaint": Stage(
        num_examples=20000,
        image_size=64,
        options={},
        config=dict(BASE_CONFIG, steps=400, lr=3e-4, warmup_steps=20, ema_rate=0.99, subject_mask_prob=0.5),
    ),
    "clip": Stage(
        num_examples=20000,
        image_size=64,
        options=CLIP_CONFIG,
        config=dict(
            steps=4000,
            batch_size=64,
            lr=1e-3,
            lr_schedule="cosine",
            warmup_steps=50,
            ema_rate=0.99,
            freeze_text_encoder=True,
        ),
    ),
}
# The ``text`` stage: the base's text encoder (options of ``base``), on 3000 x 128 captions
# drawn by ``labelled_caption`` (no images).
TEXT_PRETRAIN = TextPretrainConfig(steps=3000, batch_size=128, lr=1e-3, sinusoidal_positions=0.1, seed=DATA_SEED)
# The ``clip`` stage first pretrains the CLIP's text encoder the same way.
CLIP_TEXT_PRETRAIN = TEXT_PRETRAIN

# The weights file each U-Net stage exports (the shipped file names, ``bundled.CHECKPOINT_FILES``),
# and the stages that start from another's model: ``base`` from the ``text`` run in the work
# folder, ``inpaint`` from the exported ``base.safetensors``.
EXPORTS = {
    stage: CHECKPOINT_FILES[name]
    for stage, name in {"base": "demo/base", "upsample": "demo/upsample", "inpaint": "demo/base-inpaint"}.items()
}
CLIP_EXPORTS = (CHECKPOINT_FILES["demo/clip/image-enc"], CHECKPOINT_FILES["demo/clip/text-enc"])
INIT_FROM = {"base": "text", "inpaint": "base"}


class RenderedShapes(Sequence):
    """``(PIL image, caption)`` pairs of ``shapes.iter_examples(n, seed)`` with the demo's
    ``PARTIAL_PROB`` and ``SCRAMBLED_PROB``, rendered at ``size`` when indexed (the specs and
    captions are drawn once, up front)."""

    def __init__(self, n: int, seed: int, size: int):
        self.size = size
        examples = shapes.iter_examples(n, seed, size=8, partial_prob=PARTIAL_PROB, scrambled_prob=SCRAMBLED_PROB)
        self.items = [(spec, text) for _, text, spec in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Tuple[Image.Image, str]:
        spec, text = self.items[index]
        return shapes.render(spec, self.size), text


def build_clip_task(config: Dict[str, Any]) -> CLIPTask:
    """An untrained noised CLIP of ``config`` that reads byte-level captions."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        clip = create_clip_model(config_path=path, tokenizer=ByteCLIPTokenizer())
    return CLIPTask(clip, config)


def labelled_caption(rng: random.Random) -> Tuple[str, List[int]]:
    """A fresh training caption (the demo's ``PARTIAL_PROB`` and ``SCRAMBLED_PROB``) of a random
    spec and its labels, one per attribute in ``shapes.ATTRIBUTE_VALUES`` order: the index of
    the value the caption names, or ``len(values)`` where it names none."""
    text, stated = shapes.training_caption(shapes.sample_spec(rng), rng, PARTIAL_PROB, SCRAMBLED_PROB)
    labels = []
    for name, values in shapes.ATTRIBUTE_VALUES.items():
        value = getattr(stated, name)
        labels.append(len(values) if value is None else values.index(value))
    return text, labels


def pretrain_on_labelled_captions(
    model: torch.nn.Module, config: TextPretrainConfig, steps: Optional[int] = None
) -> None:
    """Pretrain ``model``'s text path (a U-Net's or a CLIP's) to name every attribute of
    ``labelled_caption`` captions, for ``config.steps`` or ``steps``."""
    if steps is not None:
        config = dataclasses.replace(config, steps=steps)
    num_classes = [len(values) + 1 for values in shapes.ATTRIBUTE_VALUES.values()]
    rows = pretrain_text_encoder_on_labels(model, labelled_caption, num_classes, config)
    print(f"text pretraining: loss {rows[-1]['loss']:.3f}, accuracy {rows[-1]['accuracy']:.3f}", flush=True)


def pretrain_text_stage(work_dir: Path, steps: Optional[int] = None) -> None:
    """The base U-Net with its initial random weights and a text encoder pretrained to read
    every attribute from fresh captions, saved as ``work_dir / "text" / model.pt`` (+ options
    sidecar) for ``base``."""
    torch.manual_seed(DATA_SEED)
    task = build_task("base", overrides=STAGE_RECIPES["base"].options)
    pretrain_on_labelled_captions(task.model, TEXT_PRETRAIN, steps)
    folder = work_dir / "text"
    folder.mkdir(parents=True, exist_ok=True)
    write_state_dict(task.model.state_dict(), os.fspath(folder / UNET_FILE))
    save_options(os.fspath(folder / UNET_FILE), task.options)


def init_weights(name: str, work_dir: Path, out_dir: Path) -> Optional[Path]:
    """The weights file stage ``name`` starts from (None: random weights); a ValueError naming
    the stage to run first where it is missing."""
    if name not in INIT_FROM:
        return None
    before = INIT_FROM[name]
    path = out_dir / EXPORTS[before] if before in EXPORTS else work_dir / before / UNET_FILE
    if not path.is_file():
        raise ValueError(f"stage {name!r} starts from {path}, which is missing: run the {before!r} stage first")
    return path


def train_stage(name: str, work_dir: Path, init: Optional[Path], steps: Optional[int] = None) -> Trainer:
    """Train stage ``name`` (not ``text``) from the weights file ``init`` (None: random weights;
    see ``init_weights``) into ``work_dir / name`` and return its finished Trainer."""
    stage = STAGE_RECIPES[name]
    source = RenderedShapes(stage.num_examples, DATA_SEED, stage.image_size)
    config = dict(stage.config, seed=DATA_SEED, log_every=50, save_every=200)
    if steps is not None:
        config["steps"] = steps
    torch.manual_seed(DATA_SEED)
    if name == "clip":
        task = build_clip_task(stage.options)
        pretrain_on_labelled_captions(task.model, CLIP_TEXT_PRETRAIN, steps)
    else:
        task = build_task(name, init=None if init is None else os.fspath(init), overrides=stage.options)
    seed_everything(DATA_SEED)
    trainer = Trainer(task, source, work_dir / name, TrainConfig(**config))
    trainer.train()
    return trainer


def half_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """``module``'s state dict with its floating-point tensors in float16."""
    return {key: value.half() if value.is_floating_point() else value for key, value in module.state_dict().items()}


def export(name: str, trainer: Trainer, out_dir: Path) -> None:
    """Save stage ``name``'s EMA weights in float16 as safetensors in ``out_dir``, with their options sidecar."""
    if name == "clip":
        image_file, text_file = (out_dir / file for file in CLIP_EXPORTS)
        write_state_dict(half_state(trainer.ema.image_encoder), os.fspath(image_file))
        write_state_dict(half_state(trainer.ema.text_encoder), os.fspath(text_file))
        Path(f"{image_file}.yaml").write_text(yaml.safe_dump(trainer.task.options), encoding="utf-8")
        return
    path = out_dir / EXPORTS[name]
    write_state_dict(half_state(trainer.ema), os.fspath(path))
    save_options(os.fspath(path), trainer.task.options)


def main(argv: Optional[List[str]] = None) -> int:
    """Train and export the ``--stages`` (default: all five, in order) into ``--out``."""
    parser = argparse.ArgumentParser(
        prog="python -m glide_text2im.demo.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="folder for the exported demo weights")
    parser.add_argument("--work", help="folder for the training runs (default: a temporary folder)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run")
    parser.add_argument("--steps", type=int, help="override every stage's step count (for trials)")
    args = parser.parse_args(argv)
    stages = args.stages.split(",")
    for name in stages:
        if name not in STAGES:
            parser.error(f"unknown stage {name!r}; expected some of {STAGES}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        for name in stages:
            started = time.time()
            if name == "text":
                pretrain_text_stage(work, steps=args.steps)
            else:
                try:
                    init = init_weights(name, work, out)
                except ValueError as exc:
                    parser.error(str(exc))
                export(name, train_stage(name, work, init, steps=args.steps), out)
            print(f"stage {name}: {time.time() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
