"""The stages of one job, as small objects, and the loop that runs them.

Where things live: the stage protocol (:class:`Stage`), the run state (:class:`JobContext`), the loop
(:func:`run_stages`) and every stage that works on files only -- inspect, convert, calibrate, quantize,
evaluate, and a variant's prune, distill and teacher-logits -- live here, in ``converters/``.
``bot/job.py`` holds the frozen ``JobSpec``, ``run_job`` and the stages that need the Hub or compose jobs
(fetch, publish, ``variant:<recipe>``); ``converters/`` never imports ``bot/``.

A stage declares its ``name`` (what the jobs table and the progress lines show) and ``run(ctx)``. Stages
whose record says they finished for the same inputs skip themselves: the file stages through their own
functions (:mod:`converters.convert`, ...), the others through :class:`RecordedStage` (``inputs(ctx)`` is
what the record fingerprints). :func:`run_stages` asks the hooks to stop between stages and announces each
stage with a ``start`` event (``data["quiet"]`` for stages the command line does not announce).
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from converters import calibrate as calibrate_mod
from converters import chat, mmproj, pipeline, quants, records, verify
from converters import checkpoint as checkpoint_mod
from converters import convert as convert_mod
from converters import quantize as quantize_mod
from converters.errors import UnsupportedModel
from converters.hooks import END, SKIP, START, Event, Hooks
from converters.report import Report
from converters.toolchain import Toolchain, Watch, watched
from converters.workdir import Ladder, WorkDir

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How a job evaluates its ladder (what builds ``converters.evaluate.EvalOptions``)."""

    text: calibrate_mod.TextFile
    chunks: int | None = None
    name_text: bool = False  # the report names the text and its origin (the bot does; ``convert`` never did)
    require_publishable: bool = False  # a report that is not publishable fails the job (the bot's main ladder)
    require_source_check: bool = True  # a skipped BF16-vs-source comparison makes the report not publishable


@dataclasses.dataclass(frozen=True)
class CheckpointRules:
    """What ``inspect`` accepts (a model that needs remote code never: there is no switch)."""

    check_architecture: bool = False  # refuse architectures the pinned converter does not know, before converting


@dataclasses.dataclass(frozen=True)
class ToolLimits:
    """How long any one program of a job may run: ``seconds_per_gb`` of the source's weights, at least
    ``min_seconds`` (settings ``limits.tool_seconds_per_gb`` and ``limits.tool_min_seconds``)."""

    seconds_per_gb: float = 600.0
    min_seconds: float = 1800.0

    def timeout(self, weight_bytes: int) -> float:
        return max(self.min_seconds, self.seconds_per_gb * weight_bytes / 1e9)


@dataclasses.dataclass
class JobContext:
    """The state of one run, filled in stage by stage (not frozen: it is the run's scratch pad)."""

    workdir: Path
    toolchain: Toolchain | None  # None only for runs without llama.cpp stages (pruning alone)
    hooks: Hooks
    model_name: str
    source_repo: str | None = None
    source_revision: str | None = None
    checkpoint_dir: Path | None = None
    checkpoint: checkpoint_mod.Checkpoint | None = None
    plan: pipeline.Plan | None = None
    reference: records.StageRecord | None = None
    imatrix: records.StageRecord | None = None
    ladder: Ladder | None = None
    report: Report | None = None
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    state: dict[str, Any] = dataclasses.field(default_factory=dict)  # what later stages need (stage -> value)
    limits: ToolLimits = ToolLimits()

    def tool_timeout(self) -> float | None:
        """The cap on any one program's run time: scaled from the checkpoint's size once it is known."""
        return self.limits.timeout(self.checkpoint.weight_bytes) if self.checkpoint is not None else None

    def need_plan(self) -> pipeline.Plan:
        if self.plan is None:
            raise RuntimeError("no plan: the inspect stage must run before the file stages")
        return self.plan


class Stage(Protocol):
    name: str
    quiet: bool

    def run(self, ctx: JobContext) -> None: ...


def run_stages(stages: Sequence[Stage], ctx: JobContext) -> JobContext:
    """Run ``stages`` in order; stop (``hooks.check_cancel()`` raises) between any two of them, and inside a
    running program (its process group is killed: :class:`converters.toolchain.Watch`)."""
    for stage in stages:
        ctx.hooks.check_cancel()
        ctx.hooks.progress(Event(stage.name, START, data={"quiet": stage.quiet}))
        ctx.hooks.check_cancel()
        # every program the stage starts: a timeout scaled from the model, killed on a stop request
        with watched(Watch(timeout=ctx.tool_timeout(), check=ctx.hooks.check_abort, alive=ctx.hooks.alive)):
            stage.run(ctx)
    return ctx


def finished(hooks: Hooks, stage: str, outcome: Any) -> None:
    """The ``end`` or ``skip`` event of a stage that returned a :class:`converters.stages.StageOutcome`."""
    hooks.emit(stage, SKIP if outcome.skipped else END, data={"seconds": outcome.record.seconds})


@dataclasses.dataclass(frozen=True)
class Produced:
    """What :meth:`RecordedStage.produce` wrote: the outputs, the record's extra, seconds (None: wall time)."""

    outputs: list[Path]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float | None = None
    tool_version: str | None = None


class RecordedStage:
    """A stage that skips itself when its record matches :meth:`inputs`; otherwise :meth:`produce` writes its
    outputs and the record is saved. :meth:`use` then takes what later stages need from the record."""

    name = "stage"
    quiet = False

    def inputs(self, ctx: JobContext) -> dict[str, Any]:
        raise NotImplementedError

    def produce(self, ctx: JobContext) -> Produced:
        raise NotImplementedError

    def use(self, ctx: JobContext, rec: records.StageRecord) -> None:
        pass

    def run(self, ctx: JobContext) -> None:
        inputs = self.inputs(ctx)
        rec = records.complete(ctx.workdir, self.name, inputs)
        if rec is not None:
            log.info("%s: already done for these inputs; skipped", self.name)
            ctx.hooks.emit(self.name, SKIP, data={"seconds": rec.seconds})
        else:
            t0 = time.monotonic()
            out = self.produce(ctx)
            rec = records.save(ctx.workdir, self.name, inputs, out.outputs,
                               time.monotonic() - t0 if out.seconds is None else out.seconds, out.tool_version,
                               extra=out.extra)
            ctx.hooks.emit(self.name, END, data={"seconds": rec.seconds})
        self.use(ctx, rec)


# ------------------------------------------------------------------------------------------ the ladder
@dataclasses.dataclass(frozen=True)
class InspectStage:
    """Read and validate the checkpoint, plan the ladder (the pure planner), then prepare the work dir
    (plan.json, leftovers of a killed run removed, disk checked) before anything is written."""

    options: pipeline.LadderOptions
    rules: CheckpointRules = CheckpointRules()
    name: str = "inspect"
    quiet: bool = True

    def run(self, ctx: JobContext) -> None:
        if ctx.checkpoint_dir is None:
            raise RuntimeError("no checkpoint folder: a fetch or prune stage must run first")
        supported = projectors = None
        if self.rules.check_architecture and ctx.toolchain is not None:
            supported = checkpoint_mod.supported_architectures(ctx.toolchain.root)
            projectors = checkpoint_mod.supported_projectors(ctx.toolchain.root)
        ctx.checkpoint = checkpoint_mod.inspect(ctx.checkpoint_dir, supported=supported, projectors=projectors)
        refused = verify.template_refusal(ctx.checkpoint.chat_template, chat.tokenizer_settings(ctx.checkpoint_dir))
        if refused is not None:  # before any program runs: a template that loops or escapes stalls nothing later
            raise UnsupportedModel(refused)
        ctx.plan = pipeline.plan(ctx.checkpoint, ctx.workdir, model_name=ctx.model_name, options=self.options,
                                 source_repo=ctx.source_repo, source_revision=ctx.source_revision)
        pipeline.prepare(ctx.plan)


class _ToolStage:
    """A stage that runs one llama.cpp step through its module's function (which skips itself when its record
    matches), then reports ``end``/``skip`` and keeps the record for the stages after it."""

    name: str
    timeout: float | None

    def run(self, ctx: JobContext) -> None:
        p = ctx.need_plan()
        t0 = time.monotonic()
        out = self.call(ctx, p)
        finished(ctx.hooks, self.name, out)
        ctx.seconds[self.name] = round(time.monotonic() - t0, 3)
        self.keep(ctx, out.record)

    def call(self, ctx: JobContext, p: pipeline.Plan) -> Any:
        raise NotImplementedError

    def keep(self, ctx: JobContext, record: records.StageRecord) -> None:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class ConvertStage(_ToolStage):
    timeout: float | None = None
    name: str = convert_mod.STAGE
    quiet: bool = False

    def call(self, ctx: JobContext, p: pipeline.Plan) -> Any:
        out = convert_mod.convert(p.checkpoint, ctx.workdir, p.model_name, toolchain=ctx.toolchain,
                                  outtype=p.outtype, timeout=self.timeout, hooks=ctx.hooks)
        if p.checkpoint.vision:  # a vision-language model: its projector too, once (converters.mmproj)
            proj = mmproj.convert_projector(p.checkpoint, ctx.workdir, p.model_name, toolchain=ctx.toolchain,
                                            timeout=self.timeout, hooks=ctx.hooks, stage=self.name)
            ctx.state[mmproj.STAGE] = proj.record
            out = dataclasses.replace(out, skipped=out.skipped and proj.skipped)
        return out

    def keep(self, ctx: JobContext, record: records.StageRecord) -> None:
        ctx.reference = record


@dataclasses.dataclass(frozen=True)
class CalibrateStage(_ToolStage):
    timeout: float | None = None
    name: str = calibrate_mod.STAGE
    quiet: bool = False

    def call(self, ctx: JobContext, p: pipeline.Plan) -> Any:
        assert p.calibration is not None and ctx.reference is not None
        opts = calibrate_mod.CalibrateOptions(chunks=p.calibration_chunks, ctx=p.ctx, timeout=self.timeout)
        return calibrate_mod.calibrate(ctx.workdir / ctx.reference.outputs[0].path, ctx.workdir, p.model_name,
                                       p.calibration, toolchain=ctx.toolchain, options=opts, hooks=ctx.hooks)

    def keep(self, ctx: JobContext, record: records.StageRecord) -> None:
        ctx.imatrix = record


@dataclasses.dataclass(frozen=True)
class QuantizeStage:
    """Every type of the ladder (``jobs`` at a time), then ``ladder.json``."""

    timeout: float | None = None
    name: str = "quantize"
    quiet: bool = False

    def run(self, ctx: JobContext) -> None:
        p = ctx.need_plan()
        assert ctx.reference is not None
        t0 = time.monotonic()
        done = self._all(ctx, p)
        ctx.hooks.emit(self.name, END)
        ctx.seconds[self.name] = round(time.monotonic() - t0, 3)
        ctx.ladder = pipeline.ladder_record(p, ctx.toolchain, ctx.reference, ctx.imatrix, done, ctx.seconds,
                                            projector=ctx.state.get(mmproj.STAGE))
        WorkDir(ctx.workdir).write_ladder(ctx.ladder)

    def _all(self, ctx: JobContext, p: pipeline.Plan) -> dict[str, records.StageRecord]:
        reference = ctx.workdir / ctx.reference.outputs[0].path  # type: ignore[union-attr]
        imatrix = ctx.workdir / ctx.imatrix.outputs[0].path if ctx.imatrix is not None else None
        threads = max(1, (os.cpu_count() or 1) // p.jobs)

        def one(q: quants.QuantType, est: int) -> Any:
            opts = quantize_mod.QuantizeOptions(threads=threads, split_max_bytes=p.split_max_bytes,
                                                estimated_bytes=est, timeout=self.timeout)
            return quantize_mod.quantize(reference, ctx.workdir, p.model_name, q, toolchain=ctx.toolchain,
                                         imatrix=imatrix, options=opts, hooks=ctx.hooks)

        done: dict[str, records.StageRecord] = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=p.jobs) as pool:
            futs = {pool.submit(contextvars.copy_context().run, one, q, f.estimated_bytes): q  # keeps the watch
                    for q, f in zip(p.ladder, p.files)}
            try:
                for fut in concurrent.futures.as_completed(futs):
                    q, res = futs[fut], fut.result()
                    done[q.name] = res.record
                    ctx.hooks.step(self.name, len(done), len(p.ladder), q.name, type=q.name, skipped=res.skipped)
            except BaseException:
                for f in futs:
                    f.cancel()
                raise
        return done


def _eval_options(settings: EvalSettings, calibration: calibrate_mod.TextFile | None,
                  **overrides: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"eval_text": settings.text.path,
                            "calibration_text": calibration.path if calibration is not None else None,
                            "chunks": settings.chunks, "require_source_check": settings.require_source_check}
    if settings.name_text:
        opts.update(eval_text_name=settings.text.name, eval_text_source=settings.text.source)
    opts.update(overrides)
    return opts


def evaluate_workdir(ctx: JobContext, options: dict[str, Any]) -> Report:
    """``converters.evaluate.run`` with these options, this run's toolchain and hooks."""
    from converters import evaluate

    return evaluate.run(ctx.workdir, evaluate.EvalOptions(**options), toolchain=ctx.toolchain, hooks=ctx.hooks)


@dataclasses.dataclass(frozen=True)
class EvaluateStage:
    settings: EvalSettings
    calibration: calibrate_mod.TextFile | None = None
    name: str = "evaluate"
    quiet: bool = False

    def run(self, ctx: JobContext) -> None:
        overrides = ctx.state.get("eval_overrides", {})
        ctx.report = evaluate_workdir(ctx, _eval_options(self.settings, self.calibration, **overrides))
        ctx.hooks.emit(self.name, END)
        if self.settings.require_publishable and not ctx.report.publishable:
            from converters.errors import CheckFailed

            why = "; ".join(str(r) for r in ctx.report.reasons or []) or "the evaluation found it not publishable"
            raise CheckFailed("evaluate", f"not published: {why}")


def ladder_stages(options: pipeline.LadderOptions, evaluation: EvalSettings | None, *,
                  rules: CheckpointRules = CheckpointRules()) -> tuple[Stage, ...]:
    """inspect -> convert (and a vision-language model's projector) -> calibrate (with an imatrix) -> quantize ->
    tune (size points in ``options.tune``) -> evaluate (when asked)."""
    stages: list[Stage] = [InspectStage(options, rules), ConvertStage(options.timeout)]
    if options.imatrix:
        stages.append(CalibrateStage(options.timeout))
    stages.append(QuantizeStage(options.timeout))
    if options.tune:
        from converters import tune

        topts = tune.TuneOptions(size_points=tuple(options.tune), ctx=options.ctx, time_budget=options.tune_seconds,
                                 timeout=options.timeout)
        if options.tune_candidates:
            topts = dataclasses.replace(topts, candidates=tuple(options.tune_candidates))
        stages.append(tune.TuneStage(topts))
    if evaluation is not None:
        stages.append(EvaluateStage(evaluation, options.calibration))
    return tuple(stages)

