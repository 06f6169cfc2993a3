"""Tasks on resources with dependencies, run in threads: the scheduler of the ladder's pipeline
(``converters/ladder/flow.py``; the schedule itself is described in docs/PIPELINE.md).

A :class:`Task` names the one resource it occupies while it runs (``cpu``, ``gpu``, ``network``: a unit of it), the
tasks it needs finished first (``after``) and its ``rank`` (lower first). :func:`run_tasks` starts, whenever a unit of
a resource is free, the ready task of lowest rank that uses it (a greedy list schedule: a resource never waits while
a ready task could use it), each in its own thread with the caller's :class:`~converters.core.proc.Watch` (program
limits, signs of life) and a stop check of its own, and returns the results and what ran when (:class:`Span`).

Stopping:
- ``check()`` (the job's ``hooks.check_cancel``) is asked between tasks and every :data:`POLL_SECONDS` while they run:
  when it raises, no task starts any more, the running ones end as their programs' own checks decide (the watch's
  ``check``: an abort kills them at once, a graceful stop lets them finish), and its error is raised;
- a task that raises stops the others at once: no task starts, every running program is killed (its watch check
  raises :class:`~converters.core.errors.Cancelled`), the threads are waited for, and the task's error is raised
  (not the stops it caused).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import dataclasses
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from converters.core.errors import Cancelled
from converters.core.proc import Watch, current_watch, watched

log = logging.getLogger(__name__)

CPU, GPU, NETWORK = "cpu", "gpu", "network"
POLL_SECONDS = 0.2


@dataclasses.dataclass(frozen=True)
class Task:
    """One unit of work: ``run()`` occupies one unit of ``resource`` until it returns."""

    name: str
    run: Callable[[], Any]
    resource: str
    after: tuple[str, ...] = ()
    rank: tuple[Any, ...] = ()  # among the ready tasks of a resource, the lowest rank starts first (then list order)


@dataclasses.dataclass(frozen=True)
class Span:
    """When a task ran (seconds of ``time.monotonic``)."""

    task: str
    resource: str
    start: float
    end: float


@dataclasses.dataclass
class Schedule:
    """What :func:`run_tasks` ran: each task's result, and the spans in the order they ended."""

    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    spans: list[Span] = dataclasses.field(default_factory=list)

    def busy(self, start: float, end: float) -> dict[str, float]:
        """Per resource, the fraction of ``[start, end]`` during which at least one of its units was busy."""
        return {res: round(covered([(s.start, s.end) for s in self.spans if s.resource == res], start, end)
                           / max(end - start, 1e-9), 4)
                for res in sorted({s.resource for s in self.spans})}


def covered(intervals: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of ``[start, end]`` covered by the union of ``intervals``."""
    total, cur_s, cur_e = 0.0, 0.0, None
    for s, e in sorted((max(s, start), min(e, end)) for s, e in intervals):
        if e <= s:
            continue
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _validate(tasks: Sequence[Task], capacity: Mapping[str, int]) -> None:
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    known = set(names)
    for t in tasks:
        if capacity.get(t.resource, 0) < 1:
            raise ValueError(f"task {t.name} needs {t.resource!r}, which has no unit")
        missing = [a for a in t.after if a not in known]
        if missing:
            raise ValueError(f"task {t.name} waits for unknown tasks {missing}")
    # a cycle would leave tasks that can never be ready: found before anything runs
    done: set[str] = set()
    left = list(tasks)
    while left:
        ready = [t for t in left if all(a in done for a in t.after)]
        if not ready:
            raise ValueError(f"tasks wait on each other: {sorted(t.name for t in left)}")
        done.update(t.name for t in ready)
        left = [t for t in left if t.name not in done]


def run_tasks(tasks: Sequence[Task], capacity: Mapping[str, int], *, check: Callable[[], None] = lambda: None,
              on_start: Callable[[Task], None] | None = None,
              on_end: Callable[[Task, Any], None] | None = None) -> Schedule:
    """Run ``tasks`` on ``capacity`` units per resource (see the module doc); ``on_start`` / ``on_end`` are called
    in the calling thread as each task starts and ends (with its result)."""
    _validate(tasks, capacity)
    order = {t.name: i for i, t in enumerate(tasks)}
    pending = sorted(tasks, key=lambda t: (t.rank, order[t.name]))
    free = dict(capacity)
    done: set[str] = set()
    out = Schedule()
    outer = current_watch()
    killed = threading.Event()

    def task_check() -> None:
        if killed.is_set():
            raise Cancelled("stopped: another task of the pipeline failed")
        if outer.check is not None:
            outer.check()

    def call(task: Task) -> Any:
        with watched(Watch(timeout=outer.timeout, check=task_check, alive=outer.alive)):
            task_check()
            return task.run()

    running: dict[concurrent.futures.Future[Any], tuple[Task, float]] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, sum(capacity.values())),
                                                 thread_name_prefix="task")
    try:
        while pending or running:
            check()
            for task in list(pending):
                if free[task.resource] > 0 and all(a in done for a in task.after):
                    pending.remove(task)
                    free[task.resource] -= 1
                    if on_start is not None:
                        on_start(task)
                    running[pool.submit(contextvars.copy_context().run, call, task)] = (task, time.monotonic())
            finished, _ = concurrent.futures.wait(running, timeout=POLL_SECONDS,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
            for fut in sorted(finished, key=lambda f: order[running[f][0].name]):
                task, started = running.pop(fut)
                free[task.resource] += 1
                out.spans.append(Span(task.name, task.resource, started, time.monotonic()))
                error = fut.exception()
                if error is not None:
                    killed.set()  # a failed task: the others' programs are killed now
                    raise error
                out.results[task.name] = fut.result()
                done.add(task.name)
                if on_end is not None:
                    on_end(task, out.results[task.name])
    except BaseException:
        # a stop request (check): the running tasks end as their own checks decide (an abort kills them, a
        # graceful stop lets them finish); an error of on_start / on_end stops them like a task's
        if not isinstance(sys.exc_info()[1], Cancelled):
            killed.set()
        _drain(running)
        raise
    finally:
        pool.shutdown(wait=True)
    return out


def _drain(running: Mapping[concurrent.futures.Future[Any], tuple[Task, float]]) -> None:
    """Wait for the running tasks (their errors other than stops are logged: the first error is the one raised)."""
    for fut in running:
        try:
            fut.result()
        except Cancelled:
            continue
        except BaseException as e:  # noqa: BLE001 - the error that stopped the pipeline is the one raised
            log.warning("task %s ended with %s while the pipeline stopped", running[fut][0].name, e)
