"""The three loss terms of Gatys-style transfer, as pure functions of tensors.

Conventions (chosen to match the PyTorch neural-style tutorial, whose scale the report's
lambda_content = 1, lambda_style = 1e6 were tuned for):

* content:  L_c = sum over content layers l of mean((F_l(x) - F_l(c))^2)      (Gatys et al. Eq. 1, as MSE)
* Gram:     G_l = F_l F_l^T / (C_l * H_l * W_l), F_l reshaped to (C_l, H_l * W_l)   (size-normalised)
* style:    L_s = sum over style layers l of w_l * mean((G_l(x) - G_l(s))^2)          (Gatys et al. Eq. 4-5,
            rescaled: Gatys divide sum((G - A)^2) of unnormalised Grams by 4 C^2 M^2; this is 4 / C_l^2 times
            that per layer, so wider layers weigh less: the tutorial's scale, which lambda_s = 1e6 assumes)
* TV:       L_tv = mean((x[i+1, j] - x[i, j])^2) + mean((x[i, j+1] - x[i, j])^2)      (squared, smooth)

Normalising the Gram by C*H*W makes the style loss independent of the image size, so one lambda_style
serves 256 px and 1024 px alike. Squared (not absolute) TV keeps the objective smooth, which L-BFGS needs.
Gram matrices and losses are always computed in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


class _Gram(torch.autograd.Function):
    """F F^T / norm whose backward is one product: d/dF sum(g * F F^T) = (g + g^T) F.

    Autograd's own backward of ``bmm(f, f^T)`` makes two feature-sized products (g F and g^T F) and adds
    them: three tensors the size of F and a full pass more over memory. The single product measured 2.6x
    faster for ResNet-18's stem Gram at 512 px and needs one feature-sized tensor (which activation
    checkpointing at 4096 px relies on); see ``benchmarks/README.md``."""

    @staticmethod
    def forward(ctx: Any, f: Tensor, norm: float) -> Tensor:
        ctx.save_for_backward(f)
        ctx.norm = norm
        return torch.bmm(f, f.transpose(1, 2)) / norm

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (f,) = ctx.saved_tensors
        # Divide the C x C factor, not the C x HW product: one pass less over a feature-sized tensor
        # (1.5 % of a VGG-19 evaluation at 256 px went into that division).
        return torch.bmm((grad + grad.transpose(1, 2)) / ctx.norm, f), None


def gram_matrix(features: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, C), normalised by C * H * W; fp32 whatever the features' dtype."""
    n, c, h, w = features.shape
    f = features.float().reshape(n, c, h * w)
    out: Tensor = _Gram.apply(f, float(c * h * w))
    return out


def gram_matrix_reference(features: Tensor) -> Tensor:
    """The same Gram with autograd's own backward: the reference :func:`gram_matrix` is tested against."""
    n, c, h, w = features.shape
    f = features.float().reshape(n, c, h * w)
    return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


def content_loss(features: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between feature maps."""
    return torch.mean((features.float() - target.float()) ** 2)


def style_loss(
    grams: Mapping[str, Tensor], targets: Mapping[str, Tensor], weights: Mapping[str, float]
) -> Tensor:
    """Weighted sum over layers of the mean squared error between Gram matrices."""
    total = torch.zeros((), device=next(iter(grams.values())).device)
    for layer, weight in weights.items():
        total = total + weight * torch.mean((grams[layer] - targets[layer]) ** 2)
    return total


def tv_loss(image: Tensor) -> Tensor:
    """Squared total variation: mean squared difference between vertical and horizontal neighbours."""
    dy = image[..., 1:, :] - image[..., :-1, :]
    dx = image[..., :, 1:] - image[..., :, :-1]
    return torch.mean(dy.float() ** 2) + torch.mean(dx.float() ** 2)


def range_penalty(param: Tensor) -> Tensor:
    """Squared distance of the optimised parameter from the valid pixel box [0, 1] (0 inside it)."""
    return torch.mean((param - param.clamp(0.0, 1.0)) ** 2)
