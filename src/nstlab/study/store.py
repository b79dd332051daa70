"""The study's records: one SQLite database (WAL mode) in the study folder, one row per job.

Concurrency: a job is claimed inside ``BEGIN IMMEDIATE`` (one writer at a time), so two runners on the same
study never take the same job. A runner that dies leaves its jobs 'running'; they are reclaimed when the
owning process is gone (same host) or its heartbeat is older than ``STALE_AFTER_S`` (other hosts).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nstlab.study.spec import Job

STALE_AFTER_S = 15 * 60
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    grp TEXT NOT NULL,
    pair TEXT NOT NULL,
    setting TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',   -- pending | running | done | failed
    error TEXT,
    metrics TEXT,
    reference TEXT,
    output TEXT,
    record TEXT,
    wall_time_s REAL,
    evaluations INTEGER,
    peak_memory_bytes INTEGER,
    worker TEXT,
    heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
STATUSES = ("pending", "running", "done", "failed")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another host: only the heartbeat can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claimable(row: Any, me: str, now: float, retry_failed: bool) -> bool:
    """Pending (or failed, when retrying) jobs, and running ones whose runner is gone or silent."""
    if row["status"] == "running" and row["worker"] != me:
        return not _alive(row["worker"]) or (now - (row["heartbeat"] or 0)) > STALE_AFTER_S
    return bool(row["status"] == "pending" or (retry_failed and row["status"] == "failed"))


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; timeout: wait for the other writer.
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def sync(self, jobs: Sequence[Job], meta: dict[str, Any]) -> None:
        """Insert the study's jobs that the store does not have yet (existing rows are kept as they are)."""
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO jobs (id, grp, pair, setting, config) VALUES (?, ?, ?, ?, ?)",
                [(j.id, j.group, j.pair.name, j.setting.label, json.dumps(j.config.to_dict())) for j in jobs],
            )
            for key, value in meta.items():
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def claim_group(self, ids: Sequence[str], *, retry_failed: bool = False) -> tuple[str, list[str]] | None:
        """Atomically claim the next runnable group among ``ids``: returns (group, job ids) or None."""
        claimed = self.claim_groups(ids, retry_failed=retry_failed)
        return claimed[0] if claimed else None

    def claim_groups(
        self,
        ids: Sequence[str],
        *,
        retry_failed: bool = False,
        limit: int = 1,
        compatible: Callable[[str, str], bool] | None = None,
    ) -> list[tuple[str, list[str]]]:
        """Atomically claim the next runnable group and up to ``limit - 1`` more runnable groups that are
        ``compatible(first, other)`` (a batch); returns [(group, job ids)], empty when nothing is left."""
        me, now = worker_id(), time.time()
        wanted = set(ids)
        with self.transaction() as db:
            rows = db.execute("SELECT id, grp, status, worker, heartbeat FROM jobs").fetchall()
            runnable: dict[str, list[str]] = {}
            for r in rows:
                if r["id"] in wanted and _claimable(r, me, now, retry_failed):
                    runnable.setdefault(r["grp"], []).append(r["id"])
            if not runnable:
                return []
            first = next(iter(runnable))  # study order: the store lists rows in insertion order
            groups = [first]
            for group in runnable:
                if len(groups) >= limit:
                    break
                if group != first and compatible is not None and compatible(first, group):
                    groups.append(group)
            job_ids = [i for g in groups for i in runnable[g]]
            db.executemany(
                "UPDATE jobs SET status='running', worker=?, heartbeat=?, started=?, attempts=attempts+1, "
                "error=NULL WHERE id=?",
                [(me, now, now, i) for i in job_ids],
            )
            return [(g, runnable[g]) for g in groups]

    def claimable(self, ids: Sequence[str], *, retry_failed: bool = False) -> list[str]:
        """The jobs among ``ids`` this runner could claim now (what claim_groups would take, in time)."""
        me, now, wanted = worker_id(), time.time(), set(ids)
        rows = self.db.execute("SELECT id, status, worker, heartbeat FROM jobs").fetchall()
        return [r["id"] for r in rows if r["id"] in wanted and _claimable(r, me, now, retry_failed)]

    def heartbeat(self, ids: Sequence[str]) -> None:
        with self.transaction() as db:
            db.executemany("UPDATE jobs SET heartbeat=? WHERE id=?", [(time.time(), i) for i in ids])

    def finish(self, job_id: str, **values: Any) -> None:
        cols = {k: (json.dumps(v) if isinstance(v, dict | list) else v) for k, v in values.items()}
        cols.setdefault("finished", time.time())
        with self.transaction() as db:
            db.execute(
                f"UPDATE jobs SET {', '.join(f'{k}=?' for k in cols)} WHERE id=?", [*cols.values(), job_id]
            )

    def release(self, ids: Sequence[str]) -> None:
        """Give claimed jobs back (Ctrl-C): they become pending again."""
        with self.transaction() as db:
            db.executemany(
                "UPDATE jobs SET status='pending', worker=NULL, attempts=MAX(attempts-1, 0) WHERE id=? "
                "AND status='running'",
                [(i,) for i in ids],
            )

    def rows(self, ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        out = []
        for r in self.db.execute("SELECT * FROM jobs ORDER BY pair, setting").fetchall():
            if ids is not None and r["id"] not in ids:
                continue
            row = dict(r)
            for key in ("config", "metrics", "reference"):
                row[key] = json.loads(row[key]) if row[key] else None
            out.append(row)
        return out

    def counts(self, ids: Sequence[str]) -> dict[str, int]:
        wanted = set(ids)
        counts = dict.fromkeys(STATUSES, 0)
        for r in self.db.execute("SELECT id, status, worker FROM jobs").fetchall():
            if r["id"] in wanted:
                status = r["status"]
                if status == "running" and not _alive(r["worker"] or ""):
                    status = "pending"  # its runner is gone: it will be picked up again
                counts[status] += 1
        return counts

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta").fetchall()}

    def integrity(self) -> str:
        return str(self.db.execute("PRAGMA integrity_check").fetchone()[0])
