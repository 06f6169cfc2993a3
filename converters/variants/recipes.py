"""The registry of variant recipes: named, data-only descriptions of "prune this way, then heal that way".

A recipe is looked up by name (``get("prune-25pct-kd")``); an unknown name is an :class:`UnknownName`
listing the known ones. Variants are off by default: settings or the command line name the recipes to
build. Each variant is published as its own repo, by default ``{org}/{model}-{variant}-GGUF``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from converters.core import names as file_names
from converters.core import records
from converters.core.errors import ConfigError, InputError, UnknownName
from converters.core.hooks import NULL_HOOKS, Hooks
from converters.core.records import StageRecord, fingerprint_file
from converters.core.stages import Produced, RecordedStage, Stage, StateKey
from converters.core.workdir import VARIANT_SCHEMA, Ladder, VariantInfo, WorkDir
from converters.formats import checkpoint as ckpt_mod
from converters.ladder import evaluate
from converters.ladder.job import (EVAL_OVERRIDES, EvalSettings, EvaluateStage, JobContext, ladder_stages,
                                   run_stages)
from converters.ladder.pipeline import LadderOptions
from converters.llama import convert as convert_mod
from converters.llama.toolchain import Toolchain
from converters.variants import distill as distill_mod
from converters.variants import prune as prune_mod
from converters.variants.distill import DistillConfig
from converters.variants.prune import PruneSpec

log = logging.getLogger(__name__)

# What the variant's stages hand to later ones (converters.core.stages.StateKey)
PRUNE: StateKey[dict[str, Any]] = StateKey("prune")  # PruneStage's result (its record)
DISTILL: StateKey[dict[str, Any]] = StateKey("distill")  # DistillStage's result (its record)
TEACHER_EVAL: StateKey[dict[str, Any]] = StateKey("teacher_eval")  # reference, teacher report, chunks, ctx, stats


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    prune: PruneSpec
    distill: DistillConfig | None = None   # None: the pruned model is published unhealed

    @property
    def heals(self) -> bool:
        return self.distill is not None

    def with_overrides(self, **distill_overrides: Any) -> "Recipe":
        """The same recipe with some distillation settings replaced (``steps=...``); ``None`` values are ignored."""
        given = {k: v for k, v in distill_overrides.items() if v is not None}
        if not given:
            return self
        if self.distill is None:
            raise ConfigError(f"recipe {self.name} does not distill; distillation options do not apply",
                              key=next(iter(given)))
        unknown = set(given) - {f.name for f in dataclasses.fields(DistillConfig)}
        if unknown:
            raise ConfigError(f"unknown distillation option(s): {', '.join(sorted(unknown))}", key=sorted(unknown)[0])
        return dataclasses.replace(self, distill=dataclasses.replace(self.distill, **given))

    def summary(self) -> str:
        """One line for a card: what was done."""
        p = self.prune
        if p.method == "depth":
            amount = (f"{p.layers} decoder layer{'s' if p.layers != 1 else ''}") if p.layers is not None else f"{p.fraction:.0%} of the decoder layers"
            how = ("lowest block influence, 1 - cos(h_in, h_out) (ShortGPT)" if p.importance == "block_influence"
                   else "the consecutive block with the smallest angular distance (Gromov et al. 2024)")
            text = f"removed {amount} ({how})"
        else:
            text = f"removed {p.fraction:.0%} of the MLP channels of every layer (lowest mean activation)"
        if self.distill is not None:
            d = self.distill
            text += (f", then healed by distillation from the original: KL(teacher || student), T={d.temperature:g}, "
                     f"{d.steps} steps of {d.batch_size} x {d.seq_len} tokens, AdamW lr {d.lr:g}")
        return text

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "summary": self.summary(),
                "prune": self.prune.to_json(), "distill": None if self.distill is None else self.distill.to_json()}


_KD = DistillConfig(steps=400, lr=1e-4, batch_size=4, seq_len=512, temperature=1.0)

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("prune-4-layers", "4 decoder layers removed (block influence), not healed",
           PruneSpec(method="depth", importance="block_influence", layers=4)),
    Recipe("prune-4-layers-kd", "4 decoder layers removed (block influence), healed by distillation",
           PruneSpec(method="depth", importance="block_influence", layers=4), _KD),
    Recipe("prune-25pct", "25% of the decoder layers removed (block influence), not healed",
           PruneSpec(method="depth", importance="block_influence", fraction=0.25)),
    Recipe("prune-25pct-kd", "25% of the decoder layers removed (block influence), healed by distillation",
           PruneSpec(method="depth", importance="block_influence", fraction=0.25), _KD),
    Recipe("prune-block-25pct-kd", "a block of 25% of the decoder layers removed (angular distance), healed",
           PruneSpec(method="depth", importance="angular", fraction=0.25), _KD),
    Recipe("prune-mlp-25pct-kd", "25% of the MLP channels removed (activation importance), healed",
           PruneSpec(method="width", fraction=0.25), _KD),
)}


def names() -> list[str]:
    return sorted(RECIPES)


def get(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise UnknownName("variant recipe", name, names()) from None


def parse_list(spec: str | Iterable[str] | None) -> tuple[Recipe, ...]:
    """Recipes named in settings: a comma list or a sequence; empty or None means no variants (the default)."""
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[Recipe] = []
    for item in items:
        item = item.strip()
        if item and all(r.name != item for r in out):
            out.append(get(item))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Building a variant: prune -> heal -> the same ladder -> evaluation against the teacher
# --------------------------------------------------------------------------------------------------
TEACHER_LOGITS = file_names.TEACHER_LOGITS


@dataclasses.dataclass(frozen=True)
class VariantPaths:
    """Where a variant's intermediate checkpoints live inside its work directory."""

    out: Path

    @property
    def pruned(self) -> Path:
        return self.out / file_names.PRUNED_DIR

    @property
    def healed(self) -> Path:
        return self.out / file_names.HEALED_DIR

    @property
    def teacher_dir(self) -> Path:
        return self.out / file_names.TEACHER_DIR

    @property
    def teacher_logits(self) -> Path:
        return self.out / TEACHER_LOGITS

    def final(self, recipe: Recipe) -> Path:
        return self.healed if recipe.heals else self.pruned


def model_name(teacher_model: str, recipe: Recipe) -> str:
    """File and repo name of a variant: ``{model}-{variant}``."""
    return f"{teacher_model}-{recipe.name}"


def _checkpoint_inputs(path: Path) -> dict[str, Any]:
    files = sorted(prune_mod.weight_files(path)) + [path / "config.json"]
    return {"files": [fingerprint_file(p) for p in files]}


@dataclasses.dataclass(frozen=True)
class VariantOf:
    """What makes a job a variant: the recipe and its teacher (the original checkpoint and its work dir)."""

    recipe: Recipe
    teacher: Path  # the teacher's checkpoint folder
    teacher_model: str
    calibration: Path  # the text pruning and healing measure on
    teacher_workdir: Path | None = None  # the teacher's finished work dir (its BF16 reference and report)
    source_repo: str | None = None


def _info(ctx: JobContext, v: VariantOf) -> dict[str, Any]:
    """variant.json from the prune (and distill) results of this run."""
    pruned, final = ctx.get(PRUNE), Path(ctx.checkpoint_dir)
    cal_in = fingerprint_file(Path(v.calibration))
    return {
        "schema_version": VARIANT_SCHEMA,
        "model_name": ctx.model_name,
        "recipe": v.recipe.to_json(),
        "teacher": {"path": str(Path(v.teacher)), "model_name": v.teacher_model,
                    "repo": v.source_repo, "parameters": pruned["parameters_before"],
                    "bytes": pruned["bytes_before"], "layers": pruned["layers_before"],
                    "intermediate_size": pruned["intermediate_before"]},
        "variant": {"path": str(final), "parameters": prune_mod.count_parameters(final),
                    "bytes": prune_mod.weights_bytes(final), "layers": pruned["layers_after"],
                    "intermediate_size": pruned["intermediate_after"]},
        "prune": pruned,
        "distill": ctx.get(DISTILL, None),
        "calibration": {"name": Path(v.calibration).name, **{k: x for k, x in cal_in.items() if k != "name"}},
    }


def write_info(workdir: Path, info: dict[str, Any]) -> None:
    WorkDir(workdir).write_variant(VariantInfo.from_json(info))


class PruneStage(RecordedStage[JobContext]):
    """Prune the teacher into ``checkpoint-pruned`` (resumable through its record); writes variant.json."""

    name = "prune"

    def __init__(self, variant: VariantOf, last: bool) -> None:
        self.v, self.last = variant, last

    def inputs(self, ctx: JobContext) -> dict[str, Any]:

        return {"source": _checkpoint_inputs(self.v.teacher), "spec": self.v.recipe.prune.to_json(),
                "calibration": fingerprint_file(Path(self.v.calibration))}

    def produce(self, ctx: JobContext) -> Produced:

        pruned = VariantPaths(ctx.workdir).pruned
        shutil.rmtree(pruned, ignore_errors=True)
        result = prune_mod.prune(Path(self.v.teacher), pruned, self.v.recipe.prune, Path(self.v.calibration),
                                 hooks=ctx.hooks)
        return Produced(prune_mod.weight_files(pruned), {"result": result.to_json()}, result.seconds)

    def use(self, ctx: JobContext, rec: StageRecord) -> None:
        ctx.put(PRUNE, rec.extra["result"])
        ctx.checkpoint_dir = VariantPaths(ctx.workdir).pruned
        if self.last:
            write_info(ctx.workdir, _info(ctx, self.v))


class DistillStage(RecordedStage[JobContext]):
    """Heal the pruned model by distillation from the teacher into ``checkpoint-healed``."""

    name = "distill"

    def __init__(self, variant: VariantOf) -> None:
        self.v = variant

    def inputs(self, ctx: JobContext) -> dict[str, Any]:

        d = self.v.recipe.distill
        assert d is not None
        return {"teacher": _checkpoint_inputs(self.v.teacher),
                "student": _checkpoint_inputs(VariantPaths(ctx.workdir).pruned),
                "config": {k: x for k, x in d.to_json().items() if k not in ("cache_dir", "log_every")},
                "calibration": fingerprint_file(Path(self.v.calibration))}

    def produce(self, ctx: JobContext) -> Produced:
        paths = VariantPaths(ctx.workdir)
        shutil.rmtree(paths.healed, ignore_errors=True)
        assert self.v.recipe.distill is not None
        res = distill_mod.distill(Path(self.v.teacher), paths.pruned, paths.healed, Path(self.v.calibration),
                                  self.v.recipe.distill, first_changed_layer=ctx.get(PRUNE).get("first_changed_layer"),
                                  hooks=ctx.hooks)
        return Produced(prune_mod.weight_files(paths.healed), {"result": res.to_json()}, res.seconds)

    def use(self, ctx: JobContext, rec: StageRecord) -> None:
        ctx.put(DISTILL, rec.extra["result"])
        ctx.checkpoint_dir = VariantPaths(ctx.workdir).healed
        write_info(ctx.workdir, _info(ctx, self.v))


def load_info(workdir: Path) -> dict[str, Any] | None:
    info = WorkDir(workdir).variant()
    return info.to_json() if info is not None else None


def teacher_reference(teacher: Path, out: Path, teacher_model: str, *, toolchain: Toolchain | None,
                      teacher_workdir: Path | None = None) -> Path:
    """The teacher's BF16 GGUF: from its finished work dir when given, else converted into ``out/teacher``."""
    if teacher_workdir is not None:
        ladder = WorkDir(teacher_workdir).ladder()
        ref = Path(teacher_workdir) / ladder.reference.path
        if not ref.is_file():
            raise InputError(f"the teacher's reference {ref.name} is missing from {teacher_workdir}")
        return ref
    ck = ckpt_mod.inspect(teacher)
    tdir = VariantPaths(Path(out)).teacher_dir
    conv = convert_mod.convert(ck, tdir, teacher_model, toolchain=toolchain)
    return tdir / conv.record.outputs[0].path


def ceilings_for(ladder: Ladder, pruning_kld: float) -> dict[str, float]:
    """Quality gate of a variant's quants measured against the teacher: the usual ceiling for the type plus
    the loss the variant's own BF16 already has against the teacher (pruning + healing)."""

    out = {}
    for f in ladder.files:
        if f.bpw_nominal is not None:
            out[f.type] = round(evaluate.default_ceiling(float(f.bpw_nominal)) + max(0.0, pruning_kld), 6)
    return out


class TeacherLogitsStage(RecordedStage[JobContext]):
    """The teacher's base logits over the evaluation text (on the tokens the teacher's quants were scored on,
    when its report used the same text), then the variant's own BF16 against them: the gate's ceilings."""

    name = "teacher-logits"

    def __init__(self, variant: VariantOf, eval_text: Path, eval_chunks: int | None, eval_ctx: int = 512) -> None:
        self.v, self.text, self.chunks, self.ctx = variant, Path(eval_text), eval_chunks, eval_ctx

    def _tokens(self, ctx: JobContext) -> dict[str, Any]:
        """Reference, text identity and (chunks, ctx) to score on; computed once per run."""
        if ctx.has(TEACHER_EVAL):
            return ctx.get(TEACHER_EVAL)
        twd = Path(self.v.teacher_workdir) if self.v.teacher_workdir is not None else None
        teacher_report = None
        if twd is not None and WorkDir(twd).has_report():  # its figures are copied as written (variant.json)
            teacher_report = WorkDir(twd).report()
        reference = teacher_reference(Path(self.v.teacher), ctx.workdir, self.v.teacher_model,
                                      toolchain=ctx.toolchain, teacher_workdir=twd)
        ev = teacher_report.texts.get("eval") if teacher_report is not None else None
        same = ev is not None and bool(ev.sha256) and ev.sha256 == records.sha256_file(self.text)
        if same and ev.chunks and ev.ctx:
            chunks, ectx = int(ev.chunks), int(ev.ctx)  # the teacher's quants were scored on these tokens
        else:
            ectx = self.ctx
            available = evaluate.count_tokens(ctx.toolchain, reference, self.text) // ectx
            if available < 1:
                raise InputError(f"the evaluation text {self.text.name} is shorter than one chunk of {ectx}")
            chunks = min(self.chunks or evaluate.DEFAULT_CHUNKS, available)
        ctx.put(TEACHER_EVAL, {"reference": reference, "report": teacher_report if same else None,
                               "chunks": chunks, "ctx": ectx})
        return ctx.get(TEACHER_EVAL)

    def inputs(self, ctx: JobContext) -> dict[str, Any]:

        t = self._tokens(ctx)
        return {"reference": fingerprint_file(t["reference"]), "text": fingerprint_file(self.text), "ctx": t["ctx"],
                "chunks": t["chunks"], "toolchain": ctx.toolchain.version}

    def produce(self, ctx: JobContext) -> Produced:
        t, final = self._tokens(ctx), VariantPaths(ctx.workdir).teacher_logits
        with records.atomic_output(final) as tmp:
            _, _, secs = evaluate.run_base(ctx.toolchain, t["reference"], self.text, tmp, ctx=t["ctx"],
                                           chunks=t["chunks"])
        return Produced([final], {}, secs, ctx.toolchain.version)

    def use(self, ctx: JobContext, rec: StageRecord) -> None:

        t, logits = self._tokens(ctx), VariantPaths(ctx.workdir).teacher_logits
        own = ctx.workdir / ctx.ladder.reference.path
        stats, _ = evaluate.run_kld(ctx.toolchain, own, logits, ctx=t["ctx"])
        t["stats"] = stats
        ctx.put(EVAL_OVERRIDES, {"ctx": t["ctx"], "chunks": None, "reference_logits": logits,
                                 "ceilings": ceilings_for(ctx.ladder, stats.kld_mean)})


@dataclasses.dataclass(frozen=True)
class VariantEvaluateStage(EvaluateStage):
    """The evaluation against the teacher's logits, summed up in variant.json."""

    variant: VariantOf | None = None

    def run(self, ctx: JobContext) -> None:
        super().run(ctx)
        t, report = ctx.get(TEACHER_EVAL), ctx.report
        stats = t["stats"]
        teacher_files = {}
        if t["report"] is not None:
            teacher_files = {f.type: {**{k: f.figures()[k] for k in ("kld_mean", "kld_mean_err", "same_top_p",
                                                                       "same_top_p_err")}, "size": f.size}
                             for f in t["report"].files if f.stats is not None}
        info = load_info(ctx.workdir) or {}
        info["evaluation"] = {
            "against": "teacher BF16 logits", "chunks": t["chunks"], "ctx": t["ctx"], "text": self.settings.text.path.name,
            "reference_kld_mean": stats.kld_mean, "reference_kld_mean_err": stats.kld_mean_err,
            "reference_same_top_p": stats.same_top_p,
            "files": {f.type: {"kld_mean": f.stats.kld_mean if f.stats else None,
                               "kld_mean_err": f.stats.kld_mean_err if f.stats else None,
                               "same_top_p": f.stats.same_top_p if f.stats else None,
                               "size": f.size, "status": f.status} for f in report.files},
            "teacher_files": teacher_files,
            "publishable": report.publishable,
        }
        write_info(ctx.workdir, info)


def checkpoint_stages(variant: VariantOf) -> tuple[Stage[JobContext], ...]:
    """prune -> distill (recipes that heal): the variant's checkpoint."""
    first: list[Stage[JobContext]] = [PruneStage(variant, last=not variant.recipe.heals)]
    if variant.recipe.heals:
        first.append(DistillStage(variant))
    return tuple(first)


def stages(variant: VariantOf, options: LadderOptions, evaluation: EvalSettings | None
           ) -> tuple[Stage[JobContext], ...]:
    """The variant's checkpoint -> the ladder -> teacher logits and evaluation against them."""
    first = checkpoint_stages(variant)
    tail: tuple[Stage[JobContext], ...] = ()
    if evaluation is not None:
        tail = (TeacherLogitsStage(variant, evaluation.text.path, evaluation.chunks),
                VariantEvaluateStage(evaluation, options.calibration, variant=variant))
    return (*first, *ladder_stages(options, None), *tail)


def make_checkpoint(source: Path, out: Path, recipe: Recipe, calibration: Path, *, teacher_model: str,
                    source_repo: str | None = None, hooks: Hooks = NULL_HOOKS) -> dict[str, Any]:
    """Only prune (and heal) ``source`` into ``out`` (resumable); returns variant.json."""
    v = VariantOf(recipe, Path(source), teacher_model, Path(calibration), source_repo=source_repo)
    ctx = JobContext(Path(out), None, hooks, model_name(teacher_model, recipe))  # type: ignore[arg-type]
    run_stages(checkpoint_stages(v), ctx)
    return load_info(Path(out)) or {}
