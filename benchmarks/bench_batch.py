"""Batched runs (``nstlab.stylize_batch``) against the same runs one after another.

``--members`` settings on one pair, ``--iterations`` evaluations each, alternately as one batch and as
separate ``nstlab.stylize`` calls: with ``--optimizer adam`` (default) learning rates spread around 0.1;
with ``--optimizer lbfgs`` the three initialisations and seeds in turn (L-BFGS members each keep their own
history). Reported: whole-call seconds
(including the targets, which a batch computes once), optimisation-only seconds (the engines' clocks), the
ratios batch/separate, and the largest pixel difference between the two (float rounding only).

    .venv/bin/python benchmarks/bench_batch.py --threads 1 --members 4 --size 256
    .venv/bin/python benchmarks/bench_batch.py --threads 2 --members 4 --size 256 --optimizer lbfgs
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import _common as C

import nstlab


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--extractor", default="resnet18")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--optimizer", choices=("adam", "lbfgs"), default="adam")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    C.add_common_args(p, pair="pair-2")
    p.add_argument("--content", default=None, help="content image (with --style: instead of --pair)")
    p.add_argument("--style", default=None)
    args = p.parse_args(argv)
    if args.content and args.style:
        content, style = Path(args.content), Path(args.style)
    else:
        data = C.shared_data(args.data)
        content, style = C.pair_paths(data, args.pair)
    info = C.start("bench_batch", args.threads)
    base = nstlab.StylizeConfig(
        extractor=args.extractor,
        iterations=args.iterations,
        size=args.size,
        weights="random",
        device=args.device,
    )
    inits = ("content", "noise", "style")
    configs = [
        base.replace(optimizer="adam", lr=0.1 * 2 ** (i - args.members // 2))
        if args.optimizer == "adam"
        else base.replace(optimizer="lbfgs", init=inits[i % 3], seed=i)
        for i in range(args.members)
    ]
    nstlab.stylize(content, style, configs[0].replace(iterations=2))  # warm-up: caches, allocator
    rounds: list[dict[str, Any]] = []
    for r in range(args.repeats):
        timing: dict[str, Any] = {}
        for how in ("batch", "separate") if r % 2 == 0 else ("separate", "batch"):
            t = time.perf_counter()
            if how == "batch":
                results = nstlab.stylize_batch(content, style, configs)
            else:
                results = [nstlab.stylize(content, style, c) for c in configs]
            call_s = time.perf_counter() - t
            done = [x for x in results if isinstance(x, nstlab.Result)]
            engine_s = (
                # batch: members run side by side, each clock from its own optimize() start to its end
                max(x.engine.wall_time_s for x in done)
                if how == "batch"
                else sum(x.engine.wall_time_s for x in done)
            )
            timing[how] = {"call_s": call_s, "engine_s": engine_s, "images": [x.image for x in done]}
        diff = max(
            float((a - b).abs().max())
            for a, b in zip(timing["batch"]["images"], timing["separate"]["images"], strict=True)
        )
        rounds.append(
            {
                **{f"{h}_{k}": timing[h][k] for h in ("batch", "separate") for k in ("call_s", "engine_s")},
                "max_pixel_diff": diff,
            }
        )
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v:.3g}" for k, v in rounds[-1].items()), flush=True)
    call = C.median([x["batch_call_s"] / x["separate_call_s"] for x in rounds])
    engine = C.median([x["batch_engine_s"] / x["separate_engine_s"] for x in rounds])
    n_evals = args.members * args.iterations
    print(
        f"\n{args.members} {args.optimizer} runs × {args.iterations} evaluations, {args.extractor}, "
        f"{args.size} px, {args.device} ({args.pair})\n"
    )
    print("| | batch s | separate s | batch / separate |")
    print("|---|---|---|---|")
    print(
        f"| whole calls | {C.median([x['batch_call_s'] for x in rounds]):.1f} "
        f"| {C.median([x['separate_call_s'] for x in rounds]):.1f} | {call:.2f} |"
    )
    print(
        f"| optimisation only | {C.median([x['batch_engine_s'] for x in rounds]):.1f} "
        f"| {C.median([x['separate_engine_s'] for x in rounds]):.1f} | {engine:.2f} |"
    )
    per_eval = {
        h: C.median([x[f"{h}_engine_s"] for x in rounds]) / n_evals * 1e3 for h in ("batch", "separate")
    }
    print(
        f"\nper member-evaluation: batch {per_eval['batch']:.1f} ms, separate {per_eval['separate']:.1f} ms; "
        f"largest pixel difference {max(x['max_pixel_diff'] for x in rounds):.1e}"
    )
    C.write_json(args.json, {"machine": info, "args": vars(args), "rounds": rounds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
