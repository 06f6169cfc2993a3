"""Hub webhooks: a push to a watched repo queues its new revision at once, through the poll's rules.

The Hub calls ``POST /webhooks/hub`` (:mod:`bot.web.site`) with a JSON payload (``event.scope``, ``repo.type``,
``repo.name``, ``repo.headSha``, ``updatedRefs``) and the webhook's secret in ``X-Webhook-Secret``. A
``repo.content`` event of a model repo whose main branch moved is decided like a listed model of the source
that watches it (:meth:`bot.service.watcher.Watcher.decide_now`: the rules of :mod:`bot.model.rules`, and never the same
``repo@commit`` twice). Everything else is acknowledged and ignored. Polling stays the way new repos are found:
the Hub has no webhook on all repos.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from bot.model import metrics
from bot.model.record import ModelRecord
from bot.model.settings import Settings, Source
from bot.service.watcher import Watcher
from converters.core.errors import HubNotFound, InputError

log = logging.getLogger(__name__)

CONTENT_SCOPE = "repo.content"
MAIN_REF = "refs/heads/main"


@dataclasses.dataclass(frozen=True)
class HubEvent:
    """The fields of a Hub webhook payload the bot uses (the rest is ignored)."""

    scope: str
    action: str
    repo_type: str
    repo: str
    head_sha: str | None
    updated_refs: tuple[str, ...]

    @classmethod
    def from_json(cls, d: Any) -> "HubEvent":
        """Parse a payload; InputError (a 400) when it is not the Hub's shape."""
        if not isinstance(d, Mapping) or not isinstance(d.get("event"), Mapping) or \
                not isinstance(d.get("repo"), Mapping):
            raise InputError("expected a Hub webhook payload with 'event' and 'repo' objects")
        ev, repo = d["event"], d["repo"]
        refs = d.get("updatedRefs") or []
        if not isinstance(refs, list) or not all(isinstance(r, Mapping) for r in refs):
            raise InputError("'updatedRefs' must be a list of objects")
        fields = (ev.get("scope"), ev.get("action", ""), repo.get("type", "model"), repo.get("name", ""))
        if not all(isinstance(x, str) for x in fields) or not fields[0]:
            raise InputError("'event.scope', 'event.action', 'repo.type' and 'repo.name' must be strings")
        head = repo.get("headSha")
        if head is not None and not isinstance(head, str):
            raise InputError("'repo.headSha' must be a string")
        return cls(scope=fields[0], action=fields[1], repo_type=fields[2], repo=fields[3], head_sha=head,
                   updated_refs=tuple(str(r.get("ref", "")) for r in refs))


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: str  # queued | decided | ignored
    message: str
    job_ids: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "jobs": list(self.job_ids)}


def watching_source(settings: Settings, rec: ModelRecord) -> Source | None:
    """The first configured source that lists ``rec`` (author, search term, Hub tags and pipeline tag)."""
    vocab = set(getattr(rec, "tags", ()) or ()) | {rec.pipeline_tag, rec.library_name}
    for src in settings.sources:
        if src.author and rec.author != src.author:
            continue
        if src.search and src.search.lower() not in rec.id.lower():
            continue
        if src.filters and not all(f in vocab for f in src.filters):
            continue
        if src.pipeline_tag and rec.pipeline_tag != src.pipeline_tag:
            continue
        return src
    return None


def maybe_watched(settings: Settings, repo: str) -> bool:
    """A cheap check before any Hub request: could a source list ``repo`` at all (by author / search)?"""
    owner = repo.split("/", 1)[0]
    return any((not s.author or s.author == owner) and (not s.search or s.search.lower() in repo.lower())
               for s in settings.sources)


def handle(event: HubEvent, watcher: Watcher, settings: Settings, now: float) -> Outcome:
    """Decide the event's repo at its new head; never raises for a repo that is not watched or gone."""
    if event.scope != CONTENT_SCOPE or event.repo_type != "model":
        return _done("ignored", f"scope {event.scope} of a {event.repo_type} repo is not watched")
    if event.updated_refs and MAIN_REF not in event.updated_refs:
        return _done("ignored", f"{event.repo}: no change on the main branch")
    if event.repo.count("/") != 1 or not maybe_watched(settings, event.repo):
        return _done("ignored", f"{event.repo} is not watched by any source")
    try:
        rec = watcher.hub.model_info(event.repo, revision=event.head_sha)
    except HubNotFound:
        return _done("ignored", f"{event.repo}@{event.head_sha or 'main'} is not on the Hub (deleted or private)")
    source = watching_source(settings, rec)
    if source is None:
        return _done("ignored", f"{event.repo} is not watched by any source")
    res = watcher.decide_now(rec, source, now)
    watcher.store.event("webhook.received", f"{event.repo}@{(rec.sha or '')[:12]}: {res.decided} decided, "
                        f"{len(res.queued)} queued", now=now, repo=event.repo,
                        data={"sha": rec.sha, "queued": res.queued})
    if res.queued:
        return _done("queued", f"queued {event.repo}@{(rec.sha or '')[:12]}", tuple(res.queued))
    dec = watcher.store.model(event.repo)
    why = f"{dec.code}: {dec.reason}" if dec is not None and res.decided else "already decided at this commit"
    return _done("decided", f"{event.repo}@{(rec.sha or '')[:12]} not queued ({why})")


def _done(status: str, message: str, job_ids: tuple[int, ...] = ()) -> Outcome:
    metrics.webhook(status)
    log.info("hub webhook: %s", message)
    return Outcome(status, message, job_ids)

