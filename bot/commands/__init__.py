"""The subcommands of ``ggufbot`` (one module each, discovered by :mod:`bot.cli`), and the command line's one
adapter of the progress channel: :class:`CliHooks`, one stderr line per stage event."""

from __future__ import annotations

import sys
import time

from converters.hooks import END, LINE, PROGRESS, SKIP, START, Event, Hooks


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class CliHooks(Hooks):
    """``[convert] start``, ``[quantize] Q4_K_M done (2/4)``, ``[calibrate] already done for these inputs,
    skipped``, ``[convert] done in 3.2 s``, a tool's line as ``[calibrate] <line>``. Stages marked quiet
    (fetch, inspect) announce neither start nor end; counted steps are shown for the ladder's types only
    (the evaluation's steps never were). Never stops by itself (Ctrl-C interrupts)."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self._last_step = 0.0

    def progress(self, event: Event) -> None:
        stage, quiet = event.stage.rsplit("/", 1)[-1], bool(event.data.get("quiet"))
        if event.kind == PROGRESS and "loss" in event.data:
            self._training_step(stage, event)
            return
        if event.kind == START and not quiet:
            stderr(f"[{stage}] start")
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


    def _training_step(self, stage: str, event: Event) -> None:
        """``[distill] step 40/400 loss 2.3117 lr 0.0001``, at most every few seconds, and the last step."""
        now = time.monotonic()
        if event.done == event.total or now - self._last_step >= self.every:
            self._last_step = now
            stderr(f"[{stage}] step {event.done}/{event.total} loss {event.data['loss']:.4f} "
                   f"lr {event.data.get('lr', 0.0):.3g}")


CLI_HOOKS = CliHooks()
