"""The demo training script: the ``text`` stage feeds ``base``, whose text encoder stays frozen."""

import random

import pytest
import torch

from glide_text2im.demo import shapes
from glide_text2im.demo.train import labelled_caption, main


def test_text_stage_pretrains_the_text_encoder_that_base_keeps(tmp_path, capsys):
    out, work = tmp_path / "weights", tmp_path / "work"
    assert main(["--out", str(out), "--work", str(work), "--stages", "text,base", "--steps", "2"]) == 0
    assert "stage text:" in capsys.readouterr().out

    initial = torch.load(work / "text" / "model.pt", weights_only=True)
    exported = torch.load(out / "base.pt", weights_only=True)
    assert (work / "text" / "model.pt.json").is_file() and (out / "base.pt.json").is_file()
    for key in ("token_embedding.weight", "positional_embedding", "padding_embedding", "final_ln.weight"):
        assert torch.equal(exported[key], initial[key].half()), key
    assert not torch.equal(exported["input_blocks.0.0.weight"], initial["input_blocks.0.0.weight"].half())


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
