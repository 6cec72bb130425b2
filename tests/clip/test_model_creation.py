"""CLIPModel: building from a config, golden embeddings, the CLIP-guidance gradient, bad input."""

import json
import math

import pytest
import torch

import glide_text2im.tokenizer.simple_tokenizer as simple_tokenizer
from glide_text2im.clip.model_creation import CLIPModel, create_clip_model, load_clip_config
from tests.conftest import load_golden

ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def golden() -> dict:
    return load_golden("clip.pt")


@pytest.fixture(scope="module")
def golden_config_path(golden, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "config.yaml"
    path.write_text(golden["config_yaml"])
    return path


@pytest.fixture(scope="module")
def clip(golden, golden_config_path) -> CLIPModel:
    model = create_clip_model(config_path=golden_config_path, device=torch.device("cpu"))
    model.text_encoder.load_state_dict(golden["text_state_dict"])
    model.image_encoder.load_state_dict(golden["image_state_dict"])
    return model.eval()


def test_packaged_config_is_the_official_one(spec_dir):
    defaults = json.loads((spec_dir / "defaults.json").read_text())
    assert load_clip_config() == defaults["clip_config_yaml"]


def test_default_model_has_official_sizes(spec_dir):
    model = create_clip_model(device="cpu")
    encoders = {"clip_text_enc.json": model.text_encoder,
                "clip_image_enc.json": model.image_encoder}
    for spec_name, encoder in encoders.items():
        spec = json.loads((spec_dir / spec_name).read_text())
        assert type(encoder).__name__ == spec["model_class"]
        assert sum(p.numel() for p in encoder.parameters()) == spec["num_params"]
    assert model.device == torch.device("cpu")


def test_logit_scale_is_log_of_config_value_and_not_a_weight(golden, clip):
    assert clip.logit_scale.dtype == torch.float32
    assert torch.equal(clip.logit_scale, golden["logit_scale"])
    assert clip.logit_scale.item() == pytest.approx(math.log(100.0), abs=1e-6)
    assert "logit_scale" not in clip.state_dict()


def test_tokenizer_is_built_only_when_first_needed(golden_config_path, monkeypatch):
    built = []

    class RecordingTokenizer(simple_tokenizer.SimpleTokenizer):
        def __init__(self):
            built.append(self)
            super().__init__()

    monkeypatch.setattr(simple_tokenizer, "SimpleTokenizer", RecordingTokenizer)
    model = create_clip_model(config_path=golden_config_path)
    assert built == []
    _, lens = model.encode_prompts(["a corgi", "a cat"])
    model.encode_prompts(["a dog"])
    assert len(built) == 1 and model.tokenizer is built[0]
    assert lens.tolist() == [4, 4]


def test_given_tokenizer_is_used(golden_config_path):
    class FixedTokenizer:
        def encode(self, text):
            return [len(text)]

        def padded_tokens_and_len(self, tokens, text_ctx):
            return [7] + tokens + [0] * (text_ctx - 2), 2

    model = create_clip_model(config_path=golden_config_path, tokenizer=FixedTokenizer())
    tokens, lens = model.encode_prompts(["abc"])
    assert tokens[0, :3].tolist() == [7, 3, 0] and tokens.shape == (1, 77)
    assert lens.tolist() == [2]


def test_encode_prompts_matches_golden(golden, clip):
    tokens, lens = clip.encode_prompts(golden["prompts"])
    assert tokens.dtype == lens.dtype == torch.int64
    assert torch.equal(tokens, golden["tokens"])
    assert torch.equal(lens, golden["lens"])


def test_text_embeddings_match_golden(golden, clip):
    with torch.no_grad():
        z_text = clip.text_embeddings(golden["prompts"])
    torch.testing.assert_close(z_text, golden["text_embeddings"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(z_text.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)


def test_image_embeddings_match_golden(golden, clip):
    with torch.no_grad():
        z_image = clip.image_embeddings(golden["images"], golden["t"])
    torch.testing.assert_close(z_image, golden["image_embeddings"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(z_image.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("grad_scale, key", [(3.0, "cond_fn_grad"), (1.0, "cond_fn_grad_scale1")])
def test_cond_fn_matches_golden_inside_no_grad(golden, clip, grad_scale, key):
    x = golden["cond_fn_x"].clone()
    with torch.no_grad():
        cond_fn = clip.cond_fn(golden["prompts"], grad_scale)
        grad = cond_fn(x, golden["t"], tokens=torch.zeros(3, 16, dtype=torch.long), mask=None)
    assert not grad.requires_grad and x.grad is None
    assert torch.equal(x, golden["cond_fn_x"])
    torch.testing.assert_close(grad, golden[key], atol=ATOL, rtol=RTOL)


def test_cond_fn_rejects_batch_of_other_size(golden, clip):
    cond_fn = clip.cond_fn(golden["prompts"][:2], 3.0)
    with pytest.raises(ValueError, match="2 prompts but got a batch of 3"):
        cond_fn(golden["cond_fn_x"], golden["t"])


@pytest.mark.parametrize(
    "prompts, error, message",
    [
        ([], ValueError, "empty"),
        ("a corgi", TypeError, "single string"),
        (["ok", 3], TypeError, "str"),
    ],
)
def test_bad_prompt_lists_are_rejected(clip, prompts, error, message):
    with pytest.raises(error, match=message):
        clip.text_embeddings(prompts)
    with pytest.raises(error, match=message):
        clip.cond_fn(prompts, 1.0)


@pytest.mark.parametrize(
    "images, t, message",
    [
        (torch.zeros(3, 3, 32, 32), torch.tensor([0, 1, 2]), "64x64 pixels"),
        (torch.zeros(3, 1, 64, 64), torch.tensor([0, 1, 2]), "3 x 64 x 64"),
        (torch.zeros(3, 3, 64, 64), None, "timesteps are missing"),
        (torch.zeros(3, 3, 64, 64), torch.tensor([0, 1]), r"shape \[3\]"),
    ],
)
def test_image_embeddings_reject_bad_input(clip, images, t, message):
    with pytest.raises(ValueError, match=message):
        clip.image_embeddings(images, t)


def test_cond_fn_rejects_missing_timesteps(golden, clip):
    cond_fn = clip.cond_fn(golden["prompts"], 1.0)
    with pytest.raises(ValueError, match="timesteps are missing"):
        cond_fn(golden["cond_fn_x"], None)


def test_config_with_missing_or_unknown_keys_is_rejected(golden, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(golden["config_yaml"].replace("n_embd: 24\n", "") + "n_layers: 3\n")
    with pytest.raises(ValueError, match=r"missing keys \['n_embd'\], unknown keys \['n_layers'\]"):
        create_clip_model(config_path=path)


def test_the_originals_attributes_exist_with_its_meaning(golden, golden_config_path, clip):
    """The original CLIPModel is a dataclass (config, text_encoder, image_encoder, logit_scale, device, tokenizer)."""
    import yaml

    assert clip.config == yaml.safe_load(golden["config_yaml"])
    assert clip.config["image_size"] == 64 and clip.config["n_embd"] == 24
    assert create_clip_model().config["image_size"] == 64 and create_clip_model().config["patch_size"] == 4
    assert clip.text_encoder.max_text_len == clip.config["max_text_len"] == 77
    assert type(clip.image_encoder).__name__ == "ImageEncoder" and type(clip.text_encoder).__name__ == "TextEncoder"
    assert clip.logit_scale.shape == () and clip.logit_scale.item() == pytest.approx(math.log(clip.config["logit_scale"]))
    assert clip.device == torch.device("cpu") == clip.logit_scale.device
    assert isinstance(clip.tokenizer, simple_tokenizer.SimpleTokenizer)
    assert clip.tokenizer.encode("a corgi") == simple_tokenizer.SimpleTokenizer().encode("a corgi")


def test_constructor_takes_the_originals_arguments_in_its_order(golden, clip):
    class FixedTokenizer:
        pass

    tokenizer = FixedTokenizer()
    logit_scale = torch.tensor(math.log(50.0))
    rebuilt = CLIPModel(clip.config, clip.text_encoder, clip.image_encoder, logit_scale, torch.device("cpu"), tokenizer)
    assert rebuilt.config is clip.config and rebuilt.text_encoder is clip.text_encoder
    assert rebuilt.image_encoder is clip.image_encoder and rebuilt.tokenizer is tokenizer
    assert rebuilt.logit_scale.item() == pytest.approx(math.log(50.0)) and rebuilt.device == torch.device("cpu")
    other = FixedTokenizer()
    rebuilt.tokenizer = other  # assignable, as on the original dataclass
    assert rebuilt.tokenizer is other
