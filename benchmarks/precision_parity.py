"""bf16 versus fp32: does reduced precision in the convolutions change the result, and is it faster here?

For each image pair, nstlab's default setting (ResNet-18 unless ``--extractor``, L-BFGS, content init,
content + style + TV) runs ``--iterations`` evaluations twice from the same start: in fp32, and with the
feature extractor under ``torch.autocast("cpu", dtype=torch.bfloat16)`` in channels_last memory format.
Only the extractor's forward (and so its backward) is autocast: the Gram matrices and the losses stay fp32
(``losses.gram_matrix`` and ``losses.content_loss`` upcast their inputs and run outside the autocast region
-- inside it, autocast would turn the Gram's ``bmm`` into bf16 too). If ``StylizeConfig`` has a ``precision``
field (the engine's own option) that is used for the runs instead of the wrapper, and the speed table gets
an ``engine_bf16`` row.

Reported per pair: the final loss of both images scored by the same fp32 objective and its ratio
(bf16 / fp32), the PSNR between the two final images, and the wall time of both runs. A third run, fp32
in channels_last (same precision, other kernels, so other rounding), gives the noise floor: how far apart
two fp32 results already are, because L-BFGS amplifies any rounding difference over the run. Then, on the
first pair, seconds per evaluation of fp32 / fp32 channels_last / bf16 / bf16 channels_last (and the
engine's own bf16), timed alternately. Random weights (no pretrained weights here): Kaiming-initialised
convolutions keep activations at a realistic scale, but the numbers say how much bf16 perturbs *this*
objective, not a pretrained one.

    .venv/bin/python benchmarks/precision_parity.py                    # all pairs, 256 px, 300 evaluations
    .venv/bin/python benchmarks/precision_parity.py --pairs pair-1 --iterations 100 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import warnings
from typing import Any, cast

import _common as C
import torch
from bench_eval import NstlabEval
from torch import Tensor, nn

from nstlab.config import StylizeConfig
from nstlab.engine import EngineResult, Objective, optimize
from nstlab.errors import ConfigError
from nstlab.features import FeatureExtractor, build_extractor, get_spec
from nstlab.metrics import psnr

warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")

# Pass criteria for "auto may pick bf16": the result must be the same to within these, and it must pay.
# The defaults are the criterion stated in benchmarks/README.md (which the engine's resolve_precision cites);
# the command-line options override them.
MAX_LOSS_DEVIATION = 0.02  # |final loss ratio - 1|, on every pair
MIN_PSNR_DB = 35.0  # PSNR of the bf16 result against the fp32 result, on every pair
MAX_SPEED_RATIO = 1.0  # bf16 seconds / fp32 seconds per evaluation: bf16 must be faster


class Autocast(nn.Module):
    """An nstlab extractor whose forward runs under CPU autocast (optionally in channels_last)."""

    def __init__(self, inner: FeatureExtractor, dtype: torch.dtype | None, channels_last: bool) -> None:
        super().__init__()
        self.dtype = dtype
        self.channels_last = channels_last
        if channels_last:
            # .eval() again: deepcopy of the extractor's fx GraphModule puts its submodules (BatchNorm)
            # back into training mode (torch 2.14).
            inner = copy.deepcopy(inner).to(memory_format=torch.channels_last).eval()
        self.inner = inner

    def forward(self, x: Tensor, **kwargs: Any) -> dict[str, Tensor]:
        # kwargs: what the engine passes an extractor (checkpoint_segments, on_feature, keep).
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is None:
            out: dict[str, Tensor] = self.inner(x, **kwargs)
            return out
        with torch.autocast("cpu", dtype=self.dtype):
            out = self.inner(x, **kwargs)
        return out


def _has_precision_field() -> bool:
    return "precision" in {f.name for f in dataclasses.fields(StylizeConfig)}


def with_precision(cfg: StylizeConfig, *values: str) -> StylizeConfig | None:
    """``cfg`` with the engine's own precision set to the first of ``values`` it accepts; None where
    ``StylizeConfig`` has no precision field (then this script applies autocast itself)."""
    if not _has_precision_field():
        return None
    for value in values:
        try:
            return cfg.replace(precision=value)
        except ConfigError:
            continue
    return None


def image_loss(objective: Objective, img: Tensor) -> float:
    with torch.no_grad():
        terms = objective.terms(img.clamp(0, 1))
        return float(sum(v for k, v in terms.items() if k != "range"))


def run(
    which: str, extractor: FeatureExtractor, content: Tensor, style: Tensor, cfg: StylizeConfig
) -> tuple[EngineResult, str]:
    if which == "fp32":
        # Pinned: "auto" may one day resolve to bf16.
        return optimize(extractor, content, style, with_precision(cfg, "fp32") or cfg), "fp32"
    if which == "fp32_cl":  # the noise floor: still fp32, only other kernels (other rounding)
        wrapped = cast(FeatureExtractor, Autocast(extractor, None, channels_last=True))
        return optimize(wrapped, content, style, with_precision(cfg, "fp32") or cfg), "fp32 channels_last"
    engine_cfg = with_precision(cfg, "bf16", "bfloat16")
    if engine_cfg is not None:
        label = f"the engine's precision={engine_cfg.to_dict()['precision']} (autocast, NCHW)"
        return optimize(extractor, content, style, engine_cfg), label
    wrapped = cast(FeatureExtractor, Autocast(extractor, torch.bfloat16, channels_last=True))
    return optimize(wrapped, content, style, cfg), "autocast wrapper (bf16, channels_last)"


def speed(
    extractor: FeatureExtractor, content: Tensor, style: Tensor, cfg: StylizeConfig, repeats: int
) -> dict[str, Any]:
    variants = {
        "fp32": Autocast(extractor, None, channels_last=False),
        "fp32_cl": Autocast(extractor, None, channels_last=True),
        "bf16": Autocast(extractor, torch.bfloat16, channels_last=False),
        "bf16_cl": Autocast(extractor, torch.bfloat16, channels_last=True),
    }
    fp32_cfg = with_precision(cfg, "fp32") or cfg
    fns = {k: NstlabEval(m, content, style, fp32_cfg) for k, m in variants.items()}
    engine_cfg = with_precision(cfg, "bf16", "bfloat16")
    if engine_cfg is not None:  # the engine's own bf16 path (autocast inside Objective, NCHW)
        fns["engine_bf16"] = NstlabEval(extractor, content, style, engine_cfg)
    for f in fns.values():
        f()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            times[k].append(C.timed(fns[k]))
    out: dict[str, Any] = {k: {"s_per_eval": C.median(v), "samples": v} for k, v in times.items()}
    for k in names[1:]:
        out[k]["ratio_to_fp32"] = C.median([a / b for a, b in zip(times[k], times["fp32"], strict=True)])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extractor", default="resnet18")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--pairs", default="", help="comma-separated (default: every pair in pairs.csv)")
    p.add_argument("--repeats", type=int, default=5, help="timed evaluations per variant for the speed table")
    p.add_argument("--data", default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-floor", action="store_true", help="skip the fp32 channels_last noise-floor run")
    p.add_argument("--max-loss-deviation", type=float, default=MAX_LOSS_DEVIATION)
    p.add_argument("--min-psnr", type=float, default=MIN_PSNR_DB)
    p.add_argument("--max-speed-ratio", type=float, default=MAX_SPEED_RATIO)
    p.add_argument(
        "--floor-margin",
        type=float,
        default=None,
        help="relax the PSNR bar to (fp32 noise floor - this many dB) where that is lower",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    data = C.shared_data(args.data)
    pairs = [x for x in args.pairs.split(",") if x] or C.pair_names(data)
    info = C.start("precision_parity", args.threads)
    cfg = StylizeConfig(
        extractor=args.extractor, weights="random", size=args.size, device="cpu", iterations=args.iterations
    )
    resolved = cfg.resolved()
    assert resolved.content_layers is not None and resolved.style_layers is not None
    layers = tuple(dict.fromkeys(resolved.content_layers + resolved.style_layers))
    extractor = build_extractor(get_spec(args.extractor), layers, "random")

    rows: list[dict[str, Any]] = []
    for i, pair in enumerate(pairs):
        content, style = C.load_pair(data, pair, args.size)
        results: dict[str, EngineResult] = {}
        how = ""
        order = ["fp32", "bf16"] + ([] if args.no_floor else ["fp32_cl"])
        for which in order if i % 2 == 0 else order[::-1]:
            results[which], label = run(which, extractor, content, style, cfg)
            how = label if which == "bf16" else how
        objective = Objective(extractor, content, style, cfg)
        l32 = image_loss(objective, results["fp32"].image)
        l16 = image_loss(objective, results["bf16"].image)
        row = {
            "pair": pair,
            "image_hw": list(content.shape[-2:]),
            "fp32_loss": l32,
            "bf16_loss": l16,
            "loss_ratio": l16 / l32,
            "psnr_db": psnr(results["bf16"].image, results["fp32"].image),
            "fp32_run_s": results["fp32"].wall_time_s,
            "bf16_run_s": results["bf16"].wall_time_s,
            "bf16_how": how,
            "start_loss": image_loss(objective, content),
        }
        if "fp32_cl" in results:
            row["floor_loss_ratio"] = image_loss(objective, results["fp32_cl"].image) / l32
            row["floor_psnr_db"] = psnr(results["fp32_cl"].image, results["fp32"].image)
        rows.append(row)
        print(
            f"# {pair}: fp32 {l32:.5g}, bf16 {l16:.5g} (ratio {row['loss_ratio']:.4f}), "
            f"PSNR {row['psnr_db']:.1f} dB, runs {row['fp32_run_s']:.0f} s / {row['bf16_run_s']:.0f} s; "
            f"fp32 noise floor: PSNR {row.get('floor_psnr_db', float('nan')):.1f} dB, "
            f"loss ratio {row.get('floor_loss_ratio', float('nan')):.4f}",
            flush=True,
        )

    content, style = C.load_pair(data, pairs[0], args.size)
    t0 = time.perf_counter()
    sp = speed(extractor, content, style, cfg, args.repeats)
    print(f"# speed table: {time.perf_counter() - t0:.0f} s", flush=True)

    print(
        f"\nQuality after {args.iterations} evaluations ({args.extractor}, bf16 via {rows[0]['bf16_how']})\n"
    )
    print(
        "| pair | image H×W | start loss | fp32 final loss | bf16 final loss | bf16/fp32 | PSNR bf16 vs fp32 "
        "| fp32 run s | bf16 run s | floor: fp32-CL/fp32 loss | floor: PSNR fp32-CL vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['pair']} | {'×'.join(map(str, r['image_hw']))} | {r['start_loss']:.4g} "
            f"| {r['fp32_loss']:.4g} "
            f"| {r['bf16_loss']:.4g} | {r['loss_ratio']:.4f} | {r['psnr_db']:.1f} dB | {r['fp32_run_s']:.1f} "
            f"| {r['bf16_run_s']:.1f} | {r.get('floor_loss_ratio', float('nan')):.4f} "
            f"| {r.get('floor_psnr_db', float('nan')):.1f} dB |"
        )
    print(
        f"\nSpeed ({pairs[0]}, median s/eval over {args.repeats} alternating repeats; "
        "ratio = paired median)\n"
    )
    print("| variant | s/eval | ratio to fp32 NCHW |")
    print("|---|---|---|")
    for k, v in sp.items():
        print(f"| {k} | {v['s_per_eval']:.3f} | {v.get('ratio_to_fp32', 1.0):.2f} |")

    worst_loss = max(abs(r["loss_ratio"] - 1) for r in rows)

    # PSNR: L-BFGS amplifies rounding differences, so any change of kernels moves the result. With
    # --floor-margin M the PSNR rule becomes: >= min(--min-psnr, that pair's fp32 noise floor - M).
    def psnr_needed(r: dict[str, Any]) -> float:
        if args.floor_margin is None or "floor_psnr_db" not in r:
            return float(args.min_psnr)
        return min(float(args.min_psnr), float(r["floor_psnr_db"]) - float(args.floor_margin))

    psnr_ok = all(r["psnr_db"] >= psnr_needed(r) for r in rows)
    floors = [r["floor_psnr_db"] for r in rows if "floor_psnr_db" in r]
    if floors and min(floors) < args.min_psnr:
        print(
            f"\nNote: fp32 with other kernels is itself only {min(floors):.1f}-{max(floors):.1f} dB from "
            f"fp32 (the noise floor), below the {args.min_psnr:g} dB PSNR bar; see --floor-margin."
        )
    # What precision=auto would run: the engine's bf16 path where it exists, else the wrapper's best.
    bf16_key = "engine_bf16" if "engine_bf16" in sp else "bf16_cl"
    speed_ratio = sp[bf16_key]["ratio_to_fp32"]
    checks = {
        f"final loss within {args.max_loss_deviation:.0%} on every pair": (
            worst_loss <= args.max_loss_deviation
        ),
        (
            f"PSNR >= {args.min_psnr:g} dB on every pair"
            if args.floor_margin is None
            else f"PSNR >= min({args.min_psnr:g} dB, noise floor - {args.floor_margin:g} dB) on every pair"
        ): psnr_ok,
        f"{bf16_key} below {args.max_speed_ratio:g} x fp32's time per evaluation": (
            speed_ratio < args.max_speed_ratio
        ),
    }
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in info["speed_flags_present"]]
    print(f"\nCPU bf16 support: {', '.join(native) if native else 'none native (no avx512_bf16 / amx_bf16)'}")
    for name, ok in checks.items():
        print(f"- {name}: {'yes' if ok else 'NO'}")
    verdict = all(checks.values())
    print(f"Verdict: precision=auto {'MAY' if verdict else 'should NOT'} pick bf16 on this machine.")
    C.write_json(
        args.json, {"machine": info, "args": vars(args), "rows": rows, "speed": sp, "checks": checks}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
