"""Several stylisations of one pair in one batched forward and backward pass.

Studies sweep settings on the same pair: optimisers, learning rates, initialisations, loss terms and
weights, iteration counts. Such runs can share each evaluation exactly:

* every member is a separate run of :func:`nstlab.engine.optimize` (in its own thread), with its own image
  parameter and its own optimiser: Adam's moments, or L-BFGS's curvature history, step count, search
  direction and convergence test -- its own L-BFGS (``nstlab.lbfgs``), one instance per member. Only the
  evaluation is shared: each member hands its parameter to the batch and waits; when every running member
  has done so, the caller's thread runs the extractor on the members' images stacked along the batch
  dimension, gives each member its own terms, and one backward pass of the summed totals fills every
  member's own gradient;
* convolutions, ReLUs, poolings and BatchNorm in eval mode treat every batch element on its own, so member
  i's activations, loss and gradient are those of its separate run;
* targets (content features, style Grams) are computed once: they depend only on the pair, the layers and
  the precision, which members must share (see :func:`batch_key`).

Members finish independently (budget spent, L-BFGS converged, loss non-finite) and the batch shrinks.
Only float rounding can differ from separate runs (a batched convolution may use other kernels), and
L-BFGS amplifies rounding over its steps (final losses within 1 % at 64 px in the tests; pixel-identical
in benchmarks/README.md at 256 px): tests/test_batch.py checks Adam, AdamW and L-BFGS members against
separate runs, and with the forward pass done image by image, bit for bit.

Whether batching is faster depends on the device: on the 2-core CPU of benchmarks/README.md four Adam runs
as one batch took 0.95x the time of four separate runs, four L-BFGS runs 0.99x (convolutions already fill
the cores there; the saving is the targets, computed once), with identical pixels. A batch needs N times
the activation memory, so studies batch only when asked (``nstlab study run --batch N``).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Collection, Iterable, Sequence

import torch
from torch import Tensor

from nstlab.config import StylizeConfig
from nstlab.engine import EngineResult, NonFiniteEvaluation, Objective, Progress, loss_values, optimize
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
    "lbfgs_impl",
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
        if not batch.is_running(i):  # aborted before its start was recorded
            return
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
        except (NonFiniteLossError, StylizeInterrupted) as exc:
            outcomes[i] = exc
        except BaseException as exc:  # noqa: BLE001 - anything else stops the whole batch, in the caller
            outcomes[i] = exc
            batch.fail(exc)
        finally:
            batch.leave(i)

    threads = [threading.Thread(target=member, args=(i,), name=f"nstlab-batch-{i}") for i in range(len(cfgs))]
    batch.join(range(len(cfgs)))
    # The members' threads only run their optimisers; every evaluation runs here, on the caller's thread:
    # one thread computes at a time (one OpenMP pool), Ctrl-C lands between or inside evaluations, and
    # on_step is called where the caller expects it (a study's heartbeat writes through an sqlite
    # connection that belongs to this thread).
    try:
        for t in threads:
            t.start()
        while (work := batch.next_work()) is not None:
            progress = batch.run(work)
            if on_step is not None and progress is not None:
                on_step(progress)
    except BaseException:  # Ctrl-C, an error in an evaluation or in on_step: stop every member, pass it on
        # A thread has an ident once started (a Ctrl-C may land inside start()).
        batch.abort(never_started=[i for i, t in enumerate(threads) if t.ident is None])
        for t in threads:
            if t.ident is not None:
                t.join()
        raise
    for t in threads:
        t.join()
    results: list[EngineResult | NonFiniteLossError] = []
    for out in outcomes:
        if isinstance(out, (EngineResult, NonFiniteLossError)):
            results.append(out)
        else:
            assert isinstance(out, BaseException)  # StylizeInterrupted cannot happen without an abort
            raise out
    return results


class _SharedEvaluations:
    """The rendezvous of a batch's members. Each running member submits its parameter and blocks; once
    every running member has submitted, the caller's thread evaluates them all in one batched pass and
    answers each with its own numbers, its gradient already in ``param.grad``."""

    def __init__(self, shared: Objective, budget: int) -> None:
        self.shared = shared
        self.budget = budget
        self.cond = threading.Condition()
        self.running: set[int] = set()
        self.submitted: dict[int, tuple[Objective, Tensor]] = {}
        self.answers: dict[int, tuple[dict[str, float], Tensor] | BaseException] = {}
        self.aborted = False
        self.error: BaseException | None = None
        self.evaluations = 0
        self.start = time.perf_counter()

    # --- the members' side (their threads) ---

    def join(self, members: Iterable[int]) -> None:
        with self.cond:
            self.running.update(members)

    def is_running(self, i: int) -> bool:
        with self.cond:
            return i in self.running

    def evaluator(self, i: int) -> Callable[[Objective, Tensor], tuple[dict[str, float], Tensor]]:
        def evaluate(objective: Objective, param: Tensor) -> tuple[dict[str, float], Tensor]:
            with self.cond:
                if self.aborted:
                    raise KeyboardInterrupt
                self.submitted[i] = (objective, param)
                self.cond.notify_all()
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
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = exc
            else:  # raised too, but only the first can propagate: keep the others' messages on it
                self.error.add_note(f"another batch member failed too: {type(exc).__name__}: {exc}")
            self.cond.notify_all()

    # --- the caller's side ---

    def next_work(self) -> list[tuple[int, Objective, Tensor]] | None:
        """Wait until every running member has submitted; None once no member runs. Raises a member's
        unexpected error (the caller then aborts the others)."""
        with self.cond:
            while True:
                if self.error is not None:
                    raise self.error
                if not self.running:
                    return None
                if len(self.submitted) == len(self.running):
                    order = sorted(self.submitted)  # a fixed stacking order: same configs, same pixels
                    work = [(i, *self.submitted[i]) for i in order]
                    self.submitted.clear()
                    return work
                self.cond.wait(timeout=0.1)  # a timeout, so that Ctrl-C is seen while waiting

    def run(self, work: list[tuple[int, Objective, Tensor]]) -> Progress | None:
        """Evaluate and answer ``work``; the batch's Progress (None if no member's loss was finite)."""
        answers = self._evaluate([(objective, param) for _, objective, param in work])
        with self.cond:
            self.answers.update(zip((i for i, _, _ in work), answers, strict=True))
            self.cond.notify_all()
        finite = [a for a in answers if not isinstance(a, BaseException)]
        if not finite:
            return None
        self.evaluations += 1
        summed = {"total": sum(values["total"] for values, _ in finite)}
        n = self.evaluations
        return Progress(n, self.budget, n, summed, time.perf_counter() - self.start)

    def abort(self, never_started: Iterable[int] = ()) -> None:
        """Answer every running member with KeyboardInterrupt (each ends as its own run does on Ctrl-C).
        Members that are not waiting check ``aborted`` before they submit, so their answer is never read;
        answering all of them means none can be missed, wherever the caller was interrupted."""
        with self.cond:
            self.aborted = True
            self.running.difference_update(never_started)
            for i in self.running:
                self.answers[i] = KeyboardInterrupt()
            self.submitted.clear()
            self.cond.notify_all()

    @torch.enable_grad()  # as the optimisers' step() does for a separate run's closure
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
        member_values, member_totals = loss_values(member_terms)  # one host sync for all members
        answers: list[tuple[dict[str, float], Tensor] | BaseException] = []
        total = torch.zeros((), device=xs[0].device)
        for values, member_total in zip(member_values, member_totals, strict=True):
            if math.isfinite(values["total"]):
                total = total + member_total
                answers.append((values, member_total.detach()))
            else:
                answers.append(NonFiniteEvaluation(values))  # that member stops; its loss is left out
        if total.requires_grad:
            total.backward()  # type: ignore[no-untyped-call]
        return answers
