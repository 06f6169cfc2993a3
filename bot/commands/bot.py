"""The bot's commands: ``run``, ``watch --once``, ``enqueue``, ``status``, ``retry``, ``cancel``, ``skip``/``unskip``.

Every command reads the settings (``--config FILE``, else ``$GGUFBOT_CONFIG``, else built-in defaults, plus
``GGUFBOT_<SECTION>__<KEY>`` variables) and opens the state store they name.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from bot import jobs as J

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=None,
                        help="settings file (TOML; default: $GGUFBOT_CONFIG, else built-in defaults)")

    p = sub.add_parser("run", parents=[common], help="the bot: watch the Hub, queue, convert, evaluate, publish",
                       description="Poll the watched sources on a schedule, queue accepted models, and run jobs "
                       "(resuming jobs whose worker died). SIGTERM finishes the current step and exits.")
    p.add_argument("--exit-when-idle", action="store_true",
                   help="exit once the first poll is done and no job is queued or running (cron, tests)")
    p.add_argument("--no-poll", action="store_true", help="only run queued jobs; do not poll the Hub")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("watch", parents=[common], help="poll the watched sources and queue what is accepted")
    p.add_argument("--once", action="store_true", required=True, help="one poll, then exit (the only mode)")
    p.add_argument("--json", action="store_true", help="print the poll result as JSON")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("enqueue", parents=[common], help="queue REPO[@REVISION] (the same safety rules apply)")
    p.add_argument("target", metavar="REPO[@REV]")
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("status", parents=[common],
                       help="queue, running jobs with stage and progress, recent published and failed, decisions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--limit", type=int, default=10, help="rows per section (default 10)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("retry", parents=[common], help="put a failed or cancelled job back in the queue")
    p.add_argument("job", type=int, metavar="JOB")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job")
    p.add_argument("job", type=int, metavar="JOB")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("skip", parents=[common], help="never queue REPO (its queued jobs are cancelled)")
    p.add_argument("repo", metavar="REPO")
    p.add_argument("--reason", default="skipped by the operator")
    p.set_defaults(func=cmd_skip)

    p = sub.add_parser("unskip", parents=[common], help="let the next poll decide REPO again")
    p.add_argument("repo", metavar="REPO")
    p.set_defaults(func=cmd_unskip)


# --------------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace):
    from bot import settings as settings_mod

    return settings_mod.load(args.config)


def _store(settings):
    from bot.store import Store

    return Store(settings.database_url)


def _bot(settings, **kw: Any):
    from bot.scheduler import Bot

    return Bot(settings, **kw)


def cmd_run(args: argparse.Namespace) -> int:
    s = _settings(args)
    for name in ("bot", "converters"):  # a service: say what it does unless told to be quieter
        lg = logging.getLogger(name)
        if lg.getEffectiveLevel() > logging.INFO and not args.verbose:
            lg.setLevel(logging.INFO)
    from converters import toolchain as tc_mod

    tc = tc_mod.find(required=True)  # fail at start, not in the middle of the first job
    bot = _bot(s, toolchain=tc)
    print(f"ggufbot run: state in {_safe_url(s.database_url)}; {bot.publish_note}", file=sys.stderr)
    return bot.serve(exit_when_idle=args.exit_when_idle, poll=not args.no_poll)


def cmd_watch(args: argparse.Namespace) -> int:
    s = _settings(args)
    bot = _bot(s, resolve_namespace=False)
    res = bot.poll(time.time())
    if args.json:
        print(json.dumps(res.to_json(), indent=2))
    else:
        for src in res.sources:
            state = "ok" if src.ok else f"FAILED: {src.error}"
            print(f"{src.source}: {state}; {src.listed} listed, {src.decided} decided, {len(src.queued)} queued")
        for jid in res.queued:
            job = bot.store.job(jid)
            print(f"  queued job {jid}: {job.repo}@{job.revision[:12]} ({job.reason})")
        if not s.will_publish:
            print(f"note: {bot.publish_note}")
    return 0 if res.ok else 1


def cmd_enqueue(args: argparse.Namespace) -> int:
    s = _settings(args)
    repo, _, rev = args.target.partition("@")
    if repo.count("/") != 1:
        from converters.errors import ConfigError

        raise ConfigError(f"expected OWNER/NAME[@REVISION], got {args.target!r}")
    bot = _bot(s, resolve_namespace=False)
    d, job_id = bot.watcher.enqueue_manual(repo, rev or None, time.time())
    if job_id is None:
        print(f"not queued: {repo}: {d.reason}", file=sys.stderr)
        return 1
    job = bot.store.job(job_id)
    print(f"queued job {job_id}: {job.repo}@{job.revision[:12]}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    s = _settings(args)
    st = _store(s)
    job = _job(st, args.job)
    now = time.time()
    src = job.status
    if src == J.Status.RETRYING:
        st.transition(job.id, J.Status.QUEUED, now=now, message="retry now (operator)", not_before=None)
    else:
        J.check(src, J.Status.QUEUED)
        st.transition(job.id, J.Status.QUEUED, now=now, message=f"retry (operator) after {src.value}", attempts=0,
                      error_type=None, error_message=None, not_before=None, finished_at=None, worker_id=None)
    print(f"job {job.id} {job.repo}: {src.value} -> queued")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    s = _settings(args)
    st = _store(s)
    job = _job(st, args.job)
    J.check(job.status, J.Status.CANCELLED)
    st.transition(job.id, J.Status.CANCELLED, now=time.time(), message="cancelled by the operator")
    extra = " (its worker stops at the next step)" if job.status == J.Status.RUNNING else ""
    print(f"job {job.id} {job.repo}: cancelled{extra}")
    return 0


def cmd_skip(args: argparse.Namespace) -> int:
    s = _settings(args)
    st = _store(s)
    now = time.time()
    st.set_manual_skip(args.repo, True, now=now, reason=args.reason)
    cancelled = []
    for job in st.jobs([J.Status.QUEUED, J.Status.RETRYING], repo=args.repo):
        st.transition(job.id, J.Status.CANCELLED, now=now, message=f"repo skipped: {args.reason}")
        cancelled.append(job.id)
    print(f"{args.repo}: skipped" + (f"; cancelled job(s) {', '.join(map(str, cancelled))}" if cancelled else ""))
    return 0


def cmd_unskip(args: argparse.Namespace) -> int:
    s = _settings(args)
    st = _store(s)
    st.set_manual_skip(args.repo, False, now=time.time())
    print(f"{args.repo}: no longer skipped; the next poll decides it again")
    return 0


def _job(st, job_id: int):
    from converters.errors import StateError

    job = st.job(job_id)
    if job is None:
        raise StateError(f"no job {job_id}")
    return job


# --------------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------------


def status_data(st, settings, now: float, limit: int = 10) -> dict[str, Any]:
    def job_row(j) -> dict[str, Any]:
        return {"id": j.id, "repo": j.repo, "revision": j.revision, "status": j.status.value, "stage": j.stage,
                "progress": j.progress, "attempts": j.attempts, "max_attempts": j.max_attempts, "reason": j.reason,
                "error_type": j.error_type, "error_message": j.error_message, "worker_id": j.worker_id,
                "heartbeat_age_s": round(now - j.heartbeat_at, 1) if j.heartbeat_at else None,
                "not_before": j.not_before, "target_repo": j.target_repo, "created_at": j.created_at,
                "finished_at": j.finished_at, "variants": list((j.result or {}).get("variants") or [])
                if isinstance(j.result, dict) else []}

    skipped = [m for m in st.models(limit=200) if m.decision in ("skipped", "unchanged")][:limit]
    return {
        "publishing": settings.will_publish,
        "publish_note": None if settings.will_publish else (
            "no Hub token (HF_TOKEN): jobs are converted but not published" if settings.target.publish
            else "publishing is turned off (target.publish = false)"),
        "counts": st.counts(),
        "queue": [job_row(j) for j in st.jobs([J.Status.QUEUED, J.Status.RETRYING], limit=limit)],
        "running": [job_row(j) for j in st.jobs([J.Status.RUNNING], limit=limit)],
        "published": [job_row(j) for j in st.jobs([J.Status.PUBLISHED, J.Status.CONVERTED], limit=limit,
                                                   newest_first=True)],
        "failed": [job_row(j) for j in st.jobs([J.Status.FAILED, J.Status.CANCELLED], limit=limit, newest_first=True)],
        "skipped": [{"repo": m.repo, "sha": m.sha, "code": m.code, "reason": m.reason, "manual": m.manual_skip}
                    for m in skipped],
        "sources": [{"source": r.key, "mark": r.mark, "last_poll_at": r.last_poll_at, "last_ok_at": r.last_ok_at,
                     "polls": r.polls, "failures": r.failures, "last_error": r.last_error} for r in st.sources()],
    }


def cmd_status(args: argparse.Namespace) -> int:
    s = _settings(args)
    st = _store(s)
    now = time.time()
    data = status_data(st, s, now, limit=args.limit)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    out = []
    counts = ", ".join(f"{k} {v}" for k, v in sorted(data["counts"].items())) or "no jobs"
    out.append(f"jobs: {counts}")
    if data["publish_note"]:
        out.append(f"note: {data['publish_note']}")
    out.append("running:")
    for j in data["running"]:
        hb = f", heartbeat {j['heartbeat_age_s']:.0f}s ago" if j["heartbeat_age_s"] is not None else ""
        out.append(f"  #{j['id']} {j['repo']}@{j['revision'][:12]} stage {j['stage'] or '-'}"
                   f"{' (' + j['progress'] + ')' if j['progress'] else ''}, attempt {j['attempts']}/{j['max_attempts']}"
                   f"{hb}")
    out.append("queue:")
    for j in data["queue"]:
        wait = f", retry after {_when(j['not_before'])}: {j['error_message']}" if j["status"] == "retrying" else ""
        out.append(f"  #{j['id']} {j['repo']}@{j['revision'][:12]} {j['status']} ({j['reason']}){wait}")
    out.append("published:")
    for j in data["published"]:
        where = j["target_repo"] or "not published (no token / publishing off)"
        out.append(f"  #{j['id']} {j['repo']}@{j['revision'][:12]} -> {where} ({_when(j['finished_at'])})")
        for v in j["variants"]:
            if v.get("status") == "failed":
                out.append(f"    variant {v['recipe']}: FAILED: {v.get('error_type') or ''} "
                           f"{v.get('error_message') or ''}".rstrip())
            else:
                out.append(f"    variant {v['recipe']}: {v.get('status')}"
                           f"{' -> ' + v['target_repo'] if v.get('target_repo') else ''}")
    out.append("failed:")
    for j in data["failed"]:
        out.append(f"  #{j['id']} {j['repo']}@{j['revision'][:12]} {j['status']} in {j['stage'] or '-'}: "
                   f"{j['error_type'] or ''} {j['error_message'] or ''}".rstrip())
    out.append("skipped (latest):")
    for m in data["skipped"]:
        out.append(f"  {m['repo']}: {m['code']}: {m['reason']}")
    out.append("sources:")
    for src in data["sources"]:
        err = f", last error: {src['last_error']}" if src["last_error"] else ""
        out.append(f"  {src['source']}: last poll {_when(src['last_poll_at'])}, {src['failures']} failed of "
                   f"{src['polls']}{err}")
    print("\n".join(out))
    return 0


def _when(t: float | None) -> str:
    if not t:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _safe_url(url: str) -> str:
    """The database URL without a password."""
    import re

    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)
