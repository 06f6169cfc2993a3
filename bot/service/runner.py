"""The job runner: claim one queued job, run its stages, heartbeat, finish, retry or fail it.

One job = ``fetch`` (safetensors/config/tokenizer/template files only, size limit checked before download)
-> ``inspect`` -> ``convert``/``calibrate``/``quantize`` (converters.ladder.pipeline, which records each finished
stage in the work directory) -> ``evaluate`` -> ``publish`` -> ``variant:<recipe>`` for each recipe of
``quantize.variants`` (prune, heal, the same ladder, evaluation against this job's BF16 logits, publishing to
its own repo; all inside ``<workdir>/variants/<recipe>``, the main work dir serving as the teacher's) ->
``cleanup``. The current stage is kept in the jobs table. A failing variant is recorded in the job's result and
as a ``variant.failed`` event; it never fails or unpublishes the main ladder. A job whose worker died is put
back in the queue by :meth:`Runner.recover` and starts again in
the same work directory: the stage records make it skip everything that was finished.

Errors: ``err.transient`` (timeouts, 5xx, full disk, a tool killed by a signal) retries with backoff
(``bot.model.retry.RetryPolicy`` with job-scale delays); anything else fails the job at once, with the error's type
and one-line reason stored. A stop request (SIGTERM) is honoured between steps and inside a running program
(its process group is killed within a fraction of a second): the job goes back to the queue without using up an
attempt, and its finished stages are kept. A cancelled job's program is killed within :data:`WATCH_SECONDS`; a
job whose progress (stage events, lines its programs print) has not moved for ``schedule.stuck_after_seconds``
is stuck: its program is killed and it fails with :class:`~converters.core.errors.Stuck`, which retries like any
transient error until ``limits.max_attempts``, then fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bot.hub.client import Hub
from bot.model import jobstate as J
from bot.model import metrics
from bot.jobs import patch as patch_mod
from bot.jobs import texts
from bot.jobs.job import JobSpec, LazyText, VariantOutcome
from bot.jobs.run import run_for_job
from bot.model.retry import RetryPolicy
from bot.model.settings import Settings
from bot.state.base import Job
from bot.state.store import Store
from converters.core import proc
from converters.llama import toolchain as tc_mod
from converters.core.errors import Cancelled, GgufbotError, InputError, Stuck
from converters.core.hooks import END, LINE, PROGRESS, SKIP, START, Event, Hooks
from converters.core import artifacts
from converters.core.workdir import VARIANTS_DIR, Ladder

log = logging.getLogger(__name__)

WATCH_SECONDS = 2.0  # how often a running job's cancellation and stuck state are checked
CLEANUP = "cleanup"  # the runner's last stage of a published job (after run_job): keep the report, drop the rest


def retry_policy(settings: Settings, max_attempts: int | None = None) -> RetryPolicy:
    s = settings.schedule
    return RetryPolicy(max_attempts=max_attempts or settings.limits.max_attempts, base=s.retry_base_seconds,
                       cap=s.retry_max_seconds, max_retry_after=s.retry_max_seconds)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def worker_is_dead(worker_id: str) -> bool:
    """True when ``worker_id`` names a process on this host that no longer exists."""
    try:
        host, pid, _ = worker_id.rsplit(":", 2)
        pid_n = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname() or pid_n == os.getpid():
        return False
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # a zombie (killed, not yet reaped by its parent) is dead too
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid_n}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    return False


def on_stop_signal(signum: int, stopping: bool, request_stop: Callable[[], None]) -> None:
    """What a box does on a signal (the scheduler and the procrastinate worker alike). The first SIGTERM is a
    graceful stop: the running step finishes (a service manager's stop must not throw away an hour of imatrix),
    the job is released and the process exits; its programs never outlive it (``converters/core/reaper.py``). SIGINT,
    SIGHUP or a second SIGTERM (``stopping``: a stop was already asked for) stop at once: the running programs
    are killed, the jobs released (they resume from their last finished stage). ``request_stop`` is called
    first, so a job whose program dies now sees the stop request, not a failure."""
    name = signal.Signals(signum).name
    at_once = signum != signal.SIGTERM or stopping
    request_stop()
    if at_once:
        log.warning("received %s: stopping the running programs, releasing the jobs, then exiting", name)
        proc.kill_all()
    else:
        log.warning("received %s: finishing the current step, releasing the jobs, then exiting "
                    "(send it again, or SIGINT, to stop at once)", name)


def slug(repo: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", repo).strip("-.")


class TakenAway(Cancelled):
    """The job is no longer ours (cancelled by the operator or taken over by another worker)."""


class JobHooks(Hooks):
    """The runner's one adapter of the progress/cancel channel: ``start`` sets the job's stage, counted steps and
    tool lines its progress column, ``end``/``skip`` become ``stage.*`` events; ``check_cancel`` raises on a
    stop request (:class:`Cancelled`) or a lost claim (:class:`TakenAway`). A variant's events arrive as
    ``variant:<recipe>/<stage>``: they update the progress column, the stage stays the variant's."""

    def __init__(self, runner: "Runner", job: Job) -> None:
        self.runner, self.job, self.lost = runner, job, threading.Event()
        self.stuck = threading.Event()  # set by the heartbeat when progress has not moved for too long
        self.moved = time.monotonic()  # when progress last moved (an event, or a line a program printed)
        self.shown: str | None = None  # the progress text last stored
        self.where = "start"  # the stage running

    def check_cancel(self) -> None:
        if self.lost.is_set():
            raise TakenAway("the job was taken away")
        if self.stuck.is_set():
            raise Stuck(self.where, self.idle())
        if self.runner.stop.is_set():
            raise Cancelled("stop requested")

    def check_abort(self) -> None:
        """While a program runs: a lost claim, a stuck job or a stop at once (SIGINT, SIGHUP, a second SIGTERM:
        the programs were killed) stop it; a graceful stop (the first SIGTERM) lets the step finish."""
        if self.lost.is_set() or self.stuck.is_set() or proc.killed_on_request():
            self.check_cancel()

    def planned(self, stages: Sequence[str]) -> None:
        """The job's own stage list (what ``status`` counts "stage k of n" and the ETA over): a ``job.stages``
        event; a job that publishes ends with the runner's ``cleanup``."""
        names = [*stages, *([CLEANUP] if "publish" in stages else [])]
        r = self.runner
        r.store.event("job.stages", f"stages: {', '.join(names)}", now=r.clock(), job_id=self.job.id,
                      repo=self.job.repo, data={"stages": names})

    def alive(self) -> None:
        self.moved = time.monotonic()

    def idle(self) -> float:
        """Seconds since progress last moved."""
        return time.monotonic() - self.moved

    def beat(self) -> dict[str, Any]:
        """What the heartbeat stores besides its time: the progress, with how long it has not moved once that
        is longer than a heartbeat (``ggufbot status`` shows a job going nowhere)."""
        idle = self.idle()
        if idle < max(60.0, 2 * self.runner.settings.schedule.heartbeat_seconds):
            return {}
        return {"progress": f"{self.shown or ''} (no progress for {idle:.0f} s)".strip()[-200:]}

    def update(self, **fields: Any) -> None:
        r = self.runner
        if "progress" in fields:
            self.shown = fields["progress"]
        if not r.store.update_running(self.job.id, r.worker_id, now=r.clock(), **fields):
            self.lost.set()

    def progress(self, event: Event) -> None:
        self.moved = time.monotonic()
        outer, _, inner = event.stage.partition("/")
        self.where = event.stage
        if event.kind == START:
            metrics.stage_started((self.job.id, event.stage))
            self.update(**({"progress": inner} if inner else {"stage": outer, "progress": None}))
        elif event.kind == PROGRESS:
            self.update(progress=(f"{inner} " if inner else "") + event.describe())
        elif event.kind == LINE:
            self.update(progress=((f"{inner}: " if inner else "") + event.text)[-200:])
        elif event.kind in (END, SKIP):
            if event.kind == END:
                metrics.stage_finished(event.stage, event.data.get("seconds"), (self.job.id, event.stage))
            r, what = self.runner, "skipped (already done)" if event.kind == SKIP else "done"
            label = f"{outer.split(':', 1)[-1]}: {inner}" if inner else outer
            r.store.event(f"stage.{event.kind}", event.text or f"{label} {what}", now=r.clock(), job_id=self.job.id,
                          repo=self.job.repo, data={k: v for k, v in event.data.items()
                                                    if k != "quiet" and isinstance(v, (int, float, str, bool))})


@dataclasses.dataclass
class Outcome:
    job_id: int
    status: J.Status
    message: str


class Runner:
    def __init__(self, settings: Settings, store: Store, hub: Hub, *, worker_id: str | None = None,
                 toolchain: Any = None, namespace: str | None = None, stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.store = store
        self.hub = hub
        self.worker_id = worker_id or new_worker_id()
        self.toolchain = toolchain
        self.namespace = namespace
        self.stop = stop or threading.Event()
        self.clock = clock
        self._texts: dict[str, Any] = {}
        self.last_error: BaseException | None = None

    # ---------------------------------------------------------------- queue operations
    def recover(self, now: float | None = None) -> list[int]:
        now = self.clock() if now is None else now
        ids = self.store.recover_stale(now=now, stale_after=self.settings.schedule.stale_after_seconds,
                                       is_dead=worker_is_dead)
        for i in ids:
            log.warning("job %d: its worker stopped; back in the queue (resumes from its finished stages)", i)
        return ids

    def run_one(self, now: float | None = None) -> Outcome | None:
        """Claim one job and run it to an end (finished, retrying, failed or released); None if the queue is empty."""
        if self.stop.is_set():
            return None
        now = self.clock() if now is None else now
        job = self.store.claim(self.worker_id, now=now)
        if job is None:
            return None
        return self.process(job)

    # ---------------------------------------------------------------- one job
    def process(self, job: Job, workdir: Path | None = None) -> Outcome:
        """Run a claimed job to an end; ``workdir``: where (default: the job's, else a new one under work_dir)."""
        if workdir is None:
            workdir = Path(job.workdir) if job.workdir else self.settings.work_dir / f"job-{job.id}-{slug(job.repo)}"
        hooks = JobHooks(self, job)
        hb_stop = threading.Event()
        hb = threading.Thread(target=self._heartbeat, args=(job, hb_stop, hooks), daemon=True,
                              name=f"heartbeat-{job.id}")
        t0 = time.monotonic()
        try:
            hooks.update(workdir=str(workdir))
            hooks.check_cancel()
            hb.start()
            log.info("job %d %s@%s: start (attempt %d/%d, %s)", job.id, job.repo, job.revision[:12], job.attempts,
                     job.max_attempts, job.reason)
            status, message, fields = self._run(job, workdir, hooks)
        except BaseException as e:  # noqa: BLE001 - every outcome is recorded
            hb_stop.set()
            if hb.is_alive():
                hb.join(timeout=5)
            return self._on_error(job, e, hooks.lost)
        hb_stop.set()
        hb.join(timeout=5)
        now = self.clock()
        try:
            self.store.transition(job.id, status, now=now, worker_id=self.worker_id, message=message,
                                  stage=None, progress=None, error_type=None, error_message=None, **fields)
        except GgufbotError as e:
            log.warning("job %d finished but could not be recorded: %s", job.id, e.short())
            return Outcome(job.id, J.Status.CANCELLED, str(e))
        log.info("job %d %s: %s in %.1f s (%s)", job.id, job.repo, status.value, time.monotonic() - t0, message)
        metrics.job_finished(status.value)
        return Outcome(job.id, status, message)

    def _on_error(self, job: Job, e: BaseException, lost: threading.Event) -> Outcome:
        now = self.clock()
        self.last_error = e  # bot.queue.box hands it to procrastinate's retry strategy
        if lost.is_set() or isinstance(e, TakenAway):
            cur = self.store.job(job.id)
            log.info("job %d: no longer held by this worker (%s); stopped", job.id, cur.status.value if cur else "gone")
            return Outcome(job.id, cur.status if cur else J.Status.CANCELLED, "stopped: the job was taken away")
        if isinstance(e, Cancelled) or (isinstance(e, KeyboardInterrupt) and self.stop.is_set()):
            # a stop request: release the job, keep its finished stages, do not count the attempt
            self.store.transition(job.id, J.Status.QUEUED, now=now, worker_id=self.worker_id,
                                  message=f"released on stop during {self._stage_of(job.id)}; resumes later",
                                  attempts=max(0, job.attempts - 1), heartbeat_at=None)
            log.info("job %d: released on stop request", job.id)
            return Outcome(job.id, J.Status.QUEUED, "released on stop request")
        if not isinstance(e, Exception):
            raise e
        etype, msg = J.error_fields(e)
        stage = self._stage_of(job.id)
        delay = retry_policy(self.settings, job.max_attempts).decide(e, job.attempts)
        if delay is not None:
            self.store.transition(job.id, J.Status.RETRYING, now=now, worker_id=self.worker_id,
                                  message=f"{stage}: {etype}: {msg}; retry in {delay:.0f} s",
                                  error_type=etype, error_message=msg, not_before=now + delay, heartbeat_at=None)
            log.warning("job %d %s: %s failed (%s: %s); retry %d in %.0f s", job.id, job.repo, stage, etype, msg,
                        job.attempts + 1, delay)
            metrics.job_finished(J.Status.RETRYING.value)
            return Outcome(job.id, J.Status.RETRYING, msg)
        self.store.transition(job.id, J.Status.FAILED, now=now, worker_id=self.worker_id,
                              message=f"{stage}: {etype}: {msg}", error_type=etype, error_message=msg)
        metrics.job_finished(J.Status.FAILED.value)
        if not isinstance(e, GgufbotError):
            log.exception("job %d %s failed with an unexpected error", job.id, job.repo)
        else:
            log.error("job %d %s failed in %s: %s: %s", job.id, job.repo, stage, etype, msg)
        return Outcome(job.id, J.Status.FAILED, msg)

    def _stage_of(self, job_id: int) -> str:
        j = self.store.job(job_id)
        return (j.stage if j else None) or "start"

    def _heartbeat(self, job: Job, stop: threading.Event, hooks: JobHooks) -> None:
        """Every heartbeat period: store the heartbeat (with the progress when it stands still). Every
        :data:`WATCH_SECONDS`: notice a cancellation (the running program is then killed within a fraction of a
        second) and a job whose progress has not moved for ``schedule.stuck_after_seconds`` (stuck)."""
        s = self.settings.schedule
        next_beat = time.monotonic() + s.heartbeat_seconds
        while not stop.wait(min(s.heartbeat_seconds, WATCH_SECONDS)):
            if hooks.idle() > s.stuck_after_seconds and not hooks.stuck.is_set():
                log.warning("job %d %s: no progress for %.0f s (%s): stuck; stopping it", job.id, job.repo,
                            hooks.idle(), hooks.shown or "no progress yet")
                hooks.stuck.set()
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + s.heartbeat_seconds
                    ours = self.store.update_running(job.id, self.worker_id, now=self.clock(), **hooks.beat())
                else:
                    cur = self.store.job(job.id)
                    ours = cur is not None and cur.status == J.Status.RUNNING and cur.worker_id == self.worker_id
                if not ours:
                    hooks.lost.set()
                    return
            except Exception as e:  # noqa: BLE001 - a database hiccup must not kill the job
                log.warning("job %d: heartbeat failed: %s", job.id, e)

    # ---------------------------------------------------------------- the job: one run_job, then the bookkeeping
    def spec_for(self, job: Job) -> JobSpec:
        s = self.settings
        return JobSpec.from_settings(s, job.repo, job.revision,
                                     calibration=LazyText(lambda: self._text(s.quantize.calibration_text, "calibration")),
                                     evaluation=LazyText(lambda: self._text(s.quantize.evaluation_text, "evaluation")),
                                     namespace=s.target.namespace or self.namespace)

    def _run(self, job: Job, workdir: Path, hooks: JobHooks) -> tuple[J.Status, str, dict[str, Any]]:
        """fetch -> ... -> publish -> variants (one :func:`bot.jobs.job.run_job`), then artifacts and the cleanup."""
        s = self.settings
        # a full job, or a metadata patch of the published files (bot.jobs.patch decides, and falls back when refused)
        res, kind = run_for_job(self.spec_for(job), job, workdir, hooks, store=self.store, hub=self.hub,
                                          toolchain=self._toolchain(), clock=self.clock)
        tc_version = res.ladder.toolchain.version
        fields: dict[str, Any] = {"toolchain_version": tc_version}
        kind_fields = {"kind": kind.kind, "kind_reason": kind.reason}
        done = [v.entry for v in res.variants]
        url = res.published.url if res.published else None
        self._record_artifacts(job, workdir, res.ladder, url=url)
        self._record_variants(job, res.variants)
        if res.published is None:
            why = "publishing is turned off (target.publish = false)" if not s.target.publish else \
                "no Hub token (set HF_TOKEN to publish)"
            fields["result"] = {**kind_fields, **({"variants": done} if done else {})}
            return (J.Status.CONVERTED, f"converted, not published: {why}; files in {workdir}"
                    + _variants_note(done), fields)
        p = res.published
        fields["target_repo"] = p.repo_id
        fields["result"] = {"target_repo": p.repo_id, "commit": p.url, "action": p.action, "toolchain": tc_version,
                            "files": list(res.ladder.types), **kind_fields}
        if done:
            fields["result"]["variants"] = done
        # ---- cleanup: keep the report and the imatrix, drop the rest
        hooks.check_cancel()
        hooks.progress(Event(CLEANUP, START))
        hooks.check_cancel()
        fields["result"]["kept"] = self._cleanup(job, workdir, res.ladder)
        fields["workdir"] = None
        what = "already up to date" if p.action == "none" else p.action
        what += ", metadata patch" if kind.kind == patch_mod.PATCH else ""
        return J.Status.PUBLISHED, f"published {p.repo_id} ({what})" + _variants_note(done), fields

    def _record_variants(self, job: Job, outcomes: tuple[VariantOutcome, ...]) -> None:
        """Artifacts and events of each variant: ``variant.failed`` with its reason, or ``variant.published``."""
        for v in outcomes:
            e = v.entry
            if e["status"] == "failed":
                self.store.event("variant.failed", f"{v.recipe} failed: {e['error_type']}: {e['error_message']}",
                                 now=self.clock(), job_id=job.id, repo=job.repo,
                                 data={"recipe": v.recipe, "error_type": e["error_type"]})
                continue
            assert v.ladder is not None
            if e["status"] == "published":
                self._record_artifacts(job, v.workdir, v.ladder, url=v.url, kind="variant-gguf")
                self.store.event("variant.published", f"{v.recipe}: published {e['target_repo']} "
                                 f"({'already up to date' if e['action'] == 'none' else e['action']})",
                                 now=self.clock(), job_id=job.id, repo=job.repo,
                                 data={"recipe": v.recipe, "target_repo": e["target_repo"]})
            else:
                self._record_artifacts(job, v.workdir, v.ladder, url=None, kind="variant-gguf", prefix=v.workdir)

    def _text(self, spec: str | None, kind: str) -> Any:
        spec = spec or (texts.DEFAULT_CALIBRATION if kind == "calibration" else texts.DEFAULT_EVALUATION)
        if spec not in self._texts:
            self._texts[spec] = texts.resolve_text(spec, hub=self.hub)
        return self._texts[spec]

    def _toolchain(self) -> tc_mod.Toolchain:
        if self.toolchain is None:
            self.toolchain = tc_mod.find(required=True)
        return self.toolchain

    def _record_artifacts(self, job: Job, workdir: Path, ladder: Ladder, url: str | None,
                          kind: str = "gguf", prefix: Path | None = None) -> None:
        now = self.clock()
        for f in ladder.files:
            path = str(prefix / f.path) if prefix is not None else f.path
            self.store.add_artifact(job.id, kind, path, now=now, size=f.size, sha256=f.sha256, url=url)

    def _cleanup(self, job: Job, workdir: Path, ladder: Ladder) -> list[str]:
        keep_dir = self.settings.keep_dir / slug(job.repo) / job.revision[:12]
        keep_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        for kind, n in artifacts.kept_files(ladder, artifacts.JOB):  # the catalogue's kinds kept after cleanup
            p = workdir / n
            if p.is_file():
                shutil.copy2(p, keep_dir / Path(n).name)
                kept.append(str(keep_dir / Path(n).name))
                self.store.add_artifact(job.id, kind.name, str(keep_dir / Path(n).name), now=self.clock(),
                                        size=p.stat().st_size)
        for vdir in sorted((workdir / VARIANTS_DIR).glob("*")) if (workdir / VARIANTS_DIR).is_dir() else []:
            vkeep = keep_dir / VARIANTS_DIR / vdir.name
            for _kind, n in artifacts.kept_files(None, artifacts.VARIANT):
                if (vdir / n).is_file():
                    vkeep.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(vdir / n, vkeep / n)
                    kept.append(str(vkeep / n))
        check_workdir_safe(workdir, self.settings.data_dir)
        shutil.rmtree(workdir, ignore_errors=True)
        log.info("job %d: work directory removed; kept %s", job.id, ", ".join(Path(k).name for k in kept))
        return kept


def _variants_note(done: list[dict[str, Any]]) -> str:
    """``; variants: a published ORG/REPO, b failed (CheckFailed: ...)`` for the job's message ('' if none)."""
    if not done:
        return ""
    parts = []
    for v in done:
        if v["status"] == "published":
            parts.append(f"{v['recipe']} published {v['target_repo']}")
        elif v["status"] == "failed":
            parts.append(f"{v['recipe']} FAILED ({v['error_type']}: {v['error_message']})")
        else:
            parts.append(f"{v['recipe']} {v['status']}")
    return "; variants: " + ", ".join(parts)


def check_workdir_safe(path: Path, root: Path) -> None:
    """Refuse a work directory outside the data directory (a corrupt database must not rm -rf elsewhere)."""
    if not Path(path).resolve().is_relative_to(Path(root).resolve()):
        raise InputError(f"work directory {path} is outside {root}")
