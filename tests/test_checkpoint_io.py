"""Checkpoint files in both formats: a `.safetensors` round trip of every model family, and
``convert_checkpoint`` / ``glide-text2im convert`` (sidecars, overwriting, one-line errors).

The models are the tiny random stand-ins of ``tests/notebook_scripts/tiny_weights.py``. Each
family is saved as `.pt` with its sidecar, converted to `.safetensors` by the ``convert``
command and by ``write_state_dict``, and both files are loaded through the loaders users call
(``load_model``, ``load_clip``); the weights and the forward outputs must be identical.
"""

import json
import os
import re
import stat

import pytest
import safetensors.torch
import torch
import yaml

from glide_text2im.checkpoint_io import (
    CheckpointError,
    is_safetensors_file,
    read_state_dict,
    write_state_dict,
)
from glide_text2im.cli import main
from glide_text2im.download import LOCAL_CHECKPOINTS
from glide_text2im.pipelines.loading import (
    CHECKPOINT_OPTIONS,
    convert_checkpoint,
    load_clip,
    load_model,
    options_path,
    save_options,
)
from tests.test_pipelines import one_thread  # noqa: F401  (autouse: one intra-op thread here too)
from tests.notebook_scripts.tiny_weights import (
    UNET_CHECKPOINTS,
    tiny_clip_state_dicts,
    tiny_options,
    tiny_state_dict,
    write_clip_config,
)

PROMPT = "a red cube"


def assert_same_state_dict(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and actual[key].shape == value.shape, key
        assert torch.equal(actual[key], value), key


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def convert(source, destination, *options) -> None:
    """Run ``glide-text2im convert`` in-process; it must succeed."""
    assert main(["convert", str(source), str(destination), *options]) == 0


def write_unet(folder, name: str) -> str:
    """``<folder>/<name>.pt`` with its options sidecar."""
    path = str(folder / f"{name}.pt")
    write_state_dict(tiny_state_dict(name), path)
    save_options(path, tiny_options(name))
    return path


def unet_inputs(options: dict, seed: int) -> dict:
    """Random forward inputs for a U-Net with ``options``: x, timesteps and its extra inputs."""
    generator = torch.Generator().manual_seed(seed)
    size = options["image_size"]
    inputs = dict(x=torch.randn(2, 3, size, size, generator=generator), timesteps=torch.tensor([10, 700]))
    if options["super_res"]:
        inputs["low_res"] = torch.randn(2, 3, size // 4, size // 4, generator=generator)
    if options["inpaint"]:
        inputs["inpaint_image"] = torch.randn(2, 3, size, size, generator=generator)
        inputs["inpaint_mask"] = (torch.rand(2, 1, size, size, generator=generator) > 0.5).float()
    return inputs


def unet_output(path: str, seed: int) -> tuple:
    loaded = load_model(path, device="cpu", dtype="float32", progress=False)
    kwargs = loaded.text_kwargs([PROMPT, None])
    with torch.no_grad():
        out = loaded.model(**unet_inputs(loaded.options, seed), **kwargs)
    return loaded, out


@pytest.mark.parametrize("name", list(UNET_CHECKPOINTS))
def test_unet_safetensors_round_trip_gives_identical_weights_and_outputs(tmp_path, name):
    pt = write_unet(tmp_path, name)
    converted = tmp_path / f"{name}-converted.safetensors"
    direct = tmp_path / f"{name}.safetensors"
    convert(pt, converted)
    write_state_dict(read_state_dict(pt), str(direct))
    assert is_safetensors_file(str(converted)) and converted.read_bytes() == direct.read_bytes()
    assert read_json(options_path(str(converted))) == tiny_options(name)

    seed = len(name)
    from_pt, out_pt = unet_output(pt, seed)
    from_st, out_st = unet_output(str(converted), seed)
    assert from_st.options == from_pt.options
    assert_same_state_dict(from_st.model.state_dict(), from_pt.model.state_dict())
    assert_same_state_dict(read_state_dict(str(converted)), tiny_state_dict(name))
    assert out_pt.shape == (2, 6, from_pt.image_size, from_pt.image_size) and out_pt.abs().mean() > 1e-3
    assert torch.equal(out_st, out_pt)

    back = tmp_path / f"{name}-back.pt"  # and back to .pt: the same weights again
    convert(converted, back)
    assert not is_safetensors_file(str(back))
    assert_same_state_dict(read_state_dict(str(back)), tiny_state_dict(name))
    assert read_json(options_path(str(back))) == tiny_options(name)


def test_clip_safetensors_round_trip_gives_identical_weights_and_embeddings(tmp_path):
    config = write_clip_config(tmp_path / "clip_image_enc.pt.yaml")
    weights = tiny_clip_state_dicts(config)
    image_pt, text_pt = str(tmp_path / "clip_image_enc.pt"), str(tmp_path / "clip_text_enc.pt")
    write_state_dict(weights["clip/image-enc"], image_pt)
    write_state_dict(weights["clip/text-enc"], text_pt)
    image_st, text_st = tmp_path / "image.safetensors", tmp_path / "text.safetensors"
    convert(image_pt, image_st)
    write_state_dict(read_state_dict(text_pt), str(text_st))
    assert (tmp_path / "image.safetensors.yaml").read_text() == config.read_text()
    assert not (tmp_path / "image.safetensors.json").exists()

    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    t = torch.tensor([5, 900])
    embeddings = []
    for image_file, text_file in ((image_pt, text_pt), (str(image_st), str(text_st))):
        clip = load_clip(image_file, text_file, device="cpu", progress=False)
        with torch.no_grad():
            embeddings.append((clip.image_embeddings(images, t), clip.text_embeddings([PROMPT, "a blue ball"])))
        assert_same_state_dict(clip.image_encoder.state_dict(), weights["clip/image-enc"])
        assert_same_state_dict(clip.text_encoder.state_dict(), weights["clip/text-enc"])
    (image_pt_out, text_pt_out), (image_st_out, text_st_out) = embeddings
    assert image_pt_out.shape == (2, yaml.safe_load(config.read_text())["n_embd"])
    assert not torch.equal(text_pt_out[0], text_pt_out[1])
    assert torch.equal(image_st_out, image_pt_out) and torch.equal(text_st_out, text_pt_out)


def test_demo_weights_ship_as_safetensors_with_their_sidecars():
    from glide_text2im import demo

    for name, file in demo.CHECKPOINT_FILES.items():
        path = demo.weights_path(name)
        assert file.endswith(".safetensors") and is_safetensors_file(path), name
        assert not os.path.exists(path[: -len(".safetensors")] + ".pt"), name
    for name in demo.UNET_CHECKPOINTS:
        assert os.path.isfile(options_path(demo.weights_path(name)))
    assert demo.clip_config_path().endswith("clip_image_enc.safetensors.yaml")
    assert os.path.isfile(demo.clip_config_path())


def test_converting_a_demo_name_carries_its_sidecar(tmp_path):
    from glide_text2im import demo

    convert("demo/upsample", tmp_path / "upsample.pt")
    assert not is_safetensors_file(str(tmp_path / "upsample.pt"))
    assert json.loads((tmp_path / "upsample.pt.json").read_text()) == demo.options("demo/upsample")
    assert_same_state_dict(read_state_dict(str(tmp_path / "upsample.pt")), read_state_dict(demo.weights_path("demo/upsample")))


def test_a_name_with_registered_options_gets_them_as_a_sidecar(tmp_path, monkeypatch):
    bare = str(tmp_path / "bare.pt")  # like a downloaded official file: no sidecar
    write_state_dict(tiny_state_dict("base"), bare)
    monkeypatch.setitem(LOCAL_CHECKPOINTS, "tiny/base", lambda: bare)
    monkeypatch.setitem(CHECKPOINT_OPTIONS, "tiny/base", lambda: tiny_options("base"))
    written = convert_checkpoint("tiny/base", str(tmp_path / "base.safetensors"))
    assert written.sidecars == [str(tmp_path / "base.safetensors.json")]
    assert load_model(str(tmp_path / "base.safetensors"), device="cpu", progress=False).options == tiny_options("base")


def test_convert_prints_what_it_wrote(tmp_path, capsys):
    pt = write_unet(tmp_path, "base")
    convert(pt, tmp_path / "base.safetensors")
    destination = tmp_path / "base.safetensors"
    tensors = len(tiny_state_dict("base"))
    assert capsys.readouterr().out.splitlines() == [
        f"{destination}: {tensors} tensors, {destination.stat().st_size} bytes",
        f"{destination}.json",
    ]


def test_convert_overwrites_only_when_asked_and_drops_stale_sidecars(tmp_path, capsys):
    pt = write_unet(tmp_path, "base")
    destination = tmp_path / "out.safetensors"
    destination.write_bytes(b"old")
    assert main(["convert", pt, str(destination)]) == 1
    err = capsys.readouterr().err
    assert err == f"glide-text2im: error: {destination} already exists: pass --overwrite (overwrite=True) to replace it\n"
    assert destination.read_bytes() == b"old"

    clip_config = tmp_path / "out.safetensors.yaml"  # a sidecar the source lacks
    clip_config.write_text("stale")
    convert(pt, destination, "--overwrite")
    assert_same_state_dict(read_state_dict(str(destination)), tiny_state_dict("base"))
    assert not clip_config.exists() and os.path.isfile(options_path(str(destination)))

    destination.unlink()  # a sidecar alone also blocks: it would describe the new file
    assert main(["convert", pt, str(destination)]) == 1
    assert "out.safetensors.json already exists" in capsys.readouterr().err
    assert not destination.exists()


@pytest.mark.parametrize(
    "source, destination, pattern",
    [
        ("{tmp}/gone.pt", "{tmp}/x.safetensors", r"no such file: .*gone\.pt$"),
        ("base-v2", "{tmp}/x.safetensors", r"unknown checkpoint 'base-v2'"),
        ("{tmp}/damaged.pt", "{tmp}/x.safetensors", r"damaged\.pt is not a checkpoint"),
        ("{tmp}/truncated.safetensors", "{tmp}/x.pt", r"truncated\.safetensors is a damaged safetensors file"),
        ("{tmp}/good.pt", "{tmp}/missing/x.safetensors", r"destination folder .*missing does not exist"),
        ("{tmp}/good.pt", "{tmp}/x.bin", r"destination .*x\.bin must end in \.pt or \.safetensors"),
        ("{tmp}/good.pt", "{tmp}/good.pt --overwrite", r"good\.pt is the source file itself"),
    ],
)
def test_convert_errors_are_one_line_and_write_nothing(tmp_path, capsys, source, destination, pattern):
    write_state_dict({"w": torch.ones(3)}, str(tmp_path / "good.pt"))
    (tmp_path / "damaged.pt").write_bytes(b"not a checkpoint at all")
    write_state_dict({"w": torch.ones(1000)}, str(tmp_path / "whole.safetensors"))
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "whole.safetensors").read_bytes()[:-100])
    before = sorted(os.listdir(tmp_path))
    args = [source.format(tmp=tmp_path), *destination.format(tmp=tmp_path).split()]
    assert main(["convert", *args]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert re.search(pattern, captured.err), captured.err
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary file left


def test_write_state_dict_writes_shared_tensors_apart_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    storage = torch.arange(6.0)
    state_dict = {"whole": storage, "head": storage[:2], "tail": storage[4:]}
    path = str(tmp_path / "shared.safetensors")
    write_state_dict(state_dict, path)
    assert_same_state_dict(read_state_dict(path), {k: v.clone() for k, v in state_dict.items()})
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # readable like any new file

    with pytest.raises(CheckpointError, match="does not hold a state dict: entry 'bad'"):
        write_state_dict({"bad": [1, 2]}, str(tmp_path / "bad.safetensors"))

    def disk_full(tensors, filename):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_state_dict({"w": torch.ones(2)}, str(tmp_path / "full.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["shared.safetensors"]
