"""The bot process: APScheduler drives polling, dispatch and housekeeping; each tick takes ``now`` as an argument.

:class:`Bot` holds the parts (settings, store, Hub adapter, watcher, one runner per concurrency slot) and exposes
one method per scheduled duty - :meth:`Bot.poll`, :meth:`Bot.dispatch`, :meth:`Bot.housekeeping` - each a plain
function of ``now`` that tests call directly, without a scheduler and without sleeping. :meth:`Bot.serve` wires
them to an APScheduler ``BackgroundScheduler`` and waits for SIGTERM/SIGINT: on a stop request the running jobs
are checkpointed at their next step (finished stages kept, the job back in the queue without losing an attempt)
and the process exits cleanly.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from bot.hub.client import Hub
from bot.model import jobstate as J
from bot.service import follow as follow_mod
from bot.service.runner import Outcome, Runner, new_worker_id, on_stop_signal
from bot.model.settings import Settings
from bot.state.base import StateStore
from bot.state.store import Store
from bot.service.watcher import PollResult, Watcher
from converters.core.errors import GgufbotError, HubAuthError
from converters.llama import toolchain as tc_mod
from converters.llama.toolchain import Toolchain

log = logging.getLogger(__name__)

EVENT_RETENTION_DAYS = 90


class Bot:
    def __init__(self, settings: Settings, *, store: StateStore | None = None, hub: Hub | None = None,
                 toolchain: Toolchain | None = None, stop: threading.Event | None = None, worker_id: str | None = None,
                 resolve_namespace: bool = True):
        self.settings = settings
        self.store = store or Store(settings.database_url)
        if hub is None:
            hub = Hub(token=settings.token, endpoint=settings.hub.endpoint)
        self.hub = hub
        self.stop = stop or threading.Event()
        self.toolchain = toolchain
        tc_version = getattr(toolchain, "version", None)
        if tc_version is None:
            try:
                found = tc_mod.find(required=False)
                tc_version = found.version if found else None
            except GgufbotError:
                tc_version = None
        self.toolchain_version = tc_version
        self.namespace = settings.target.namespace
        self.publish_note = self._publish_note(resolve_namespace)
        if settings.quantize.variants:
            log.info("variants built after each model's ladder: %s (published to %s)",
                     ", ".join(settings.quantize.variants), settings.target.variant_repo_template)
        self.watcher = Watcher(settings, self.store, hub, toolchain_version=tc_version)
        base = worker_id or new_worker_id()
        n = settings.limits.concurrency
        self.runners = [Runner(settings, self.store, hub, worker_id=base if n == 1 else f"{base}-{i}",
                               toolchain=toolchain, namespace=self.namespace, stop=self.stop) for i in range(n)]
        self._free = list(self.runners)
        self.follow = follow_mod.Follower(settings, self.store, hub, switch=lambda tc: follow_mod.switch_bot(self, tc))
        self._lock = threading.Lock()
        self.polls = 0
        self.scheduler: Any = None  # the running APScheduler while serve() runs (the web page's /healthz)

    def _publish_note(self, resolve: bool) -> str:
        s = self.settings
        if not s.target.publish:
            return "publishing is off (target.publish = false): jobs convert and evaluate, nothing is uploaded"
        if not s.token:
            return "no Hub token (HF_TOKEN): jobs convert and evaluate but are NOT published"
        if self.namespace is None and resolve:
            try:
                self.namespace = self.hub.whoami()
            except HubAuthError as e:
                return f"the Hub token was refused ({e.short()}): nothing will be published"
            except GgufbotError as e:
                log.warning("could not resolve the target namespace yet (%s); will retry when publishing", e.short())
                return "publishing to the token's namespace (not resolved yet)"
        return f"publishing to {self.namespace or 'the token namespace'}/{s.target.repo_template}"

    # ---------------------------------------------------------------- the scheduled duties
    def poll(self, now: float) -> PollResult:
        self.polls += 1
        res = self.watcher.poll(now=now)
        return res

    def dispatch(self, now: float) -> list[Outcome]:
        """Run queued jobs on a free runner until the queue is empty or a stop is requested."""
        with self._lock:
            if not self._free:
                return []
            runner = self._free.pop()
        outcomes = []
        try:
            while not self.stop.is_set():
                out = runner.run_one(now=now)
                if out is None:
                    break
                outcomes.append(out)
                now = time.time()
        finally:
            with self._lock:
                self._free.append(runner)
        return outcomes

    def housekeeping(self, now: float) -> dict[str, Any]:
        recovered = self.runners[0].recover(now=now)
        requeued = self.watcher.requeue_for_toolchain(now)
        pruned = self.store.prune_events(before=now - EVENT_RETENTION_DAYS * 86400)
        followed = self.follow.tick(now)  # [toolchain] follow: starts a background check when due, never waits
        return {"recovered": recovered, "requeued": requeued, "pruned_events": pruned, "follow": followed}

    def busy(self) -> bool:
        with self._lock:
            return len(self._free) < len(self.runners)

    def queue_empty(self, now: float) -> bool:
        for job in self.store.jobs([J.Status.QUEUED, J.Status.RETRYING]):
            if job.not_before is None or job.not_before <= now:
                return False
        return True

    # ---------------------------------------------------------------- the process
    def serve(self, *, exit_when_idle: bool = False, poll: bool = True, install_signals: bool = True) -> int:
        """Run until SIGTERM/SIGINT/SIGHUP (or, with ``exit_when_idle``, until nothing is left to do)."""
        s = self.settings
        logging.getLogger("apscheduler").setLevel(logging.WARNING)  # one line per tick is noise
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, self._on_signal)
        log.info("ggufbot run: %d source(s), concurrency %d; %s", len(s.sources), s.limits.concurrency,
                 self.publish_note)
        self.housekeeping(time.time())  # resume jobs of dead workers before taking new ones
        polled = threading.Event()
        if not poll:
            polled.set()
        sched = self.scheduler = self._scheduler(poll, polled)
        sched.start()
        try:
            self._wait(exit_when_idle, polled)
        finally:
            self.stop.set()
            sched.shutdown(wait=True)  # running jobs stop at their next step and are released
            self.store.close()
        log.info("ggufbot run: stopped cleanly")
        return 0

    def _scheduler(self, poll: bool, polled: threading.Event) -> Any:
        """An APScheduler with the three duties (poll only when ``poll``; ``polled`` is set after each poll)."""
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        sc = self.settings.schedule
        n = len(self.runners)
        sched = BackgroundScheduler(executors={"default": ThreadPoolExecutor(max_workers=n + 3)},
                                    job_defaults={"coalesce": True, "misfire_grace_time": None},
                                    timezone=dt.timezone.utc)
        start = dt.datetime.now(dt.timezone.utc)
        if poll:
            sched.add_job(_tick(self.poll, "poll", done=polled), "interval", minutes=sc.poll_minutes, id="poll",
                          max_instances=1, next_run_time=start)
        sched.add_job(_tick(self.dispatch, "dispatch"), "interval", seconds=sc.dispatch_seconds, id="dispatch",
                      max_instances=n + 1, next_run_time=start)
        sched.add_job(_tick(self.housekeeping, "housekeeping"), "interval", minutes=sc.housekeeping_minutes,
                      id="housekeeping", max_instances=1,
                      next_run_time=start + dt.timedelta(minutes=sc.housekeeping_minutes))
        return sched

    def _wait(self, exit_when_idle: bool, polled: threading.Event) -> None:
        """Until a stop request, or (``exit_when_idle``) until a poll is done and no job is left to run."""
        idle_since: float | None = None
        while not self.stop.wait(0.5):
            if not (exit_when_idle and polled.is_set()):
                continue
            if self.busy() or not self.queue_empty(time.time()):
                idle_since = None
                continue
            idle_since = idle_since or time.monotonic()
            if time.monotonic() - idle_since > 1.0:  # stable for a moment: no tick in flight
                log.info("nothing left to do; exiting")
                return

    def _on_signal(self, signum: int, _frame: Any) -> None:
        on_stop_signal(signum, self.stop.is_set(), self.stop.set)


def _tick(duty: Callable[[float], Any], name: str, done: threading.Event | None = None) -> Callable[[], None]:
    """A scheduled duty called with the time of its tick; a failure is logged and the next tick runs on schedule."""
    def tick() -> None:
        try:
            duty(time.time())
        except Exception:  # noqa: BLE001
            log.exception("%s failed", name)
        finally:
            if done is not None:
                done.set()
    return tick
