"""An in-memory state store: the interface and the rules of :mod:`bot.state.base`, kept in dicts.

Like procrastinate's ``InMemoryConnector``, it ships with the interface so that the runner's and the watcher's
unit tests need no database file. It implements :class:`bot.state.base.StateStore` with the same semantics, which
``tests/integration/test_store_contract.py`` checks against the SQL store case by case:

- every status move is the interface's compare-and-set (:class:`bot.state.base.Move`: against
  :data:`bot.model.jobstate.TRANSITIONS` and the holding worker), under one lock, so two threads never claim the
  same job;
- one job per dedup key (default ``repo@revision``); a ``repo@sha`` is one decision;
- a write is one transaction: it works on a copy of the tables that replaces them only when it succeeds;
- values come back as the database gives them: times as floats, JSON columns as fresh copies.

It lives only as long as the process; nothing is shared between processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from bot.model import jobstate as J
from bot.state.base import (
    MANUAL_SKIP_REASON,
    Job,
    ModelRow,
    Move,
    SourceRow,
    StateStore,
    decision_values,
    dedup_key_of,
    manual_skip_values,
    mark_duplicate,
    model_values,
    new_model_values,
    poll_values,
    queued_message,
    start_move,
    worker_rows,
)
from converters.core.errors import StateError

# columns the SQL tables declare as Float / JSON: the memory store hands them back the same way
_JOB_FLOATS = ("created_at", "updated_at", "started_at", "finished_at", "not_before", "heartbeat_at")
_JOB_JSON = ("fingerprint", "result")
_JOB_FIELDS = frozenset(f.name for f in dataclasses.fields(Job))


def _json_copy(value: Any) -> Any:
    """What a JSON column gives back: a fresh copy, tuples as lists (and a TypeError for what is not JSON)."""
    return None if value is None else json.loads(json.dumps(value))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _like(pattern: str) -> re.Pattern[str]:
    """SQL ``LIKE`` as a regular expression (``%`` any run, ``_`` one character)."""
    parts = [".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in pattern]
    return re.compile("".join(parts), re.S)


@dataclasses.dataclass
class _Tables:
    sources: dict[str, SourceRow] = dataclasses.field(default_factory=dict)
    models: dict[str, ModelRow] = dataclasses.field(default_factory=dict)
    decisions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    jobs: dict[int, Job] = dataclasses.field(default_factory=dict)
    artifacts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    last_id: dict[str, int] = dataclasses.field(default_factory=dict)
    workers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def copy(self) -> "_Tables":
        """A copy to write on (rows are immutable or never changed in place, so the containers suffice)."""
        return _Tables(dict(self.sources), dict(self.models), list(self.decisions), dict(self.jobs),
                       list(self.artifacts), list(self.events), dict(self.last_id), dict(self.workers))

    def new_id(self, table: str) -> int:
        self.last_id[table] = self.last_id.get(table, 0) + 1
        return self.last_id[table]

    def add_event(self, *, now: float, kind: str, message: str, job_id: int | None = None, repo: str | None = None,
                  data: Any = None) -> None:
        self.events.append({"id": self.new_id("events"), "at": float(now), "job_id": job_id, "repo": repo,
                            "kind": kind, "message": message, "data": _json_copy(data)})

    def set_job(self, job: Job, values: dict[str, Any]) -> Job:
        """Write ``values`` (column -> value, status as text or enum) into ``job``'s row; the new row."""
        unknown = set(values) - _JOB_FIELDS
        if unknown:
            raise TypeError(f"jobs has no column(s) {', '.join(sorted(unknown))}")
        vals = dict(values)
        if "status" in vals:
            vals["status"] = J.Status(vals["status"])
        for k in _JOB_FLOATS:
            if k in vals:
                vals[k] = _float(vals[k])
        for k in _JOB_JSON:
            if k in vals:
                vals[k] = _json_copy(vals[k])
        new = dataclasses.replace(job, **vals)
        self.jobs[job.id] = new
        return new


class MemoryStore(StateStore):
    """The state store in memory (tests). ``MemoryStore()`` starts empty."""

    url = "memory://"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._t = _Tables()

    def close(self) -> None:
        """Nothing to release; the data stays readable."""

    @contextlib.contextmanager
    def _tx(self) -> Iterator[_Tables]:
        """One write transaction: changes land all at once, or not at all when the body raises."""
        with self._lock:
            work = self._t.copy()
            yield work
            self._t = work

    # ---------------------------------------------------------------- sources
    def source(self, key: str) -> SourceRow | None:
        with self._lock:
            return self._t.sources.get(key)

    def sources(self) -> list[SourceRow]:
        with self._lock:
            return [self._t.sources[k] for k in sorted(self._t.sources)]

    def record_poll(self, key: str, *, now: float, ok: bool, mark: str | None = None, error: str | None = None) -> None:
        with self._tx() as t:
            row = t.sources.get(key) or SourceRow(key, None, None, None, None, 0, 0)
            vals = poll_values(row, now=now, ok=ok, mark=mark, error=error)
            for k in ("last_poll_at", "last_ok_at"):
                if k in vals:
                    vals[k] = _float(vals[k])
            t.sources[key] = dataclasses.replace(row, **vals)

    # ---------------------------------------------------------------- models and decisions
    def decided(self, repos: Sequence[str]) -> dict[str, ModelRow]:
        with self._lock:
            return {r: self._fresh_model(self._t.models[r]) for r in dict.fromkeys(repos) if r in self._t.models}

    def models(self, decision: str | None = None, limit: int = 1000) -> list[ModelRow]:
        with self._lock:
            rows = [m for m in self._t.models.values() if not decision or m.decision == decision]
        rows.sort(key=lambda m: m.decided_at, reverse=True)
        return [self._fresh_model(m) for m in rows[:limit]]

    @staticmethod
    def _fresh_model(row: ModelRow) -> ModelRow:
        return dataclasses.replace(row, fingerprint=_json_copy(row.fingerprint))

    def apply_decisions(self, items: Iterable[dict[str, Any]], enqueues: Sequence[dict[str, Any]], *,
                        now: float) -> tuple[int, list[int | None]]:
        items = list(items)
        with self._tx() as t:
            ids = []
            for e in enqueues:
                jid = self._enqueue_in(t, now=now, **{k: v for k, v in e.items() if k != "item"})
                ids.append(jid)
                if jid is None and e.get("item") is not None:
                    mark_duplicate(e["item"])
            return self._record_decisions_in(t, items, now), ids

    @staticmethod
    def _record_decisions_in(t: _Tables, items: list[dict[str, Any]], now: float) -> int:
        repos = {i["repo"] for i in items}
        pairs = {(d["repo"], d["sha"]) for d in t.decisions if d["repo"] in repos}
        new = 0
        for it in items:
            vals = model_values(it, now)
            vals["decided_at"] = float(now)
            if "fingerprint" in vals:
                vals["fingerprint"] = _json_copy(vals["fingerprint"])
            old = t.models.get(it["repo"])
            t.models[it["repo"]] = dataclasses.replace(old, **vals) if old else \
                ModelRow(**new_model_values(it["repo"], vals))
            if (it["repo"], it["sha"]) in pairs:
                continue
            pairs.add((it["repo"], it["sha"]))
            row = decision_values(it, float(now))
            if any(d["repo"] == row["repo"] and d["sha"] == row["sha"] for d in t.decisions):
                raise StateError(f"decision {row['repo']}@{row['sha']} exists (uq_decisions_repo_sha)")
            t.decisions.append({"id": t.new_id("decisions"), **row})
            new += 1
        return new

    def decisions(self, repo: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        with self._lock:
            rows = [dict(d) for d in reversed(self._t.decisions) if not repo or d["repo"] == repo]
        return rows[:limit]

    def set_manual_skip(self, repo: str, skip: bool, *, now: float, reason: str = MANUAL_SKIP_REASON) -> None:
        with self._tx() as t:
            old = t.models.get(repo)
            vals = manual_skip_values(skip, reason, float(now), new=old is None)
            if old is None:
                t.models[repo] = ModelRow(repo=repo, sha=None, last_modified=None, source=None, fingerprint=None,
                                          queued_sha=None, **vals)
                return
            t.models[repo] = dataclasses.replace(old, **vals)
            if not skip:  # the next poll decides this repo afresh
                t.decisions = [d for d in t.decisions if not (d["repo"] == repo and d["decision"] == "skipped")]

    # ---------------------------------------------------------------- jobs
    def enqueue(self, repo: str, revision: str, *, reason: str, now: float, dedup_key: str | None = None,
                fingerprint: Any = None, max_attempts: int = 4, priority: int = 0,
                toolchain_version: str | None = None) -> int | None:
        kw = dict(repo=repo, revision=revision, reason=reason, dedup_key=dedup_key, fingerprint=fingerprint,
                  max_attempts=max_attempts, priority=priority, toolchain_version=toolchain_version)
        with self._tx() as t:
            return self._enqueue_in(t, now=now, **kw)

    @staticmethod
    def _enqueue_in(t: _Tables, *, repo: str, revision: str, reason: str, now: float, **kw: Any) -> int | None:
        key = dedup_key_of(repo, revision, kw.pop("dedup_key", None))
        if any(j.dedup_key == key for j in t.jobs.values()):
            return None
        job_id = t.new_id("jobs")
        row = Job(id=job_id, repo=repo, revision=revision, dedup_key=key, reason=reason, status=J.Status.QUEUED,
                  stage=None, progress=None, attempts=0, max_attempts=kw.pop("max_attempts", 4), error_type=None,
                  error_message=None, created_at=now, updated_at=now, started_at=None, finished_at=None,
                  not_before=None, worker_id=None, heartbeat_at=None, workdir=None, target_repo=None,
                  toolchain_version=None, fingerprint=None, result=None)
        t.set_job(row, {"created_at": now, "updated_at": now, **kw})
        t.add_event(now=now, job_id=job_id, repo=repo, kind="job.queued",
                    message=queued_message(repo, revision, reason))
        return job_id

    def job(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._t.jobs.get(job_id)
        return self._fresh_job(row) if row else None

    @staticmethod
    def _fresh_job(row: Job) -> Job:
        return dataclasses.replace(row, **{k: _json_copy(getattr(row, k)) for k in _JOB_JSON})

    def jobs(self, statuses: Iterable[J.Status | str] | None = None, repo: str | None = None,
             limit: int = 1000, newest_first: bool = False) -> list[Job]:
        wanted = None if statuses is None else {J.Status(s) for s in statuses}
        with self._lock:
            rows = sorted(self._t.jobs.values(), key=lambda j: j.id)
        rows = [j for j in rows if (wanted is None or j.status in wanted) and (not repo or j.repo == repo)]
        if newest_first:
            rows.sort(key=lambda j: j.updated_at, reverse=True)
        return [self._fresh_job(j) for j in rows[:limit]]

    def claim(self, worker_id: str, *, now: float) -> Job | None:
        with self._lock:
            cand = [j for j in self._t.jobs.values()
                    if j.status.claimable and (j.not_before is None or j.not_before <= now)]
            if not cand:
                return None
            job = min(cand, key=lambda j: (-j.priority, j.id))
            self._move(job.id, start_move(worker_id, now), now=now)
        return self.job(job.id)

    def _move(self, job_id: int, move: Move, *, now: float) -> bool:
        with self._tx() as t:
            job = t.jobs.get(job_id)
            if job is None or job.status not in move.srcs or (move.holder is not None and job.worker_id != move.holder):
                return False
            vals = dict(move.values)
            if move.start:
                vals.update(attempts=job.attempts + 1, started_at=job.started_at if job.started_at is not None else now)
            t.set_job(job, vals)
            if move.event is not None:
                kind, message, data = move.event(job)
                t.add_event(now=now, job_id=job_id, kind=kind, message=message, data=data)
            return True

    # ---------------------------------------------------------------- artifacts and events
    def add_artifact(self, job_id: int, kind: str, path: str, *, now: float, size: int | None = None,
                     sha256: str | None = None, url: str | None = None) -> None:
        with self._tx() as t:
            if job_id not in t.jobs:  # the SQL table's foreign key
                raise StateError(f"job {job_id} does not exist")
            t.artifacts.append({"id": t.new_id("artifacts"), "job_id": job_id, "kind": kind, "path": path,
                                "size": size, "sha256": sha256, "url": url, "created_at": float(now)})

    def artifacts(self, job_id: int) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(a) for a in self._t.artifacts if a["job_id"] == job_id]

    def event(self, kind: str, message: str, *, now: float, job_id: int | None = None, repo: str | None = None,
              data: Any = None) -> None:
        with self._tx() as t:
            t.add_event(now=now, job_id=job_id, repo=repo, kind=kind, message=message[:4000], data=data)

    def events(self, *, job_id: int | None = None, kind: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        like = _like(kind.replace("*", "%")) if kind is not None else None
        with self._lock:
            rows = [e for e in reversed(self._t.events)
                    if (job_id is None or e["job_id"] == job_id) and (like is None or like.fullmatch(e["kind"]))]
        return [{**e, "data": _json_copy(e["data"])} for e in rows[:limit]]

    def prune_events(self, *, before: float) -> int:
        with self._tx() as t:
            keep = [e for e in t.events if e["at"] >= before]
            n = len(t.events) - len(keep)
            t.events = keep
            return n

    def counts(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for j in self._t.jobs.values():
                out[j.status.value] = out.get(j.status.value, 0) + 1
        return dict(sorted(out.items()))

    # ---------------------------------------------------------------- workers (no queue: none beat)
    def register_worker(self, name: str, *, host: str, queue_worker_id: int | None, queues: Sequence[str],
                        concurrency: int, gpu: bool, max_model_gb: float | None, now: float) -> None:
        with self._tx() as t:
            t.workers[name] = {"name": name, "host": host, "queue_worker_id": queue_worker_id,
                               "queues": _json_copy(list(queues)), "concurrency": concurrency, "gpu": gpu,
                               "max_model_gb": _float(max_model_gb), "started_at": float(now), "stopped_at": None}

    def worker_stopped(self, name: str, *, now: float) -> None:
        with self._tx() as t:
            if name in t.workers:
                t.workers[name] = {**t.workers[name], "stopped_at": float(now)}

    def workers(self, *, now: float, stale_after: float = 300.0, limit: int = 200) -> list[dict[str, Any]]:
        with self._lock:
            rows = sorted((dict(w) for w in self._t.workers.values()), key=lambda w: w["started_at"], reverse=True)
            running: dict[str, list[int]] = {}
            for j in self._t.jobs.values():
                if j.status == J.Status.RUNNING:
                    running.setdefault(j.worker_id or "", []).append(j.id)
        return worker_rows([{**w, "queues": _json_copy(w["queues"])} for w in rows[:limit]], {}, running, stale_after)
