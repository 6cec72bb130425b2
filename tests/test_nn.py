"""Timestep embedding, norms and the two attention forms."""

import math

import pytest
import torch

from glide_text2im.nn import GroupNorm32, attention, timestep_embedding


def test_timestep_embedding_puts_cosines_first():
    t = torch.tensor([0.0, 917.5])
    emb = timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000) * i / 4) for i in range(4)]
    expected = [[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in (0.0, 917.5)]
    torch.testing.assert_close(emb, torch.tensor(expected), atol=1e-4, rtol=1e-5)


def test_timestep_embedding_pads_odd_width():
    emb = timestep_embedding(torch.tensor([3]), 5)
    assert emb.shape == (1, 5) and emb[0, -1] == 0


@pytest.mark.parametrize("causal", [False, True])
def test_fast_attention_equals_reference(causal):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 7, 16), torch.randn(3, 2, 7, 16), torch.randn(3, 2, 7, 16)
    fast = attention(q, k, v, fast=True, causal=causal)
    reference = attention(q, k, v, fast=False, causal=causal)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    if causal:
        torch.testing.assert_close(fast[:, :, 0], v[:, :, 0])


def test_group_norm_computes_in_float32_and_keeps_dtype():
    norm = GroupNorm32(32, 64, swish=1.0)
    x = (torch.randn(2, 64, 4, 4) * 100).half()
    y = norm(x)
    assert y.dtype == torch.float16
    expected = torch.nn.functional.silu(torch.nn.functional.group_norm(x.float(), 32, eps=1e-5))
    torch.testing.assert_close(y.float(), expected, atol=2e-3, rtol=2e-3)
