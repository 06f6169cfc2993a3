"""The ladder's pipeline stage: make and measure the files as tasks on resources, not as two stages in a row.

:class:`PipelineStage` replaces ``QuantizeStage`` -> (``TuneStage``) -> ``EvaluateStage`` when the job evaluates its
ladder (docs/PIPELINE.md has the schedule and what it gives). Its tasks (:mod:`converters.core.schedule`):

- ``open`` (the evaluation's reference work: base logits, the comparison with the source) on the evaluation's
  resource;
- per type, in measuring order (:func:`measure_order`: the publish order, ``LadderOptions.order`` first then ladder
  order, with the curve neighbours of the first publish group moved up right after it): ``make T`` (llama-quantize,
  CPU), then ``measure T`` (llama-perplexity, after ``make T`` and the previous file's measurement: the
  measurements are one chain, so each verdict is the same in every run) on the evaluation's resource: the GPU on a
  CUDA toolchain, else the CPU;
- with ``--tune``: ``tune`` after every ``make`` (converters.ladder.tune, CPU), then ``measure T-tuned``.

Ranks put a file's measurement before the next file is made (``(k, 0)`` make, ``(k, 1)`` measure, ``k`` its place
in the measuring order): on one CPU unit the first file of the publish order is made and measured before anything
else, then its neighbours on the ladder's curve, so it can be published first; with a
GPU, ``make k+1`` runs on the CPU while ``measure k`` runs on the GPU. On a CPU-only box :data:`CPU_UNITS` CPU-heavy
programs run at once, each with ``cores / units`` threads (the benchmark's measurement chose it; see the docs).

What stays as the sequential stages had it: each make skips itself when its record matches (quantize-<TYPE>.json),
the evaluation skips every file it measured already (its per-file records), a stop request is asked between tasks and
while programs run, and ``ladder.json`` / ``report.json`` at the end are the sequential path's. While the stage runs,
``ladder.json`` lists the files made so far (valid at every moment: an incomplete ladder is a smaller ladder), and
each file is measured from its :class:`~converters.core.workdir.LadderFile` handed to the evaluation directly.
``FILE_READY`` hears of each file (converters.ladder.job.FileReady) when its verdict is final: a file's verdict is
judged against the files measured before it, and the first files of a ladder are held until the ladder's curve
around them is measured (``LadderEvaluation.settled``, converters.ladder.evaluate.evaluation), so a file is
announced after the measurement that settles it (its own, or a later one that brackets it), or at the end; never one
whose final verdict is not in report.json.

Progress: ``hooks.step("ladder", done, total, text, file=T, state=S, files={T: S...}, task=..., resource=...,
phase="start"|"end")`` as each task starts and ends (``done`` of ``total`` steps: a make and a measure per file, and
the tuning); states ``waiting``, ``making``, ``made``, ``measuring``, ``measured`` (held: its verdict waits for its
curve neighbours), ``passed``, ``failed``; a held file's verdict, when a later measurement (or the end) settles it,
comes in a step of its own, ``file=T, state=passed|failed, phase="settled"``. The text names what
runs now: ``making Q6_K, measuring Q4_K_M``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from converters.core import proc
from converters.core import names, quants, records
from converters.core.errors import CheckFailed, InputError
from converters.core.hooks import END, SKIP
from converters.core.report import PASSED, FileResult
from converters.core.schedule import CPU, GPU, Schedule, Task, run_tasks
from converters.core.stages import Stage
from converters.core.workdir import Ladder, LadderFile, WorkDir
from converters.ladder import budget, evaluate, layout, pipeline, tune
from converters.ladder import speed as speed_mod
from converters.ladder.context import (DEFAULT_EVAL_CHUNKS, FILE_READY, PROJECTOR, TUNE, EvalSettings, FileReady,
                                       JobContext, eval_options)
from converters.ladder.evaluate import curve
from converters.llama import calibrate as calibrate_mod
from converters.llama import quantize as quantize_mod
from converters.llama import toolchain as tc_mod

log = logging.getLogger(__name__)

STAGE = "ladder"
# CPU-heavy programs at once on a box without a GPU, each with cores/units threads: measured on SmolLM2 on 2 cores
# (docs/PIPELINE.md, "one program or two"): two programs with one thread each beat one with both cores
CPU_UNITS = 2

WAITING, MAKING, MADE, MEASURING, MEASURED, FAILED = "waiting", "making", "made", "measuring", "measured", "failed"


def measure_order(types: Sequence[quants.QuantType], first: int = 1,
                  neighbours: int = curve.DEFAULT_RULES.neighbours) -> tuple[quants.QuantType, ...]:
    """The order the files are made and measured in (pure): ``types`` (the publish order) with, right after its
    ``first`` types (the first publish group), the ``neighbours`` nearest types below and above each of them in
    nominal bits per weight, those not placed before, in publish order. The first group's verdicts wait for the
    ladder's curve around them (verdict.awaits_curve), which these measurements give; the publish order itself
    (what is committed first) does not change."""
    head = list(types[:max(0, first)])
    moved: list[quants.QuantType] = []
    for q in head:
        below = sorted((t for t in types if t.bpw < q.bpw), key=lambda t: -t.bpw)[:neighbours]
        above = sorted((t for t in types if t.bpw > q.bpw), key=lambda t: t.bpw)[:neighbours]
        moved += [t for t in below + above if t not in head and t not in moved]
    moved.sort(key=list(types).index)
    return tuple(head + moved + [t for t in types if t not in head and t not in moved])


@dataclasses.dataclass
class _Progress:
    """Per-file states and the step count, reported through ``hooks.step`` from the scheduler's thread."""

    total: int
    states: dict[str, str]
    done: int = 0
    running: dict[str, str] = dataclasses.field(default_factory=dict)  # task name -> "making Q6_K"

    def text(self) -> str:
        return ", ".join(self.running.values()) or "waiting"


@dataclasses.dataclass(frozen=True)
class PipelineStage:
    """Quantize, (tune) and evaluate the ladder as one schedule of tasks (see the module doc)."""

    settings: EvalSettings
    calibration: calibrate_mod.TextFile | None = None
    order: tuple[str, ...] = ()
    first_group: int = 1  # types of the publish order in the first early commit: their curve neighbours go next
    tune: tune.TuneOptions | None = None
    fit: Stage[JobContext] | None = None  # converters.ladder.job.FitStage: memory-budget files, after the tuning
    cpu_units: int | None = None  # None: CPU_UNITS
    timeout: float | None = None
    name: str = STAGE
    quiet: bool = False
    on_schedule: Callable[[Schedule], None] | None = None  # the benchmark's view of what ran when

    def program_seconds(self, ctx: JobContext) -> float | None:
        """The longest of llama-quantize's limit (one program at a time per unit) and llama-perplexity's."""
        if ctx.checkpoint is None:
            return None
        ctx_len = ctx.plan.ctx if ctx.plan is not None else 512
        chunks = self.settings.chunks or DEFAULT_EVAL_CHUNKS
        return max(ctx.limits.convert(ctx.reference_bytes()) * max(1, self.units(ctx)),
                   ctx.limits.evaluate(chunks * ctx_len, ctx.reference_bytes()))

    def units(self, ctx: JobContext) -> int:
        return max(1, self.cpu_units or CPU_UNITS)

    def on_gpu(self, ctx: JobContext) -> bool:
        return bool(ctx.toolchain is not None and ctx.toolchain.cuda and tc_mod.gpu_visible())

    def run(self, ctx: JobContext) -> None:
        p = ctx.need_plan()
        assert ctx.reference is not None and ctx.toolchain is not None
        t0 = time.monotonic()
        gpu = self.on_gpu(ctx)
        units = self.units(ctx)
        threads = max(1, proc.cpus() // units)
        measure_on = GPU if gpu else CPU
        types = measure_order(pipeline.publish_order(p, self.order), self.first_group)
        points = tune.check_points(self.tune.size_points, [q.name for q in p.ladder]) if self.tune else []
        tuned = [tune.tuned_name(q) for q in points]
        fits = [b.type for b in budget.parse_all(p.fit)] if self.fit is not None else []
        progress = _Progress(total=2 * (len(types) + len(tuned) + len(fits)) + (1 if points else 0) + (1 if fits else 0)
                             + (1 if self.settings.speed is not None else 0),
                             states={**{q.name: WAITING for q in types}, **{t: WAITING for t in tuned + fits}})
        made: dict[str, records.StageRecord] = {}
        lock = threading.Lock()
        wd = WorkDir(ctx.workdir)
        reference = ctx.workdir / ctx.reference.outputs[0].path
        imatrix = ctx.workdir / ctx.imatrix.outputs[0].path if ctx.imatrix is not None else None
        seconds: dict[str, float] = {}

        def ladder_so_far() -> Ladder:
            return pipeline.ladder_record(p, ctx.toolchain, ctx.reference, ctx.imatrix, dict(made),
                                          {**ctx.seconds, "quantize": round(sum(r.seconds for r in made.values()), 3)},
                                          projector=ctx.get(PROJECTOR, None))

        for q in types:  # made by an earlier run for the same inputs: listed (and measurable) from the start
            rec = quantize_mod.finished(reference, ctx.workdir, q, toolchain=ctx.toolchain, imatrix=imatrix,
                                        split_max_bytes=p.split_max_bytes)
            if rec is not None:
                made[q.name] = rec
        wd.write_ladder(ladder_so_far())  # the files made so far: a valid, smaller ladder
        opts = eval_options(self.settings, self.calibration, threads=threads)
        evaluation: list[Any] = []

        def open_eval() -> None:
            # the types ladder.json does not list yet are reported as pending until they are measured
            listed = {f.type for f in ladder_so_far().files}
            expected = [q.name for q in types if q.name not in listed] + tuned + fits
            evaluation.append(evaluate.LadderEvaluation.open(ctx.workdir, evaluate.EvalOptions(**opts),
                                                             toolchain=ctx.toolchain, hooks=ctx.hooks,
                                                             expected=expected))

        def make(q: quants.QuantType, est: int) -> records.StageRecord:
            o = quantize_mod.QuantizeOptions(threads=threads, split_max_bytes=p.split_max_bytes, estimated_bytes=est,
                                             timeout=self.timeout)
            out = quantize_mod.quantize(reference, ctx.workdir, p.model_name, q, toolchain=ctx.toolchain,
                                        imatrix=imatrix, options=o, hooks=ctx.hooks)
            with lock:
                made[q.name] = out.record
                wd.write_ladder(ladder_so_far())
            return out.record

        def measure(name: str) -> FileResult | None:
            lf = _find(ctx.ladder if ctx.ladder is not None else None, name) or _find(ladder_so_far(), name)
            if lf is None:  # a size point tuning did not build
                return None
            return evaluation[0].measure(lf)

        def tune_all() -> None:
            ctx.ladder = ladder_so_far()
            assert self.tune is not None
            TuneStage(self.tune).run(ctx)

        def with_added(base: Ladder) -> Ladder:
            # the tuned and memory-budget files TuneStage and FitStage added to ctx.ladder, after the stock files
            def added(f: LadderFile) -> bool:
                return layout.is_tuned(f.type) or budget.is_fit(f.type)
            if ctx.ladder is None or not any(added(f) for f in ctx.ladder.files):
                return base
            return dataclasses.replace(base, files=base.files + tuple(f for f in ctx.ladder.files if added(f)),
                                       extra={**base.extra, **{k: v for k, v in ctx.ladder.extra.items()
                                                               if k in ("tune", "fit")}},
                                       seconds={**base.seconds, **{k: v for k, v in ctx.ladder.seconds.items()
                                                                   if k == tune.STAGE}})

        def fit_all() -> None:
            assert self.fit is not None
            ctx.ladder = with_added(ladder_so_far())
            self.fit.run(ctx)

        def speed_all() -> None:
            # llama-bench of the files of the speed scope, with nothing else running (see the tasks below)
            assert self.settings.speed is not None
            ctx.ladder = with_added(ladder_so_far())
            speed_mod.SpeedStage(self.settings.speed).run(ctx)

        estimates = {f.type: f.estimated_bytes for f in p.files}
        # the measurements form one chain in measuring order: the evaluation is used by one task at a time, and each
        # file's verdict (judged against the files measured before it, or held until its curve is measured) is the
        # same in every run, resumed or not
        tasks = [Task("open", open_eval, measure_on, rank=(-1,))]
        previous = "open"
        for k, q in enumerate(types):
            tasks.append(Task(f"make {q.name}", lambda q=q: make(q, estimates[q.name]), CPU, rank=(k, 0)))
            tasks.append(Task(f"measure {q.name}", lambda n=q.name: measure(n), measure_on,
                              after=(previous, f"make {q.name}"), rank=(k, 1)))
            previous = f"measure {q.name}"
        if points:
            tasks.append(Task("tune", tune_all, CPU, after=tuple(f"make {q.name}" for q in types), rank=(len(types), 0)))
        if fits:  # after the tuning: it reuses the tuning's measurements when there are some
            tasks.append(Task("fit", fit_all, CPU, rank=(len(types), 0),
                              after=(*(f"make {q.name}" for q in types), *(["tune"] if points else []))))
        if self.settings.speed is not None:
            # after every make, the tuning, the fit files and the stock files' measurements: nothing else competes
            # for the cores while llama-bench runs; the tuned and fit files' measurements wait for it (their gate
            # reads the speed ratios)
            tasks.append(Task("speed", speed_all, CPU, rank=(len(types), 0),
                              after=(*(f"make {q.name}" for q in types), *(["tune"] if points else []),
                                     *(["fit"] if fits else []), previous)))
        for t in tuned + fits:
            tasks.append(Task(f"measure {t}", lambda n=t: measure(n), measure_on,
                              after=(previous, *(["tune"] if points else []), *(["fit"] if fits else []),
                                     *(["speed"] if self.settings.speed is not None else [])),
                              rank=(len(types), 1)))
            previous = f"measure {t}"

        def started(task: Task) -> None:
            verb, _, what = task.name.partition(" ")
            if verb in ("make", "measure"):
                progress.states[what] = MAKING if verb == "make" else MEASURING
                progress.running[task.name] = f"{'making' if verb == 'make' else 'measuring'} {what}"
            elif task.name == "tune":
                progress.running[task.name] = "tuning"
            elif task.name == "speed":
                progress.running[task.name] = "measuring speed"
            elif task.name == "fit":
                progress.running[task.name] = "making the memory-budget files"
            else:
                progress.running[task.name] = "measuring the reference"
            self._step(ctx, progress, what or task.name, task=task.name, resource=task.resource, phase="start")

        def ended(task: Task, result: Any) -> None:
            progress.running.pop(task.name, None)
            verb, _, what = task.name.partition(" ")
            if verb == "make":
                progress.done += 1
                progress.states[what] = MADE
            elif verb == "measure":
                progress.done += 1
                if result is None:
                    progress.states.pop(what, None)
                else:
                    progress.states[what] = MEASURED  # until it is settled (now, or by a later measurement)
                    self._announce_settled(ctx, progress, evaluation[0], current=what)
            elif task.name in ("tune", "fit", "speed"):
                progress.done += 1
            self._step(ctx, progress, what or task.name, task=task.name, resource=task.resource, phase="end")

        try:
            sched = run_tasks(tasks, {CPU: units, **({GPU: 1} if gpu else {})}, check=ctx.hooks.check_cancel,
                              on_start=started, on_end=ended)
        except BaseException:
            if evaluation:  # a stopped job: the base logits go (its measured files are kept in their records)
                evaluation[0].close()
            raise
        if self.on_schedule is not None:
            self.on_schedule(sched)
        seconds["quantize"] = round(sum(r.seconds for r in made.values()), 3)
        ctx.seconds.update(seconds)
        final = with_added(ladder_so_far())
        ctx.ladder = final
        wd.write_ladder(final)
        # report.json lists the files in ladder order, as the sequential evaluation does (measured in publish order)
        place = {f.type: i for i, f in enumerate(final.files)}
        evaluation[0].files.sort(key=lambda f: place.get(f.type, len(place)))
        ctx.report = evaluation[0].finish()
        self._announce_settled(ctx, progress, evaluation[0])  # the files held until the end
        ctx.seconds[self.name] = round(time.monotonic() - t0, 3)
        ctx.hooks.emit(self.name, END, data={"seconds": ctx.seconds[self.name]})
        if self.settings.require_publishable and not ctx.report.publishable:
            why = "; ".join(str(r) for r in ctx.report.reasons or []) or "the evaluation found it not publishable"
            raise CheckFailed("evaluate", f"not published: {why}")

    def _step(self, ctx: JobContext, progress: _Progress, what: str, **data: Any) -> None:
        ctx.hooks.step(self.name, progress.done, progress.total, progress.text(), file=what,
                       state=progress.states.get(what, ""), files=dict(progress.states), **data)

    def _announce_settled(self, ctx: JobContext, progress: _Progress, ev: evaluate.LadderEvaluation,
                          current: str | None = None) -> None:
        """FILE_READY of each file the evaluation settled since the last call (report.json has its final verdict);
        a held file settled now (not ``current``, the file whose task is ending) gets a step of its own,
        ``phase="settled"``."""
        for result in ev.settled():
            if result.type in progress.states:
                progress.states[result.type] = PASSED if result.status == PASSED else FAILED
            self._announce(ctx, result)
            if result.type != current:
                self._step(ctx, progress, result.type, phase="settled")

    def _announce(self, ctx: JobContext, result: FileResult) -> None:
        """FILE_READY of one measured file (the parts and hashes the evaluation measured)."""
        ready = ctx.get(FILE_READY, None)
        if ready is None:
            return
        parts = [part for part in result.parts if part.get("path")]
        ready(FileReady(type=result.type, paths=tuple(part["path"] for part in parts),
                        sha256=tuple(part["sha256"] for part in parts), passed=result.status == PASSED))


def _find(ladder: Ladder | None, name: str) -> LadderFile | None:
    if ladder is None:
        return None
    return next((f for f in ladder.files if f.type == name), None)


# ------------------------------------------------------------------------------------------ tuning (converters.ladder.tune)
def _tuned_entry(q: quants.QuantType, rec_out: records.Output, lay: layout.Layout, parameters: int | None,
                 seconds: float | None, layout_rel: str, published_layout: str) -> LadderFile:
    return LadderFile(
        type=tune.tuned_name(q), bpw_nominal=q.bpw, needs_imatrix=q.needs_imatrix,
        description=f"{q.name} size, types chosen per tensor from measured damage; published only where it "
                    f"measures better than {q.name}.",
        path=rec_out.path, parts=(rec_out.path,), size=rec_out.size, sha256=rec_out.sha256,
        part_sha256=(rec_out.sha256,), bpw=round(rec_out.size * 8 / parameters, 3) if parameters else None,
        seconds=seconds, companions=(published_layout,),
        extra={"tuned": {"stock": q.name, "layout": layout_rel, "budget": lay.budget,
                         "predicted_kld": lay.damage, "stock_predicted_kld": lay.stock_damage,
                         "types": lay.type_counts()}})


@dataclasses.dataclass(frozen=True)
class TuneStage:
    """After quantize: one ``<TYPE>-tuned`` file per size point of ``options.size_points`` (see the module doc),
    appended to ``ladder.json`` so that the evaluation measures it like every file."""

    options: tune.TuneOptions
    name: str = tune.STAGE
    quiet: bool = False

    def inputs(self, ctx: JobContext, points: Sequence[quants.QuantType]) -> dict[str, Any]:
        p = ctx.need_plan()
        o = self.options
        return {
            "reference": ctx.reference.outputs[0].sha256,
            "imatrix": ctx.imatrix.outputs[0].sha256 if ctx.imatrix is not None else None,
            "calibration": p.calibration.sha256 if p.calibration else None,
            "stock": {q.name: ctx.ladder.file(q.name).sha256 for q in points},
            "candidates": list(o.candidates), "probe_chunks": o.probe_chunks, "ctx": o.ctx,
            "toolchain": ctx.toolchain.version, "method": tune.METHOD, "exclude": list(o.exclude), "steps": o.steps,
            "confirm": o.confirm, "rows": o.rows,
        }

    def run(self, ctx: JobContext) -> None:
        p = ctx.need_plan()
        if ctx.ladder is None or ctx.reference is None:
            raise RuntimeError("tune runs after quantize")
        points = tune.check_points(self.options.size_points, ctx.ladder.types)
        if not points:
            return
        if p.calibration is None:
            raise InputError("tuning needs the calibration text (its probes are measured on it)")
        inputs = self.inputs(ctx, points)
        t0 = time.monotonic()
        rec = records.complete(ctx.workdir, self.name, inputs)
        if rec is not None:
            log.info("tune: already done for these inputs; skipped")
            ctx.hooks.emit(self.name, SKIP, data={"seconds": rec.seconds})
        else:
            rec = self._produce(ctx, p, points, inputs)
            ctx.hooks.emit(self.name, END, data={"seconds": rec.seconds})
        ctx.seconds[self.name] = round(time.monotonic() - t0, 3)
        by_path = {o.path: o for o in rec.outputs}
        added = []
        for q in points:
            info = rec.extra.get("points", {}).get(q.name, {})
            if info.get("status") != "built" or info.get("file") not in by_path:
                continue
            plan = (ctx.workdir / info["layout"]).read_text()
            lay = layout.Layout.from_json(json.loads(plan))
            beside = names.tuned_layout(p.model_name, q.name)  # published with the file when it passes
            if not (ctx.workdir / beside).is_file() or (ctx.workdir / beside).read_text() != plan:
                with records.atomic_output(ctx.workdir / beside) as tmp:
                    tmp.write_text(plan)
            added.append(_tuned_entry(q, by_path[info["file"]], lay, p.checkpoint.parameters, info.get("seconds"),
                                      info["layout"], beside))
        kept = tuple(f for f in ctx.ladder.files if not layout.is_tuned(f.type))
        extra = {**ctx.ladder.extra, "tune": rec.extra}
        ctx.ladder = dataclasses.replace(ctx.ladder, files=kept + tuple(added), extra=extra,
                                         seconds={**ctx.ladder.seconds, self.name: ctx.seconds[self.name]})
        WorkDir(ctx.workdir).write_ladder(ctx.ladder)
        ctx.put(TUNE, rec.extra)

    def _produce(self, ctx: JobContext, p: pipeline.Plan, points: Sequence[quants.QuantType], inputs: dict[str, Any]) -> records.StageRecord:
        wd: Path = ctx.workdir
        o = dataclasses.replace(self.options, ctx=self.options.ctx or p.ctx,
                                timeout=self.options.timeout or ctx.tool_timeout())
        t0 = time.monotonic()
        inp = tune.Inputs(wd, wd / ctx.reference.outputs[0].path,
                          wd / ctx.imatrix.outputs[0].path if ctx.imatrix is not None else None, p.calibration.path,
                          p.model_name, {f.type: wd / f.path for f in ctx.ladder.files
                                         if not f.split and not layout.is_tuned(f.type)}, ctx.toolchain)
        outputs, summary = tune.run_points(inp, points, o, step=lambda text, done, total: ctx.hooks.step(
            self.name, done, total, text))
        return records.save(wd, self.name, inputs, outputs, time.monotonic() - t0, ctx.toolchain.version,
                            extra=summary)
