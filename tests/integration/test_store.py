"""The SQL state store on real databases: SQLite (WAL) and PostgreSQL (marked ``postgres``).

Migrations keep data, and two processes claiming from one SQLite file never get the same job. The rules both the SQL
and the in-memory store keep (compare-and-set moves, deduplication, decisions, recovery) are in
``test_store_contract.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from bot.model import jobstate as J
from bot.queue.schema import INSTALLED
from bot.state.schema import LATEST
from bot.state.store import Store
from converters.core.errors import StateError
from tests.bot_fixtures import postgres_url

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    with postgres_url() as url:
        yield url


def store_at(url: str, **kw: bool) -> Store:
    """The store as the CLI opens it: on PostgreSQL with the queue's schema handed over (migration 3 creates it)."""
    return Store(url, queue_schema=INSTALLED if url.startswith("postgresql") else None, **kw)


def test_fresh_store_is_at_latest_and_sqlite_uses_wal(db_url: str) -> None:
    st = store_at(db_url)
    assert st.schema_version() == LATEST
    if db_url.startswith("sqlite"):
        with st.engine.connect() as c:
            assert c.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
        assert st.db_size() and st.db_size() > 0
    assert store_at(db_url).schema_version() == LATEST  # opening again is a no-op


def test_upgrade_from_version_1_keeps_data(db_url: str) -> None:
    old = store_at(db_url, migrate=False)
    assert old.migrate(target=1) == 1
    with old.engine.begin() as c:  # a row written by the version-1 code (no priority column yet)
        c.execute(sa.text("INSERT INTO jobs (repo, revision, dedup_key, reason, status, attempts, max_attempts, "
                          "created_at, updated_at) VALUES ('a/b', 'r1', 'a/b@r1', 'new release', 'queued', 0, 4, 1, 1)"))
        c.execute(sa.text("INSERT INTO models (repo, sha, decision, code, reason, decided_at, manual_skip) "
                          "VALUES ('a/b', 'r1', 'accepted', 'queued', 'new release', 1, false)"))
    old.close()
    st = store_at(db_url)
    assert st.schema_version() == LATEST
    [job] = st.jobs()
    assert (job.repo, job.revision, job.status, job.priority) == ("a/b", "r1", J.Status.QUEUED, 0)
    assert st.model("a/b").reason == "new release"
    if st.queued_by_procrastinate:  # PostgreSQL: procrastinate delivers the job, the worker takes it
        assert st.take(job.id, "w1", now=2).id == job.id
    else:
        assert st.claim("w1", now=2).id == job.id


CLAIMER = """
import json, sys
from bot.state.store import Store
st = Store(sys.argv[1])
got = []
while True:
    j = st.claim(sys.argv[2], now=1.0)
    if j is None:
        break
    got.append(j.id)
print(json.dumps(got))
"""


def test_two_processes_never_claim_the_same_job(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'state.db'}"  # on PostgreSQL procrastinate claims (test_queue_pg.py)
    st = store_at(db_url)
    ids = [st.enqueue("o/m", f"{i:040d}", reason="r", now=0) for i in range(120)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, db_url, f"w{i}"], stdout=subprocess.PIPE, env=env,
                              cwd=REPO_ROOT) for i in range(2)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    claimed = outs[0] + outs[1]
    assert sorted(claimed) == sorted(ids)  # all claimed, none twice
    assert len(set(claimed)) == len(claimed)
    assert all(j.attempts == 1 for j in st.jobs())


@pytest.mark.postgres
def test_a_postgresql_store_without_the_queue_schema_refuses_migration_3() -> None:
    with postgres_url() as url:
        st = Store(url, migrate=False)
        assert st.migrate(target=2) == 2  # the state's own tables need nothing from the queue
        with pytest.raises(StateError, match="queue's schema"):
            st.migrate()
        assert st.schema_version() == 2  # the failed migration left nothing behind
        with pytest.raises(StateError, match="without the job queue's schema"):
            st.queue_state()
        st.close()
