"""Optional MLflow logging (``nstlab report --mlflow URI``): one MLflow run per finished or failed job.

Experiment: the study's name (``<name> (smoke)`` for a smoke study). Each run has the job's pair, setting
label and the setting's fields as params; its metrics (plus evaluations, wall time, peak memory) as metrics;
the output image and its JSON record as artifacts; tags ``nstlab.job_id``, ``nstlab.status``,
``nstlab.random_weights`` and, for a failed job, ``nstlab.error`` (the run ends as FAILED). A job already
logged with the same status (found by its ``nstlab.job_id`` tag) is skipped, so the report can be made again
without duplicating runs. Pending jobs are not logged.
"""

from __future__ import annotations

import math
import time
from typing import Any

from nstlab.errors import ConfigError, NstlabError
from nstlab.report.data import ReportData

INSTALL_HINT = "--mlflow needs MLflow, which is not installed: pip install 'nstlab[mlflow]'"


def _param(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "+".join(map(str, value))
    return str(value)


def experiment_name(data: ReportData) -> str:
    return data.study.name + (" (smoke)" if data.study.smoke else "")


def log_to_mlflow(data: ReportData, tracking_uri: str) -> int:
    """Log the study's finished/failed jobs; returns how many runs were created."""
    try:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        name = experiment_name(data)
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        logged = 0
        for j in data.jobs:
            if j.status not in ("done", "failed"):
                continue
            existing = client.search_runs(
                [exp_id], filter_string=f"tags.`nstlab.job_id` = '{j.job.id}'", max_results=50
            )
            if any(r.data.tags.get("nstlab.status") == j.status for r in existing):
                continue
            tags = {
                "nstlab.job_id": j.job.id,
                "nstlab.study": data.study.name,
                "nstlab.status": j.status,
                "nstlab.random_weights": str(j.random_weights).lower(),
                "nstlab.smoke": str(data.study.smoke).lower(),
            }
            if j.status == "failed":
                tags["nstlab.error"] = j.error[:4000]
            run = client.create_run(exp_id, run_name=f"{j.job.pair.name} · {j.job.setting.label}", tags=tags)
            run_id = run.info.run_id
            params = {"pair": j.job.pair.name, "setting": j.job.setting.label}
            params.update({k: _param(v) for k, v in j.job.setting.values.items()})
            now = int(time.time() * 1000)
            values: dict[str, float] = {
                k: float(v)
                for k, v in j.metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
            }
            for key in ("evaluations", "wall_time_s", "peak_memory_bytes"):
                v = (j.row or {}).get(key)
                if isinstance(v, int | float) and math.isfinite(float(v)):
                    values[key] = float(v)
            client.log_batch(
                run_id,
                metrics=[Metric(k, v, now, 0) for k, v in values.items()],
                params=[Param(k, v) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )
            for key in ("output", "record"):
                rel = (j.row or {}).get(key)
                if rel and (data.study.folder / str(rel)).is_file():
                    client.log_artifact(run_id, str(data.study.folder / str(rel)))
            client.set_terminated(run_id, status="FINISHED" if j.status == "done" else "FAILED")
            logged += 1
    except NstlabError:
        raise
    except Exception as exc:  # noqa: BLE001 - any MLflow failure becomes one line for the CLI
        text = " ".join(str(exc).split())
        raise NstlabError(f"MLflow logging to {tracking_uri} failed: {text[:400]}") from None
    return logged
