"""torch.compile (``--compile``) against eager mode: compilation cost and steady-state time per evaluation.

Alternating rounds of ``nstlab.stylize`` with ``compile=False`` and ``compile=True`` (same pair, size,
extractor, random weights). Per run: seconds to the first evaluation's end (the compiled run compiles its
no-grad graph for the targets before that, and its training graph in the first evaluation) and the median
seconds per evaluation after ``--skip`` evaluations; ratios compiled/eager. Also the largest pixel
difference between the two results (float rounding only).

    .venv/bin/python benchmarks/bench_compile.py --threads 2 --size 256 --iterations 100
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import _common as C

import nstlab
from nstlab.engine import Progress


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extractor", default="resnet18")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--skip", type=int, default=10, help="evaluations left out of the steady state")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cpu")
    C.add_common_args(p)
    args = p.parse_args(argv)
    data = C.shared_data(args.data)
    info = C.start("bench_compile", args.threads)
    content, style = C.pair_paths(data, args.pair)
    cfg = nstlab.StylizeConfig(
        extractor=args.extractor,
        size=args.size,
        iterations=args.iterations,
        weights="random",
        device=args.device,
    )
    rows: list[dict[str, Any]] = []
    images: dict[bool, Any] = {}
    for r in range(args.repeats):
        for compiled in (False, True) if r % 2 == 0 else (True, False):
            stamps: list[float] = []

            def on_step(progress: Progress, stamps: list[float] = stamps) -> None:
                stamps.append(time.perf_counter())

            t0 = time.perf_counter()
            res = nstlab.stylize(content, style, cfg.replace(compile=compiled), on_step=on_step)
            steady = [b - a for a, b in zip(stamps[args.skip :], stamps[args.skip + 1 :], strict=False)]
            rows.append(
                {
                    "compile": compiled,
                    "first_evaluation_s": stamps[0] - t0,
                    "steady_s_per_eval": C.median(steady),
                    "total_s": time.perf_counter() - t0,
                }
            )
            images[compiled] = res.image
            print("  " + ", ".join(f"{k} {v:.4g}" for k, v in rows[-1].items()), flush=True)
    med = {
        c: {k: C.median([x[k] for x in rows if x["compile"] == c]) for k in rows[0] if k != "compile"}
        for c in (False, True)
    }
    diff = float((images[True] - images[False]).abs().max())
    print(f"\n{args.extractor}, {args.size} px, {args.iterations} evaluations, {args.device} ({args.pair})\n")
    print("| | eager | compiled | compiled / eager |")
    print("|---|---|---|---|")
    for key, label in (
        ("first_evaluation_s", "start to end of evaluation 1 (s)"),
        ("steady_s_per_eval", f"s per evaluation after {args.skip}"),
        ("total_s", "whole call (s)"),
    ):
        eager, comp = med[False][key], med[True][key]
        print(f"| {label} | {eager:.3f} | {comp:.3f} | {comp / eager:.2f} |")
    print(f"\nlargest pixel difference compiled vs eager: {diff:.1e}")
    C.write_json(args.json, {"machine": info, "args": vars(args), "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
