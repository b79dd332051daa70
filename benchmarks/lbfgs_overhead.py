"""How much of an L-BFGS run is the optimiser itself rather than evaluations, per L-BFGS implementation.

Runs ``nstlab.engine.optimize`` with the default setting (L-BFGS, history 100) through its ``evaluate``
hook, timing every evaluation (forward + backward). Over the second half of the run, when the history is
(nearly) full, the wall time between evaluations minus the evaluations' own time is what the optimiser
(and the engine's per-evaluation bookkeeping, a clamp and a list append) costs. Each round runs every
implementation (``--impls``: nstlab's ``compact`` and ``torch.optim.LBFGS``), the order alternating; the
ratio of optimiser times is paired within a round. The final images are compared too: the two compute the
same iterates up to float rounding, which L-BFGS amplifies over a run.

    .venv/bin/python benchmarks/lbfgs_overhead.py --threads 2 --size 256 --iterations 240
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common as C
from bench_eval import make_cfg, new_extractor
from torch import Tensor

from nstlab.engine import Objective, evaluate_objective, optimize
from nstlab.features import FeatureExtractor
from nstlab.optim import LBFGS_IMPLEMENTATIONS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extractor", default="resnet18")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iterations", type=int, default=240, help="evaluations; the second half is measured")
    p.add_argument("--impls", default="compact,torch", help="L-BFGS implementations, comma-separated")
    p.add_argument("--repeats", type=int, default=1, help="rounds, each running every implementation")
    C.add_common_args(p)
    args = p.parse_args(argv)
    impls = args.impls.split(",")
    for impl in impls:
        if impl not in LBFGS_IMPLEMENTATIONS:
            p.error(f"unknown implementation {impl!r}; valid: {', '.join(LBFGS_IMPLEMENTATIONS)}")
    data = C.shared_data(args.data)
    info = C.start("lbfgs_overhead", args.threads)
    content, style = C.load_pair(data, args.pair, args.size)
    extractor = new_extractor(args.extractor)
    rows: list[dict[str, object]] = []
    images: dict[str, Tensor] = {}
    for rnd in range(args.repeats):
        order = impls if rnd % 2 == 0 else impls[::-1]
        for impl in order:
            row, image = measure(extractor, content, style, args, impl)
            row["round"] = rnd
            rows.append(row)
            images[impl] = image
            print(
                f"round {rnd} {impl:8s} {args.extractor}, {content.shape[-2]}×{content.shape[-1]}, "
                f"evaluations {row['first_measured']}–{row['evaluations']}: "
                f"{row['per_eval_total_ms']:.1f} ms each, of which the evaluation "
                f"{row['per_eval_evaluation_ms']:.1f} ms and L-BFGS + engine "
                f"{row['per_eval_optimizer_ms']:.1f} ms ({100 * float(row['optimizer_share']):.0f} %); "
                f"final loss {row['final_loss']:.6g}",
                flush=True,
            )
    summary: dict[str, object] = {}
    if len(impls) == 2:
        a, b = impls
        by = {(r["round"], r["impl"]): r for r in rows}
        ratios = {
            key: [
                float(by[(r, a)][key]) / float(by[(r, b)][key])  # type: ignore[arg-type]
                for r in range(args.repeats)
            ]
            for key in ("per_eval_optimizer_ms", "per_eval_total_ms")
        }
        summary = {
            f"{a}/{b} optimizer time": statistics.median(ratios["per_eval_optimizer_ms"]),
            f"{a}/{b} whole run per evaluation": statistics.median(ratios["per_eval_total_ms"]),
            "max pixel difference of the final images": float((images[a] - images[b]).abs().max()),
        }
        for k, v in summary.items():
            print(f"{k}: {v:.3f}")
    C.write_json(args.json, {"machine": info, "args": vars(args), "rows": rows, "summary": summary})
    return 0


def measure(
    extractor: FeatureExtractor, content: Tensor, style: Tensor, args: argparse.Namespace, impl: str
) -> tuple[dict[str, object], Tensor]:
    marks: list[tuple[float, float]] = []

    def timed(objective: Objective, param: Tensor) -> tuple[dict[str, float], Tensor]:
        t0 = time.perf_counter()
        out = evaluate_objective(objective, param)
        marks.append((t0, time.perf_counter()))
        return out

    cfg = make_cfg(args.extractor, args.size).replace(iterations=args.iterations, lbfgs_impl=impl)
    result = optimize(extractor, content, style, cfg, evaluate=timed)
    half = len(marks) // 2
    span = marks[-1][1] - marks[half][0]
    inside = sum(b - a for a, b in marks[half:])
    k = len(marks) - half
    row: dict[str, object] = {
        "impl": impl,
        "optimizer_class": result.optimizer["class"],
        "extractor": args.extractor,
        "image_hw": list(content.shape[-2:]),
        "evaluations": result.evaluations,
        "first_measured": half + 1,
        "measured_evaluations": k,
        "per_eval_total_ms": span / k * 1e3,
        "per_eval_evaluation_ms": inside / k * 1e3,
        "per_eval_optimizer_ms": (span - inside) / k * 1e3,
        "optimizer_share": (span - inside) / span,
        "final_loss": result.trace[-1]["total"],
    }
    return row, result.image


if __name__ == "__main__":
    sys.exit(main())
