"""The status page, its JSON API, ``/metrics``, ``/healthz`` and the Hub webhook: one Starlette app on uvicorn.

Served by ``ggufbot run`` (in a thread, when ``[web] listen`` is set) and by ``ggufbot serve`` alone against
the same database (SQLite on one box, or the shared PostgreSQL: the page then shows every worker's jobs).

- Pages (Jinja2 templates ``templates/*.html.j2``): ``/queue``, ``/running``, ``/published``, ``/failed``,
  ``/decisions?q=``; ``/jobs/{id}/chart.png`` renders a job's size-vs-KLD chart from its report.
- JSON: ``/api/jobs[?status=a,b&repo=&limit=]``, ``/api/jobs/{id}``, ``/api/models/{owner}/{name}``.
- ``POST /jobs/{id}/retry|cancel``: the operator's retry and cancel. The admin token must come with the request
  (form field ``token`` or ``Authorization: Bearer``); the page keeps no session and sets no cookie, so another
  site cannot make a browser send a valid request (no CSRF), and a cross-site ``Origin``/``Sec-Fetch-Site`` is
  refused as well.
- ``POST /webhooks/hub``: :mod:`bot.web.webhooks`, secret checked with a constant-time compare.

The pages and the API only read the store; every handler that touches the store runs in uvicorn's thread pool,
so a page request never waits on, nor holds up, a job. Bodies over :data:`MAX_BODY` bytes are refused (413).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from bot.model import jobstate as J
from bot.model import metrics
from bot.service import follow
from bot.service import status
from bot.service.watcher import Watcher
from bot.web import gauges, webhooks
from bot.publish.card import TEMPLATES_DIR
from bot.model.settings import Settings, parse_listen, read_secret_file
from converters.core.errors import ConfigError, HubError, InputError, StateError
from converters.formats import chart

if TYPE_CHECKING:
    from bot.state.store import StateStore  # bot.state.base.StateStore once the state package has it

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
PAGES = ("running", "queue", "published", "failed", "decisions")
REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["size"] = _size
    env.filters["when"] = _when
    env.filters["duration"] = _duration
    return env


def _size(n: Any) -> str:
    if not isinstance(n, (int, float)) or n <= 0:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t)) if isinstance(t, (int, float)) and t else "-"


def _duration(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "unknown"
    s = int(s)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def _job_id(request: Request) -> int:
    raw = request.path_params["job_id"]
    if not raw.isdigit() or len(raw) > 12:
        raise HttpError(400, f"job id must be a positive integer, got {raw!r}")
    return int(raw)


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request body, refused with 413 beyond ``limit`` bytes (by its Content-Length or while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HttpError(413, f"request body over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HttpError(413, f"request body over {limit} bytes")
    return bytes(body)


class StatusSite:
    """The app: ``StatusSite(settings, store, watcher=..., health=...).app`` is the ASGI application.

    ``watcher`` (a :class:`bot.service.watcher.Watcher`) decides webhook calls; ``health`` says whether the
    scheduler is alive (``ggufbot run``); secrets are read from the files the settings name."""

    def __init__(self, settings: Settings, store: StateStore, *, watcher: Watcher | None = None,
                 health: Callable[[], bool] | None = None, hub_url: str = "") -> None:
        w = settings.web
        self.settings, self.store, self.watcher, self.health = settings, store, watcher, health
        self.admin_token = read_secret_file(w.admin_token_file, "web.admin_token_file") if w.admin_token_file else None
        self.webhook_secret = read_secret_file(w.webhook_secret_file, "web.webhook_secret_file") \
            if w.webhook_secret_file else None
        self.hub_url = hub_url.rstrip("/")
        self.env = environment()
        self._charts: dict[tuple[int, str], bytes] = {}
        self._chart_lock = threading.Lock()
        routes = [Route("/", lambda r: RedirectResponse("/running", status_code=303)),
                  *[Route(f"/{p}", self._page_route(p)) for p in PAGES],
                  Route("/jobs/{job_id}/chart.png", self._guard(self.chart)),
                  Route("/jobs/{job_id}/{action}", self.action, methods=["POST"]),
                  Route("/api/jobs", self._guard(self.api_jobs, api=True)),
                  Route("/api/jobs/{job_id}", self._guard(self.api_job, api=True)),
                  Route("/api/models/{repo:path}", self._guard(self.api_model, api=True)),
                  Route("/metrics", self._guard(self.metrics, api=True)),
                  Route("/healthz", self._guard(self.healthz, api=True)),
                  Route("/webhooks/hub", self.webhook, methods=["POST"])]
        self.app = Starlette(routes=routes)

    # ------------------------------------------------------------------ plumbing
    def _guard(self, fn: Callable[[Request], Response], api: bool = False) -> Callable[[Request], Response]:
        """A sync handler (run in the thread pool) whose HttpError becomes a clear 4xx/5xx answer."""
        def handler(request: Request) -> Response:
            try:
                return fn(request)
            except HttpError as e:
                return self.error(e.status, e.message, api)
        return handler

    def error(self, code: int, message: str, api: bool) -> Response:
        if api:
            return JSONResponse({"error": message}, status_code=code)
        return self.render("message.html.j2", code, title=f"{code}", message=message, ok=False)

    def render(self, name: str, code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("pages", PAGES)
        context.setdefault("now", time.time())
        context.setdefault("publish_note", status.publish_note(self.settings))
        context.setdefault("toolchain_line", follow.toolchain_line(follow.read_state(self.settings)))
        return HTMLResponse(self.env.get_template(name).render(**context), status_code=code)

    def _page_route(self, page: str) -> Callable[[Request], Response]:
        return self._guard(lambda request: self.render(f"{page}.html.j2", page=page,
                                                       **getattr(self, f"page_{page}")(request)))

    # ------------------------------------------------------------------ pages
    def page_running(self, request: Request) -> dict[str, Any]:
        now = time.time()
        workers = status.workers_view(self.store, now, self.settings.schedule.stale_after_seconds)
        return {"running": status.running_views(self.store, now), "workers": workers}

    def page_queue(self, request: Request) -> dict[str, Any]:
        jobs = sorted(self.store.jobs([J.Status.QUEUED, J.Status.RETRYING]), key=lambda j: (-j.priority, j.id))
        sizes = status.queue_sizes(self.store, {j.id for j in jobs})
        now = time.time()
        return {"queue": [{**status.job_row(j, now), "position": i + 1, "size": sizes.get(j.id)}
                          for i, j in enumerate(jobs)]}

    def page_published(self, request: Request) -> dict[str, Any]:
        now, rows = time.time(), []
        for j in self.store.jobs([J.Status.PUBLISHED, J.Status.CONVERTED], limit=20, newest_first=True):
            report = status.report_of(self.store, j)
            rows.append({**status.job_row(j, now), "ladder": status.ladder_rows(report) if report else None,
                         "repo_url": f"{self.hub_url}/{j.target_repo}" if j.target_repo and self.hub_url else None})
        return {"published": rows}

    def page_failed(self, request: Request) -> dict[str, Any]:
        now = time.time()
        jobs = self.store.jobs([J.Status.FAILED, J.Status.CANCELLED, J.Status.RETRYING], limit=50, newest_first=True)
        return {"failed": [status.job_row(j, now) for j in jobs], "admin": self.admin_token is not None}

    def page_decisions(self, request: Request) -> dict[str, Any]:
        q = request.query_params.get("q", "").strip()
        if len(q) > 200:
            raise HttpError(400, "search text over 200 characters")
        rows = [d for d in self.store.decisions(limit=2000) if q.lower() in d["repo"].lower()][:500]
        return {"decisions": rows, "q": q}

    def chart(self, request: Request) -> Response:
        job = self._existing(_job_id(request))
        report = status.report_of(self.store, job)
        if report is None:
            raise HttpError(404, f"job {job.id} has no report on this machine")
        key = (job.id, report.created_at)
        with self._chart_lock:
            png = self._charts.get(key)
            if png is None:
                with tempfile.TemporaryDirectory(prefix="ggufbot-chart-") as tmp:
                    png = chart.render(report, Path(tmp) / "chart.png").read_bytes()
                self._charts[key] = png
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=60"})

    # ------------------------------------------------------------------ JSON API
    def api_jobs(self, request: Request) -> Response:
        qp = request.query_params
        try:
            states = [J.Status(s) for s in qp.get("status", "").split(",") if s] or None
        except ValueError:
            raise HttpError(400, f"unknown status in {qp.get('status')!r}; known: "
                                 f"{', '.join(s.value for s in J.Status)}") from None
        limit = qp.get("limit", "100")
        if not limit.isdigit() or not 1 <= int(limit) <= 1000:
            raise HttpError(400, "limit must be an integer from 1 to 1000")
        jobs = self.store.jobs(states, repo=qp.get("repo") or None, limit=int(limit), newest_first=True)
        now = time.time()
        return JSONResponse({"jobs": [status.job_row(j, now) for j in jobs]})

    def api_job(self, request: Request) -> Response:
        job = self._existing(_job_id(request))
        now = time.time()
        out: dict[str, Any] = {"job": status.job_row(job, now),
                               "events": [_event_json(e) for e in self.store.events(job_id=job.id, limit=100)],
                               "artifacts": self.store.artifacts(job.id)}
        if job.status == J.Status.RUNNING:
            timings, began = status.stage_timings(self.store)
            out["running"] = status.running_view(job, timings, began, now,
                                                 status.planned_stages(self.store, job.id)).to_json()
            out["running"]["files"] = status.pipeline_files(job)
        report = status.report_of(self.store, job)
        out["ladder"] = status.ladder_rows(report) if report else None
        return JSONResponse(out)

    def api_model(self, request: Request) -> Response:
        repo = request.path_params["repo"]
        if not REPO_RE.fullmatch(repo):
            raise HttpError(400, f"expected OWNER/NAME, got {repo!r}")
        model = self.store.model(repo)
        decisions = self.store.decisions(repo=repo, limit=200)
        jobs = self.store.jobs(repo=repo, newest_first=True)
        if model is None and not decisions and not jobs:
            raise HttpError(404, f"{repo} has never been seen")
        now = time.time()
        return JSONResponse({"repo": repo, "model": _model_json(model) if model else None,
                             "decisions": decisions, "jobs": [status.job_row(j, now) for j in jobs]})

    def metrics(self, request: Request) -> Response:
        return Response(gauges.exposition(self.store), media_type="text/plain; version=0.0.4; charset=utf-8")

    def healthz(self, request: Request) -> Response:
        try:
            counts = self.store.counts()
        except Exception as e:  # noqa: BLE001 - any store failure is "unhealthy"
            raise HttpError(503, f"the state store does not answer: {type(e).__name__}") from None
        if self.health is not None and not self.health():
            raise HttpError(503, "the scheduler is not running")
        # a Hub outage is reported, not failed: restarting the bot cannot bring the Hub back, and a container
        # healthcheck that did would kill jobs that do not need the Hub (an imatrix run) again and again
        hub = status.hub_state(self.store)
        return JSONResponse({"ok": True, "degraded": not hub["reachable"], "hub": hub, "jobs": counts})

    def _existing(self, job_id: int) -> Any:
        job = self.store.job(job_id)
        if job is None:
            raise HttpError(404, f"no job {job_id}")
        return job

    # ------------------------------------------------------------------ POST: operator actions and webhooks
    async def action(self, request: Request) -> Response:
        api = "application/json" in request.headers.get("accept", "")
        try:
            action = request.path_params["action"]
            if action not in ("retry", "cancel"):
                raise HttpError(404, f"unknown action {action!r}")
            job_id = _job_id(request)
            self._same_origin(request)
            form = parse_qs((await read_body(request)).decode("utf-8", "replace"))
            self._authorize(request, (form.get("token") or [""])[-1])
            msg = await run_in_threadpool(self._act, action, job_id)
        except HttpError as e:
            return self.error(e.status, e.message, api)
        if api:
            return JSONResponse({"ok": True, "message": msg})
        return self.render("message.html.j2", title="done", message=msg, ok=True)

    def _same_origin(self, request: Request) -> None:
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            raise HttpError(403, "refused: the request came from another site")
        origin = request.headers.get("origin")
        if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
            raise HttpError(403, "refused: the request came from another site")

    def _authorize(self, request: Request, form_token: str) -> None:
        if self.admin_token is None:
            raise HttpError(403, "refused: admin actions are off (set [web] admin_token_file)")
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else form_token
        if not given or not hmac.compare_digest(given.encode(), self.admin_token.encode()):
            log.warning("refused a %s %s from %s: %s admin token", request.method, request.url.path,
                        request.client.host if request.client else "?", "wrong" if given else "no")
            raise HttpError(401, "refused: the admin token is missing or wrong")

    def _act(self, action: str, job_id: int) -> str:
        op = J.operator_retry if action == "retry" else J.operator_cancel
        try:
            src, job = op(self.store, job_id, now=time.time(), by="operator (web)")
        except StateError as e:
            raise HttpError(404 if "no job" in str(e) else 409, e.short()) from None
        log.info("job %d %s: %s -> %s (status page)", job.id, job.repo, src.value, job.status.value)
        return f"job {job.id} {job.repo}: {src.value} -> {job.status.value}"

    async def webhook(self, request: Request) -> Response:
        try:
            body = await read_body(request)
            self._check_secret(request)
            try:
                event = webhooks.HubEvent.from_json(json.loads(body))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise HttpError(400, "the body is not JSON") from None
            except InputError as e:
                raise HttpError(400, e.short()) from None
            if self.watcher is None:
                raise HttpError(503, "this server decides no webhooks")
            out = await run_in_threadpool(webhooks.handle, event, self.watcher, self.settings, time.time())
        except HttpError as e:
            metrics.webhook("refused")
            return JSONResponse({"error": e.message}, status_code=e.status)
        except HubError as e:  # the Hub could not be asked: let it send the call again
            metrics.webhook("error")
            return JSONResponse({"error": e.short()}, status_code=503)
        return JSONResponse(out.to_json())

    def _check_secret(self, request: Request) -> None:
        if self.webhook_secret is None:
            raise HttpError(403, "webhooks are off (set [web] webhook_secret_file)")
        given = request.headers.get("x-webhook-secret", "")
        if not hmac.compare_digest(given.encode(), self.webhook_secret.encode()):
            log.warning("refused a Hub webhook call from %s: %s secret",
                        request.client.host if request.client else "?", "wrong" if given else "no")
            raise HttpError(401, "wrong or missing X-Webhook-Secret")


def _event_json(e: dict[str, Any]) -> dict[str, Any]:
    return {k: e[k] for k in ("at", "kind", "message", "data") if k in e}


def _model_json(m: Any) -> dict[str, Any]:
    return {"repo": m.repo, "sha": m.sha, "decision": m.decision, "code": m.code, "reason": m.reason,
            "decided_at": m.decided_at, "source": m.source, "manual_skip": m.manual_skip, "queued_sha": m.queued_sha}


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------


class WebServer:
    """uvicorn serving a :class:`StatusSite` at ``listen`` (``HOST:PORT``; port 0 picks a free one)."""

    def __init__(self, site: StatusSite, listen: str) -> None:
        import uvicorn

        host, port = parse_listen(listen)
        config = uvicorn.Config(site.app, host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}"

    def start(self, timeout: float = 15.0) -> "WebServer":
        """Serve in a background thread; return once listening (ConfigError if it cannot bind)."""
        self._thread = threading.Thread(target=self.server.run, name="web", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise ConfigError(f"web.listen: the status page could not listen on {self.server.config.host}:"
                                  f"{self.server.config.port}", key="web.listen")
            time.sleep(0.05)
        log.info("status page on %s", self.url)
        return self

    def run(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (``ggufbot serve``)."""
        self.server.run()

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
