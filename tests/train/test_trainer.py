"""The training loop: overfitting tiny models, exact resume, checkpoint files, model building."""

import csv
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch.utils.data import default_collate

from glide_text2im.model_creation import create_model_and_diffusion
from glide_text2im.pipelines.loading import checkpoint_options, load_clip
from glide_text2im.train.cli import main, parse_overrides
from glide_text2im.train.data import image_to_tensor, random_inpaint_mask
from glide_text2im.train.trainer import (
    TrainConfig,
    Trainer,
    adapt_input_channels,
    build_task,
    contrastive_losses,
    read_state,
)
from tests.train import (
    TINY_CLIP_OPTIONS,
    TINY_UNET_OPTIONS,
    option_args,
    shape_images,
    single_thread,
    write_image_folder,
)

# The overfitting check evaluates the loss on one fixed batch (all four images, fixed noise,
# these timesteps) before and after training. Timesteps near 0 are left out of the U-Net
# batch: there eps can only be predicted from a pixel-exact x_0, which no model reaches in a
# few hundred steps. The CLIP batch uses low and middle noise levels, where the images can
# still be told apart.
UNET_EVAL_T = torch.tensor([100, 300, 500, 700])
CLIP_EVAL_T = torch.tensor([0, 150, 300, 450])
OVERFIT_STEPS = 150


@pytest.fixture(autouse=True)
def one_thread():
    with single_thread():
        yield


def tiny_task(kind: str, **extra):
    torch.manual_seed(0)
    options = TINY_CLIP_OPTIONS if kind == "clip" else TINY_UNET_OPTIONS
    return build_task(kind, overrides=dict(options, **extra))


def read_log(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("kind", ["base", "upsample", "inpaint", "clip"])
def test_tiny_model_overfits_a_handful_of_images(kind, tmp_path):
    task = tiny_task(kind)
    # The CLIP's similarities are scaled by a fixed 100, which makes larger steps overshoot.
    lr = 1e-3 if kind == "clip" else 2e-3
    config = TrainConfig(
        steps=OVERFIT_STEPS, batch_size=4, lr=lr, weight_decay=0.0, uncond_prob=0.0, log_every=10, save_every=10**6
    )
    trainer = Trainer(task, shape_images(), tmp_path, config)
    eval_batch = default_collate([trainer.dataset[(10**6, i)] for i in range(4)])
    eval_batch["t"] = CLIP_EVAL_T if kind == "clip" else UNET_EVAL_T
    before = trainer.evaluate(eval_batch)
    trainer.train()
    after = trainer.evaluate(eval_batch)

    assert before["loss"] / after["loss"] >= 5.0, (before, after)
    if kind == "clip":
        assert after["accuracy"] >= 0.75 > before["accuracy"]
    else:
        assert after["mse"] < before["mse"] / 5
    rows = read_log(tmp_path / "log.csv")
    assert [int(row["step"]) for row in rows] == list(range(10, OVERFIT_STEPS + 1, 10))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) / 2


def cli_args(data, out, steps, *extra):
    return [
        "base", "--data", str(data), "--out", str(out), "--steps", str(steps), "--batch-size", "2",
        "--lr", "1e-3", "--log-every", "1", "--save-every", "100", "--num-workers", "0", "--device", "cpu",
        "--ema-rate", "0.9", *option_args(dict(TINY_UNET_OPTIONS, dropout=0.1)), *extra,
    ]  # fmt: skip


def test_resume_gives_the_same_weights_as_one_run(tmp_path):
    # 4 images, global batch 2: 2 batches per epoch, so the resume at step 3 is mid-epoch.
    # Dropout is on, so the restored torch RNG state matters too.
    data = write_image_folder(tmp_path / "data")
    assert main(cli_args(data, tmp_path / "whole", 6)) == 0
    assert main(cli_args(data, tmp_path / "split", 3)) == 0
    halfway = read_state(tmp_path / "split")
    assert halfway["step"] == 3 and halfway["data"] == {"epoch": 1, "batch": 1, "batches_per_epoch": 2}
    assert main(cli_args(data, tmp_path / "split", 6, "--resume", str(tmp_path / "split"))) == 0

    whole, split = read_state(tmp_path / "whole"), read_state(tmp_path / "split")
    assert whole["step"] == split["step"] == 6
    assert not all(torch.equal(whole["model"][k], halfway["model"][k]) for k in whole["model"])
    for part in ("model", "ema"):
        assert whole[part].keys() == split[part].keys()
        for key in whole[part]:
            assert torch.equal(whole[part][key], split[part][key]), (part, key)
    for key, value in whole["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, split["optimizer"]["state"][key][name]), (key, name)
    whole_log, split_log = read_log(tmp_path / "whole" / "log.csv"), read_log(tmp_path / "split" / "log.csv")
    assert [(r["step"], r["loss"], r["mse"], r["vb"]) for r in whole_log] == [
        (r["step"], r["loss"], r["mse"], r["vb"]) for r in split_log
    ]
    assert [int(r["step"]) for r in split_log] == [1, 2, 3, 4, 5, 6]


def test_saved_weights_load_with_their_sidecar_options(tmp_path):
    data = write_image_folder(tmp_path / "data")
    assert main(cli_args(data, tmp_path / "out", 2)) == 0
    options = checkpoint_options(str(tmp_path / "out" / "model.pt"))
    assert options["tokenizer"] == "byte" and options["image_size"] == 16 and options["dropout"] == 0.1
    model, _ = create_model_and_diffusion(**options)
    weights = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    model.load_state_dict(weights)
    state = read_state(tmp_path / "out")
    for key, value in weights.items():
        assert torch.equal(value, state["ema"][key])
    assert not all(torch.equal(state["ema"][k], state["model"][k]) for k in weights)


def test_sample_grids_show_the_masked_inputs_above_the_samples(tmp_path):
    task = tiny_task("inpaint")
    config = TrainConfig(
        steps=2, batch_size=2, sample_every=1, save_every=10, num_samples=3, sample_steps="4", log_every=1
    )
    Trainer(task, shape_images(), tmp_path, config).train()
    masked = [
        image_to_tensor(image) * random_inpaint_mask(16, random.Random(i))
        for i, (image, _) in enumerate(shape_images()[:3])
    ]
    want_first_row = ((torch.cat(masked, dim=2) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    for step in (1, 2):
        with Image.open(tmp_path / "samples" / f"step_{step:06d}.png") as grid:
            pixels = np.array(grid)
        assert pixels.shape == (2 * 16, 3 * 16, 3)
        assert np.array_equal(pixels[:16], want_first_row)
        assert pixels[16:].std() > 0


def test_contrastive_loss_matches_a_direct_computation():
    torch.manual_seed(1)
    z_text = F.normalize(torch.randn(3, 8), dim=-1)
    z_image = F.normalize(torch.randn(3, 8), dim=-1)
    logit_scale = torch.tensor(math.log(10.0))
    got = contrastive_losses(z_text, z_image, logit_scale)
    for i in range(3):
        sims = [10.0 * float(z_text[i] @ z_image[j]) for j in range(3)]
        sims_t = [10.0 * float(z_image[i] @ z_text[j]) for j in range(3)]
        ce_text = -sims[i] + math.log(sum(math.exp(s) for s in sims))
        ce_image = -sims_t[i] + math.log(sum(math.exp(s) for s in sims_t))
        assert got["loss"][i].item() == pytest.approx(0.5 * (ce_text + ce_image), rel=1e-5)
        assert got["accuracy"][i].item() == float(max(range(3), key=lambda j: sims[j]) == i)


def test_inpaint_model_from_base_weights_starts_as_the_base_model(tmp_path):
    base = tiny_task("base").model.eval()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    (tmp_path / "base.pt.json").write_text(json.dumps(dict(TINY_UNET_OPTIONS)))
    inpaint = build_task("inpaint", init=str(tmp_path / "base.pt")).model.eval()
    weight = inpaint.state_dict()["input_blocks.0.0.weight"]
    assert weight.shape[1] == 7
    assert torch.equal(weight[:, :3], base.state_dict()["input_blocks.0.0.weight"])
    assert torch.all(weight[:, 3:] == 0)

    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    tokens, mask = torch.randint(0, 256, (2, 16)), torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        want = base(x, t, tokens=tokens, mask=mask)
        inpaint_inputs = dict(inpaint_image=torch.randn_like(x), inpaint_mask=torch.ones(2, 1, 16, 16))
        got = inpaint(x, t, tokens=tokens, mask=mask, **inpaint_inputs)
    torch.testing.assert_close(got, want)


def test_adapt_input_channels_moves_each_input_group():
    # upsample (x, low_res) -> upsample-inpaint (x, inpaint_image, inpaint_mask, low_res)
    weight = torch.arange(6, dtype=torch.float32).view(1, 6, 1, 1).repeat(2, 1, 3, 3)
    adapted = adapt_input_channels(weight, 10)
    assert adapted[0, :, 0, 0].tolist() == [0, 1, 2, 0, 0, 0, 0, 3, 4, 5]
    with pytest.raises(ValueError, match="input channels"):
        adapt_input_channels(weight, 5)


def test_build_task_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown option 'num_chanels'"):
        build_task("base", overrides={"num_chanels": "32"})
    with pytest.raises(ValueError, match="needs inpaint=True"):
        build_task("inpaint", overrides=dict(TINY_UNET_OPTIONS, inpaint="false"))
    with pytest.raises(ValueError, match="expects int"):
        build_task("base", overrides={"num_channels": "wide"})
    with pytest.raises(ValueError, match="unknown task"):
        build_task("upscale")
    with pytest.raises(ValueError, match="U-Net tasks only"):
        build_task("clip", use_checkpoint=True)
    assert parse_overrides('{"image_size": 32}', ["dropout=0.5", "channel_mult=1,2,2"]) == {
        "image_size": 32,
        "dropout": "0.5",
        "channel_mult": "1,2,2",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(None, ["dropout"])


def test_fp16_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="fp16 training needs CUDA"):
        Trainer(tiny_task("base"), shape_images(), tmp_path, TrainConfig(steps=1, batch_size=2, precision="fp16"))


def train_tiny(tmp_path, name, use_checkpoint=False, **config):
    torch.manual_seed(0)
    task = build_task("base", overrides=TINY_UNET_OPTIONS, use_checkpoint=use_checkpoint)
    assert task.model.use_checkpoint is use_checkpoint
    trainer = Trainer(task, shape_images(), tmp_path / name, TrainConfig(batch_size=2, log_every=1, **config))
    trainer.train()
    return trainer.task.model.state_dict(), read_log(tmp_path / name / "log.csv")


def test_gradient_checkpointing_trains_the_same_weights(tmp_path):
    plain, plain_log = train_tiny(tmp_path, "plain", steps=3, lr=1e-3)
    checkpointed, checkpointed_log = train_tiny(tmp_path, "checkpointed", use_checkpoint=True, steps=3, lr=1e-3)
    assert [row["loss"] for row in plain_log] == [row["loss"] for row in checkpointed_log]
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-5)


def test_bf16_autocast_computes_nearly_the_float32_loss(tmp_path):
    task = tiny_task("base")
    with torch.no_grad():
        task.model.out[-1].weight.normal_(0.0, 0.05)  # the output layer starts at zero
    trainer = Trainer(task, shape_images(), tmp_path, TrainConfig(steps=2, batch_size=2, precision="bf16"))
    batch = next(trainer.batches())
    bf16 = trainer.task.losses(trainer.module, batch)
    fp32 = trainer.task.losses(trainer.task.model, batch)
    assert bf16["loss"].dtype == torch.float32
    # bf16 keeps about 3 significant digits
    torch.testing.assert_close(bf16["mse"], fp32["mse"], rtol=2e-2, atol=0)
    assert not torch.equal(bf16["mse"], fp32["mse"])
    trainer.train()
    assert all(math.isfinite(float(row["loss"])) for row in read_log(tmp_path / "log.csv"))


def test_clip_weights_load_with_their_sidecar_config(tmp_path):
    Trainer(tiny_task("clip"), shape_images(), tmp_path, TrainConfig(steps=1, batch_size=4)).train()
    clip = load_clip(str(tmp_path / "clip_image_enc.pt"), str(tmp_path / "clip_text_enc.pt"), device="cpu")
    assert clip.image_encoder.image_size == 16
    state = read_state(tmp_path)
    for name, tensor in clip.state_dict().items():
        assert torch.equal(tensor, state["ema"][name]), name
    assert yaml.safe_load((tmp_path / "clip_image_enc.pt.yaml").read_text()) == state["options"]
    resumed = build_task("clip", init=f"{tmp_path / 'clip_image_enc.pt'},{tmp_path / 'clip_text_enc.pt'}")
    assert resumed.options == state["options"]


def test_cosine_learning_rate_schedule_warms_up_then_decays_to_zero(tmp_path):
    task = tiny_task("base")
    config = TrainConfig(steps=110, batch_size=4, lr=1e-3, warmup_steps=10, lr_schedule="cosine")
    trainer = Trainer(task, shape_images(), tmp_path, config)
    rates = [trainer.learning_rate(step) for step in range(110)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert rates[10] == pytest.approx(1e-3)
    assert rates[60] == pytest.approx(0.5e-3)  # halfway through the decay
    assert rates[109] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    constant = Trainer(task, shape_images(), tmp_path / "c", TrainConfig(steps=110, batch_size=4, lr=1e-3, warmup_steps=10))
    assert constant.learning_rate(109) == 1e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(steps=1, lr_schedule="linear")


def test_prediction_option_reaches_the_training_diffusion_and_the_sidecar(tmp_path):
    task = tiny_task("base", prediction="v")
    assert task.diffusion.prediction == "v" and task.options["prediction"] == "v"
    assert tiny_task("base").diffusion.prediction == "eps"
    config = TrainConfig(steps=1, batch_size=2, log_every=1, save_every=1)
    Trainer(task, shape_images(), tmp_path, config).train()
    options = checkpoint_options(str(tmp_path / "model.pt"))
    assert options["prediction"] == "v"
    _, diffusion = create_model_and_diffusion(**options)
    assert diffusion.prediction == "v"
    with pytest.raises(ValueError, match="unknown prediction 'x0'"):
        tiny_task("base", prediction="x0")


def test_freeze_text_encoder_trains_everything_but_the_prompt_encoder(tmp_path):
    torch.manual_seed(0)
    task = build_task("base", overrides=TINY_UNET_OPTIONS)
    frozen = {id(p) for p in task.model.text_encoder_parameters()}
    before = {name: p.detach().clone() for name, p in task.model.named_parameters()}
    config = TrainConfig(steps=3, batch_size=2, lr=1e-3, log_every=1, freeze_text_encoder=True)
    Trainer(task, shape_images(), tmp_path, config).train()

    names = {name for name, p in task.model.named_parameters() if id(p) in frozen}
    assert {"token_embedding.weight", "positional_embedding", "transformer.resblocks.0.attn.c_qkv.weight"} <= names
    assert not any(name.startswith("transformer_proj") for name in names)
    for name, p in task.model.named_parameters():
        assert torch.equal(p, before[name]) == (name in names), name


def test_freeze_text_encoder_keeps_a_clip_text_encoder_and_trains_its_image_encoder(tmp_path):
    torch.manual_seed(0)
    task = tiny_task("clip")
    before = {name: p.detach().clone() for name, p in task.model.named_parameters()}
    config = TrainConfig(steps=3, batch_size=2, lr=1e-3, log_every=1, freeze_text_encoder=True)
    Trainer(task, shape_images(), tmp_path, config).train()
    for name, p in task.model.named_parameters():
        assert torch.equal(p, before[name]) == name.startswith("text_encoder."), name


def test_freeze_text_encoder_needs_a_text_conditional_unet_or_a_clip(tmp_path):
    config = TrainConfig(steps=1, batch_size=2, freeze_text_encoder=True)
    with pytest.raises(ValueError, match="freeze_text_encoder needs a text-conditional U-Net or a CLIP"):
        Trainer(tiny_task("base", xf_width=0), shape_images(), tmp_path, config)


def test_cli_freeze_text_encoder_fine_tunes_the_unet_only(tmp_path):
    data = write_image_folder(tmp_path / "data")
    assert main(cli_args(data, tmp_path / "start", 2)) == 0
    init = str(tmp_path / "start" / "model.pt")
    assert main(cli_args(data, tmp_path / "tuned", 2, "--init", init, "--freeze-text-encoder")) == 0
    start, tuned = torch.load(init, weights_only=True), read_state(tmp_path / "tuned")["model"]
    for key in ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"):
        assert torch.equal(tuned[key], start[key]), key
    for key in ("transformer_proj.weight", "input_blocks.0.0.weight"):
        assert not torch.equal(tuned[key], start[key]), key


def test_cli_subject_mask_prob_reaches_the_inpainting_examples(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", size=64)
    args = ["inpaint", *cli_args(data, tmp_path / "out", 1)[1:]]
    with pytest.raises(SystemExit):
        main(args + ["--subject-mask-prob", "1.5"])
    assert "subject_mask_prob must lie in [0, 1], got 1.5" in capsys.readouterr().err
    config = TrainConfig(steps=1, batch_size=2, subject_mask_prob=1.0)
    task = tiny_task("inpaint", image_size=64, channel_mult="1,1,1,1")
    trainer = Trainer(task, shape_images(64), tmp_path / "direct", config)
    mask = trainer.dataset[(0, 0)]["inpaint_mask"]  # the red square, on pixels 16..48 of both axes
    erased = (mask[0] == 0).nonzero()
    top, left = erased.min(dim=0).values.tolist()
    bottom, right = erased.max(dim=0).values.tolist()
    margin = 16 - top
    assert 2 <= margin <= 8 and (left, bottom, right) == (top, 48 + margin, 48 + margin)
    assert len(erased) == (bottom - top + 1) ** 2
