"""Several Adam/AdamW stylisations of one pair in one batched forward and backward pass.

Studies sweep settings on the same pair: learning rates, Adam against AdamW, initialisations, loss
weights. For Adam and AdamW such runs can share each evaluation exactly:

* every member keeps its own image parameter and its own optimiser (state, learning rate, step count),
  so its update is the one a separate run makes;
* the extractor sees the members' images stacked along the batch dimension; convolutions, ReLUs,
  poolings and BatchNorm in eval mode treat every batch element on its own, so member i's activations
  are those of its separate run, and the summed loss gives member i exactly its own gradient;
* targets (content features, style Grams) are computed once: they depend only on the pair, the layers and
  the precision, which members must share (see :func:`batch_key`).

Only float rounding differs (a batched convolution may use other kernels): tests/test_batch.py checks the
results against separate runs. L-BFGS is not batched: each problem would need its own curvature history,
step count and convergence test inside torch's single-tensor LBFGS, and the engine stops L-BFGS inside a
step when the budget is spent; separate runs stay the path for it.

Whether batching is faster depends on the device: on the 2-core CPU of benchmarks/README.md four Adam runs
as one batch took 0.95x the time of four separate runs (0.98x for the optimisation alone: convolutions
already fill the cores there; the saving is the targets, computed once), with identical pixels. A batch
needs N times the activation memory, so studies batch only when asked (``nstlab study run --batch N``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from nstlab.config import StylizeConfig
from nstlab.engine import EngineResult, Objective, Progress, initial_image
from nstlab.errors import NonFiniteLossError
from nstlab.features import FeatureExtractor
from nstlab.optim import make_optimizer, optimizer_settings

BATCHABLE_OPTIMIZERS = ("adam", "adamw")
# Fields that may differ between the members of a batch: each only changes a member's own loss terms,
# starting point or optimiser. Everything else (extractor, layers, weights, size, precision, device, ...)
# must be equal, because the members share one forward pass and one set of targets.
PER_MEMBER_FIELDS = (
    "optimizer",
    "lr",
    "init",
    "seed",
    "iterations",
    "losses",
    "content_weight",
    "style_weight",
    "tv_weight",
    "style_layer_weights",
    "lbfgs_history",
)


def batch_key(cfg: StylizeConfig) -> str | None:
    """Configs with the same key (and the same input pair) can run as one batch; None: never batched."""
    cfg = cfg.resolved()
    if cfg.optimizer not in BATCHABLE_OPTIMIZERS or cfg.scales != (1.0,) or cfg.compile:
        return None
    shared = {k: v for k, v in cfg.to_dict().items() if k not in PER_MEMBER_FIELDS}
    return json.dumps(shared, sort_keys=True)


@dataclass
class _Member:
    cfg: StylizeConfig
    objective: Objective
    param: Tensor
    opt: torch.optim.Optimizer
    snapshot_at: set[int]
    trace: list[dict[str, float]]
    snapshots: dict[int, Tensor]
    last_image: Tensor
    failure: NonFiniteLossError | None = None
    done: bool = False
    finished: float | None = None  # perf_counter() when its budget was spent or its loss broke down


def optimize_batch(
    extractor: FeatureExtractor,
    content: Tensor,
    style: Tensor,
    configs: Sequence[StylizeConfig],
    *,
    snapshot_at: Sequence[Collection[int]] | None = None,
    on_step: Callable[[Progress], None] | None = None,
) -> list[EngineResult | NonFiniteLossError]:
    """Run ``configs`` (Adam/AdamW, one :func:`batch_key`) on one pair together. Returns, per config, its
    EngineResult or, if its loss broke down, the NonFiniteLossError a separate run raises (with the last
    finite image in ``.result``); the other members go on. ``on_step`` reports the batch's evaluations
    with the members' summed losses."""
    if not configs:
        return []
    cfgs = [c.resolved() for c in configs]
    keys = {batch_key(c) for c in cfgs}
    if None in keys or len(keys) != 1:
        raise ValueError("optimize_batch needs Adam/AdamW configs that share one batch_key")
    snapshot_at = snapshot_at or [()] * len(cfgs)
    # The targets once, with every term on, so that any member's terms can take theirs from it.
    shared = Objective(extractor, content, style, cfgs[0].replace(losses=("content", "style", "tv")))
    members: list[_Member] = []
    for cfg, snaps in zip(cfgs, snapshot_at, strict=True):
        assert cfg.lr is not None
        torch.manual_seed(cfg.seed)  # as optimize() does (nothing random follows today; kept for parity)
        param = initial_image(cfg, content, style).contiguous().requires_grad_(True)
        members.append(
            _Member(
                cfg=cfg,
                objective=Objective(extractor, content, style, cfg, targets=shared),
                param=param,
                opt=make_optimizer(cfg.optimizer, param, cfg.lr, cfg.lbfgs_history),
                snapshot_at=set(snaps),
                trace=[],
                snapshots={},
                last_image=param.detach().clamp(0.0, 1.0),
            )
        )
    budget = max(c.iterations for c in cfgs)
    start = time.perf_counter()
    for n in range(1, budget + 1):
        active = [m for m in members if not m.done]
        if not active:
            break
        for m in active:
            m.opt.zero_grad(set_to_none=True)
        xs = [m.param.clamp(0.0, 1.0) for m in active]
        feats = shared.features(torch.cat(xs))
        member_terms = [
            m.objective.terms_from_features(m.param, x, {k: v[i : i + 1] for k, v in feats.items()})
            for i, (m, x) in enumerate(zip(active, xs, strict=True))
        ]
        del feats
        stacked = [torch.stack(list(t.values())) for t in member_terms]
        # One host sync per evaluation for every member's numbers.
        numbers = torch.cat([torch.cat([s.detach(), s.detach().sum().reshape(1)]) for s in stacked]).tolist()
        total = torch.zeros((), device=content.device)
        finite: list[tuple[_Member, dict[str, float]]] = []
        offset = 0
        for m, t, s in zip(active, member_terms, stacked, strict=True):
            values = dict(zip([*t, "total"], numbers[offset : offset + len(t) + 1], strict=True))
            offset += len(t) + 1
            if not math.isfinite(values["total"]):
                bad = ", ".join(f"{k}={v:g}" for k, v in values.items() if not math.isfinite(v))
                m.done, m.finished = True, time.perf_counter()
                m.failure = NonFiniteLossError(
                    f"loss became non-finite at iteration {n} ({bad}); kept the image of iteration {n - 1}",
                    evaluation=n,
                    result=_result(m, start, "nonfinite"),
                )
                continue
            total = total + s.sum()
            finite.append((m, values))
        if not finite:
            continue
        total.backward()  # type: ignore[no-untyped-call]
        for m, values in finite:
            m.trace.append(values)
            m.last_image = m.param.detach().clamp(0.0, 1.0)
            if n in m.snapshot_at:
                m.snapshots[n] = m.last_image.cpu()
            if n >= m.cfg.iterations:
                # Its budget is spent: the image of this evaluation is its result.
                m.done, m.finished = True, time.perf_counter()
            else:
                m.opt.step()
        if on_step is not None:
            summed = {"total": sum(v["total"] for _, v in finite)}
            on_step(Progress(n, budget, n, summed, time.perf_counter() - start))
    return [m.failure if m.failure is not None else _result(m, start, "budget") for m in members]


def _result(m: _Member, start: float, reason: str) -> EngineResult:
    # Wall time from the batch's start to this member's end: the time its result took (shared with the
    # other members, so a batch member's seconds per evaluation are the batch's, not one run's).
    return EngineResult(
        m.last_image.cpu(),
        list(m.trace),
        len(m.trace),
        len(m.trace),
        reason,
        (m.finished or time.perf_counter()) - start,
        optimizer_settings(m.opt),
        m.objective.precision,
        dict(m.snapshots),
        m.objective.checkpoint,
    )
