"""The state store's schema: its tables, built per version, and the ordered migrations that reach each version;
and the job queue's schema, which the queue package hands to the store (:class:`QueueSchema`).

The ``schema_version`` table holds the number of the last migration applied and :data:`MIGRATIONS` is the ordered
list of migration functions, so opening an older database upgrades it in place and keeps its data. Migration 3
creates, on PostgreSQL, the queue's own schema (procrastinate's: its jobs, locks, worker heartbeats, periodic defers)
in the same transaction. The state layer does not know procrastinate: ``bot.queue.schema.INSTALLED`` describes it
(its version, schema and migration files) and whoever opens a PostgreSQL store hands it over; ``queue_migrations``
is ggufbot's record of the queue migrations a database has (:func:`apply_queue_schema` fills it,
:func:`migrate_queue_schema` adds to it).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from bot.state.engine import MIGRATION_LOCK
from converters.core.errors import StateError

log = logging.getLogger("bot.queue.box")  # the queue schema's log lines, as before they moved here


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


def _m1_initial(conn: Connection, queue: "QueueSchema | None") -> None:
    md = sa.MetaData()
    _tables(md, 1)
    md.create_all(conn)


def _m2_job_priority(conn: Connection, queue: "QueueSchema | None") -> None:
    """Jobs get a priority (manual ``enqueue`` goes first); claim order becomes (priority desc, id)."""
    conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0"))
    conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_jobs_claim ON jobs (status, priority, id)"))


def _m3_workers_and_queue(conn: Connection, queue: "QueueSchema | None") -> None:
    """The ``workers`` table (every box's procrastinate workers, for ``status``) and, on PostgreSQL, the queue's
    own schema (``queue``, handed over by whoever opens the store), applied here like ours."""
    md = sa.MetaData()
    _tables(md, 3)
    md.tables["workers"].create(conn, checkfirst=True)
    if conn.dialect.name == "postgresql":
        if queue is None:
            raise StateError("schema migration 3 on PostgreSQL creates the job queue's schema: open the store with "
                             "the queue's (bot.queue.schema.INSTALLED)")
        apply_queue_schema(conn, queue)


Migration = Callable[[Connection, "QueueSchema | None"], None]
MIGRATIONS: tuple[Migration, ...] = (_m1_initial, _m2_job_priority, _m3_workers_and_queue)
LATEST = len(MIGRATIONS)
QUEUE_SINCE = 3  # the schema version from which a PostgreSQL database has the queue's schema

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
# The job queue's schema (handed over by bot.queue.schema)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QueueSchema:
    """The queue a box runs (procrastinate, described by ``bot.queue.schema.INSTALLED``): its version, its full
    schema and the names of its migration files (each a ``MM.mm.pp_NN_name.sql``, applied in name order; the schema
    is the result of all of them), ``read`` giving one file's SQL. The queue keeps no record of what a database has:
    ``queue_migrations`` is ggufbot's. A database whose queue schema was made before that record existed has every
    migration up to ``baseline``."""

    version: str
    schema: Callable[[], str]
    migrations: tuple[str, ...]
    read: Callable[[str], str]
    baseline: tuple[int, int, int]


_MD = sa.MetaData()
T_QUEUE_MIGRATIONS = sa.Table("queue_migrations", _MD,
                              sa.Column("name", sa.String(200), primary_key=True),  # the migration file's name
                              sa.Column("procrastinate", sa.String(40), nullable=False),  # the version applying it
                              sa.Column("applied_at", sa.Float, nullable=False))


def migration_version(name: str) -> tuple[int, int, int]:
    """``03.04.00_01_pre_add_retry.sql`` -> (3, 4, 0)."""
    major, minor, patch = name.split("_", 1)[0].split(".")
    return int(major), int(minor), int(patch)


def _record(conn: Connection, queue: QueueSchema, names: Iterable[str], now: float) -> None:
    rows = [{"name": n, "procrastinate": queue.version, "applied_at": now} for n in names]
    if rows:
        conn.execute(T_QUEUE_MIGRATIONS.insert(), rows)


def apply_queue_schema(conn: Connection, queue: QueueSchema, now: float | None = None) -> None:
    """The queue's schema, in the migration's transaction (migration 3), unless present; it is recorded as every
    migration of ``queue``."""
    if sa.inspect(conn).has_table("procrastinate_jobs"):
        return
    conn.connection.driver_connection.execute(queue.schema())  # no parameters: '%' stays literal
    T_QUEUE_MIGRATIONS.create(conn, checkfirst=True)
    _record(conn, queue, queue.migrations, time.time() if now is None else now)


def applied_queue_migrations(conn: Connection, queue: QueueSchema) -> set[str]:
    """The queue migrations the database has: its record, else (made before the record existed) every migration
    of ``queue`` up to its baseline; none without the queue's schema."""
    insp = sa.inspect(conn)
    if insp.has_table("queue_migrations"):
        return {r[0] for r in conn.execute(sa.select(T_QUEUE_MIGRATIONS.c.name))}
    if insp.has_table("procrastinate_jobs"):
        return {n for n in queue.migrations if migration_version(n) <= queue.baseline}
    return set()


def queue_schema_state(engine: Engine, queue: QueueSchema) -> tuple[list[str], list[str]]:
    """(migrations of ``queue`` not applied, in order; applied ones it does not know)."""
    with engine.connect() as c:
        if not sa.inspect(c).has_table("procrastinate_jobs"):
            return list(queue.migrations), []
        done = applied_queue_migrations(c, queue)
    return [n for n in queue.migrations if n not in done], sorted(done - set(queue.migrations))


def migrate_queue_schema(engine: Engine, queue: QueueSchema, now: float | None = None) -> list[str]:
    """Apply the migrations of ``queue`` the database does not have, in order, each in its own transaction with its
    record (under the migration lock). Returns the names applied."""
    now = time.time() if now is None else now
    with engine.begin() as c:
        c.execute(sa.text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
        if not sa.inspect(c).has_table("procrastinate_jobs"):
            apply_queue_schema(c, queue, now)
            return []
        if not sa.inspect(c).has_table("queue_migrations"):  # made before the record: write its baseline
            base = applied_queue_migrations(c, queue)
            T_QUEUE_MIGRATIONS.create(c)
            _record(c, queue, sorted(base), now)
    done = []
    for name in queue.migrations:
        with engine.begin() as c:
            c.execute(sa.text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
            if c.execute(sa.select(T_QUEUE_MIGRATIONS.c.name).where(T_QUEUE_MIGRATIONS.c.name == name)).first():
                continue
            c.connection.driver_connection.execute(queue.read(name))  # no parameters: '%' stays literal
            _record(c, queue, [name], now)
        log.info("queue schema: applied procrastinate migration %s", name)
        done.append(name)
    return done
