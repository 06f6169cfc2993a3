"""Metadata-patch jobs: an upstream fix of the chat template, the special tokens, the generation config or the
tokenizer is published in minutes, by patching the published GGUFs' metadata instead of making them again.

When the runner starts a job it decides the job's kind (:func:`choose`) and records it with its reason:

- **full** (the job as always): the first publication of a repo, the same revision again (a toolchain change),
  a changed weight file, a ``config.json`` change beyond its token ids, a file of another kind, another
  toolchain than the one that made the published files, no kept ``ladder.json`` of the earlier job;
- **patch**: every changed file is a template, tokenizer or generation-config file (or ``config.json`` with
  only ``bos/eos/pad_token_id`` changed). The same :func:`bot.jobs.job.run_job` runs the patch stages: fetch the
  new revision's config and tokenizer files and the published repo's files (:class:`PatchFetchStage`, which
  applies the acceptance rules to the revision's Hub record first), then :mod:`converters.patch.metapatch` (a full
  job's inspect on the new files, vocab-only conversion, rewrite with the tensor data unchanged, the cheap checks
  again), then the usual publish stage with one what's-new line ("chat template updated upstream (commit
  abc1234)").

When the patch is refused on the way (the token list or vocabulary size or an architecture key would change,
the published files are not the ones the earlier job made), :func:`run_for_job` records the reason, marks the
work directory (``kind.json``: a resumed job does not try the patch again) and runs the full job.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bot.hub.client import Hub
from bot.model.record import ModelRecord
from bot.model import jobstate as J
from bot.model.revisions import compare_revisions, fingerprint
from bot.state.store import Job, StateStore
from converters.patch import metapatch
from converters.core import names, records
from converters.core.records import StageRecord
from converters.core.stages import Produced, RecordedStage, Stage
from converters.formats.checkpoint import RESULT_PATTERNS
from converters.core.errors import HubError, InputError, PatchRefused
from converters.core.workdir import LADDER_FILE, REPORT_FILE, WorkDir
from converters.ladder.job import JobContext

log = logging.getLogger(__name__)

FULL = "full"
PATCH = "patch"
KIND_FILE = names.KIND  # a job that fell back to the full run says so here (a resumed job stays full)

# Files a patch can follow, and what the card calls them
TEMPLATE_FILES = {"chat_template.jinja": "chat template", "chat_template.json": "chat template"}
GENERATION_FILES = {"generation_config.json": "generation config"}
SPECIAL_FILES = {"special_tokens_map.json": "special tokens", "added_tokens.json": "special tokens"}
TOKENIZER_FILES = {"tokenizer.json": "tokenizer", "tokenizer.model": "tokenizer", "vocab.json": "tokenizer",
                   "merges.txt": "tokenizer", "tokenizer.tiktoken": "tokenizer"}
TOKENIZER_CONFIG = "tokenizer_config.json"
CONFIG = "config.json"
# config.json keys that only the tokenizer metadata carries (a change of any other key is a full job)
CONFIG_TOKEN_KEYS = frozenset({"bos_token_id", "eos_token_id", "pad_token_id", "transformers_version"})
SPECIAL_KEYS = frozenset({"bos_token", "eos_token", "eot_token", "pad_token", "unk_token", "additional_special_tokens",
                          "added_tokens_decoder", "add_bos_token", "add_eos_token"})
# what the patch fetch downloads of the new revision: everything the converter reads but the weights
META_PATTERNS = tuple(p for p in RESULT_PATTERNS if ".safetensors" not in p)


@dataclasses.dataclass(frozen=True)
class Classification:
    kind: str  # FULL | PATCH
    reason: str
    changed: tuple[str, ...] = ()
    what: tuple[str, ...] = ()  # for PATCH: "chat template", "special tokens", ...


@dataclasses.dataclass(frozen=True)
class PatchBase:
    """The publication a patch job starts from."""

    target_repo: str
    base_revision: str
    ladder_path: Path  # the earlier job's kept ladder.json
    changed: tuple[str, ...]
    what: tuple[str, ...]

    def whats_new(self, revision: str) -> str:
        return f"{_join(self.what)} updated upstream (commit {revision[:7]})"


def _join(items: Sequence[str]) -> str:
    items = list(dict.fromkeys(items)) or ["metadata"]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def json_keys_changed(old: str | None, new: str | None) -> set[str] | None:
    """Top-level keys whose values differ between two JSON texts (None: either is missing or not an object)."""
    try:
        a, b = json.loads(old or ""), json.loads(new or "")
    except ValueError:
        return None
    if not isinstance(a, dict) or not isinstance(b, dict):
        return None
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def classify(changed: Sequence[str], keys: Mapping[str, set[str] | None] | None = None) -> Classification:
    """Pure: the kind of job for a revision whose result-changing files ``changed`` differ from the published
    one's; ``keys``: for the JSON files among them, the top-level keys that changed (None: not comparable)."""
    keys = keys or {}
    changed = tuple(sorted(changed))
    if not changed:
        return Classification(FULL, "no result-changing file differs from the published revision", changed)
    weights = [n for n in changed if n.endswith(".safetensors") or n.endswith(".safetensors.index.json")]
    if weights:
        return Classification(FULL, f"weights changed ({', '.join(weights[:3])})", changed)
    what: list[str] = []
    for name in changed:
        base = name.rsplit("/", 1)[-1]
        if name != base:
            return Classification(FULL, f"{name} is not a top-level file", changed)
        if base == CONFIG:
            k = keys.get(name)
            if k is None or not k <= CONFIG_TOKEN_KEYS:
                other = ", ".join(sorted(k - CONFIG_TOKEN_KEYS)) if k is not None else "not comparable"
                return Classification(FULL, f"model config changed ({CONFIG}: {other})", changed)
            if k - {"transformers_version"}:
                what.append("special tokens")
            continue
        if base == TOKENIZER_CONFIG:
            k = keys.get(name)
            if k is None:
                what.append("tokenizer settings")
                continue
            if "chat_template" in k:
                what.append("chat template")
            if k & SPECIAL_KEYS:
                what.append("special tokens")
            if k - SPECIAL_KEYS - {"chat_template"}:
                what.append("tokenizer settings")
            continue
        if base == "generation_config.json":
            k = keys.get(name)
            what.append("end tokens" if k is not None and k & {"eos_token_id", "bos_token_id"} else "generation config")
            continue
        for table in (TEMPLATE_FILES, SPECIAL_FILES, TOKENIZER_FILES):
            if base in table:
                what.append(table[base])
                break
        else:
            return Classification(FULL, f"{name} changed, which a metadata patch does not cover", changed)
    what_t = tuple(dict.fromkeys(what)) or ("metadata",)
    return Classification(PATCH, f"only {_join(what_t)} changed ({', '.join(changed)}): metadata patch", changed,
                          what_t)


# --------------------------------------------------------------------------------------------------
# The decision for one job
# --------------------------------------------------------------------------------------------------


def _kept_ladder(job: Job) -> Path | None:
    kept = (job.result or {}).get("kept") if isinstance(job.result, dict) else None
    for k in kept or ():
        if Path(k).name == LADDER_FILE and Path(k).is_file():
            return Path(k)
    return None


def choose(job: Job, store: StateStore, hub: Hub, *, workdir: Path, toolchain_version: str | None
           ) -> tuple[Classification, PatchBase | None]:
    """The kind of ``job`` (full or patch) and, for a patch, the publication it starts from. A few small Hub
    reads (the two revisions' file lists and their changed JSON files); never raises for a Hub error (full)."""
    marker = workdir / KIND_FILE
    if marker.is_file():
        with_reason = records.read_json_object(marker)
        return Classification(FULL, str(with_reason.get("reason") or "fell back to the full job earlier")), None
    prev = max((j for j in store.jobs([J.Status.PUBLISHED], repo=job.repo) if j.id < job.id and j.target_repo),
               key=lambda j: j.id, default=None)
    if prev is None:
        return Classification(FULL, "no earlier publication of this repo"), None
    if prev.revision == job.revision:
        return Classification(FULL, f"the published revision {job.revision[:12]} again (a rebuild)"), None
    ladder_path = _kept_ladder(prev)
    if ladder_path is None:
        return Classification(FULL, f"job {prev.id}'s ladder.json is not kept on this machine"), None
    try:
        old_tc = WorkDir(ladder_path.parent).ladder().toolchain.version
    except InputError as e:
        return Classification(FULL, f"job {prev.id}'s ladder.json cannot be read: {e.short()}"), None
    if toolchain_version and old_tc != toolchain_version:
        return Classification(FULL, f"the published files were made with {old_tc}, not {toolchain_version}"), None
    try:
        new_fp = fingerprint(hub.model_info(job.repo, revision=job.revision))
        old_fp = prev.fingerprint if isinstance(prev.fingerprint, dict) and prev.fingerprint else \
            fingerprint(hub.model_info(job.repo, revision=prev.revision))
        diff = compare_revisions(old_fp, new_fp, hub=hub, repo=job.repo, old_rev=prev.revision, new_rev=job.revision)
        if diff.note:
            return Classification(FULL, diff.note, diff.changed), None
        keys = {n: json_keys_changed(hub.read_text(job.repo, n, revision=prev.revision),
                                     hub.read_text(job.repo, n, revision=job.revision))
                for n in diff.changed if n.endswith(".json") and not n.endswith(".safetensors.index.json")}
    except HubError as e:
        return Classification(FULL, f"the revisions could not be compared: {e.short()}"), None
    c = classify(diff.changed, keys)
    if c.kind != PATCH:
        return c, None
    return c, PatchBase(prev.target_repo, prev.revision, ladder_path, c.changed, c.what)


# --------------------------------------------------------------------------------------------------
# The stage that needs the Hub
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PatchFetchStage(RecordedStage[JobContext]):
    """The new revision's config and tokenizer files into ``<workdir>/source``; the published repo's files (as
    its report.json's publication block lists them, sha256-checked), its report.json and the earlier job's
    ladder.json into ``<workdir>/published``."""

    repo: str
    revision: str
    base: PatchBase
    hub: Hub
    check: Callable[[ModelRecord], None] | None = None  # the safety rules again on the exact revision
    # (FetchPolicy.check): raises UnsupportedModel
    name: str = "fetch"
    quiet: bool = True

    def _input(self, ctx: JobContext) -> metapatch.PatchInput:
        return metapatch.PatchInput(ctx.workdir / metapatch.BASE_DIR, self.revision, self.base.base_revision,
                                    self.base.changed, self.base.what)

    def run(self, ctx: JobContext) -> None:
        ctx.checkpoint_dir = ctx.workdir / names.SOURCE_DIR
        super().run(ctx)

    def inputs(self, ctx: JobContext) -> dict[str, Any]:
        return {"repo": self.repo, "revision": self.revision, "target": self.base.target_repo,
                "base_revision": self.base.base_revision, "patterns": list(META_PATTERNS)}

    def intact(self, ctx: JobContext, rec: StageRecord) -> bool:
        return _intact(ctx.workdir, rec.extra.get("files"))

    def event_data(self, rec: StageRecord) -> dict[str, Any]:
        return {"quiet": True}

    def done_text(self, ctx: JobContext, rec: StageRecord) -> str:
        return f"fetch done: {len(rec.extra['files'])} files (metadata and the published files)"

    def produce(self, ctx: JobContext) -> Produced:
        src, pub = ctx.workdir / names.SOURCE_DIR, ctx.workdir / names.PUBLISHED_DIR
        if self.check is not None:
            self.check(self.hub.model_info(self.repo, revision=self.revision))
        self.hub.download_snapshot(self.repo, self.revision, src, allow_patterns=list(META_PATTERNS))
        report_path = self.hub.download_file(self.base.target_repo, REPORT_FILE, dest_dir=pub)
        published = records.read_json_object(report_path)
        block = published.get("publication") or {}
        if (block.get("source") or {}).get("revision") != self.base.base_revision:
            raise PatchRefused(f"{self.base.target_repo} no longer holds the files made from "
                               f"{self.base.base_revision[:12]}")
        files = block.get("files") or {}
        if files:
            self.hub.download_snapshot(self.base.target_repo, None, pub, allow_patterns=sorted(files))
        for rel, meta in files.items():
            p = pub / rel
            if not p.is_file() or records.content_sha256(p, ctx.workdir) != meta.get("sha256"):
                raise PatchRefused(f"{self.base.target_repo}: {rel} is not the file the earlier job published")
        shutil.copy2(self.base.ladder_path, pub / LADDER_FILE)
        got = {str(p.relative_to(ctx.workdir)): records.content_sha256(p, ctx.workdir)
               for d in (src, pub) for p in sorted(d.rglob("*")) if p.is_file() and ".cache" not in p.parts}
        return Produced([], {"files": got})

    def use(self, ctx: JobContext, rec: StageRecord) -> None:
        ctx.put(metapatch.PATCH_INPUT, self._input(ctx))


def _intact(workdir: Path, files: Any) -> bool:
    if not isinstance(files, dict) or not files:
        return False
    return all((workdir / n).is_file() and records.content_sha256(workdir / n, workdir) == sha
               for n, sha in files.items())


def stages(repo: str, revision: str, base: PatchBase, hub: Hub, *, check: Callable[[ModelRecord], None] | None,
           require_publishable: bool, check_architecture: bool) -> tuple[Stage[JobContext], ...]:
    """fetch (metadata and the published files; the acceptance rules on the revision's Hub record) -> inspect (a
    full job's, on those files) -> vocab -> patch -> recheck; the caller (``bot.jobs.job.stages_for``) adds
    publish."""
    return (PatchFetchStage(repo, revision, base, hub, check=check),
            *metapatch.patch_stages(require_publishable=require_publishable, check_architecture=check_architecture))


__all__ = ["Classification", "PatchBase", "PatchFetchStage", "classify", "choose", "json_keys_changed", "stages",
           "FULL", "PATCH", "KIND_FILE"]
