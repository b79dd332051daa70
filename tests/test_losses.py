"""Each loss against a computation done by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from nstlab import losses


def test_gram_matrix_by_hand() -> None:
    # C=2 channels, H=1, W=2: F = [[1, 2], [3, 4]]; F F^T = [[5, 11], [11, 25]]; / (C*H*W = 4)
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    g = losses.gram_matrix(f)
    assert g.shape == (1, 2, 2)
    assert torch.allclose(g, torch.tensor([[[5 / 4, 11 / 4], [11 / 4, 25 / 4]]]))


def test_gram_is_size_normalised() -> None:
    # Tiling a feature map spatially leaves the normalised Gram unchanged.
    f = torch.randn(1, 3, 4, 5)
    assert torch.allclose(losses.gram_matrix(f), losses.gram_matrix(f.repeat(1, 1, 2, 3)), atol=1e-6)


def test_gram_is_float32_for_half_inputs() -> None:
    assert losses.gram_matrix(torch.ones(1, 2, 2, 2, dtype=torch.bfloat16)).dtype == torch.float32


def test_content_loss_by_hand() -> None:
    a = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    b = torch.tensor([1.0, 0.0, 3.0, 0.0]).view(1, 1, 2, 2)
    # squared differences 0, 4, 0, 16 -> mean 5
    assert losses.content_loss(a, b).item() == pytest.approx(5.0)


def test_style_loss_by_hand() -> None:
    g1 = {"a": torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), "b": torch.tensor([[[2.0]]])}
    t = {"a": torch.tensor([[[0.0, 0.0], [0.0, 0.0]]]), "b": torch.tensor([[[0.0]]])}
    # layer a: mean(1, 0, 0, 1) = 0.5, weight 2 -> 1.0; layer b: (2 - 0)^2 = 4, weight 0.5 -> 2.0
    assert losses.style_loss(g1, t, {"a": 2.0, "b": 0.5}).item() == pytest.approx(3.0)
    # Layers not in the weights are ignored.
    assert losses.style_loss(g1, t, {"b": 1.0}).item() == pytest.approx(4.0)


def test_tv_loss_by_hand() -> None:
    # 1 channel 2x3 image [[0, 1, 3], [2, 2, 2]]
    # vertical diffs: 2, 1, -1 -> squares 4, 1, 1 -> mean 2
    # horizontal diffs: 1, 2, 0, 0 -> squares 1, 4, 0, 0 -> mean 1.25
    x = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]).view(1, 1, 2, 3)
    assert losses.tv_loss(x).item() == pytest.approx(3.25)
    assert losses.tv_loss(torch.full((1, 3, 5, 5), 0.3)).item() == 0.0


def test_range_penalty_by_hand() -> None:
    p = torch.tensor([-0.5, 0.2, 1.0, 1.5])
    # outside by 0.5, 0, 0, 0.5 -> squares 0.25, 0, 0, 0.25 -> mean 0.125
    assert losses.range_penalty(p).item() == pytest.approx(0.125)
    assert losses.range_penalty(torch.rand(10)).item() == 0.0


def test_losses_are_differentiable() -> None:
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    total = losses.tv_loss(x) + losses.content_loss(x, torch.zeros_like(x)) + losses.range_penalty(x * 3)
    total.backward()
    assert x.grad is not None and math.isfinite(float(x.grad.abs().sum()))


def test_gram_equals_autograd_reference_in_value_and_gradient() -> None:
    # gram_matrix's hand-written backward (one product) against autograd's backward of the same formula.
    feats = torch.randn(2, 5, 7, 6)
    weights = torch.randn(2, 5, 5)
    out = []
    for fn in (losses.gram_matrix_reference, losses.gram_matrix):
        x = feats.clone().requires_grad_(True)
        g = fn(x)
        (g * weights).sum().backward()
        out.append((g.detach(), x.grad))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-6, atol=1e-6)  # float32 rounding only
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-6)
