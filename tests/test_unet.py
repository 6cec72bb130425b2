"""The non-text U-Nets and their input stacking."""

import pytest
import torch

from glide_text2im.unet import InpaintUNetModel, SuperResInpaintUNetModel, SuperResUNetModel, UNetModel

TINY = dict(in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(2,),
            channel_mult=(1, 2), num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


@pytest.mark.parametrize(
    "cls, in_channels", [(UNetModel, 3), (SuperResUNetModel, 6), (InpaintUNetModel, 7), (SuperResInpaintUNetModel, 10)]
)
def test_variants_stack_their_inputs(cls, in_channels):
    model = cls(**TINY)
    assert model.input_blocks[0][0].in_channels == in_channels
    assert model.in_channels == in_channels


def test_super_res_equals_base_on_stacked_input():
    torch.manual_seed(0)
    plain = randomized(UNetModel(**dict(TINY, in_channels=6)))
    super_res = SuperResUNetModel(**TINY).eval()
    super_res.load_state_dict(plain.state_dict())
    x, low_res, t = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 4, 4), torch.tensor([3, 700])
    up = torch.nn.functional.interpolate(low_res, (16, 16), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(super_res(x, t, low_res=low_res), plain(torch.cat([x, up], 1), t))


def test_inpaint_equals_base_on_stacked_input():
    torch.manual_seed(0)
    plain = randomized(UNetModel(**dict(TINY, in_channels=7)))
    inpaint = InpaintUNetModel(**TINY).eval()
    inpaint.load_state_dict(plain.state_dict())
    x, image, t = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    mask = (torch.rand(2, 1, 16, 16) > 0.5).float()
    with torch.no_grad():
        got = inpaint(x, t, inpaint_image=image, inpaint_mask=mask)
        torch.testing.assert_close(got, plain(torch.cat([x, image * mask, mask], 1), t))


def test_fresh_model_outputs_zero_and_output_head_is_zero_initialised():
    model = UNetModel(**TINY).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 16), torch.tensor([10]))
    assert torch.count_nonzero(out) == 0


def test_without_resblock_updown_uses_strided_conv_and_conv_upsample():
    model = UNetModel(**dict(TINY, resblock_updown=False))
    assert "input_blocks.2.0.op.weight" in model.state_dict()
    assert any(k.endswith(".conv.weight") for k in model.state_dict())
    out = model(torch.randn(1, 3, 16, 16), torch.tensor([10]))
    assert out.shape == (1, 6, 16, 16)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    reference = randomized(UNetModel(**dict(TINY, dropout=0.0))).train()
    checkpointed = UNetModel(**dict(TINY, dropout=0.0, use_checkpoint=True)).train()
    checkpointed.load_state_dict(reference.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    for model in (reference, checkpointed):
        model(x, t).square().mean().backward()
    for p, q in zip(reference.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_norm_groups_sets_every_group_norm_and_the_default_is_glides_32():
    default = UNetModel(**TINY)
    narrow = UNetModel(**TINY, norm_groups=8)
    norms = lambda model: [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]  # noqa: E731
    assert {m.num_groups for m in norms(default)} == {32}
    assert {m.num_groups for m in norms(narrow)} == {8}
    assert len(norms(narrow)) == len(norms(default)) > 5
    # The same parameters: a checkpoint's layout does not depend on the group count.
    assert [(k, v.shape) for k, v in narrow.state_dict().items()] == [
        (k, v.shape) for k, v in default.state_dict().items()
    ]
    with pytest.raises(ValueError, match="12 normalization groups"):
        UNetModel(**TINY, norm_groups=12)

