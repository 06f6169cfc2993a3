"""The registry of variant recipes: named, data-only descriptions of "prune this way, then heal that way".

A recipe is looked up by name (``get("prune-25pct-kd")``); an unknown name is an :class:`UnknownName`
listing the known ones. Variants are off by default: settings or the command line name the recipes to
build. Each variant is published as its own repo, by default ``{org}/{model}-{variant}-GGUF``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from converters.distill import DistillConfig
from converters.errors import ConfigError, UnknownName
from converters.prune import PruneSpec

log = logging.getLogger(__name__)

DEFAULT_REPO_PATTERN = "{org}/{model}-{variant}-GGUF"


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


def repo_id(org: str, model: str, variant: str, pattern: str = DEFAULT_REPO_PATTERN) -> str:
    """The repo a variant is published to, e.g. ``acme/SmolLM2-135M-Instruct-prune-25pct-kd-GGUF``."""
    for field in ("{org}", "{model}", "{variant}"):
        if field not in pattern:
            raise ConfigError(f"variant repo pattern {pattern!r} must contain {field}", key="variant_repo_pattern")
    rid = pattern.format(org=org, model=model, variant=variant)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]{1,96}", rid):
        raise ConfigError(f"variant repo id {rid!r} is not a valid Hub repo id", key="variant_repo_pattern")
    return rid


# --------------------------------------------------------------------------------------------------
# Building a variant: prune -> heal -> the same ladder -> evaluation against the teacher
# --------------------------------------------------------------------------------------------------
VARIANT_FILE = "variant.json"
VARIANT_SCHEMA = 1
TEACHER_LOGITS = "teacher-base-logits.kld"


@dataclasses.dataclass(frozen=True)
class VariantPaths:
    """Where a variant's intermediate checkpoints live inside its work directory."""

    out: Path

    @property
    def pruned(self) -> Path:
        return self.out / "checkpoint-pruned"

    @property
    def healed(self) -> Path:
        return self.out / "checkpoint-healed"

    @property
    def teacher_dir(self) -> Path:
        return self.out / "teacher"

    @property
    def teacher_logits(self) -> Path:
        return self.out / TEACHER_LOGITS

    def final(self, recipe: Recipe) -> Path:
        return self.healed if recipe.heals else self.pruned


def model_name(teacher_model: str, recipe: Recipe) -> str:
    """File and repo name of a variant: ``{model}-{variant}``."""
    return f"{teacher_model}-{recipe.name}"


def _checkpoint_inputs(path: Path) -> dict[str, Any]:
    from converters.records import fingerprint_file
    from converters.prune import weight_files

    files = sorted(weight_files(path)) + [path / "config.json"]
    return {"files": [fingerprint_file(p) for p in files]}


def make_checkpoint(source: Path, out: Path, recipe: Recipe, calibration: Path, *,
                    teacher_model: str | None = None, source_repo: str | None = None,
                    on_progress: Callable[[str], None] | None = None,
                    on_step: Callable[[int, int, float, float], None] | None = None) -> dict[str, Any]:
    """Prune (and heal) ``source`` into ``out``; resumable through stage records. Returns variant.json."""
    from converters import distill as distill_mod
    from converters import prune as prune_mod
    from converters import records
    from converters.records import fingerprint_file

    paths = VariantPaths(Path(out))
    paths.out.mkdir(parents=True, exist_ok=True)
    src_in = _checkpoint_inputs(Path(source))
    cal_in = fingerprint_file(Path(calibration))
    prune_inputs = {"source": src_in, "spec": recipe.prune.to_json(), "calibration": cal_in}
    rec = records.complete(paths.out, "prune", prune_inputs)
    if rec is None:
        if paths.pruned.exists():
            shutil.rmtree(paths.pruned)
        result = prune_mod.prune(Path(source), paths.pruned, recipe.prune, Path(calibration), on_progress=on_progress)
        rec = records.save(paths.out, "prune", prune_inputs, prune_mod.weight_files(paths.pruned), result.seconds,
                           None, extra={"result": result.to_json()})
    else:
        log.info("variant: pruning already done for these inputs; skipped")
    pruned = rec.extra["result"]
    healed = None
    if recipe.distill is not None:
        kd_inputs = {"teacher": src_in, "student": _checkpoint_inputs(paths.pruned),
                     "config": {k: v for k, v in recipe.distill.to_json().items() if k not in ("cache_dir", "log_every")},
                     "calibration": cal_in}
        drec = records.complete(paths.out, "distill", kd_inputs)
        if drec is None:
            if paths.healed.exists():
                shutil.rmtree(paths.healed)
            res = distill_mod.distill(Path(source), paths.pruned, paths.healed, Path(calibration), recipe.distill,
                                      first_changed_layer=pruned.get("first_changed_layer"), on_step=on_step)
            drec = records.save(paths.out, "distill", kd_inputs, prune_mod.weight_files(paths.healed), res.seconds,
                                None, extra={"result": res.to_json()})
        else:
            log.info("variant: distillation already done for these inputs; skipped")
        healed = drec.extra["result"]
    final = paths.final(recipe)
    info = {
        "schema_version": VARIANT_SCHEMA,
        "recipe": recipe.to_json(),
        "teacher": {"path": str(Path(source)), "model_name": teacher_model or Path(source).resolve().name,
                    "repo": source_repo, "parameters": pruned["parameters_before"],
                    "bytes": pruned["bytes_before"], "layers": pruned["layers_before"],
                    "intermediate_size": pruned["intermediate_before"]},
        "variant": {"path": str(final), "parameters": prune_mod.count_parameters(final),
                    "bytes": prune_mod.weights_bytes(final), "layers": pruned["layers_after"],
                    "intermediate_size": pruned["intermediate_after"]},
        "prune": pruned,
        "distill": healed,
        "calibration": {"name": Path(calibration).name, **{k: v for k, v in cal_in.items() if k != "name"}},
    }
    records.write_json_atomic(paths.out / VARIANT_FILE, info)
    return info


def load_info(workdir: Path) -> dict[str, Any] | None:
    p = Path(workdir) / VARIANT_FILE
    if not p.is_file():
        return None
    import json

    return json.loads(p.read_text())


def teacher_reference(teacher: Path, out: Path, teacher_model: str, *, toolchain: Any,
                      teacher_workdir: Path | None = None) -> Path:
    """The teacher's BF16 GGUF: from its finished work dir when given, else converted into ``out/teacher``."""
    from converters import checkpoint as ckpt_mod
    from converters import convert as convert_mod
    from converters.errors import InputError

    if teacher_workdir is not None:
        from converters.pipeline import load_ladder

        ladder = load_ladder(Path(teacher_workdir))
        ref = Path(teacher_workdir) / ladder["reference"]["path"]
        if not ref.is_file():
            raise InputError(f"the teacher's reference {ref.name} is missing from {teacher_workdir}")
        return ref
    ck = ckpt_mod.inspect(teacher)
    tdir = VariantPaths(Path(out)).teacher_dir
    conv = convert_mod.convert(ck, tdir, teacher_model, toolchain=toolchain)
    return tdir / conv.record.outputs[0].path


def teacher_logits(reference: Path, out: Path, eval_text: Path, *, toolchain: Any, ctx: int, chunks: int,
                   threads: int | None = None) -> Path:
    """The teacher's base logits over ``chunks`` x ``ctx`` tokens of ``eval_text`` (resumable)."""
    from converters import evaluate, records
    from converters.records import fingerprint_file

    final = VariantPaths(Path(out)).teacher_logits
    inputs = {"reference": fingerprint_file(reference), "text": fingerprint_file(Path(eval_text)), "ctx": ctx,
              "chunks": chunks, "toolchain": toolchain.version}
    if records.complete(Path(out), "teacher-logits", inputs) is not None:
        return final
    with records.atomic_output(final) as tmp:
        _, _, secs = evaluate.run_base(toolchain, reference, Path(eval_text), tmp, ctx=ctx, chunks=chunks,
                                       threads=threads)
    records.save(Path(out), "teacher-logits", inputs, [final], secs, toolchain.version)
    return final


def ceilings_for(ladder: dict[str, Any], pruning_kld: float) -> dict[str, float]:
    """Quality gate of a variant's quants measured against the teacher: the usual ceiling for the type plus
    the loss the variant's own BF16 already has against the teacher (pruning + healing)."""
    from converters import evaluate

    out = {}
    for f in ladder.get("files", []):
        bpw = f.get("bpw_nominal")
        if bpw is not None:
            out[f["type"]] = round(evaluate.default_ceiling(float(bpw)) + max(0.0, pruning_kld), 6)
    return out


def build(source: Path, out: Path, recipe: Recipe, *, toolchain: Any, calibration: Any,
          eval_text: Path | None = None, teacher_model: str | None = None, ladder: Any = "default",
          imatrix: bool = True, ctx: int = 512, calibration_chunks: int | None = None,
          eval_chunks: int | None = None, eval_ctx: int = 512, teacher_workdir: Path | None = None,
          source_repo: str | None = None, source_revision: str | None = None, threads: int | None = None,
          on_event: Callable[[str, str, dict[str, Any]], None] | None = None,
          on_progress: Callable[[str], None] | None = None,
          on_step: Callable[[int, int, float, float], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Prune and heal ``source`` per ``recipe``, run the same ladder on the result and, when ``eval_text`` is
    given, evaluate every quant against the teacher's BF16 logits. ``calibration`` is a
    :class:`converters.calibrate.TextFile` (used for pruning, healing and the imatrix). ``should_stop`` is
    handed to the ladder's pipeline (a stop request ends it at its next step). Returns variant.json."""
    from converters import checkpoint as ckpt_mod
    from converters import evaluate, pipeline, records

    out = Path(out)
    emit = on_event or (lambda stage, state, info: None)
    teacher_model = teacher_model or pipeline.model_name_for(source_repo or str(Path(source).resolve()))
    emit("variant", "start", {"recipe": recipe.name})
    info = make_checkpoint(Path(source), out, recipe, calibration.path, teacher_model=teacher_model,
                           source_repo=source_repo, on_progress=on_progress, on_step=on_step)
    final = Path(info["variant"]["path"])
    ck = ckpt_mod.inspect(final)
    p = pipeline.plan(ck, out, model_name=model_name(teacher_model, recipe), ladder=ladder, calibration=calibration,
                      calibration_chunks=calibration_chunks, ctx=ctx, imatrix=imatrix,
                      source_repo=source_repo, source_revision=source_revision)
    lad = pipeline.execute(p, toolchain=toolchain, on_event=on_event, should_stop=should_stop)
    info["model_name"] = lad["model_name"]
    if eval_text is not None:
        emit("variant-eval", "start", {})
        teacher_report = None
        if teacher_workdir is not None and (Path(teacher_workdir) / "report.json").is_file():
            import json

            teacher_report = json.loads((Path(teacher_workdir) / "report.json").read_text())
        reference = teacher_reference(Path(source), out, teacher_model, toolchain=toolchain,
                                      teacher_workdir=teacher_workdir)
        ev = (teacher_report or {}).get("texts", {}).get("eval") or {}
        same_text = ev.get("sha256") and ev.get("sha256") == records.sha256_file(Path(eval_text))
        if same_text and ev.get("chunks") and ev.get("ctx"):
            chunks, ectx = int(ev["chunks"]), int(ev["ctx"])   # the teacher's quants were scored on these tokens
        else:
            ectx = eval_ctx
            available = evaluate.count_tokens(toolchain, reference, Path(eval_text)) // ectx
            if available < 1:
                from converters.errors import InputError

                raise InputError(f"the evaluation text {Path(eval_text).name} is shorter than one chunk of {ectx}")
            chunks = min(eval_chunks or evaluate.DEFAULT_CHUNKS, available)
        logits = teacher_logits(reference, out, Path(eval_text), toolchain=toolchain, ctx=ectx, chunks=chunks,
                                threads=threads)
        own_reference = out / lad["reference"]["path"]
        stats, _ = evaluate.run_kld(toolchain, own_reference, logits, ctx=ectx, threads=threads)
        report = evaluate.run(out, eval_text=Path(eval_text), calibration_text=calibration.path, ctx=ectx,
                              threads=threads, source_dir=final, reference_logits=logits,
                              ceilings=ceilings_for(lad, stats.kld_mean), toolchain=toolchain)
        teacher_files = {}
        if same_text and teacher_report is not None:
            teacher_files = {f["type"]: {k: f.get(k) for k in ("kld_mean", "kld_mean_err", "same_top_p",
                                                                  "same_top_p_err", "size")}
                             for f in teacher_report.get("files", []) if f.get("kld_mean") is not None}
        info["evaluation"] = {
            "against": "teacher BF16 logits", "chunks": chunks, "ctx": ectx, "text": Path(eval_text).name,
            "reference_kld_mean": stats.kld_mean, "reference_kld_mean_err": stats.kld_mean_err,
            "reference_same_top_p": stats.same_top_p,
            "files": {f.type: {"kld_mean": f.stats.kld_mean if f.stats else None,
                               "kld_mean_err": f.stats.kld_mean_err if f.stats else None,
                               "same_top_p": f.stats.same_top_p if f.stats else None,
                               "size": f.size, "status": f.status} for f in report.files},
            "teacher_files": teacher_files,
            "publishable": report.publishable,
        }
        emit("variant-eval", "end", {})
    records.write_json_atomic(out / VARIANT_FILE, info)
    emit("variant", "end", {"recipe": recipe.name})
    return info
