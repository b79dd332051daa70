"""Optimisers over the image, all driven through a closure so that one budget unit is one evaluation."""

from __future__ import annotations

import torch
from torch import Tensor

from nstlab.errors import choice_error

# L-BFGS: iterations per .step() call (the state and curvature history carry over between calls, so this
# only sets how often control returns to our loop) and the number of (s, y) pairs kept. No line search:
# like the PyTorch tutorial the report follows, each L-BFGS iteration costs exactly one evaluation.
LBFGS_MAX_ITER = 20
LBFGS_HISTORY = 100


def make_optimizer(
    name: str, param: Tensor, lr: float, history: int = LBFGS_HISTORY
) -> torch.optim.Optimizer:
    if name == "lbfgs":
        return torch.optim.LBFGS(
            [param], lr=lr, max_iter=LBFGS_MAX_ITER, history_size=history, line_search_fn=None
        )
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
