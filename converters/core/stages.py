"""The stage protocol, typed stage state, the one way a finished stage is skipped, and the loop.

- :class:`Stage`: a step of a job (``name``, ``quiet``, ``run(ctx)``). Every stage provider (``converters.ladder``,
  ``converters.variants``, ``converters.patch``, ``bot.jobs``) writes its stages against it.
- :class:`StateKey`: what one stage hands to a later one goes through a typed key declared beside its writer
  (``EVAL_OVERRIDES: StateKey[dict[str, Any]] = StateKey("eval_overrides")``), read with ``ctx.get(KEY)`` and
  written with ``ctx.put(KEY, value)`` (:class:`StageState`), never through string keys of a dict.
- :class:`RecordedStage`: a stage whose record (``records/<name>.json``) says it finished for the same inputs is
  skipped; otherwise :meth:`RecordedStage.produce` writes its outputs and the record is saved. The llama.cpp
  steps (convert, calibrate, quantize) keep the same rule inside their functions (they are also called outside a
  job) and report through :func:`finished`.
- :func:`run_stages`: the loop (stop requests between stages, a ``start`` event per stage, the list of stages
  announced first through :meth:`converters.core.hooks.Hooks.planned`). ``converters.ladder.job.run_stages`` adds
  the program limits of each stage.

Also the shared helpers of the file stages: the outcome type, disk checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ContextManager, Generic, Protocol, TypeVar, overload

from converters.core import records
from converters.core.errors import DiskSpaceError
from converters.core.hooks import END, SKIP, START, Event, Hooks
from converters.core.records import StageRecord

log = logging.getLogger(__name__)

DISK_MARGIN = 1.10  # 10 % head room over the estimate

T = TypeVar("T")
D = TypeVar("D")


@dataclasses.dataclass(frozen=True, eq=False)
class StateKey(Generic[T]):
    """A typed key of the state one stage leaves for later ones. Keys compare by identity (two modules' keys of
    the same ``name`` never collide); ``name`` is only for messages."""

    name: str


class StageState:
    """Typed stage state: ``get(KEY)``, ``get(KEY, default)``, ``put(KEY, value)``, ``has(KEY)``."""

    def _values(self) -> dict[StateKey[Any], Any]:
        store = self.__dict__.get("_stage_values")
        if store is None:
            store = self.__dict__["_stage_values"] = {}
        return store

    @overload
    def get(self, key: StateKey[T]) -> T: ...

    @overload
    def get(self, key: StateKey[T], default: D) -> T | D: ...

    def get(self, key: StateKey[Any], *default: Any) -> Any:
        values = self._values()
        if key in values:
            return values[key]
        if default:
            return default[0]
        raise RuntimeError(f"no {key.name}: the stage that provides it must run first")

    def put(self, key: StateKey[T], value: T) -> None:
        self._values()[key] = value

    def has(self, key: StateKey[Any]) -> bool:
        return key in self._values()


class StageContext(Protocol):
    """What the loop and :class:`RecordedStage` need of a run's context (``converters.ladder.job.JobContext``)."""

    workdir: Path
    hooks: Hooks


C = TypeVar("C", bound=StageContext, contravariant=True)


class Stage(Protocol[C]):
    """A step of a job. A stage may also define ``program_seconds(ctx) -> float | None``: the limit of the
    longest program it starts, from its work; without it a program gets the limit of one of unknown work."""

    name: str
    quiet: bool

    def run(self, ctx: C) -> None: ...


@dataclasses.dataclass(frozen=True)
class StageOutcome:
    stage: str
    record: StageRecord
    skipped: bool  # True when a finished record for the same inputs was found


def finished(hooks: Hooks, stage: str, outcome: StageOutcome) -> None:
    """The ``end`` or ``skip`` event of a stage that returned a :class:`StageOutcome`."""
    hooks.emit(stage, SKIP if outcome.skipped else END, data={"seconds": outcome.record.seconds})


@dataclasses.dataclass(frozen=True)
class Produced:
    """What :meth:`RecordedStage.produce` wrote: the outputs, the record's extra, seconds (None: wall time)."""

    outputs: list[Path]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float | None = None
    tool_version: str | None = None


class RecordedStage(Generic[C]):
    """A stage that skips itself when its record matches :meth:`inputs` (and :meth:`intact` accepts it);
    otherwise :meth:`produce` writes its outputs and the record is saved. :meth:`use` then takes what later
    stages need from the record. ``data`` of the ``end``/``skip`` event: :meth:`event_data`."""

    name = "stage"
    quiet = False

    def inputs(self, ctx: C) -> dict[str, Any]:
        raise NotImplementedError

    def produce(self, ctx: C) -> Produced:
        raise NotImplementedError

    def use(self, ctx: C, rec: StageRecord) -> None:
        pass

    def intact(self, ctx: C, rec: StageRecord) -> bool:
        """Whether what the record lists is still there (beyond its outputs, which the record checks itself)."""
        return True

    def done_text(self, ctx: C, rec: StageRecord) -> str:
        """The ``end`` event's text ("" for none)."""
        return ""

    def event_data(self, rec: StageRecord) -> dict[str, Any]:
        return {"seconds": rec.seconds}

    def finished_record(self, ctx: C, inputs: dict[str, Any]) -> StageRecord | None:
        rec = records.complete(ctx.workdir, self.name, inputs)
        return rec if rec is not None and self.intact(ctx, rec) else None

    def run(self, ctx: C) -> None:
        inputs = self.inputs(ctx)
        rec = self.finished_record(ctx, inputs)
        if rec is not None:
            log.info("%s: already done for these inputs; skipped", self.name)
            ctx.hooks.emit(self.name, SKIP, data=self.event_data(rec))
        else:
            t0 = time.monotonic()
            out = self.produce(ctx)
            rec = records.save(ctx.workdir, self.name, inputs, out.outputs,
                               time.monotonic() - t0 if out.seconds is None else out.seconds, out.tool_version,
                               extra=out.extra)
            ctx.hooks.emit(self.name, END, text=self.done_text(ctx, rec), data=self.event_data(rec))
        self.use(ctx, rec)


def run_stages(stages: Sequence[Stage[Any]], ctx: StageContext,
               guard: Callable[[Stage[Any]], ContextManager[object]] | None = None) -> None:
    """Announce the stage list (``hooks.planned``), then run ``stages`` in order; stop (``hooks.check_cancel()``
    raises) between any two of them. ``guard(stage)`` wraps each stage's run (the program limits)."""
    ctx.hooks.planned([s.name for s in stages])
    for stage in stages:
        ctx.hooks.check_cancel()
        ctx.hooks.progress(Event(stage.name, START, data={"quiet": stage.quiet}))
        ctx.hooks.check_cancel()
        with guard(stage) if guard is not None else contextlib.nullcontext():
            stage.run(ctx)


def free_bytes(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check_disk(path: Path, needed: int) -> None:
    """Raise DiskSpaceError when ``needed`` bytes (plus a margin) will not fit under ``path``."""
    need = int(needed * DISK_MARGIN)
    free = free_bytes(path)
    if need > free:
        raise DiskSpaceError(str(path), need, free)
