"""The ladder's stages and the run state of a job.

Where things live: the stage protocol (``Stage``), typed stage state (``StateKey``), the one skip rule
(``RecordedStage``: the stage record) and the bare loop are in :mod:`converters.core.stages`. Here: the run state
(:class:`JobContext`), the loop with each stage's program limits (:func:`run_stages`) and the ladder's stages --
inspect, convert, calibrate, quantize, tune, evaluate. A variant's stages (prune, distill, teacher logits) are in
``converters/variants/recipes.py``, a metadata patch's in ``converters/patch/metapatch.py``; ``bot/jobs/job.py``
holds the frozen ``JobSpec``, ``run_job`` and the stages that need the Hub or compose jobs (fetch, publish,
``variant:<recipe>``); ``converters/`` never imports ``bot/``.

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
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from converters.llama import calibrate as calibrate_mod
from converters.formats import chat
from converters.llama import mmproj
from converters.ladder import pipeline
from converters.core import quants
from converters.core import records
from converters.llama import verify
from converters.formats import checkpoint as checkpoint_mod
from converters.llama import convert as convert_mod
from converters.llama import quantize as quantize_mod
from converters.core import names
from converters.core import stages as core_stages
from converters.core.errors import CheckFailed, InputError, UnsupportedModel
from converters.core.hooks import END, SKIP, Hooks
from converters.core.report import Report
from converters.core.stages import Stage, StageOutcome, StageState, StateKey, finished
from converters.ladder import evaluate, fit, layout, tune
from converters.core.proc import Watch, current_watch, watched
from converters.llama.toolchain import Toolchain
from converters.core.workdir import Ladder, LadderFile, WorkDir

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How a job evaluates its ladder (what builds ``converters.ladder.evaluate.EvalOptions``)."""

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
    """How long one program of a job may run, from the work it does (settings ``[limits] tool_*``), every one
    ``min_seconds`` plus:

    - the converter, llama-quantize, llama-gguf-split: ``seconds_per_gb`` per GB of the file they read;
    - llama-imatrix, llama-perplexity: ``load_seconds_per_gb`` per GB of the model, plus
      ``eval_seconds_per_token_gb`` per token of text (chunks x ctx) per GB of the model;
    - llama-completion: the same load, plus ``generate_seconds_per_token_gb`` per generated token per GB of the
      model, and ``eval_seconds_per_token_gb`` per prompt token;
    - llama-tokenize (vocabulary only): ``min_seconds``.

    Per token, a model counts as at least 1 GB (``converters.llama.verify.MIN_TOKEN_GB``): below that the program's own
    per-token overhead rules. Measured on SmolLM2-135M's BF16 file on a 2-core box loaded 3 times over: 0.92 s per
    generated token, 0.046 s per evaluated token (8 chunks of 512 in 190 s); the defaults allow 3 to 6 times that
    (a 64-token generation gets about 6 minutes, not the 30 of the old one-size limit). A program that prints
    nothing for ``schedule.stuck_after_seconds`` is caught by the stuck-job detection before that anyway."""

    seconds_per_gb: float = 600.0
    min_seconds: float = 120.0
    load_seconds_per_gb: float = 30.0
    eval_seconds_per_token_gb: float = 0.25
    generate_seconds_per_token_gb: float = 3.0

    @classmethod
    def from_settings(cls, limits: Any) -> "ToolLimits":
        """From the settings' ``[limits]`` section (``bot.model.settings.Limits``)."""
        return cls(seconds_per_gb=limits.tool_seconds_per_gb, min_seconds=limits.tool_min_seconds,
                   load_seconds_per_gb=limits.tool_load_seconds_per_gb,
                   eval_seconds_per_token_gb=limits.tool_eval_seconds_per_token_gb,
                   generate_seconds_per_token_gb=limits.tool_generate_seconds_per_token_gb)

    def convert(self, read_bytes: int) -> float:
        """The converter, llama-quantize or llama-gguf-split reading ``read_bytes``."""
        return self.min_seconds + self.seconds_per_gb * max(0, read_bytes) / 1e9

    def evaluate(self, tokens: int, model_bytes: int) -> float:
        """llama-imatrix or llama-perplexity over ``tokens`` of text with a model of ``model_bytes``."""
        gb = max(0, model_bytes) / 1e9
        return (self.min_seconds + gb * self.load_seconds_per_gb
                + max(gb, verify.MIN_TOKEN_GB) * max(0, tokens) * self.eval_seconds_per_token_gb)

    def generation(self) -> verify.ProgramLimit:
        """What llama-completion and llama-tokenize get (``converters.llama.verify`` sizes each run with it)."""
        return verify.ProgramLimit(floor=self.min_seconds, load_seconds_per_gb=self.load_seconds_per_gb,
                                   seconds_per_token_gb=self.generate_seconds_per_token_gb,
                                   prompt_seconds_per_token_gb=self.eval_seconds_per_token_gb)

    def timeout(self, weight_bytes: int) -> float:
        """A program of unknown work on a model of ``weight_bytes`` (a stage that does not size its programs)."""
        return self.convert(weight_bytes)


DEFAULT_EVAL_CHUNKS = 64  # converters.ladder.evaluate's default when no chunk count is given


@dataclasses.dataclass
class JobContext(StageState):
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
    limits: ToolLimits = ToolLimits()
    # what later stages need: ``ctx.get(KEY)`` / ``ctx.put(KEY, value)`` with the StateKeys below (StageState)

    def tool_timeout(self) -> float | None:
        """The cap on any one program of the running stage (its :class:`~converters.core.proc.Watch`'s, set by
        :func:`run_stages` from the stage's work); outside a stage, the one of a program of unknown work."""
        watch = current_watch().timeout
        if watch is not None:
            return watch
        return self.limits.timeout(self.checkpoint.weight_bytes) if self.checkpoint is not None else None

    def reference_bytes(self) -> int:
        """Size of the BF16 reference once converted (else of the source's weights)."""
        if self.reference is not None and self.reference.outputs:
            return int(self.reference.outputs[0].size)
        return self.checkpoint.weight_bytes if self.checkpoint is not None else 0

    def need_plan(self) -> pipeline.Plan:
        if self.plan is None:
            raise RuntimeError("no plan: the inspect stage must run before the file stages")
        return self.plan


# What the ladder's stages hand to later ones (converters.core.stages.StateKey), beside their writers
PROJECTOR: StateKey[records.StageRecord] = StateKey("projector")  # ConvertStage -> QuantizeStage (ladder.json)
EVAL_OVERRIDES: StateKey[dict[str, Any]] = StateKey("eval_overrides")  # a variant's teacher logits -> EvaluateStage
TUNE: StateKey[dict[str, Any]] = StateKey("tune")  # TuneStage's summary (its record's extra)


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
        threads = max(1, (os.cpu_count() or 1) // p.jobs)

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
        opts = _eval_options(self.settings, self.calibration, **ctx.get(EVAL_OVERRIDES, {}))
        ctx_len = int(opts.get("ctx") or (ctx.plan.ctx if ctx.plan is not None else 512))
        chunks = int(opts.get("chunks") or self.settings.chunks or DEFAULT_EVAL_CHUNKS)
        return ctx.limits.evaluate(chunks * ctx_len, ctx.reference_bytes())

    def run(self, ctx: JobContext) -> None:
        overrides = ctx.get(EVAL_OVERRIDES, {})
        ctx.report = evaluate_workdir(ctx, _eval_options(self.settings, self.calibration, **overrides))
        ctx.hooks.emit(self.name, END)
        if self.settings.require_publishable and not ctx.report.publishable:
            why = "; ".join(str(r) for r in ctx.report.reasons or []) or "the evaluation found it not publishable"
            raise CheckFailed("evaluate", f"not published: {why}")


# ------------------------------------------------------------------------------------------ tuning (converters.ladder.tune)
def _tuned_entry(q: quants.QuantType, rec_out: records.Output, lay: layout.Layout, parameters: int | None,
                 seconds: float | None, layout_rel: str) -> LadderFile:
    return LadderFile(
        type=tune.tuned_name(q), bpw_nominal=q.bpw, needs_imatrix=q.needs_imatrix,
        description=f"{q.name} size, types chosen per tensor from measured damage; published only where it "
                    f"measures better than {q.name}.",
        path=rec_out.path, parts=(rec_out.path,), size=rec_out.size, sha256=rec_out.sha256,
        part_sha256=(rec_out.sha256,), bpw=round(rec_out.size * 8 / parameters, 3) if parameters else None,
        seconds=seconds,
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
            "toolchain": ctx.toolchain.version, "method": 1,
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
            lay = layout.Layout.from_json(json.loads((ctx.workdir / info["layout"]).read_text()))
            added.append(_tuned_entry(q, by_path[info["file"]], lay, p.checkpoint.parameters, info.get("seconds"),
                                      info["layout"]))
        kept = tuple(f for f in ctx.ladder.files if not layout.is_tuned(f.type))
        extra = {**ctx.ladder.extra, "tune": rec.extra}
        ctx.ladder = dataclasses.replace(ctx.ladder, files=kept + tuple(added), extra=extra,
                                         seconds={**ctx.ladder.seconds, self.name: ctx.seconds[self.name]})
        WorkDir(ctx.workdir).write_ladder(ctx.ladder)
        ctx.put(TUNE, rec.extra)

    def _produce(self, ctx: JobContext, p: pipeline.Plan, points: Sequence[quants.QuantType], inputs: dict[str, Any]) -> records.StageRecord:
        wd: Path = ctx.workdir
        # the stock files' own types are always measured: the stock layout is then one of the solver's choices
        stock_types = sorted({t for q in points if not ctx.ladder.file(q.name).split
                              for t in tune.read_types(wd / ctx.ladder.file(q.name).path).values()
                              if t in layout.QUANT_SIZES and t not in ("F32", *layout.UNQUANTIZED)})
        candidates = tuple(self.options.candidates) + tuple(t for t in stock_types if t not in self.options.candidates)
        o = dataclasses.replace(self.options, ctx=self.options.ctx or p.ctx, timeout=self.options.timeout
                                or ctx.tool_timeout(), candidates=candidates)
        clock = tune.Clock(o.time_budget)
        reference = wd / ctx.reference.outputs[0].path
        imatrix = wd / ctx.imatrix.outputs[0].path if ctx.imatrix is not None else None
        summary: dict[str, Any] = {"points": {}, "seconds": {}}
        outputs: list[Path] = []

        def step(text: str, done: int, total: int) -> None:
            ctx.hooks.step(self.name, done, total, text)

        try:
            m = tune.measure(reference, wd, toolchain=ctx.toolchain, imatrix=imatrix, calibration=p.calibration.path,
                        options=o, clock=clock, step=step)
            tune.save_measurements(wd, m)
            summary["scales"] = m.scales
            summary["probes"] = m.probes
            summary["seconds"]["measure"] = round(clock.elapsed, 3)
        except tune.TuneStopped as e:
            summary["stopped"] = str(e)
            for q in points:
                summary["points"][q.name] = {"status": "stopped", "reason": str(e)}
            m = None
        finally:
            shutil.rmtree(wd / names.TUNE_DIR / "scratch", ignore_errors=True)
        for q in points if m is not None else ():
            t1 = time.monotonic()
            try:
                clock.check(f"tuning {q.name}")
                stock = ctx.ladder.file(q.name)
                if stock.split:
                    raise InputError(f"{q.name} is split into parts; tuning of split files is not supported")
                lay = tune.plan_point(m, q, wd / stock.path)
                rel = tune.save_layout(wd, q, lay).relative_to(wd).as_posix()
                out = tune.build(lay, q, reference, wd, wd / tune.file_name(p.model_name, q), toolchain=ctx.toolchain,
                            imatrix=imatrix, threads=o.threads, timeout=o.timeout)
                outputs.append(out)
                summary["points"][q.name] = {"status": "built", "file": out.relative_to(wd).as_posix(),
                                             "layout": rel, "bytes": out.stat().st_size, "budget": lay.budget,
                                             "predicted_kld": lay.damage, "stock_predicted_kld": lay.stock_damage,
                                             "optimal": lay.optimal, "seconds": round(time.monotonic() - t1, 3)}
                log.info("tune %s: %s", q.name, lay.describe().replace("\n", ";"))
            except (tune.TuneStopped, InputError, CheckFailed, layout.Infeasible) as e:
                summary["points"][q.name] = {"status": "not built", "reason": str(e)}
                log.warning("tune %s: not built: %s", q.name, e)
        summary["seconds"]["total"] = round(clock.elapsed, 3)
        return records.save(wd, self.name, inputs, outputs, clock.elapsed, ctx.toolchain.version, extra=summary)


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
        tuned = ctx.get(TUNE, None)  # the tune stage's measurements, when it measured in this job
        t0 = time.monotonic()
        inp = fit.FitInputs(ctx.workdir, ctx.ladder, ctx.workdir / ctx.reference.outputs[0].path,
                            ctx.workdir / ctx.imatrix.outputs[0].path if ctx.imatrix is not None else None,
                            p.calibration.path if p.calibration else None, ctx.toolchain,
                            tune.load_measurements(ctx.workdir) if tuned and "scales" in tuned else None,
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
    """inspect -> convert (and a vision-language model's projector) -> calibrate (with an imatrix) -> quantize ->
    tune (size points in ``options.tune``) -> fit (memory budgets in ``options.fit``) -> evaluate (when asked)."""
    stages: list[Stage[JobContext]] = [InspectStage(options, rules), ConvertStage(options.timeout)]
    if options.imatrix:
        stages.append(CalibrateStage(options.timeout))
    stages.append(QuantizeStage(options.timeout))
    if options.tune:
        topts = tune.TuneOptions(size_points=tuple(options.tune), ctx=options.ctx, time_budget=options.tune_seconds,
                                 timeout=options.timeout)
        if options.tune_candidates:
            topts = dataclasses.replace(topts, candidates=tuple(options.tune_candidates))
        stages.append(TuneStage(topts))
    if options.fit:
        fopts = fit.FitOptions(budgets=tuple(options.fit), kv_type=options.fit_kv_type, ctx=options.ctx,
                               timeout=options.timeout)
        if options.tune_candidates:  # the same measured types as tuning
            fopts = dataclasses.replace(fopts, candidates=tuple(options.tune_candidates))
        stages.append(FitStage(fopts))
    if evaluation is not None:
        stages.append(EvaluateStage(evaluation, options.calibration))
    return tuple(stages)

