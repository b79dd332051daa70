"""Ablation studies: TOML study files, resumable job grids in SQLite, local / pool / Ray executors."""

from nstlab.study.executors import EXECUTORS, RunOptions, run_study
from nstlab.study.runner import compute_group, store_path, sync_store
from nstlab.study.spec import Job, Pair, Setting, Study, identity, load_study
from nstlab.study.store import Store

__all__ = [
    "EXECUTORS",
    "Job",
    "Pair",
    "RunOptions",
    "Setting",
    "Store",
    "Study",
    "compute_group",
    "identity",
    "load_study",
    "run_study",
    "store_path",
    "sync_store",
]
