"""One contract, three stores: the in-memory store behaves as the SQL store on SQLite and PostgreSQL.

Every case runs on ``MemoryStore()``, on ``Store("sqlite:///...")`` and (marked ``postgres``) on the local
PostgreSQL server, so the fake the runner's and watcher's unit tests use keeps the database's rules: compare-and-set
moves, deduplicated jobs, one decision per repo@sha, stale-job recovery, sources, skips and events. The cases that
claim jobs from the table (claim order, claim races, stale-job recovery) run on the two stores that do; on PostgreSQL
procrastinate delivers jobs (``tests/integration/test_queue_pg.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.model import jobstate as J
from bot.queue.schema import INSTALLED
from bot.state.base import StateStore
from bot.state.memstore import MemoryStore
from bot.state.store import Store
from converters.core.errors import StateError
from tests.bot_fixtures import postgres_url


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def st(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "memory":
        store: StateStore = MemoryStore()
        yield store
        return
    if request.param == "sqlite":
        store = Store(f"sqlite:///{tmp_path / 'state.db'}")
        yield store
        store.close()
        return
    with postgres_url() as url:
        store = Store(url, queue_schema=INSTALLED)
        yield store
        store.close()


@pytest.fixture(params=["memory", "sqlite"])
def claim_st(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    """The stores that claim jobs themselves (on PostgreSQL procrastinate delivers them: test_queue_pg.py)."""
    if request.param == "memory":
        yield MemoryStore()
        return
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    yield store
    store.close()


def test_enqueue_is_deduplicated_and_claim_is_ordered(claim_st: StateStore) -> None:
    st = claim_st
    a = st.enqueue("o/a", "1" * 40, reason="new release", now=10)
    assert a is not None
    assert st.enqueue("o/a", "1" * 40, reason="again", now=11) is None  # same repo@commit: never twice
    b = st.enqueue("o/b", "2" * 40, reason="manual", now=12, priority=1)
    c = st.enqueue("o/a", "1" * 40, reason="toolchain", now=13, dedup_key="o/a@" + "1" * 40 + "#toolchain=v2")
    assert c is not None
    job = st.job(a)
    assert (job.status, job.attempts, job.dedup_key, job.created_at, job.priority) == (
        J.Status.QUEUED, 0, "o/a@" + "1" * 40, 10.0, 0)
    assert [st.claim("w", now=20).id for _ in range(3)] == [b, a, c]  # priority first, then age
    assert st.claim("w", now=20) is None
    ev = st.events(job_id=a)
    assert [e["kind"] for e in ev] == ["job.claimed", "job.queued"]  # newest first
    assert ev[1]["message"] == "queued o/a@111111111111: new release" and ev[1]["repo"] == "o/a"
    assert ev[0]["message"] == "claimed by w" and ev[0]["data"] == {"worker_id": "w"}


def test_transitions_are_compare_and_set(claim_st: StateStore) -> None:
    st = claim_st
    jid = st.enqueue("o/m", "3" * 40, reason="r", now=1)
    with pytest.raises(StateError, match="queued -> published"):
        st.transition(jid, J.Status.PUBLISHED, now=2)
    with pytest.raises(StateError, match="job 999 does not exist"):
        st.transition(999, J.Status.CANCELLED, now=2)
    job = st.claim("w1", now=3)
    assert job.status == J.Status.RUNNING and job.attempts == 1 and job.worker_id == "w1" and job.started_at == 3
    with pytest.raises(StateError, match="held by w1"):
        st.transition(jid, J.Status.FAILED, now=4, worker_id="w2")
    assert st.update_running(jid, "w1", now=5, stage="quantize", progress="Q8_0 1/2")
    assert not st.update_running(jid, "w2", now=5, stage="x")
    assert (st.job(jid).stage, st.job(jid).progress, st.job(jid).heartbeat_at) == ("quantize", "Q8_0 1/2", 5)
    st.transition(jid, J.Status.RETRYING, now=6, worker_id="w1", error_type="HubError", error_message="503",
                  not_before=100)
    assert not st.update_running(jid, "w1", now=7)  # no longer running
    assert st.claim("w1", now=50) is None  # waiting for its backoff
    job = st.claim("w2", now=100)
    assert job.id == jid and job.attempts == 2 and job.not_before is None and job.started_at == 3
    st.transition(jid, J.Status.PUBLISHED, now=110, worker_id="w2", result={"target_repo": "me/m-GGUF"})
    job = st.job(jid)
    assert job.status == J.Status.PUBLISHED and job.finished_at == 110 and job.result["target_repo"] == "me/m-GGUF"
    with pytest.raises(StateError):
        st.transition(jid, J.Status.QUEUED, now=120)  # published is final
    assert st.counts() == {"published": 1}
    kinds = [e["kind"] for e in st.events(job_id=jid)]
    assert kinds == ["job.published", "job.claimed", "job.retrying", "job.claimed", "job.queued"]


def test_returned_rows_are_copies(st: StateStore) -> None:
    jid = st.enqueue("o/m", "4" * 40, reason="r", now=1, fingerprint={"config.json": "size:2"})
    st.job(jid).fingerprint["config.json"] = "changed"
    assert st.job(jid).fingerprint == {"config.json": "size:2"}
    st.event("poll.ok", "x", now=2, data={"n": [1, 2]})
    st.events()[0]["data"]["n"].append(3)
    assert st.events()[0]["data"] == {"n": [1, 2]}


def test_jobs_filters_and_orders(st: StateStore) -> None:
    a = st.enqueue("o/a", "1" * 40, reason="r", now=1)
    b = st.enqueue("o/b", "2" * 40, reason="r", now=2)
    c = st.enqueue("o/a", "3" * 40, reason="r", now=3)
    st.transition(b, J.Status.CANCELLED, now=10)
    assert [j.id for j in st.jobs()] == [a, b, c]
    assert [j.id for j in st.jobs(["queued"])] == [a, c]
    assert [j.id for j in st.jobs(repo="o/a", limit=1)] == [a]
    assert [j.id for j in st.jobs(newest_first=True)] == [b, c, a]
    assert st.counts() == {"cancelled": 1, "queued": 2}


def test_recover_stale_and_dead_workers(claim_st: StateStore) -> None:
    st = claim_st
    ids = [st.enqueue("o/m", f"{i}" * 40, reason="r", now=0, max_attempts=2) for i in range(1, 4)]
    for w in ("alive", "stale", "dead"):
        st.claim(w, now=100)
    st.update_running(ids[0], "alive", now=390)
    st.update_running(ids[2], "dead", now=390, stage="quantize")
    got = st.recover_stale(now=400, stale_after=120, is_dead=lambda w: w == "dead")
    assert sorted(got) == [ids[1], ids[2]]
    assert st.job(ids[0]).status == J.Status.RUNNING
    assert st.job(ids[2]).status == J.Status.QUEUED and st.job(ids[2]).stage == "quantize"  # resumes there
    assert st.events(job_id=ids[2])[0]["message"] == "requeued: its worker died (was dead, stage quantize)"
    # a job whose worker died on its last attempt (max_attempts=2) fails instead of looping
    assert {st.claim("dead2", now=500).id, st.claim("dead2", now=500).id} == {ids[1], ids[2]}
    assert st.claim("x", now=500) is None
    st.update_running(ids[0], "alive", now=990)
    assert sorted(st.recover_stale(now=1000, stale_after=120)) == [ids[1], ids[2]]
    for i in (ids[1], ids[2]):
        job = st.job(i)
        assert (job.status, job.error_type, job.attempts) == (J.Status.FAILED, "WorkerDied", 2)
    assert st.job(ids[1]).error_message == "no heartbeat for 500 s during start on attempt 2"
    assert st.job(ids[0]).status == J.Status.RUNNING


def test_decisions_sources_skips_and_events(st: StateStore) -> None:
    rows = [{"repo": "o/a", "sha": "a" * 40, "last_modified": "2026-11-20T00:00:00.000000Z", "decision": "skipped",
             "code": "remote_code", "reason": "needs remote code", "source": "author=o"},
            {"repo": "o/b", "sha": "b" * 40, "decision": "accepted", "code": "queued", "reason": "new release",
             "source": "author=o", "fingerprint": {"config.json": "sha256:1"}, "queued_sha": "b" * 40}]
    assert st.record_decisions(rows, now=1) == 2
    assert st.record_decisions(rows[:1], now=2) == 0  # the same repo@commit is one decision
    got = st.decided(["o/a", "o/b", "o/c"])
    assert set(got) == {"o/a", "o/b"} and got["o/b"].fingerprint == {"config.json": "sha256:1"}
    assert got["o/a"].decided_at == 2 and got["o/a"].fingerprint is None and not got["o/a"].manual_skip
    assert [m.repo for m in st.models()] == ["o/a", "o/b"] and [m.repo for m in st.models("accepted")] == ["o/b"]
    assert [(d["repo"], d["code"]) for d in st.decisions()] == [("o/b", "queued"), ("o/a", "remote_code")]
    st.set_manual_skip("o/b", True, now=3)
    assert st.model("o/b").manual_skip and st.model("o/b").code == "manual"
    assert st.model("o/b").fingerprint == {"config.json": "sha256:1"}  # kept for the next requeue
    st.set_manual_skip("o/a", False, now=4)
    assert st.model("o/a").sha is None and st.decisions("o/a") == []  # decided afresh next poll
    st.set_manual_skip("o/new", True, now=4, reason="noisy")
    assert (st.model("o/new").decision, st.model("o/new").reason, st.model("o/new").sha) == ("skipped", "noisy", None)
    st.record_poll("author=o", now=5, ok=True, mark="2026-11-20T00:00:00.000000Z")
    st.record_poll("author=o", now=6, ok=False, error="HubError: 500")
    src = st.source("author=o")
    assert (src.mark, src.polls, src.failures, src.last_error) == ("2026-11-20T00:00:00.000000Z", 2, 1, "HubError: 500")
    st.record_poll("author=o", now=7, ok=True, mark="2026-11-19T00:00:00.000000Z")  # a mark never goes back
    assert st.source("author=o").mark == "2026-11-20T00:00:00.000000Z" and st.source("author=o").last_error is None
    assert [s.key for s in st.sources()] == ["author=o"] and st.source("author=x") is None
    st.event("poll.failed", "x", now=8, data={"n": 1})
    st.event("stage.end", "y" * 5000, now=8)
    assert st.events(kind="poll.*")[0]["data"] == {"n": 1}
    assert len(st.events(kind="stage.end")[0]["message"]) == 4000
    assert st.prune_events(before=8) == 0 and st.prune_events(before=9) == 2


def test_apply_decisions_queues_and_marks_duplicates(st: StateStore) -> None:
    def batch(sha: str) -> tuple[list[dict], list[dict]]:
        item = {"repo": "o/m", "sha": sha, "decision": "accepted", "code": "queued", "reason": "new release",
                "source": "author=o", "fingerprint": {"model.safetensors": "sha256:1"}, "queued_sha": sha}
        return [item], [{"repo": "o/m", "revision": sha, "reason": "new release", "fingerprint": item["fingerprint"],
                         "max_attempts": 3, "item": item}]

    items, enq = batch("c" * 40)
    n, ids = st.apply_decisions(items, enq, now=1)
    assert n == 1 and ids[0] is not None and st.job(ids[0]).max_attempts == 3
    st.set_manual_skip("o/m", False, now=2)  # forgets the sha, so the same commit is decided again
    items, enq = batch("c" * 40)
    assert st.apply_decisions(items, enq, now=3) == (0, [None])
    assert items[0]["code"] == "duplicate" and "already has a job" in items[0]["reason"]
    assert "fingerprint" not in items[0] and st.model("o/m").code == "duplicate"
    assert st.model("o/m").queued_sha == "c" * 40  # the queued revision's fingerprint stays
    assert len(st.jobs()) == 1


def test_artifacts(st: StateStore) -> None:
    jid = st.enqueue("o/m", "5" * 40, reason="r", now=1)
    st.add_artifact(jid, "gguf", "m-Q8_0.gguf", now=2, size=10, sha256="f" * 64)
    st.add_artifact(jid, "repo", "me/m-GGUF", now=3, url="https://example.invalid/me/m-GGUF")
    got = st.artifacts(jid)
    assert [(a["kind"], a["path"], a["size"], a["url"]) for a in got] == [
        ("gguf", "m-Q8_0.gguf", 10, None), ("repo", "me/m-GGUF", None, "https://example.invalid/me/m-GGUF")]
    assert st.artifacts(jid + 1) == []


def test_two_threads_never_claim_the_same_job(claim_st: StateStore) -> None:
    st = claim_st
    ids = [st.enqueue("o/m", f"{i:040d}", reason="r", now=0) for i in range(40)]
    got: dict[str, list[int]] = {"a": [], "b": []}

    def claimer(name: str) -> None:
        while (job := st.claim(name, now=1.0)) is not None:
            got[name].append(job.id)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    claimed = got["a"] + got["b"]
    assert sorted(claimed) == sorted(ids) and len(set(claimed)) == len(claimed)
    assert all(j.attempts == 1 for j in st.jobs())


def test_take_a_delivered_job_counts_the_attempt_and_names_the_stalled_worker(st: StateStore) -> None:
    jid = st.enqueue("o/t", "1" * 40, reason="new", now=1)
    job = st.take(jid, "box1:1:a", now=2)
    assert (job.status, job.worker_id, job.attempts, job.started_at) == (J.Status.RUNNING, "box1:1:a", 1, 2.0)
    job = st.take(jid, "box2:1:b", now=3)  # delivered again after box1's worker stalled
    assert (job.status, job.worker_id, job.attempts, job.started_at) == (J.Status.RUNNING, "box2:1:b", 2, 2.0)
    assert not st.update_running(jid, "box1:1:a", now=4, progress="x")  # box1 has lost it
    assert [e["message"] for e in st.events(job_id=jid, kind="job.claimed")] == \
        ["claimed by box2:1:b (was running on box1:1:a, which stopped)", "claimed by box1:1:a"]
    st.transition(jid, J.Status.CANCELLED, now=5)
    assert st.take(jid, "box3:1:c", now=6) is None  # a cancelled job is not run
    assert st.take(999, "box3:1:c", now=6) is None  # nor one that does not exist


def test_workers_are_listed_with_the_jobs_they_run(st: StateStore) -> None:
    assert st.workers(now=10) == []
    st.register_worker("box1:10:ab", host="box1", queue_worker_id=None, queues=["ggufbot"], concurrency=2, gpu=False,
                       max_model_gb=None, now=1)
    st.register_worker("box2:20:cd", host="box2", queue_worker_id=None, queues=["ggufbot"], concurrency=1, gpu=True,
                       max_model_gb=40.0, now=2)
    jid = st.enqueue("o/w", "1" * 40, reason="new", now=3)
    st.take(jid, "box1:10:ab-1", now=4)  # a slot of box1's worker
    st.worker_stopped("box2:20:cd", now=5)
    rows = st.workers(now=10)
    assert [(w["name"], w["host"], w["queues"], w["running"], w["stopped_at"], w["alive"]) for w in rows] == [
        ("box2:20:cd", "box2", ["ggufbot"], [], 5.0, False),
        ("box1:10:ab", "box1", ["ggufbot"], [jid], None, False)]  # no queue heartbeat: not alive
    assert rows[0]["max_model_gb"] == 40.0 and rows[0]["gpu"] is True and rows[1]["heartbeat_age_s"] is None
