"""Every convolution of an nstlab evaluation alone: how close to the matmul peak can its shapes run?

``bench_eval.py`` measures the achieved share of the fp32 ``torch.mm`` peak for a whole evaluation. This
script asks what that share *could* be. It records the convolutions nstlab's extractor runs at a size
(input, weight, stride, padding, via forward hooks), then times each distinct one alone, alternating:

* ``fwd``: ``F.conv2d`` (oneDNN, what the forward pass runs),
* ``dgrad``: its input gradient as nstlab's backward pass computes it for frozen weights
  (``aten.convolution_backward`` with only the input gradient requested; for ResNet's stem nstlab's
  sub-pixel form, ``features/subpixel.py``, marked ``sub-pixel``),
* ``gemm``: ``torch.mm`` of the matrix product an im2col convolution would be (out_c x in_c*k*k times
  in_c*k*k x H_out*W_out): what MKL's GEMM reaches on the same problem size, without the im2col copy,

each as GFLOP/s and as a share of ``torch.mm``'s throughput on 2048 x 2048 matrices measured in the same run
(90th percentile of samples taken before, between and after). Totals weight every layer by its calls per
evaluation. No pair is needed (random inputs of the recorded shapes), so it runs on a plain clone.

    .venv/bin/python benchmarks/conv_shapes.py --threads 1 --extractors vgg19,resnet18 --sizes 256,512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import _common as C
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nstlab.config import StylizeConfig
from nstlab.features import build_extractor, get_spec
from nstlab.features.subpixel import SubPixelGradConv2d, subpixel_input_grad

# input shape, weight shape, stride, padding, and whether nstlab computes its input gradient in sub-pixel form
Conv = tuple[tuple[int, ...], tuple[int, ...], int, int, bool]


def record_convs(name: str, size: int) -> dict[Conv, int]:
    """The convolutions one forward pass of nstlab's extractor runs on a 3 x (3/4 size) x size image."""
    cfg = StylizeConfig(extractor=name, weights="random", size=size, device="cpu").resolved()
    assert cfg.content_layers is not None and cfg.style_layers is not None
    layers = tuple(dict.fromkeys(cfg.content_layers + cfg.style_layers))
    extractor = build_extractor(get_spec(name), layers, "random")
    seen: dict[Conv, int] = {}

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        assert isinstance(module, nn.Conv2d)
        stride, padding = module.stride[0], module.padding
        assert isinstance(padding, tuple)
        subpixel = isinstance(module, SubPixelGradConv2d)
        key = (tuple(args[0].shape), tuple(module.weight.shape), stride, padding[0], subpixel)
        seen[key] = seen.get(key, 0) + 1

    handles = [m.register_forward_pre_hook(hook) for m in extractor.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        extractor(torch.rand(1, 3, size * 3 // 4, size))  # pair-1's aspect (192 x 256 at "256")
    for h in handles:
        h.remove()
    return seen


def conv_flops(conv: Conv) -> float:
    (n, _, h, w), (o, i, k, _), s, p, _ = conv
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    return 2.0 * n * o * i * k * k * ho * wo


def kernels(conv: Conv) -> dict[str, Callable[[], object]]:
    shape, wshape, s, p, subpixel = conv
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    weight = torch.randn(wshape, generator=gen) * 0.05
    y = F.conv2d(x, weight, stride=s, padding=p)
    g = torch.randn(y.shape, generator=gen)
    o, i, k, _ = wshape
    a = torch.randn(o, i * k * k, generator=gen)
    b = torch.randn(i * k * k, y.shape[-2] * y.shape[-1], generator=gen)

    def dgrad() -> object:
        if subpixel:  # what nstlab runs for ResNet's stem
            return subpixel_input_grad(g, weight, (shape[-2], shape[-1]), s, p)
        return torch.ops.aten.convolution_backward(
            g, x, weight, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, [True, False, False]
        )

    return {
        "fwd": lambda: F.conv2d(x, weight, stride=s, padding=p),
        "dgrad": dgrad,
        "gemm": lambda: torch.mm(a, b),
    }


def time_conv(conv: Conv, repeats: int) -> dict[str, float]:
    """Median seconds per call of each kernel, the kernels alternating within every round."""
    fns = kernels(conv)
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for key in order:
            t0 = time.perf_counter()
            fns[key]()
            samples[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extractors", default="vgg19,resnet18")
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write all numbers to this file")
    args = p.parse_args(argv)
    info = C.start("conv_shapes", args.threads)
    peak_samples = C.matmul_gflops()
    rows: list[dict[str, Any]] = []
    totals: list[dict[str, Any]] = []
    for name in args.extractors.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            convs = record_convs(name, size)
            seconds = {"fwd": 0.0, "dgrad": 0.0, "gemm": 0.0}
            flops = 0.0
            for conv, calls in convs.items():
                t = time_conv(conv, args.repeats)
                peak_samples += C.matmul_gflops(repeats=2)
                f = conv_flops(conv)
                flops += f * calls
                for key in seconds:
                    seconds[key] += t[key] * calls
                rows.append(
                    {"extractor": name, "size": size, "input": conv[0], "weight": conv[1], "stride": conv[2]}
                    | {"subpixel": conv[4]}
                    | {"calls": calls, "gflop": f / 1e9}
                    | {f"{k}_gflops": f / t[k] / 1e9 for k in t}
                )
            totals.append(
                {"extractor": name, "size": size, "gflop": flops / 1e9}
                | {f"{k}_gflops": flops / s / 1e9 for k, s in seconds.items()}
            )
    peak = sorted(peak_samples)[int(0.9 * (len(peak_samples) - 1))]
    print(f"\nfp32 torch.mm 2048x2048: p90 {peak:.1f} GFLOP/s over {len(peak_samples)} samples\n")
    header = (
        "| extractor | size | input | weight | stride | calls | GFLOP | fwd | dgrad | gemm (same product) |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        shares = " | ".join(
            f"{r[k + '_gflops']:.0f} ({r[k + '_gflops'] / peak:.0%})" for k in ("fwd", "dgrad", "gemm")
        )
        print(
            f"| {r['extractor']} | {r['size']} | {'x'.join(map(str, r['input'][1:]))} | "
            f"{'x'.join(map(str, r['weight']))}{' sub-pixel' if r['subpixel'] else ''} | {r['stride']} | "
            f"{r['calls']} | {r['gflop']:.2f} | {shares} |"
        )
    print("\nWhole network (every convolution x its calls), GFLOP/s and share of the peak:\n")
    print("| extractor | size | GFLOP (fwd) | fwd | dgrad | gemm (same products) |")
    print("|---|---|---|---|---|---|")
    for t in totals:
        shares = " | ".join(
            f"{t[k + '_gflops']:.0f} ({t[k + '_gflops'] / peak:.0%})" for k in ("fwd", "dgrad", "gemm")
        )
        print(f"| {t['extractor']} | {t['size']} | {t['gflop']:.1f} | {shares} |")
    C.write_json(
        args.json,
        {"machine": info, "mm_gflops_samples": peak_samples, "mm_gflops_p90": peak}
        | {"rows": rows, "totals": totals},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
