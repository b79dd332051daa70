"""Time to quality: how long nstlab's default setting takes to reach the loss the baseline ends with.

The baseline (``baseline.BaselineNST``, tutorial style: clamp in place, unfrozen weights) runs
``--iterations`` L-BFGS evaluations from the content image. Its final image is scored with nstlab's own
``Objective`` (the same extractor object, so the same -- random -- weights; content + style + TV,
lambda_c 1, lambda_s 1e6, nstlab's lambda_tv): that is the target. nstlab's default setting (ResNet-18
unless ``--extractor``, L-BFGS, content init, content + style + TV) then runs with the same budget
(continuing up to ``--max-iterations`` if the target is not reached within it), and the time and the number
of evaluations at which the loss of its current image first reaches the target are reported for both.
A second target is the best loss the baseline ever evaluated (its in-place clamp lets its loss go up and
down, so its final image need not be its best).

Which loss: the loss of the image an implementation would return at that point -- for nstlab the sum of
its content, style and TV terms at clamp(p) (its range penalty, which only steers p, is left out; it is 0
for the returned, clamped image); for the baseline the loss its closure computes on its in-place-clamped
image. Both are the same function (checked at start: "parity"). Times exclude set-up (building the
network, the targets) for both; the clocks start where the optimisation loops start.

With ``--coarse-to-fine`` a third contender runs: nstlab's ``coarse-to-fine`` preset (300 evaluations at
1/4 of the size, 200 at 1/2, through ``nstlab.api._coarse_to_fine`` exactly as ``stylize`` runs them), then
the full size from the upsampled result; its clock includes the coarse scales, and its loss is only
counted once it is at full size (the coarse images are not full-size candidates).

    .venv/bin/python benchmarks/time_to_quality.py                       # pair-1, 256 px, 1000 evaluations
    .venv/bin/python benchmarks/time_to_quality.py --size 256 --iterations 300 --repeats 2
    .venv/bin/python benchmarks/time_to_quality.py --coarse-to-fine --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import _common as C
import torch
from baseline import BaselineNST

from nstlab.config import PRESETS, StylizeConfig
from nstlab.engine import Objective, Progress, optimize
from nstlab.features import FeatureExtractor, build_extractor, get_spec

warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")


LEVELS = (2.0, 1.5, 1.2, 1.1, 1.05, 1.02, 1.0)


class _Stop(Exception):
    pass


def image_loss(objective: Objective, img: torch.Tensor) -> float:
    with torch.no_grad():
        terms = objective.terms(img.clamp(0, 1))
        return float(sum(v for k, v in terms.items() if k != "range"))


def _f(x: float | None, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def first_reach(trace: list[tuple[float, float]], target: float) -> tuple[int, float] | None:
    for i, (t, loss) in enumerate(trace):
        if loss <= target:
            return i + 1, t
    return None


def run_nstlab(
    extractor: FeatureExtractor,
    content: torch.Tensor,
    style: torch.Tensor,
    cfg: StylizeConfig,
    budget: int,
    target: float,
    init: torch.Tensor | None = None,
    offset_s: float = 0.0,
) -> list[tuple[float, float]]:
    """nstlab's trace [(seconds since the engine's start + ``offset_s``, image loss)], stopped once the
    budget is spent and the target reached (or at ``cfg.iterations``)."""
    trace: list[tuple[float, float]] = []

    def on_step(p: Progress) -> None:
        loss = sum(v for k, v in p.losses.items() if k not in ("range", "total"))
        trace.append((p.elapsed + offset_s, loss))
        if p.evaluation >= budget and min(x[1] for x in trace) <= target:
            raise _Stop

    try:
        optimize(extractor, content, style, cfg, on_step=on_step, init=init)
    except _Stop:
        pass
    return trace


def run_coarse_to_fine(
    extractor: FeatureExtractor,
    pair: tuple[Path, Path],
    content: torch.Tensor,
    style: torch.Tensor,
    cfg: StylizeConfig,
    budget: int,
    target: float,
) -> tuple[list[tuple[float, float]], float, int]:
    """The coarse-to-fine preset: (full-size trace with the coarse time included, coarse seconds, coarse
    evaluations)."""
    from nstlab import images
    from nstlab.api import _coarse_to_fine

    c2f = PRESETS["coarse-to-fine"]
    preset = cfg.replace(scales=c2f["scales"], scale_iterations=c2f["scale_iterations"])
    c_img = images.resize_long_side(images.load_image(pair[0]), cfg.size)
    s_img = images.resize_long_side(images.load_image(pair[1]), max(c_img.size))
    log: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    init = _coarse_to_fine(extractor, c_img, s_img, preset, torch.device("cpu"), log)
    coarse_s = time.perf_counter() - t0
    trace = run_nstlab(extractor, content, style, cfg, budget, target, init=init, offset_s=coarse_s)
    return trace, coarse_s, sum(int(x["evaluations"]) for x in log)


def _times(run: dict[str, Any], target: str) -> tuple[float, float | None, float | None, float | None]:
    """(target loss, baseline s, default s, coarse-to-fine s) to reach ``target`` in one run."""
    if target in ("final", "best"):
        d = run[target]
        return d["target_loss"], d["baseline_s"], d["nstlab_s"], d["c2f_s"]
    lv = run["levels"][target]
    hits = [lv[who][1] if lv[who] else None for who in ("baseline", "nstlab", "c2f")]
    return lv["loss"], hits[0], hits[1], hits[2]


def print_coarse_to_fine(runs: list[dict[str, Any]]) -> None:
    print(
        "\nCoarse-to-fine preset vs the default setting and the baseline: seconds to reach each loss (the "
        "preset's include its coarse scales); ratios are medians over runs\n"
    )
    print("| target | loss | baseline s | default s | coarse-to-fine s | c2f / baseline | c2f / default |")
    print("|---|---|---|---|---|---|---|")
    labels = {"final": "baseline's final image", "best": "baseline's best evaluation"}
    for target in ["final", "best", *runs[0]["levels"]]:
        loss, b, n, c = _times(runs[0], target)
        per_run = [_times(r, target) for r in runs]
        to_b = [x[3] / x[1] for x in per_run if x[1] and x[3] is not None]
        to_n = [x[3] / x[2] for x in per_run if x[2] and x[3] is not None]
        print(
            f"| {labels.get(target, f'{target} × L*')} | {loss:.5g} | {_f(b, 1)} | {_f(n, 1)} | {_f(c, 1)} "
            f"| {_f(C.median(to_b) if to_b else None, 2)} | {_f(C.median(to_n) if to_n else None, 2)} |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extractor", default="resnet18")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iterations", type=int, default=1000, help="the baseline's evaluations (and nstlab's)")
    p.add_argument("--max-iterations", type=int, default=0, help="nstlab's limit (default 3 x --iterations)")
    p.add_argument("--repeats", type=int, default=1, help="alternating baseline/nstlab run pairs")
    C.add_common_args(p)
    p.add_argument("--coarse-to-fine", action="store_true", help="also run the coarse-to-fine preset")
    args = p.parse_args(argv)
    data = C.shared_data(args.data)
    max_iters = args.max_iterations or 3 * args.iterations
    info = C.start("time_to_quality", args.threads)
    content, style = C.load_pair(data, args.pair, args.size)
    cfg = StylizeConfig(
        extractor=args.extractor, weights="random", size=args.size, device="cpu", iterations=max_iters
    )
    resolved = cfg.resolved()
    assert resolved.content_layers is not None and resolved.style_layers is not None
    layers = tuple(dict.fromkeys(resolved.content_layers + resolved.style_layers))
    extractor = build_extractor(get_spec(args.extractor), layers, "random")
    baseline = BaselineNST(args.extractor, content, style, cfg.tv_weight, source=extractor)
    objective = Objective(extractor, content, style, cfg)
    b0, n0 = baseline.loss_at(content), image_loss(objective, content)
    print(
        f"# parity at the content image: baseline {b0:.6g}, nstlab {n0:.6g} "
        f"(rel. diff {abs(b0 - n0) / n0:.1e})"
    )
    print(
        f"# {args.pair}, image {tuple(content.shape[-2:])}, {args.extractor}, {args.iterations} evaluations"
    )

    runs: list[dict[str, Any]] = []
    known: float | None = None  # the stricter of the two targets, once known (the baseline is deterministic)
    for r in range(args.repeats):
        # Alternate who goes first; nstlab can only go first once the targets are known.
        order = ["nstlab", "baseline"] if r % 2 == 1 and known is not None else ["baseline", "nstlab"]
        b_trace: list[tuple[float, float]] = []
        n_trace: list[tuple[float, float]] = []
        b_time, final = 0.0, float("nan")
        for who in order:
            if who == "baseline":
                final_b, own_loss = baseline.run(args.iterations, b_trace)
                b_time = baseline.last_run_seconds
                final = image_loss(objective, final_b)
                known = min(final, min(x[1] for x in b_trace))
                print(
                    f"  baseline: {b_time:.1f} s, final loss {own_loss:.6g} "
                    f"(nstlab's objective: {final:.6g}), "
                    f"best in its trace {min(x[1] for x in b_trace):.6g}",
                    flush=True,
                )
            else:
                assert known is not None
                t0 = time.perf_counter()
                n_trace = run_nstlab(extractor, content, style, cfg, args.iterations, known)
                print(f"  nstlab: {len(n_trace)} evaluations in {time.perf_counter() - t0:.1f} s", flush=True)
        c_trace: list[tuple[float, float]] = []
        if args.coarse_to_fine:
            assert known is not None
            c_trace, coarse_s, coarse_n = run_coarse_to_fine(
                extractor, C.pair_paths(data, args.pair), content, style, cfg, args.iterations, known
            )
            print(
                f"  coarse-to-fine: {coarse_n} coarse evaluations in {coarse_s:.1f} s, then "
                f"{len(c_trace)} at full size, {c_trace[-1][0]:.1f} s in all",
                flush=True,
            )
        best = min(x[1] for x in b_trace)
        run: dict[str, Any] = {"order": order, "baseline_run_s": b_time}
        for name, target in (("final", final), ("best", best)):
            b_hit = first_reach(b_trace, target) or (args.iterations, b_time)
            n_hit = first_reach(n_trace, target)
            c_hit = first_reach(c_trace, target) if c_trace else None
            run[name] = {
                "target_loss": target,
                "baseline_evals": b_hit[0],
                "baseline_s": b_hit[1],
                "nstlab_evals": n_hit[0] if n_hit else None,
                "nstlab_s": n_hit[1] if n_hit else None,
                "c2f_full_size_evals": c_hit[0] if c_hit else None,
                "c2f_s": c_hit[1] if c_hit else None,
            }
        # Levels relative to the lowest loss either implementation evaluated within the same budget.
        floor = min(min(x[1] for x in b_trace), min(x[1] for x in n_trace[: args.iterations]))
        run["levels"] = {
            f"{m:g}": {
                "loss": m * floor,
                "baseline": first_reach(b_trace, m * floor),
                "nstlab": first_reach(n_trace[: args.iterations], m * floor),
                "c2f": first_reach(c_trace[: args.iterations], m * floor) if c_trace else None,
            }
            for m in LEVELS
        }
        checkpoints = [k for k in (1, 10, 30, 100, 300, 1000, 3000) if k <= args.iterations]
        run |= {
            "baseline_s_per_eval": b_time / args.iterations,
            "nstlab_s_per_eval": n_trace[-1][0] / len(n_trace),
            "nstlab_loss_at_same_budget": n_trace[min(args.iterations, len(n_trace)) - 1][1],
            "loss_at": {
                str(k): [b_trace[k - 1][1], n_trace[k - 1][1] if k <= len(n_trace) else None]
                for k in checkpoints
            },
            "baseline_trace": b_trace[:: max(1, len(b_trace) // 200)],
            "nstlab_trace": n_trace[:: max(1, len(n_trace) // 200)],
            "c2f_trace": c_trace[:: max(1, len(c_trace) // 200)],
        }
        runs.append(run)

    hw = "×".join(map(str, content.shape[-2:]))
    print(f"\nTime to the baseline's loss ({args.pair}, {args.extractor}, {hw}, budget {args.iterations})\n")
    print(
        "| target | target loss | baseline evals | baseline s | nstlab evals | nstlab s "
        "| time ratio nstlab/baseline | evals ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for i, run in enumerate(runs):
        for name, label in (("final", "baseline's final image"), ("best", "baseline's best evaluation")):
            d = run[name]
            if name == "best":
                # The literal reading: the baseline's time to its final quality is its whole run
                # (a tutorial user runs the budget; nothing tells them its loss passed the final value early).
                n_s = run["final"]["nstlab_s"]
                print(
                    f"| baseline's final image, against its whole run (run {i + 1}) "
                    f"| {run['final']['target_loss']:.5g} | {args.iterations} | {run['baseline_run_s']:.1f} "
                    f"| {run['final']['nstlab_evals'] or f'> {max_iters}'} | {_f(n_s, 1)} "
                    f"| {_f(n_s / run['baseline_run_s'] if n_s is not None else None, 3)} "
                    f"| {_f((run['final']['nstlab_evals'] or 0) / args.iterations or None, 3)} |"
                )
            n_s, n_e = d["nstlab_s"], d["nstlab_evals"]
            print(
                f"| {label} (run {i + 1}) | {d['target_loss']:.5g} | {d['baseline_evals']} "
                f"| {d['baseline_s']:.1f} "
                f"| {n_e if n_e else f'> {max_iters}'} | {_f(n_s, 1)} "
                f"| {_f(n_s / d['baseline_s'] if n_s is not None else None, 3)} "
                f"| {_f(n_e / d['baseline_evals'] if n_e else None, 3)} |"
            )
    print(
        "\nTime to loss <= m × L*, L* = the lowest loss either evaluated within the budget "
        "(evaluations, seconds; run 1; ratio = median over runs)\n"
    )
    print("| m | loss | baseline evals | baseline s | nstlab evals | nstlab s | time ratio nstlab/baseline |")
    print("|---|---|---|---|---|---|---|")
    for key, lv in runs[0]["levels"].items():
        b_hit, n_hit = lv["baseline"], lv["nstlab"]
        ratios = [
            r["levels"][key]["nstlab"][1] / r["levels"][key]["baseline"][1]
            for r in runs
            if r["levels"][key]["nstlab"] and r["levels"][key]["baseline"]
        ]
        print(
            f"| {key} | {lv['loss']:.5g} | {b_hit[0] if b_hit else '–'} "
            f"| {_f(b_hit[1] if b_hit else None, 1)} "
            f"| {n_hit[0] if n_hit else '–'} | {_f(n_hit[1] if n_hit else None, 1)} "
            f"| {_f(C.median(ratios) if ratios else None, 2)} |"
        )
    if args.coarse_to_fine:
        print_coarse_to_fine(runs)
    print("\nLoss of the current image after k evaluations (first run)\n")
    print("| k | baseline | nstlab |")
    print("|---|---|---|")
    for k, (bl, nl) in runs[0]["loss_at"].items():
        print(f"| {k} | {bl:.5g} | {'–' if nl is None else f'{nl:.5g}'} |")
    print(
        f"\ns/eval over the full runs (median of {len(runs)}): baseline "
        f"{C.median([r['baseline_s_per_eval'] for r in runs]):.3f}, nstlab "
        f"{C.median([r['nstlab_s_per_eval'] for r in runs]):.3f}; nstlab's loss after the same "
        f"{args.iterations} evaluations: {runs[0]['nstlab_loss_at_same_budget']:.5g}"
    )
    C.write_json(args.json, {"machine": info, "args": vars(args), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
