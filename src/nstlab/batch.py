"""Several stylisations of one pair in one batched forward and backward pass.

Studies sweep settings on the same pair: optimisers, learning rates, initialisations, loss terms and
weights, iteration counts. Such runs can share each evaluation exactly:

* every member is a separate run of :func:`nstlab.engine.optimize` (in its own thread), with its own image
  parameter and its own optimiser: Adam's moments, or L-BFGS's curvature history, step count, line of
  search and convergence test -- torch's own ``LBFGS``, one instance per member. Only the evaluation is
  shared: each member hands its parameter to the batch and waits; when every running member has done so,
  one of them runs the extractor on the members' images stacked along the batch dimension, gives each
  member its own terms, and one backward pass of the summed totals fills every member's own gradient;
* convolutions, ReLUs, poolings and BatchNorm in eval mode treat every batch element on its own, so member
  i's activations, loss and gradient are those of its separate run;
* targets (content features, style Grams) are computed once: they depend only on the pair, the layers and
  the precision, which members must share (see :func:`batch_key`).

Members finish independently (budget spent, L-BFGS converged, loss non-finite) and the batch shrinks.
Only float rounding can differ from separate runs (a batched convolution may use other kernels):
tests/test_batch.py checks Adam, AdamW and L-BFGS members against separate runs.

Whether batching is faster depends on the device: on the 2-core CPU of benchmarks/README.md four Adam runs
as one batch took 0.95x the time of four separate runs, four L-BFGS runs 0.99x (convolutions already fill
the cores there; the saving is the targets, computed once), with identical pixels. A batch needs N times the activation memory,
so studies batch only when asked (``nstlab study run --batch N``).
"""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence

import torch
from torch import Tensor

from nstlab.config import StylizeConfig
from nstlab.engine import EngineResult, NonFiniteEvaluation, Objective, Progress, optimize
from nstlab.errors import NonFiniteLossError, StylizeInterrupted
from nstlab.features import FeatureExtractor

BATCHABLE_OPTIMIZERS = ("adam", "adamw", "lbfgs")
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


def optimize_batch(
    extractor: FeatureExtractor,
    content: Tensor,
    style: Tensor,
    configs: Sequence[StylizeConfig],
    *,
    snapshot_at: Sequence[Collection[int]] | None = None,
    on_step: Callable[[Progress], None] | None = None,
) -> list[EngineResult | NonFiniteLossError]:
    """Run ``configs`` (one :func:`batch_key`) on one pair together. Returns, per config, its EngineResult
    or, if its loss broke down, the NonFiniteLossError a separate run raises (with the last finite image in
    ``.result``); the other members go on. ``on_step`` reports the batch's evaluations with the members'
    summed losses. Ctrl-C stops every member and raises KeyboardInterrupt."""
    if not configs:
        return []
    cfgs = [c.resolved() for c in configs]
    keys = {batch_key(c) for c in cfgs}
    if None in keys or len(keys) != 1:
        raise ValueError("optimize_batch needs configs that share one batch_key")
    snapshot_at = snapshot_at or [()] * len(cfgs)
    # The targets once, with every term on, so that any member's terms can take theirs from it.
    shared = Objective(extractor, content, style, cfgs[0].replace(losses=("content", "style", "tv")))
    objectives = [Objective(extractor, content, style, cfg, targets=shared) for cfg in cfgs]
    batch = _SharedEvaluations(shared, max(c.iterations for c in cfgs))
    outcomes: list[EngineResult | BaseException | None] = [None] * len(cfgs)

    def member(i: int) -> None:
        try:
            outcomes[i] = optimize(
                extractor,
                content,
                style,
                cfgs[i],
                snapshot_at=snapshot_at[i],
                objective=objectives[i],
                evaluate=batch.evaluator(i),
            )
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            outcomes[i] = exc
        finally:
            batch.leave(i)

    threads = [threading.Thread(target=member, args=(i,), name=f"nstlab-batch-{i}") for i in range(len(cfgs))]
    batch.join(range(len(cfgs)))
    for t in threads:
        t.start()
    # This (the caller's) thread only waits and delivers progress: on_step runs here, never in a member's
    # thread (a study's heartbeat writes through an sqlite connection that belongs to this thread).
    try:
        while any(t.is_alive() for t in threads):
            try:  # with a timeout: a blocking wait would not see Ctrl-C
                progress = batch.progress.get(timeout=0.1)
            except queue.Empty:
                continue
            if on_step is not None:
                on_step(progress)
    except BaseException:  # Ctrl-C, or on_step raised: stop every member, then pass it on
        batch.abort()
        for t in threads:
            t.join()
        raise
    while on_step is not None and not batch.progress.empty():
        on_step(batch.progress.get())
    results: list[EngineResult | NonFiniteLossError] = []
    for out in outcomes:
        if isinstance(out, (EngineResult, NonFiniteLossError)):
            results.append(out)
        elif isinstance(out, StylizeInterrupted):
            raise KeyboardInterrupt
        else:
            assert isinstance(out, BaseException)
            raise out
    return results


class _SharedEvaluations:
    """The rendezvous of a batch's members: each running member submits its parameter and blocks; the
    member that completes the set evaluates them all (so exactly one thread computes at any time) and
    wakes the others with their own numbers, their gradients already in ``param.grad``."""

    def __init__(self, shared: Objective, budget: int) -> None:
        self.shared = shared
        self.budget = budget
        self.progress: queue.SimpleQueue[Progress] = queue.SimpleQueue()  # for the caller's thread
        self.cond = threading.Condition()
        self.running: set[int] = set()
        self.submitted: dict[int, tuple[Objective, Tensor]] = {}
        self.answers: dict[int, tuple[dict[str, float], Tensor] | BaseException] = {}
        self.aborted = False
        self.evaluations = 0
        self.start = time.perf_counter()

    def join(self, members: Iterable[int]) -> None:
        with self.cond:
            self.running.update(members)

    def evaluator(self, i: int) -> Callable[[Objective, Tensor], tuple[dict[str, float], Tensor]]:
        def evaluate(objective: Objective, param: Tensor) -> tuple[dict[str, float], Tensor]:
            with self.cond:
                if self.aborted:
                    raise KeyboardInterrupt
                self.submitted[i] = (objective, param)
                self._run_if_complete()
                while i not in self.answers:
                    self.cond.wait()
                answer = self.answers.pop(i)
            if isinstance(answer, BaseException):
                raise answer
            return answer

        return evaluate

    def leave(self, i: int) -> None:
        with self.cond:
            self.running.discard(i)
            self._run_if_complete()

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            for i in self.submitted:
                self.answers[i] = KeyboardInterrupt()
            self.submitted.clear()
            self.cond.notify_all()

    def _run_if_complete(self) -> None:
        # Called with the lock held; every running member is waiting, so no one else touches tensors now.
        if not self.submitted or len(self.submitted) < len(self.running):
            return
        order = sorted(self.submitted)  # a fixed stacking order: same configs, same pixels
        work = [self.submitted[i] for i in order]
        self.submitted.clear()
        try:
            answers: list[tuple[dict[str, float], Tensor] | BaseException] = self._evaluate(work)
        except BaseException as exc:  # noqa: BLE001 - every waiting member raises it
            answers = [exc] * len(order)
        self.answers.update(zip(order, answers, strict=True))
        self.cond.notify_all()

    def _evaluate(
        self, work: list[tuple[Objective, Tensor]]
    ) -> list[tuple[dict[str, float], Tensor] | BaseException]:
        """What :func:`nstlab.engine.evaluate_objective` does for one member, for all of them at once."""
        xs = [param.clamp(0.0, 1.0) for _, param in work]
        feats = self.shared.features(torch.cat(xs))
        member_terms = [
            objective.terms_from_features(param, x, {k: v[j : j + 1] for k, v in feats.items()})
            for j, ((objective, param), x) in enumerate(zip(work, xs, strict=True))
        ]
        del feats
        stacked = [torch.stack(list(t.values())) for t in member_terms]
        # One host sync per evaluation for every member's numbers.
        numbers = torch.cat([torch.cat([s.detach(), s.detach().sum().reshape(1)]) for s in stacked]).tolist()
        answers: list[tuple[dict[str, float], Tensor] | BaseException] = []
        total = torch.zeros((), device=xs[0].device)
        offset = 0
        for t, s in zip(member_terms, stacked, strict=True):
            values = dict(zip([*t, "total"], numbers[offset : offset + len(t) + 1], strict=True))
            offset += len(t) + 1
            if math.isfinite(values["total"]):
                member_total = s.sum()
                total = total + member_total
                answers.append((values, member_total.detach()))
            else:
                answers.append(NonFiniteEvaluation(values))  # that member stops; its loss is left out
        if total.requires_grad:
            total.backward()  # type: ignore[no-untyped-call]
        self.evaluations += 1
        summed = sum(a[0]["total"] for a in answers if not isinstance(a, BaseException))
        elapsed = time.perf_counter() - self.start
        n = self.evaluations
        self.progress.put(Progress(n, self.budget, n, {"total": summed}, elapsed))
        return answers
