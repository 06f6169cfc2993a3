"""The watcher: list what is new per source, decide accept or skip (with a stored reason), queue jobs.

The decisions are :func:`bot.model.rules.decide`, a pure function of one model record and the settings: every rule
returns a :class:`~bot.model.rules.Decision` with a short ``code`` and a human ``reason`` that the state store keeps
and ``status`` shows. The rules run in two passes so that a poll costs as few Hub requests as possible:

1. on the listing record (no request): disabled/private, operator exclusions, file names that escape the
   repo, already GGUF/quantized, ``auto_map`` remote code, pickle-only weights, licence, pipeline tag,
   parameter count, a size estimate from the parameter count;
2. on the full record (one ``model_info`` with file sizes and hashes, only for a candidate that passed pass 1):
   the same rules again plus the exact weight size against the size limit and gated access.

A repo whose last decision was made at the same commit is not looked at again (no request at all), so a poll
never queues the same ``repo@commit`` twice. A new revision of a queued model is re-queued only when a file that
changes the result changed: the fingerprint of the weights, config, tokenizer and chat template files (sha256 for
LFS files, size for small git files; from ``model_info``, no download) is compared with the one stored when the
model was last queued, and small files of the same size are read at both revisions and compared.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import logging
import time
from typing import TYPE_CHECKING, Any

from bot.model import jobstate as J
from bot.model import metrics
from bot.model.record import ModelRecord
from converters.core.errors import HubUnreachable
from bot.model.revisions import compare_revisions, fingerprint
from bot.model.rules import Decision, decide, sibling_names
from bot.model.settings import Settings, Source
from bot.service.status import hub_state
from bot.state.base import StateStore
from converters.formats.checkpoint import is_result_file
from converters.core.errors import HubAuthError, HubError, HubNotFound

if TYPE_CHECKING:
    from bot.hub.client import Hub

log = logging.getLogger(__name__)

__all__ = ["Watcher", "PollResult", "SourceResult", "iso", "public_endpoint"]


# --------------------------------------------------------------------------------------------------
# Polling
# --------------------------------------------------------------------------------------------------


def public_endpoint(url: str) -> str:
    """The Hub endpoint as shown in a line or a record: scheme, host and port only (no user info, no path)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname}{':' + str(u.port) if u.port else ''}" if u.hostname else "the Hub"


def clock(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(t: Any) -> str | None:
    """A comparable ISO-8601 UTC string for a datetime or a Hub date string."""
    if t is None:
        return None
    if isinstance(t, str):
        try:
            t = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
        except ValueError:
            return t
    if isinstance(t, (int, float)):
        t = dt.datetime.fromtimestamp(t, dt.timezone.utc)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclasses.dataclass
class SourceResult:
    source: str
    ok: bool
    listed: int = 0
    decided: int = 0
    queued: list[int] = dataclasses.field(default_factory=list)
    error: str | None = None


@dataclasses.dataclass
class PollResult:
    sources: list[SourceResult]
    seconds: float

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.sources)

    @property
    def queued(self) -> list[int]:
        return [j for s in self.sources for j in s.queued]

    @property
    def decided(self) -> int:
        return sum(s.decided for s in self.sources)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": round(self.seconds, 3), "queued": self.queued, "decided": self.decided,
                "sources": [dataclasses.asdict(s) for s in self.sources]}


class Watcher:
    def __init__(self, settings: Settings, store: StateStore, hub: Hub, *, toolchain_version: str | None = None):
        self.settings = settings
        self.store = store
        self.hub = hub
        self.toolchain_version = toolchain_version

    # ---------------------------------------------------------------- one poll
    def poll(self, now: float | None = None) -> PollResult:
        """Poll every source. The first source that cannot reach the Hub at all (:class:`HubUnreachable`) stops
        the poll: the sources not started yet are not tried, each is recorded as failed (so none is due again
        before the next poll), one warning line says so, and the outage is recorded (``hub.unreachable`` event,
        read by :func:`hub_state`) until a poll reaches the Hub again (``hub.reachable``)."""
        now = time.time() if now is None else now
        t0 = time.monotonic()
        sources = self.settings.sources
        workers = max(1, min(self.settings.hub.poll_workers, len(sources)))
        outage: list[HubUnreachable] = []  # the first connection failure of this poll
        if workers == 1:
            results = [self.poll_source(src, now, outage) for src in sources]
        else:  # sources are independent: list them concurrently (each still stops at its own mark)
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="poll") as pool:
                results = list(pool.map(lambda src: self.poll_source(src, now, outage), sources))
        res = PollResult(results, time.monotonic() - t0)
        metrics.polled(res.seconds, sum(r.listed for r in results))
        failed = [r for r in results if not r.ok]
        if outage:
            summary = self._record_outage(outage[0], now)
        else:
            summary = (f"poll of {len(results)} source(s): {res.decided} decided, {len(res.queued)} queued"
                       + (f", {len(failed)} failed: {failed[0].source}: {failed[0].error}" if failed else ""))
            if any(r.ok for r in results):
                self._record_reachable(now)
        self.store.event("poll.failed" if failed else "poll.ok", summary,
                         now=now, data=res.to_json() if len(results) <= 20 else {"decided": res.decided,
                                                                                  "queued": res.queued,
                                                                                  "failed": len(failed)})
        return res

    def _record_outage(self, err: HubUnreachable, now: float) -> str:
        """The poll's one line about an outage, and its record in the store (``since`` kept across polls)."""
        endpoint = public_endpoint(getattr(self.hub, "endpoint", "") or "")
        next_at = now + self.settings.schedule.poll_minutes * 60
        prev = hub_state(self.store)
        since = prev["since"] if not prev["reachable"] and prev.get("since") else now
        line = f"Hub unreachable: {err.reason} ({endpoint}); next poll at {clock(next_at)}"
        log.warning("%s", line)
        self.store.event("hub.unreachable", line, now=now,
                         data={"reason": err.reason, "endpoint": endpoint, "since": since, "next_poll_at": next_at})
        return line

    def _record_reachable(self, now: float) -> None:
        prev = hub_state(self.store)
        if prev["reachable"]:
            return
        line = f"Hub reachable again (unreachable since {clock(prev['since'])})" if prev.get("since") else \
            "Hub reachable again"
        log.info("%s", line)
        self.store.event("hub.reachable", line, now=now, data={"since": prev.get("since")})

    def poll_source(self, source: Source, now: float, outage: list[HubUnreachable] | None = None) -> SourceResult:
        """Poll one source. ``outage`` (shared by one poll's sources) holds the poll's first connection failure:
        once it is set the source is not tried, and a connection failure here sets it instead of logging."""
        key = source.key
        if outage:  # the Hub is down: not tried, recorded as failed (not due again before the next poll)
            result = SourceResult(key, ok=False, error=f"not polled: {outage[0].short()}")
            self.store.record_poll(key, now=now, ok=False, error=result.error)
            return result
        row = self.store.source(key)
        floor = row.mark if row and row.mark else iso(now - source.lookback_days * 86400)
        result = SourceResult(key, ok=True)
        newest: str | None = None
        batch: list[Any] = []
        try:
            listing = self.hub.list_models(author=source.author, search=source.search,
                                           filters=source.filters, pipeline_tag=source.pipeline_tag,
                                           sort="lastModified", limit=None)
            for rec in listing:
                lm = iso(getattr(rec, "last_modified", None))
                if newest is None or (lm and lm > newest):
                    newest = lm
                if lm is not None and floor is not None and lm < floor:
                    break  # descending order: everything after this was seen by an earlier poll
                result.listed += 1
                batch.append(rec)
                if len(batch) >= 200:
                    self._decide_batch(batch, source, now, result)
                    batch = []
            if batch:
                self._decide_batch(batch, source, now, result)
        except HubUnreachable as e:
            result.ok = False
            result.error = e.short()
            if outage is not None:
                outage.append(e)  # the poll's one line is written once every source has stopped
            else:
                log.warning("poll of %s failed: %s", key, result.error)
            self.store.record_poll(key, now=now, ok=False, error=result.error)
            return result
        except HubError as e:
            result.ok = False
            result.error = f"{type(e).__name__}: {e.short()}"
            log.warning("poll of %s failed: %s", key, result.error)
            self.store.record_poll(key, now=now, ok=False, error=result.error)
            return result
        self.store.record_poll(key, now=now, ok=True, mark=newest)
        log.info("polled %s: %d listed, %d decided, %d queued", key, result.listed, result.decided, len(result.queued))
        return result

    def _decide_batch(self, batch: list[Any], source: Source, now: float, result: SourceResult) -> None:
        known = self.store.decided([r.id for r in batch])
        rows, enqueues = [], []
        for rec in batch:
            prev = known.get(rec.id)
            if prev is not None and (prev.manual_skip or (prev.sha and prev.sha == rec.sha)):
                continue  # decided at this commit already (or skipped by the operator): no request
            item, enq = self.consider(rec, source, prev, now)
            rows.append(item)
            if enq is not None:
                enqueues.append({**enq, "item": item})
        n, ids = self.store.apply_decisions(rows, enqueues, now=now)
        result.decided += n
        for e, jid in zip(enqueues, ids, strict=True):
            if jid is not None:
                result.queued.append(jid)
                log.info("queued %s@%s (job %d): %s", e["repo"], e["revision"][:12], jid, e["reason"])
                self.store.event("job.size", f"{e['item']['bytes'] / 1e9:.2f} GB to fetch", now=now, job_id=jid,
                                 repo=e["repo"], data={"bytes": e["item"]["bytes"]})  # the status page's queue

    def decide_now(self, rec: ModelRecord, source: Source, now: float) -> SourceResult:
        """Decide one listed record outside a poll (a Hub webhook): the poll's rules and its never-twice check."""
        result = SourceResult(source.key, ok=True, listed=1)
        self._decide_batch([rec], source, now, result)
        return result

    # ---------------------------------------------------------------- one model
    def consider(self, rec: ModelRecord, source: Source | None, prev: Any, now: float,
                 manual: bool = False) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Decide one listed model: (decision row for the store, job to queue or None). Writes nothing."""
        base = {"repo": rec.id, "sha": rec.sha, "last_modified": iso(getattr(rec, "last_modified", None)),
                "source": source.key if source else "manual"}
        d = decide(rec, self.settings, source)
        if not d.accept:
            return {**base, "decision": d.decision, "code": d.code, "reason": d.reason}, None
        try:
            info = self.hub.model_info(rec.id, revision=rec.sha)
        except HubNotFound:
            return {**base, "decision": "skipped", "code": "not_found",
                    "reason": "the repo or revision disappeared while polling"}, None
        except HubAuthError as e:
            return {**base, "decision": "skipped", "code": "no_access", "reason": f"no access: {e.short()}"}, None
        base["sha"] = info.sha
        access = None
        if getattr(info, "gated", False) and not self.settings.filters.skip_gated:
            access = self._has_access(info)
        d = decide(info, self.settings, source, full=True, has_access=access)
        if not d.accept:
            return {**base, "decision": d.decision, "code": d.code, "reason": d.reason}, None
        fp = fingerprint(info)
        reason = "new release"
        if not manual and prev is not None and prev.queued_sha and prev.fingerprint is not None \
                and prev.queued_sha != info.sha:
            diff = compare_revisions(prev.fingerprint, fp, hub=self.hub, repo=rec.id, old_rev=prev.queued_sha,
                                     new_rev=info.sha)
            changed, note = list(diff.changed), f" ({diff.note})" if diff.note else ""
            if not changed:
                return {**base, "decision": "unchanged", "code": "no_result_change",
                        "reason": f"new revision {info.sha[:12]} changes no weights, config, tokenizer or template "
                                  f"file; last queued {prev.queued_sha[:12]}"}, None
            if not self.settings.requeue.on_revision_change:
                return {**base, "decision": "skipped", "code": "requeue_off",
                        "reason": f"changed {', '.join(changed[:5])} but requeue.on_revision_change is off{note}"}, None
            reason = f"revision change: {', '.join(changed[:5])}" + (" ..." if len(changed) > 5 else "") + note
        if manual:
            reason = "enqueued by the operator"
        item = {**base, "decision": "accepted", "code": "queued", "reason": reason, "fingerprint": fp,
                "queued_sha": info.sha,
                "bytes": sum(s.size or 0 for s in info.siblings if is_result_file(s.rfilename))}
        enq = {"repo": rec.id, "revision": info.sha, "reason": reason, "fingerprint": fp,
               "max_attempts": self.settings.limits.max_attempts, "priority": 1 if manual else 0}
        return item, enq

    def _has_access(self, info: ModelRecord) -> bool:
        if not self.settings.token:
            return False
        probe = next((n for n in sibling_names(info) if n == "config.json"), None) or \
            next((n for n in sibling_names(info) if is_result_file(n)), None)
        if probe is None:
            return False
        try:
            self.hub.read_text(info.id, probe, revision=info.sha)  # None (missing file) still proves access
            return True
        except HubAuthError:
            return False

    # ---------------------------------------------------------------- manual and housekeeping
    def enqueue_manual(self, repo: str, revision: str | None, now: float) -> tuple[Decision, int | None]:
        """``ggufbot enqueue REPO[@rev]``: the same safety rules as a poll; returns (decision, job id)."""
        info = self.hub.model_info(repo, revision=revision)
        prev = self.store.model(repo)
        item, enq = self.consider(info, None, prev if prev and prev.queued_sha else None, now, manual=True)
        _, ids = self.store.apply_decisions([item], [{**enq, "item": item}] if enq else [], now=now)
        job_id = ids[0] if ids else None
        return Decision(job_id is not None, item["code"], item["reason"]), job_id

    def requeue_for_toolchain(self, now: float) -> list[int]:
        """Re-queue published models whose quants were built with another llama.cpp version."""
        if not self.settings.requeue.on_toolchain_change or not self.toolchain_version:
            return []
        latest: dict[str, Any] = {}
        for job in self.store.jobs([J.Status.PUBLISHED]):
            if job.repo not in latest or job.id > latest[job.repo].id:
                latest[job.repo] = job
        out = []
        for job in latest.values():
            if job.toolchain_version and job.toolchain_version != self.toolchain_version:
                jid = self.store.enqueue(job.repo, job.revision, now=now, fingerprint=job.fingerprint,
                                         reason=f"toolchain changed: {job.toolchain_version} -> "
                                                f"{self.toolchain_version}",
                                         dedup_key=f"{job.repo}@{job.revision}#toolchain={self.toolchain_version}",
                                         max_attempts=self.settings.limits.max_attempts)
                if jid is not None:
                    out.append(jid)
        return out
