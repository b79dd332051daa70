"""Optimisers over the image, all driven through a closure so that one budget unit is one evaluation."""

from __future__ import annotations

import torch
from torch import Tensor

from nstlab.errors import choice_error
from nstlab.lbfgs import CompactLBFGS

# L-BFGS: iterations per .step() call (the state and curvature history carry over between calls, so this
# only sets how often control returns to our loop) and the number of (s, y) pairs kept. No line search:
# like the PyTorch tutorial the report follows, each L-BFGS iteration costs exactly one evaluation.
LBFGS_MAX_ITER = 20
LBFGS_HISTORY = 100
# L-BFGS implementations: "compact" (nstlab.lbfgs.CompactLBFGS, the default) is torch's algorithm with the
# search direction computed from the compact representation: the same iterates up to float rounding, and
# 0.66x the direction time at 100 pairs (benchmarks/README.md). "torch" is torch.optim.LBFGS itself, kept
# for comparisons (benchmarks, tests) and for reproducing runs made before the change.
LBFGS_IMPLEMENTATIONS = ("compact", "torch")


def make_optimizer(
    name: str, param: Tensor, lr: float, history: int = LBFGS_HISTORY, lbfgs_impl: str = "compact"
) -> torch.optim.Optimizer:
    if name == "lbfgs":
        if lbfgs_impl not in LBFGS_IMPLEMENTATIONS:
            raise choice_error("L-BFGS implementation", lbfgs_impl, LBFGS_IMPLEMENTATIONS)
        cls = CompactLBFGS if lbfgs_impl == "compact" else torch.optim.LBFGS
        return cls([param], lr=lr, max_iter=LBFGS_MAX_ITER, history_size=history, line_search_fn=None)
    if name == "adam":
        return torch.optim.Adam([param], lr=lr)
    if name == "adamw":
        # torch's default weight decay (0.01), as the report used AdamW without naming one.
        return torch.optim.AdamW([param], lr=lr)
    raise choice_error("optimizer", name, ["lbfgs", "adam", "adamw"])


def optimizer_settings(opt: torch.optim.Optimizer) -> dict[str, object]:
    """The optimiser's hyper-parameters as plain values, for the run record."""
    group = opt.param_groups[0]
    return {
        "class": type(opt).__name__,
        **{
            k: v for k, v in group.items() if k != "params" and isinstance(v, int | float | str | bool | None)
        },
    }
