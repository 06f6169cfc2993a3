"""``llama-imatrix``'s progress as progress events: the pinned program on a real model (SmolLM2's BF16 GGUF) and
real text. A tiny random model is no good here: its passes take microseconds, and a fast machine hands the whole
run's output over in one read."""

from __future__ import annotations

import time

import pytest

from converters.llama import calibrate
from converters.llama.calibrate import CalibrateOptions, TextFile
from converters.core.hooks import PROGRESS, Event, Recorder
from converters.core.workdir import WorkDir

pytestmark = [pytest.mark.slow, pytest.mark.llama]


class Timed(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.at: list[float] = []

    def progress(self, event: Event) -> None:
        super().progress(event)
        self.at.append(time.monotonic())


def test_imatrix_chunks_become_progress_events_with_an_eta(tmp_path, toolchain, calibration_text,
                                                         smol_workdir) -> None:
    ref = smol_workdir / WorkDir(smol_workdir).ladder().reference.path
    hooks = Timed()
    started = time.monotonic()
    # 64-token chunks decoded 2 per pass (-b 128): 4 passes of the 8 chunks of a 135M model, each reported as it
    # finishes
    calibrate.calibrate(ref, tmp_path, "smol", TextFile.of(calibration_text), toolchain=toolchain,
                        options=CalibrateOptions(chunks=8, ctx=64, threads=2, extra_args=("-b", "128")), hooks=hooks)
    ended = time.monotonic()
    steps = [(e, t) for e, t in zip(hooks.events, hooks.at, strict=True) if e.kind == PROGRESS]
    assert steps, hooks.events
    assert all(e.stage == "calibrate" and e.text == "chunk" and e.total == 8 for e, _ in steps)
    done = [e.done for e, _ in steps]
    # at least one pass counted before the end (on a fast machine several passes may arrive in one read)
    assert done[0] == 0 and done[-1] == 8 and done == sorted(done) and any(0 < d < 8 for d in done), done
    etas = [e.data["eta_seconds"] for e, _ in steps[1:]]
    assert all(isinstance(x, float) and x >= 0 for x in etas) and etas[-1] == 0.0
    assert steps[-1][0].describe() == "chunk 8/8, ETA 0 s"
    first_counted = next(t for e, t in steps if e.done and e.done < 8)
    last_counted = next(t for e, t in steps if e.done == 8)
    # counted while llama-imatrix ran, not parsed after it ended (no spacing between reads is required: a fast
    # machine may deliver the last passes in one read)
    assert started < first_counted <= last_counted <= ended
