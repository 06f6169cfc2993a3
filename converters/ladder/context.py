"""The run state of a ladder job and what its stages hand to each other.

:class:`JobContext` (the run's scratch pad), :class:`ToolLimits` (how long one program may run), :class:`EvalSettings`
(how the ladder is evaluated) and the typed state keys of the ladder's stages, among them ``FILE_READY``: the
callback (:class:`FileReady`) the pipeline stage (:mod:`converters.ladder.flow`) calls after each file's verdict.
The stages themselves are in :mod:`converters.ladder.job` (which re-exports these names) and
:mod:`converters.ladder.flow`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from converters.core import records
from converters.core.hooks import Hooks
from converters.core.proc import current_watch
from converters.core.report import Report
from converters.core.stages import StageState, StateKey
from converters.core.workdir import Ladder
from converters.formats import checkpoint as checkpoint_mod
from converters.ladder import evaluate, pipeline
from converters.ladder import speed as speed_mod
from converters.llama import calibrate as calibrate_mod
from converters.llama import verify
from converters.llama.toolchain import Toolchain


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How a job evaluates its ladder (what builds ``converters.ladder.evaluate.EvalOptions``)."""

    text: calibrate_mod.TextFile
    chunks: int | None = None  # the most chunks a file is scored on (None: evaluate.DEFAULT_CHUNKS)
    precision: float = evaluate.PRECISION  # sequential evaluation's target (0: every file on ``chunks`` chunks)
    min_chunks: int = evaluate.MIN_CHUNKS
    name_text: bool = False  # the report names the text and its origin (the bot does; ``convert`` never did)
    require_publishable: bool = False  # a report that is not publishable fails the job (the bot's main ladder)
    require_source_check: bool = True  # a skipped BF16-vs-source comparison makes the report not publishable
    speed: speed_mod.SpeedOptions | None = None  # llama-bench before the evaluation (converters.ladder.speed)


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


@dataclasses.dataclass(frozen=True)
class FileReady:
    """One file of the ladder measured and judged: what the pipeline stage hands to ``FILE_READY`` (the early
    publisher, ``bot/publish/early.py``) right after the file's verdict, once report.json lists it."""

    type: str  # quant type name ("Q4_K_M"; a tuned file "Q4_K_M-tuned")
    paths: tuple[str, ...]  # work-dir-relative paths (the parts, when split)
    sha256: tuple[str, ...]  # per part, as the evaluation measured them
    passed: bool  # False: withheld by the gate (the publisher never uploads it, but may close its group)


# a callback a stage before the ladder's puts in ctx; called once per measured file (again on resume: idempotent)
FILE_READY: StateKey[Callable[[FileReady], None]] = StateKey("file_ready")


def eval_options(settings: EvalSettings, calibration: calibrate_mod.TextFile | None,
                  **overrides: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"eval_text": settings.text.path,
                            "calibration_text": calibration.path if calibration is not None else None,
                            "chunks": settings.chunks, "require_source_check": settings.require_source_check,
                            "precision": settings.precision, "min_chunks": settings.min_chunks}
    if settings.name_text:
        opts.update(eval_text_name=settings.text.name, eval_text_source=settings.text.source)
    opts.update(overrides)
    return opts
