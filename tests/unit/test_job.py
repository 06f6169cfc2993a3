"""The runner of stages: order, skip on a matching record, stop between stages, the events it sends."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest

from bot.commands import CliHooks
from bot.jobs.job import JobSpec, PublishTarget, Source, stages_for
from converters.core.errors import Cancelled
from converters.core.hooks import END, PROGRESS, SKIP, START, Event, Recorder, StopFlag
from converters.core.stages import Produced, RecordedStage, StateKey
from converters.ladder.job import JobContext, run_stages
from converters.ladder.pipeline import LadderOptions

TOOLCHAIN = SimpleNamespace(version="llama.cpp test")
RAN: StateKey[list[str]] = StateKey("ran")
WRITTEN: StateKey[str] = StateKey("w")


@dataclasses.dataclass(frozen=True)
class Note:
    name: str
    quiet: bool = False

    def run(self, ctx: JobContext) -> None:
        ctx.put(RAN, [*ctx.get(RAN, []), self.name])


class Write(RecordedStage[JobContext]):
    """Writes one file whose content is its input; counts how often it really ran."""

    def __init__(self, name: str, value: str) -> None:
        self.name, self.value, self.runs = name, value, 0

    def inputs(self, ctx: JobContext) -> dict:
        return {"value": self.value}

    def produce(self, ctx: JobContext) -> Produced:
        self.runs += 1
        out = ctx.workdir / f"{self.name}.txt"
        out.write_text(self.value)
        return Produced([out], {"value": self.value})

    def use(self, ctx: JobContext, rec) -> None:
        ctx.put(WRITTEN, rec.extra["value"])


def context(tmp_path: Path, hooks) -> JobContext:
    return JobContext(tmp_path, TOOLCHAIN, hooks, "M")  # type: ignore[arg-type]


def test_stages_run_in_order_and_announce_themselves(tmp_path):
    rec = Recorder()
    ctx = run_stages([Note("a"), Note("b", quiet=True), Note("c")], context(tmp_path, rec))
    assert ctx.get(RAN) == ["a", "b", "c"]
    assert [(e.stage, e.kind, e.data.get("quiet")) for e in rec.events] == [
        ("a", START, False), ("b", START, True), ("c", START, False)]


@pytest.mark.parametrize("first,second,runs,kinds", [
    ("x", "x", 1, [START, END, START, SKIP]),  # same inputs: the record makes the second run free
    ("x", "y", 2, [START, END, START, END]),   # other inputs: done again
])
def test_recorded_stage_skips_on_a_matching_record(tmp_path, first, second, runs, kinds):
    rec = Recorder()
    a, b = Write("w", first), Write("w", second)
    run_stages([a], context(tmp_path, rec))
    ctx = run_stages([b], context(tmp_path, rec))
    assert a.runs + b.runs == runs and ctx.get(WRITTEN) == second
    assert [e.kind for e in rec.events] == kinds


def test_recorded_stage_redone_when_its_output_is_gone(tmp_path):
    run_stages([Write("w", "x")], context(tmp_path, Recorder()))
    (tmp_path / "w.txt").unlink()
    again = Write("w", "x")
    run_stages([again], context(tmp_path, Recorder()))
    assert again.runs == 1 and (tmp_path / "w.txt").read_text() == "x"


def test_cancel_between_stages(tmp_path):
    stop = [False]

    class StopAfter(Note):
        def run(self, ctx):
            super().run(ctx)
            stop[0] = True

    ctx = context(tmp_path, StopFlag(lambda: stop[0]))
    with pytest.raises(Cancelled):
        run_stages([Note("a"), StopAfter("b"), Note("c")], ctx)
    assert ctx.get(RAN) == ["a", "b"]


@pytest.mark.parametrize("event,line", [
    (Event("convert", START, data={"quiet": False}), "[convert] start"),
    (Event("fetch", START, data={"quiet": True}), None),
    (Event("quantize", PROGRESS, done=2, total=4, text="Q4_K_M", data={"type": "Q4_K_M", "skipped": False}),
     "[quantize] Q4_K_M done (2/4)"),
    (Event("quantize", PROGRESS, done=1, total=4, text="Q8_0", data={"type": "Q8_0", "skipped": True}),
     "[quantize] Q8_0 (already done) (1/4)"),
    (Event("evaluate", PROGRESS, done=1, total=8, text="kld"), None),
    (Event("calibrate", SKIP, data={"seconds": 2.0}), "[calibrate] already done for these inputs, skipped"),
    (Event("convert", END, data={"seconds": 3.25}), "[convert] done in 3.2 s"),
    (Event("evaluate", END), "[evaluate] done"),
    (Event("variant:r/prune", START, data={"quiet": False}), "[prune] start"),
])
def test_cli_lines(capsys, event, line):
    CliHooks().progress(event)
    err = capsys.readouterr().err
    assert err == (f"{line}\n" if line else "")


def test_stage_list_of_a_spec(tmp_path):
    from converters.variants import recipes as variants

    local = JobSpec(source=Source(path=tmp_path), model_name="M", ladder=LadderOptions(imatrix=False))
    assert [s.name for s in stages_for(local)] == ["inspect", "convert", "quantize"]
    hub = JobSpec(source=Source(repo="o/M", revision="a" * 40), model_name="M", ladder=LadderOptions(imatrix=False),
                  publish=PublishTarget(namespace="me"), variants=(variants.get("prune-4-layers"),))
    assert [s.name for s in stages_for(hub)] == ["fetch", "inspect", "convert", "quantize", "publish",
                                                  "variant:prune-4-layers"]
    sub = hub.for_variant(variants.get("prune-4-layers-kd"), tmp_path / "src", tmp_path)
    assert sub.model_name == "M-prune-4-layers-kd" and sub.variants == ()
    assert [s.name for s in stages_for(sub)] == ["prune", "distill", "inspect", "convert", "quantize"]
