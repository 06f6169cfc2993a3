"""Jobs over procrastinate, when the state is in PostgreSQL: several boxes, one job semantics.

With a ``postgresql+psycopg://`` ``database_url`` the jobs table stays ggufbot's record of every job (status,
stage, progress, attempts, errors, results: what ``status`` and the web page read) and procrastinate delivers
them: a ggufbot job ``N`` of repo ``X`` becomes the procrastinate task ``ggufbot.job(job_id=N)`` holding the lock
and the queueing lock ``X`` (``FOR UPDATE SKIP LOCKED`` claims, no visibility timeout: a six-hour imatrix run is
never handed out twice; ``X`` is never run twice at once). A worker runs it with the single-box
:class:`bot.service.runner.Runner` (the same :func:`bot.jobs.job.run_job`, no second copy of the stages).

The scheduler is two periodic tasks on their own queue, each with its own lock, so one of each runs at a time
however many schedulers run: ``ggufbot.poll`` polls the sources when due (the ``sources`` table says when each was
last polled, so it is shared by every scheduler), and each ``ggufbot.tick`` hands queued ggufbot jobs to
procrastinate on the queue their size calls for (:func:`queue_for`), puts back the jobs of workers whose
procrastinate heartbeat stopped (``schedule.stale_after_seconds``; a job whose workers died ``limits.max_attempts``
times fails), and does the housekeeping. Retries follow :class:`bot.model.retry.RetryPolicy` through
:class:`PolicyRetry`, procrastinate's retry strategy; a job released by a stop request (SIGTERM) goes back to the
queue at once without using an attempt.

Work directories are per box (``<data_dir>/work/job-N-...`` on the box that runs it): a job that moves to another
box after a crash starts its stages again there, one that comes back to the same box resumes.

Every procrastinate query waits out a PostgreSQL outage (:class:`RidingConnector`) by the state store's rule
(:class:`bot.state.engine.OutageWait`): workers and the scheduler stall and continue; a tick that follows a gap
waits one stall timeout before it judges worker heartbeats, so a worker that could not reach the server is not taken
for dead. The queue's schema (procrastinate's) is handed to the state store by :mod:`bot.queue.schema`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue as queue_mod
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import procrastinate
import psycopg
import psycopg_pool
from procrastinate import exceptions as pq_exc
from procrastinate import jobs as pq_jobs
from procrastinate import retry as pq_retry
from procrastinate import utils as pq_utils
from procrastinate.worker import Worker

from bot.hub.client import Hub
from bot.model import jobstate as J
from bot.model.retry import RetryPolicy
from bot.queue.schema import check_schema, open_store
from bot.service.runner import Runner, new_worker_id, on_stop_signal, retry_policy, slug
from bot.service.scheduler import EVENT_RETENTION_DAYS, Bot
from bot.model.settings import Settings
from bot.state.engine import OutageWait, conninfo, stop_waiting_for_the_server
from bot.state.store import Store

log = logging.getLogger(__name__)

QUEUE = "ggufbot"  # jobs every box takes
BIG_QUEUE = "ggufbot-big"  # models over worker.big_model_gb: only big boxes listen
SCHEDULER_QUEUE = "ggufbot-scheduler"  # the scheduler's tick
JOB_TASK = "ggufbot.job"
TICK_TASK = "ggufbot.tick"
TICK_LOCK = "ggufbot-scheduler"
POLL_TASK = "ggufbot.poll"  # the poll has its own task: a long poll never holds up dispatch and recovery
POLL_LOCK = "ggufbot-poll"

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------
# Connection
# --------------------------------------------------------------------------------------------------


def _lost_connection(e: BaseException) -> bool:
    return isinstance(e, pq_exc.ConnectorException) and not isinstance(e, pq_exc.UniqueViolation) and \
        isinstance(e.__cause__, psycopg.OperationalError)


class QuietStopInOutage(logging.Filter):
    """Once a stop is requested during an outage, :class:`RidingConnector` stops waiting, and procrastinate's side
    tasks (heartbeat, periodic deferrer, listener) end on the lost connection, each logged as an ERROR with two
    tracebacks. That is the stop working, not a failure: such a record becomes one WARNING line without the
    traceback. Any other record passes unchanged."""

    def __init__(self, stopping: threading.Event) -> None:
        super().__init__()
        self.stopping = stopping

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if self.stopping.is_set() and exc is not None and _lost_connection(exc):
            what = getattr(record, "task_name", None) or record.getMessage().split(" error:", 1)[0]
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.msg, record.args = "%s ended: PostgreSQL unreachable while stopping", (what,)
            record.exc_info, record.exc_text = None, None
        return True


class RidingConnector(procrastinate.PsycopgConnector):
    """procrastinate's psycopg connector, waiting out a PostgreSQL outage (:class:`bot.state.engine.OutageWait`,
    the state store's rule) instead of failing: the worker's heartbeat, job fetch, job completion and LISTEN loop
    all stall and continue. Once ``give_up`` is set (a stop request) it waits no more: a worker stopped during an
    outage exits at once."""

    give_up: threading.Event | None = None

    def _giving_up(self) -> bool:
        return self.give_up is not None and self.give_up.is_set()

    async def _ride(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        wait = OutageWait(self._giving_up)
        while True:
            try:
                out = await call()
                if wait.warned:
                    log.warning("queue: PostgreSQL reachable again (%s)", what)
                return out
            except pq_exc.ConnectorException as e:
                if not _lost_connection(e):
                    raise
                delay = wait.retry_in(lambda e=e: log.warning(
                    "queue: PostgreSQL unreachable during %s (%s); waiting for it", what,
                    str(e.__cause__).splitlines()[0][:200] if str(e.__cause__) else type(e.__cause__)))
                if delay is None:
                    raise
                await asyncio.sleep(delay)

    async def execute_query_async(self, query: Any, **arguments: Any) -> None:
        return await self._ride("a query", lambda: super(RidingConnector, self).execute_query_async(query, **arguments))

    async def execute_query_one_async(self, query: Any, **arguments: Any) -> dict[str, Any]:
        return await self._ride("a query",
                                lambda: super(RidingConnector, self).execute_query_one_async(query, **arguments))

    async def execute_query_all_async(self, query: Any, **arguments: Any) -> list[dict[str, Any]]:
        return await self._ride("a query",
                                lambda: super(RidingConnector, self).execute_query_all_async(query, **arguments))

    async def listen_notify(self, on_notification: Any, channels: Iterable[str]) -> None:
        channels = list(channels)
        while True:  # the parent reconnects a dead listener once; a refused reconnection is retried here
            try:
                await super().listen_notify(on_notification=on_notification, channels=channels)
            except pq_exc.ConnectorException as e:
                if not _lost_connection(e) or self._giving_up():
                    raise
                await asyncio.sleep(1.0)  # the worker also polls for jobs, so nothing is missed meanwhile


# --------------------------------------------------------------------------------------------------
# Routing and retries
# --------------------------------------------------------------------------------------------------


def queue_for(size_bytes: int | None, settings: Settings) -> str:
    """The queue of a job whose model has ``size_bytes`` of weights (unknown: the common queue)."""
    if size_bytes is not None and size_bytes > settings.worker.big_model_gb * 1e9:
        return BIG_QUEUE
    return QUEUE


def worker_queues(settings: Settings) -> list[str]:
    """The job queues this box listens to: the common one, and the big one on a GPU box whose own size limit
    (``worker.max_model_gb``, none by default) is above ``worker.big_model_gb``."""
    w = settings.worker
    big = w.gpu and (w.max_model_gb is None or w.max_model_gb > w.big_model_gb)
    return [QUEUE, BIG_QUEUE] if big else [QUEUE]


class Released(Exception):
    """The job was put back by a stop request (SIGTERM): procrastinate hands it out again at once."""


class JobFailed(Exception):
    """A job's run ended in an error; ``error`` is the original, ``attempts`` the attempts made."""

    def __init__(self, error: BaseException, attempts: int, max_attempts: int):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error, self.attempts, self.max_attempts = error, attempts, max_attempts


@dataclasses.dataclass
class PolicyRetry(pq_retry.BaseRetryStrategy):
    """procrastinate's retry strategy from ggufbot's one rule (:class:`bot.model.retry.RetryPolicy`, job-scale delays):
    transient errors retry with backoff up to ``limits.max_attempts``, permanent ones do not; a released job
    (stop request) goes back at once. The attempt count is ggufbot's (a release does not count)."""

    settings: Settings

    def policy(self, max_attempts: int) -> RetryPolicy:
        return retry_policy(self.settings, max_attempts)

    def get_retry_decision(self, *, exception: BaseException, job: pq_jobs.Job | None) -> pq_retry.RetryDecision | None:
        if isinstance(exception, Released):
            return pq_retry.RetryDecision(retry_in={"seconds": 0})
        if isinstance(exception, JobFailed):
            delay = self.policy(exception.max_attempts).decide(exception.error, exception.attempts)
            return None if delay is None else pq_retry.RetryDecision(retry_in={"seconds": delay})
        return None  # a bug in the task itself: ggufbot's record says failed, nothing to retry


# --------------------------------------------------------------------------------------------------
# One box: the app, its tasks, its workers
# --------------------------------------------------------------------------------------------------


class Box:
    """What one process (``ggufbot worker``, ``ggufbot run``) brings to the queue: the procrastinate app with its
    two tasks, the state store, the Hub adapter, and one :class:`Runner` per concurrency slot."""

    def __init__(self, settings: Settings, *, store: Store | None = None, hub: Hub | None = None,
                 toolchain: Any = None, concurrency: int | None = None, bot: Bot | None = None, poll: bool = True):
        self.settings = settings
        self.store = store or open_store(settings.database_url)
        if not self.store.queued_by_procrastinate:
            raise ValueError("bot.queue.box needs a PostgreSQL database_url")
        if hub is None:
            hub = Hub(token=settings.token, endpoint=settings.hub.endpoint)
        self.hub = hub
        self.toolchain = toolchain
        self.bot = bot  # a bot.service.scheduler.Bot when this process also schedules (its watcher polls)
        self.poll_enabled = poll
        self.host = socket.gethostname()
        self.stop = threading.Event()
        self.concurrency = concurrency or settings.limits.concurrency
        base = self.base_name = new_worker_id()  # host:pid:hex; runner slots are base-0, base-1...
        namespace = getattr(bot, "namespace", None) or settings.target.namespace
        self.runners: queue_mod.Queue[Runner] = queue_mod.Queue()
        self.names = [base if self.concurrency == 1 else f"{base}-{i}" for i in range(self.concurrency)]
        for name in self.names:
            self.runners.put(Runner(settings, self.store, hub, worker_id=name, toolchain=toolchain,
                                    namespace=namespace, stop=self.stop))
        self.app = self._app()
        self.workers: list[tuple[Worker, str, list[str], int]] = []
        self._last_tick: float | None = None
        self._up_since: float | None = None
        self._last_housekeeping = 0.0
        self._registered: list[str] = []
        self._suspects: dict[int, float] = {}  # procrastinate job id -> when first seen stalled

    # ---------------------------------------------------------------- the app
    def _app(self) -> procrastinate.App:
        s = self.settings
        # a connection per query (a few a second at most): after an outage the next query reconnects at once,
        # where a pool would wait out its own reconnection backoff and let worker heartbeats lapse
        connector = RidingConnector(conninfo=conninfo(s.database_url),
                                    pool_factory=psycopg_pool.AsyncNullConnectionPool,
                                    max_size=self.concurrency + 6, timeout=10.0)
        connector.give_up = self.stop
        app = procrastinate.App(connector=connector)
        strategy = PolicyRetry(s)

        @app.task(name=JOB_TASK, queue=QUEUE, retry=strategy, pass_context=True)
        def job_task(context: Any, job_id: int) -> str:
            return self.run_job(job_id)

        every = max(1, round(s.schedule.dispatch_seconds))
        cron = f"* * * * * */{every}" if every < 60 else f"*/{max(1, every // 60)} * * * *"

        @app.periodic(cron=cron, periodic_id="tick")
        @app.task(name=TICK_TASK, queue=SCHEDULER_QUEUE, lock=TICK_LOCK, queueing_lock=TICK_LOCK)
        def tick(timestamp: int) -> None:
            self.tick(time.time())

        @app.periodic(cron=cron, periodic_id="poll")
        @app.task(name=POLL_TASK, queue=SCHEDULER_QUEUE, lock=POLL_LOCK, queueing_lock=POLL_LOCK)
        def poll(timestamp: int) -> None:
            self.poll(time.time())

        self.job_task, self.tick_task, self.poll_task = job_task, tick, poll
        return app

    # ---------------------------------------------------------------- the job task (a worker thread)
    def run_job(self, job_id: int) -> str:
        runner = self.runners.get()
        try:
            return self._run_job(runner, job_id)
        finally:
            self.runners.put(runner)

    def _run_job(self, runner: Runner, job_id: int) -> str:
        if self.stop.is_set():
            raise Released(f"job {job_id}: this worker is stopping")
        now = time.time()
        job = self.store.take(job_id, runner.worker_id, now=now)
        if job is None:
            cur = self.store.job(job_id)
            log.info("job %d: not run (%s)", job_id, cur.status.value if cur else "gone")
            return f"not run: {cur.status.value if cur else 'gone'}"
        if job.attempts > job.max_attempts:  # delivered again after its workers died this many times
            msg = f"its worker died {job.attempts - 1} times"
            self.store.transition(job.id, J.Status.FAILED, now=now, worker_id=runner.worker_id,
                                  error_type="WorkerDied", error_message=msg, message=f"failed: {msg}")
            return "failed: " + msg
        workdir = self.settings.work_dir / f"job-{job.id}-{slug(job.repo)}"  # this box's, whatever was before
        runner.last_error = None
        out = runner.process(job, workdir=workdir)
        if out.status == J.Status.QUEUED:
            raise Released(out.message)
        if out.status in (J.Status.RETRYING, J.Status.FAILED):
            cur = self.store.job(job_id)
            err = getattr(runner, "last_error", None) or RuntimeError(out.message)
            raise JobFailed(err, cur.attempts if cur else job.attempts, job.max_attempts)
        return f"{out.status.value}: {out.message}"

    # ---------------------------------------------------------------- the scheduler's tick
    def tick(self, now: float) -> dict[str, Any]:
        """One scheduler tick (one at a time across every scheduler: the tick's lock)."""
        s = self.settings
        gap = max(10.0, 3 * s.schedule.dispatch_seconds)
        if self._last_tick is None or now - self._last_tick > gap:
            self._up_since = now  # after a gap (start, outage) heartbeats are not judged for one stall timeout
        self._last_tick = now
        out: dict[str, Any] = {"recovered": self.recover_stalled(now)}
        out["dispatched"] = self.dispatch(now)
        if now - self._last_housekeeping >= s.schedule.housekeeping_minutes * 60:
            self._last_housekeeping = now
            if self.bot is not None:
                self.bot.watcher.requeue_for_toolchain(now)
            self.store.prune_events(before=now - EVENT_RETENTION_DAYS * 86400)
        return out

    def poll(self, now: float) -> bool:
        """The scheduler's poll task: poll the sources when due (one poll at a time: the task's lock)."""
        if not (self.poll_enabled and self.bot is not None and self._poll_due(now)):
            return False
        self.bot.poll(now)
        return True

    def _poll_due(self, now: float) -> bool:
        rows = {r.key: r for r in self.store.sources()}
        period = self.settings.schedule.poll_minutes * 60
        return any(src.key not in rows or rows[src.key].last_poll_at is None
                   or rows[src.key].last_poll_at <= now - period for src in self.settings.sources)

    def live_jobs(self) -> set[int]:
        """ggufbot job ids with a procrastinate job waiting or running."""
        return self.store.live_queue_jobs(JOB_TASK)

    def dispatch(self, now: float) -> list[int]:
        """Hand every queued (or retrying, when its wait is over) ggufbot job without a procrastinate job to
        procrastinate; a repo with a job already waiting is left for a later tick (its queueing lock)."""
        live = self.live_jobs()
        sent = []
        for job in self.store.jobs([J.Status.QUEUED, J.Status.RETRYING]):
            if job.id in live or (job.status == J.Status.RETRYING and (job.not_before or 0) > now):
                continue
            size = next((e["data"].get("bytes") for e in self.store.events(job_id=job.id, kind="job.size", limit=1)
                         if isinstance(e.get("data"), dict)), None)
            try:
                self.job_task.configure(queue=queue_for(size, self.settings), lock=job.repo,
                                        queueing_lock=job.repo, priority=job.priority).defer(job_id=job.id)
            except pq_exc.AlreadyEnqueued:
                continue
            sent.append(job.id)
            log.info("job %d %s@%s: handed to the %s queue", job.id, job.repo, job.revision[:12],
                     queue_for(size, self.settings))
        return sent

    def recover_stalled(self, now: float) -> list[int]:
        """Jobs of workers whose procrastinate heartbeat stopped for ``schedule.stale_after_seconds`` (and still
        had not come back half that time later) go back to the queue (procrastinate's retry; the same lock); not
        judged until the scheduler has itself been up for that long since its last gap."""
        stale = self.settings.schedule.stale_after_seconds
        if self._up_since is None or now - self._up_since < stale:
            return []
        jm = self.app.job_manager
        stalled = _sync(jm.get_stalled_jobs, task_name=JOB_TASK, seconds_since_heartbeat=stale)
        # a worker starved for a moment (a loaded machine) beats again: only a job still stalled half a stall
        # timeout after it was first seen so is put back
        self._suspects = {i: t for i, t in self._suspects.items() if i in {pj.id for pj in stalled}}
        out = []
        for pj in stalled:
            if now - self._suspects.setdefault(pj.id, now) < stale / 2:
                continue
            self._suspects.pop(pj.id, None)
            job_id = int(pj.task_kwargs.get("job_id", 0))
            log.warning("job %s (procrastinate %s): its worker stopped sending heartbeats; back in the queue",
                        job_id, pj.id)
            self.store.event("job.requeued", f"its worker stopped (no heartbeat for {stale:.0f} s); back in the queue",
                             now=now, job_id=job_id or None)
            _sync(jm.retry_job, pj)
            out.append(job_id)
        return out

    # ---------------------------------------------------------------- running
    async def serve(self, *, jobs: bool = True, scheduler: bool = False, queues: list[str] | None = None,
                    install_signals: bool = True, ready: Callable[[], None] | None = None) -> int:
        """Run procrastinate workers until a stop request: the job worker (``queues``, default by this box's
        capabilities) and/or the scheduler's (the tick queue, one at a time)."""
        s = self.settings
        check_schema(self.store)  # procrastinate's queries need its own schema, not an older one
        logging.getLogger("procrastinate").setLevel(logging.WARNING)  # a line per tick is noise; ours say more
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, self.on_signal, sig)
        interval = max(0.5, min(s.schedule.heartbeat_seconds, s.schedule.stale_after_seconds / 3))
        plans = []
        if scheduler:
            plans.append(([SCHEDULER_QUEUE], 2, "scheduler"))  # the tick and the poll
        if jobs:
            plans.append((queues or worker_queues(s), self.concurrency, "worker"))
        quiet = QuietStopInOutage(self.stop)
        logging.getLogger("procrastinate.utils").addFilter(quiet)  # its "<side task> error:" lines
        async with self.app.open_async():
            for qs, n, what in plans:
                w = Worker(self.app, queues=qs, name=what, concurrency=n, install_signal_handlers=False,
                           update_heartbeat_interval=interval, stalled_worker_timeout=s.schedule.stale_after_seconds,
                           fetch_job_polling_interval=max(0.5, min(5.0, s.schedule.dispatch_seconds)),
                           abort_job_polling_interval=5.0, listen_notify=True)
                w.logger.addFilter(quiet)
                self.workers.append((w, what, qs, n))
            tasks = [asyncio.create_task(w.run(), name=f"procrastinate-{what}") for w, what, _, _ in self.workers]
            reg = asyncio.create_task(self._register())
            if ready is not None:
                ready()
            try:
                await asyncio.gather(*tasks)
            except (pq_exc.ConnectorException, psycopg.OperationalError) as e:
                if not (self.stop.is_set() and (isinstance(e, psycopg.OperationalError) or _lost_connection(e))):
                    raise
                # stopped while the server was unreachable: nothing could be released; procrastinate hands the
                # jobs on once their heartbeat is stale, as after a crash
                log.warning("stopped during a PostgreSQL outage: this box's running jobs go back to the queue "
                            "after the stall timeout")
            finally:
                reg.cancel()
                for name in self._registered:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(self.store.worker_stopped, name, now=time.time())
        log.info("ggufbot: stopped cleanly")
        return 0

    async def _register(self) -> None:
        """Record this box's workers (host, queues, capabilities) once procrastinate has given them an id."""
        for w, what, qs, n in self.workers:
            while w.worker_id is None:
                await asyncio.sleep(0.1)
            name = self.base_name if what == "worker" else f"{self.base_name}-{what}"
            await asyncio.to_thread(self.store.register_worker, name, host=self.host, queue_worker_id=w.worker_id,
                                    queues=qs, concurrency=n, gpu=self.settings.worker.gpu,
                                    max_model_gb=self.settings.worker.max_model_gb, now=time.time())
            self._registered.append(name)
            log.info("%s on %s: queues %s, concurrency %d (procrastinate worker %d)", what, self.host,
                     ", ".join(qs), n, w.worker_id)

    def request_stop(self) -> None:
        self.stop.set()
        stop_waiting_for_the_server()
        for w, *_ in self.workers:
            w.stop()

    def on_signal(self, signum: int) -> None:
        """:func:`bot.service.runner.on_stop_signal`: the jobs go back to the queue."""
        on_stop_signal(signum, self.stop.is_set(), self.request_stop)


def _sync(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Call one of procrastinate's coroutines from a task's thread (on the worker's event loop)."""
    return pq_utils.async_to_sync(fn, *args, **kwargs)


def run(box: Box, **kw: Any) -> int:
    return asyncio.run(box.serve(**kw))
