"""L-BFGS's search direction alone, at a full history: nstlab's compact form vs torch's two-loop recursion.

Whole L-BFGS runs (``lbfgs_overhead.py``) mix the optimiser's time with slow first runs and other noise of
a shared machine. This measures the direction computation in isolation, with 100 stored pairs of
image-sized vectors, and the evaluation that follows it (to show whether one of them leaves the caches in a
worse state for the network). Rounds alternate the order of:

* ``compact``: ``nstlab.lbfgs._History.direction`` (two matrix passes over the history);
* ``twoloop``: the two-loop recursion exactly as ``torch.optim.LBFGS.step`` runs it (a dot product and an
  axpy per pair and loop), transcribed here because torch has no entry point for it alone;
* ``none``: the evaluation alone.

    .venv/bin/python benchmarks/lbfgs_direction.py --threads 2 --size 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import _common as C
import torch
from bench_eval import make_cfg, new_extractor
from torch import Tensor

from nstlab.engine import Objective, evaluate_objective
from nstlab.lbfgs import _History


def two_loop(g: Tensor, s: list[Tensor], y: list[Tensor], ro: list[Tensor], h_diag: float) -> Tensor:
    al: list[Tensor] = [torch.zeros(())] * len(s)
    q = g.neg()
    for i in range(len(s) - 1, -1, -1):
        al[i] = s[i].dot(q) * ro[i]
        q.add_(y[i], alpha=-al[i])  # type: ignore[arg-type]
    r = torch.mul(q, h_diag)
    for i in range(len(s)):
        be_i = y[i].dot(r) * ro[i]
        r.add_(s[i], alpha=al[i] - be_i)  # type: ignore[arg-type]
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--history", type=int, default=100)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--per-round", type=int, default=8, help="direction + evaluation pairs per mode and round")
    C.add_common_args(p)
    args = p.parse_args(argv)
    data = C.shared_data(args.data)
    info = C.start("lbfgs_direction", args.threads)
    content, style = C.load_pair(data, args.pair, args.size)
    cfg = make_cfg("resnet18", args.size).resolved()
    objective = Objective(new_extractor("resnet18"), content, style, cfg)
    param = content.clone().requires_grad_(True)
    n, m = param.numel(), args.history
    gen = torch.Generator().manual_seed(0)
    s = [torch.randn(n, generator=gen) for _ in range(m)]
    y = [v + 0.1 * torch.randn(n, generator=gen) for v in s]
    ro = [1.0 / v.dot(w) for v, w in zip(s, y, strict=True)]
    history = _History(m, s[0])
    for v, w in zip(s, y, strict=True):
        history.push(v, w, float(v.dot(w)), float(w.dot(w)))
    history.h_diag = float(1.0 / ro[-1] / y[-1].dot(y[-1]))
    gy = torch.randn(2, n, generator=gen)
    out = torch.empty(n)
    # Fill the small matrices as a run does (the first call sees every pair's products).
    history.direction(gy, out)
    modes: dict[str, Callable[[], object]] = {
        "none": lambda: None,
        "compact": lambda: history.direction(gy, out),
        "twoloop": lambda: two_loop(gy[0], s, y, ro, float(history.h_diag)),
    }
    times: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in modes}
    for rnd in range(args.rounds):
        for name in list(modes) if rnd % 2 == 0 else list(modes)[::-1]:
            for _ in range(args.per_round):
                t0 = time.perf_counter()
                modes[name]()
                t1 = time.perf_counter()
                param.grad = None
                evaluate_objective(objective, param)
                times[name][0].append(t1 - t0)
                times[name][1].append(time.perf_counter() - t1)
    rows = {
        name: {
            "direction_ms": statistics.median(a) * 1e3,
            "following_evaluation_ms": statistics.median(b) * 1e3,
        }
        for name, (a, b) in times.items()
    }
    hw = "×".join(str(v) for v in content.shape[-2:])
    for name, row in rows.items():
        print(
            f"{hw}, {m} pairs, {name:8s}: direction {row['direction_ms']:6.1f} ms, "
            f"following evaluation {row['following_evaluation_ms']:6.1f} ms"
        )
    ratio = rows["compact"]["direction_ms"] / rows["twoloop"]["direction_ms"]
    print(f"compact/twoloop direction time: {ratio:.2f}")
    C.write_json(args.json, {"machine": info, "args": vars(args), "rows": rows, "compact/twoloop": ratio})
    return 0


if __name__ == "__main__":
    sys.exit(main())
