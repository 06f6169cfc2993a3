"""Stage fit: for each memory budget (``[quantize] fit = ["16GB@32k"]``, ``convert --fit``), the file with the lowest
predicted KLD whose weights, KV cache at the budget's context and llama.cpp's buffers fit the budget:
``<Model>-fit-16GB-32k.gguf``, its plan published beside it (``<Model>-fit-16GB-32k.layout.json``).

Per budget (:mod:`converters.ladder.budget` parses it and holds the margin and the publish rule):

1. **Baseline.** Every stock file's memory at the context is predicted (its bytes + the KV cache from the
   architecture + the compute estimate, :mod:`converters.llama.memory`); from the largest predicted to fit down,
   stock files are loaded in llama.cpp at that context until one measures within the budget (at most
   :data:`MAX_STOCK_LOADS`): that is the baseline, the largest stock file that fits. No stock file fits: no fit file
   (there would be nothing to compare it with).
2. **Solve.** The byte budget for the weights is the budget minus the KV, compute and output buffers llama.cpp
   reported for the baseline, minus the margin (never less than the baseline's weights); the per-tensor damage is
   the tuner's (:mod:`converters.ladder.tune`: the tune stage's measurements when it ran, else measured here, the
   baseline's own types always among the candidates), solved by :func:`converters.ladder.layout.plan_layout` on the
   summed importance-weighted error, as the tuner's cheap mode does. With ``kld_scales`` each tensor's error is
   first scaled to expected KLD by the tuner's scales per tensor kind and depth, fitted on the stock files scored on
   the calibration text (:func:`_kld_scales`); that is off by default: on SmolLM2 (``benchmarks/fit.py``, grid types
   excluded) the scales fitted on four stock files predicted gains the calibration runs then measured as losses, and
   no fit file was built for either budget, while the unscaled errors gave one published file 20 % better than its
   baseline and one within the noise of its own.
3. **Build, confirm and verify.** Quantized with the plan (:func:`converters.ladder.tune.build`: the types read back
   must be the plan's) and scored with its baseline on the calibration text: when it is not better by more than two
   paired standard errors, the plan is shrunk toward the baseline once (each change charged its share of the gain
   that was predicted and not measured), else no file is built (the tuner's rule). Loaded at the budget's context:
   the measured memory is recorded, and the largest context that fits the budget is computed from the measured KV
   bytes per token and confirmed by one load (stepped down when that load is over).
4. **Judged** by the evaluation like every file, by the gate of :mod:`converters.ladder.evaluate.verdict`: withheld
   when its measured memory exceeds the budget (:func:`converters.ladder.budget.memory_reason`) or it does not beat
   its baseline in the paired comparison of the tuned files (:mod:`converters.ladder.evaluate.paired`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from converters.core import names, quants, records
from converters.core.errors import CheckFailed, InputError, ParseError, ToolError
from converters.core.workdir import Ladder, LadderFile
from converters.ladder import budget as budget_mod
from converters.ladder import kldfit, layout, tune
from converters.llama import memory
from converters.llama.toolchain import Toolchain

log = logging.getLogger(__name__)

STAGE = "fit"
MAX_STOCK_LOADS = 3  # stock files loaded per budget while looking for the largest that fits
MAX_CONFIRM_LOADS = 3  # loads to confirm the largest context
PREDICT_SLACK = 1.10  # a stock file predicted up to 10 % over the budget is still loaded (the prediction is rough)
METHOD = 3  # 2: errors scaled per tensor kind and depth (kldfit); 3: a tied token embedding never below its stock
# type, and a plan confirmed against its baseline on the calibration text (shrunk once toward it, else not built)


@dataclasses.dataclass(frozen=True)
class FitOptions:
    budgets: tuple[str, ...]
    kv_type: str = "f16"
    candidates: tuple[str, ...] = layout.DEFAULT_CANDIDATES
    probe_chunks: int = tune.DEFAULT_PROBE_CHUNKS
    ctx: int = 512  # the probes' context (the budgets carry their own)
    kld_scales: bool = False  # errors scaled per tensor kind and depth from the stock files' calibration KLD (doc)
    confirm: bool = True  # a built plan must beat its baseline on the calibration text, else shrink once, else none
    threads: int | None = None
    timeout: float | None = None


@dataclasses.dataclass(frozen=True)
class FitInputs:
    """What the stage works on (handed over by ``converters.ladder.job.FitStage``)."""

    workdir: Path
    ladder: Ladder
    reference: Path
    imatrix: Path | None
    calibration: Path | None
    toolchain: Toolchain
    measurements: Damage | None = None  # given (tests); else measured with the tuner's measurer (its cache)
    step: Callable[[str, int, int], None] | None = None


def stock_files(ladder: Ladder) -> list[LadderFile]:
    """The ladder's stock files (not tuned, not fit files), largest first."""
    out = [f for f in ladder.files if not layout.is_tuned(f.type) and not budget_mod.is_fit(f.type)]
    return sorted(out, key=lambda f: (-int(f.size or 0), f.type))


def predicted_total(f: LadderFile, att: memory.Attention, ctx: int, kv_type: str) -> int:
    return int(f.size or 0) + memory.kv_bytes(att, ctx, kv_type) + memory.compute_bytes(att, ctx)


def inputs(inp: FitInputs, o: FitOptions) -> dict[str, Any]:
    lad = inp.ladder
    return {"reference": lad.reference.sha256, "imatrix": records.content_sha256(inp.imatrix, inp.workdir) if inp.imatrix else None,
            "calibration": records.content_sha256(inp.calibration, inp.workdir) if inp.calibration else None,
            "stock": {f.type: f.sha256 for f in stock_files(lad)}, "budgets": list(o.budgets), "kv_type": o.kv_type,
            "candidates": list(o.candidates), "probe_chunks": o.probe_chunks, "ctx": o.ctx,
            "kld_scales": o.kld_scales, "confirm": o.confirm,
            "measurements": "tune" if inp.measurements is not None else "own",
            "toolchain": inp.toolchain.version, "method": METHOD}


def run(inp: FitInputs, o: FitOptions) -> tuple[Ladder, records.StageRecord, bool]:
    """The fit files of every budget (see the module doc), appended to the ladder; (ladder, record, skipped)."""
    budgets = budget_mod.parse_all(o.budgets)
    memory.type_bytes(o.kv_type, 32)  # an unknown KV type fails before any work
    ins = inputs(inp, o)
    rec = records.complete(inp.workdir, STAGE, ins)
    skipped = rec is not None
    if rec is None:
        rec = _produce(inp, o, budgets, ins)
    by_path = {out.path: out for out in rec.outputs}
    added = []
    for b in budgets:
        info = rec.extra.get("budgets", {}).get(b.label, {})
        if info.get("status") == "built" and info.get("file") in by_path:
            added.append(_entry(b, by_path[info["file"]], info, inp.ladder.source.parameters))
    kept = tuple(f for f in inp.ladder.files if not budget_mod.is_fit(f.type))
    ladder = dataclasses.replace(inp.ladder, files=kept + tuple(added), extra={**inp.ladder.extra, "fit": rec.extra})
    return ladder, rec, skipped


def _entry(b: budget_mod.FitBudget, out: records.Output, info: dict[str, Any], parameters: int | None) -> LadderFile:
    fit = {k: info.get(k) for k in ("budget", "budget_bytes", "ctx", "kv_type", "baseline", "baseline_memory",
                                     "memory", "max_ctx", "max_ctx_memory", "n_ctx_train", "layout", "predicted_kld",
                                     "baseline_predicted_kld", "weight_budget")}
    return LadderFile(
        type=b.type, bpw_nominal=None, needs_imatrix=False,
        description=f"For {budget_mod.human(b.bytes)} of memory at {b.ctx:,} tokens of context: per-tensor types "
                    f"chosen from measured damage to fit that budget; published only where it measures better than "
                    f"{info.get('baseline')}, the largest stock file that fits.",
        path=out.path, parts=(out.path,), size=out.size, sha256=out.sha256, part_sha256=(out.sha256,),
        bpw=round(out.size * 8 / parameters, 3) if parameters else None, seconds=info.get("seconds"),
        companions=(info["layout"],) if info.get("layout") else (), extra={"fit": fit})


@dataclasses.dataclass(frozen=True)
class Damage:
    """What a fit file's layout is solved from: the tensors and the error per tensor and type, each scaled by
    ``scales`` (per tensor name; 1.0 when absent)."""

    tensors: list[layout.TensorInfo]
    errors: dict[str, dict[str, float]]  # tensor -> type -> imatrix-weighted squared error (converters.ladder.tensorerr)
    scales: dict[str, float] = dataclasses.field(default_factory=dict)

    def damage(self) -> dict[str, dict[str, float]]:
        return {t.name: {q: self.scales.get(t.name, 1.0) * e for q, e in self.errors.get(t.name, {}).items()}
                for t in self.tensors}


def calibration_for(inp: FitInputs, o: FitOptions) -> tune.Calibration | None:
    """The tuner's calibration runs (:class:`converters.ladder.tune.Calibration`): the reference's logits and the
    stock files' scores the tune stage made are read back, not made again."""
    if inp.calibration is None:
        return None
    return tune.Calibration(inp.toolchain, inp.workdir, inp.reference, inp.calibration, ctx=o.ctx,
                            chunks=o.probe_chunks, threads=o.threads)


def _measurements(inp: FitInputs, o: FitOptions, ladder: Ladder, cal: tune.Calibration | None = None) -> Damage:
    """The errors of every candidate type of every tensor, from the tuner's measurer (its cache, the ladder's own
    files, packed quantize runs for the rest), each scaled to expected KLD per tensor kind and depth
    (:func:`_kld_scales`, when ``o.kld_scales``). ``cal``: the stage's calibration runs (made here when not given)."""
    if inp.measurements is not None:
        return inp.measurements
    if inp.calibration is None:
        raise InputError("memory-budget files need the calibration text (the error weights of token_embd come from it)")
    wd = inp.workdir
    stocks = [wd / f.path for f in stock_files(ladder) if not f.split]
    tensors = tune.catalogue(inp.reference, stocks)
    # per tensor: the candidates, and each type a stock file holds that tensor in (every stock layout, the baseline's
    # among them, stays a plan the solver can pick; a stock type is not a candidate for the other tensors: Q5_1, the
    # fallback of Q5_K on rows that are not a multiple of 256, is not offered everywhere when the candidates leave
    # it out)
    held: dict[str, list[str]] = {}
    for f in stocks:
        for name, q in tune.read_types(f).items():
            if q in layout.QUANT_SIZES and q not in ("F32", *layout.UNQUANTIZED) and q not in held.setdefault(name, []):
                held[name].append(q)
    wanted = {t.name: [q for q in o.candidates if layout.valid(q, t.row_length)] for t in tensors}
    for t in tensors:
        wanted[t.name] += [q for q in sorted(held.get(t.name, ())) if q not in wanted[t.name]]
    scratch = wd / names.TUNE_DIR / "scratch"
    cal = cal or calibration_for(inp, o)
    assert cal is not None
    try:
        m = tune.Measurer.open(inp.toolchain, wd, inp.reference, inp.imatrix, inp.calibration, stocks,
                               threads=o.threads, timeout=o.timeout)
        errors = m.errors(wanted)
        measured = [t for t in tensors if errors.get(t.name)]
        scales = _kld_scales(measured, errors, stocks, cal) if o.kld_scales else {}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Damage(measured, {k: dict(v) for k, v in errors.items() if v}, scales)


def _kld_scales(tensors: Sequence[layout.TensorInfo], errors: dict[str, dict[str, float]], stocks: Sequence[Path],
                cal: tune.Calibration) -> dict[str, float]:
    """Expected KLD per unit of error for each tensor: the tuner's scales per tensor kind and depth
    (:mod:`converters.ladder.kldfit`), fitted on the ladder's stock files scored on the calibration text
    (:class:`converters.ladder.tune.Calibration`). Without them, an imatrix-weighted error counts the same in every
    kind of tensor, and a plan that trades one kind's bytes for another's can measure worse than its baseline."""
    nl = kldfit.n_layers([t.name for t in tensors])
    groups = {t.name: kldfit.group(t.name, nl) for t in tensors}
    obs = []
    for f in stocks:
        types = tune.read_types(f)
        mine = {t.name: types[t.name] for t in tensors if types.get(t.name) in errors[t.name]}
        if len(mine) < len(tensors):  # a tensor of this file whose type was not measured: no observation
            continue
        s = cal.score(f)
        obs.append(kldfit.Observation(f.name, s.kld, s.err, kldfit.group_errors(mine, errors, groups)))
    if not obs:
        return {}
    fitted = kldfit.fit(obs, sorted(set(groups.values())))
    log.info("fit: KLD scales from %d stock files on the calibration text: %s", len(obs),
             ", ".join(f"{g} {v:.3g}" for g, v in sorted(fitted.scales.items())))
    return {t.name: fitted.scale(groups[t.name]) for t in tensors}


def _load(inp: FitInputs, o: FitOptions, path: Path, ctx: int) -> memory.Buffers:
    return memory.measure(inp.toolchain, path, ctx, kv_type=o.kv_type, threads=o.threads, timeout=o.timeout)


def _baseline(inp: FitInputs, o: FitOptions, b: budget_mod.FitBudget, att: memory.Attention,
              loads: list[dict[str, Any]]) -> tuple[LadderFile, memory.Buffers] | None:
    """The largest stock file measured to fit ``b`` (see the module doc); every load is appended to ``loads``."""
    tried = 0
    for f in stock_files(inp.ladder):
        if f.split or predicted_total(f, att, b.ctx, o.kv_type) > b.bytes * PREDICT_SLACK:
            continue
        if tried >= MAX_STOCK_LOADS:
            break
        tried += 1
        got = _load(inp, o, inp.workdir / f.path, b.ctx)
        loads.append({"type": f.type, "memory": got.to_json(), "fits": got.total <= b.bytes,
                      "predicted": predicted_total(f, att, b.ctx, o.kv_type)})
        if got.total <= b.bytes:
            return f, got
    return None


def plan_fit(m: Damage, b: budget_mod.FitBudget, baseline_file: Path, file_budget: int,
             extra: dict[str, Any], change_penalty: float = 0.0) -> layout.Layout:
    """The layout of least predicted damage within ``file_budget`` bytes of file, the baseline's types as stock."""
    stock = tune.read_types(baseline_file)
    size = baseline_file.stat().st_size
    planned = [t for t in m.tensors if t.name in stock]
    fixed = size - sum(layout.tensor_bytes(t, stock[t.name]) for t in planned)
    damage = m.damage()
    allowed = layout.keep_tied_embedding(planned, stock, {n: tuple(row) for n, row in damage.items()})
    damage = {n: {q: e for q, e in row.items() if q in allowed.get(n, row)} for n, row in damage.items()}
    return layout.plan_layout(b.type, planned, damage, file_budget, fixed,
                              stock_types={t.name: stock[t.name] for t in planned}, scales=m.scales, extra=extra,
                              change_penalty=change_penalty)


def largest_context(inp: FitInputs, o: FitOptions, b: budget_mod.FitBudget, att: memory.Attention, path: Path,
                    at_ctx: memory.Buffers) -> tuple[int, memory.Buffers | None, list[dict[str, Any]]]:
    """The largest context (at most the training context) whose load fits the budget, from the measured KV bytes per
    token (the formula's per-token bytes scaled by measured / predicted KV), confirmed by a load."""
    predicted_kv = memory.kv_bytes(att, b.ctx, o.kv_type)
    per_token = memory.kv_bytes_per_token(att, o.kv_type) * (at_ctx.kv / predicted_kv if predicted_kv else 1.0)
    tries: list[dict[str, Any]] = []
    if per_token <= 0:
        return at_ctx.ctx or b.ctx, at_ctx, tries
    fixed = at_ctx.total - per_token * memory.pad_cells(b.ctx)
    ctx = budget_mod.max_context(b.bytes, int(math.ceil(fixed)), per_token)
    if att.n_ctx_train:
        ctx = min(ctx, int(att.n_ctx_train))
    if at_ctx.total <= b.bytes:
        ctx = max(ctx, b.ctx)
    best: tuple[int, memory.Buffers | None] = (0, None)
    for _ in range(MAX_CONFIRM_LOADS):
        if ctx <= 0:
            break
        if memory.pad_cells(ctx) == memory.pad_cells(b.ctx):
            got = at_ctx
        else:
            got = _load(inp, o, path, ctx)
        tries.append({"ctx": ctx, "total": got.total})
        if got.total <= b.bytes:
            best = (ctx, got)
            break
        excess = got.total - b.bytes
        ctx = (ctx - int(math.ceil(excess / per_token)) - budget_mod.CTX_STEP) // budget_mod.CTX_STEP \
            * budget_mod.CTX_STEP
    return best[0], best[1], tries


def _one(inp: FitInputs, o: FitOptions, b: budget_mod.FitBudget, att: memory.Attention,
         measured: Callable[[], Damage], cal: tune.Calibration | None = None) -> tuple[dict[str, Any], list[Path]]:
    wd, lad = inp.workdir, inp.ladder
    t0 = time.monotonic()
    loads: list[dict[str, Any]] = []
    info: dict[str, Any] = {"budget": b.text, "budget_bytes": b.bytes, "ctx": b.ctx, "kv_type": o.kv_type,
                            "type": b.type, "attention": att.to_json(), "n_ctx_train": att.n_ctx_train,
                            "predicted": {"kv": memory.kv_bytes(att, b.ctx, o.kv_type),
                                          "compute": memory.compute_bytes(att, b.ctx)},
                            "stock_loads": loads}
    found = _baseline(inp, o, b, att, loads)
    if found is None:
        info.update(status="not built", reason="no stock file of the ladder fits this budget at its context")
        return info, []
    base, base_mem = found
    info.update(baseline=base.type, baseline_memory=base_mem.to_json())
    # the solver's budget is a file size: the file's bytes outside llama.cpp's model buffer (header) come back on top
    outside = int(base.size) - base_mem.model
    weights = budget_mod.weight_budget(b.bytes, base_mem.overhead, base_mem.model)
    file_budget = max(weights + outside, int(base.size))
    info.update(weight_budget=weights, margin=budget_mod.margin(b.bytes))
    rel_layout = names.fit_layout(lad.model_name, b.label)
    out = wd / names.fit(lad.model_name, b.label)
    m = measured()
    stock_types = tune.read_types(wd / base.path)
    rounds: list[dict[str, Any]] = []
    info["rounds"] = rounds
    penalty = 0.0
    for rnd in (1, 2):  # the tuner's confirm-and-shrink (converters.ladder.tune), against the baseline
        lay = plan_fit(m, b, wd / base.path, file_budget, change_penalty=penalty,
                       extra={"budget": b.text, "budget_bytes": b.bytes, "ctx": b.ctx, "kv_type": o.kv_type,
                              "baseline": base.type, "baseline_bytes": int(base.size),
                              "baseline_memory": base_mem.to_json()})
        changed = sum(1 for t, q in lay.types.items() if q != stock_types.get(t))
        row: dict[str, Any] = {"round": rnd, "penalty": penalty, "changed": changed, "predicted_kld": lay.damage,
                               "baseline_predicted_kld": lay.stock_damage}
        rounds.append(row)
        if changed == 0:
            info.update(status="not built", reason=f"within this budget no plan is predicted better than {base.type}")
            return info, []
        holders = [wd / f.path for f in lad.files if not f.split and (wd / f.path).is_file()]
        tune.build(lay, quants.get(base.type), inp.reference, wd, out, toolchain=inp.toolchain,
                   imatrix=inp.imatrix, threads=o.threads, timeout=o.timeout,
                   type_file=wd / names.fit_tensor_types(b.label), template=wd / base.path, files=holders)
        if not o.confirm or cal is None:
            break
        s_base, s_plan = cal.score(wd / base.path), cal.score(out, keep=False)
        cmp = tune.compare(s_base, s_plan)
        row.update(measured_kld=s_plan.kld, measured_kld_err=s_plan.err, baseline_kld=s_base.kld,
                   paired=cmp.to_json())
        if cmp.confirmed:
            break
        out.unlink(missing_ok=True)
        shortfall = cmp.shortfall(lay.stock_damage - lay.damage)  # the gain predicted and not measured
        if rnd == 2 or shortfall <= 0:
            info.update(status="not built", reason=f"no plan beat {base.type} on the calibration text by more than two "
                                                   "standard errors without a worse perplexity")
            return info, []
        penalty = shortfall / changed
    got = _load(inp, o, out, b.ctx)
    max_ctx, max_mem, tries = largest_context(inp, o, b, att, out, got)
    info.update(status="built", file=out.relative_to(wd).as_posix(), layout=rel_layout, bytes=out.stat().st_size,
                memory=got.to_json(), fits=got.total <= b.bytes, max_ctx=max_ctx,
                max_ctx_memory=max_mem.to_json() if max_mem else None, max_ctx_loads=tries,
                predicted_kld=lay.damage, baseline_predicted_kld=lay.stock_damage, optimal=lay.optimal,
                types=lay.type_counts(), seconds=round(time.monotonic() - t0, 3))
    records.write_json_atomic(wd / rel_layout, {**lay.to_json(), "memory": got.to_json(), "max_ctx": max_ctx})
    log.info("fit %s: %s, %s at %d tokens (budget %s), largest context %d", b.label, lay.describe().replace("\n", ";"),
             budget_mod.human(got.total), b.ctx, budget_mod.human(b.bytes), max_ctx)
    return info, [out, wd / rel_layout]


def _produce(inp: FitInputs, o: FitOptions, budgets: Sequence[budget_mod.FitBudget],
             ins: dict[str, Any]) -> records.StageRecord:
    t0 = time.monotonic()
    att = memory.Attention.read(inp.reference)
    cache: list[Damage] = []
    cal = calibration_for(inp, o)

    def measured() -> Damage:
        if not cache:
            t1 = time.monotonic()
            cache.append(_measurements(inp, o, inp.ladder, cal))
            summary["seconds"]["measure"] = round(time.monotonic() - t1, 3)
        return cache[0]

    summary: dict[str, Any] = {"budgets": {}, "seconds": {}, "margin": {"fraction": budget_mod.MARGIN_FRACTION,
                                                                       "bytes": budget_mod.MARGIN_BYTES}}
    outputs: list[Path] = []
    try:
        for i, b in enumerate(budgets):
            try:
                info, outs = _one(inp, o, b, att, measured, cal)
                outputs += outs
            except (InputError, CheckFailed, ParseError, ToolError, layout.Infeasible, tune.TuneStopped) as e:
                info = {"budget": b.text, "budget_bytes": b.bytes, "ctx": b.ctx, "status": "not built",
                        "reason": (str(e).splitlines() or [type(e).__name__])[0]}
                log.warning("fit %s: not built: %s", b.label, info["reason"])
            summary["budgets"][b.label] = info
            if inp.step:
                inp.step(f"fit {b.label}: {info['status']}", i + 1, len(budgets))
    finally:
        if cal is not None:
            cal.remove()  # the last stage that scores on the calibration text
    summary["seconds"]["total"] = round(time.monotonic() - t0, 3)
    return records.save(inp.workdir, STAGE, ins, outputs, time.monotonic() - t0, inp.toolchain.version,
                        extra=summary)
