"""When a file's verdict is final (pure): the files *held* until the ladder's curve around them is measured.

A file's verdict is judged against the files measured before it (:func:`.verdict.judge_file`). For a stock file
whose curve is not bracketed yet (:func:`.verdict.awaits_curve`: on a side of it in bits per weight the ladder has
types but not ``CurveRules.neighbours`` measured files, or all it has there), that verdict is not final: the first
file measured, the most downloaded one, would otherwise be judged by its ceiling alone. Such a file is held; when a
later measurement brackets it (:meth:`Settling.measured`), or when the ladder is finished (:meth:`Settling.finish`),
it is judged again against every other file measured by then and *settled*. A file bracketed when it is measured is
settled at once with its first verdict. Everything here follows from the files' figures and the measuring order, so
a resumed evaluation, which takes the same files from their records in the same order, holds and settles them the
same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from converters.core.report import FAILED, PASSED, FileResult
from converters.ladder.evaluate import curve, verdict

Judge = Callable[[FileResult, Sequence[FileResult]], list[str]]  # a file's reasons against the given other files


@dataclasses.dataclass
class Settling:
    """The held files of one evaluation and the files settled since :meth:`settled` was last asked. ``judge``:
    :func:`.verdict.judge_file` with the job's ceilings and checks (a held file is a stock file: no baseline)."""

    judge: Judge
    rules: curve.CurveRules = curve.DEFAULT_RULES
    held: list[str] = dataclasses.field(default_factory=list)  # in measuring order
    against: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # type -> its final verdict's files
    ready: list[FileResult] = dataclasses.field(default_factory=list)  # settled since the last settled()

    def is_held(self, qtype: str) -> bool:
        return qtype in self.held

    def measured(self, fr: FileResult, files: Sequence[FileResult], ladder_bits: Sequence[float]) -> None:
        """``fr`` was measured and judged against the files before it in ``files`` (every file measured so far,
        ``fr`` last); ``ladder_bits``: the nominal bits of the ladder's stock types, measured or not. The held
        files it brackets are judged again and settled (in measuring order), then ``fr`` is settled or held."""
        earlier = [f for f in files if f is not fr]
        for t in list(self.held):
            f = _file(files, t)
            others = [g for g in files if g.type != t]
            if not verdict.awaits_curve(f, ladder_bits, others, self.rules):
                self._judge_again(f, others)
        if verdict.awaits_curve(fr, ladder_bits, earlier, self.rules):
            self.held.append(fr.type)
        else:
            self.against[fr.type] = [f.type for f in earlier]
            self.ready.append(fr)

    def finish(self, files: Sequence[FileResult]) -> None:
        """The whole ladder is measured: every held file is judged against all the others and settled."""
        for t in list(self.held):
            self._judge_again(_file(files, t), [g for g in files if g.type != t])

    def settled(self) -> list[FileResult]:
        """The files whose verdict became final since the last call, in the order they became final."""
        out, self.ready = self.ready, []
        return out

    def _judge_again(self, f: FileResult, others: Sequence[FileResult]) -> None:
        f.reasons = self.judge(f, others)
        f.status = FAILED if f.reasons else PASSED
        self.against[f.type] = [g.type for g in others]
        self.held.remove(f.type)
        self.ready.append(f)


def _file(files: Sequence[FileResult], qtype: str) -> FileResult:
    return next(f for f in files if f.type == qtype)
