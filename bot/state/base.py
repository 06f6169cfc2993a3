"""The state store's interface and its records: what the runner, the watcher, the scheduler, the queue, the status
page and the CLI use of a state store, and the rules both implementations keep.

Two implementations: :class:`bot.state.store.Store` (SQLAlchemy: SQLite or PostgreSQL) and
:class:`bot.state.memstore.MemoryStore` (dicts and a lock, for unit tests). Every status change of a job is a
compare-and-set (:class:`Move`: the statuses it may leave, the worker that must hold it, the values, the event), which
is what makes claiming atomic across the processes sharing a SQLite file; the moves themselves (claim, take,
transition, heartbeat) are defined here once, and each store applies a move atomically (:meth:`StateStore._move`).
Time is passed in as ``now`` (seconds since the epoch) so that callers and tests control the clock.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from bot.model import jobstate as J
from converters.core.errors import StateError


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    id: int
    repo: str
    revision: str
    dedup_key: str
    reason: str
    status: J.Status
    stage: str | None
    progress: str | None
    attempts: int
    max_attempts: int
    error_type: str | None
    error_message: str | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    not_before: float | None
    worker_id: str | None
    heartbeat_at: float | None
    workdir: str | None
    target_repo: str | None
    toolchain_version: str | None
    fingerprint: Any
    result: Any
    priority: int = 0

    @classmethod
    def from_row(cls, row: Any) -> "Job":
        d = dict(row._mapping)
        d["status"] = J.Status(d["status"])
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["status"] = self.status.value
        return d


@dataclasses.dataclass(frozen=True)
class ModelRow:
    repo: str
    sha: str | None
    last_modified: str | None
    decision: str
    code: str
    reason: str
    decided_at: float
    source: str | None
    manual_skip: bool
    fingerprint: Any
    queued_sha: str | None

    @classmethod
    def from_row(cls, row: Any) -> "ModelRow":
        d = dict(row._mapping)
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class SourceRow:
    key: str
    mark: str | None
    last_poll_at: float | None
    last_ok_at: float | None
    last_error: str | None
    polls: int
    failures: int


# --------------------------------------------------------------------------------------------------
# The compare-and-set rule (one definition for both stores)
# --------------------------------------------------------------------------------------------------

MANUAL_SKIP_REASON = "skipped by the operator"
CLAIMABLE = (J.Status.QUEUED, J.Status.RETRYING)  # what a worker claims from the jobs table (SQLite, memory)
TAKEABLE = (J.Status.QUEUED, J.Status.RETRYING, J.Status.RUNNING)  # what a delivered job may be (again, after a stall)

EventOf = Callable[[Job], "tuple[str, str, Any]"]


@dataclasses.dataclass(frozen=True)
class Move:
    """One compare-and-set of a job row: when its status is one of ``srcs`` (and, when ``holder`` is given, its
    worker is ``holder``) the row gets ``values`` -- and, with ``start``, one more attempt and ``started_at`` unless
    it has one -- and ``event`` of the row as it was gives the (kind, message, data) of the event written with it
    in the same transaction (no data: None). Otherwise nothing changes."""

    srcs: tuple[J.Status, ...]
    values: dict[str, Any]
    holder: str | None = None
    start: bool = False
    event: EventOf | None = None


def start_move(worker_id: str, now: float, srcs: tuple[J.Status, ...] = CLAIMABLE) -> Move:
    """A job starts running for ``worker_id`` (a claim; with :data:`TAKEABLE`, a delivered job taken)."""

    def event(prev: Job) -> tuple[str, str, Any]:
        again = f" (was running on {prev.worker_id}, which stopped)" if prev.status == J.Status.RUNNING else ""
        return "job.claimed", f"claimed by {worker_id}{again}", {"worker_id": worker_id}
    return Move(srcs, {"status": J.Status.RUNNING.value, "worker_id": worker_id, "heartbeat_at": now,
                       "updated_at": now, "not_before": None}, start=True, event=event)


def worker_rows(rows: list[dict[str, Any]], beats: dict[int, float], running: dict[str, list[int]],
                stale_after: float) -> list[dict[str, Any]]:
    """Rows of the workers table with ``heartbeat_age_s`` (from ``beats``: the queue's worker id -> seconds since
    its heartbeat), ``alive`` (not stopped, a heartbeat younger than ``stale_after``) and ``running`` (the ids of the
    jobs held by the worker or one of its slots, from ``running``: worker id -> job ids)."""
    for w in rows:
        age = beats.get(w["queue_worker_id"]) if w["queue_worker_id"] is not None else None
        w["heartbeat_age_s"] = age
        w["alive"] = w["stopped_at"] is None and age is not None and age < stale_after
        w["running"] = sorted(i for wid, ids in running.items() for i in ids
                              if wid == w["name"] or wid.startswith(w["name"] + "-"))
    return rows


# --------------------------------------------------------------------------------------------------
# The interface (one definition for the SQL store and bot.state.memstore.MemoryStore)
# --------------------------------------------------------------------------------------------------


class StateStore(abc.ABC):
    """What the runner, the watcher, the scheduler, the queue, the status page and the CLI use of a state store.

    Two implementations: :class:`bot.state.store.Store` (SQLAlchemy: SQLite or PostgreSQL) and
    :class:`bot.state.memstore.MemoryStore` (dicts and a lock, for unit tests). Both keep the same rules: status moves
    are compare-and-set (:class:`Move`) against :data:`bot.model.jobstate.TRANSITIONS`, one job per dedup key
    (default ``repo@revision``), a ``repo@sha`` is one decision, and times are the ``now`` passed in. The methods
    defined here are built on the abstract ones and so behave the same in both.
    """

    url: str

    @abc.abstractmethod
    def close(self) -> None: ...

    # ---------------------------------------------------------------- sources
    @abc.abstractmethod
    def source(self, key: str) -> SourceRow | None: ...

    @abc.abstractmethod
    def sources(self) -> list[SourceRow]: ...

    @abc.abstractmethod
    def record_poll(self, key: str, *, now: float, ok: bool, mark: str | None = None,
                    error: str | None = None) -> None:
        """Record a poll of one source; a good poll advances its mark, a failed one leaves the mark alone."""

    # ---------------------------------------------------------------- models and decisions
    @abc.abstractmethod
    def decided(self, repos: Sequence[str]) -> dict[str, ModelRow]:
        """The models table rows for ``repos``."""

    def model(self, repo: str) -> ModelRow | None:
        return self.decided([repo]).get(repo)

    @abc.abstractmethod
    def models(self, decision: str | None = None, limit: int = 1000) -> list[ModelRow]: ...

    def record_decisions(self, items: Iterable[dict[str, Any]], *, now: float) -> int:
        """Store many decisions in one transaction. Each item: repo, sha, last_modified, decision, code, reason,
        source, and optionally fingerprint/queued_sha. A repo@sha already in ``decisions`` keeps its first row."""
        return self.apply_decisions(items, [], now=now)[0]

    @abc.abstractmethod
    def apply_decisions(self, items: Iterable[dict[str, Any]], enqueues: Sequence[dict[str, Any]], *,
                        now: float) -> tuple[int, list[int | None]]:
        """One transaction for a batch of a poll: queue jobs (``enqueue`` keyword dicts; each may name the
        decision item it belongs to as ``item``) and record decisions. Returns (new decisions, job ids or None
        for a job that already existed, whose item is then marked ``duplicate``)."""

    @abc.abstractmethod
    def decisions(self, repo: str | None = None, limit: int = 200) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def set_manual_skip(self, repo: str, skip: bool, *, now: float, reason: str = MANUAL_SKIP_REASON) -> None: ...

    # ---------------------------------------------------------------- jobs
    @abc.abstractmethod
    def enqueue(self, repo: str, revision: str, *, reason: str, now: float, dedup_key: str | None = None,
                fingerprint: Any = None, max_attempts: int = 4, priority: int = 0,
                toolchain_version: str | None = None) -> int | None:
        """Queue ``repo@revision``; None if a job with the same dedup key (default ``repo@revision``) exists."""

    @abc.abstractmethod
    def job(self, job_id: int) -> Job | None: ...

    @abc.abstractmethod
    def jobs(self, statuses: Iterable[J.Status | str] | None = None, repo: str | None = None,
             limit: int = 1000, newest_first: bool = False) -> list[Job]: ...

    @property
    def queued_by_procrastinate(self) -> bool:
        """True when jobs are delivered by the queue (PostgreSQL: ``bot.queue``) and taken (:meth:`take`), not
        claimed from the jobs table (:meth:`claim`)."""
        return False

    @abc.abstractmethod
    def _move(self, job_id: int, move: Move, *, now: float) -> bool:
        """Apply ``move`` to job ``job_id`` atomically (one transaction, with its event); False when no row matched."""

    @abc.abstractmethod
    def claim(self, worker_id: str, *, now: float) -> Job | None:
        """Atomically move one claimable job (queued, or retrying whose wait is over) to running for
        ``worker_id``: highest priority first, then the oldest."""

    def take(self, job_id: int, worker_id: str, *, now: float) -> Job | None:
        """A job the queue delivered to ``worker_id``: move it to running for that worker (from queued,
        retrying, or running when it is delivered again after its worker stalled), counting the attempt. None
        when it is no longer to be run (finished, cancelled, or gone)."""
        return self.job(job_id) if self._move(job_id, start_move(worker_id, now, TAKEABLE), now=now) else None

    def transition(self, job_id: int, dst: J.Status, *, now: float, worker_id: str | None = None,
                   message: str | None = None, **fields: Any) -> Job:
        """Move a job to ``dst`` if its current status allows it (and, if given, it is held by ``worker_id``)."""
        dst = J.Status(dst)
        move = Move(tuple(J.sources_of(dst)), move_values(dst, now, fields), holder=worker_id,
                    event=lambda prev: (f"job.{dst.value}", message or dst.value, None))
        if not self._move(job_id, move, now=now):
            raise self._refused(job_id, dst, worker_id)
        job = self.job(job_id)
        assert job is not None
        return job

    def update_running(self, job_id: int, worker_id: str, *, now: float, **fields: Any) -> bool:
        """Heartbeat / stage / progress of a running job held by ``worker_id``; False if it is no longer ours."""
        return self._move(job_id, Move((J.Status.RUNNING,), {"heartbeat_at": now, "updated_at": now, **fields},
                                       holder=worker_id), now=now)

    def recover_stale(self, *, now: float, stale_after: float,
                      is_dead: Callable[[str], bool] | None = None) -> list[int]:
        """Put back in the queue running jobs whose worker stopped heartbeating (or is known dead).

        The job keeps its work directory and stage: the pipeline's stage records make the next run skip what was
        finished. A job whose worker died ``max_attempts`` times fails instead (a model that kills its worker).
        """
        recovered = []
        for job in self.jobs([J.Status.RUNNING]):
            stale = job.heartbeat_at is None or job.heartbeat_at < now - stale_after
            dead = bool(is_dead and job.worker_id and is_dead(job.worker_id))
            if not (stale or dead):
                continue
            why = "its worker died" if dead else f"no heartbeat for {now - (job.heartbeat_at or 0):.0f} s"
            try:
                if job.attempts >= job.max_attempts:
                    self.transition(job.id, J.Status.FAILED, now=now, worker_id=job.worker_id,
                                    error_type="WorkerDied", message=f"failed: {why} on attempt {job.attempts}",
                                    error_message=f"{why} during {job.stage or 'start'} on attempt {job.attempts}")
                else:
                    self.transition(job.id, J.Status.QUEUED, now=now, worker_id=job.worker_id,
                                    message=f"requeued: {why} (was {job.worker_id}, stage {job.stage})",
                                    heartbeat_at=None)
                recovered.append(job.id)
            except StateError:
                continue  # someone else recovered or finished it meanwhile
        return recovered

    def _refused(self, job_id: int, dst: J.Status, worker_id: str | None) -> StateError:
        """Why a compare-and-set move of ``job_id`` to ``dst`` matched no row (the job as it is now)."""
        cur = self.job(job_id)
        if cur is None:
            return StateError(f"job {job_id} does not exist")
        if worker_id is not None and cur.worker_id != worker_id and cur.status == J.Status.RUNNING:
            return StateError(f"job {job_id} is held by {cur.worker_id}, not {worker_id}")
        J.check(cur.status, dst)  # raises with the illegal move named
        return StateError(f"job {job_id} changed under us (now {cur.status.value})")

    # ---------------------------------------------------------------- artifacts and events
    @abc.abstractmethod
    def add_artifact(self, job_id: int, kind: str, path: str, *, now: float, size: int | None = None,
                     sha256: str | None = None, url: str | None = None) -> None: ...

    @abc.abstractmethod
    def artifacts(self, job_id: int) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def event(self, kind: str, message: str, *, now: float, job_id: int | None = None, repo: str | None = None,
              data: Any = None) -> None: ...

    @abc.abstractmethod
    def events(self, *, job_id: int | None = None, kind: str | None = None,
               limit: int = 200) -> list[dict[str, Any]]:
        """Newest first; ``kind`` may end in ``*`` (``poll.*``)."""

    @abc.abstractmethod
    def prune_events(self, *, before: float) -> int: ...

    @abc.abstractmethod
    def counts(self) -> dict[str, int]:
        """Number of jobs per status."""

    # ---------------------------------------------------------------- workers (PostgreSQL: bot.queue.box)
    @abc.abstractmethod
    def register_worker(self, name: str, *, host: str, queue_worker_id: int | None, queues: Sequence[str],
                        concurrency: int, gpu: bool, max_model_gb: float | None, now: float) -> None:
        """Record one of a box's queue workers (a new start of the same name replaces its row)."""

    @abc.abstractmethod
    def worker_stopped(self, name: str, *, now: float) -> None: ...

    @abc.abstractmethod
    def workers(self, *, now: float, stale_after: float = 300.0, limit: int = 200) -> list[dict[str, Any]]:
        """Every box's workers, newest first, with ``heartbeat_age_s`` from the queue's worker heartbeats
        (PostgreSQL), ``alive`` and the jobs each runs (:func:`worker_rows`)."""


# Row values both stores write the same way


def dedup_key_of(repo: str, revision: str, dedup_key: str | None) -> str:
    return dedup_key or f"{repo}@{revision}"


def queued_message(repo: str, revision: str, reason: str) -> str:
    return f"queued {repo}@{revision[:12]}: {reason}"


def poll_values(row: SourceRow, *, now: float, ok: bool, mark: str | None, error: str | None) -> dict[str, Any]:
    """The changes a poll makes to a source's row."""
    vals: dict[str, Any] = {"last_poll_at": now, "polls": row.polls + 1}
    if ok:
        vals.update(last_ok_at=now, last_error=None)
        if mark and (row.mark is None or mark > row.mark):
            vals["mark"] = mark
    else:
        vals.update(last_error=error, failures=row.failures + 1)
    return vals


def mark_duplicate(item: dict[str, Any]) -> None:
    """A decision item whose job already existed: say so, and keep the fingerprint of the queued revision."""
    item.update(code="duplicate", reason=f"{item['repo']}@{(item['sha'] or '')[:12]} already has a job")
    item.pop("fingerprint", None)
    item.pop("queued_sha", None)


def model_values(item: dict[str, Any], now: float) -> dict[str, Any]:
    """The models-table values of one decision item (fingerprint and queued_sha only when the item has them)."""
    vals = {k: item.get(k) for k in ("sha", "last_modified", "decision", "code", "reason", "source")}
    vals["decided_at"] = now
    for k in ("fingerprint", "queued_sha"):
        if k in item:
            vals[k] = item[k]
    return vals


def new_model_values(repo: str, vals: dict[str, Any]) -> dict[str, Any]:
    return {"repo": repo, "fingerprint": None, "queued_sha": None, "manual_skip": False, **vals}


def decision_values(item: dict[str, Any], now: float) -> dict[str, Any]:
    return {"repo": item["repo"], "sha": item["sha"] or "", "decision": item["decision"], "code": item["code"],
            "reason": item["reason"], "at": now, "source": item.get("source")}


def manual_skip_values(skip: bool, reason: str, now: float, *, new: bool) -> dict[str, Any]:
    """The models-table values of ``skip``/``unskip`` for a new or an existing row (unskip forgets the sha, so
    the next poll decides the repo afresh)."""
    if new:
        return {"decision": "skipped" if skip else "unknown", "code": "manual" if skip else "unskipped",
                "reason": reason if skip else "", "decided_at": now, "manual_skip": skip}
    if skip:
        return {"manual_skip": True, "decision": "skipped", "code": "manual", "reason": reason, "decided_at": now}
    return {"manual_skip": False, "sha": None, "decision": "unknown", "code": "unskipped", "reason": "",
            "decided_at": now}


def move_values(dst: J.Status, now: float, fields: dict[str, Any]) -> dict[str, Any]:
    vals = {"status": dst.value, "updated_at": now, **fields}
    if dst.finished:
        vals.setdefault("finished_at", now)
    return vals


