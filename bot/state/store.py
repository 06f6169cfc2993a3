"""The state store: seen models and decisions, jobs, artifacts, events, watch sources.

SQLAlchemy 2 (Core). The embedded default is a SQLite file in WAL mode (no set-up; several processes may share
it); a ``postgresql+psycopg://`` URL shares the state between machines. The schema is versioned: the
``schema_version`` table holds the number of the last migration applied and :data:`MIGRATIONS` is the ordered
list of migration functions, so opening an older database upgrades it in place and keeps its data.

Every status change of a job is a compare-and-set (``UPDATE ... WHERE id = ? AND status IN (...)`` with a
row-count check), which is what makes claiming atomic across the processes sharing a SQLite file. On PostgreSQL
jobs are not claimed from this table: procrastinate delivers them (``bot.queue.box``, its schema applied by migration
3) and a worker takes the delivered one (:meth:`Store.take`); the home-made claim and stale-job sweep are refused there.
Time is passed in as ``now`` (seconds since the epoch) so that callers and tests control the clock.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from bot.model import jobstate as J
from converters.core.errors import StateError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Schema (built per version, so that each migration creates exactly the shape of its time)
# --------------------------------------------------------------------------------------------------


def _tables(md: sa.MetaData, version: int) -> None:
    sa.Table("schema_version", md,
             sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("version", sa.Integer, nullable=False),
             sa.Column("updated_at", sa.Float, nullable=False))
    sa.Table("sources", md,
             sa.Column("key", sa.String(400), primary_key=True),
             sa.Column("mark", sa.String(40)),  # ISO lastModified of the newest model seen by the last good poll
             sa.Column("last_poll_at", sa.Float),
             sa.Column("last_ok_at", sa.Float),
             sa.Column("last_error", sa.Text),
             sa.Column("polls", sa.Integer, nullable=False, server_default="0"),
             sa.Column("failures", sa.Integer, nullable=False, server_default="0"))
    sa.Table("models", md,
             sa.Column("repo", sa.String(200), primary_key=True),
             sa.Column("sha", sa.String(64)),  # the last revision decided
             sa.Column("last_modified", sa.String(40)),
             sa.Column("decision", sa.String(20), nullable=False),  # accepted | skipped | unchanged
             sa.Column("code", sa.String(40), nullable=False),
             sa.Column("reason", sa.Text, nullable=False),
             sa.Column("decided_at", sa.Float, nullable=False),
             sa.Column("source", sa.String(400)),
             sa.Column("manual_skip", sa.Boolean, nullable=False, server_default=sa.false()),
             sa.Column("fingerprint", sa.JSON),  # result-changing files of the last queued revision
             sa.Column("queued_sha", sa.String(64)))
    sa.Table("decisions", md,
             sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("repo", sa.String(200), nullable=False),
             sa.Column("sha", sa.String(64), nullable=False),
             sa.Column("decision", sa.String(20), nullable=False),
             sa.Column("code", sa.String(40), nullable=False),
             sa.Column("reason", sa.Text, nullable=False),
             sa.Column("at", sa.Float, nullable=False),
             sa.Column("source", sa.String(400)),
             sa.UniqueConstraint("repo", "sha", name="uq_decisions_repo_sha"))
    job_cols = [
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("repo", sa.String(200), nullable=False),
        sa.Column("revision", sa.String(64), nullable=False),
        sa.Column("dedup_key", sa.String(400), nullable=False, unique=True),
        sa.Column("reason", sa.Text, nullable=False),  # why it was queued
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("stage", sa.String(40)),
        sa.Column("progress", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("max_attempts", sa.Integer, nullable=False, server_default="4"),
        sa.Column("error_type", sa.String(100)),
        sa.Column("error_message", sa.Text),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
        sa.Column("not_before", sa.Float),
        sa.Column("worker_id", sa.String(200)),
        sa.Column("heartbeat_at", sa.Float),
        sa.Column("workdir", sa.Text),
        sa.Column("target_repo", sa.String(200)),
        sa.Column("toolchain_version", sa.String(200)),
        sa.Column("fingerprint", sa.JSON),
        sa.Column("result", sa.JSON),
    ]
    if version >= 2:
        job_cols.append(sa.Column("priority", sa.Integer, nullable=False, server_default="0"))
    sa.Table("jobs", md, *job_cols)
    sa.Index("ix_jobs_status", md.tables["jobs"].c.status)
    sa.Index("ix_jobs_repo", md.tables["jobs"].c.repo)
    sa.Table("artifacts", md,
             sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
             sa.Column("kind", sa.String(40), nullable=False),  # gguf | report | imatrix | repo
             sa.Column("path", sa.Text, nullable=False),
             sa.Column("size", sa.BigInteger),
             sa.Column("sha256", sa.String(64)),
             sa.Column("url", sa.Text),
             sa.Column("created_at", sa.Float, nullable=False))
    sa.Index("ix_artifacts_job", md.tables["artifacts"].c.job_id)
    sa.Table("events", md,
             sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("at", sa.Float, nullable=False),
             sa.Column("job_id", sa.Integer),
             sa.Column("repo", sa.String(200)),
             sa.Column("kind", sa.String(60), nullable=False),
             sa.Column("message", sa.Text, nullable=False),
             sa.Column("data", sa.JSON))
    sa.Index("ix_events_job", md.tables["events"].c.job_id)
    sa.Index("ix_events_kind", md.tables["events"].c.kind)
    if version >= 3:  # one row per procrastinate worker a box started (bot.queue.box); liveness is procrastinate's
        sa.Table("workers", md,
                 sa.Column("name", sa.String(200), primary_key=True),  # jobs.worker_id is it or it-N (a slot)
                 sa.Column("host", sa.String(200), nullable=False),
                 sa.Column("queue_worker_id", sa.BigInteger),  # procrastinate_workers.id
                 sa.Column("queues", sa.JSON),
                 sa.Column("concurrency", sa.Integer, nullable=False),
                 sa.Column("gpu", sa.Boolean, nullable=False, server_default=sa.false()),
                 sa.Column("max_model_gb", sa.Float),
                 sa.Column("started_at", sa.Float, nullable=False),
                 sa.Column("stopped_at", sa.Float))


def _m1_initial(conn: Connection) -> None:
    md = sa.MetaData()
    _tables(md, 1)
    md.create_all(conn)


def _m2_job_priority(conn: Connection) -> None:
    """Jobs get a priority (manual ``enqueue`` goes first); claim order becomes (priority desc, id)."""
    conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0"))
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_jobs_claim ON jobs (status, priority, id)"))


def _m3_workers_and_queue(conn: Connection) -> None:
    """The ``workers`` table (every box's procrastinate workers, for ``status``) and, on PostgreSQL, procrastinate's
    own schema (its queue: jobs, locks, worker heartbeats, periodic defers), applied here like ours."""
    md = sa.MetaData()
    _tables(md, 3)
    md.tables["workers"].create(conn, checkfirst=True)
    if conn.dialect.name == "postgresql":
        from bot.queue import box as queue

        queue.apply_schema(conn)


MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_m1_initial, _m2_job_priority, _m3_workers_and_queue)
LATEST = len(MIGRATIONS)

METADATA = sa.MetaData()
_tables(METADATA, LATEST)
T_VERSION = METADATA.tables["schema_version"]
T_SOURCES = METADATA.tables["sources"]
T_MODELS = METADATA.tables["models"]
T_DECISIONS = METADATA.tables["decisions"]
T_JOBS = METADATA.tables["jobs"]
T_ARTIFACTS = METADATA.tables["artifacts"]
T_EVENTS = METADATA.tables["events"]
T_WORKERS = METADATA.tables["workers"]


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
# The interface (one definition for the SQL store and bot.state.memstore.MemoryStore)
# --------------------------------------------------------------------------------------------------

MANUAL_SKIP_REASON = "skipped by the operator"


class StateStore(abc.ABC):
    """What the runner, the watcher, the scheduler and the CLI use of a state store.

    Two implementations: :class:`Store` (SQLAlchemy: SQLite or PostgreSQL) and :class:`bot.state.memstore.MemoryStore`
    (dicts and a lock, for unit tests). Both keep the same rules: status moves are compare-and-set against
    :data:`bot.model.jobstate.TRANSITIONS`, one job per dedup key (default ``repo@revision``), a ``repo@sha`` is one
    decision, and times are the ``now`` passed in. The methods defined here are built on the abstract ones and
    so behave the same in both.
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

    @abc.abstractmethod
    def claim(self, worker_id: str, *, now: float) -> Job | None:
        """Atomically move one claimable job (queued, or retrying whose wait is over) to running for
        ``worker_id``: highest priority first, then the oldest."""

    @abc.abstractmethod
    def transition(self, job_id: int, dst: J.Status, *, now: float, worker_id: str | None = None,
                   message: str | None = None, **fields: Any) -> Job:
        """Move a job to ``dst`` if its current status allows it (and, if given, it is held by ``worker_id``)."""

    @abc.abstractmethod
    def update_running(self, job_id: int, worker_id: str, *, now: float, **fields: Any) -> bool:
        """Heartbeat / stage / progress of a running job held by ``worker_id``; False if it is no longer ours."""

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


# --------------------------------------------------------------------------------------------------
# The SQL store
# --------------------------------------------------------------------------------------------------


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = sa.create_engine(url, pool_pre_ping=True)
    sa.event.listen(engine, "do_connect", _connect_riding_outages)
    return engine


OUTAGE_SECONDS = 600.0  # how long a PostgreSQL store waits for its server to come back before giving up
_STOPPING = threading.Event()


def stop_waiting_for_the_server() -> None:
    """The process is stopping (SIGTERM): connections fail at once instead of waiting out an outage, so a stop
    during an outage is not held up for :data:`OUTAGE_SECONDS` (procrastinate hands the job on after the stall)."""
    _STOPPING.set()


def _connect_riding_outages(dialect: Any, _rec: Any, cargs: Any, cparams: Any) -> Any:
    """Connect to PostgreSQL, waiting (with backoff, up to :data:`OUTAGE_SECONDS`) while the server is
    unreachable: a restart or a network cut stalls the workers and the scheduler instead of failing their jobs.
    With ``pool_pre_ping`` every checkout after an outage gets a fresh connection this way."""
    deadline, delay, warned = time.monotonic() + OUTAGE_SECONDS, 0.2, False
    while True:
        try:
            conn = dialect.dbapi.connect(*cargs, **cparams)
            if warned:
                log.warning("state store: PostgreSQL is reachable again")
            return conn
        except dialect.dbapi.OperationalError as e:
            if time.monotonic() > deadline or _STOPPING.is_set():
                raise
            if not warned:
                log.warning("state store: PostgreSQL unreachable (%s); waiting for it", str(e).splitlines()[0][:200])
                warned = True
            time.sleep(delay)
            delay = min(2.0, delay * 2)


class Store(StateStore):
    """The state store on SQLAlchemy: a SQLite file (WAL) or PostgreSQL."""

    def __init__(self, url: str, *, migrate: bool = True):
        self.url = url
        self.engine = make_engine(url)
        if migrate:
            self.migrate()

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------- schema
    def schema_version(self) -> int:
        insp = sa.inspect(self.engine)
        if not insp.has_table("schema_version"):
            return 0
        with self.engine.connect() as c:
            v = c.execute(sa.select(T_VERSION.c.version).where(T_VERSION.c.id == 1)).scalar()
        return int(v or 0)

    def migrate(self, target: int = LATEST, now: float | None = None, *, queue: bool = False) -> int:
        """Apply the migrations not yet applied, each in its own transaction; return the new version. With
        ``queue`` (``ggufbot migrate``), on PostgreSQL, then procrastinate's own migrations that the queue schema
        lacks (:func:`bot.queue.box.migrate_schema`): opening the store creates that schema when absent but never
        upgrades it, since workers of other boxes may still run the older procrastinate."""
        now = time.time() if now is None else now
        with self.engine.begin() as c:
            if self.engine.dialect.name == "postgresql":  # one migrator at a time across machines
                c.execute(sa.text("SELECT pg_advisory_xact_lock(72231)"))
            T_VERSION.create(c, checkfirst=True)
        current = self.schema_version()
        if current > LATEST:
            raise StateError(f"database schema version {current} is newer than this ggufbot ({LATEST}); "
                             "upgrade ggufbot")
        for n in range(current + 1, target + 1):
            with self.engine.begin() as c:
                if self.engine.dialect.name == "postgresql":
                    c.execute(sa.text("SELECT pg_advisory_xact_lock(72231)"))
                got = c.execute(sa.select(T_VERSION.c.version).where(T_VERSION.c.id == 1)).scalar() or 0
                if got >= n:  # another process migrated meanwhile
                    continue
                MIGRATIONS[n - 1](c)
                if got == 0:
                    c.execute(T_VERSION.insert().values(id=1, version=n, updated_at=now))
                else:
                    c.execute(T_VERSION.update().where(T_VERSION.c.id == 1).values(version=n, updated_at=now))
            log.info("state store migrated to schema version %d", n)
        if queue and self.queued_by_procrastinate and target >= 3:
            from bot.queue import box as queue_mod

            queue_mod.migrate_schema(self.engine, now)
        return self.schema_version()

    def _write(self, fn: Callable[[Connection], Any], retries: int = 8) -> Any:
        """Run ``fn`` in a write transaction, retrying a few times if SQLite reports a lock held too long, and on
        PostgreSQL when the connection broke under it (the transaction was rolled back; reconnecting waits for
        the server, see :func:`_connect_riding_outages`)."""
        return self._tx(fn, retries, write=True)

    def _read(self, fn: Callable[[Connection], Any], retries: int = 8) -> Any:
        """Run the read-only ``fn``; on PostgreSQL a connection broken under it (an outage, a restart) is retried
        like a write, so a reader rides out the outage instead of failing its job."""
        return self._tx(fn, retries, write=False)

    def _tx(self, fn: Callable[[Connection], Any], retries: int, *, write: bool) -> Any:
        pg = self.engine.dialect.name == "postgresql"
        for i in range(retries):
            try:
                with (self.engine.begin() if write else self.engine.connect()) as c:
                    return fn(c)
            except sa.exc.DBAPIError as e:
                lost = pg and (e.connection_invalidated or isinstance(e, sa.exc.OperationalError))
                if not (lost or (isinstance(e, sa.exc.OperationalError) and "locked" in str(e).lower())) \
                        or i == retries - 1:
                    raise
                if lost:
                    log.warning("state store: connection lost during a %s; retrying", "write" if write else "read")
                time.sleep(0.05 * (2 ** i))
        return None  # pragma: no cover

    def db_size(self) -> int | None:
        """Bytes on disk for a SQLite store (including its WAL), else None."""
        if not self.url.startswith("sqlite"):
            return None
        path = sa.engine.make_url(self.url).database
        if not path or path == ":memory:":
            return None
        total = 0
        for suffix in ("", "-wal", "-shm"):
            p = Path(path + suffix)
            if p.exists():
                total += p.stat().st_size
        return total

    # ---------------------------------------------------------------- sources
    def source(self, key: str) -> SourceRow | None:
        row = self._read(lambda c: c.execute(sa.select(T_SOURCES).where(T_SOURCES.c.key == key)).first())
        return SourceRow(**dict(row._mapping)) if row else None

    def sources(self) -> list[SourceRow]:
        return self._read(lambda c: [SourceRow(**dict(r._mapping))
                                     for r in c.execute(sa.select(T_SOURCES).order_by(T_SOURCES.c.key))])

    def record_poll(self, key: str, *, now: float, ok: bool, mark: str | None = None, error: str | None = None) -> None:
        def fn(c: Connection) -> None:
            row = c.execute(sa.select(T_SOURCES).where(T_SOURCES.c.key == key)).first()
            if row is None:
                c.execute(T_SOURCES.insert().values(key=key, polls=0, failures=0))
                row = c.execute(sa.select(T_SOURCES).where(T_SOURCES.c.key == key)).first()
            vals = poll_values(SourceRow(**dict(row._mapping)), now=now, ok=ok, mark=mark, error=error)
            c.execute(T_SOURCES.update().where(T_SOURCES.c.key == key).values(**vals))
        self._write(fn)

    # ---------------------------------------------------------------- models and decisions
    def decided(self, repos: Sequence[str]) -> dict[str, ModelRow]:
        """The models table rows for ``repos`` (one query per 500 names)."""
        repos = list(dict.fromkeys(repos))

        def fn(c: Connection) -> dict[str, ModelRow]:
            out: dict[str, ModelRow] = {}
            for i in range(0, len(repos), 500):
                chunk = repos[i:i + 500]
                for r in c.execute(sa.select(T_MODELS).where(T_MODELS.c.repo.in_(chunk))):
                    out[r.repo] = ModelRow.from_row(r)
            return out
        return self._read(fn)

    def models(self, decision: str | None = None, limit: int = 1000) -> list[ModelRow]:
        q = sa.select(T_MODELS).order_by(T_MODELS.c.decided_at.desc()).limit(limit)
        if decision:
            q = q.where(T_MODELS.c.decision == decision)
        return self._read(lambda c: [ModelRow.from_row(r) for r in c.execute(q)])

    def apply_decisions(self, items: Iterable[dict[str, Any]], enqueues: Sequence[dict[str, Any]], *,
                        now: float) -> tuple[int, list[int | None]]:
        items = list(items)

        def fn(c: Connection) -> tuple[int, list[int | None]]:
            ids = []
            for e in enqueues:
                kw = {k: v for k, v in e.items() if k != "item"}
                jid = self._enqueue_in(c, now=now, **kw)
                ids.append(jid)
                if jid is None and e.get("item") is not None:
                    mark_duplicate(e["item"])
            return self._record_decisions_in(c, items, now), ids
        return self._write(fn)

    def _record_decisions_in(self, c: Connection, items: list[dict[str, Any]], now: float) -> int:
        if not items:
            return 0
        repos = [i["repo"] for i in items]
        have: set[str] = set()
        pairs: set[tuple[str, str]] = set()
        for i in range(0, len(repos), 500):
            chunk = repos[i:i + 500]
            have |= {r.repo for r in c.execute(sa.select(T_MODELS.c.repo).where(T_MODELS.c.repo.in_(chunk)))}
            pairs |= {(r.repo, r.sha) for r in
                      c.execute(sa.select(T_DECISIONS.c.repo, T_DECISIONS.c.sha).where(T_DECISIONS.c.repo.in_(chunk)))}
        inserts, new_decisions = [], []
        for it in items:
            vals = model_values(it, now)
            if it["repo"] in have:
                c.execute(T_MODELS.update().where(T_MODELS.c.repo == it["repo"]).values(**vals))
            else:
                inserts.append(new_model_values(it["repo"], vals))
                have.add(it["repo"])
            if (it["repo"], it["sha"]) not in pairs:
                pairs.add((it["repo"], it["sha"]))
                new_decisions.append(decision_values(it, now))
        if inserts:
            c.execute(T_MODELS.insert(), inserts)
        if new_decisions:
            c.execute(T_DECISIONS.insert(), new_decisions)
        return len(new_decisions)

    def decisions(self, repo: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        q = sa.select(T_DECISIONS).order_by(T_DECISIONS.c.id.desc()).limit(limit)
        if repo:
            q = q.where(T_DECISIONS.c.repo == repo)
        return self._read(lambda c: [dict(r._mapping) for r in c.execute(q)])

    def set_manual_skip(self, repo: str, skip: bool, *, now: float, reason: str = MANUAL_SKIP_REASON) -> None:
        def fn(c: Connection) -> None:
            row = c.execute(sa.select(T_MODELS.c.repo).where(T_MODELS.c.repo == repo)).first()
            vals = manual_skip_values(skip, reason, now, new=row is None)
            if row is None:
                c.execute(T_MODELS.insert().values(repo=repo, **vals))
                return
            c.execute(T_MODELS.update().where(T_MODELS.c.repo == repo).values(**vals))
            if not skip:  # the next poll decides this repo afresh
                c.execute(T_DECISIONS.delete().where(T_DECISIONS.c.repo == repo)
                          .where(T_DECISIONS.c.decision == "skipped"))
        self._write(fn)

    # ---------------------------------------------------------------- jobs
    def enqueue(self, repo: str, revision: str, *, reason: str, now: float, dedup_key: str | None = None,
                fingerprint: Any = None, max_attempts: int = 4, priority: int = 0,
                toolchain_version: str | None = None) -> int | None:
        kw = dict(repo=repo, revision=revision, reason=reason, dedup_key=dedup_key, fingerprint=fingerprint,
                  max_attempts=max_attempts, priority=priority, toolchain_version=toolchain_version)
        try:
            return self._write(lambda c: self._enqueue_in(c, now=now, **kw))
        except sa.exc.IntegrityError:  # a concurrent enqueue of the same key won
            return None

    def _enqueue_in(self, c: Connection, *, repo: str, revision: str, reason: str, now: float,
                    dedup_key: str | None = None, fingerprint: Any = None, max_attempts: int = 4, priority: int = 0,
                    toolchain_version: str | None = None) -> int | None:
        key = dedup_key_of(repo, revision, dedup_key)
        if c.execute(sa.select(T_JOBS.c.id).where(T_JOBS.c.dedup_key == key)).first():
            return None
        res = c.execute(T_JOBS.insert().values(
            repo=repo, revision=revision, dedup_key=key, reason=reason, status=J.Status.QUEUED.value,
            attempts=0, max_attempts=max_attempts, created_at=now, updated_at=now, fingerprint=fingerprint,
            priority=priority, toolchain_version=toolchain_version))
        job_id = int(res.inserted_primary_key[0])
        c.execute(T_EVENTS.insert().values(at=now, job_id=job_id, repo=repo, kind="job.queued",
                                           message=queued_message(repo, revision, reason)))
        return job_id

    def job(self, job_id: int) -> Job | None:
        row = self._read(lambda c: c.execute(sa.select(T_JOBS).where(T_JOBS.c.id == job_id)).first())
        return Job.from_row(row) if row else None

    def jobs(self, statuses: Iterable[J.Status | str] | None = None, repo: str | None = None,
             limit: int = 1000, newest_first: bool = False) -> list[Job]:
        q = sa.select(T_JOBS)
        if statuses is not None:
            q = q.where(T_JOBS.c.status.in_([J.Status(s).value for s in statuses]))
        if repo:
            q = q.where(T_JOBS.c.repo == repo)
        q = q.order_by(T_JOBS.c.updated_at.desc() if newest_first else T_JOBS.c.id).limit(limit)
        return self._read(lambda c: [Job.from_row(r) for r in c.execute(q)])

    @property
    def queued_by_procrastinate(self) -> bool:
        """True on PostgreSQL: jobs are delivered by procrastinate (``bot.queue.box``), not claimed from this table."""
        return self.engine.dialect.name == "postgresql"

    def _refuse_on_queue(self, what: str) -> None:
        if self.queued_by_procrastinate:
            raise StateError(f"{what}: on PostgreSQL jobs are delivered by procrastinate (ggufbot worker), "
                             "not claimed from the jobs table")

    def recover_stale(self, *, now: float, stale_after: float,
                      is_dead: Callable[[str], bool] | None = None) -> list[int]:
        self._refuse_on_queue("recover_stale")
        return super().recover_stale(now=now, stale_after=stale_after, is_dead=is_dead)

    def take(self, job_id: int, worker_id: str, *, now: float) -> Job | None:
        """A job procrastinate delivered to ``worker_id``: move it to running for that worker (from queued,
        retrying, or running when it is delivered again after its worker stalled), counting the attempt. None
        when it is no longer to be run (finished, cancelled, or gone)."""
        takeable = [J.Status.QUEUED.value, J.Status.RETRYING.value, J.Status.RUNNING.value]

        def fn(c: Connection) -> bool:
            prev = c.execute(sa.select(T_JOBS.c.worker_id, T_JOBS.c.status).where(T_JOBS.c.id == job_id)).first()
            res = c.execute(T_JOBS.update().where(T_JOBS.c.id == job_id).where(T_JOBS.c.status.in_(takeable))
                            .values(status=J.Status.RUNNING.value, worker_id=worker_id, heartbeat_at=now,
                                    attempts=T_JOBS.c.attempts + 1, updated_at=now, not_before=None,
                                    started_at=sa.func.coalesce(T_JOBS.c.started_at, now)))
            if res.rowcount != 1:
                return False
            again = f" (was running on {prev.worker_id}, which stopped)" if prev.status == J.Status.RUNNING.value \
                else ""
            c.execute(T_EVENTS.insert().values(at=now, job_id=job_id, kind="job.claimed",
                                               message=f"claimed by {worker_id}{again}",
                                               data={"worker_id": worker_id}))
            return True
        return self.job(job_id) if self._write(fn) else None

    # ---------------------------------------------------------------- workers (PostgreSQL: bot.queue.box)
    def register_worker(self, name: str, *, host: str, queue_worker_id: int | None, queues: Sequence[str],
                        concurrency: int, gpu: bool, max_model_gb: float | None, now: float) -> None:
        vals = dict(host=host, queue_worker_id=queue_worker_id, queues=list(queues), concurrency=concurrency,
                    gpu=gpu, max_model_gb=max_model_gb, started_at=now, stopped_at=None)

        def fn(c: Connection) -> None:
            if c.execute(T_WORKERS.update().where(T_WORKERS.c.name == name).values(**vals)).rowcount == 0:
                c.execute(T_WORKERS.insert().values(name=name, **vals))
        self._write(fn)

    def worker_stopped(self, name: str, *, now: float) -> None:
        self._write(lambda c: c.execute(T_WORKERS.update().where(T_WORKERS.c.name == name).values(stopped_at=now)))

    def workers(self, *, now: float, stale_after: float = 300.0, limit: int = 200) -> list[dict[str, Any]]:
        """Every box's workers, newest first, with ``heartbeat_age_s`` from procrastinate's worker heartbeats
        (PostgreSQL), ``alive`` (not stopped, a heartbeat younger than ``stale_after``) and the jobs each runs."""
        def fn(c: Connection) -> tuple[list[dict[str, Any]], dict[int, float], dict[str, list[int]]]:
            rows = [dict(r._mapping) for r in
                    c.execute(sa.select(T_WORKERS).order_by(T_WORKERS.c.started_at.desc()).limit(limit))]
            beats: dict[int, float] = {}
            if self.queued_by_procrastinate:
                beats = {int(r[0]): float(r[1]) for r in c.execute(sa.text(
                    "SELECT id, EXTRACT(EPOCH FROM (NOW() - last_heartbeat)) FROM procrastinate_workers"))}
            running: dict[str, list[int]] = {}
            for r in c.execute(sa.select(T_JOBS.c.id, T_JOBS.c.worker_id)
                               .where(T_JOBS.c.status == J.Status.RUNNING.value)):
                running.setdefault(r.worker_id or "", []).append(int(r.id))
            return rows, beats, running
        rows, beats, running = self._read(fn)
        for w in rows:
            age = beats.get(w["queue_worker_id"]) if w["queue_worker_id"] is not None else None
            w["heartbeat_age_s"] = age
            w["alive"] = w["stopped_at"] is None and age is not None and age < stale_after
            w["running"] = sorted(i for wid, ids in running.items() for i in ids
                                  if wid == w["name"] or wid.startswith(w["name"] + "-"))
        return rows

    def claim(self, worker_id: str, *, now: float) -> Job | None:
        self._refuse_on_queue("claim")
        claimable = [J.Status.QUEUED.value, J.Status.RETRYING.value]
        for _ in range(20):
            with self.engine.connect() as c:
                cand = c.execute(
                    sa.select(T_JOBS.c.id).where(T_JOBS.c.status.in_(claimable))
                    .where(sa.or_(T_JOBS.c.not_before.is_(None), T_JOBS.c.not_before <= now))
                    .order_by(T_JOBS.c.priority.desc(), T_JOBS.c.id).limit(5)).scalars().all()
            if not cand:
                return None
            for job_id in cand:
                def fn(c: Connection, job_id: int = job_id) -> bool:
                    res = c.execute(T_JOBS.update()
                                    .where(T_JOBS.c.id == job_id).where(T_JOBS.c.status.in_(claimable))
                                    .values(status=J.Status.RUNNING.value, worker_id=worker_id, heartbeat_at=now,
                                            attempts=T_JOBS.c.attempts + 1, updated_at=now, not_before=None,
                                            started_at=sa.func.coalesce(T_JOBS.c.started_at, now)))
                    if res.rowcount != 1:
                        return False
                    c.execute(T_EVENTS.insert().values(at=now, job_id=job_id, kind="job.claimed",
                                                       message=f"claimed by {worker_id}",
                                                       data={"worker_id": worker_id}))
                    return True
                if self._write(fn):
                    return self.job(job_id)
        return None

    def transition(self, job_id: int, dst: J.Status, *, now: float, worker_id: str | None = None,
                   message: str | None = None, **fields: Any) -> Job:
        dst = J.Status(dst)
        srcs = [s.value for s in J.sources_of(dst)]

        def fn(c: Connection) -> int:
            q = T_JOBS.update().where(T_JOBS.c.id == job_id).where(T_JOBS.c.status.in_(srcs))
            if worker_id is not None:
                q = q.where(T_JOBS.c.worker_id == worker_id)
            res = c.execute(q.values(**move_values(dst, now, fields)))
            if res.rowcount == 1:
                c.execute(T_EVENTS.insert().values(at=now, job_id=job_id, kind=f"job.{dst.value}",
                                                   message=message or dst.value))
            return res.rowcount
        if self._write(fn) != 1:
            raise self._refused(job_id, dst, worker_id)
        job = self.job(job_id)
        assert job is not None
        return job

    def update_running(self, job_id: int, worker_id: str, *, now: float, **fields: Any) -> bool:
        def fn(c: Connection) -> int:
            res = c.execute(T_JOBS.update().where(T_JOBS.c.id == job_id)
                            .where(T_JOBS.c.status == J.Status.RUNNING.value)
                            .where(T_JOBS.c.worker_id == worker_id)
                            .values(heartbeat_at=now, updated_at=now, **fields))
            return res.rowcount
        return self._write(fn) == 1

    # ---------------------------------------------------------------- artifacts and events
    def add_artifact(self, job_id: int, kind: str, path: str, *, now: float, size: int | None = None,
                     sha256: str | None = None, url: str | None = None) -> None:
        self._write(lambda c: c.execute(T_ARTIFACTS.insert().values(
            job_id=job_id, kind=kind, path=path, size=size, sha256=sha256, url=url, created_at=now)))

    def artifacts(self, job_id: int) -> list[dict[str, Any]]:
        return self._read(lambda c: [dict(r._mapping) for r in c.execute(
            sa.select(T_ARTIFACTS).where(T_ARTIFACTS.c.job_id == job_id).order_by(T_ARTIFACTS.c.id))])

    def event(self, kind: str, message: str, *, now: float, job_id: int | None = None, repo: str | None = None,
              data: Any = None) -> None:
        self._write(lambda c: c.execute(T_EVENTS.insert().values(
            at=now, job_id=job_id, repo=repo, kind=kind, message=message[:4000], data=data)))

    def events(self, *, job_id: int | None = None, kind: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        q = sa.select(T_EVENTS).order_by(T_EVENTS.c.id.desc()).limit(limit)
        if job_id is not None:
            q = q.where(T_EVENTS.c.job_id == job_id)
        if kind is not None:
            q = q.where(T_EVENTS.c.kind.like(kind.replace("*", "%")))
        return self._read(lambda c: [dict(r._mapping) for r in c.execute(q)])

    def prune_events(self, *, before: float) -> int:
        return self._write(lambda c: c.execute(T_EVENTS.delete().where(T_EVENTS.c.at < before)).rowcount)

    def counts(self) -> dict[str, int]:
        rows = self._read(lambda c: c.execute(sa.select(T_JOBS.c.status, sa.func.count())
                                              .group_by(T_JOBS.c.status)).all())
        return {r[0]: int(r[1]) for r in rows}
