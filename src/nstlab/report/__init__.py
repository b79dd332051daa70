"""Study reports: tables (Markdown, CSV, LaTeX), figures (PNG + SVG), a self-contained HTML page and,
optionally, MLflow runs. See docs/report.md.

>>> from nstlab.study import load_study
>>> from nstlab.report import build_report
>>> build_report(load_study("studies/optimizers.toml"))          # doctest: +SKIP
PosixPath('.../optimizers/report')
"""

from nstlab.report.build import FORMATS, build_report, default_out_dir, parse_formats, write_report
from nstlab.report.data import METRICS, ReportData, collect, metric_key
from nstlab.report.mlflow_log import log_to_mlflow

__all__ = [
    "FORMATS",
    "METRICS",
    "ReportData",
    "build_report",
    "collect",
    "default_out_dir",
    "log_to_mlflow",
    "metric_key",
    "parse_formats",
    "write_report",
]
