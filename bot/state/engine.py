"""The database connection: which delivery path a database URL means, the SQLAlchemy engine, and waiting out an
outage of PostgreSQL (the one rule, used by the state store's connections and by the queue's connector).

The embedded default is a SQLite file in WAL mode (no set-up; several processes may share it); a
``postgresql+psycopg://`` URL shares the state between machines, and then jobs are delivered by the queue
(procrastinate, ``bot.queue``) instead of claimed from the jobs table: :func:`delivered_by_queue` is the one place
that decides it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

log = logging.getLogger("bot.state.store")  # the state store's log, as before the engine had its own module

OUTAGE_SECONDS = 600.0  # how long a connection to PostgreSQL waits for its server to come back before giving up
MIGRATION_LOCK = 72231  # the PostgreSQL advisory lock of schema migrations: one migrator at a time across machines
_STOPPING = threading.Event()


def delivered_by_queue(url: str) -> bool:
    """True for a PostgreSQL database: its jobs are delivered by the queue (``bot.queue``: several boxes), not
    claimed from the jobs table (SQLite: ``ggufbot run`` runs them)."""
    return sa.engine.make_url(url).get_backend_name() == "postgresql"


def conninfo(database_url: str) -> str:
    """The libpq URL of a SQLAlchemy ``postgresql+psycopg://`` URL (query options such as ``options`` kept)."""
    url = sa.engine.make_url(database_url)
    if url.get_backend_name() != "postgresql":
        raise ValueError(f"not a PostgreSQL URL: {url.get_backend_name()}")
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    if not delivered_by_queue(url):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = sa.create_engine(url, pool_pre_ping=True)
    sa.event.listen(engine, "do_connect", _connect_riding_outages)
    return engine


def sqlite_size(url: str) -> int | None:
    """Bytes on disk for a SQLite database file (including its WAL), else None."""
    if delivered_by_queue(url):
        return None
    path = sa.engine.make_url(url).database
    if not path or path == ":memory:":
        return None
    total = 0
    for suffix in ("", "-wal", "-shm"):
        p = Path(path + suffix)
        if p.exists():
            total += p.stat().st_size
    return total


# --------------------------------------------------------------------------------------------------
# Outages
# --------------------------------------------------------------------------------------------------


def stop_waiting_for_the_server() -> None:
    """The process is stopping (SIGTERM): connections fail at once instead of waiting out an outage, so a stop
    during an outage is not held up for :data:`OUTAGE_SECONDS` (procrastinate hands the job on after the stall)."""
    _STOPPING.set()


def stopping() -> bool:
    """True once :func:`stop_waiting_for_the_server` was called."""
    return _STOPPING.is_set()


class OutageWait:
    """One wait for an unreachable PostgreSQL: tries again after 0.2 s, doubling up to 2 s, for up to
    :data:`OUTAGE_SECONDS`; ``warn`` is called once, on the first failure; no more waiting once ``stop()``."""

    def __init__(self, stop: Callable[[], bool]) -> None:
        self.deadline = time.monotonic() + OUTAGE_SECONDS
        self.delay = 0.2
        self.warned = False
        self.stop = stop

    def retry_in(self, warn: Callable[[], None]) -> float | None:
        """After a failed attempt: the seconds to wait before the next one, or None to give up (raise)."""
        if time.monotonic() > self.deadline or self.stop():
            return None
        if not self.warned:
            warn()
            self.warned = True
        delay, self.delay = self.delay, min(2.0, self.delay * 2)
        return delay


def _connect_riding_outages(dialect: Any, _rec: Any, cargs: Any, cparams: Any) -> Any:
    """Connect to PostgreSQL, waiting (:class:`OutageWait`) while the server is unreachable: a restart or a network
    cut stalls the workers and the scheduler instead of failing their jobs. With ``pool_pre_ping`` every checkout
    after an outage gets a fresh connection this way."""
    wait = OutageWait(stopping)
    while True:
        try:
            conn = dialect.dbapi.connect(*cargs, **cparams)
            if wait.warned:
                log.warning("state store: PostgreSQL is reachable again")
            return conn
        except dialect.dbapi.OperationalError as e:
            delay = wait.retry_in(lambda e=e: log.warning("state store: PostgreSQL unreachable (%s); waiting for it",
                                                          str(e).splitlines()[0][:200]))
            if delay is None:
                raise
            time.sleep(delay)
