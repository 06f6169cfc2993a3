"""One stage list: a job records the stages it will run when they start (``Hooks.planned``, a ``job.stages``
event from the runner's hooks), and the status's "stage k of n" and ETA come from that list, not from a
hand-kept tuple: a metadata-patch job counts its own stages, not a full ladder's."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from bot.jobs.job import JobSpec, PublishTarget, Source, stages_for
from bot.jobs.patch import PatchBase
from bot.model import jobstate as J
from bot.service.runner import JobHooks
from bot.service.status import planned_stages, running_view, running_views, stage_timings
from bot.state.memstore import MemoryStore
from converters.core.hooks import Hooks
from converters.core.stages import run_stages
from converters.ladder.pipeline import LadderOptions

T0 = 1_000_000.0


def _patch_spec() -> JobSpec:
    base = PatchBase("me/M-GGUF", "a" * 40, Path("ladder.json"), ("chat_template.jinja",), ("chat template",))
    return JobSpec(source=Source(repo="acme/M", revision="b" * 40), model_name="M", ladder=LadderOptions(),
                   patch=base, publish=PublishTarget(repo_id="me/M-GGUF"))


def _running_job(st: MemoryStore) -> tuple[JobHooks, int]:
    job_id = st.enqueue("acme/M", "b" * 40, reason="new revision", now=T0)
    job = st.claim("w1", now=T0)
    assert job is not None and job.id == job_id
    runner = SimpleNamespace(store=st, clock=lambda: T0 + 1, worker_id="w1", stop=threading.Event())
    return JobHooks(runner, job), job_id  # type: ignore[arg-type]


def test_run_stages_announces_the_stage_list_first() -> None:
    seen: list[tuple[str, ...]] = []

    class Recording(Hooks):
        def planned(self, stages) -> None:
            seen.append(tuple(stages))

        def progress(self, event) -> None:
            seen.append((event.stage, event.kind))

    class Step:
        quiet = False

        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, ctx) -> None:
            pass

    run_stages([Step("a"), Step("b")], SimpleNamespace(workdir=Path("."), hooks=Recording()))
    assert seen == [("a", "b"), ("a", "start"), ("b", "start")]


def test_a_patch_job_counts_its_own_stages() -> None:
    names = [s.name for s in stages_for(_patch_spec(), hub=SimpleNamespace())]
    assert names == ["fetch", "inspect", "vocab", "patch", "recheck", "publish"]
    st = MemoryStore()
    hooks, job_id = _running_job(st)
    hooks.planned(names)  # what run_stages does when the patch job starts
    assert planned_stages(st, job_id) == (*names, "cleanup")
    st.update_running(job_id, "w1", now=T0 + 2, stage="vocab", progress=None)
    [v] = running_views(st, now=T0 + 3)
    assert (v.stage_index, v.stage_count) == (3, 7)  # not "stage 1 of 8" of a full ladder
    # the ETA sums the patch's own stages, from past patch jobs' timings, never a full ladder's
    timings = {"vocab": 10.0, "patch": 20.0, "recheck": 30.0, "publish": 5.0, "quantize": 999.0, "evaluate": 999.0}
    job = st.job(job_id)
    assert job is not None
    v = running_view(job, timings, {job_id: T0 + 2}, now=T0 + 6, stages=planned_stages(st, job_id))
    assert v.eta_s == 6.0 + 20.0 + 30.0 + 5.0


def test_the_latest_stage_list_wins_and_a_job_without_one_counts_its_stage_alone() -> None:
    st = MemoryStore()
    hooks, job_id = _running_job(st)
    st.update_running(job_id, "w1", now=T0 + 2, stage="convert", progress=None)
    [v] = running_views(st, now=T0 + 3)
    assert (v.stage_index, v.stage_count) == (1, 1)
    hooks.planned(["fetch", "inspect", "vocab", "patch", "recheck"])  # a patch (not published) ...
    hooks.planned(["fetch", "inspect", "convert", "quantize"])  # ... refused: the full job in the same work dir
    [v] = running_views(st, now=T0 + 3)
    assert (v.stage_index, v.stage_count) == (3, 4)
    assert stage_timings(st)[0] == {}
    assert J.Status.RUNNING == st.job(job_id).status  # type: ignore[union-attr]
