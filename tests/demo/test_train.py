"""The demo training script: the ``text`` stage feeds ``base``, whose text encoder stays frozen;
``inpaint`` starts from the exported ``base.safetensors``; every export is a safetensors file."""

import random

import pytest
import torch

from glide_text2im.checkpoint_io import is_safetensors_file, read_state_dict, write_state_dict
from glide_text2im.demo import shapes
from glide_text2im.demo.train import STAGE_RECIPES, half_state, labelled_caption, main
from glide_text2im.pipelines.loading import save_options
from glide_text2im.train.trainer import build_task


def test_text_stage_pretrains_the_text_encoder_that_base_keeps(tmp_path, capsys):
    out, work = tmp_path / "weights", tmp_path / "work"
    assert main(["--out", str(out), "--work", str(work), "--stages", "text,base", "--steps", "2"]) == 0
    assert "stage text:" in capsys.readouterr().out

    initial = torch.load(work / "text" / "model.pt", weights_only=True)
    exported = read_state_dict(out / "base.safetensors")
    assert is_safetensors_file(out / "base.safetensors") and not (out / "base.pt").exists()
    assert (work / "text" / "model.pt.json").is_file() and (out / "base.safetensors.json").is_file()
    for key in ("token_embedding.weight", "positional_embedding", "padding_embedding", "final_ln.weight"):
        assert torch.equal(exported[key], initial[key].half()), key
    assert not torch.equal(exported["input_blocks.0.0.weight"], initial["input_blocks.0.0.weight"].half())


def test_inpaint_stage_starts_from_the_exported_base_weights(tmp_path, capsys):
    out, work = tmp_path / "weights", tmp_path / "work"
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--work", str(work), "--stages", "inpaint", "--steps", "1"])
    assert f"stage 'inpaint' starts from {out / 'base.safetensors'}, which is missing" in capsys.readouterr().err

    torch.manual_seed(123)  # not the stage's own seed: weights it could not draw itself
    task = build_task("base", overrides=STAGE_RECIPES["base"].options)
    base = half_state(task.model)
    out.mkdir(exist_ok=True)  # main made it before it stopped
    write_state_dict(base, str(out / "base.safetensors"))
    save_options(str(out / "base.safetensors"), task.options)
    assert main(["--out", str(out), "--work", str(work), "--stages", "inpaint", "--steps", "1"]) == 0
    inpaint = read_state_dict(out / "base_inpaint.safetensors")
    assert is_safetensors_file(out / "base_inpaint.safetensors")
    assert inpaint["input_blocks.0.0.weight"].shape[1] == 7  # x, inpaint_image, inpaint_mask
    for key in ("token_embedding.weight", "positional_embedding", "transformer_proj.weight"):
        assert torch.equal(inpaint[key], base[key]), key  # the frozen text encoder


def test_unknown_stage_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--stages", "text,bse"])
    assert "unknown stage 'bse'" in capsys.readouterr().err


def test_labelled_caption_labels_every_attribute_or_not_stated():
    rng = random.Random(0)
    not_stated = 0
    for _ in range(200):
        text, labels = labelled_caption(rng)
        said = shapes.parse_prompt(text)
        assert len(labels) == len(shapes.ATTRIBUTE_VALUES)
        for (name, values), label in zip(shapes.ATTRIBUTE_VALUES.items(), labels):
            wanted = getattr(said, name)
            assert label == (len(values) if wanted is None else values.index(wanted)), (text, labels)
            not_stated += wanted is None
    assert not_stated > 0
