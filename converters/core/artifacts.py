"""One catalogue of a work directory's output kinds: what each is called, which gate it must pass to be published,
whether it is published, and whether a copy is kept after the runner's cleanup.

Publishing collects its files from :func:`published_files` (``bot.publish.commit.collect_files``), removes from
the repo only what :func:`stale_in_repo` says a publication owns, the card lists the projectors
:func:`published_projectors` returns, and the runner's cleanup keeps :func:`kept_files`. Adding an output kind is
one :data:`CATALOGUE` entry (its names from :mod:`converters.core.names`) plus the stage that writes it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Sequence
from pathlib import Path

from converters.core import names
from converters.core.report import PASSED, Check, FileResult, Report
from converters.core.workdir import Ladder, LadderFile, ProjectorFile

PROJECTOR_CHECK = "projector"  # the report.json check a vision-language model's projector files must pass

JOB = "job"  # kept from the main job's work dir
VARIANT = "variant"  # kept from each variant's work dir (variants/<recipe>/)


@dataclasses.dataclass(frozen=True)
class OutputKind:
    name: str  # also the artifact kind the runner records for a kept copy
    pattern: tuple[str, ...]  # glob(s) of its names in a work dir (built by converters.core.names)
    gate: str  # what must pass before it is published
    files: Callable[[Ladder, Report], Sequence[str]] | None = None  # published: the ones that pass the gate
    required: bool = True  # a published file must exist (False: published when present)
    owned_in_repo: tuple[str, ...] = ()  # names a publication removes from the repo when it no longer has them
    kept: frozenset[str] = frozenset()  # JOB and/or VARIANT: a copy survives the cleanup
    local: Callable[[Ladder | None], Sequence[str]] | None = None  # kept: its files in a work dir

    @property
    def published(self) -> bool:
        return self.files is not None


def _named(name: str) -> Callable[[Ladder | None], Sequence[str]]:
    return lambda ladder: [name]


def passed_quants(ladder: Ladder, report: Report) -> list[tuple[LadderFile, FileResult]]:
    """Ladder files that passed the gate in the report, with their results (unreported = not published)."""
    by_type = {r.type: r for r in report.files}
    return [(f, by_type[f.type]) for f in ladder.files if f.type in by_type and by_type[f.type].status == PASSED]


def passed_projector_files(check: Check | None) -> set[str] | None:
    """The projector files (names) that passed a ``projector`` check; None when the check lists no files."""
    if check is None or not isinstance(check.data.get("files"), list):
        return None
    return {str(r.get("path")) for r in check.data["files"] if isinstance(r, dict) and r.get("status") == "passed"}


def published_projectors(ladder: Ladder, report: Report) -> list[ProjectorFile]:
    """A vision-language model's projector files, published when the report's ``projector`` check passed (the F16
    one loaded in llama-mtmd-cli and gave finite image embeddings), each file only when it passed; none for a
    text-only model."""
    check = report.checks.get(PROJECTOR_CHECK)
    if not ladder.projectors or check is None or check.status != PASSED:
        return []
    passed = passed_projector_files(check)  # a Q8_0 projector that failed while the F16 one passed is withheld
    return [p for p in ladder.projectors if passed is None or Path(p.path).name in passed]


def _chart(ladder: Ladder, report: Report) -> list[str]:
    chart = report.chart  # only a chart the evaluation drew (and hashed); not one left by an earlier run
    return [chart] if isinstance(chart, str) and chart else []


CATALOGUE: tuple[OutputKind, ...] = (
    OutputKind("report", (names.REPORT,), "publishable (written by publishing itself)",
               kept=frozenset({JOB, VARIANT}), local=_named(names.REPORT)),
    OutputKind("ladder", (names.LADDER,), "never published", kept=frozenset({JOB, VARIANT}),
               local=_named(names.LADDER)),
    OutputKind("plan", (names.PLAN,), "never published", kept=frozenset({JOB}), local=_named(names.PLAN)),
    OutputKind("variant", (names.VARIANT,), "never published", kept=frozenset({VARIANT}),
               local=_named(names.VARIANT)),
    OutputKind("gguf", (names.quant("*", "*"), f"{names.split_dir('*', '*')}/*.gguf"),
               "the file's gate in report.json (KLD, checks) passed",
               lambda ladder, report: [p for f, _ in passed_quants(ladder, report) for p in f.all_parts],
               owned_in_repo=("*.gguf",)),
    OutputKind("companion", (names.fit_layout("*", "*"), names.tuned_layout("*", "*")),
               "its quant file passed (a fit or tuned file's plan: beside it)",
               lambda ladder, report: [p for f, _ in passed_quants(ladder, report) for p in f.companion_paths],
               owned_in_repo=("*.layout.json",)),
    OutputKind("imatrix", names.imatrix("*"), "none (published with any ladder)",
               lambda ladder, report: list(ladder.imatrix.paths) if ladder.imatrix else [], required=False,
               owned_in_repo=("*.gguf", "*-imatrix.dat"), kept=frozenset({JOB}),
               local=lambda ladder: list(ladder.imatrix.paths) if ladder is not None and ladder.imatrix else []),
    OutputKind("projector", (names.projector("*", "*"),), f"the report's {PROJECTOR_CHECK!r} check, per file",
               lambda ladder, report: [p.path for p in published_projectors(ladder, report)],
               owned_in_repo=("*.gguf",)),
    OutputKind("chart", (names.CHART,), "drawn (and hashed) by this evaluation", _chart, required=False),
    OutputKind("layout", (names.layout("*"), names.tensor_types("*"), names.MEASUREMENTS,
                          f"{names.TUNE_DIR}/{names.error_cache('*')}"), "never published"),
    OutputKind("record", (names.record("*"),), "never published"),
)

BY_NAME = {k.name: k for k in CATALOGUE}


def published_files(ladder: Ladder, report: Report, exists: Callable[[str], bool]) -> list[tuple[OutputKind, str]]:
    """Every published file of a finished work dir, kind by kind in catalogue order (``report.json`` and the card
    are written by publishing itself). ``exists(rel)``: whether the work dir has it (an optional kind's missing
    file is left out; a required one is returned and publishing fails on it)."""
    return [(kind, rel) for kind in CATALOGUE if kind.files is not None
            for rel in kind.files(ladder, report) if kind.required or exists(rel)]


def stale_in_repo(path: str) -> bool:
    """Whether a file in a target repo is of a kind a publication owns, so that it is removed when the new
    publication does not have it (never another file of the repo)."""
    return any(fnmatch.fnmatchcase(path, pat) for kind in CATALOGUE for pat in kind.owned_in_repo)


def kept_files(ladder: Ladder | None, where: str) -> list[tuple[OutputKind, str]]:
    """The files whose copy survives the cleanup of a work dir (``where``: :data:`JOB` or :data:`VARIANT`), in
    catalogue order."""
    return [(kind, rel) for kind in CATALOGUE if where in kind.kept and kind.local is not None
            for rel in kind.local(ladder)]
