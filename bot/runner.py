"""The job runner: claim one queued job, run its stages, heartbeat, finish, retry or fail it.

One job = ``fetch`` (safetensors/config/tokenizer/template files only, size limit checked before download)
-> ``inspect`` -> ``convert``/``calibrate``/``quantize`` (converters.pipeline, which records each finished
stage in the work directory) -> ``evaluate`` -> ``publish`` -> ``variant:<recipe>`` for each recipe of
``quantize.variants`` (prune, heal, the same ladder, evaluation against this job's BF16 logits, publishing to
its own repo; all inside ``<workdir>/variants/<recipe>``, the main work dir serving as the teacher's) ->
``cleanup``. The current stage is kept in the jobs table. A failing variant is recorded in the job's result and
as a ``variant.failed`` event; it never fails or unpublishes the main ladder. A job whose worker died is put
back in the queue by :meth:`Runner.recover` and starts again in
the same work directory: the stage records make it skip everything that was finished.

Errors: ``err.transient`` (timeouts, 5xx, full disk, a tool killed by a signal) retries with backoff
(``bot.retry.RetryPolicy`` with job-scale delays); anything else fails the job at once, with the error's type
and one-line reason stored. A stop request (SIGTERM) is honoured between steps: the job goes back to the
queue without using up an attempt, and its finished stages are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot import jobs as J
from bot.retry import RetryPolicy
from bot.settings import Settings
from bot.store import Job, Store
from bot.watcher import decide, weight_bytes
from converters import records
from converters.checkpoint import RESULT_PATTERNS
from converters.errors import Cancelled, CheckFailed, DiskSpaceError, GgufbotError, InputError, UnsupportedModel
from converters.stages import free_bytes

log = logging.getLogger(__name__)

# What a job needs on disk beyond the source weights: a 16-bit reference (~1x) and the ladder (~4.5x for the
# default ladder), so about 6x the source; the pipeline checks its own exact estimate again before writing.
DISK_FACTOR = 6.0


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


def slug(repo: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", repo).strip("-.")


class _Stop(Exception):
    """The job is no longer ours (cancelled by the operator or taken over)."""


@dataclasses.dataclass
class Outcome:
    job_id: int
    status: J.Status
    message: str


class Runner:
    def __init__(self, settings: Settings, store: Store, hub: Any, *, worker_id: str | None = None,
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
    def process(self, job: Job) -> Outcome:
        workdir = Path(job.workdir) if job.workdir else self.settings.work_dir / f"job-{job.id}-{slug(job.repo)}"
        lost = threading.Event()
        self._update(job, lost, workdir=str(workdir))
        hb_stop = threading.Event()
        hb = threading.Thread(target=self._heartbeat, args=(job, hb_stop, lost), daemon=True,
                              name=f"heartbeat-{job.id}")
        hb.start()
        t0 = time.monotonic()
        log.info("job %d %s@%s: start (attempt %d/%d, %s)", job.id, job.repo, job.revision[:12], job.attempts,
                 job.max_attempts, job.reason)

        def should_stop() -> bool:
            return self.stop.is_set() or lost.is_set()

        try:
            status, message, fields = self._stages(job, workdir, lost, should_stop)
        except BaseException as e:  # noqa: BLE001 - every outcome is recorded
            hb_stop.set()
            hb.join(timeout=5)
            return self._on_error(job, e, lost)
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
        return Outcome(job.id, status, message)

    def _on_error(self, job: Job, e: BaseException, lost: threading.Event) -> Outcome:
        now = self.clock()
        if lost.is_set() or isinstance(e, _Stop):
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
            return Outcome(job.id, J.Status.RETRYING, msg)
        self.store.transition(job.id, J.Status.FAILED, now=now, worker_id=self.worker_id,
                              message=f"{stage}: {etype}: {msg}", error_type=etype, error_message=msg)
        if not isinstance(e, GgufbotError):
            log.exception("job %d %s failed with an unexpected error", job.id, job.repo)
        else:
            log.error("job %d %s failed in %s: %s: %s", job.id, job.repo, stage, etype, msg)
        return Outcome(job.id, J.Status.FAILED, msg)

    def _stage_of(self, job_id: int) -> str:
        j = self.store.job(job_id)
        return (j.stage if j else None) or "start"

    def _heartbeat(self, job: Job, stop: threading.Event, lost: threading.Event) -> None:
        period = self.settings.schedule.heartbeat_seconds
        while not stop.wait(period):
            try:
                if not self.store.update_running(job.id, self.worker_id, now=self.clock()):
                    lost.set()
                    return
            except Exception as e:  # noqa: BLE001 - a database hiccup must not kill the job
                log.warning("job %d: heartbeat failed: %s", job.id, e)

    def _update(self, job: Job, lost: threading.Event, **fields: Any) -> None:
        if not self.store.update_running(job.id, self.worker_id, now=self.clock(), **fields):
            lost.set()
            raise _Stop()

    def _set_stage(self, job: Job, lost: threading.Event, stage: str, progress: str | None = None) -> None:
        self._update(job, lost, stage=stage, progress=progress)

    # ---------------------------------------------------------------- the stages
    def _stages(self, job: Job, workdir: Path, lost: threading.Event,
                should_stop: Callable[[], bool]) -> tuple[J.Status, str, dict[str, Any]]:
        from converters import checkpoint as checkpoint_mod
        from converters import pipeline

        def stop_point() -> None:
            if lost.is_set():
                raise _Stop()
            if self.stop.is_set():
                raise Cancelled("stop requested")

        s = self.settings
        stop_point()
        # ---- fetch
        self._set_stage(job, lost, "fetch")
        src = self._fetch(job, workdir)
        stop_point()
        # ---- inspect
        self._set_stage(job, lost, "inspect")
        ckpt = checkpoint_mod.inspect(src, allow_remote_code=False)
        stop_point()
        # ---- ladder
        model_name = pipeline.model_name_for(job.repo)
        cal = self._text(s.quantize.calibration_text, "calibration")
        plan = pipeline.plan(ckpt, workdir, model_name=model_name, ladder=s.quantize.ladder,
                             outtype=s.quantize.outtype, calibration=cal,
                             calibration_chunks=s.quantize.calibration_chunks, ctx=s.quantize.ctx,
                             split_max_bytes=int(s.quantize.split_max_gb * 1e9), jobs=s.quantize.jobs,
                             source_repo=job.repo, source_revision=job.revision)
        tc = self._toolchain()

        def on_event(stage: str, state: str, info: dict[str, Any]) -> None:
            if state == "start":
                self._set_stage(job, lost, stage)
            elif state == "progress":
                if "done" in info:
                    prog = f"{info.get('type')} {info['done']}/{info.get('total')}"
                else:
                    prog = str(info.get("line", ""))[-200:]
                with contextlib.suppress(_Stop):
                    self._update(job, lost, progress=prog)
            elif state in ("end", "skip"):
                self.store.event(f"stage.{state}", f"{stage} {'skipped (already done)' if state == 'skip' else 'done'}",
                                 now=self.clock(), job_id=job.id, repo=job.repo,
                                 data={k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))})

        ladder = pipeline.execute(plan, toolchain=tc, on_event=on_event, should_stop=should_stop)
        tc_version = (ladder.get("toolchain") or {}).get("version")
        stop_point()
        # ---- evaluate
        self._set_stage(job, lost, "evaluate")
        report = self._evaluate(job, lost, workdir, cal)
        stop_point()
        fields: dict[str, Any] = {"toolchain_version": tc_version}
        if not report["publishable"]:
            why = "; ".join(str(r) for r in (report.get("reasons") or [])) or "the evaluation found it not publishable"
            raise CheckFailed("evaluate", f"not published: {why}")
        # ---- publish
        if not s.target.publish or not s.token:
            why = "publishing is turned off (target.publish = false)" if not s.target.publish else \
                "no Hub token (set HF_TOKEN to publish)"
            self._record_artifacts(job, workdir, ladder, url=None)
            # ---- variants (built, evaluated, not published); the work dir is kept as for the main ladder
            done = self._variants(job, lost, workdir, src, cal, publish=False, should_stop=should_stop)
            if done:
                fields["result"] = {"variants": done}
            return (J.Status.CONVERTED, f"converted, not published: {why}; files in {workdir}"
                    + _variants_note(done), fields)
        self._set_stage(job, lost, "publish")
        target, commit_url, action = self._publish(job, workdir)
        fields["target_repo"] = target
        fields["result"] = {"target_repo": target, "commit": commit_url, "action": action, "toolchain": tc_version,
                            "files": [f["type"] for f in ladder.get("files", [])]}
        self._record_artifacts(job, workdir, ladder, url=commit_url)
        stop_point()
        # ---- variants: after the main ladder is published, before the cleanup (they reuse its work dir as
        # the teacher's: its BF16 reference, report and logits); a failing variant is recorded, nothing more
        done = self._variants(job, lost, workdir, src, cal, publish=True, should_stop=should_stop)
        if done:
            fields["result"]["variants"] = done
        stop_point()
        # ---- cleanup: keep the report and the imatrix, drop the rest
        self._set_stage(job, lost, "cleanup")
        kept = self._cleanup(job, workdir, ladder)
        fields["result"]["kept"] = kept
        fields["workdir"] = None
        what = "already up to date" if action == "none" else action
        return J.Status.PUBLISHED, f"published {target} ({what})" + _variants_note(done), fields

    # ---------------------------------------------------------------- variants
    def _variants(self, job: Job, lost: threading.Event, workdir: Path, src: Path, cal: Any, *, publish: bool,
                  should_stop: Callable[[], bool]) -> list[dict[str, Any]]:
        """Build (and publish) every variant of ``quantize.variants``; one entry per recipe for the job's result.

        Each variant is the stage ``variant:<recipe>`` of this job, in ``<workdir>/variants/<recipe>``; its own
        stage records (prune, distill, the ladder, teacher logits, evaluation) make a resumed job skip what was
        finished. A variant that fails is recorded (event ``variant.failed`` with its reason, and its entry) and
        the next one runs: the published main ladder is never touched. A stop request still stops the job.
        """
        from converters import variants as variants_mod

        out: list[dict[str, Any]] = []
        for recipe in variants_mod.parse_list(self.settings.quantize.variants):
            if should_stop():
                raise _Stop() if lost.is_set() else Cancelled("stop requested")
            self._set_stage(job, lost, J.VARIANT_STAGE.format(recipe=recipe.name))
            t0 = time.monotonic()
            entry: dict[str, Any] = {"recipe": recipe.name}
            try:
                entry.update(self._variant(job, lost, workdir, src, cal, recipe, publish=publish,
                                           should_stop=should_stop))
            except (Cancelled, _Stop):
                raise
            except Exception as e:  # noqa: BLE001 - a variant never fails the main job
                etype, msg = J.error_fields(e)
                entry.update(status="failed", error_type=etype, error_message=msg)
                self.store.event("variant.failed", f"{recipe.name} failed: {etype}: {msg}", now=self.clock(),
                                 job_id=job.id, repo=job.repo, data={"recipe": recipe.name, "error_type": etype})
                if isinstance(e, GgufbotError):
                    log.error("job %d %s: variant %s failed: %s: %s", job.id, job.repo, recipe.name, etype, msg)
                else:
                    log.exception("job %d %s: variant %s failed with an unexpected error", job.id, job.repo,
                                  recipe.name)
            entry["seconds"] = round(time.monotonic() - t0, 1)
            out.append(entry)
        return out

    def _variant(self, job: Job, lost: threading.Event, workdir: Path, src: Path, cal: Any, recipe: Any, *,
                 publish: bool, should_stop: Callable[[], bool]) -> dict[str, Any]:
        from bot import variants as bot_variants
        from converters import pipeline
        from converters import variants as variants_mod

        s = self.settings
        vdir = workdir / "variants" / recipe.name
        ev = self._text(s.quantize.evaluation_text, "evaluation")

        def progress(text: str) -> None:
            with contextlib.suppress(_Stop):
                self._update(job, lost, progress=text[-200:])

        def on_event(stage: str, state: str, info: dict[str, Any]) -> None:
            if state == "start":
                progress(stage)
            elif state == "progress":
                progress(f"{stage} {info['type']} {info['done']}/{info.get('total')}" if "done" in info
                         else f"{stage}: {info.get('line', '')}")
            elif state in ("end", "skip"):
                self.store.event(f"stage.{state}", f"{recipe.name}: {stage} "
                                 f"{'skipped (already done)' if state == 'skip' else 'done'}", now=self.clock(),
                                 job_id=job.id, repo=job.repo,
                                 data={k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))})

        def on_step(step: int, steps: int, loss: float, _lr: float) -> None:
            progress(f"distill step {step}/{steps} loss {loss:.4f}")
            if should_stop():
                raise _Stop() if lost.is_set() else Cancelled("stop requested during distillation")

        info = variants_mod.build(src, vdir, recipe, toolchain=self._toolchain(), calibration=cal,
                                  eval_text=ev.path, teacher_model=pipeline.model_name_for(job.repo),
                                  ladder=s.quantize.ladder, ctx=s.quantize.ctx,
                                  calibration_chunks=s.quantize.calibration_chunks,
                                  eval_chunks=s.quantize.evaluation_chunks, teacher_workdir=workdir,
                                  source_repo=job.repo, source_revision=job.revision, on_event=on_event,
                                  on_progress=lambda m: progress(f"prune: {m}"), on_step=on_step,
                                  should_stop=should_stop)
        evaluation = info.get("evaluation") or {}
        entry: dict[str, Any] = {
            "model_name": info.get("model_name"),
            "layers": [info["teacher"].get("layers"), info["variant"].get("layers")],
            "parameters": [info["teacher"].get("parameters"), info["variant"].get("parameters")],
            "kld_vs_teacher": evaluation.get("reference_kld_mean"),
        }
        if not evaluation.get("publishable"):
            report = _read_report(vdir)
            why = "; ".join(str(r) for r in (report or {}).get("reasons") or []) or "see its report.json"
            raise CheckFailed("evaluate", f"variant {recipe.name} is not publishable: {why}")
        ladder = pipeline.load_ladder(vdir)
        if not publish:
            self._record_artifacts(job, vdir, ladder, url=None, kind="variant-gguf", prefix=vdir)
            return {**entry, "status": "converted", "workdir": str(vdir)}
        progress("publish")
        res = bot_variants.publish_variant(vdir, self.hub, namespace=self._namespace(),
                                           repo_pattern=s.target.variant_repo_template, private=s.target.private,
                                           teacher_workdir=workdir)
        url = f"{res.url}/commit/{res.commit}" if res.commit else res.url
        self._record_artifacts(job, vdir, ladder, url=url, kind="variant-gguf")
        self.store.event("variant.published", f"{recipe.name}: published {res.repo_id} "
                         f"({'already up to date' if res.action == 'none' else res.action})", now=self.clock(),
                         job_id=job.id, repo=job.repo, data={"recipe": recipe.name, "target_repo": res.repo_id})
        return {**entry, "status": "published", "target_repo": res.repo_id, "commit": url, "action": res.action}

    def _fetch(self, job: Job, workdir: Path) -> Path:
        s = self.settings
        src = workdir / "source"
        inputs = {"repo": job.repo, "revision": job.revision, "patterns": list(RESULT_PATTERNS)}
        rec = records.load(workdir, "fetch")
        got = rec.extra.get("files", {}) if rec is not None else {}
        if rec is not None and rec.inputs == inputs and all(
                (src / n).is_file() and (src / n).stat().st_size == size for n, size in got.items()):
            log.info("job %d: fetch already done", job.id)
            return src
        info = self.hub.model_info(job.repo, revision=job.revision)
        d = decide(info, s, None, full=True)  # the safety rules again, on the exact revision fetched
        if not d.accept and d.code not in ("gated", "pipeline_tag"):
            raise UnsupportedModel(d.reason, repo=job.repo)
        size = weight_bytes(info) or 0
        # each variant keeps its checkpoint, reference and ladder beside the teacher's until the job's cleanup
        need = int(size * DISK_FACTOR * (1 + len(s.quantize.variants)) + s.limits.min_free_disk_gb * 1e9)
        workdir.mkdir(parents=True, exist_ok=True)
        free = free_bytes(workdir)
        if need > free:
            raise DiskSpaceError(str(workdir), need, free)
        t0 = time.monotonic()
        self.hub.download_snapshot(job.repo, job.revision, src, allow_patterns=list(RESULT_PATTERNS),
                                   max_bytes=s.max_model_bytes or None)
        files = {str(p.relative_to(src)): p.stat().st_size for p in sorted(src.rglob("*"))
                 if p.is_file() and ".cache" not in p.relative_to(src).parts}
        if not any(n.endswith(".safetensors") for n in files):
            raise UnsupportedModel("no safetensors weights were downloaded", repo=job.repo)
        records.save(workdir, "fetch", inputs, [], time.monotonic() - t0, None, extra={"files": files})
        self.store.event("stage.end", f"fetch done: {len(files)} files, {sum(files.values()) / 1e6:.1f} MB",
                         now=self.clock(), job_id=job.id, repo=job.repo)
        return src

    def _text(self, spec: str | None, kind: str) -> Any:
        from bot import texts

        spec = spec or (texts.DEFAULT_CALIBRATION if kind == "calibration" else texts.DEFAULT_EVALUATION)
        if spec not in self._texts:
            self._texts[spec] = texts.resolve_text(spec, hub=self.hub)
        return self._texts[spec]

    def _toolchain(self) -> Any:
        if self.toolchain is None:
            from converters import toolchain as tc_mod

            self.toolchain = tc_mod.find(required=True)
        return self.toolchain

    def _evaluate(self, job: Job, lost: threading.Event, workdir: Path, cal: Any) -> dict[str, Any]:
        """Evaluate every quant against the reference (records make a re-run free); the report as a dict."""
        from converters import evaluate

        ev = self._text(self.settings.quantize.evaluation_text, "evaluation")

        def progress(step: str, done: int, total: int) -> None:
            with contextlib.suppress(_Stop):
                self._update(job, lost, progress=f"{step} {done}/{total}")
            if self.stop.is_set() or lost.is_set():
                raise Cancelled("stop requested during evaluation")

        report = evaluate.run(workdir, eval_text=ev.path, calibration_text=cal.path if cal is not None else None,
                              chunks=self.settings.quantize.evaluation_chunks, toolchain=self._toolchain(),
                              on_progress=progress, eval_text_name=ev.name, eval_text_source=ev.source)
        return {"publishable": bool(getattr(report, "publishable", False)),
                "reasons": list(getattr(report, "reasons", []) or [])}

    def _namespace(self) -> str:
        ns = self.settings.target.namespace or self.namespace
        if not ns:
            ns = self.namespace = self.hub.whoami()
        return ns

    def _target_repo(self, job: Job) -> str:
        from converters import pipeline

        ns = self._namespace()
        name = self.settings.target.repo_template.format(model=pipeline.model_name_for(job.repo),
                                                         author=job.repo.split("/")[0])
        return f"{ns}/{name}"

    def _publish(self, job: Job, workdir: Path) -> tuple[str, str | None, str]:
        """Publish the work directory (one commit; idempotent: an identical repo gets no commit)."""
        from bot import publish

        target = self._target_repo(job)
        opts = publish.PublishOptions(repo_id=target, namespace=target.split("/")[0],
                                      private=self.settings.target.private)
        _plan, res = publish.publish(workdir, self.hub, opts)
        assert res is not None
        return res.repo_id, (f"{res.url}/commit/{res.commit}" if res.commit else res.url), res.action

    def _record_artifacts(self, job: Job, workdir: Path, ladder: dict[str, Any], url: str | None,
                          kind: str = "gguf", prefix: Path | None = None) -> None:
        now = self.clock()
        for f in ladder.get("files", []):
            path = str(prefix / f["path"]) if prefix is not None else f["path"]
            self.store.add_artifact(job.id, kind, path, now=now, size=f.get("size"), sha256=f.get("sha256"),
                                    url=url)

    def _cleanup(self, job: Job, workdir: Path, ladder: dict[str, Any]) -> list[str]:
        keep_dir = self.settings.keep_dir / slug(job.repo) / job.revision[:12]
        keep_dir.mkdir(parents=True, exist_ok=True)
        names = ["report.json", "ladder.json", "plan.json"]
        im = ladder.get("imatrix") or {}
        names += [im[k] for k in ("gguf", "dat") if im.get(k)]
        kept = []
        for n in names:
            p = workdir / n
            if p.is_file():
                shutil.copy2(p, keep_dir / Path(n).name)
                kept.append(str(keep_dir / Path(n).name))
                self.store.add_artifact(job.id, "imatrix" if "imatrix" in n else Path(n).stem,
                                        str(keep_dir / Path(n).name), now=self.clock(), size=p.stat().st_size)
        from converters import variants as variants_mod

        for vdir in sorted((workdir / "variants").glob("*")) if (workdir / "variants").is_dir() else []:
            vkeep = keep_dir / "variants" / vdir.name
            for n in ("report.json", "ladder.json", variants_mod.VARIANT_FILE):
                if (vdir / n).is_file():
                    vkeep.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(vdir / n, vkeep / n)
                    kept.append(str(vkeep / n))
        check_workdir_safe(workdir, self.settings.data_dir)
        shutil.rmtree(workdir, ignore_errors=True)
        log.info("job %d: work directory removed; kept %s", job.id, ", ".join(Path(k).name for k in kept))
        return kept


def _read_report(workdir: Path) -> dict[str, Any] | None:
    import json

    p = Path(workdir) / "report.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


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
