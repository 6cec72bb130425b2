"""Patch training: random aligned patches of the model-sized image with their exact low-res."""

import pytest
import torch

from glide_text2im.model_creation import create_gaussian_diffusion
from glide_text2im.tokenizer.byte import ByteEncoder
from glide_text2im.train.data import TrainingExamples, UNetCaptionEncoder, image_to_tensor, low_res_of
from glide_text2im.train.trainer import TrainConfig, Trainer, build_task
from tests.train import TINY_CLIP_OPTIONS, TINY_UNET_OPTIONS, shape_images, single_thread

DIFFUSION = create_gaussian_diffusion(steps=1000, noise_schedule="squaredcos_cap_v2")


def patch_examples(**kwargs):
    options = dict(image_size=32, encode_caption=UNetCaptionEncoder(ByteEncoder(), 16), diffusion=DIFFUSION)
    options.update(kwargs)
    return TrainingExamples(shape_images(32), **options)


def locate(patch, image):
    """(top, left) of every place where ``patch`` [C x P x P] occurs exactly in ``image``."""
    size = patch.shape[-1]
    return [
        (top, left)
        for top in range(image.shape[-2] - size + 1)
        for left in range(image.shape[-1] - size + 1)
        if torch.equal(image[:, top : top + size, left : left + size], patch)
    ]


def test_patches_are_aligned_crops_with_the_matching_low_res():
    data = patch_examples(patch_size=16, super_res=True, uncond_prob=0.0)
    corners = set()
    for epoch in range(6):
        for index in range(len(data)):
            example = data[(epoch, index)]
            image = image_to_tensor(data.source[index][0])
            assert example["x_start"].shape == (3, 16, 16)
            assert example["low_res"].shape == (3, 4, 4)
            # A patch of plain background can occur in several places; one must be aligned.
            aligned = [(top, left) for top, left in locate(example["x_start"], image) if top % 4 == left % 4 == 0]
            assert aligned
            top, left = aligned[0]
            whole_low_res = low_res_of(image)[:, top // 4 : top // 4 + 4, left // 4 : left // 4 + 4]
            assert torch.equal(example["low_res"], whole_low_res)
            corners.add(aligned[0])
    assert len(corners) >= 4  # the position varies from draw to draw


def test_patches_are_reproducible_and_masks_have_the_patch_size():
    data = patch_examples(patch_size=8, inpaint=True, seed=3)
    first, again = data[(2, 1)], data[(2, 1)]
    assert torch.equal(first["x_start"], again["x_start"]) and torch.equal(first["noise"], again["noise"])
    assert first["inpaint_mask"].shape == (1, 8, 8) and first["noise"].shape == (3, 8, 8)
    assert torch.equal(first["inpaint_image"], first["x_start"] * first["inpaint_mask"])


def test_whole_image_examples_are_unchanged_without_a_patch_size():
    whole, none = patch_examples(super_res=True), patch_examples(super_res=True, patch_size=None)
    full = patch_examples(super_res=True, patch_size=32)
    for key in ("x_start", "low_res", "noise"):
        assert torch.equal(whole[(0, 2)][key], none[(0, 2)][key])
    assert torch.equal(full[(0, 2)]["x_start"], whole[(0, 2)]["x_start"])


@pytest.mark.parametrize("patch_size", [0, 6, 36, 8.0])
def test_bad_patch_sizes_are_refused(patch_size):
    with pytest.raises(ValueError, match="patch_size"):
        patch_examples(patch_size=patch_size)


def test_an_upsampler_trains_on_patches_and_the_clip_refuses_them(tmp_path):
    with single_thread():
        torch.manual_seed(0)
        task = build_task("upsample", overrides=dict(TINY_UNET_OPTIONS, image_size=32, channel_mult="1,1,1", noise_schedule="linear"))
        config = TrainConfig(steps=2, batch_size=2, patch_size=16, save_every=2)
        trainer = Trainer(task, shape_images(32), tmp_path, config)
        batch = next(trainer.batches())
        assert batch["x_start"].shape == (2, 3, 16, 16) and batch["low_res"].shape == (2, 3, 4, 4)
        trainer.train()
        assert trainer.step == 2 and (tmp_path / "model.pt").is_file()
    with pytest.raises(ValueError, match="patch_size must be 0"):
        TrainConfig(steps=1, patch_size=-1)
    clip = build_task("clip", overrides=TINY_CLIP_OPTIONS)
    with pytest.raises(ValueError, match="U-Net tasks only"):
        clip.make_examples(shape_images(16), TrainConfig(steps=1, patch_size=8))
