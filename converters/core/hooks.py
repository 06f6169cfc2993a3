"""The one progress and cancel channel between the work on files and whoever runs it.

Every stage, tool run and long loop reports through a :class:`Hooks` object and asks it, between steps,
whether to stop. The runner adapts it once (job progress in the store, stop on SIGTERM or a lost claim), the
CLI once (one line per event on stderr); tests and benchmarks use :data:`NULL_HOOKS` or a recording subclass.

Event kinds:
- ``start`` / ``end`` / ``skip``: a stage begins, finishes, or finds its record complete for the same inputs
  (``data`` may carry ``seconds``);
- ``progress``: a counted step inside a stage (``done`` of ``total``, e.g. quant 2 of 4, KLD chunk 3 of 8,
  distillation step 40 of 400), ``text`` says what (``Q4_K_M``, ``distill loss 2.31``);
- ``line``: a line of a tool's output worth showing (rate-limited by :meth:`Hooks.tool_lines`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from converters.core.errors import Cancelled

START, END, SKIP, PROGRESS, LINE = "start", "end", "skip", "progress", "line"
KINDS = (START, END, SKIP, PROGRESS, LINE)


@dataclasses.dataclass(frozen=True)
class Event:
    stage: str
    kind: str
    done: int | None = None
    total: int | None = None
    text: str = ""
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}")

    def describe(self) -> str:
        """One short line: ``Q4_K_M 2/4``, ``chunk 3/8, ETA 2 min 5 s``, a tool's line, or the stage's state."""
        if self.kind == PROGRESS:
            count = f"{self.done}/{self.total}" if self.done is not None and self.total else ""
            eta = self.data.get("eta_seconds")
            return " ".join(p for p in (self.text, count) if p) + (f", ETA {duration(eta)}" if eta is not None else "")
        if self.kind == LINE:
            return self.text
        return self.kind


def duration(seconds: float) -> str:
    """``45 s``, ``2 min 5 s``, ``1 h 20 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Hooks:
    """Receives progress events and answers "stop now?". The base class ignores events and never stops."""

    def progress(self, event: Event) -> None:  # noqa: B027 - a no-op by design
        pass

    def check_cancel(self) -> None:  # noqa: B027 - a no-op by design
        """Raise :class:`~converters.core.errors.Cancelled` (or a subclass's own stop error) to stop the work here."""

    def check_abort(self) -> None:
        """Asked while a program runs: raise to kill it now. Defaults to :meth:`check_cancel`; a caller with a
        graceful stop (let the running step finish) answers here only for the stops that cannot wait."""
        self.check_cancel()

    def alive(self) -> None:  # noqa: B027 - a no-op by design
        """A sign of life without an event (a running program printed a line), for stuck-job detection."""

    def planned(self, stages: Sequence[str]) -> None:  # noqa: B027 - a no-op by design
        """The stages the run will go through, in order, before the first starts (the job's own stage list)."""

    # conveniences built on the two methods above
    def emit(self, stage: str, kind: str, **kw: Any) -> None:
        self.progress(Event(stage, kind, **kw))

    def step(self, stage: str, done: int, total: int, text: str = "", **data: Any) -> None:
        """A counted step; checks for a stop request afterwards."""
        self.progress(Event(stage, PROGRESS, done=done, total=total, text=text, data=data))
        self.check_cancel()

    def tool_lines(self, stage: str, every: float = 2.0) -> Callable[[str], None]:
        """A callback for a tool's output lines: at most one ``line`` event every ``every`` seconds."""
        last = [0.0]
        lock = threading.Lock()

        def cb(line: str) -> None:
            now = time.monotonic()
            with lock:
                if now - last[0] < every:
                    return
                last[0] = now
            self.progress(Event(stage, LINE, text=line[-200:]))

        return cb


NULL_HOOKS = Hooks()


class StopFlag(Hooks):
    """Hooks that stop when ``should_stop()`` turns true (tests, simple callers)."""

    def __init__(self, should_stop: Callable[[], bool], on_event: Callable[[Event], None] | None = None):
        self._should_stop = should_stop
        self._on_event = on_event

    def progress(self, event: Event) -> None:
        if self._on_event is not None:
            self._on_event(event)

    def check_cancel(self) -> None:
        if self._should_stop():
            raise Cancelled("stopped on request; finished stages are kept")


class Recorder(Hooks):
    """Keeps every event (tests)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def progress(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def kinds(self, stage: str) -> list[str]:
        return [e.kind for e in self.events if e.stage == stage]
