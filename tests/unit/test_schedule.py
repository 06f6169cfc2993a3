"""The pipeline's scheduler (converters/core/schedule.py) on fake tasks: order, resource exclusivity,
dependencies, a stop request, and an error in one task that stops the rest and kills their programs."""

from __future__ import annotations

import threading
import time

import pytest

from converters.core import proc
from converters.core.errors import Cancelled, ToolError
from converters.core.schedule import CPU, GPU, NETWORK, Task, covered, run_tasks


class Log:
    """Records starts and ends, and the most tasks of each resource running at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    def task(self, name: str, resource: str, seconds: float = 0.05, after: tuple[str, ...] = (),
             rank: tuple = (), fail: BaseException | None = None) -> Task:
        def run() -> str:
            with self.lock:
                self.events.append(("start", name))
                self.now[resource] = self.now.get(resource, 0) + 1
                self.peak[resource] = max(self.peak.get(resource, 0), self.now[resource])
            try:
                time.sleep(seconds)
                if fail is not None:
                    raise fail
                return name.upper()
            finally:
                with self.lock:
                    self.now[resource] -= 1
                    self.events.append(("end", name))

        return Task(name, run, resource, after, rank)

    def started(self) -> list[str]:
        return [n for k, n in self.events if k == "start"]

    def index(self, kind: str, name: str) -> int:
        return self.events.index((kind, name))


def test_one_unit_runs_the_ready_tasks_by_rank_and_returns_their_results() -> None:
    log = Log()
    tasks = [log.task("c", CPU, rank=(2,)), log.task("a", CPU, rank=(0,)), log.task("b", CPU, rank=(1,)),
             log.task("d", CPU, rank=(1,))]  # same rank as b: list order
    out = run_tasks(tasks, {CPU: 1})
    assert log.started() == ["a", "b", "d", "c"]
    assert out.results == {"a": "A", "b": "B", "c": "C", "d": "D"}
    assert log.peak[CPU] == 1 and [s.task for s in out.spans] == ["a", "b", "d", "c"]


def test_resources_are_exclusive_per_unit_and_different_resources_overlap() -> None:
    log = Log()
    tasks = [log.task(f"q{i}", CPU, 0.1) for i in range(4)] + [log.task(f"m{i}", GPU, 0.1) for i in range(4)]
    t0 = time.monotonic()
    out = run_tasks(tasks, {CPU: 2, GPU: 1})
    wall = time.monotonic() - t0
    assert log.peak == {CPU: 2, GPU: 1}
    assert wall < 0.75  # 0.2 s of CPU work per unit beside 0.4 s of GPU work, not 0.8 s in a row
    busy = out.busy(t0, time.monotonic())
    assert busy[GPU] > 0.5 and set(busy) == {CPU, GPU}


def test_a_task_starts_only_after_its_dependencies_ended_and_a_free_resource_takes_the_next_ready_task() -> None:
    log = Log()
    # the pipeline's shape: make k on the CPU, measure k on the GPU after it; measure k runs while make k+1 does
    tasks = []
    for k in range(3):
        tasks.append(log.task(f"make{k}", CPU, 0.1, rank=(k, 0)))
        tasks.append(log.task(f"measure{k}", GPU, 0.1, after=(f"make{k}",), rank=(k, 1)))
    tasks.append(log.task("finish", CPU, 0.01, after=tuple(f"measure{k}" for k in range(3)), rank=(9,)))
    run_tasks(tasks, {CPU: 1, GPU: 1})
    for k in range(3):
        assert log.index("end", f"make{k}") < log.index("start", f"measure{k}")
    assert log.index("start", "make1") < log.index("end", "measure0")  # overlapped
    assert log.started()[-1] == "finish" and log.index("end", "measure2") < log.index("start", "finish")


def test_on_one_shared_unit_a_measurement_comes_before_the_next_file_is_made() -> None:
    log = Log()
    tasks = []
    for k in range(3):
        tasks.append(log.task(f"make{k}", CPU, 0.02, rank=(k, 0)))
        tasks.append(log.task(f"measure{k}", CPU, 0.02, after=(f"make{k}",), rank=(k, 1)))
    run_tasks(tasks, {CPU: 1})
    assert log.started() == ["make0", "measure0", "make1", "measure1", "make2", "measure2"]


@pytest.mark.parametrize("tasks, capacity, why", [
    ([Task("a", lambda: 1, CPU, after=("b",)), Task("b", lambda: 1, CPU, after=("a",))], {CPU: 1}, "each other"),
    ([Task("a", lambda: 1, GPU)], {CPU: 1}, "no unit"),
    ([Task("a", lambda: 1, CPU, after=("z",))], {CPU: 1}, "unknown"),
    ([Task("a", lambda: 1, CPU), Task("a", lambda: 1, CPU)], {CPU: 1}, "repeat"),
])
def test_plans_that_cannot_run_are_refused_before_anything_runs(tasks, capacity, why) -> None:
    with pytest.raises(ValueError, match=why):
        run_tasks(tasks, capacity)


def test_a_stop_request_starts_nothing_more_and_lets_the_running_task_finish() -> None:
    log = Log()
    stop = threading.Event()
    tasks = [log.task("a", CPU, 0.3), log.task("b", CPU, 0.01, after=("a",)), log.task("n", NETWORK, 0.01)]

    def check() -> None:
        if stop.is_set():
            raise Cancelled("stop requested")

    threading.Timer(0.1, stop.set).start()
    with pytest.raises(Cancelled, match="stop requested"):
        run_tasks(tasks, {CPU: 1, NETWORK: 1}, check=check)
    assert ("end", "a") in log.events and "b" not in log.started()  # a graceful stop: a finished, b never began


def test_an_error_in_one_task_kills_the_programs_of_the_others_and_is_the_error_raised(tmp_path) -> None:
    log = Log()
    started = threading.Event()

    def long_program() -> None:
        started.set()
        proc.run(["sleep", "30"])

    def failing() -> None:
        started.wait(10)
        time.sleep(0.3)  # the program is running
        raise RuntimeError("quantize failed")

    tasks = [Task("eval", long_program, GPU), Task("make", failing, CPU), log.task("later", CPU, after=("make",))]
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="quantize failed"):
        run_tasks(tasks, {CPU: 1, GPU: 1})
    assert time.monotonic() - t0 < 5  # the 30 s program was killed, not waited for
    assert log.started() == []
    assert not [p for p in proc._LIVE.values() if p.poll() is None]


def test_an_abort_of_the_job_kills_running_programs_through_the_watch() -> None:
    abort = threading.Event()

    def check() -> None:
        if abort.is_set():
            raise Cancelled("cancelled")

    tasks = [Task("eval", lambda: proc.run(["sleep", "30"]), GPU), Task("make", lambda: proc.run(["sleep", "30"]), CPU)]
    threading.Timer(0.5, abort.set).start()
    t0 = time.monotonic()
    with proc.watched(proc.Watch(check=check)), pytest.raises((Cancelled, ToolError)):
        run_tasks(tasks, {CPU: 1, GPU: 1}, check=check)
    assert time.monotonic() - t0 < 5


def test_covered_counts_overlaps_once_and_clips_to_the_window() -> None:
    assert covered([(0, 2), (1, 3), (5, 6), (9, 12)], 0, 10) == 5
    assert covered([], 0, 10) == 0
