"""Whose repo is it? The target of a publication is read before any write, and another model's repo is never
touched.

A repo is this model's when
- it does not exist yet, or this work directory created it and nothing landed in it (a run killed between
  creating the repo and its commit: ``records/publish-created.json``), or
- it carries the ggufbot marker (the ``ggufbot`` tag in its card metadata; repos published before the marker
  existed: a ``publication`` block in their ``report.json``) or is adopted by the settings (``target.adopt``),
- and the source it was made from is ours: the card's ``base_model`` (else the published ``report.json``'s
  ``source.repo``, else its model name for a local checkpoint) and the kind (plain quants or a variant, the
  card's ``base_model_relation``) are the same. Adoption waives the marker, never the source.

Otherwise :func:`choose_target` publishes to the disambiguated name it is given (``{org}/{author}_{model}-GGUF``)
or, by policy or when that one is not ours either, fails with the reason. Reads go through the ``Hub`` boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from converters.core import records
from converters.core.errors import CheckFailed, ConfigError, HubNotFound
from converters.core.workdir import REPORT_FILE, WorkDir

if TYPE_CHECKING:
    from bot.hub.client import Hub

log = logging.getLogger(__name__)

MARKER_TAG = "ggufbot"
ON_COLLISION = ("rename", "fail")
CREATED_FILE = "publish-created.json"  # in the work dir's records/: repos this work dir created


@dataclasses.dataclass(frozen=True)
class TargetPolicy:
    """What to do when the target repo is not this model's: ``rename`` publishes to the disambiguated name,
    ``fail`` stops with the reason. ``adopt``: repos without the ggufbot marker that may be written to all the
    same (their source must still match)."""

    on_collision: str = "rename"
    adopt: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.on_collision not in ON_COLLISION:
            raise ConfigError(f"on_collision must be one of {', '.join(ON_COLLISION)}, not {self.on_collision!r}",
                              key="target.on_collision")

    def adopts(self, repo_id: str) -> bool:
        return repo_id.lower() in {a.lower() for a in self.adopt}


@dataclasses.dataclass(frozen=True)
class Identity:
    """What is being published: the source repo (None for a local checkpoint), the model name, the kind."""

    source_repo: str | None
    model_name: str
    relation: str = "quantized"  # the card's base_model_relation: "quantized", a variant "finetune"


@dataclasses.dataclass(frozen=True)
class RemoteRepo:
    """What the target repo holds now (read before any write)."""

    repo_id: str
    exists: bool
    head: str | None = None
    files: tuple[str, ...] = ()
    lfs: dict[str, str | None] = dataclasses.field(default_factory=dict)
    card_data: dict[str, Any] = dataclasses.field(default_factory=dict)
    report: dict[str, Any] | None = None  # the published report.json

    @property
    def publication(self) -> dict[str, Any] | None:
        pub = (self.report or {}).get("publication")
        return pub if isinstance(pub, dict) else None

    @property
    def empty(self) -> bool:
        return not [f for f in self.files if f != ".gitattributes"]

    @property
    def marked(self) -> bool:
        tags = self.card_data.get("tags")
        tags = [tags] if isinstance(tags, str) else tags if isinstance(tags, list) else []
        return MARKER_TAG in tags or self.publication is not None

    def source(self) -> str | None:
        """The source repo it was made from: the card's ``base_model``, else the report's ``source.repo``."""
        base = self.card_data.get("base_model")
        if isinstance(base, list):
            base = base[0] if len(base) == 1 else ",".join(sorted(map(str, base)))
        if base:
            return str(base)
        src = (self.report or {}).get("source")
        return str(src["repo"]) if isinstance(src, dict) and src.get("repo") else None


def read_remote(hub: Hub, repo_id: str) -> RemoteRepo:
    try:
        info = hub.model_info(repo_id)
    except HubNotFound:
        return RemoteRepo(repo_id, False)
    files = tuple(s.rfilename for s in info.siblings)
    report = None
    if REPORT_FILE in files:
        text = hub.read_text(repo_id, REPORT_FILE, revision=info.sha)
        with contextlib.suppress(ValueError, TypeError):
            data = json.loads(text or "")
            report = data if isinstance(data, dict) else None
    return RemoteRepo(repo_id, True, info.sha, files, {s.rfilename: s.lfs_sha256 for s in info.siblings},
                      dict(info.card_data or {}), report)


def foreign_reason(remote: RemoteRepo, ours: Identity, *, adopted: bool, created_here: bool) -> str | None:
    """Why ``remote`` is not this model's repo (None: it is, or it does not exist)."""
    if not remote.exists or (remote.empty and created_here):
        return None
    if not remote.marked and not adopted:
        return ("it was not made by ggufbot (no 'ggufbot' tag in its card metadata) and target.adopt does not "
                "list it")
    theirs = remote.source()
    if theirs is None and remote.report is None and adopted:
        return None  # an adopted repo that says nothing about its source
    if theirs is None:
        name = (remote.report or {}).get("model_name")
        if ours.source_repo is None and name == ours.model_name:
            theirs_desc = None
        else:
            theirs_desc = f"a local checkpoint named {name!r}" if name else "an unknown source"
    else:
        theirs_desc = None if ours.source_repo and theirs.lower() == ours.source_repo.lower() else theirs
    if theirs_desc is not None:
        return f"it holds GGUFs of {theirs_desc}, not of {ours.source_repo or 'this local checkpoint'}"
    relation = remote.card_data.get("base_model_relation")
    if relation and relation != ours.relation:
        kind = {"quantized": "plain quantizations", "finetune": "a pruned variant"}
        return (f"it holds {kind.get(str(relation), str(relation))} of that source, this is "
                f"{kind.get(ours.relation, ours.relation)}")
    return None


def created_repos(workdir: Path) -> list[str]:
    try:
        data = records.read_json_object(WorkDir(workdir).records_path / CREATED_FILE)
    except (OSError, ValueError):
        return []
    return [str(r) for r in data.get("repos") or []]


def note_created(workdir: Path, repo_id: str) -> None:
    """Record, once the Hub has created it for this run, that this work dir created ``repo_id``: a run killed before
    its commit lands finds the empty repo its own on the next start. Never before the create succeeded: a create
    refused (409) because another party made the repo first would make their empty repo count as ours."""
    repos = created_repos(workdir)
    if repo_id not in repos:
        records.write_json_atomic(WorkDir(workdir).records_path / CREATED_FILE, {"repos": [*repos, repo_id]})


def choose_target(hub: Hub, names: tuple[str, str | None], ours: Identity, policy: TargetPolicy,
                  workdir: Path) -> RemoteRepo:
    """The repo to publish to: ``names[0]`` when it is this model's; else ``names[1]`` (the disambiguated name,
    None when renaming is not possible or not allowed) when that one is; else CheckFailed with the reasons."""
    first, alt = names
    mine = {r.lower() for r in created_repos(workdir)}
    rename = policy.on_collision == "rename" and alt is not None and alt != first
    reasons: list[str] = []
    for rid in [first, alt] if rename else [first]:
        assert rid is not None
        remote = read_remote(hub, rid)
        why = foreign_reason(remote, ours, adopted=policy.adopts(rid), created_here=rid.lower() in mine)
        if why is None:
            if reasons:
                log.warning("publish: not touching %s; publishing to %s", reasons[0], rid)
            return remote
        reasons.append(f"{rid}: {why}")
        log.info("publish: not touching %s: %s", rid, why)
    hint = (f' (target.on_collision = "rename" would publish to {alt})'
            if policy.on_collision == "fail" and alt and alt != first else "")
    raise CheckFailed("publish", f"not publishing {ours.source_repo or ours.model_name}: another model's repo is "
                      f"never written to; {'; '.join(reasons)}{hint}")
