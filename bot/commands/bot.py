"""The bot's commands: ``run``, ``worker``, ``migrate``, ``watch --once``, ``enqueue``, ``status``, ``retry``,
``cancel``, ``skip``/``unskip``, ``serve`` (the status page alone) and ``webhook create|list|delete``.

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

from bot.model import jobstate as J

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
    p.add_argument("--no-worker", action="store_true",
                   help="PostgreSQL only: run the scheduler alone (poll, decide, hand jobs to the workers)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("worker", parents=[common], help="PostgreSQL only: run jobs on this box (no polling)",
                       description="Take jobs from the shared PostgreSQL queue (procrastinate) and run them; run one "
                       "per box, beside one `ggufbot run` (or `run --no-worker`) somewhere. SIGTERM finishes the "
                       "current step, puts the job back and exits.")
    p.add_argument("--concurrency", type=int, default=None, help="jobs at once (default: limits.concurrency)")
    p.add_argument("--queues", default=None,
                   help="comma-separated queues (default: ggufbot, plus ggufbot-big on a big GPU box)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("migrate", parents=[common], help="upgrade the state store and procrastinate's queue schema",
                       description="Apply the state store's migrations and, on PostgreSQL, the installed "
                       "procrastinate's migrations that the queue schema lacks, in order (workers refuse to start "
                       "on an older queue schema). Run it once the boxes' workers are stopped or upgraded.")
    p.add_argument("--check", action="store_true",
                   help="apply nothing; list what is not applied (exit code 1 if anything is)")
    p.set_defaults(func=cmd_migrate)

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

    p = sub.add_parser("serve", parents=[common], help="the status page, JSON API, /metrics and the Hub webhook alone",
                       description="Serve the status page against the settings' database (the one `run` uses, or "
                       "the shared PostgreSQL) without running jobs. Stops on SIGTERM/SIGINT.")
    p.add_argument("--listen", metavar="HOST:PORT", help="default: [web] listen, else 127.0.0.1:8080")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("webhook", help="manage the bot's Hub webhooks (create, list, delete)")
    wsub = p.add_subparsers(dest="webhook_command", metavar="ACTION")
    wsub.required = True
    w = wsub.add_parser("create", parents=[common], help="a webhook on the configured authors, calling URL")
    w.add_argument("--url", required=True, help="where the Hub sends calls: https://HOST/webhooks/hub")
    w.add_argument("--author", action="append", default=None,
                   help="watch this author (repeatable; default: the authors of the configured sources)")
    w.add_argument("--user", action="append", default=[],
                   help="an author that is a user, not an organisation (repeatable)")
    w.set_defaults(func=cmd_webhook_create)
    w = wsub.add_parser("list", parents=[common], help="the token's webhooks")
    w.add_argument("--json", action="store_true", help="machine-readable output")
    w.set_defaults(func=cmd_webhook_list)
    w = wsub.add_parser("delete", parents=[common], help="delete webhook ID")
    w.add_argument("id", metavar="ID")
    w.set_defaults(func=cmd_webhook_delete)


# --------------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace):
    from bot.model import settings as settings_mod

    return settings_mod.load(args.config)


def _store(settings, migrate: bool = True):
    if _on_queue(settings):  # the queue hands its schema to the store (migration 3 creates it)
        from bot.queue.schema import open_store

        return open_store(settings.database_url, migrate=migrate)
    from bot.state.store import Store

    return Store(settings.database_url, migrate=migrate)


def _bot(settings, **kw: Any):
    from bot.service.scheduler import Bot

    return Bot(settings, store=kw.pop("store", None) or _store(settings), **kw)


def _service_logging(args: argparse.Namespace) -> None:
    for name in ("bot", "converters"):  # a service: say what it does unless told to be quieter
        lg = logging.getLogger(name)
        if lg.getEffectiveLevel() > logging.INFO and not args.verbose:
            lg.setLevel(logging.INFO)


def _on_queue(s) -> bool:
    """A PostgreSQL state: jobs go through procrastinate (bot.queue.box)."""
    from bot.state.engine import delivered_by_queue

    return delivered_by_queue(s.database_url)


def cmd_worker(args: argparse.Namespace) -> int:
    from converters.llama import toolchain as tc_mod
    from converters.core.errors import ConfigError

    s = _settings(args)
    if not _on_queue(s):
        raise ConfigError("ggufbot worker needs a PostgreSQL database_url (with SQLite, `ggufbot run` runs the jobs)",
                          key="database_url")
    if args.concurrency is not None and args.concurrency < 1:
        raise ConfigError("--concurrency must be at least 1")
    _service_logging(args)
    from bot.queue import box as queue

    tc = tc_mod.find(required=True)
    box = queue.Box(s, toolchain=tc, concurrency=args.concurrency)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    print(f"ggufbot worker: state in {_safe_url(s.database_url)}; queues "
          f"{', '.join(queues or queue.worker_queues(s))}, concurrency {box.concurrency}", file=sys.stderr)
    return queue.run(box, jobs=True, scheduler=False, queues=queues)


def _run_on_queue(args: argparse.Namespace, s) -> int:
    """``ggufbot run`` on PostgreSQL: the scheduler (procrastinate periodic tick) and, unless --no-worker, a
    worker in the same process."""
    from bot.queue import box as queue

    tc = None
    if not args.no_worker:
        from converters.llama import toolchain as tc_mod

        tc = tc_mod.find(required=True)
    st = _store(s)
    bot = _bot(s, store=st, toolchain=tc)
    box = queue.Box(s, store=st, hub=bot.hub, toolchain=tc, bot=bot, poll=not args.no_poll)
    what = "scheduler only" if args.no_worker else "scheduler and worker"
    print(f"ggufbot run: state in {_safe_url(s.database_url)} ({what}); {bot.publish_note}", file=sys.stderr)
    web = None
    if s.web.listen:
        from bot.web.site import StatusSite, WebServer

        site = StatusSite(s, st, watcher=bot.watcher, hub_url=bot.hub.endpoint, health=lambda: bool(box.workers))
        web = WebServer(site, s.web.listen).start()
        print(f"ggufbot run: status page on {web.url}", file=sys.stderr)
    try:
        return queue.run(box, jobs=not args.no_worker, scheduler=True)
    finally:
        if web is not None:
            web.stop()


def cmd_run(args: argparse.Namespace) -> int:
    s = _settings(args)
    _service_logging(args)
    if _on_queue(s):
        if args.exit_when_idle:
            from converters.core.errors import ConfigError

            raise ConfigError("--exit-when-idle: not with a PostgreSQL database_url (workers run until stopped)")
        return _run_on_queue(args, s)
    if args.no_worker:
        from converters.core.errors import ConfigError

        raise ConfigError("--no-worker needs a PostgreSQL database_url (with SQLite, `ggufbot run` runs the jobs)",
                          key="database_url")
    from converters.llama import toolchain as tc_mod

    tc = tc_mod.find(required=True)  # fail at start, not in the middle of the first job
    bot = _bot(s, toolchain=tc)
    print(f"ggufbot run: state in {_safe_url(s.database_url)}; {bot.publish_note}", file=sys.stderr)
    web = None
    if s.web.listen:
        from bot.web.site import StatusSite, WebServer

        site = StatusSite(s, bot.store, watcher=bot.watcher, hub_url=bot.hub.endpoint,
                          health=lambda: bot.scheduler is not None and bot.scheduler.running)
        web = WebServer(site, s.web.listen).start()
        print(f"ggufbot run: status page on {web.url}", file=sys.stderr)
    try:
        return bot.serve(exit_when_idle=args.exit_when_idle, poll=not args.no_poll)
    finally:
        if web is not None:
            web.stop()


def cmd_serve(args: argparse.Namespace) -> int:
    from bot.hub.client import Hub
    from bot.service.watcher import Watcher
    from bot.web.site import StatusSite, WebServer

    s = _settings(args)
    st = _store(s)
    hub = Hub(token=s.token, endpoint=s.hub.endpoint)
    site = StatusSite(s, st, watcher=Watcher(s, st, hub), hub_url=hub.endpoint)
    server = WebServer(site, args.listen or s.web.listen or "127.0.0.1:8080")
    print(f"ggufbot serve: state in {_safe_url(s.database_url)}; status page on "
          f"http://{server.server.config.host}:{server.server.config.port}", file=sys.stderr)
    server.run()
    st.close()
    return 0


def _webhook_hub(args: argparse.Namespace):
    from bot.hub.client import Hub

    s = _settings(args)
    return s, Hub(token=s.token, endpoint=s.hub.endpoint)


def cmd_webhook_create(args: argparse.Namespace) -> int:
    from bot.model.settings import read_secret_file
    from converters.core.errors import ConfigError

    s, hub = _webhook_hub(args)
    if not s.web.webhook_secret_file:
        raise ConfigError("web.webhook_secret_file: needed to create a webhook (the Hub sends its secret back)",
                          key="web.webhook_secret_file")
    authors = args.author or sorted({src.author for src in s.sources if src.author})
    if not authors:
        raise ConfigError("no author to watch: give --author or configure sources with an author", key="sources")
    watched = [("user" if a in args.user else "org", a) for a in authors]
    hook = hub.create_webhook(args.url, watched, secret=read_secret_file(s.web.webhook_secret_file,
                                                                         "web.webhook_secret_file"))
    print(f"created webhook {hook.id} -> {hook.url} watching {', '.join(f'{t}:{n}' for t, n in hook.watched)}")
    return 0


def cmd_webhook_list(args: argparse.Namespace) -> int:
    _, hub = _webhook_hub(args)
    hooks = hub.list_webhooks()
    if args.json:
        print(json.dumps([h.to_json() for h in hooks], indent=2))
        return 0
    for h in hooks:
        print(f"{h.id} {h.url} {'disabled' if h.disabled else 'enabled'}: "
              f"{', '.join(f'{t}:{n}' for t, n in h.watched)}")
    if not hooks:
        print("no webhooks")
    return 0


def cmd_webhook_delete(args: argparse.Namespace) -> int:
    _, hub = _webhook_hub(args)
    hub.delete_webhook(args.id)
    print(f"deleted webhook {args.id}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from bot.state.schema import LATEST

    s = _settings(args)
    st = _store(s, migrate=False)
    try:
        before = st.schema_version()
        pq = st.queue_schema if st.queued_by_procrastinate else None
        pending = st.queue_state()[0] if pq is not None and before >= 3 else []
        if args.check:
            print(f"state store: schema version {before} of {LATEST}")
            if pq is not None:
                print(f"queue schema (procrastinate {pq.version}): "
                      + (f"{len(pending)} migration(s) not applied: {', '.join(pending)}" if pending else
                         "up to date" if before >= 3 else "not created yet"))
            return 1 if before < LATEST or pending else 0
        after = st.migrate(queue=True)
        print(f"state store: schema version {after}" + (f" (was {before})" if after != before else " (up to date)"))
        if pq is not None:
            left, _ = st.queue_state()
            done = [n for n in pending if n not in left]
            print(f"queue schema (procrastinate {pq.version}): "
                  + (f"{len(left)} migration(s) still not applied: {', '.join(left)}" if left else
                     f"applied {', '.join(done)}" if done else "up to date"))
            return 1 if left else 0
        return 0
    finally:
        st.close()


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
        from converters.core.errors import ConfigError

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
    st = _store(_settings(args))
    src, job = J.operator_retry(st, args.job, now=time.time())
    print(f"job {job.id} {job.repo}: {src.value} -> queued")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    st = _store(_settings(args))
    src, job = J.operator_cancel(st, args.job, now=time.time())
    extra = " (its worker stops at the next step)" if src == J.Status.RUNNING else ""
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


# --------------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    s = _settings(args)
    st = _store(s)
    now = time.time()
    from bot.service.status import status_data

    data = status_data(st, s, now, limit=args.limit)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    out = []
    hub = data["hub"]
    if not hub["reachable"]:
        nxt = f"; next poll at {_when(hub['next_poll_at'])}" if hub.get("next_poll_at") else ""
        out.append(f"Hub unreachable since {_when(hub['since'])}: {hub.get('reason') or 'no connection'} "
                   f"({hub.get('endpoint') or 'the Hub'}){nxt}")
    out.append(f"toolchain: {data['toolchain']['line']}")
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
        if j.get("files"):  # the ladder's files on their way: made, measured, uploaded, published
            out.append("    files: " + ", ".join(f"{f['type']} {f['state']}" for f in j["files"]))
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
    if data["workers"]:
        out.append("workers:")
    for w in data["workers"]:
        state = (f"alive, heartbeat {w['heartbeat_age_s']:.0f}s ago" if w["alive"] else
                 "stopped" if w["stopped_at"] else "gone (no heartbeat)")
        jobs = ", ".join(f"#{i}" for i in w["running"]) or "idle"
        out.append(f"  {w['name']} on {w['host']}: {state}; queues {','.join(w['queues'])}, "
                   f"concurrency {w['concurrency']}{', gpu' if w['gpu'] else ''}; running {jobs}")
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
