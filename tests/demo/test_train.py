"""The demo training script: the ``text`` stage feeds ``base``, whose text encoder stays frozen."""

import pytest
import torch

from glide_text2im.demo.train import main


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
