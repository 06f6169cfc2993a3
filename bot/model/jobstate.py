"""Job states, the legal moves between them, and the retry rule.

A job is one ``repo@revision`` to turn into a published ladder. Its status is an enum; :func:`check` refuses a
move that is not in :data:`TRANSITIONS`, and the state store applies a move only if the row is still in an
allowed source state (a compare-and-set), so two workers can never both move the same job.

::

    queued ──claim──▶ running ──▶ published | converted (no token / publishing off) | failed
      ▲  ▲               │ ├──▶ retrying (transient error; not_before = now + backoff) ──▶ running
      │  └──release──────┘ └──▶ cancelled
      └──retry── failed | cancelled
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

from converters.core.errors import GgufbotError, StateError

# Retrying a failed job uses bot.model.retry.RetryPolicy (the project's one retry rule) with job-scale delays.


class Status(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    PUBLISHED = "published"
    CONVERTED = "converted"  # finished without publishing (no token, or publishing turned off)
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        return self in FINISHED

    @property
    def claimable(self) -> bool:
        return self in (Status.QUEUED, Status.RETRYING)


FINISHED = frozenset({Status.PUBLISHED, Status.CONVERTED, Status.FAILED, Status.CANCELLED})
ACTIVE = frozenset({Status.QUEUED, Status.RUNNING, Status.RETRYING})

TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.QUEUED: frozenset({Status.RUNNING, Status.CANCELLED}),
    Status.RETRYING: frozenset({Status.RUNNING, Status.QUEUED, Status.CANCELLED}),
    # running -> queued: released on SIGTERM or recovered after its worker died (resumes from its records)
    Status.RUNNING: frozenset({Status.PUBLISHED, Status.CONVERTED, Status.FAILED, Status.RETRYING, Status.CANCELLED,
                               Status.QUEUED}),
    Status.FAILED: frozenset({Status.QUEUED}),
    Status.CANCELLED: frozenset({Status.QUEUED}),
    Status.PUBLISHED: frozenset(),
    Status.CONVERTED: frozenset(),
}

# ``stage`` in the jobs table holds the current stage; the stages of a job are the ones it records when it starts
# (a ``job.stages`` event: ``bot.service.status.planned_stages``), not a fixed list.


class JobRow(Protocol):
    """What the operator moves read of a job row (``bot.state.store.Job``)."""

    id: int
    status: Status


class JobTable(Protocol):
    """What the operator moves need of the state store (``bot.state.store.StateStore``, which sits above)."""

    def job(self, job_id: int) -> JobRow | None: ...

    def transition(self, job_id: int, dst: Status, *, now: float, **fields: Any) -> JobRow: ...


def allowed(src: Status | str, dst: Status | str) -> bool:
    return Status(dst) in TRANSITIONS[Status(src)]


def check(src: Status | str, dst: Status | str) -> None:
    """Raise StateError unless ``src -> dst`` is a legal move."""
    if not allowed(src, dst):
        raise StateError(f"illegal job transition {Status(src).value} -> {Status(dst).value}")


def sources_of(dst: Status | str) -> frozenset[Status]:
    """Every status from which ``dst`` may be reached (what a compare-and-set update accepts)."""
    d = Status(dst)
    return frozenset(s for s, targets in TRANSITIONS.items() if d in targets)


def error_fields(err: BaseException) -> tuple[str, str]:
    """(type name, one-line message) for the jobs table and the status page."""
    msg = err.short() if isinstance(err, GgufbotError) else (str(err).splitlines()[0] if str(err) else "")
    return type(err).__name__, msg[:2000]


def operator_retry(store: JobTable, job_id: int, *, now: float, by: str = "operator") -> tuple[Status, JobRow]:
    """Put a failed or cancelled job back in the queue (a retrying one: now). Returns (old status, job);
    StateError for an unknown job or a status that cannot be retried. ``ggufbot retry`` and the status page."""
    job = existing(store, job_id)
    src = job.status
    if src == Status.RETRYING:
        moved = store.transition(job.id, Status.QUEUED, now=now, message=f"retry now ({by})", not_before=None)
    else:
        check(src, Status.QUEUED)
        moved = store.transition(job.id, Status.QUEUED, now=now, message=f"retry ({by}) after {src.value}",
                                 attempts=0, error_type=None, error_message=None, not_before=None, finished_at=None,
                                 worker_id=None)
    return src, moved


def operator_cancel(store: JobTable, job_id: int, *, now: float, by: str = "operator") -> tuple[Status, JobRow]:
    """Cancel a queued, retrying or running job (a running one stops at its next step). Returns (old status, job)."""
    job = existing(store, job_id)
    check(job.status, Status.CANCELLED)
    return job.status, store.transition(job.id, Status.CANCELLED, now=now, message=f"cancelled by the {by}")


def existing(store: JobTable, job_id: int) -> JobRow:
    job = store.job(job_id)
    if job is None:
        raise StateError(f"no job {job_id}")
    return job
