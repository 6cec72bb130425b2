"""Training data: the caption folder, crops, low-res inputs, inpainting masks, examples, data order."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from glide_text2im.model_creation import create_gaussian_diffusion
from glide_text2im.tokenizer.bpe import get_encoder
from glide_text2im.tokenizer.byte import ByteEncoder
from glide_text2im.train.data import (
    CLIPCaptionEncoder,
    ExampleSampler,
    ImageCaptionFolder,
    TrainingExamples,
    UNetCaptionEncoder,
    as_source,
    image_to_tensor,
    low_res_of,
    random_inpaint_mask,
    random_square_crop,
    subject_box_mask,
)
from glide_text2im.train.trainer import build_task
from tests.train import TINY_CLIP_OPTIONS, shape_images, write_image_folder

DIFFUSION = create_gaussian_diffusion(steps=1000, noise_schedule="squaredcos_cap_v2")


def examples(source, **kwargs):
    options = dict(image_size=16, encode_caption=UNetCaptionEncoder(ByteEncoder(), 16), diffusion=DIFFUSION)
    options.update(kwargs)
    return TrainingExamples(source, **options)


def test_folder_pairs_images_with_same_named_captions_recursively(tmp_path):
    write_image_folder(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "uncaptioned.png")
    (tmp_path / "b" / "orphan.txt").write_text("no image")
    folder = ImageCaptionFolder(tmp_path)
    assert [(p.relative_to(tmp_path).as_posix(), c.name) for p, c in folder.pairs] == [
        ("a/0.png", "0.txt"),
        ("a/2.png", "2.txt"),
        ("b/1.png", "1.txt"),
        ("b/3.png", "3.txt"),
    ]
    image, caption = folder[2]
    assert caption == "a blue circle"  # trailing newline stripped
    assert image.mode == "RGB" and image.size == (16, 16)
    assert np.array_equal(np.asarray(image), np.asarray(shape_images()[1][0]))


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageCaptionFolder(tmp_path / "missing")
    Image.new("RGB", (8, 8)).save(tmp_path / "lonely.png")
    with pytest.raises(ValueError, match="no captioned images"):
        ImageCaptionFolder(tmp_path)


def test_as_source_accepts_folders_sequences_and_iterables(tmp_path):
    pairs = shape_images()
    assert as_source(pairs) is pairs
    assert as_source(pair for pair in pairs) == pairs
    assert len(as_source(write_image_folder(tmp_path))) == 4
    with pytest.raises(TypeError, match="folder path or an iterable"):
        as_source(42)


def test_image_to_tensor_maps_uint8_to_minus_one_one():
    array = np.array([[[0, 255, 51]]], dtype=np.uint8)
    x = image_to_tensor(Image.fromarray(array))
    assert x.shape == (3, 1, 1)
    assert x.flatten().tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])


def test_random_square_crop_keeps_the_short_side_and_slides_along_the_long_one():
    array = np.zeros((20, 60, 3), dtype=np.uint8)
    array[:, :, 0] = np.arange(60, dtype=np.uint8)[None, :]  # red = column index
    image = Image.fromarray(array)
    lefts = set()
    for seed in range(20):
        crop = np.asarray(random_square_crop(image, 20, random.Random(seed)))
        assert crop.shape == (20, 20, 3)
        left = int(crop[0, 0, 0])
        assert crop[0, :, 0].tolist() == list(range(left, left + 20))
        lefts.add(left)
    assert len(lefts) > 5 and max(lefts) <= 40
    smaller = random_square_crop(image, 8, random.Random(0), min_fraction=0.5)
    assert smaller.size == (8, 8)
    with pytest.raises(ValueError, match="min_fraction"):
        random_square_crop(image, 8, random.Random(0), min_fraction=0.0)


def test_low_res_is_the_4x4_block_mean_on_the_8_bit_grid():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    x = image_to_tensor(Image.fromarray(pixels))
    low = low_res_of(x)
    block_means = pixels.astype(np.float64).reshape(4, 4, 4, 4, 3).mean(axis=(1, 3))
    want = torch.from_numpy(np.round(block_means) / 127.5 - 1).permute(2, 0, 1).float()
    assert low.shape == (3, 4, 4)
    torch.testing.assert_close(low, want, atol=1e-6, rtol=0)
    assert low_res_of(x[None]).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="not divisible by 4"):
        low_res_of(torch.zeros(3, 10, 10))


def test_inpaint_masks_are_binary_erase_some_and_repeat_per_seed():
    masks = [random_inpaint_mask(32, random.Random(seed)) for seed in range(50)]
    for mask in masks:
        assert mask.shape == (1, 32, 32) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        erased = 1 - mask.mean().item()
        assert 0.01 < erased < 0.9
    assert torch.equal(masks[3], random_inpaint_mask(32, random.Random(3)))
    assert not torch.equal(masks[3], masks[4])


def plain_image_with_subject(rows, cols, size=32):
    """[3 x size x size]: a plain background with a solid block on ``rows`` x ``cols`` (slices),
    and one faint pixel (below ``subject_box_mask``'s threshold) in a corner."""
    image = torch.tensor([-0.6, 0.2, 0.9]).view(3, 1, 1).repeat(1, size, size)
    image[:, rows, cols] = torch.tensor([0.8, -0.8, 0.1]).view(3, 1, 1)
    image[1, size - 2, 1] += 0.05
    return image


def erased_box(mask):
    """(top, bottom, left, right) of the erased pixels of a [1 x S x S] mask, asserting that
    they form one filled rectangle."""
    erased = mask[0] == 0
    rows, cols = erased.any(dim=1).nonzero()[:, 0], erased.any(dim=0).nonzero()[:, 0]
    top, bottom, left, right = rows[0].item(), rows[-1].item() + 1, cols[0].item(), cols[-1].item() + 1
    assert erased[top:bottom, left:right].all() and erased.sum() == (bottom - top) * (right - left)
    return top, bottom, left, right


def test_subject_box_mask_erases_the_subjects_box_grown_by_one_margin_on_every_side():
    image = plain_image_with_subject(slice(10, 16), slice(12, 20))  # rows 10..15, cols 12..19
    margins = set()
    for seed in range(30):
        mask = subject_box_mask(image, random.Random(seed))
        assert mask.shape == (1, 32, 32) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        top, bottom, left, right = erased_box(mask)
        margin = 10 - top
        assert (top, bottom, left, right) == (10 - margin, 16 + margin, 12 - margin, 20 + margin)
        margins.add(margin)
    assert margins == set(range(2, 9))
    assert torch.equal(subject_box_mask(image, random.Random(4)), subject_box_mask(image, random.Random(4)))
    # Clipped at the image's edges; the border colour is its median, so a subject may touch it.
    corner = plain_image_with_subject(slice(0, 5), slice(25, 32))
    top, bottom, left, right = erased_box(subject_box_mask(corner, random.Random(0)))
    assert top == 0 and right == 32 and 7 <= bottom <= 13 and 17 <= left <= 23


def test_subject_box_mask_is_none_without_a_subject_or_when_the_box_is_everything():
    plain = plain_image_with_subject(slice(0, 0), slice(0, 0))
    assert subject_box_mask(plain, random.Random(0)) is None  # the faint pixel is no subject
    big = plain_image_with_subject(slice(1, 31), slice(1, 31))
    assert subject_box_mask(big, random.Random(0)) is None


def test_examples_erase_the_subject_box_with_subject_mask_prob():
    source = shape_images(64)[:2]  # a square and a circle, more than 8 px inside their images
    boxed = examples(source, image_size=64, inpaint=True, subject_mask_prob=1.0)
    for key in [(0, 0), (0, 1), (5, 0), (5, 1)]:
        example = boxed[key]
        top, bottom, left, right = erased_box(example["inpaint_mask"])
        x_start = example["x_start"]
        subject = (x_start - x_start[:, :1, :1]).abs().amax(dim=0) > 0.1
        rows, cols = subject.any(dim=1).nonzero()[:, 0].tolist(), subject.any(dim=0).nonzero()[:, 0].tolist()
        grown = {rows[0] - top, bottom - 1 - rows[-1], cols[0] - left, right - 1 - cols[-1]}
        assert len(grown) == 1 and 2 <= grown.pop() <= 8
    plain = examples(source, image_size=64, inpaint=True)  # subject_mask_prob 0: random regions
    assert not torch.equal(plain[(0, 0)]["inpaint_mask"], boxed[(0, 0)]["inpaint_mask"])
    with pytest.raises(ValueError, match="subject_mask_prob must lie in"):
        examples(source, inpaint=True, subject_mask_prob=1.5)


def test_examples_are_fixed_by_seed_epoch_and_index():
    data = examples(shape_images(), inpaint=True, super_res=True, seed=7)
    first, again = data[(2, 1)], data[(2, 1)]
    for key in first:
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(first["noise"], data[(3, 1)]["noise"])
    assert not torch.equal(first["noise"], examples(shape_images(), seed=8)[(2, 1)]["noise"])
    assert torch.equal(data[1]["noise"], data[(0, 1)]["noise"])

    assert first["x_start"].shape == (3, 16, 16) and first["noise"].shape == (3, 16, 16)
    assert first["t"].dtype == torch.long and 0 <= first["t"].item() < 1000
    assert torch.equal(first["inpaint_image"], first["x_start"] * first["inpaint_mask"])
    assert torch.equal(first["low_res"], low_res_of(first["x_start"]))
    assert torch.equal(first["x_start"], image_to_tensor(shape_images()[1][0]))


def test_captions_become_padded_tokens_or_the_empty_sequence():
    encoder = ByteEncoder()
    kept = examples(shape_images(), uncond_prob=0.0)[0]
    assert kept["tokens"].tolist() == list(b"a red square") + [256] * 4
    assert kept["mask"].tolist() == [True] * 12 + [False] * 4
    dropped = examples(shape_images(), uncond_prob=1.0)[0]
    assert dropped["tokens"].tolist() == [encoder.end_token] * 16
    assert not dropped["mask"].any()


def test_caption_drop_rate_follows_uncond_prob():
    data = examples([shape_images()[0]] * 400, uncond_prob=0.2)
    dropped = sum(not data[i]["mask"].any() for i in range(400))
    assert 50 <= dropped <= 110  # 80 expected; binomial sd 8


def test_bpe_caption_encoder_uses_the_model_tokenizer():
    encoder = get_encoder()
    encoded = UNetCaptionEncoder(encoder, 8)("an oil painting")
    tokens, mask = encoder.padded_tokens_and_mask(encoder.encode("an oil painting"), 8)
    assert encoded["tokens"].tolist() == tokens and encoded["mask"].tolist() == mask


def test_clip_caption_encoder_matches_encode_prompts():
    clip = build_task("clip", overrides=TINY_CLIP_OPTIONS).model
    tokens, lens = clip.encode_prompts(["a red square", ""])
    encode = CLIPCaptionEncoder(clip.tokenizer, clip.text_encoder.max_text_len)
    for i, caption in enumerate(["a red square", ""]):
        encoded = encode(caption)
        assert torch.equal(encoded["tokens"], tokens[i]) and encoded["lens"].item() == lens[i].item()


def global_batches(sampler_per_rank, batches):
    """The global batches (as sets of (epoch, index)) the ranks' local batches add up to."""
    per_rank = [list(iter(s)) for s in sampler_per_rank]
    local = sampler_per_rank[0].local_batch_size
    return [set().union(*(set(keys[k * local : (k + 1) * local]) for keys in per_rank)) for k in range(batches)]


def test_global_batches_do_not_depend_on_the_number_of_processes():
    data = examples(shape_images() * 3)  # 12 examples
    single = ExampleSampler(data, batch_size=4, seed=5)
    assert single.batches_per_epoch == 3 and single.local_batch_size == 4
    for world in (2, 4):
        ranks = [ExampleSampler(data, batch_size=4, num_replicas=world, rank=r, seed=5) for r in range(world)]
        for epoch in (0, 1):
            single.set_position(epoch, 0)
            for sampler in ranks:
                sampler.set_position(epoch, 0)
            assert global_batches(ranks, 3) == global_batches([single], 3)
    single.set_position(0, 0)
    epoch0 = [index for _, index in single]
    single.set_position(1, 0)
    epoch1 = [index for _, index in single]
    assert sorted(epoch0) == list(range(12)) and sorted(epoch1) == list(range(12)) and epoch0 != epoch1


def test_sampler_starts_mid_epoch_and_drops_the_partial_batch():
    data = examples(shape_images() * 2 + shape_images()[:2])  # 10 examples
    sampler = ExampleSampler(data, batch_size=4, seed=0)
    assert sampler.batches_per_epoch == 2
    sampler.set_position(3, 0)
    whole = list(sampler)
    assert len(whole) == 8 and all(epoch == 3 for epoch, _ in whole)
    sampler.set_position(3, 1)
    assert list(sampler) == whole[4:] and len(sampler) == 4
    with pytest.raises(ValueError, match="outside the epoch"):
        sampler.set_position(0, 2)
    with pytest.raises(ValueError, match="not divisible"):
        ExampleSampler(data, batch_size=4, num_replicas=3)
    with pytest.raises(ValueError, match="larger than"):
        ExampleSampler(data, batch_size=12)


def test_examples_reject_bad_items():
    with pytest.raises(TypeError, match="PIL image, caption"):
        examples([("not an image", "caption")])[0]
    with pytest.raises(ValueError, match="uncond_prob"):
        examples(shape_images(), uncond_prob=1.5)
    with pytest.raises(ValueError, match="empty"):
        examples([])
