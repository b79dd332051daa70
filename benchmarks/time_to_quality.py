"""Time to quality: how long nstlab's default setting takes to reach the loss the baseline ends with.

The baseline (``baseline.BaselineNST``, tutorial style: clamp in place, unfrozen weights) runs
``--iterations`` L-BFGS evaluations from the content image. Its final image is scored with nstlab's own
``Objective`` (the same extractor object, so the same -- random -- weights; content + style + TV,
lambda_c 1, lambda_s 1e6, nstlab's lambda_tv): that is the target. nstlab's default setting (ResNet-18
unless ``--extractor``, L-BFGS, content init, content + style + TV) then runs with the same budget
(continuing up to ``--max-iterations`` if the target is not reached within it), and the time and the number
of evaluations at which the loss of its current image first reaches the target are reported for both.

Which loss: the loss of the image an implementation would return at that point -- for nstlab the sum of
its content, style and TV terms at clamp(p) (its range penalty, which only steers p, is left out; it is 0
for the returned, clamped image); for the baseline the loss its closure computes on its in-place-clamped
image. Both are the same function (checked at start: "parity"). Times exclude set-up (building the
network, the targets) for both; the clocks start where the optimisation loops start.

    .venv/bin/python benchmarks/time_to_quality.py                       # pair-1, 256 px, 1000 evaluations
    .venv/bin/python benchmarks/time_to_quality.py --size 256 --iterations 300 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import _common as C
import torch
from baseline import BaselineNST

from nstlab.config import StylizeConfig
from nstlab.engine import Objective, Progress, optimize
from nstlab.features import FeatureExtractor, build_extractor, get_spec

warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")


class _Stop(Exception):
    pass


def image_loss(objective: Objective, img: torch.Tensor) -> float:
    with torch.no_grad():
        terms = objective.terms(img.clamp(0, 1))
        return float(sum(v for k, v in terms.items() if k != "range"))


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
) -> list[tuple[float, float]]:
    """nstlab's trace [(seconds since the engine's start, image loss)], stopped once the budget is spent and
    the target reached (or at ``cfg.iterations``)."""
    trace: list[tuple[float, float]] = []

    def on_step(p: Progress) -> None:
        loss = sum(v for k, v in p.losses.items() if k not in ("range", "total"))
        trace.append((p.elapsed, loss))
        if p.evaluation >= budget and min(x[1] for x in trace) <= target:
            raise _Stop

    try:
        optimize(extractor, content, style, cfg, on_step=on_step)
    except _Stop:
        pass
    return trace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extractor", default="resnet18")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iterations", type=int, default=1000, help="the baseline's evaluations (and nstlab's)")
    p.add_argument("--max-iterations", type=int, default=0, help="nstlab's limit (default 3 x --iterations)")
    p.add_argument("--repeats", type=int, default=1, help="alternating baseline/nstlab run pairs")
    p.add_argument("--pair", default="pair-1")
    p.add_argument("--data", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    data = C.data_dir(args.data)
    C.require_data(data)
    if args.threads:
        torch.set_num_threads(args.threads)
    max_iters = args.max_iterations or 3 * args.iterations

    info = C.machine_info()
    print(f"# time_to_quality: {C.describe_machine(info)}")
    print(f"# {C.RANDOM_WEIGHTS_NOTE}")
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
    known_target: float | None = None
    for r in range(args.repeats):
        # Alternate who goes first; nstlab can only go first once the (deterministic) target is known.
        order = ["nstlab", "baseline"] if r % 2 == 1 and known_target is not None else ["baseline", "nstlab"]
        b_trace: list[tuple[float, float]] = []
        n_trace: list[tuple[float, float]] = []
        b_time, target = 0.0, float("nan")
        for who in order:
            if who == "baseline":
                final_b, own_loss = baseline.run(args.iterations, b_trace)
                b_time = baseline.last_run_seconds
                target = known_target = image_loss(objective, final_b)
                print(
                    f"  baseline: {b_time:.1f} s, final loss {own_loss:.6g} "
                    f"(nstlab's objective: {target:.6g})"
                )
            else:
                assert known_target is not None
                t0 = time.perf_counter()
                n_trace = run_nstlab(extractor, content, style, cfg, args.iterations, known_target)
                print(f"  nstlab: {len(n_trace)} evaluations in {time.perf_counter() - t0:.1f} s", flush=True)
        b_hit = first_reach(b_trace, target) or (args.iterations, b_time)
        n_hit = first_reach(n_trace, target)
        runs.append(
            {
                "order": order,
                "target_loss": target,
                "baseline_evals_to_target": b_hit[0],
                "baseline_time_to_target_s": b_hit[1],
                "baseline_run_s": b_time,
                "baseline_s_per_eval": b_time / args.iterations,
                "nstlab_evals_to_target": n_hit[0] if n_hit else None,
                "nstlab_time_to_target_s": n_hit[1] if n_hit else None,
                "nstlab_s_per_eval": n_trace[-1][0] / len(n_trace),
                "nstlab_loss_at_same_budget": n_trace[min(args.iterations, len(n_trace)) - 1][1],
                "nstlab_best_loss": min(x[1] for x in n_trace),
                "baseline_best_loss_in_trace": min(x[1] for x in b_trace),
                "baseline_trace": b_trace[:: max(1, len(b_trace) // 200)],
                "nstlab_trace": n_trace[:: max(1, len(n_trace) // 200)],
            }
        )

    print()
    print(
        "| pair | extractor | image H×W | budget | target loss (baseline final) | baseline evals → target "
        "| baseline s → target | nstlab evals → target | nstlab s → target | time ratio nstlab/baseline "
        "| nstlab loss at same budget | s/eval baseline | s/eval nstlab |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        n_evals, n_time = run["nstlab_evals_to_target"], run["nstlab_time_to_target_s"]
        ratio = f"{n_time / run['baseline_time_to_target_s']:.2f}" if n_time is not None else "not reached"
        print(
            f"| {args.pair} | {args.extractor} | {'×'.join(map(str, content.shape[-2:]))} "
            f"| {args.iterations} "
            f"| {run['target_loss']:.5g} | {run['baseline_evals_to_target']} "
            f"| {run['baseline_time_to_target_s']:.1f} | {n_evals if n_evals else f'> {max_iters}'} "
            f"| {f'{n_time:.1f}' if n_time is not None else '–'} | {ratio} "
            f"| {run['nstlab_loss_at_same_budget']:.5g} | {run['baseline_s_per_eval']:.3f} "
            f"| {run['nstlab_s_per_eval']:.3f} |"
        )
    reached = [r for r in runs if r["nstlab_time_to_target_s"] is not None]
    if len(runs) > 1 and reached:
        ratios = [r["nstlab_time_to_target_s"] / r["baseline_time_to_target_s"] for r in reached]
        print(
            f"\nMedian over {len(runs)} alternating repeats: baseline "
            f"{C.median([r['baseline_time_to_target_s'] for r in runs]):.1f} s, nstlab "
            f"{C.median([r['nstlab_time_to_target_s'] for r in reached]):.1f} s to the target; "
            f"paired time ratio nstlab/baseline {C.median(ratios):.2f} (evaluations: "
            f"{C.median([float(r['nstlab_evals_to_target']) for r in reached]):.0f} vs "
            f"{C.median([float(r['baseline_evals_to_target']) for r in runs]):.0f})"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        record = {"machine": info, "args": {k: v for k, v in vars(args).items()}, "runs": runs}
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
