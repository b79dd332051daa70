"""A faster input gradient for a convolution with few input channels: ResNet's 7x7/2 stem, VGG's first 3x3.

Style transfer differentiates with respect to the image, so every evaluation computes the stem's input
gradient: a transposed convolution from 64 channels down to 3, with stride 2. oneDNN runs that at a tenth
of its usual speed on CPU (3 output channels do not fill a vector register; ~12 % of a whole ResNet-18
evaluation at 512 px, measured in ``benchmarks/README.md``). The same numbers come out of an ordinary
stride-1 convolution with s*s*3 output channels followed by a pixel shuffle (the "sub-pixel" form of a
transposed convolution, Shi et al. 2016), which runs about 2.5x faster here.

Derivation. The forward pass is y[o, i] = sum_{c, k} w[o, c, k] x[c, s*i + k - p] (one spatial dimension
shown; the other is the same). Its input gradient at row s*m + a (phase a in [0, s)) collects the kernel
taps k = s*d + a + p for d = m - i:

    dx[c, s*m + a] = sum_o sum_d w[o, c, s*d + a + p] * g[o, m - d]

which, for each phase a, is a cross-correlation of g with the kernel taps of that phase (a tap index
outside [0, K) contributes zero). Stacking the s*s phases as output channels gives one convolution; the
pixel shuffle interleaves the phases back into rows s*m + a.

With stride 1 (VGG's first layer) there is one phase: the input gradient is the correlation of g with the
flipped, transposed kernel, still with 3 output channels; :func:`correlate_gemm` computes it as one matrix
product and K*K shifted adds instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def _taps(kernel: int, stride: int, padding: int) -> tuple[Tensor, int, int]:
    """(index, d_max, d_min): index[a, t] is the kernel tap that phase a reads at offset t of the phase
    kernel (``kernel`` where there is none: the zero row appended to the weight)."""
    d_max = (kernel - 1 - padding) // stride
    d_min = -((stride - 1 + padding) // stride)
    index = torch.full((stride, d_max - d_min + 1), kernel, dtype=torch.long)
    for a in range(stride):
        for t, d in enumerate(range(d_max, d_min - 1, -1)):  # correlation: offset t reads g[m + t - d_max]
            k = stride * d + a + padding
            if 0 <= k < kernel:
                index[a, t] = k
    return index, d_max, d_min


def subpixel_input_grad(
    grad_out: Tensor, weight: Tensor, input_hw: tuple[int, int], stride: int, padding: int
) -> Tensor:
    """The input gradient of ``F.conv2d(x, weight, stride=stride, padding=padding)`` (square kernel, stride
    and padding, groups 1, dilation 1) for output gradient ``grad_out``, computed as one stride-1
    convolution plus a pixel shuffle."""
    out_c, in_c, kernel, _ = weight.shape
    s = stride
    index, d_max, d_min = _taps(kernel, s, padding)
    index = index.to(weight.device)
    padded = F.pad(weight, (0, 1, 0, 1))  # tap index ``kernel`` reads this zero row / column
    # (O, C, s, s, T, T): phase (a, b), offsets (t, u)
    sub = padded[:, :, index[:, None, :, None], index[None, :, None, :]]
    taps = index.shape[1]
    sub = sub.permute(1, 2, 3, 0, 4, 5).reshape(in_c * s * s, out_c, taps, taps)
    height, width = input_hw
    hy, wy = grad_out.shape[-2:]
    # Phase row m reads g rows m - d_max .. m - d_min: zero padding of d_max above and enough below for
    # ceil(H / s) phase rows. The convolution's own (symmetric) padding is the larger of the two; the rows
    # it adds at the top are sliced off (cheaper than materialising an asymmetrically padded copy of g).
    bottom = math.ceil(height / s) - hy + taps - 1 - d_max
    right = math.ceil(width / s) - wy + taps - 1 - d_max
    pad_h, pad_w = max(d_max, bottom, 0), max(d_max, right, 0)
    if s == 1 and _gemm_bytes(grad_out, sub) <= GEMM_MAX_BYTES:
        phases = correlate_gemm(grad_out, sub, pad_h, pad_w)  # few output channels: see correlate_gemm
    else:
        phases = F.conv2d(grad_out, sub, padding=(pad_h, pad_w))
    top, left = pad_h - d_max, pad_w - d_max
    phases = phases[..., top : top + math.ceil(height / s), left : left + math.ceil(width / s)]
    return F.pixel_shuffle(phases, s)[..., :height, :width]


# correlate_gemm's intermediate (out_c * K * K values per pixel) above this falls back to F.conv2d. For VGG's
# first layer that is 27 fp32 values (108 bytes) a pixel of each image in the batch: ~0.42 GiB for one
# 2048 x 2048 image, so above about 1575 x 1575 pixels (in all) an unchunked evaluation falls back;
# checkpointed strips stay below.
GEMM_MAX_BYTES = 256 * 2**20


def _gemm_bytes(g: Tensor, weight: Tensor) -> int:
    out_c, _, kh, kw = weight.shape
    return g.shape[0] * out_c * kh * kw * g.shape[-2] * g.shape[-1] * g.element_size()


def correlate_gemm(g: Tensor, weight: Tensor, pad_h: int, pad_w: int) -> Tensor:
    """``F.conv2d(g, weight, padding=(pad_h, pad_w))`` (stride 1) as one matrix product and K*K shifted adds.

    For few output channels -- VGG's first layer's input gradient goes from 64 channels down to 3 -- oneDNN
    runs the convolution at 5-9 % of this CPU's matmul peak (3 outputs do not fill a vector register). Here
    t[(o, a, b), p] = sum_c weight[o, c, a, b] g[c, p] is one well-shaped product (out_c * K * K rows), and
    out[o, i, j] = sum_{a, b} t[o, a, b, i + a - pad_h, j + b - pad_w] (zero outside g) adds K*K shifted
    slices: 2.9-3.9x faster for that layer at 256-512 px (benchmarks/README.md). With many output channels
    (ResNet's sub-pixel stem: 12 x 16 taps) the shifted adds cost more than they save: not used there."""
    n, in_c, h, w = g.shape
    out_c, _, kh, kw = weight.shape
    out_h, out_w = h + 2 * pad_h - kh + 1, w + 2 * pad_w - kw + 1
    wt = weight.permute(0, 2, 3, 1).reshape(out_c * kh * kw, in_c)
    t = torch.matmul(wt, g.reshape(n, in_c, h * w)).reshape(n, out_c, kh, kw, h, w)
    out = g.new_zeros(n, out_c, out_h, out_w)
    for a in range(kh):
        for b in range(kw):
            # output rows i whose source row i + a - pad_h lies inside g (likewise columns)
            i0, i1 = max(0, pad_h - a), min(out_h, h + pad_h - a)
            j0, j1 = max(0, pad_w - b), min(out_w, w + pad_w - b)
            if i0 < i1 and j0 < j1:
                out[:, :, i0:i1, j0:j1] += t[
                    :, :, a, b, i0 + a - pad_h : i1 + a - pad_h, j0 + b - pad_w : j1 + b - pad_w
                ]
    return out


class _SubPixelGradConv(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int
    ) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.conf = (tuple(x.shape[-2:]), stride, padding)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        (weight,) = ctx.saved_tensors
        input_hw, stride, padding = ctx.conf
        return (
            subpixel_input_grad(grad.contiguous(), weight, input_hw, stride, padding),
            None,
            None,
            None,
            None,
        )


class SubPixelGradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, same state-dict keys, same forward) whose input gradient is computed
    in the sub-pixel form. Used where it measured faster and is exactly the same computation: on CPU, in
    full precision, for a frozen convolution whose input needs a gradient; everywhere else (autocast,
    CUDA, torch.compile, trainable weights, ``subpixel_grad = False``) it is a plain ``nn.Conv2d``."""

    subpixel_grad: bool = True

    @staticmethod
    def applies_to(module: nn.Module) -> bool:
        """A convolution this replacement is written for: square stride, few input channels (stride 1:
        VGG's first layer, whose input gradient then takes :func:`correlate_gemm`)."""
        return (
            type(module) is nn.Conv2d
            and module.in_channels <= 4
            and module.groups == 1
            and module.padding_mode == "zeros"
            and module.dilation == (1, 1)
            and module.stride[0] == module.stride[1] >= 1
            and module.kernel_size[0] == module.kernel_size[1]
            and isinstance(module.padding, tuple)
            and module.padding[0] == module.padding[1]
        )

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> SubPixelGradConv2d:
        """A replacement sharing ``conv``'s parameter objects (no copy; works on the meta device too)."""
        assert cls.applies_to(conv) and isinstance(conv.padding, tuple)  # square: one number each
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            stride=conv.stride[0],
            padding=conv.padding[0],
            bias=conv.bias is not None,
            device="meta",
        )
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.subpixel_grad
            and x.requires_grad
            and torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and not self.weight.requires_grad
            and (self.bias is None or not self.bias.requires_grad)
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
        ):
            stride, padding = self.stride[0], self.padding
            assert isinstance(padding, tuple)
            out: Tensor = _SubPixelGradConv.apply(x, self.weight, self.bias, stride, padding[0])
            return out
        return super().forward(x)
