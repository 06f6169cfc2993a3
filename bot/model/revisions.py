"""Revisions of a Hub repo: the fingerprint of its result-changing files and what changed between two of them.

The watcher uses them to decide whether a new revision is a new job, the metadata-patch decision
(``bot.jobs.patch.choose``) to classify what changed; both sit above this module.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

from converters.core.errors import HubNotFound
from converters.formats.checkpoint import is_result_file

log = logging.getLogger(__name__)


class Sibling(Protocol):
    rfilename: str
    size: int | None


class RevisionRecord(Protocol):
    """What a fingerprint reads of a model record (``bot.hub.client.ModelRecord``)."""

    siblings: Sequence[Sibling]


class TextReader(Protocol):
    """The one Hub read the comparison needs (``bot.hub.client.Hub.read_text``)."""

    def read_text(self, repo_id: str, filename: str, revision: str | None = None) -> str | None: ...


# --------------------------------------------------------------------------------------------------
# Fingerprints of the result-changing files
# --------------------------------------------------------------------------------------------------


def fingerprint(rec: RevisionRecord) -> dict[str, str]:
    """path -> content identity of every result-changing file of ``rec`` (a full record with file metadata).

    LFS files (weights, large tokenizers) carry their sha256 in the record; small git files only their size, so
    their content is compared by :func:`changed_files` when, and only when, a new revision shows up. No request.
    """
    out: dict[str, str] = {}
    for s in getattr(rec, "siblings", None) or ():
        if not is_result_file(s.rfilename):
            continue
        h = getattr(s, "lfs_sha256", None)
        out[s.rfilename] = f"sha256:{h}" if h else f"size:{s.size}"
    return out


@dataclasses.dataclass(frozen=True)
class RevisionDiff:
    """The result-changing files that differ between two revisions, and, when the earlier revision could not be
    read any more (history squashed or force-pushed), a note saying so: its small files then count as changed."""

    changed: tuple[str, ...]
    note: str | None = None


def compare_revisions(old_fp: Mapping[str, str] | None, new_fp: Mapping[str, str], *, hub: TextReader | None = None,
                      repo: str = "", old_rev: str | None = None, new_rev: str | None = None) -> RevisionDiff:
    """Files known only by their size (small git files) with the same size in both fingerprints are read at both
    revisions and compared (a few small downloads). A revision that is gone counts its unread files as changed."""
    old = dict(old_fp or {})
    out: list[str] = []
    note = None
    for k in sorted(set(old) | set(new_fp)):
        a, b = old.get(k), new_fp.get(k)
        if a != b:
            out.append(k)
        elif a is not None and a.startswith("size:") and hub is not None and old_rev and new_rev and old_rev != new_rev:
            if note is not None:
                out.append(k)
                continue
            try:
                if hub.read_text(repo, k, revision=old_rev) != hub.read_text(repo, k, revision=new_rev):
                    out.append(k)
            except HubNotFound as e:
                note = (f"earlier revision {old_rev[:12]} can no longer be read (history squashed or force-pushed: "
                        f"{e.short()}); its files that cannot be compared count as changed")
                log.warning("%s: %s", repo, note)
                out.append(k)
    return RevisionDiff(tuple(out), note)


def changed_files(old_fp: Mapping[str, str] | None, new_fp: Mapping[str, str], *, hub: TextReader | None = None,
                  repo: str = "", old_rev: str | None = None, new_rev: str | None = None) -> list[str]:
    """Result-changing files that differ between two revisions (:func:`compare_revisions` without its note)."""
    return list(compare_revisions(old_fp, new_fp, hub=hub, repo=repo, old_rev=old_rev, new_rev=new_rev).changed)


def diff_fingerprints(old: Mapping[str, str] | None, new: Mapping[str, str]) -> list[str]:
    """Files whose recorded identity differs (no content comparison)."""
    return changed_files(old, new)
