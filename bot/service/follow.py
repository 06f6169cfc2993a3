"""Following llama.cpp's releases (``[toolchain] follow = "releases"``): a new ``bNNNN`` tag is built in the
background, checked by a canary, and becomes the build in use when the canary passes.

:class:`Follower.tick` is called from the scheduler's housekeeping with ``now``; at most every ``follow_hours`` it
starts one background thread (never more than one; the tick itself returns at once) which runs :meth:`Follower.step`:

1. list the repository's tags (``git ls-remote``); the newest ``bNNNN`` is recorded as the newest tag seen;
2. if it is newer than the build in use (any release is newer than the pinned build, which has no tag) and was not
   already refused, install it (converters/llama/builds.py: cached; programs reused when the native digest matches,
   else compiled under ``nice``/``ionice``; the thread itself runs at the lowest CPU priority, and so does every
   program it starts);
3. the canary (bot/service/canary.py) with the new build and with the build in use (figures cached);
4. a passing canary switches: ``active.json`` names the new build, the bot's runners take it for their next job
   (a running job finishes on the build it started with), and the jobs refused because the converter did not know
   their architecture (or their vision tower) and that the new converter knows are queued again with the reason
   "llama.cpp bNNNN supports it". A failing canary keeps the build in use and records why.

What the status command and the web page show comes from :func:`read_state` (``toolchain-follow.json`` in the data
directory): the build in use, the newest tag seen, the last canary and its verdict.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot.model import jobstate as J
from bot.model.settings import Settings
from bot.hub.client import Hub
from bot.service.canary import Canary, compare
from bot.state.base import StateStore
from converters.core.errors import GgufbotError, ToolchainError
from converters.formats import checkpoint as ckpt_mod
from converters.llama import builds, sources
from converters.llama import toolchain as tc

log = logging.getLogger(__name__)

STATE_FILE = "toolchain-follow.json"
ARCH_REFUSAL = re.compile(r"^architecture (\S+) is not supported by the (?:\w+ )?llama\.cpp converter")
VISION_REFUSAL = re.compile(r"^vision-language model (\S+): the (?:\w+ )?llama\.cpp converter cannot convert its "
                            r"vision tower")


def state_path(settings: Settings) -> Path:
    return settings.data_dir / STATE_FILE


def read_state(settings: Settings) -> dict[str, Any]:
    """What the follower last recorded (empty when it never ran), plus the build in use now."""
    try:
        st = json.loads(state_path(settings).read_text())
    except (OSError, ValueError):
        st = {}
    try:
        b = builds.in_use()
    except GgufbotError:
        b = None
    st["in_use"] = {"name": b.name, "version": b.version, "tag": b.tag, "commit": b.commit} if b else None
    st["following"] = settings.toolchain.following
    return st


def _write_state(settings: Settings, st: dict[str, Any]) -> None:
    p = state_path(settings)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps({k: v for k, v in st.items() if k not in ("in_use", "following")}, indent=2))
    os.replace(tmp, p)


def lower_this_thread() -> None:
    """The lowest CPU priority for the calling thread and every program it starts (Linux: a thread's nice value is
    its own, and children inherit it)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class Follower:
    def __init__(self, settings: Settings, store: StateStore, hub: Hub, *,
                 switch: Callable[[tc.Toolchain], None] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.store = store
        self.hub = hub
        self.switch = switch  # called with the new Toolchain after a passing canary (the bot's runners take it)
        self.clock = clock
        self.canary = Canary(settings, hub, settings.data_dir / "canary")
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- the scheduler's side
    def tick(self, now: float) -> dict[str, Any] | None:
        """Start a background check when one is due; never waits for a build or a canary."""
        if not self.settings.toolchain.following:
            return None
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return {"running": True}
            st = read_state(self.settings)
            if now - float(st.get("checked_at") or 0) < self.settings.toolchain.follow_hours * 3600:
                return None
            self._thread = threading.Thread(target=self._background, args=(now,), name="ggufbot-follow",
                                            daemon=True)
            self._thread.start()
        return {"started": True}

    def join(self, timeout: float | None = None) -> None:
        t = self._thread
        if t is not None:
            t.join(timeout)

    def _background(self, now: float) -> None:
        lower_this_thread()
        try:
            self.step(now)
        except Exception as e:  # noqa: BLE001 - recorded, the next check tries again
            log.exception("following llama.cpp releases failed")
            st = read_state(self.settings)
            st.update(checked_at=now, error=f"{type(e).__name__}: {e}")
            _write_state(self.settings, st)

    # ---------------------------------------------------------------- one check
    def step(self, now: float) -> dict[str, Any]:
        """List the tags, build and canary the newest release when it is newer than the build in use, switch when
        the canary passes. Returns (and records) what happened."""
        t = self.settings.toolchain
        assert t.url is not None
        st = read_state(self.settings)
        st.pop("error", None)
        tags = sources.remote_tags(t.url)
        newest = sources.newest_release(tags)
        st.update(checked_at=now, newest_tag=newest)
        current = builds.in_use()
        cur_n = sources.release_number(current.tag) if current else None
        refused = st.get("refused") or {}
        if newest is None or (cur_n is not None and (sources.release_number(newest) or 0) <= cur_n):
            st["action"] = "up to date"
        elif refused.get(newest) == tags.get(newest):
            st["action"] = f"{newest} was refused by its canary; waiting for a newer release"
        else:
            st.update(self._try(newest, current, now))
            if not st["canary"]["passed"]:
                refused[newest] = tags.get(newest)
                st["refused"] = refused
        _write_state(self.settings, st)
        return read_state(self.settings)

    def _try(self, tag: str, current: builds.Build | None, now: float) -> dict[str, Any]:
        t = self.settings.toolchain
        if current is None:
            raise ToolchainError("no build in use to compare a new release with (LLAMA_CPP_DIR is set?)")
        log.info("llama.cpp %s: building it in the background", tag)
        self._event("toolchain.build", f"building llama.cpp {tag}", now, {"tag": tag})
        new = builds.install(t.release_source(tag), low_priority=True)
        revision = self.hub.model_info(t.canary_repo).sha
        new_figs = self.canary.measure(new, new.toolchain(), revision, cached=False)
        cur_figs = self.canary.measure(current, current.toolchain(), revision, cached=True)
        verdict = compare(new_figs, cur_figs, t.canary_tolerance)
        canary = {"tag": tag, "build": new.name, "against": current.name, "passed": verdict.passed,
                  "reasons": list(verdict.reasons), "at": now, "model": t.canary_repo, "revision": revision,
                  "new": new_figs.to_json(), "current": cur_figs.to_json()}
        if not verdict.passed:
            log.warning("llama.cpp %s: canary failed, keeping %s: %s", tag, current.name, verdict.summary())
            self._event("toolchain.canary", f"llama.cpp {tag}: canary {verdict.summary()}; keeping {current.version}",
                        now, {"tag": tag, "passed": False, "reasons": list(verdict.reasons)})
            return {"canary": canary, "action": f"kept {current.name}: the canary of {tag} failed"}
        builds.use(new)
        requeued = self.requeue_refused(new, tag, now)
        if self.switch is not None:
            self.switch(new.toolchain())
        self._event("toolchain.switch", f"llama.cpp {tag} is in use ({new.version}); canary passed; "
                    f"{len(requeued)} refused job(s) queued again", now,
                    {"tag": tag, "build": new.name, "requeued": requeued})
        return {"canary": canary, "action": f"switched to {new.name}", "switched_at": now, "requeued": requeued}

    def requeue_refused(self, build: builds.Build, tag: str, now: float) -> list[int]:
        """Queue again the latest job of each repo that failed because the converter did not know its architecture
        (or its vision tower), when this build's converter knows it."""
        root = build.path / "src"
        archs = ckpt_mod.supported_architectures(root) or frozenset()
        projectors = ckpt_mod.supported_projectors(root) or frozenset()
        latest: dict[str, Any] = {}
        for job in self.store.jobs():
            if job.repo not in latest or job.id > latest[job.repo].id:
                latest[job.repo] = job
        out = []
        for job in latest.values():
            if job.status != J.Status.FAILED or job.error_type != "UnsupportedModel":
                continue
            msg = job.error_message or ""
            m = ARCH_REFUSAL.match(msg)
            v = VISION_REFUSAL.match(msg)
            ok = (m is not None and m.group(1) in archs) or (v is not None and v.group(1) in projectors)
            if not ok:
                continue
            jid = self.store.enqueue(job.repo, job.revision, now=now, reason=f"llama.cpp {tag} supports it",
                                     dedup_key=f"{job.repo}@{job.revision}#llama.cpp={tag}",
                                     fingerprint=job.fingerprint, max_attempts=self.settings.limits.max_attempts)
            if jid is not None:
                out.append(jid)
        return out

    def _event(self, kind: str, message: str, now: float, data: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            self.store.event(kind, message, now=now, data=data)


def switch_bot(bot: Any, toolchain: Any) -> None:
    """The bot takes a new build: each runner uses it for its next job (a running job keeps the one it started with,
    held by its own context), and the watcher's requeue rule compares with its version."""
    bot.toolchain = toolchain
    bot.toolchain_version = toolchain.version
    bot.watcher.toolchain_version = toolchain.version
    for runner in bot.runners:
        runner.toolchain = toolchain


def toolchain_view(settings: Settings) -> dict[str, Any]:
    """What ``status`` and the web page show of the engine: the build in use, the newest tag seen, the last canary."""
    st = read_state(settings)
    canary = st.get("canary")
    return {"in_use": st.get("in_use"), "following": st.get("following"), "newest_tag": st.get("newest_tag"),
            "checked_at": st.get("checked_at"), "action": st.get("action"), "error": st.get("error"),
            "canary": {k: canary.get(k) for k in ("tag", "build", "against", "passed", "reasons", "at")}
            if canary else None,
            "line": toolchain_line(st)}


def toolchain_line(st: dict[str, Any]) -> str:
    """One line: ``llama.cpp b2 (1a2b3c4) in use; following releases, newest tag b3; canary of b3 failed: ...``."""
    b = st.get("in_use")
    out = f"{b['version']} in use" if b else "llama.cpp: no build in use (LLAMA_CPP_DIR, or not installed)"
    if st.get("following"):
        out += f"; following releases, newest tag {st.get('newest_tag') or 'not seen yet'}"
    c = st.get("canary")
    if c:
        verdict = "passed" if c.get("passed") else "failed: " + "; ".join(c.get("reasons") or [])
        out += f"; canary of {c.get('tag')} {verdict}"
    if st.get("error"):
        out += f"; last check failed: {st['error']}"
    return out
