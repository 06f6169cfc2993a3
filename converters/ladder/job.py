"""The ladder's stages and the loop that runs them.

Where things live: the stage protocol (``Stage``), typed stage state (``StateKey``), the one skip rule
(``RecordedStage``: the stage record) and the bare loop are in :mod:`converters.core.stages`; the run state
(``JobContext``), the program limits (``ToolLimits``) and the ladder's state keys (``FILE_READY``...) in
:mod:`converters.ladder.context` (re-exported here). Here: the loop with each stage's program limits
(:func:`run_stages`) and the ladder's stages -- inspect, convert, calibrate, quantize, evaluate; tune and the
pipeline stage that makes and measures the files as tasks (``ladder``) are in :mod:`converters.ladder.flow`. A
variant's stages (prune, distill, teacher logits) are in ``converters/variants/recipes.py``, a metadata patch's in
``converters/patch/metapatch.py``; ``bot/jobs/job.py`` holds the frozen ``JobSpec``, ``run_job`` and the stages that
need the Hub or compose jobs (fetch, publish, ``variant:<recipe>``); ``converters/`` never imports ``bot/``.

A stage declares its ``name`` (what the jobs table and the progress lines show) and ``run(ctx)``. Stages
whose record says they finished for the same inputs skip themselves: the llama.cpp steps through their own
functions (:mod:`converters.llama.convert`, ...), the others through ``RecordedStage`` (``inputs(ctx)`` is
what the record fingerprints). :func:`run_stages` announces the stage list, asks the hooks to stop between
stages and announces each stage with a ``start`` event (``data["quiet"]`` for stages the command line does not
announce).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from converters.core import proc
from converters.core import quants, records
from converters.core import stages as core_stages
from converters.core.errors import CheckFailed, UnsupportedModel
from converters.core.hooks import END, SKIP
from converters.core.proc import Watch, watched
from converters.core.report import Report
from converters.core.stages import Stage, StageOutcome, finished
from converters.core.workdir import WorkDir
from converters.formats import chat
from converters.formats import checkpoint as checkpoint_mod
from converters.ladder import evaluate, fit, pipeline, tune
from converters.ladder.context import (DEFAULT_EVAL_CHUNKS, EVAL_OVERRIDES, FILE_READY, PROJECTOR, TUNE,
                                       EvalSettings, FileReady, JobContext, ToolLimits, eval_options)
from converters.ladder.flow import PipelineStage, TuneStage
from converters.ladder import speed as speed_mod
from converters.llama import calibrate as calibrate_mod
from converters.llama import convert as convert_mod
from converters.llama import mmproj
from converters.llama import quantize as quantize_mod
from converters.llama import verify

log = logging.getLogger(__name__)

# the run state and the state keys live in converters.ladder.context; these names are this module's API too
__all__ = ["DEFAULT_EVAL_CHUNKS", "EVAL_OVERRIDES", "FILE_READY", "PROJECTOR", "TUNE", "CheckpointRules",
           "EvalSettings", "FileReady", "JobContext", "PipelineStage", "ToolLimits", "TuneStage", "FitStage", "eval_options",
           "ladder_stages", "run_stages", "stage_timeout"]


@dataclasses.dataclass(frozen=True)
class CheckpointRules:
    """What ``inspect`` accepts (a model that needs remote code never: there is no switch)."""

    check_architecture: bool = False  # refuse architectures the pinned converter does not know, before converting


def stage_timeout(stage: Stage[JobContext], ctx: JobContext) -> float | None:
    """The cap on any one program ``stage`` starts: its ``program_seconds(ctx)`` when it has one (None: before the
    checkpoint is known, no cap but each program's own)."""
    sized = getattr(stage, "program_seconds", None)
    if callable(sized):
        return sized(ctx)
    if ctx.checkpoint is None:
        return None
    # a stage that does not size its programs (tune, a variant's teacher logits...): the converter's limit, or
    # llama-perplexity's over the default evaluation on the reference, whichever is longer
    ctx_len = ctx.plan.ctx if ctx.plan is not None else 512
    return max(ctx.limits.timeout(ctx.checkpoint.weight_bytes),
               ctx.limits.evaluate(DEFAULT_EVAL_CHUNKS * ctx_len, ctx.reference_bytes()))


def run_stages(stages: Sequence[Stage[JobContext]], ctx: JobContext) -> JobContext:
    """Run ``stages`` in order (:func:`converters.core.stages.run_stages`: the stage list announced, a stop between
    any two of them) and inside a running program (its process group is killed:
    :class:`converters.core.proc.Watch`)."""

    @contextlib.contextmanager
    def limits(stage: Stage[JobContext]) -> Iterator[None]:
        # every program the stage starts: a limit sized from its work, killed on a stop request, and every line it
        # prints a sign of life (the stuck-job detection); generations sized per run (converters.llama.verify)
        with watched(Watch(timeout=stage_timeout(stage, ctx), check=ctx.hooks.check_abort, alive=ctx.hooks.alive)), \
                verify.limited(ctx.limits.generation()):
            yield

    core_stages.run_stages(stages, ctx, guard=limits)
    return ctx


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
        tok_cfg = chat.tokenizer_settings(ctx.checkpoint_dir)
        # every template the converter or a runtime may pick, before any program runs: one that loops or escapes
        # stalls nothing later (the converter may prefer another file than transformers does)
        refused = verify.templates_refusal(chat.template_candidates(ctx.checkpoint_dir, tok_cfg), tok_cfg)
        if refused is not None:
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

    def call(self, ctx: JobContext, p: pipeline.Plan) -> StageOutcome:
        raise NotImplementedError

    def keep(self, ctx: JobContext, record: records.StageRecord) -> None:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class ConvertStage(_ToolStage):
    timeout: float | None = None
    name: str = convert_mod.STAGE
    quiet: bool = False

    def program_seconds(self, ctx: JobContext) -> float | None:
        return ctx.limits.convert(ctx.checkpoint.weight_bytes) if ctx.checkpoint is not None else None

    def call(self, ctx: JobContext, p: pipeline.Plan) -> StageOutcome:
        out = convert_mod.convert(p.checkpoint, ctx.workdir, p.model_name, toolchain=ctx.toolchain,
                                  outtype=p.outtype, timeout=self.timeout, hooks=ctx.hooks)
        # what went into the file is what every later program loads: its templates through the sandbox first
        sandbox_templates(ctx.workdir, ctx.workdir / out.record.outputs[0].path)
        if p.checkpoint.vision:  # a vision-language model: its projector too, once (converters.llama.mmproj)
            proj = mmproj.convert_projector(p.checkpoint, ctx.workdir, p.model_name, toolchain=ctx.toolchain,
                                            timeout=self.timeout, hooks=ctx.hooks, stage=self.name)
            ctx.put(PROJECTOR, proj.record)
            out = dataclasses.replace(out, skipped=out.skipped and proj.skipped)
        return out

    def keep(self, ctx: JobContext, record: records.StageRecord) -> None:
        ctx.reference = record


@dataclasses.dataclass(frozen=True)
class CalibrateStage(_ToolStage):
    timeout: float | None = None
    name: str = calibrate_mod.STAGE
    quiet: bool = False

    def program_seconds(self, ctx: JobContext) -> float | None:
        p = ctx.need_plan()
        if p.calibration_chunks is not None:
            tokens = p.calibration_chunks * p.ctx
        else:  # all of the text: at most a token per two bytes
            tokens = p.calibration.bytes // 2 if p.calibration is not None else 0
        return ctx.limits.evaluate(tokens, ctx.reference_bytes())

    def call(self, ctx: JobContext, p: pipeline.Plan) -> StageOutcome:
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

    def program_seconds(self, ctx: JobContext) -> float | None:
        # ``jobs`` programs share the cores: each may take that many times longer
        return ctx.limits.convert(ctx.reference_bytes()) * max(1, ctx.need_plan().jobs)

    def run(self, ctx: JobContext) -> None:
        p = ctx.need_plan()
        assert ctx.reference is not None
        t0 = time.monotonic()
        done = self._all(ctx, p)
        ctx.hooks.emit(self.name, END)
        ctx.seconds[self.name] = round(time.monotonic() - t0, 3)
        ctx.ladder = pipeline.ladder_record(p, ctx.toolchain, ctx.reference, ctx.imatrix, done, ctx.seconds,
                                            projector=ctx.get(PROJECTOR, None))
        WorkDir(ctx.workdir).write_ladder(ctx.ladder)

    def _all(self, ctx: JobContext, p: pipeline.Plan) -> dict[str, records.StageRecord]:
        reference = ctx.workdir / ctx.reference.outputs[0].path  # type: ignore[union-attr]
        imatrix = ctx.workdir / ctx.imatrix.outputs[0].path if ctx.imatrix is not None else None
        threads = max(1, proc.cpus() // p.jobs)

        def one(q: quants.QuantType, est: int) -> StageOutcome:
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


def evaluate_workdir(ctx: JobContext, options: dict[str, Any]) -> Report:
    """``converters.ladder.evaluate.run`` with these options, this run's toolchain and hooks."""
    return evaluate.run(ctx.workdir, evaluate.EvalOptions(**options), toolchain=ctx.toolchain, hooks=ctx.hooks)


@dataclasses.dataclass(frozen=True)
class EvaluateStage:
    settings: EvalSettings
    calibration: calibrate_mod.TextFile | None = None
    name: str = "evaluate"
    quiet: bool = False

    def program_seconds(self, ctx: JobContext) -> float | None:
        """llama-perplexity over the evaluation chunks on the reference, the largest model it loads."""
        opts = eval_options(self.settings, self.calibration, **ctx.get(EVAL_OVERRIDES, {}))
        ctx_len = int(opts.get("ctx") or (ctx.plan.ctx if ctx.plan is not None else 512))
        chunks = int(opts.get("chunks") or self.settings.chunks or DEFAULT_EVAL_CHUNKS)
        return ctx.limits.evaluate(chunks * ctx_len, ctx.reference_bytes())

    def run(self, ctx: JobContext) -> None:
        overrides = ctx.get(EVAL_OVERRIDES, {})
        ctx.report = evaluate_workdir(ctx, eval_options(self.settings, self.calibration, **overrides))
        ctx.hooks.emit(self.name, END)
        if self.settings.require_publishable and not ctx.report.publishable:
            why = "; ".join(str(r) for r in ctx.report.reasons or []) or "the evaluation found it not publishable"
            raise CheckFailed("evaluate", f"not published: {why}")


@dataclasses.dataclass(frozen=True)
class FitStage:
    """After quantize and tune: one memory-budget file per budget of ``options.budgets`` (converters.ladder.fit),
    appended to ``ladder.json`` so that the evaluation measures and gates it like every file."""

    options: fit.FitOptions
    name: str = fit.STAGE
    quiet: bool = False

    def run(self, ctx: JobContext) -> None:
        p = ctx.need_plan()
        if ctx.ladder is None or ctx.reference is None:
            raise RuntimeError("fit runs after quantize")
        t0 = time.monotonic()
        # the errors come from the tuner's measurer, so pairs the tune stage measured are read from its cache
        inp = fit.FitInputs(ctx.workdir, ctx.ladder, ctx.workdir / ctx.reference.outputs[0].path,
                            ctx.workdir / ctx.imatrix.outputs[0].path if ctx.imatrix is not None else None,
                            p.calibration.path if p.calibration else None, ctx.toolchain, None,
                            lambda text, done, total: ctx.hooks.step(self.name, done, total, text))
        opts = dataclasses.replace(self.options, ctx=self.options.ctx or p.ctx,
                                   timeout=self.options.timeout or ctx.tool_timeout())
        ctx.ladder, rec, skipped = fit.run(inp, opts)
        ctx.hooks.emit(self.name, SKIP if skipped else END, data={"seconds": rec.seconds})
        ctx.seconds[self.name] = round(time.monotonic() - t0, 3)
        WorkDir(ctx.workdir).write_ladder(ctx.ladder)


TEMPLATES_RECORD = "templates"  # the record of a reference whose chat templates passed the sandbox


def sandbox_templates(workdir: Path, gguf: Path) -> None:
    """Every chat template ``gguf`` carries (``tokenizer.chat_template*``: what llama.cpp renders when it loads a
    model for chat) rendered in the sandbox; raise :class:`~converters.core.errors.UnsupportedModel` naming the one
    that hits a limit or leaves the sandbox. Recorded (``records/templates.json``, keyed by the templates'
    sha256), so a resumed job does not render them again; quants carry the same keys (the evaluation's metadata
    check) and ``converters.llama.verify.generate`` checks any other file before it is loaded."""
    digests = verify.template_digests(gguf)
    inputs = {"templates": digests}
    if records.complete(workdir, TEMPLATES_RECORD, inputs) is not None:
        verify.passed_templates(digests)
        return
    t0 = time.monotonic()
    verify.require_sandboxed_templates(gguf)
    records.save(workdir, TEMPLATES_RECORD, inputs, [], time.monotonic() - t0, None, extra={"file": gguf.name})


def ladder_stages(options: pipeline.LadderOptions, evaluation: EvalSettings | None, *,
                  rules: CheckpointRules = CheckpointRules()) -> tuple[Stage[JobContext], ...]:
    """inspect -> convert (and a vision-language model's projector) -> calibrate (with an imatrix) -> then either the
    pipeline stage ``ladder`` (an evaluated ladder: make, tune and measure the files as tasks,
    :mod:`converters.ladder.flow`) or, with ``options.pipeline`` off or no evaluation, the sequence quantize ->
    tune (size points in ``options.tune``) -> fit (memory budgets in ``options.fit``) -> speed -> evaluate (when
    asked)."""
    stages: list[Stage[JobContext]] = [InspectStage(options, rules), ConvertStage(options.timeout)]
    if options.imatrix:
        stages.append(CalibrateStage(options.timeout))
    topts = None
    points = tune.point_names(options.tune, options.ladder) if options.tune else ()
    if points:
        topts = tune.TuneOptions(size_points=points, ctx=options.ctx, time_budget=options.tune_seconds,
                                 timeout=options.timeout)
        if options.tune_candidates:
            topts = dataclasses.replace(topts, candidates=tuple(options.tune_candidates))
        if options.tune_exclude or not options.tune_confirm:
            topts = dataclasses.replace(topts, exclude=tuple(options.tune_exclude), confirm=options.tune_confirm)
    fit_stage = None
    if options.fit:
        fopts = fit.FitOptions(budgets=tuple(options.fit), kv_type=options.fit_kv_type, ctx=options.ctx,
                               timeout=options.timeout)
        if options.tune_candidates:  # the same measured types as tuning
            fopts = dataclasses.replace(fopts, candidates=tuple(options.tune_candidates))
        fit_stage = FitStage(fopts)
    if evaluation is not None and options.pipeline:
        stages.append(PipelineStage(evaluation, options.calibration, order=tuple(options.order),
                                    first_group=options.first_group, tune=topts,
                                    fit=fit_stage, cpu_units=options.cpu_units, timeout=options.timeout))
        return tuple(stages)
    stages.append(QuantizeStage(options.timeout))
    if topts is not None:
        stages.append(TuneStage(topts))
    if fit_stage is not None:
        stages.append(fit_stage)
    if evaluation is not None and evaluation.speed is not None:  # "off" removes an earlier speed.json
        stages.append(speed_mod.SpeedStage(evaluation.speed))
    if evaluation is not None:
        stages.append(EvaluateStage(evaluation, options.calibration))
    return tuple(stages)
