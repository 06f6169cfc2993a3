"""Jobs over procrastinate on the local PostgreSQL (``bot.queue.box``), each test on a throw-away schema.

ggufbot's migrate step applies procrastinate's schema; the home-made claim and stale-job sweep are refused on
PostgreSQL; a delivered job is taken by compare-and-set (again after its worker stalled, counting the attempt);
the scheduler's tick hands queued jobs to procrastinate once, one waiting job per repo (queueing lock), big
models to the big queue; a worker whose heartbeat stopped has its job put back (not right after a gap in the
ticks); the retry strategy is ggufbot's retry policy.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from asgiref.sync import sync_to_async

from bot.model import jobstate as J
from bot.queue import box as Q
from bot.queue.schema import open_store
from bot.model import settings as settings_mod
from bot.state.engine import conninfo
from bot.state.schema import LATEST
from converters.core.errors import HubError, InputError, StateError
from tests.bot_fixtures import postgres_url

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url():
    with postgres_url() as url:
        yield url


def make_settings(url: str, tmp_path, **sections: Any) -> settings_mod.Settings:
    raw = {"database_url": url, "data_dir": str(tmp_path / "data"), "sources": [{"author": "acme"}],
           "schedule": {"dispatch_seconds": 1, "heartbeat_seconds": 1, "stale_after_seconds": 3,
                        "retry_base_seconds": 5}, **sections}
    return settings_mod.from_mapping(raw, env={}, free_disk=10**12)


def test_migrate_applies_procrastinate_schema_and_refuses_the_home_made_queue(pg_url: str) -> None:
    st = open_store(pg_url)
    assert st.schema_version() == LATEST
    insp = sa.inspect(st.engine)
    assert {"procrastinate_jobs", "procrastinate_workers", "workers", "jobs"} <= set(insp.get_table_names())
    assert open_store(pg_url).schema_version() == LATEST  # opening again is a no-op
    jid = st.enqueue("acme/M", "a" * 40, reason="new", now=1)
    with pytest.raises(StateError, match="procrastinate"):
        st.claim("w", now=2)
    with pytest.raises(StateError, match="procrastinate"):
        st.recover_stale(now=2, stale_after=1)
    job = st.take(jid, "box1:1:a", now=3)
    assert (job.status, job.worker_id, job.attempts) == (J.Status.RUNNING, "box1:1:a", 1)
    # delivered again after box1's worker stalled: box2 takes it over, the attempt counts
    job = st.take(jid, "box2:1:b", now=4)
    assert (job.status, job.worker_id, job.attempts) == (J.Status.RUNNING, "box2:1:b", 2)
    assert not st.update_running(jid, "box1:1:a", now=5, progress="x")  # box1 has lost it
    st.transition(jid, J.Status.CANCELLED, now=6)
    assert st.take(jid, "box3:1:c", now=7) is None  # a cancelled job is not run
    ev = st.events(job_id=jid, kind="job.claimed")
    assert "was running on box1:1:a" in ev[0]["message"]
    st.close()


def test_tick_dispatches_once_per_repo_and_routes_big_models(pg_url: str, tmp_path) -> None:
    s = make_settings(pg_url, tmp_path, worker={"big_model_gb": 10.0, "gpu": True})
    st = open_store(pg_url)
    now = time.time()
    a1 = st.enqueue("acme/A", "1" * 40, reason="new", now=now)
    a2 = st.enqueue("acme/A", "2" * 40, reason="new revision", now=now)
    big = st.enqueue("acme/Big", "3" * 40, reason="new", now=now)
    st.event("job.size", "20 GB to fetch", now=now, job_id=big, repo="acme/Big", data={"bytes": 20 * 10**9})
    box = Q.Box(s, store=st, hub=object(), poll=False)

    async def go() -> tuple[list[int], list[int], list[int]]:
        async with box.app.open_async():
            first = await sync_to_async(box.dispatch, thread_sensitive=False)(now)
            again = await sync_to_async(box.dispatch, thread_sensitive=False)(now)
            rows = await box.app.job_manager.list_jobs_async()
            queues = [(r.task_kwargs["job_id"], r.queue, r.lock, r.queueing_lock) for r in rows]
            return first, again, queues

    first, again, queues = asyncio.run(go())
    assert sorted(first) == sorted([a1, big])  # one waiting job per repo: A's second revision waits its turn
    assert again == []  # never handed out twice
    assert sorted(queues) == sorted([(a1, Q.QUEUE, "acme/A", "acme/A"), (big, Q.BIG_QUEUE, "acme/Big", "acme/Big")])
    assert Q.worker_queues(s) == [Q.QUEUE, Q.BIG_QUEUE]
    assert Q.worker_queues(make_settings(pg_url, tmp_path)) == [Q.QUEUE]  # not a GPU box: not the big queue
    assert a2 not in first
    st.close()


def test_stalled_worker_jobs_go_back_but_not_after_a_gap(pg_url: str, tmp_path) -> None:
    s = make_settings(pg_url, tmp_path)
    st = open_store(pg_url)
    now = time.time()
    jid = st.enqueue("acme/A", "1" * 40, reason="new", now=now)
    box = Q.Box(s, store=st, hub=object(), poll=False)

    async def go() -> tuple[list[int], list[int], str]:
        async with box.app.open_async():
            jm = box.app.job_manager
            await sync_to_async(box.dispatch, thread_sensitive=False)(now)
            wid = await jm.register_worker()
            got = await jm.fetch_job(queues=None, worker_id=wid)
            assert got is not None and got.task_kwargs == {"job_id": jid}
            st.take(jid, "dead:1:x", now=now)
            await asyncio.sleep(s.schedule.stale_after_seconds + 1.5)  # the worker sends no heartbeat
            t = time.time()
            after_gap = await sync_to_async(box.recover_stalled, thread_sensitive=False)(t)  # first tick: a gap
            box._up_since = t - s.schedule.stale_after_seconds  # up for a stall timeout since
            seen = await sync_to_async(box.recover_stalled, thread_sensitive=False)(t)  # first seen stalled
            recovered = await sync_to_async(box.recover_stalled, thread_sensitive=False)(
                t + s.schedule.stale_after_seconds / 2)  # still stalled half a stall timeout later
            assert seen == []
            status = (await jm.list_jobs_async())[0].status
            return after_gap, recovered, status

    box._up_since = None
    after_gap, recovered, status = asyncio.run(go())
    assert after_gap == [] and recovered == [jid] and status == "todo"
    st.close()


@pytest.mark.parametrize("error,attempts,expected", [
    (HubError("503", status=503), 1, 5.0),  # transient: backoff from retry_base_seconds
    (HubError("503", status=503), 2, 10.0),
    (HubError("503", status=503), 4, None),  # limits.max_attempts reached
    (InputError("no config.json"), 1, None),  # permanent
])
def test_retry_strategy_is_the_retry_policy(tmp_path, error, attempts, expected) -> None:
    s = make_settings("postgresql+psycopg://u@h/db", tmp_path)
    d = Q.PolicyRetry(s).get_retry_decision(exception=Q.JobFailed(error, attempts, 4), job=None)
    if expected is None:
        assert d is None
    else:
        assert d is not None and abs((d.retry_at.timestamp() - time.time()) - expected) < 2
    released = Q.PolicyRetry(s).get_retry_decision(exception=Q.Released("stop"), job=None)
    assert released is not None and released.retry_at.timestamp() <= time.time() + 1


def test_conninfo_keeps_options() -> None:
    got = conninfo("postgresql+psycopg://u:p@h:5433/db?options=-csearch_path%3Dt_1")
    assert got.startswith("postgresql://u:p@h:5433/db?options=") and "search_path" in got


def test_status_lists_every_box_worker_with_its_jobs(pg_url: str, tmp_path) -> None:
    from bot.service.status import status_data

    s = make_settings(pg_url, tmp_path)
    st = open_store(pg_url)
    now = time.time()
    jid = st.enqueue("acme/A", "1" * 40, reason="new", now=now)
    box = Q.Box(s, store=st, hub=object(), poll=False)

    async def register() -> int:
        async with box.app.open_async():
            return await box.app.job_manager.register_worker()

    live = asyncio.run(register())
    st.register_worker("box1:10:worker", host="box1", queue_worker_id=live, queues=[Q.QUEUE], concurrency=2,
                       gpu=True, max_model_gb=None, now=now)
    st.register_worker("box2:20:worker", host="box2", queue_worker_id=None, queues=[Q.QUEUE], concurrency=1,
                       gpu=False, max_model_gb=8.0, now=now)  # never got a procrastinate id: not alive
    st.register_worker("box3:30:worker", host="box3", queue_worker_id=live, queues=[Q.QUEUE], concurrency=1,
                       gpu=False, max_model_gb=None, now=now)
    st.worker_stopped("box3:30:worker", now=now + 1)
    st.take(jid, "box1:10:worker-1", now=now)  # its second slot
    ws = {w["name"]: w for w in status_data(st, s, now)["workers"]}
    assert ws["box1:10:worker"]["alive"] and ws["box1:10:worker"]["running"] == [jid]
    assert ws["box1:10:worker"]["heartbeat_age_s"] < 5 and ws["box1:10:worker"]["gpu"]
    assert not ws["box2:20:worker"]["alive"] and ws["box2:20:worker"]["running"] == []
    assert not ws["box3:30:worker"]["alive"] and ws["box3:30:worker"]["stopped_at"] == now + 1
    st.close()


def test_worker_release_on_stop_and_retries_go_through_procrastinate(pg_url: str, tmp_path, monkeypatch) -> None:
    """A real procrastinate worker runs the runner; the stages are stood in for by a function honouring the
    stop request (SIGTERM), a transient and a permanent error: ggufbot's record and procrastinate's job agree."""
    import bot.service.runner as runner_mod

    s = make_settings(pg_url, tmp_path)
    st = open_store(pg_url)
    now = time.time()
    ids = {name: st.enqueue(f"acme/{name}", "1" * 40, reason="new", now=now) for name in ("Stop", "Hub503", "Bad")}
    started = threading.Event()

    def fake_run(self, job, workdir, hooks):  # Runner._run: the stages, then the bookkeeping
        if job.repo == "acme/Hub503":
            raise HubError("upstream 503", status=503)
        if job.repo == "acme/Bad":
            raise InputError("config.json is missing")
        started.set()
        while True:  # a long stage: it checks for a stop request between steps
            hooks.check_cancel()
            time.sleep(0.05)

    monkeypatch.setattr(runner_mod.Runner, "_run", fake_run)
    box = Q.Box(s, store=st, hub=object(), toolchain=object(), concurrency=3, poll=False)

    async def go() -> dict[int, Any]:
        async with box.app.open_async():
            await sync_to_async(box.dispatch, thread_sensitive=False)(now)
        serving = asyncio.create_task(box.serve(jobs=True, install_signals=False))
        await asyncio.to_thread(started.wait, 30)
        for _ in range(100):  # the two failing jobs end at once
            if all(st.job(ids[n]).status in (J.Status.RETRYING, J.Status.FAILED) for n in ("Hub503", "Bad")):
                break
            await asyncio.sleep(0.1)
        box.on_signal(signal.SIGTERM)
        assert await asyncio.wait_for(serving, 30) == 0
        async with box.app.open_async():
            return {r.task_kwargs["job_id"]: r for r in await box.app.job_manager.list_jobs_async(task=Q.JOB_TASK)}

    pq = asyncio.run(go())
    stop, hub, bad = (st.job(ids[n]) for n in ("Stop", "Hub503", "Bad"))
    assert (stop.status, stop.attempts) == (J.Status.QUEUED, 0)  # released, the attempt not counted
    assert pq[stop.id].status == "todo" and pq[stop.id].scheduled_at.timestamp() <= time.time() + 1
    assert (hub.status, hub.error_type) == (J.Status.RETRYING, "HubError")
    assert pq[hub.id].status == "todo"  # procrastinate retries it after the policy's delay, as recorded
    assert abs(pq[hub.id].scheduled_at.timestamp() - hub.not_before) < 3
    assert (bad.status, bad.error_type) == (J.Status.FAILED, "InputError") and pq[bad.id].status == "failed"
    st.close()


def test_side_tasks_ending_on_the_lost_connection_while_stopping_log_one_warning_line() -> None:
    import logging

    import psycopg
    from procrastinate import exceptions as pq_exc

    def lost() -> BaseException:
        try:
            try:
                raise psycopg.OperationalError("connection refused")
            except psycopg.OperationalError as e:
                raise pq_exc.ConnectorException() from e
        except pq_exc.ConnectorException as e:
            return e

    def record(exc: BaseException, **extra: Any) -> logging.LogRecord:
        r = logging.LogRecord("procrastinate.worker.worker", logging.ERROR, __file__, 1,
                              "Side task deferrer failed with exception: %s, stopping worker", (exc,),
                              (type(exc), exc, exc.__traceback__))
        r.__dict__.update(extra)
        return r

    stopping = threading.Event()
    quiet = Q.QuietStopInOutage(stopping)
    r = record(lost(), task_name="deferrer")
    assert quiet.filter(r) and r.levelno == logging.ERROR and r.exc_info  # not stopping: left as it is
    stopping.set()
    assert quiet.filter(r) and (r.levelname, r.getMessage(), r.exc_info, r.exc_text) == (
        "WARNING", "deferrer ended: PostgreSQL unreachable while stopping", None, None)
    u = logging.LogRecord("procrastinate.utils", logging.ERROR, __file__, 1, "deferrer error: %r", (lost(),), None)
    u.exc_info = (pq_exc.ConnectorException, u.args[0], None)
    assert quiet.filter(u) and u.getMessage() == "deferrer ended: PostgreSQL unreachable while stopping"
    other = record(ValueError("a bug"), task_name="deferrer")  # anything else stays an error with its traceback
    assert quiet.filter(other) and other.levelno == logging.ERROR and other.exc_info
