"""The subcommands of ``ggufbot`` (one module each, discovered by :mod:`bot.cli`), and the command line's one
adapter of the progress channel: :class:`CliHooks`, one stderr line per stage event, or, when stderr is a
terminal, :class:`TtyHooks`, progress bars (``rich``) per stage; :func:`cli_hooks` picks one."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from converters.core.hooks import END, LINE, PROGRESS, SKIP, START, Event, Hooks
from converters.ladder.evaluate import sequential


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag, kept for one release: hidden from ``--help``, stores into the new flag's ``dest``
    and prints a deprecation warning on stderr."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        stderr(f"warning: {option_string} is deprecated and will be removed in the next release; use {self.new}")
        setattr(namespace, self.dest, values)


def figures(stats: Any) -> tuple[str, str, str]:
    """A file's measured figures as ``evaluate`` and ``convert`` print them: mean KLD ± error, same top token ±
    error (percent) and the PPL ratio; ``-`` for each when the file was not measured."""
    if stats is None:
        return "-", "-", "-"
    return (f"{stats.kld_mean:.5f} ± {stats.kld_mean_err:.5f}",
            f"{100 * stats.same_top_p:.2f} ± {100 * stats.same_top_p_err:.2f} %", f"{stats.ppl_ratio:.4f}")


def add_sequential_flags(p: argparse.ArgumentParser) -> None:
    """``--eval-precision`` and ``--eval-min-chunks``: the sequential evaluation (settings ``[evaluate]``)."""
    p.add_argument("--eval-precision", type=float, default=sequential.PRECISION, metavar="F",
                   help="score each file until the standard error of its mean KLD (from chunk means) is at most F "
                        f"of the mean, or its verdict is settled (default {sequential.PRECISION}; 0: every file on "
                        "--eval-chunks chunks)")
    p.add_argument("--eval-min-chunks", type=int, default=sequential.MIN_CHUNKS, metavar="N",
                   help=f"fewest chunks a file is scored on (default {sequential.MIN_CHUNKS})")


def deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, **kw: Any) -> None:
    """Accept ``old`` as a deprecated spelling of the flag ``new`` (same ``dest``, as argparse derives it)."""
    parser.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=DeprecatedAlias, new=new, **kw)


class CliHooks(Hooks):
    """``[convert] start``, ``[quantize] Q4_K_M done (2/4)``, ``[calibrate] already done for these inputs,
    skipped``, ``[calibrate] chunk 8/222, ETA 2 min 5 s``, ``[convert] done in 3.2 s``, a tool's line as
    ``[convert] <line>``. Stages marked quiet
    (fetch, inspect) announce neither start nor end; counted steps are shown for the ladder's types only
    (the evaluation's steps never were). Never stops by itself (Ctrl-C interrupts)."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self._last_step: float | None = None  # None: the first counted step is always shown

    def __enter__(self) -> "CliHooks":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def progress(self, event: Event) -> None:
        stage, quiet = event.stage.rsplit("/", 1)[-1], bool(event.data.get("quiet"))
        if event.kind == PROGRESS and "loss" in event.data:
            self._training_step(stage, event)
            return
        if event.kind == PROGRESS and "eta_seconds" in event.data:
            self._timed_step(stage, event)
            return
        if event.kind == START and not quiet:
            stderr(f"[{stage}] start")
        elif event.kind == PROGRESS and "file" in event.data and "state" in event.data:  # the pipeline stage
            # ``[ladder] Q4_K_M passed (2/6)``: each file made and measured; a held one's verdict once settled
            if event.data.get("phase") in ("end", "settled"):
                stderr(f"[{stage}] {event.data['file']} {event.data['state']} ({event.done}/{event.total})")
        elif event.kind == PROGRESS and "type" in event.data:
            stderr(f"[{stage}] {event.data['type']} {'(already done)' if event.data.get('skipped') else 'done'} "
                   f"({event.done}/{event.total})")
        elif event.kind == LINE and event.text:
            stderr(f"[{stage}] {event.text}")
        elif event.kind == SKIP and not quiet:
            stderr(f"[{stage}] already done for these inputs, skipped")
        elif event.kind == END and not quiet:
            secs = event.data.get("seconds")
            stderr(f"[{stage}] done" + (f" in {secs:.1f} s" if isinstance(secs, (int, float)) else ""))


    def _due(self, event: Event) -> bool:
        """A counted step is shown when it is the first, the last, or ``every`` seconds after the last shown.
        (Not measured from 0: ``time.monotonic()`` counts from boot, and a box just booted must show its first.)"""
        now = time.monotonic()
        if event.done == event.total or self._last_step is None or now - self._last_step >= self.every:
            self._last_step = now
            return True
        return False

    def _timed_step(self, stage: str, event: Event) -> None:
        """``[calibrate] chunk 8/222, ETA 2 min 5 s``, at most every few seconds, and the last step."""
        if self._due(event):
            stderr(f"[{stage}] {event.describe()}")

    def _training_step(self, stage: str, event: Event) -> None:
        """``[distill] step 40/400 loss 2.3117 lr 0.0001``, at most every few seconds, and the last step."""
        if self._due(event):
            stderr(f"[{stage}] step {event.done}/{event.total} loss {event.data['loss']:.4f} "
                   f"lr {event.data.get('lr', 0.0):.3g}")


CLI_HOOKS = CliHooks()


class TtyHooks(CliHooks):
    """Progress bars on a terminal: one bar per stage (quant i of m, evaluation step j of c, distillation step),
    a tool's latest line as the bar's text, the stage's time when done. Use as a context manager."""

    def __init__(self, console: Any = None) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
            TimeElapsedColumn

        self.progress_bars = Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[stage]:<12}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
                                      console=console or Console(stderr=True), transient=False)
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "TtyHooks":
        self.progress_bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress_bars.stop()

    def _task(self, stage: str) -> Any:
        if stage not in self._tasks:
            self._tasks[stage] = self.progress_bars.add_task("", stage=stage, total=None)
        return self._tasks[stage]

    def progress(self, event: Event) -> None:
        stage, quiet = event.stage.rsplit("/", 1)[-1], bool(event.data.get("quiet"))
        bars = self.progress_bars
        if event.kind == START and not quiet:
            self._task(stage)
        elif event.kind == PROGRESS and event.total:
            bars.update(self._task(stage), total=event.total, completed=event.done or 0, description=event.text)
        elif event.kind == LINE and event.text:
            bars.update(self._task(stage), description=event.text[-60:])
        elif event.kind in (END, SKIP) and not quiet:
            task = self._task(stage)
            total = bars.tasks[bars.task_ids.index(task)].total or 1
            secs = event.data.get("seconds")
            what = "already done, skipped" if event.kind == SKIP else \
                "done" + (f" in {secs:.1f} s" if isinstance(secs, (int, float)) else "")
            bars.update(task, total=total, completed=total, description=what)


def cli_hooks(stream: Any = None) -> CliHooks:
    """Progress bars when ``stream`` (default stderr) is a terminal, else one line per event."""
    stream = sys.stderr if stream is None else stream
    return TtyHooks() if getattr(stream, "isatty", lambda: False)() else CLI_HOOKS
