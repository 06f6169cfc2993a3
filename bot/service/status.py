"""What ``ggufbot status`` and the status page show, read from the state store (never written).

Pure functions of the store's rows, the kept reports and ``now``: the job rows of ``status --json`` and of the
JSON API (:func:`job_row`), the running jobs' progress (stage k of n, the step inside the stage, elapsed time and
an ETA from past stage timings: :func:`running_view`), and a published job's ladder table from its report
(:func:`ladder_rows`).
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from collections import defaultdict
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from bot.model import jobstate as J
from bot.model.settings import Settings
from bot.publish import early
from bot.state.store import Job, StateStore
from bot.service import follow
from converters.core import records
from converters.core.errors import GgufbotError
from converters.core.report import PASSED, Report
from converters.core.workdir import REPORT_FILE, WorkDir

STEP = re.compile(r"(\d+)\s*/\s*(\d+)\)?\s*$")  # "Q4_K_M 2/4", "kld Q8_0 3/7", "(2/4)"
TIMING_EVENTS = 3000  # the newest stage events read for the timings of past stages


def hub_state(store: StateStore) -> dict[str, Any]:
    """Whether the last poll reached the Hub: ``{"reachable": True}``, or ``{"reachable": False, "since",
    "reason", "endpoint", "checked_at", "next_poll_at", "message"}`` from the newest ``hub.unreachable`` event
    when no ``hub.reachable`` came after it."""
    last = store.events(kind="hub.*", limit=1)
    if not last or last[0]["kind"] != "hub.unreachable":
        return {"reachable": True}
    e = last[0]
    d = e.get("data") if isinstance(e.get("data"), dict) else {}
    return {"reachable": False, "since": d.get("since", e["at"]), "reason": d.get("reason"),
            "endpoint": d.get("endpoint"), "checked_at": e["at"], "next_poll_at": d.get("next_poll_at"),
            "message": e["message"]}


def job_row(j: Job, now: float) -> dict[str, Any]:
    """One job as ``status --json`` and ``/api/jobs`` show it."""
    return {"id": j.id, "repo": j.repo, "revision": j.revision, "status": j.status.value, "stage": j.stage,
            "progress": j.progress, "attempts": j.attempts, "max_attempts": j.max_attempts, "reason": j.reason,
            "error_type": j.error_type, "error_message": j.error_message, "worker_id": j.worker_id,
            "heartbeat_age_s": round(now - j.heartbeat_at, 1) if j.heartbeat_at else None,
            "not_before": j.not_before, "target_repo": j.target_repo, "created_at": j.created_at,
            "started_at": j.started_at, "finished_at": j.finished_at,
            "variants": list((j.result or {}).get("variants") or []) if isinstance(j.result, dict) else []}


def publish_note(settings: Settings) -> str | None:
    if settings.will_publish:
        return None
    return ("no Hub token (HF_TOKEN): jobs are converted but not published" if settings.target.publish
            else "publishing is turned off (target.publish = false)")


def status_data(st: StateStore, settings: Settings, now: float, limit: int = 10) -> dict[str, Any]:
    skipped = [m for m in st.models(limit=200) if m.decision in ("skipped", "unchanged")][:limit]
    return {
        "publishing": settings.will_publish,
        "publish_note": publish_note(settings),
        "counts": st.counts(),
        "queue": [job_row(j, now) for j in st.jobs([J.Status.QUEUED, J.Status.RETRYING], limit=limit)],
        "running": [{**job_row(j, now), "files": pipeline_files(j)} for j in st.jobs([J.Status.RUNNING], limit=limit)],
        "published": [job_row(j, now) for j in st.jobs([J.Status.PUBLISHED, J.Status.CONVERTED], limit=limit,
                                                       newest_first=True)],
        "failed": [job_row(j, now) for j in st.jobs([J.Status.FAILED, J.Status.CANCELLED], limit=limit,
                                                    newest_first=True)],
        "skipped": [{"repo": m.repo, "sha": m.sha, "code": m.code, "reason": m.reason, "manual": m.manual_skip}
                    for m in skipped],
        "sources": [{"source": r.key, "mark": r.mark, "last_poll_at": r.last_poll_at, "last_ok_at": r.last_ok_at,
                     "polls": r.polls, "failures": r.failures, "last_error": r.last_error} for r in st.sources()],
        "workers": workers_view(st, now, settings.schedule.stale_after_seconds),
        "hub": hub_state(st),
        "toolchain": follow.toolchain_view(settings),
    }


def workers_view(st: StateStore, now: float, stale_after: float = 300.0) -> list[dict[str, Any]]:
    """Every box's workers (PostgreSQL: ``bot.queue.box``), live ones first, with the jobs each is running; empty on
    a single-box store."""
    rows = st.workers(now=now, stale_after=stale_after)
    out = [{"name": w["name"], "host": w["host"], "queues": w["queues"] or [], "concurrency": w["concurrency"],
            "gpu": w["gpu"], "max_model_gb": w["max_model_gb"], "alive": w["alive"],
            "heartbeat_age_s": None if w["heartbeat_age_s"] is None else round(w["heartbeat_age_s"], 1),
            "started_at": w["started_at"], "stopped_at": w["stopped_at"], "running": w["running"]} for w in rows]
    return sorted(out, key=lambda w: (not w["alive"], w["host"], w["name"]))


# --------------------------------------------------------------------------------------------------
# Running jobs: progress and ETA
# --------------------------------------------------------------------------------------------------


def _stage_of_event(e: dict[str, Any]) -> str | None:
    """The main stage a ``stage.end``/``stage.skip`` event is about (None for a variant's inner stages, whose
    messages start with ``<recipe>: ``)."""
    word = (e.get("message") or "").split(" ", 1)[0]
    return word if word and not word.endswith(":") else None


def planned_stages(st: StateStore, job_id: int) -> tuple[str, ...] | None:
    """The stages job ``job_id`` said it will run (its newest ``job.stages`` event, recorded when its stages
    start: a full ladder, a metadata patch, a variant's...), None when it has not said yet."""
    for e in st.events(job_id=job_id, kind="job.stages", limit=1):
        names = e.get("data", {}).get("stages") if isinstance(e.get("data"), dict) else None
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return tuple(names)
    return None


def stage_timings(st: StateStore) -> tuple[dict[str, float], dict[int, float]]:
    """(median seconds per stage over past jobs, when the current stage of each job began).

    A stage's time is from the end of the job's previous stage (or its claim) to its ``stage.end`` event; skipped
    stages (records found) are not timings."""
    evs = st.events(kind="stage.*", limit=TIMING_EVENTS) + st.events(kind="job.claimed", limit=TIMING_EVENTS)
    by_job: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for e in evs:
        if e.get("job_id") is not None:
            by_job[e["job_id"]].append(e)
    samples: dict[str, list[float]] = defaultdict(list)
    began: dict[int, float] = {}
    for job_id, rows in by_job.items():
        prev: float | None = None
        for e in sorted(rows, key=lambda r: (r["at"], r["id"])):
            stage = _stage_of_event(e)
            if e["kind"] == "stage.end" and stage is not None and prev is not None:
                samples[stage].append(e["at"] - prev)
            if e["kind"] == "job.claimed" or stage is not None:
                prev = e["at"]
        if prev is not None:
            began[job_id] = prev
    return {k: statistics.median(v) for k, v in samples.items()}, began


@dataclasses.dataclass(frozen=True)
class RunningView:
    job: dict[str, Any]
    stage_index: int  # 1-based position of the current stage in the job's own stage list (planned_stages)
    stage_count: int
    step: tuple[int, int] | None  # (i, m) inside the stage, from the progress text
    percent: float  # of the whole job
    elapsed_s: float
    stage_elapsed_s: float
    eta_s: float | None  # None: no past timings to go by
    files: list[dict[str, str]] = dataclasses.field(default_factory=list)  # pipeline_files: each file's state

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def running_view(job: Job, timings: dict[str, float], began: dict[int, float], now: float,
                 stages: Sequence[str] | None = None) -> RunningView:
    """Stage k of n and the ETA over ``stages``, the job's own list (:func:`planned_stages`); a job that has not
    said yet counts as its current stage alone."""
    names = tuple(stages) if stages else ((job.stage,) if job.stage else ())
    k = names.index(job.stage) if job.stage in names else 0
    m = STEP.search(job.progress or "")
    step = (int(m.group(1)), int(m.group(2))) if m and int(m.group(2)) > 0 else None
    frac = min(1.0, step[0] / step[1]) if step else 0.0
    n = max(1, len(names))
    start = began.get(job.id) or job.started_at or now
    in_stage = max(0.0, now - start)
    eta: float | None = None
    if job.stage in timings or (step and frac > 0):
        if step and frac > 0:
            left = in_stage * (1 - frac) / frac
        else:
            left = max(0.0, timings[job.stage] - in_stage)
        eta = left + sum(timings.get(s, 0.0) for s in names[k + 1:])
    return RunningView(job=job_row(job, now), stage_index=k + 1, stage_count=n, step=step,
                       percent=round(100 * (k + frac) / n, 1), elapsed_s=round(now - (job.started_at or now), 1),
                       stage_elapsed_s=round(in_stage, 1), eta_s=round(eta, 1) if eta is not None else None)


def running_views(st: StateStore, now: float, limit: int = 50) -> list[RunningView]:
    jobs = st.jobs([J.Status.RUNNING], limit=limit)
    if not jobs:
        return []
    timings, began = stage_timings(st)
    return [dataclasses.replace(running_view(j, timings, began, now, planned_stages(st, j.id)), files=pipeline_files(j))
            for j in jobs]


# --------------------------------------------------------------------------------------------------
# Running jobs: each file of the ladder on its way (made, measured, uploaded, published)
# --------------------------------------------------------------------------------------------------

FILE_STATES = ("waiting", "making", "made", "measuring", "measured", "failed", "passed", early.UPLOADING,
               early.UPLOADED, early.PUBLISHED)  # in the order a file goes through them


def pipeline_files(job: Job) -> list[dict[str, str]]:
    """The ladder's files of a running job in its work directory, each with where it is: waiting, making (being
    made), made, measuring, measured (held: its verdict waits for its neighbours on the ladder's curve), passed /
    failed (the gate's final verdict in report.json), uploading / uploaded (pre-uploaded, not visible yet),
    published (in a commit). Read from plan.json, ladder.json, report.json, the early publisher's
    record and the job's progress line ("making Q6_K, measuring Q4_K_M"); empty when this machine does not have the
    work directory."""
    if not job.workdir:
        return []
    try:
        return file_states(WorkDir(job.workdir), job.progress or "")
    except (GgufbotError, OSError, ValueError, KeyError, TypeError):
        return []


def file_states(wd: WorkDir, progress: str = "") -> list[dict[str, str]]:
    if not wd.plan_path.is_file():
        return []
    plan = records.read_json_object(wd.plan_path)
    types = [str(f["type"]) for f in plan.get("files") or [] if isinstance(f, dict) and f.get("type")]
    state = dict.fromkeys(types, "waiting")
    if wd.has_ladder():
        state.update(dict.fromkeys(wd.ladder().types, "made"))
    for verb, t in re.findall(r"\b(making|measuring) ([\w.+-]+)", progress):
        if t in state:
            state[t] = verb
    if wd.has_report():
        report = wd.report()
        state.update({str(h.get("type")): "measured" for h in report.held if h.get("type") in state})
        state.update({f.type: PASSED if f.status == PASSED else "failed" for f in report.files})
    state.update(early.file_states(wd))
    return [{"type": t, "state": v} for t, v in state.items()]


# --------------------------------------------------------------------------------------------------
# Published jobs: the ladder table from the report
# --------------------------------------------------------------------------------------------------


def report_of(st: StateStore, job: Job) -> Report | None:
    """The job's report: the kept copy of a published job, else the one in its work directory; None when
    this machine has neither (another worker's job on a shared database) or it cannot be read."""
    dirs = [Path(a["path"]).parent for a in st.artifacts(job.id) if a["kind"] == Path(REPORT_FILE).stem]
    if job.workdir:
        dirs.append(Path(job.workdir))
    for d in dirs:
        wd = WorkDir(d)
        if wd.has_report():
            try:
                return wd.report()
            except GgufbotError:
                continue
    return None


def ladder_rows(report: Report) -> list[dict[str, Any]]:
    """type, size, bits per weight, mean KLD ± error, same top token ± error, gate status and reasons."""
    rows = []
    for f in sorted(report.files, key=lambda f: -f.size):
        s = f.stats
        rows.append({"type": f.type, "size": f.size, "bpw": f.bpw, "status": f.status, "reasons": list(f.reasons),
                     "kld_mean": s.kld_mean if s else None, "kld_mean_err": s.kld_mean_err if s else None,
                     "same_top_p": s.same_top_p if s else None, "same_top_p_err": s.same_top_p_err if s else None})
    return rows


def queue_sizes(st: StateStore, job_ids: set[int]) -> dict[int, int]:
    """Bytes to fetch of queued jobs, as the watcher recorded them (``job.size`` events)."""
    out: dict[int, int] = {}
    for e in st.events(kind="job.size", limit=5000):
        if e.get("job_id") in job_ids and isinstance(e.get("data"), dict):
            out.setdefault(e["job_id"], int(e["data"].get("bytes") or 0))
    return out
