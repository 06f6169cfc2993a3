"""Early publishing: each file uploaded as soon as it has passed the gate, the ladder published in groups, most
downloaded first (issue 20).

The ladder's pipeline announces each file's verdict (``converters.ladder.job.FILE_READY``: a
:class:`~converters.ladder.job.FileReady`) right after report.json was rewritten with it. :class:`EarlyPublisher`
takes the announcement on the caller's thread (a put on a bounded queue: the compute never waits for the network)
and its one network thread does the rest, in publish order:

- a passed file is **pre-uploaded** (:meth:`bot.hub.client.Hub.preupload`: huggingface_hub's
  ``preupload_lfs_files``, Xet when the Hub has it): invisible until a commit names it. Right before, each part's
  sha256 is checked against the announcement and against report.json (the hash rule of ``bot/publish/commit.py``:
  the bytes uploaded are the bytes measured); the client's own hash of what it read must match again, and the
  commit checks that the file was not touched since. A file that did not pass is never uploaded.
- the ladder's types are cut into **groups** along the publish order (:func:`publish_groups`: ``[publish] order``
  and ``groups``; the rest of the ladder is the last group). When a group is complete (every type has its verdict,
  every passed one is uploaded) and every group before it is committed, one commit
  (:func:`bot.publish.commit.plan_publish` with an :class:`~bot.publish.commit.Early` view, ``parent_commit`` set)
  adds its files with the card, the imatrix and report.json; card and report describe exactly the files then in
  the repo and name the ones still coming (``pending``). The commit of the last group is the full publication, the
  same plan as a single commit's. Nothing is committed while report.json says ``publishable: false``: the
  ladder-wide gate facts (BF16 against the source, the tokenizer) are known before the first file's verdict.
- the job's publish stage calls :meth:`EarlyPublisher.finish`: files of the finished ladder that were never
  announced (a job resumed after its evaluation, or a pipeline that does not announce) are announced now, the
  thread drains, and the last commit is made (none when the repo already holds the publication).

Resume: ``records/publish-early.json`` keeps the target repo, the publication the repo had before this job's first
commit (what's new compares with it) and each file's state (uploading, uploaded, published) for ``ggufbot
status``. A killed upload is started again by the resumed job; huggingface_hub asks the server which objects it has
and sends only the others. An early commit whose files the repo already has is not made again (idempotency).

Errors: the Hub client retries what it retries itself, :class:`bot.hub.client.Hub` the rest with its
``RetryPolicy``; an error left after that stops the network thread and is raised in the job, by the next
announcement or by :meth:`EarlyPublisher.finish`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.publish import commit as commit_mod
from bot.publish.commit import Early, PublishOptions, PublishResult
from converters.core import records
from converters.core.errors import CheckFailed, InputError
from converters.core.hooks import NULL_HOOKS, Hooks
from converters.core.report import PASSED, Report
from converters.core.workdir import WorkDir
from converters.ladder.job import FileReady

if TYPE_CHECKING:
    from bot.hub.client import Hub, Preuploaded

log = logging.getLogger(__name__)

RECORD = "publish-early.json"  # in the work dir's records/
DEFAULT_ORDER = ("Q4_K_M", "Q8_0", "Q6_K", "Q5_K_M")
DEFAULT_GROUPS = (1, 3)
UPLOADING, UPLOADED, PUBLISHED = "uploading", "uploaded", "published"
STAGE = "publish"  # the stage whose progress shows the uploads left (finish)
_FINISH = object()


@dataclasses.dataclass(frozen=True)
class EarlyOptions:
    """``[publish] order`` and ``groups`` (bot.model.settings.Publish); ``queue_size`` bounds the announcements
    waiting for the network thread (small records, never file contents)."""

    order: tuple[str, ...] = DEFAULT_ORDER
    groups: tuple[int, ...] = DEFAULT_GROUPS
    queue_size: int = 256


def publish_order(types: Sequence[str], order: Sequence[str]) -> list[str]:
    """The ladder's types in publish order: those ``order`` names first, in its order, then the rest in ladder
    order."""
    return [t for t in order if t in types] + [t for t in types if t not in order]


def publish_groups(types: Sequence[str], order: Sequence[str], groups: Sequence[int]) -> list[tuple[str, ...]]:
    """The commits of an early publication: ``groups[i]`` entries of ``order`` each (those in the ladder), then one
    group with the rest of the ladder in :func:`publish_order` (empty groups left out)."""
    out, at = [], 0
    for n in groups:
        group = tuple(t for t in order[at:at + n] if t in types)
        at += n
        if group:
            out.append(group)
    used = {t for g in out for t in g}
    rest = tuple(t for t in publish_order(types, order) if t not in used)
    return out + ([rest] if rest else [])


def read_state(workdir: Path | WorkDir) -> dict[str, Any]:
    """What ``records/publish-early.json`` says (empty when there is none): ``repo_id``, ``files`` (type ->
    ``{"state", "commit"}``), ``commits``, ``done``."""
    try:
        return records.read_json_object(WorkDir(workdir).records_path / RECORD)
    except (OSError, ValueError):
        return {}


def finished_files(workdir: Path | WorkDir) -> list[FileReady]:
    """The announcements of a finished ladder's files, as the pipeline makes them (verdict and measured sha256 from
    report.json); none before the ladder and its report exist."""
    wd = WorkDir(workdir)
    if not (wd.has_ladder() and wd.has_report()):
        return []
    ladder, report = wd.ladder(), wd.report()
    results = {r.type: r for r in report.files}
    measured = _measured(report)
    out = []
    for f in ladder.files:
        r = results.get(f.type)
        if r is None:
            continue
        parts = tuple(f.all_parts)
        out.append(FileReady(f.type, parts, tuple(measured.get(p, "") for p in parts), r.status == PASSED))
    return out


def _measured(report: Report) -> dict[str, str]:
    """Path -> sha256 of every file the evaluation measured (``file_hashes``, and each result's parts)."""
    out = {p: str(v.get("sha256")) for p, v in report.file_hashes.items()}
    for f in report.files:
        out.update({str(pt.get("path")): str(pt.get("sha256")) for pt in f.parts if pt.get("path") not in out})
    return out


class EarlyPublisher:
    """One job's early publication (see the module doc). ``types()``: the ladder's types in ladder order (the plan's,
    read when the first file is announced); ``now()``: the clock of the card's date."""

    def __init__(self, workdir: Path | WorkDir, hub: Hub, options: PublishOptions, early: EarlyOptions = EarlyOptions(),
                 *, types: Callable[[], Sequence[str]] | None = None, hooks: Hooks = NULL_HOOKS,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.timezone.utc)) -> None:
        self.wd, self.hub, self.options, self.early, self.hooks = WorkDir(workdir), hub, options, early, hooks
        self._types, self._now = types, now
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=early.queue_size)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._ready: dict[str, FileReady] = {}  # network thread only
        self._items: dict[str, FileReady] = {}  # the announcements (under _lock)
        self._handles: dict[str, Preuploaded] = {}
        self._groups: list[tuple[str, ...]] | None = None
        self._committed = 0  # groups committed so far
        self._blocked: str | None = None  # why nothing may be uploaded (report.json not publishable)
        self._created = False  # this run created the target repo
        self._landed = False  # a commit of this run landed
        state = read_state(self.wd)
        self._state: dict[str, Any] = {} if state.get("done") else state

    # ------------------------------------------------------------------ the caller's side
    def ready(self, item: FileReady) -> None:
        """The ``FILE_READY`` callback: queue ``item`` for the network thread; raises the thread's error, if any."""
        self._raise()
        if self._groups is None:
            self._groups = publish_groups(self._ladder_types(), self.early.order, self.early.groups)
        with self._lock:
            self._items[item.type] = item
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ggufbot-publish", daemon=True)
                self._thread.start()
        self._queue.put(item)

    def finish(self) -> PublishResult:
        """Announce the finished ladder's files not announced yet, wait for the uploads and the early commits, then
        make the last commit (none when the repo holds the publication already)."""
        for item in finished_files(self.wd):
            if item.type not in self._announced():
                self.ready(item)
        if self._thread is not None:
            self._queue.put(_FINISH)
            while self._thread.is_alive():  # the uploads left: signs of life for the stuck-job detection, a stop
                self._thread.join(timeout=1.0)
                states = file_states(self.wd)
                done = sum(v in (UPLOADED, PUBLISHED) for v in states.values())
                self.hooks.step(STAGE, done, max(done, sum(r.passed for r in self._announced_items())),
                                "uploading", **{"files": dict(states)})
        self._raise()
        result = self._commit(final=True)
        assert result is not None
        if result.action == "update" and not self._state.get("base"):
            result = dataclasses.replace(result, action="create")  # the repo was new, made empty for the uploads
        self._save(done=True)
        return result

    def abort(self) -> None:
        """The job failed or was stopped: the network thread stops after its current request; a repo this run
        created in which nothing landed is removed (no empty repo left behind)."""
        self._stop.set()
        if self._thread is not None:
            self._queue.put(_FINISH)
            self._thread.join(timeout=5.0)
        if self._created and not self._landed and self._thread is not None and not self._thread.is_alive():
            commit_mod.remove_new_repo(self.hub, self._state["repo_id"])

    def _raise(self) -> None:
        if self._error is not None:
            err = self._error
            raise err

    def _announced(self) -> set[str]:
        with self._lock:
            return set(self._items)

    def _announced_items(self) -> list[FileReady]:
        with self._lock:
            return list(self._items.values())

    def _ladder_types(self) -> list[str]:
        types: list[str] = []
        if self._types is not None:
            try:
                types = list(self._types())
            except RuntimeError:  # no plan (a stage list without inspect): the ladder.json's types
                types = []
        if self.wd.has_ladder():
            types += [t for t in self.wd.ladder().types if t not in types]
        return types

    # ------------------------------------------------------------------ the network thread
    def _run(self) -> None:
        try:
            finishing = False
            while not finishing or self._work_left():
                finishing = self._take(block=not self._work_left()) or finishing
                if self._stop.is_set():
                    return
                self._step()
        except BaseException as e:  # noqa: BLE001 - handed to the job's thread (ready / finish)
            log.error("publish: early publication stopped: %s", e)
            self._error = e

    def _take(self, *, block: bool) -> bool:
        """Move queued announcements into ``_ready``; True when the finish marker came."""
        finishing = False
        while True:
            try:
                item = self._queue.get(block=block)
            except queue.Empty:
                return finishing
            block = False
            if item is _FINISH:
                finishing = True
                continue
            self._ready[item.type] = item

    def _work_left(self) -> bool:
        return self._blocked is None and (self._next_upload() is not None or self._group_ready())

    def _step(self) -> None:
        if self._blocked is not None:
            return
        if self._group_ready():
            self._commit(final=False)
            return
        item = self._next_upload()
        if item is not None:
            self._upload(item)

    def _order_index(self, t: str) -> int:
        seq = [x for g in self._groups or () for x in g]
        return seq.index(t) if t in seq else len(seq)

    def _next_upload(self) -> FileReady | None:
        todo = [r for r in self._ready.values() if r.passed and not all(p in self._handles for p in r.paths)]
        return min(todo, key=lambda r: self._order_index(r.type)) if todo else None

    def _group_ready(self) -> bool:
        groups = self._groups or []
        # the last group goes with the final commit (finish): the report and the chart are final only then, so the
        # last group makes one commit, not an early one followed by a final one
        if self._committed >= len(groups) - 1:
            return False
        for t in groups[self._committed]:
            r = self._ready.get(t)
            if r is None or (r.passed and not all(p in self._handles for p in r.paths)):
                return False
        return True

    def _upload(self, item: FileReady) -> None:
        """Pre-upload one passed file, after checking it is the one measured."""
        report = self.wd.report()
        if not report.publishable:
            self._blocked = "; ".join(map(str, report.reasons)) or "report.json says not publishable"
            log.warning("publish: nothing uploaded: %s", self._blocked)
            return
        result = next((f for f in report.files if f.type == item.type), None)
        if result is None or result.status != PASSED:
            raise CheckFailed("publish", f"{item.type} was announced as passed, but report.json does not say so")
        measured = _measured(report)
        files: dict[str, Path] = {}
        for part, sha in zip(item.paths, item.sha256, strict=True):
            path = self.wd.file(part)
            now = records.content_sha256(path, self.wd.path)
            if not (now == sha == measured.get(part)):
                raise CheckFailed("publish", f"refusing to upload {part}: its sha256 is not the one the evaluation "
                                  "measured; run `ggufbot evaluate DIR` to measure it again")
            files[part] = path
        repo_id = self._repo()
        self._file_state(item.type, UPLOADING)
        log.info("publish %s: uploading %s (%d bytes)", repo_id, item.type, sum(p.stat().st_size for p in files.values()))
        self._handles.update(self.hub.preupload(repo_id, files, {p: s for p, s in zip(item.paths, item.sha256)}))
        self._file_state(item.type, UPLOADED)

    def _repo(self) -> str:
        """The target repo (created empty when needed); the publication it held before this job is kept in the
        record for the what's-new of every commit."""
        if self._state.get("repo_id"):
            return str(self._state["repo_id"])
        remote, created = commit_mod.prepare_repo(self.wd, self.hub, self.options)
        self._created = created
        self._state = {"repo_id": remote.repo_id, "base": remote.publication, "files": {}, "commits": []}
        self._save()
        return remote.repo_id

    def _commit(self, *, final: bool) -> PublishResult | None:
        """One commit: the next group's (``final``: the whole ladder)."""
        groups = self._groups or []
        upto = len(groups) if final else self._committed + 1
        types = frozenset(t for g in groups[:upto] for t in g if (r := self._ready.get(t)) is not None and r.passed)
        failed = {t for t, r in self._ready.items() if not r.passed}
        expected = list(dict.fromkeys([*(t for g in groups for t in g), *self._ready]))
        coming = () if final else tuple(t for t in expected if t not in types and t not in failed)
        early = Early(types=None if not coming else types, coming=coming, base=self._state.get("base"))
        if not final and not types:
            self._committed = upto  # nothing passed in this group: the next commit carries on
            return None
        if self._state.get("repo_id") is None and not final:
            self._repo()
        with commit_mod.staging_dir() as staging:
            try:
                plan = commit_mod.plan_publish(self.wd, self.hub, self.options, staging=staging, now=self._now(),
                                               early=early)
            except InputError as e:
                if final:
                    raise
                log.info("publish: early commit deferred to the end: %s", e)  # ladder.json not written yet
                self._committed = upto
                return None
            res = commit_mod.execute(plan, self.hub, preuploaded=self._handles)
        self._committed = upto
        self._landed = self._landed or res.commit is not None
        log.info("publish %s: %s%s", res.repo_id, f"commit {(res.commit or '')[:12]}" if res.commit else "no commit",
                 f" ({', '.join(sorted(types))}; coming: {', '.join(coming)})" if coming else "")
        published = [t for t, r in self._ready.items() if r.passed and (t in types or not coming)]
        with self._lock:
            self._state.setdefault("repo_id", res.repo_id)
            files = self._state.setdefault("files", {})
            for t in published:
                files[t] = {"state": PUBLISHED, "commit": res.commit or files.get(t, {}).get("commit")}
            if res.commit:
                self._state.setdefault("commits", []).append({"commit": res.commit, "types": sorted(types),
                                                              "coming": list(coming)})
        self._save()
        return res

    # ------------------------------------------------------------------ the record
    def _file_state(self, qtype: str, state: str) -> None:
        with self._lock:
            self._state.setdefault("files", {})[qtype] = {"state": state}
        self._save()

    def _save(self, *, done: bool = False) -> None:
        with self._lock:
            if done:
                self._state["done"] = True
            data = dict(self._state)
        if data:
            records.write_json_atomic(self.wd.records_path / RECORD, data)


def file_states(workdir: Path | WorkDir) -> Mapping[str, str]:
    """Type -> uploading / uploaded / published, from the record (for ``ggufbot status`` and the web page)."""
    files = read_state(workdir).get("files") or {}
    return {str(t): str(v.get("state")) for t, v in files.items() if isinstance(v, dict)}


__all__ = ["EarlyOptions", "EarlyPublisher", "file_states", "finished_files", "publish_groups",
           "publish_order", "read_state"]
