"""Running a study: claim groups of jobs from the store, compute them, persist the outcomes.

One *group* is the set of jobs that differ only in their iteration count: it runs once, at the largest
count, recording a snapshot at every requested count (the engine guarantees the image after k evaluations
of a long run equals a k-evaluation run's result; tests check it). Computation (:func:`compute_group`) is a
pure function of a serialisable :class:`GroupTask` that returns PNG bytes and records, so the same code runs
in this process, in a process pool, or as a Ray task on another host; only the driver writes the store and
the files.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nstlab.errors import ConfigError, NstlabError, ResourceError
from nstlab.images import save_image, write_text_atomic
from nstlab.study.spec import Job, Study, maker_name, reference_options
from nstlab.study.store import Store


@dataclass
class GroupTask:
    """Everything a worker needs, as plain data (it may run on another machine)."""

    pair: str
    content_name: str
    content_bytes: bytes
    style_name: str
    style_bytes: bytes
    jobs: list[tuple[str, dict[str, Any]]]  # (job id, resolved config dict), same group
    reference: dict[str, Any]
    metrics: list[str]
    judge_weights: str
    device: str
    # Where the driver read the pair: the worker computes from temporary copies of the bytes, and the
    # records must name the study's own files instead (same sha256).
    content_source: str = ""
    style_source: str = ""


@dataclass
class Outcome:
    job_id: str
    status: str  # done | failed
    error: str | None = None
    image_png: bytes | None = None
    record: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    reference_info: dict[str, Any] | None = None
    reference_png: bytes | None = None
    wall_time_s: float | None = None
    evaluations: int | None = None
    peak_memory_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_task(study: Study, jobs: Sequence[Job], device: str) -> GroupTask:
    pair = jobs[0].pair
    return GroupTask(
        pair=pair.name,
        content_name=pair.content.name,
        content_bytes=pair.content.read_bytes(),
        style_name=pair.style.name,
        style_bytes=pair.style.read_bytes(),
        jobs=[(j.id, j.config.to_dict()) for j in jobs],
        reference=dict(study.reference),
        metrics=list(study.metrics),
        judge_weights=_judge_weights(study),
        device=device,
        content_source=str(pair.content),
        style_source=str(pair.style),
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, NstlabError) else text


def _png(image: Any) -> bytes:
    from nstlab.images import to_pil

    buf = io.BytesIO()
    (image if hasattr(image, "save") else to_pil(image)).save(buf, format="PNG")
    return buf.getvalue()


def compute_group(task: GroupTask, on_step: Callable[[Any], None] | None = None) -> list[Outcome]:
    """Stylise once at the group's largest iteration count; score every requested count. Never raises
    for a job's own failure (NaN, out of memory, bad input): that job's outcome says 'failed' and why."""
    from nstlab.api import stylize

    by_iter, longest = _plan(task)
    with _inputs(task) as (content, style):
        try:
            result = stylize(
                content,
                style,
                longest,
                on_step=on_step,
                snapshot_at=[cfg["iterations"] for _, cfg in by_iter],
            )
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - a job's failure is data, recorded with its reason
            return _named(task, content, style, _failed(by_iter, exc))
        outcomes = _score_group(
            task, result, content, style, by_iter, longest, _reference(task, content, style)
        )
        return _named(task, content, style, outcomes)


def _named(task: GroupTask, content: Path, style: Path, outcomes: list[Outcome]) -> list[Outcome]:
    """Errors name the study's own input files, not the worker's temporary copies (gone once the group is
    done). Records get the same through their inputs (``_score_group``, ``_reference``)."""
    swaps = [(str(content), task.content_source), (str(style), task.style_source)]
    swaps = [(tmp, real) for tmp, real in swaps if real]

    def fix(text: str) -> str:
        for tmp, real in swaps:
            text = text.replace(tmp, real)
        return text

    for o in outcomes:
        if o.error:
            o.error = fix(o.error)
    return outcomes


def compute_batch(tasks: Sequence[GroupTask], on_step: Callable[[Any], None] | None = None) -> list[Outcome]:
    """Several groups of one pair whose longest configs share a batch key (see nstlab.batch)
    in one batched run, then scored exactly as compute_group scores each: the same outcomes up to float
    rounding. One reference serves them all."""
    from nstlab.api import stylize_batch

    if len(tasks) == 1:
        return compute_group(tasks[0], on_step)
    plans = [_plan(t) for t in tasks]
    with _inputs(tasks[0]) as (content, style):
        try:
            results = stylize_batch(
                content,
                style,
                [longest for _, longest in plans],
                snapshot_at=[[cfg["iterations"] for _, cfg in by_iter] for by_iter, _ in plans],
                on_step=on_step,  # progress and, in the local runner, the claim's heartbeat
            )
        except KeyboardInterrupt:
            raise
        except ResourceError:
            # The members' L-BFGS states do not fit side by side, though each fits alone: run the groups
            # one after another instead of failing them.
            return [o for task in tasks for o in compute_group(task, on_step)]
        except Exception as exc:  # noqa: BLE001
            return _named(
                tasks[0], content, style, [o for by_iter, _ in plans for o in _failed(by_iter, exc)]
            )
        reference = _reference(tasks[0], content, style)
        outcomes: list[Outcome] = []
        for task, (by_iter, longest), result in zip(tasks, plans, results, strict=True):
            if isinstance(result, Exception):
                outcomes += _failed(by_iter, result)
            else:
                outcomes += _score_group(task, result, content, style, by_iter, longest, reference)
        return _named(tasks[0], content, style, outcomes)


def _plan(task: GroupTask) -> tuple[list[tuple[str, dict[str, Any]]], Any]:
    from nstlab.config import StylizeConfig

    by_iter = sorted(task.jobs, key=lambda j: j[1]["iterations"])
    return by_iter, StylizeConfig.from_dict({**by_iter[-1][1], "device": task.device})


@contextlib.contextmanager
def _inputs(task: GroupTask) -> Iterator[tuple[Path, Path]]:
    """The task's image bytes as files in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="nstlab-job-") as tmp:
        content, style = Path(tmp) / task.content_name, Path(tmp) / task.style_name
        if content == style:
            style = Path(tmp) / f"style-{task.style_name}"
        content.write_bytes(task.content_bytes)
        style.write_bytes(task.style_bytes)
        yield content, style


def _failed(by_iter: Sequence[tuple[str, dict[str, Any]]], exc: BaseException) -> list[Outcome]:
    partial = getattr(exc, "result", None)
    reason = _one_line(exc)
    return [
        Outcome(
            job_id,
            "failed",
            error=reason,
            evaluations=partial.engine.evaluations if partial is not None else None,
        )
        for job_id, _ in by_iter
    ]


_Reference = tuple[Any, dict[str, Any] | None, bytes | None, str | None]


def _reference(task: GroupTask, content: Path, style: Path) -> _Reference:
    """(image, info, PNG bytes, error): the pair's pseudo ground truth, or why there is none."""
    from nstlab.reference import make_reference

    try:
        ref = make_reference(
            content,
            style,
            task.reference.get("maker", "auto"),
            options=reference_options(task.reference),
            pair_name=task.pair,
        )
        info = json.loads(json.dumps(ref.info))
        # The study's own files, not this worker's temporary copies (nor, for a cached reference, the copies
        # of whichever run made it first): same bytes, same sha256.
        for role, source in (("content", task.content_source), ("style", task.style_source)):
            entry = info.get("inputs", {}).get(role)
            if source and isinstance(entry, dict):
                entry["source"] = source
        return ref.image, info, _png(ref.image), None
    except Exception as exc:  # noqa: BLE001
        return None, None, None, f"reference: {_one_line(exc)}"


def _score_group(
    task: GroupTask,
    result: Any,
    content: Path,
    style: Path,
    by_iter: Sequence[tuple[str, dict[str, Any]]],
    longest: Any,
    reference: _Reference,
) -> list[Outcome]:
    """One outcome per job of the group: its snapshot of ``result``, scored against the reference."""
    from PIL import Image

    from nstlab.images import load_image, resize_to, to_tensor
    from nstlab.metrics import evaluate_pair, make_judge
    from nstlab.reference import align_to_output

    ref_img, ref_info, ref_png, ref_error = reference
    judge = None
    if {"content", "style"} & set(task.metrics) and ref_error is None:
        try:
            judge = make_judge(task.judge_weights)
        except Exception as exc:  # noqa: BLE001
            ref_error = f"judge: {_one_line(exc)}"
    sources = {"content": task.content_source, "style": task.style_source}
    inputs = {
        role: {**entry, "source": sources.get(role) or entry.get("source")}
        for role, entry in result.record["inputs"].items()
    }
    outcomes = []
    for job_id, cfg in by_iter:
        k = cfg["iterations"]
        image = result.engine.snapshots.get(k, result.image)
        record = dict(result.record)
        record["config"] = {**record["config"], "iterations": k}
        record["trace"] = result.trace[:k]
        record["final_losses"] = result.trace[k - 1] if len(result.trace) >= k else None
        record["run"] = {**record["run"], "evaluations": min(k, result.engine.evaluations)}
        record["inputs"] = inputs
        if k != longest.iterations:
            record["snapshot_of"] = {"iterations": longest.iterations, "job": by_iter[-1][0]}
        if ref_error is not None or ref_img is None:
            outcomes.append(
                Outcome(
                    job_id, "failed", error=ref_error, image_png=_png(image), record=record, evaluations=k
                )
            )
            continue
        try:
            out_pil = Image.open(io.BytesIO(_png(image)))
            aligned = align_to_output(ref_img, out_pil.size)
            want = set(task.metrics)
            # The content distance compares like with like: the content image at the output's size (the
            # output is the content resized to the config's size), as `nstlab evaluate` does.
            row = evaluate_pair(
                to_tensor(out_pil),  # the 8-bit image that is saved, so `nstlab evaluate` of it agrees
                aligned,
                content=resize_to(load_image(content), out_pil.size) if "content" in want else None,
                style=load_image(style) if "style" in want else None,
                judge=judge,
                lpips_net="alex" if "lpips" in want else None,
            )
            metrics: dict[str, Any] | None = {k2: v for k2, v in row.items() if v is not None}
            status, error = "done", None
        except Exception as exc:  # noqa: BLE001
            metrics, status, error = None, "failed", f"metrics: {_one_line(exc)}"
        outcomes.append(
            Outcome(
                job_id,
                status,
                error=error,
                image_png=_png(image),
                record=record,
                metrics=metrics,
                reference_info=ref_info,
                reference_png=ref_png,
                wall_time_s=result.engine.wall_time_s * k / max(result.engine.evaluations, 1),
                evaluations=k,
                peak_memory_bytes=result.record["run"]["peak_memory_bytes"],
            )
        )
    return outcomes


def persist(study: Study, store: Store, outcome: Outcome, pair: str) -> None:
    """Write an outcome's files (atomically) and its row. Only the driver calls this."""
    values: dict[str, Any] = {
        "status": outcome.status,
        "error": outcome.error,
        "evaluations": outcome.evaluations,
        "wall_time_s": outcome.wall_time_s,
        "peak_memory_bytes": outcome.peak_memory_bytes,
    }
    if outcome.image_png is not None:
        out = study.folder / "images" / pair / f"{outcome.job_id}.png"
        from PIL import Image

        save_image(Image.open(io.BytesIO(outcome.image_png)), out)
        values["output"] = str(out.relative_to(study.folder))
        if outcome.record is not None:
            rec = out.with_suffix(".json")
            write_text_atomic(rec, json.dumps({**outcome.record, "output": str(out)}, indent=1) + "\n")
            values["record"] = str(rec.relative_to(study.folder))
    if outcome.reference_png is not None and outcome.reference_info is not None:
        ref = study.folder / "references" / f"{pair}.png"
        if not ref.exists():
            from PIL import Image

            save_image(Image.open(io.BytesIO(outcome.reference_png)), ref)
            write_text_atomic(ref.with_suffix(".json"), json.dumps(outcome.reference_info, indent=1) + "\n")
        values["reference"] = {
            "path": str(ref.relative_to(study.folder)),
            "maker": outcome.reference_info.get("maker"),
            "label": outcome.reference_info.get("label"),
        }
    if outcome.metrics is not None:
        values["metrics"] = outcome.metrics
    store.finish(outcome.job_id, **values)


def store_path(study: Study) -> Path:
    return study.folder / "study.sqlite"


JUDGE_METRICS = ("content", "style")  # the metrics that run the VGG-19 judge


def _judge_written(study: Study) -> str:
    return "random" if study.smoke else str(study.raw.get("metrics", {}).get("judge_weights", "torchvision"))


def _judge_weights(study: Study) -> str:
    """The judge's weights: torchvision, random, or a file path relative to the study file (as pairs are)."""
    written = _judge_written(study)
    if written in ("torchvision", "random"):
        return written
    return str((study.path.parent / Path(written).expanduser()).resolve())


def needs_judge(study: Study) -> bool:
    return bool(set(JUDGE_METRICS) & set(study.metrics))


def scoring(study: Study) -> dict[str, Any]:
    """What a job's scores depend on besides its output: the reference settings, the metrics and the judge.
    They are not part of a job's id (the stylisation does not depend on them), so the store remembers them.

    Paths are kept as the study file writes them (relative to it, usually), so a study folder that moves or
    is mounted elsewhere is still the same study (see :func:`_scoring_view` for what is compared)."""
    reference = dict(study.reference)
    written = study.raw.get("reference", {})
    if isinstance(written, dict):
        for key in ("adain_weights", "reference_dir"):
            if key in reference and isinstance(written.get(key), str):
                reference[key] = written[key]
    return {"reference": reference, "metrics": list(study.metrics), "judge": _judge_written(study)}


# [reference] paths matter only to the makers that read them.
_PATH_USERS = {"adain_weights": ("auto", "adain"), "reference_dir": ("folder",)}


def _reference_defaults() -> dict[str, Any]:
    """ReferenceOptions' defaults of the options that are not paths (the maker's default: "auto")."""
    from nstlab.reference import ReferenceOptions

    defaults = {f.name: f.default for f in fields(ReferenceOptions) if f.name not in _PATH_USERS}
    return {"maker": "auto", **defaults}


def _scoring_view(recorded: dict[str, Any], resolve_from: Path | None = None) -> dict[str, Any]:
    """The part of a scoring record the scores depend on: a [reference] path only for a maker that reads it,
    the judge only when a metric runs it. ``resolve_from`` makes relative paths absolute against that
    folder, as stores written before 2026-11-28 recorded them."""
    # Spellings that score alike compare alike: an option left out or given at its default, "Auto" and
    # "auto", "./w" and "w", the metrics in another order.
    written = recorded.get("reference") or {}
    reference = {**_reference_defaults(), **(written if isinstance(written, dict) else {"?": written})}
    maker = reference["maker"] = maker_name(reference)
    for key, makers in _PATH_USERS.items():
        value = reference.pop(key, None)
        if maker in makers and value:
            if isinstance(value, str):
                # Path drops "./" and a trailing "/" but keeps "..": a/link/.. is not a when link is a
                # symlink, and the study resolves paths through the file system.
                value = Path(value).expanduser()
                value = str((resolve_from / value).resolve() if resolve_from is not None else value)
            reference[key] = value
    written_metrics = recorded.get("metrics") or []
    metrics = (
        sorted(map(str, written_metrics)) if isinstance(written_metrics, list) else [str(written_metrics)]
    )
    view: dict[str, Any] = {"reference": reference, "metrics": metrics}
    if set(JUDGE_METRICS) & set(metrics):
        view["judge"] = recorded.get("judge")
    return view


def _check_scoring(study: Study, store: Store) -> None:
    """Refuse to add results scored one way to results scored another: an edited [reference] or [metrics]
    table would otherwise leave every finished job's scores as they were, silently."""
    meta = store.meta()
    before = meta.get("scoring")
    if before is None:
        return
    now = json.loads(json.dumps(scoring(study)))  # as stored: JSON types
    old = _scoring_view(before)
    # The current settings as written, and resolved against this folder and against the folder the store's
    # study file was in (an old store, absolute paths, possibly before the folder moved).
    folders = [None, study.path.parent] + (
        [Path(meta["study_file"]).parent] if isinstance(meta.get("study_file"), str) else []
    )
    candidates = [_scoring_view(now, folder) for folder in folders]
    if old in candidates:
        return
    done = sum(r["status"] == "done" for r in store.rows())  # failed jobs hold no scores to protect
    if not done:
        return
    changed = [
        k for k in ("reference", "metrics", "judge") if all(old.get(k) != c.get(k) for c in candidates)
    ]
    was = "; ".join(f"{k} was {json.dumps(old.get(k), sort_keys=True)}" for k in changed)
    raise ConfigError(
        f"{study.path}: the {' and '.join(changed)} settings changed since {done} job(s) were scored "
        f"({was}); their stored scores would not match. Restore the old settings, or give the study another "
        f'output = "..." folder (or remove {study.folder}) to run it afresh'
    )


def sync_store(study: Study) -> tuple[Store, list[Job]]:
    store = Store(store_path(study))
    try:
        _check_scoring(study, store)
    except ConfigError:
        store.close()
        raise
    jobs = study.jobs()
    store.sync(
        jobs,
        {
            "name": study.name,
            "study_file": str(study.path),
            "smoke": study.smoke,
            "axes": list(study.axes),
            "study": study.raw,
            "scoring": scoring(study),
        },
    )
    return store, jobs
