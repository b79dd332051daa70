"""How much of an L-BFGS run is the optimiser itself (torch's LBFGS two-loop recursion), not evaluations.

Runs ``nstlab.engine.optimize`` with the default setting (L-BFGS, history 100) through its ``evaluate``
hook, timing every evaluation (forward + backward). Over the second half of the run, when the history is
(nearly) full, the wall time between evaluations minus the evaluations' own time is what the optimiser
(and the engine's per-evaluation bookkeeping, a clamp and a list append) costs.

    .venv/bin/python benchmarks/lbfgs_overhead.py --threads 2 --size 256 --iterations 240
"""

from __future__ import annotations

import argparse
import sys
import time

import _common as C
from bench_eval import make_cfg, new_extractor
from torch import Tensor

from nstlab.engine import Objective, evaluate_objective, optimize


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extractor", default="resnet18")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iterations", type=int, default=240, help="evaluations; the second half is measured")
    C.add_common_args(p)
    args = p.parse_args(argv)
    data = C.shared_data(args.data)
    info = C.start("lbfgs_overhead", args.threads)
    content, style = C.load_pair(data, args.pair, args.size)
    marks: list[tuple[float, float]] = []

    def timed(objective: Objective, param: Tensor) -> tuple[dict[str, float], Tensor]:
        t0 = time.perf_counter()
        out = evaluate_objective(objective, param)
        marks.append((t0, time.perf_counter()))
        return out

    cfg = make_cfg(args.extractor, args.size).replace(iterations=args.iterations)
    result = optimize(new_extractor(args.extractor), content, style, cfg, evaluate=timed)
    half = len(marks) // 2
    span = marks[-1][1] - marks[half][0]
    inside = sum(b - a for a, b in marks[half:])
    k = len(marks) - half
    row = {
        "extractor": args.extractor,
        "image_hw": list(content.shape[-2:]),
        "evaluations": result.evaluations,
        "measured_evaluations": k,
        "per_eval_total_ms": span / k * 1e3,
        "per_eval_evaluation_ms": inside / k * 1e3,
        "per_eval_optimizer_ms": (span - inside) / k * 1e3,
        "optimizer_share": (span - inside) / span,
    }
    print(
        f"{args.extractor}, {content.shape[-2]}×{content.shape[-1]}, evaluations {half + 1}–{len(marks)}: "
        f"{row['per_eval_total_ms']:.1f} ms each, of which the evaluation "
        f"{row['per_eval_evaluation_ms']:.1f} ms and L-BFGS + engine {row['per_eval_optimizer_ms']:.1f} ms "
        f"({100 * row['optimizer_share']:.0f} %)"
    )
    C.write_json(args.json, {"machine": info, "args": vars(args), "result": row})
    return 0


if __name__ == "__main__":
    sys.exit(main())
