"""The state store on SQLAlchemy 2 (Core): seen models and decisions, jobs, artifacts, events, watch sources, workers.

A SQLite file in WAL mode, or PostgreSQL (:mod:`bot.state.engine`: the connection, outages; :mod:`bot.state.schema`:
the tables and migrations). The rules are the interface's (:mod:`bot.state.base`); this module is their SQL. On
PostgreSQL jobs are not claimed from this table: the queue delivers them (``bot.queue.box``, the queue's schema
handed to the store and applied by migration 3) and a worker takes the delivered one (:meth:`StateStore.take`); the
home-made claim and stale-job sweep are refused there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from bot.model import jobstate as J
from bot.state.base import (
    CLAIMABLE,
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
from bot.state.engine import MIGRATION_LOCK, delivered_by_queue, make_engine, sqlite_size
from bot.state.schema import (
    LATEST,
    MIGRATIONS,
    QUEUE_SINCE,
    T_ARTIFACTS,
    T_DECISIONS,
    T_EVENTS,
    T_JOBS,
    T_MODELS,
    T_SOURCES,
    T_VERSION,
    T_WORKERS,
    QueueSchema,
    migrate_queue_schema,
    queue_schema_state,
)
from converters.core.errors import StateError

log = logging.getLogger(__name__)


class Store(StateStore):
    """The state store on SQLAlchemy: a SQLite file (WAL) or PostgreSQL. On PostgreSQL, ``queue_schema`` is the job
    queue's (``bot.queue.schema.INSTALLED``), which migration 3 creates and :meth:`migrate` with ``queue`` upgrades."""

    def __init__(self, url: str, *, migrate: bool = True, queue_schema: QueueSchema | None = None):
        self.url = url
        self.queue_schema = queue_schema
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
        ``queue`` (``ggufbot migrate``), on PostgreSQL, then the queue's own migrations that its schema lacks
        (:meth:`migrate_queue`): opening the store creates that schema when absent but never upgrades it, since
        workers of other boxes may still run the older procrastinate."""
        now = time.time() if now is None else now
        with self.engine.begin() as c:
            if self.engine.dialect.name == "postgresql":  # one migrator at a time across machines
                c.execute(sa.text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
            T_VERSION.create(c, checkfirst=True)
        current = self.schema_version()
        if current > LATEST:
            raise StateError(f"database schema version {current} is newer than this ggufbot ({LATEST}); "
                             "upgrade ggufbot")
        for n in range(current + 1, target + 1):
            with self.engine.begin() as c:
                if self.engine.dialect.name == "postgresql":
                    c.execute(sa.text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
                got = c.execute(sa.select(T_VERSION.c.version).where(T_VERSION.c.id == 1)).scalar() or 0
                if got >= n:  # another process migrated meanwhile
                    continue
                MIGRATIONS[n - 1](c, self.queue_schema)
                if got == 0:
                    c.execute(T_VERSION.insert().values(id=1, version=n, updated_at=now))
                else:
                    c.execute(T_VERSION.update().where(T_VERSION.c.id == 1).values(version=n, updated_at=now))
            log.info("state store migrated to schema version %d", n)
        if queue and self.queued_by_procrastinate and target >= QUEUE_SINCE:
            self.migrate_queue(now)
        return self.schema_version()

    def _queue(self) -> QueueSchema:
        if self.queue_schema is None:
            raise StateError("this PostgreSQL store was opened without the job queue's schema "
                             "(bot.queue.schema.INSTALLED)")
        return self.queue_schema

    def queue_state(self) -> tuple[list[str], list[str]]:
        """(the queue's migrations this database lacks, in order; applied ones the queue does not know)."""
        return queue_schema_state(self.engine, self._queue())

    def migrate_queue(self, now: float | None = None) -> list[str]:
        """Apply the queue's migrations this database lacks (:func:`bot.state.schema.migrate_queue_schema`)."""
        return migrate_queue_schema(self.engine, self._queue(), now)

    def _write(self, fn: Callable[[Connection], Any], retries: int = 8) -> Any:
        """Run ``fn`` in a write transaction, retrying a few times if SQLite reports a lock held too long, and on
        PostgreSQL when the connection broke under it (the transaction was rolled back; reconnecting waits for
        the server, see :func:`bot.state.engine.make_engine`)."""
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
        return sqlite_size(self.url)

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
        return delivered_by_queue(self.url)

    def _refuse_on_queue(self, what: str) -> None:
        if self.queued_by_procrastinate:
            raise StateError(f"{what}: on PostgreSQL jobs are delivered by procrastinate (ggufbot worker), "
                             "not claimed from the jobs table")

    def recover_stale(self, *, now: float, stale_after: float,
                      is_dead: Callable[[str], bool] | None = None) -> list[int]:
        self._refuse_on_queue("recover_stale")
        return super().recover_stale(now=now, stale_after=stale_after, is_dead=is_dead)

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
        return worker_rows(*self._read(fn), stale_after)

    def live_queue_jobs(self, task_name: str) -> set[int]:
        """ggufbot job ids with a queue job of ``task_name`` waiting or running (PostgreSQL)."""
        with self.engine.connect() as c:
            rows = c.execute(sa.text("SELECT (args->>'job_id')::bigint FROM procrastinate_jobs "
                                     "WHERE task_name = :t AND status IN ('todo', 'doing')"), {"t": task_name})
            return {int(r[0]) for r in rows if r[0] is not None}

    def claim(self, worker_id: str, *, now: float) -> Job | None:
        self._refuse_on_queue("claim")
        claimable = [s.value for s in CLAIMABLE]
        for _ in range(20):
            with self.engine.connect() as c:
                cand = c.execute(
                    sa.select(T_JOBS.c.id).where(T_JOBS.c.status.in_(claimable))
                    .where(sa.or_(T_JOBS.c.not_before.is_(None), T_JOBS.c.not_before <= now))
                    .order_by(T_JOBS.c.priority.desc(), T_JOBS.c.id).limit(5)).scalars().all()
            if not cand:
                return None
            for job_id in cand:
                if self._move(job_id, start_move(worker_id, now), now=now):
                    return self.job(job_id)
        return None

    def _move(self, job_id: int, move: Move, *, now: float) -> bool:
        def fn(c: Connection) -> bool:
            prev = None
            if move.event is not None:
                row = c.execute(sa.select(T_JOBS).where(T_JOBS.c.id == job_id)).first()
                if row is None:
                    return False
                prev = Job.from_row(row)
            q = T_JOBS.update().where(T_JOBS.c.id == job_id).where(T_JOBS.c.status.in_([s.value for s in move.srcs]))
            if move.holder is not None:
                q = q.where(T_JOBS.c.worker_id == move.holder)
            vals = dict(move.values)
            if move.start:
                vals.update(attempts=T_JOBS.c.attempts + 1, started_at=sa.func.coalesce(T_JOBS.c.started_at, now))
            if c.execute(q.values(**vals)).rowcount != 1:
                return False
            if move.event is not None and prev is not None:
                kind, message, data = move.event(prev)
                event = dict(at=now, job_id=job_id, kind=kind, message=message)
                c.execute(T_EVENTS.insert().values(**event, **({} if data is None else {"data": data})))
            return True
        return bool(self._write(fn))

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
