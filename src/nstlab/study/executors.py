"""Executors: where a study's groups run. All of them claim work through the store, so runners can be
started and killed at will, side by side, and a re-run does exactly what is missing.

* ``local`` (default): this process, one group at a time, all cores for each job.
* ``pool``: ``--workers N`` processes on this machine, each a local runner with cores/N threads.
* ``ray``: groups become Ray tasks (with CPU/GPU requests) on a local Ray or an existing cluster; the
  driver claims, submits and persists, so workers need no access to the study folder.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nstlab.errors import ConfigError, DeviceError, InputError
from nstlab.study.runner import GroupTask, compute_batch, make_task, persist, sync_store
from nstlab.study.spec import Job, Study, load_study
from nstlab.study.store import Store

EXECUTORS = ("local", "pool", "ray")
HEARTBEAT_S = 30.0


@dataclass
class RunOptions:
    executor: str = "local"
    workers: int = 1
    address: str | None = None  # Ray cluster address; None starts a local Ray
    device: str = "auto"
    cpus_per_job: float = 1.0  # Ray resource request
    gpus_per_job: float = 0.0
    # Ray: queue jobs that no node can take now (an autoscaling cluster adds one) instead of refusing them.
    wait_for_resources: bool = False
    retry_failed: bool = False
    max_groups: int | None = None  # stop after this many groups (tests, partial runs)
    # Up to this many groups of one pair run as one batched stylisation (nstlab.batch): the same
    # results up to float rounding (amplified over L-BFGS's steps). 1 (no batching) by default: N times
    # the activation memory, and on the CPU measured it is about break-even (benchmarks/README.md).
    batch: int = 1


class Progress:
    """Overall (jobs done / total, ETA) and per-job bars on a terminal; one line per job otherwise."""

    def __init__(self, total: int, done: int, quiet: bool) -> None:
        from tqdm import tqdm

        tty = sys.stderr.isatty() and not quiet
        self.quiet = quiet
        self.tty = tty
        self.done, self.total = done, total  # tqdm does not count while disabled
        self.overall = tqdm(
            total=total,
            initial=done,
            desc="jobs",
            unit="job",
            file=sys.stderr,
            disable=not tty,
            position=0,
            dynamic_ncols=True,
        )
        self.job = tqdm(
            total=0,
            desc="job",
            unit="it",
            file=sys.stderr,
            disable=not tty,
            position=1,
            leave=False,
            dynamic_ncols=True,
        )

    def start_job(self, label: str, total: int) -> None:
        self.job.reset(total=total)
        self.job.set_description(label[:40])

    def step(self, n: int) -> None:
        self.job.update(n - self.job.n)

    def job_done(self, label: str, status: str, count: int = 1) -> None:
        self.done += count
        self.overall.update(count)
        if not self.tty and not self.quiet:
            print(f"[{self.done}/{self.total}] {status}: {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.job.close()
        self.overall.close()


def _label(job: Job, error: str | None = None) -> str:
    """How a progress line names a finished job (every executor alike), with the reason when it failed."""
    return f"{job.pair.name} · {job.setting.label}" + (f" ({error})" if error else "")


def _runnable(jobs: list[Job]) -> list[str]:
    return [j.id for j in jobs]


def _claim(
    store: Store, jobs: list[Job], opts: RunOptions, groups_so_far: int
) -> list[tuple[str, list[str]]]:
    """The next group, with up to opts.batch - 1 batchable companions (same pair, same batch key), never
    more groups than opts.max_groups leaves."""
    limit = max(opts.batch, 1)
    if opts.max_groups is not None:
        limit = min(limit, opts.max_groups - groups_so_far)
    if limit < 1:
        return []
    if limit == 1:  # no batch: no companions to look for
        return store.claim_groups(_runnable(jobs), retry_failed=opts.retry_failed)
    from nstlab.batch import batch_key

    keys: dict[str, tuple[str, str] | None] = {}
    for job in jobs:
        key = batch_key(job.config)
        keys[job.group] = None if key is None else (job.pair.name, key)

    def compatible(first: str, other: str) -> bool:
        return keys.get(first) is not None and keys.get(first) == keys.get(other)

    return store.claim_groups(
        _runnable(jobs), retry_failed=opts.retry_failed, limit=limit, compatible=compatible
    )


def _run_local(study: Study, store: Store, jobs: list[Job], opts: RunOptions, bar: Progress | None) -> int:
    by_id = {j.id: j for j in jobs}
    groups = 0
    while opts.max_groups is None or groups < opts.max_groups:
        claims = _claim(store, jobs, opts, groups)
        if not claims:
            break
        ids = [i for _, group_ids in claims for i in group_ids]
        group_jobs = [by_id[i] for i in ids]
        tasks = [make_task(study, [by_id[i] for i in group_ids], opts.device) for _, group_ids in claims]
        longest = max(j.config.iterations for j in group_jobs)
        label = f"{group_jobs[0].pair.name} · {group_jobs[-1].setting.label}"
        if len(tasks) > 1:
            label = f"{group_jobs[0].pair.name} · batch of {len(tasks)}"
        last_beat = [time.monotonic()]

        def on_step(p: Any, ids: list[str] = ids, last_beat: list[float] = last_beat) -> None:
            if bar is not None:
                bar.step(p.evaluation)
            if time.monotonic() - last_beat[0] > HEARTBEAT_S:
                last_beat[0] = time.monotonic()
                store.heartbeat(ids)

        if bar is not None:
            bar.start_job(label, longest)
        try:
            outcomes = compute_batch(tasks, on_step)
        except KeyboardInterrupt:
            store.release(ids)
            raise
        for outcome in outcomes:
            persist(study, store, outcome, tasks[0].pair)
            if bar is not None:
                job = by_id[outcome.job_id]
                bar.job_done(_label(job, outcome.error), outcome.status)
        groups += len(tasks)
    return groups


def _pool_worker(study_path: str, smoke: bool, opts: RunOptions, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    study = load_study(study_path, smoke=smoke)
    store, jobs = sync_store(study)
    try:
        _run_local(study, store, jobs, opts, None)
    except KeyboardInterrupt:
        pass
    finally:
        store.close()


def _run_pool(study: Study, store: Store, jobs: list[Job], opts: RunOptions, bar: Progress | None) -> None:
    threads = max(1, (os.cpu_count() or 1) // opts.workers)
    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    procs = [
        ctx.Process(target=_pool_worker, args=(str(study.path), study.smoke, opts, threads))
        for _ in range(opts.workers)
    ]
    for p in procs:
        p.start()
    ids = _runnable(jobs)
    by_id = {j.id: j for j in jobs}

    def finished() -> dict[str, tuple[float, str, str | None]]:
        return {
            r["id"]: (r["finished"], r["status"], r["error"])
            for r in store.rows(ids)
            if r["status"] in ("done", "failed")
        }

    seen = finished()
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(0.5)
            now = finished()
            # A job is reported once it finishes (again, with --retry-failed): its label and how it ended.
            for job_id, (when, status, error) in now.items():
                if bar is not None and seen.get(job_id, (None, "", None))[0] != when:
                    bar.job_done(_label(by_id[job_id], error), status)
            seen = now
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)
        raise
    for p in procs:
        p.join()


def _check_weights(study: Study, jobs: Sequence[Job], device: str) -> None:
    """Load (or download) each pretrained extractor the jobs left to run use, once, now, and the metrics'
    judge if a metric needs it: a missing or broken weights file is one error up front (exit 2) instead of
    the same failure recorded for every job. The local runner then reuses the loaded extractor (nstlab.api
    caches it)."""
    from nstlab.api import get_extractor, resolve_device
    from nstlab.study.runner import _judge_weights, needs_judge

    seen = set()
    for job in jobs:
        cfg = job.config
        if cfg.weights != "random" and (cfg.extractor, cfg.weights) not in seen:
            seen.add((cfg.extractor, cfg.weights))
            get_extractor(cfg, resolve_device(device))
    judge = _judge_weights(study)
    if jobs and needs_judge(study) and judge != "random":
        from nstlab.metrics import make_judge

        try:
            make_judge(judge)
        except InputError as exc:  # WeightsError, ImageError, ...: all take just the message
            # The extractor's "ways out" name --weights and [base]; for the judge it is judge_weights.
            what = str(exc).split(" Ways out:")[0].rstrip(".")
            raise type(exc)(
                f"[metrics] judge (for the content/style metrics): {what}. Set [metrics] judge_weights to a "
                'VGG-19 weights file, or to "random" for tests only, or leave out the content and style '
                "metrics"
            ) from None


def _jobs_left(store: Store, jobs: Sequence[Job], retry_failed: bool) -> list[Job]:
    """The jobs this run could take: not those done, failed (unless retried) or held by a live runner."""
    left = set(store.claimable([j.id for j in jobs], retry_failed=retry_failed))
    return [j for j in jobs if j.id in left]


def _check_inputs(study: Study, jobs: Sequence[Job]) -> None:
    """Decode each input image of the pairs that still have jobs to run, once, now: a missing, truncated
    or unreadable file is one error up front (exit 2) naming the pair, instead of every job of that pair
    failing (possibly hours into a run, with Ray or a pool) and the rest of the study running on."""
    from nstlab.errors import ImageError
    from nstlab.images import load_image

    names = {job.pair.name for job in jobs}
    for pair in study.pairs:
        if pair.name in names:
            for role, path in (("content", pair.content), ("style", pair.style)):
                try:
                    load_image(path)
                except ImageError as exc:
                    raise ImageError(f"{study.path.name}: pair {pair.name}: {role} {exc}") from None


def _live_resources(nodes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The resources of each live node, from ``ray.nodes()``."""
    return [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]


def _node_fits(nodes: Sequence[dict[str, Any]], cpus: float, gpus: float) -> str | None:
    """None when some live node has ``cpus`` CPUs and ``gpus`` GPUs (Ray places a task on one node), else
    what the largest nodes have, for the error message."""
    alive = _live_resources(nodes)
    if any(float(r.get("CPU", 0)) >= cpus and float(r.get("GPU", 0)) >= gpus for r in alive):
        return None
    most_cpus = max((float(r.get("CPU", 0)) for r in alive), default=0.0)
    most_gpus = max((float(r.get("GPU", 0)) for r in alive), default=0.0)
    return f"{len(alive)} live node(s), the largest with {most_cpus:g} CPUs, {most_gpus:g} GPUs"


def _capacity(nodes: Sequence[dict[str, Any]], cpus: float, gpus: float) -> int:
    """How many jobs of ``cpus`` CPUs and ``gpus`` GPUs the live nodes hold at once: per node by the scarcer
    of the two (a request of 0 does not limit), summed. Not from the cluster's totals, which count a CPU
    on one node and a GPU on another as one job's worth."""
    total = 0
    for resources in _live_resources(nodes):
        limits = [
            int(float(resources.get(name, 0)) // need)
            for name, need in (("CPU", cpus), ("GPU", gpus))
            if need
        ]
        total += min(limits) if limits else 0
    return total


def _started_in_process(ray: Any) -> bool:
    """Whether this process started the Ray it is connected to (``ray.init()`` without an address, or with
    ``address="local"``, here or by the caller): such a cluster has no autoscaler, and gains nodes only if
    someone joins one by hand (``ray start --address``).
    Ray has no public way to ask; its driver's node object is the head when it started the cluster."""
    try:
        node = ray._private.worker._global_node
    except AttributeError:  # another Ray version's layout: assume a cluster that may grow
        return False
    return bool(getattr(node, "head", False))


def _remote_compute(tasks: list[GroupTask]) -> list[Any]:
    return compute_batch(tasks)


def _run_ray(study: Study, store: Store, jobs: list[Job], opts: RunOptions, bar: Progress | None) -> None:
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'nstlab[ray]'") from None
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    started_here = not ray.is_initialized()
    if started_here:
        if opts.address:
            try:
                ray.init(address=opts.address, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise DeviceError(
                    f"cannot connect to the Ray cluster at {opts.address} ({first}); pass the address "
                    "(host:port) of a running `ray start --head`, or leave --address out for a local Ray"
                ) from None
        else:
            # A private local Ray on the loopback interface only.
            ray.init(
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                log_to_driver=False,
                _node_ip_address="127.0.0.1",
            )
    # Ray queues a task whose request no node can meet, forever and silently: check the nodes first.
    fits = _node_fits(ray.nodes(), opts.cpus_per_job, opts.gpus_per_job)  # type: ignore[no-untyped-call]
    # A Ray started in this process (by this run or the caller) never gains nodes: waiting would be forever.
    own_local = (started_here and opts.address in (None, "", "local")) or _started_in_process(ray)
    if fits is not None and (own_local or not opts.wait_for_resources):
        if started_here:
            ray.shutdown()
        way_out = (
            "" if own_local else ", or pass --wait-for-resources if the cluster adds such nodes (autoscaling)"
        )
        raise DeviceError(
            f"no node of the Ray cluster can take a job of {opts.cpus_per_job:g} CPUs and "
            f"{opts.gpus_per_job:g} GPUs ({fits}): no job could ever start; lower --cpus-per-job/"
            f"--gpus-per-job{way_out}"
        )
    if fits is not None:
        print(
            f"nstlab: waiting for the Ray cluster to add a node with {opts.cpus_per_job:g} CPUs and "
            f"{opts.gpus_per_job:g} GPUs ({fits}); Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
    remote = ray.remote(num_cpus=opts.cpus_per_job, num_gpus=opts.gpus_per_job)(_remote_compute)
    device = opts.device if opts.device != "auto" else ("cuda" if opts.gpus_per_job > 0 else "cpu")
    by_id = {j.id: j for j in jobs}
    in_flight: dict[Any, tuple[str, list[str]]] = {}

    def capacity() -> int:
        # Re-read every pass: a cluster grows and shrinks. With --wait-for-resources twice what fits now
        # (at least 2), so that an autoscaler sees the demand for more nodes.
        fit = _capacity(ray.nodes(), opts.cpus_per_job, opts.gpus_per_job)  # type: ignore[no-untyped-call]
        return max(2, 2 * fit) if opts.wait_for_resources and not own_local else max(1, fit)

    groups, last_beat = 0, time.monotonic()
    try:
        while True:
            room = capacity()  # once a pass: ray.nodes() asks the cluster's control store
            while len(in_flight) < room and (opts.max_groups is None or groups < opts.max_groups):
                claims = _claim(store, jobs, opts, groups)
                if not claims:
                    break
                tasks = [make_task(study, [by_id[i] for i in group_ids], device) for _, group_ids in claims]
                ids = [i for _, group_ids in claims for i in group_ids]
                in_flight[remote.remote(tasks)] = (tasks[0].pair, ids)
                groups += len(tasks)
            if not in_flight:
                break
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=HEARTBEAT_S)
            for ref in ready:
                pair, ids = in_flight.pop(ref)
                try:
                    outcomes = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a task that died (worker lost, OOM-killed)
                    from nstlab.study.runner import Outcome

                    msg = " ".join(str(exc).split())[:300]
                    outcomes = [Outcome(i, "failed", error=f"ray task failed: {msg}") for i in ids]
                for outcome in outcomes:
                    persist(study, store, outcome, pair)
                    if bar is not None:
                        job = by_id[outcome.job_id]
                        bar.job_done(_label(job, outcome.error), outcome.status)
            if time.monotonic() - last_beat > HEARTBEAT_S and in_flight:
                last_beat = time.monotonic()
                store.heartbeat([i for _, ids in in_flight.values() for i in ids])
    except KeyboardInterrupt:
        store.release([i for _, ids in in_flight.values() for i in ids])
        raise
    finally:
        if started_here:
            ray.shutdown()  # only our own Ray; never `ray stop`, which kills every Ray on the machine


def run_study(study: Study, opts: RunOptions | None = None, *, quiet: bool = False) -> dict[str, int]:
    """Run what is not done yet; returns the final status counts."""
    opts = opts or RunOptions()
    if opts.executor not in EXECUTORS:
        from nstlab.errors import choice_error

        raise choice_error("executor", opts.executor, EXECUTORS)
    for flag, value in (("workers", opts.workers), ("batch", opts.batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{flag} must be an integer >= 1, got {value!r}")
    resource: tuple[tuple[str, object, bool], ...] = (
        ("cpus-per-job", opts.cpus_per_job, True),  # Ray accepts 0 (e.g. GPU-bound jobs)
        ("gpus-per-job", opts.gpus_per_job, True),
    )
    for flag, amount, zero_ok in resource:
        number = isinstance(amount, int | float) and not isinstance(amount, bool) and math.isfinite(amount)
        if not number or not isinstance(amount, int | float) or amount < 0 or (amount == 0 and not zero_ok):
            raise ConfigError(f"--{flag} must be a number {'>=' if zero_ok else '>'} 0, got {amount!r}")
    if opts.executor == "ray" and opts.cpus_per_job == 0 and opts.gpus_per_job == 0:
        raise ConfigError(
            "--cpus-per-job and --gpus-per-job cannot both be 0: nothing would limit how many jobs run at "
            "once"
        )
    if not isinstance(opts.device, str):
        raise ConfigError(f"--device must be a string such as cpu or cuda, got {opts.device!r}")
    if opts.executor != "ray":  # a Ray cluster's devices are its workers', not this machine's
        from nstlab.api import resolve_device

        resolve_device(opts.device)  # DeviceError now, not a failure in every job
    store, jobs = sync_store(study)
    ids = _runnable(jobs)
    counts = store.counts(ids)
    bar = Progress(len(ids), counts["done"] + (0 if opts.retry_failed else counts["failed"]), quiet)
    left = counts["pending"] + counts["running"] + (counts["failed"] if opts.retry_failed else 0)
    try:
        todo = _jobs_left(store, jobs, opts.retry_failed) if left else []
        _check_inputs(study, todo)
        if todo and opts.executor != "ray":  # a Ray worker has its own weights cache
            _check_weights(study, todo, opts.device)
            if opts.executor == "pool" or opts.workers > 1:
                from nstlab.api import _cached_extractor

                _cached_extractor.cache_clear()  # the workers load their own; the driver need not hold one
        if not left:
            pass  # nothing to run: no Ray to start, no workers to spawn
        elif opts.executor == "ray":
            _run_ray(study, store, jobs, opts, bar)
        elif opts.executor == "pool" or opts.workers > 1:
            _run_pool(study, store, jobs, opts, bar)
        else:
            _run_local(study, store, jobs, opts, bar)
    finally:
        bar.close()
        counts = store.counts(ids)
        store.close()
    return counts
