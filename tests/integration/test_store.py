"""The state store on real databases: SQLite (WAL) and PostgreSQL (marked ``postgres``).

Migrations keep data, status moves are compare-and-set, and two processes claiming from one database never get
the same job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from bot import jobs as J
from bot.store import LATEST, Store
from converters.errors import StateError

REPO_ROOT = Path(__file__).resolve().parents[2]
PG_BASE = os.environ.get("GGUFBOT_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_BASE)
    try:
        with admin.begin() as c:
            c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError as e:
        pytest.skip(f"PostgreSQL not reachable: {e.orig}")
    try:
        sep = "&" if "?" in PG_BASE else "?"
        yield f"{PG_BASE}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as c:
            c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_fresh_store_is_at_latest_and_sqlite_uses_wal(db_url: str) -> None:
    st = Store(db_url)
    assert st.schema_version() == LATEST
    if db_url.startswith("sqlite"):
        with st.engine.connect() as c:
            assert c.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
        assert st.db_size() and st.db_size() > 0
    assert Store(db_url).schema_version() == LATEST  # opening again is a no-op


def test_upgrade_from_version_1_keeps_data(db_url: str) -> None:
    old = Store(db_url, migrate=False)
    assert old.migrate(target=1) == 1
    with old.engine.begin() as c:  # a row written by the version-1 code (no priority column yet)
        c.execute(sa.text("INSERT INTO jobs (repo, revision, dedup_key, reason, status, attempts, max_attempts, "
                          "created_at, updated_at) VALUES ('a/b', 'r1', 'a/b@r1', 'new release', 'queued', 0, 4, 1, 1)"))
        c.execute(sa.text("INSERT INTO models (repo, sha, decision, code, reason, decided_at, manual_skip) "
                          "VALUES ('a/b', 'r1', 'accepted', 'queued', 'new release', 1, false)"))
    old.close()
    st = Store(db_url)
    assert st.schema_version() == LATEST
    [job] = st.jobs()
    assert (job.repo, job.revision, job.status, job.priority) == ("a/b", "r1", J.Status.QUEUED, 0)
    assert st.model("a/b").reason == "new release"
    assert st.claim("w1", now=2).id == job.id


def test_enqueue_is_deduplicated_and_claim_is_ordered(db_url: str) -> None:
    st = Store(db_url)
    a = st.enqueue("o/a", "1" * 40, reason="new release", now=10)
    assert a is not None
    assert st.enqueue("o/a", "1" * 40, reason="again", now=11) is None  # same repo@commit: never twice
    b = st.enqueue("o/b", "2" * 40, reason="manual", now=12, priority=1)
    c = st.enqueue("o/a", "1" * 40, reason="toolchain", now=13, dedup_key="o/a@" + "1" * 40 + "#toolchain=v2")
    assert c is not None
    assert [st.claim("w", now=20).id for _ in range(3)] == [b, a, c]  # priority first, then age
    assert st.claim("w", now=20) is None
    ev = st.events(job_id=a)
    assert {e["kind"] for e in ev} == {"job.queued", "job.claimed"}


def test_transitions_are_compare_and_set(db_url: str) -> None:
    st = Store(db_url)
    jid = st.enqueue("o/m", "3" * 40, reason="r", now=1)
    with pytest.raises(StateError, match="queued -> published"):
        st.transition(jid, J.Status.PUBLISHED, now=2)
    job = st.claim("w1", now=3)
    assert job.status == J.Status.RUNNING and job.attempts == 1 and job.worker_id == "w1"
    with pytest.raises(StateError, match="held by w1"):
        st.transition(jid, J.Status.FAILED, now=4, worker_id="w2")
    assert st.update_running(jid, "w1", now=5, stage="quantize", progress="Q8_0 1/2")
    assert not st.update_running(jid, "w2", now=5, stage="x")
    st.transition(jid, J.Status.RETRYING, now=6, worker_id="w1", error_type="HubError", error_message="503",
                  not_before=100)
    assert st.claim("w1", now=50) is None  # waiting for its backoff
    job = st.claim("w2", now=100)
    assert job.id == jid and job.attempts == 2 and job.not_before is None
    st.transition(jid, J.Status.PUBLISHED, now=110, worker_id="w2", result={"target_repo": "me/m-GGUF"})
    job = st.job(jid)
    assert job.status == J.Status.PUBLISHED and job.finished_at == 110 and job.result["target_repo"] == "me/m-GGUF"
    with pytest.raises(StateError):
        st.transition(jid, J.Status.QUEUED, now=120)  # published is final
    assert st.counts() == {"published": 1}


def test_recover_stale_and_dead_workers(db_url: str) -> None:
    st = Store(db_url)
    ids = [st.enqueue("o/m", f"{i}" * 40, reason="r", now=0, max_attempts=2) for i in range(1, 4)]
    for w in ("alive", "stale", "dead"):
        st.claim(w, now=100)
    st.update_running(ids[0], "alive", now=390)
    st.update_running(ids[2], "dead", now=390, stage="quantize")
    got = st.recover_stale(now=400, stale_after=120, is_dead=lambda w: w == "dead")
    assert sorted(got) == [ids[1], ids[2]]
    assert st.job(ids[0]).status == J.Status.RUNNING
    assert st.job(ids[2]).status == J.Status.QUEUED and st.job(ids[2]).stage == "quantize"  # resumes there
    # a job whose worker died on its last attempt (max_attempts=2) fails instead of looping
    assert {st.claim("dead2", now=500).id, st.claim("dead2", now=500).id} == {ids[1], ids[2]}
    assert st.claim("x", now=500) is None
    st.update_running(ids[0], "alive", now=990)
    assert sorted(st.recover_stale(now=1000, stale_after=120)) == [ids[1], ids[2]]
    for i in (ids[1], ids[2]):
        job = st.job(i)
        assert (job.status, job.error_type, job.attempts) == (J.Status.FAILED, "WorkerDied", 2)
    assert st.job(ids[0]).status == J.Status.RUNNING


def test_decisions_sources_skips_and_events(db_url: str) -> None:
    st = Store(db_url)
    rows = [{"repo": "o/a", "sha": "a" * 40, "last_modified": "2026-11-20T00:00:00.000000Z", "decision": "skipped",
             "code": "remote_code", "reason": "needs remote code", "source": "author=o"},
            {"repo": "o/b", "sha": "b" * 40, "decision": "accepted", "code": "queued", "reason": "new release",
             "source": "author=o", "fingerprint": {"config.json": "sha256:1"}, "queued_sha": "b" * 40}]
    assert st.record_decisions(rows, now=1) == 2
    assert st.record_decisions(rows[:1], now=2) == 0  # the same repo@commit is one decision
    got = st.decided(["o/a", "o/b", "o/c"])
    assert set(got) == {"o/a", "o/b"} and got["o/b"].fingerprint == {"config.json": "sha256:1"}
    st.set_manual_skip("o/b", True, now=3)
    assert st.model("o/b").manual_skip and st.model("o/b").code == "manual"
    st.set_manual_skip("o/b", False, now=4)
    assert not st.model("o/b").manual_skip and st.model("o/b").sha is None  # decided afresh next poll
    st.record_poll("author=o", now=5, ok=True, mark="2026-11-20T00:00:00.000000Z")
    st.record_poll("author=o", now=6, ok=False, error="HubError: 500")
    src = st.source("author=o")
    assert (src.mark, src.polls, src.failures, src.last_error) == ("2026-11-20T00:00:00.000000Z", 2, 1, "HubError: 500")
    st.record_poll("author=o", now=7, ok=True, mark="2026-11-19T00:00:00.000000Z")  # a mark never goes back
    assert st.source("author=o").mark == "2026-11-20T00:00:00.000000Z"
    st.event("poll.failed", "x", now=8, data={"n": 1})
    assert st.events(kind="poll.*")[0]["data"] == {"n": 1}
    assert st.prune_events(before=8) == 0 and st.prune_events(before=9) == 1


CLAIMER = """
import json, sys
from bot.store import Store
st = Store(sys.argv[1])
got = []
while True:
    j = st.claim(sys.argv[2], now=1.0)
    if j is None:
        break
    got.append(j.id)
print(json.dumps(got))
"""


def test_two_processes_never_claim_the_same_job(db_url: str) -> None:
    st = Store(db_url)
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
