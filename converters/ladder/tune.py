"""Stage tune: per-tensor layouts measured on the model itself, one tuned file per size point.

The design, and why (issue 21; issue 12's first version quantized the whole model once per candidate type and
probed each tensor group alone: 8.2x the stock files' cost, and one scale per kind missed Q3_K_M by 6x):

1. **Candidates around the stock layout.** For each size point, each tensor may take the valid types within one
   bits-per-weight step of its stock type (:func:`converters.ladder.layout.neighbours`), its stock type, and for
   ``token_embd``/``output`` also Q8_0 (the ``_L`` layout). Types in ``exclude`` are never a new choice (the
   benchmark excludes the types that match the source's own grid).
2. **Errors per tensor and type, measured cheaply** (:mod:`converters.ladder.tensorerr`): every missing pair in
   one run of ``ggufbot-tensorerr`` (ggml's own quantizer, on :data:`~converters.ladder.tensorerr.DEFAULT_ROWS`
   sampled rows per tensor); where that program cannot be built, read from the ladder's own files and the rest
   quantized whole in packed ``llama-quantize --pure`` runs; all cached by (reference, imatrix, calibration text,
   toolchain, tensor, type, rows, seed).
3. **Errors to expected KLD, fitted around the stock layout** (:mod:`converters.ladder.kldfit`): each size
   point's stock file is scored on ``probe_chunks`` chunks of the calibration text against the reference's
   logits; scales per tensor kind and depth band are fitted on those runs, and a plan's KLD is predicted as the
   stock file's measured KLD plus the scaled difference of the errors. These runs (the reference's logits and each
   stock file's score) are kept in the work dir (:class:`Calibration`) for the fit stage and a resumed run.
4. **Solve, build, confirm.** :mod:`converters.ladder.layout` picks the type per tensor that minimises the summed
   damage within the stock file's bytes (dominated types pruned first). The plan is built (:func:`build`:
   ``ggufbot-assemble`` writes llama-quantize's bytes, copying every tensor the ladder's files or the size points
   tuned before hold in its planned type and every row the error measurement quantized; its tensor types read back
   and checked) and scored on the same calibration chunks as the stock file; it is kept only when it beats
   the stock file by more than two paired standard errors (per-chunk differences when the KLD figures carry them)
   and its per-chunk ln PPL is not above the stock file's by more than two (the gate's rules, on this text).
   Otherwise the plan's run is added to the observations, the scales are refitted, and the plan is solved once more
   with a penalty on every change from the stock layout (shrunk toward stock); a second miss leaves the size point
   with its stock file only. With ``confirm`` off there is no calibration run at all (3 and 4's scoring): one scale
   for every group, each plan built once and judged by the evaluation's gate alone (the cheap mode: tuning then
   costs the error measurements, the solve and one build per size point).
5. **Verified like every file.** The tuned file joins ``ladder.json`` as type ``<TYPE>-tuned`` and the evaluation
   measures it on the evaluation text, disjoint from the calibration text, before the gate may publish it.

Tuning stops at ``time_budget`` seconds (the size points not reached get no tuned file and the record says so).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converters.core import names, quants, records
from converters.core.errors import CheckFailed, InputError, ToolchainError, ToolError
from converters.core.quants import QuantType
from converters.core.report import KldStats
from converters.ladder import assemble, evaluate, kldfit, layout, tensorerr
from converters.ladder.kldfit import Fit, Observation
from converters.ladder.layout import TensorInfo
from converters.ladder.tensorerr import read_importance, weighted_error  # noqa: F401  (the tuner's public API)
from converters.llama import native as llama_native
from converters.llama.toolchain import Toolchain

log = logging.getLogger(__name__)

STAGE = "tune"
TUNE_DIR = names.TUNE_DIR
DEFAULT_PROBE_CHUNKS = 8
# the stage's record: bump when the method changes (3: a tied token embedding never below its stock type; 4: errors
# on sampled rows by ggufbot-tensorerr, a plan with a worse perplexity on the calibration text not confirmed)
METHOD = 4
# ``[quantize] tune = ["default"]`` (the settings' default): these size points, where the ladder has them
DEFAULT = "default"
DEFAULT_POINTS = ("Q4_K_M", "Q3_K_M", "Q2_K")
L_TYPE = "Q8_0"  # the _L layouts' type of the token embedding and the output
L_KINDS = ("token_embd", "output")


def tuned_name(q: QuantType) -> str:
    return names.tuned_type(q.name)


def file_name(model_name: str, q: QuantType) -> str:
    return names.tuned(model_name, q.name)


class TuneStopped(Exception):
    """The time budget ran out."""


@dataclasses.dataclass(frozen=True)
class TuneOptions:
    size_points: tuple[str, ...]
    candidates: tuple[str, ...] = layout.DEFAULT_CANDIDATES
    exclude: tuple[str, ...] = ()  # never a new choice (the stock file's own types stay candidates)
    steps: int = 1  # bits-per-weight steps around each tensor's stock type
    probe_chunks: int = DEFAULT_PROBE_CHUNKS  # calibration chunks the stock files and plans are scored on
    ctx: int = 512
    confirm: bool = True  # score each plan on the calibration text; shrink toward stock when it does not confirm
    threads: int | None = None
    time_budget: float | None = None  # seconds for all measurements, calibration runs, solves and builds
    timeout: float | None = None  # per program
    cache_dir: Path | None = None  # where measured errors are kept (default: the work dir's tune/)
    rows: int = tensorerr.DEFAULT_ROWS  # rows measured per tensor (sampled; 0: whole tensors)


read_types = assemble.read_types
build = assemble.build  # the tuner's API (the fit stage builds with it too)


class Clock:
    """The time budget, and the seconds spent per kind of work (errors, calibration, solve, builds)."""

    def __init__(self, budget: float | None) -> None:
        self.started = time.monotonic()
        self.budget = budget
        self.spent: dict[str, float] = {}

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def check(self, what: str) -> None:
        if self.budget is not None and self.elapsed > self.budget:
            raise TuneStopped(f"time budget of {self.budget:g} s spent before {what}")

    def add(self, kind: str, seconds: float) -> None:
        self.spent[kind] = round(self.spent.get(kind, 0.0) + seconds, 3)


# --------------------------------------------------------------------------------------------------
# The model's tensors, their candidates, their errors (the API the memory-budget files share)
# --------------------------------------------------------------------------------------------------
def catalogue(reference: Path, quantized: Sequence[Path]) -> list[TensorInfo]:
    """The tensors llama-quantize quantizes: those at least one of ``quantized`` holds in another type than the
    reference (two or more dimensions), in the reference's order."""
    held: set[str] = set()
    ref = tensorerr.tensors(reference)
    ref_type = {t.name: t.tensor_type.name for t in ref}
    for f in quantized:
        held |= {n for n, q in read_types(f).items() if n in ref_type and q != ref_type[n]}
    return [TensorInfo(t.name, tuple(int(s) for s in t.shape)) for t in ref if t.name in held and len(t.shape) >= 2]


def candidates(tensors: Sequence[TensorInfo], stock: Mapping[str, str], options: TuneOptions, *,
               imatrix: bool) -> dict[str, tuple[str, ...]]:
    """Per tensor, the types the solver may choose at one size point (see the module doc, point 1)."""
    allowed = [q for q in options.candidates if q not in options.exclude]
    out = {}
    for t in tensors:
        st = stock[t.name]
        always = (L_TYPE,) if t.kind in L_KINDS and L_TYPE not in options.exclude else ()
        out[t.name] = layout.neighbours(t, st, allowed, steps=options.steps, imatrix=imatrix, always=always)
    return layout.keep_tied_embedding(tensors, stock, out)


@dataclasses.dataclass
class Measurer:
    """Errors per (tensor, type) on demand: the cache, then ggufbot's measuring program on sampled rows
    (:func:`converters.ladder.tensorerr.quantize_native`); where that program cannot be built, the ladder's files
    and packed quantize runs on whole tensors."""

    toolchain: Toolchain
    workdir: Path
    reference: Path
    imatrix: Path | None
    files: Sequence[Path]  # the ladder's stock files (not split) to read pairs from
    cache: tensorerr.ErrorCache
    weights: tensorerr.Weights
    threads: int | None = None
    timeout: float | None = None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # the native runs, or files + packed runs
    program: Path | None = None  # ggufbot-tensorerr; None: the files and packed runs
    store: tensorerr.RowStore | None = None  # the measured rows' quantized bytes, for the builds

    @classmethod
    def open(cls, toolchain: Toolchain, workdir: Path, reference: Path, imatrix: Path | None, calibration: Path,
             files: Sequence[Path], *, cache_dir: Path | None = None, threads: int | None = None,
             timeout: float | None = None, rows: int = tensorerr.DEFAULT_ROWS, native: bool = True,
             keep_rows: bool = False) -> "Measurer":
        """``rows``: at most this many rows measured per tensor (0: whole tensors); ``native``: use the measuring
        program (else, or when it cannot be built, whole tensors from the files and packed runs); ``keep_rows``: keep
        the measured rows' quantized bytes in the scratch dir (:attr:`store`) for :func:`build`."""
        program = None
        if native:
            try:
                program = llama_native.tensorerr_program(toolchain)
            except (ToolchainError, ToolError) as e:
                log.warning("tune: %s cannot be built (%s); measuring whole tensors with llama-quantize",
                            llama_native.TENSORERR, e)
        key = tensorerr.CacheKey(records.content_sha256(reference), records.content_sha256(imatrix) if imatrix else None,
                                 records.sha256_file(calibration), toolchain.version,
                                 rows=rows if program is not None else 0)
        cache = tensorerr.ErrorCache(cache_dir or workdir / TUNE_DIR, key)
        importance = tensorerr.read_importance(imatrix)
        token_rows = None
        embd = next((t for t in tensorerr.tensors(reference) if t.name == tensorerr.TOKEN_EMBD), None)
        if embd is not None and tensorerr.TOKEN_EMBD not in importance:
            token_rows = tensorerr.token_frequencies(toolchain, reference, calibration, int(embd.shape[1]),
                                                     timeout=timeout)
        store = tensorerr.RowStore.empty(workdir / TUNE_DIR / "scratch" / "rows") if keep_rows and program else None
        return cls(toolchain, workdir, reference, imatrix, files, cache, tensorerr.Weights(importance, token_rows),
                   threads, timeout, program=program, store=store)

    def held(self) -> set[tuple[str, str]]:
        """The (tensor, type) pairs one of the ladder's stock files holds: a build copies those tensors whole, so
        their measured rows are not kept."""
        return {(n, q) for f in self.files for n, q in read_types(f).items()}

    def errors(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, dict[str, float]]:
        """The error of every wanted pair llama.cpp can produce (pairs it cannot are left out)."""
        ref = {t.name: t for t in tensorerr.tensors(self.reference)}
        hits = sum(len(qs) for qs in wanted.values()) - sum(len(qs) for qs in self.cache.missing(wanted).values())
        for name, qs in self.cache.missing(wanted).items():  # unquantized types: no program needed
            for q in qs:
                rt = ref[name].tensor_type.name
                if q == rt:
                    self.cache.put(name, q, 0.0)
                elif q == "F16":  # rounding, no program
                    w = tensorerr.f32(ref[name])
                    self.cache.put(name, q, self.weights.error(name, w, w.astype(np.float16).astype(np.float32)))
                elif q in layout.UNQUANTIZED:
                    self.cache.put(name, q, None)
        if self.program is not None:
            t0 = time.monotonic()
            n_tensors, measured = tensorerr.quantize_native(
                self.program, self.reference, self.workdir / TUNE_DIR / "scratch", wanted, self.weights,
                tensorerr.read_imatrix(self.imatrix), self.cache, threads=self.threads, timeout=self.timeout,
                store=self.store, held=self.held() if self.store is not None else ())
            self.cache.save()
            self.seconds["native"] = round(self.seconds.get("native", 0.0) + time.monotonic() - t0, 3)
            for k, v in (("cached", hits), ("native_tensors", n_tensors), ("native", measured)):
                self.counts[k] = self.counts.get(k, 0) + v
            self.counts["rows_per_tensor"] = self.cache.key.rows
            return self.cache.table(wanted)
        t0 = time.monotonic()
        from_files = tensorerr.errors_from_files(self.reference, self.files, wanted, self.weights, self.cache)
        self.cache.save()
        t1 = time.monotonic()
        runs, packed = tensorerr.quantize_missing(self.toolchain, self.reference, self.workdir,
                                                  self.workdir / TUNE_DIR / "scratch", wanted, self.weights,
                                                  self.cache, imatrix=self.imatrix, threads=self.threads,
                                                  timeout=self.timeout)
        self.cache.save()
        self.seconds["from_files"] = round(self.seconds.get("from_files", 0.0) + t1 - t0, 3)
        self.seconds["packed"] = round(self.seconds.get("packed", 0.0) + time.monotonic() - t1, 3)
        for k, v in (("cached", hits), ("from_files", from_files), ("quantize_runs", runs), ("quantized", packed)):
            self.counts[k] = self.counts.get(k, 0) + v
        return self.cache.table(wanted)


def solve_budget(name: str, tensors: Sequence[TensorInfo], errors: Mapping[str, Mapping[str, float]],
                 fit: Fit, budget: int, fixed_bytes: int, *, stock_types: Mapping[str, str] | None = None,
                 change_penalty: float = 0.0, extra: Mapping[str, Any] | None = None) -> layout.Layout:
    """The layout with the least predicted KLD within ``budget`` bytes (``fixed_bytes`` of them outside the
    planned tensors), from measured errors and fitted scales."""
    groups = {t.name: kldfit.group(t.name, kldfit.n_layers([x.name for x in tensors])) for t in tensors}
    dmg = kldfit.damage({t.name: errors[t.name] for t in tensors}, groups, fit)
    return layout.plan_layout(name, tensors, dmg, budget, fixed_bytes, stock_types=stock_types,
                              scales=dict(fit.scales), extra=extra, change_penalty=change_penalty)


# --------------------------------------------------------------------------------------------------
# Calibration runs
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Scored:
    kld: float
    err: float
    chunks: tuple[float, ...]
    ln_ppl: tuple[float, ...] = ()  # per chunk, ln(PPL(file)/PPL(reference))

    @classmethod
    def of(cls, s: KldStats) -> "Scored":
        return cls(s.kld_mean, s.kld_mean_err, tuple(s.chunk_kld), tuple(s.chunk_ln_ppl_ratio))

    def to_json(self) -> dict[str, Any]:
        return {"kld": self.kld, "kld_err": self.err, "chunk_kld": list(self.chunks),
                "chunk_ln_ppl_ratio": list(self.ln_ppl)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Scored":
        return cls(d["kld"], d["kld_err"], tuple(d["chunk_kld"]), tuple(d.get("chunk_ln_ppl_ratio") or ()))


class Calibration:
    """Files scored on ``chunks`` chunks of the calibration text against the reference (never the evaluation text),
    for the tune and fit stages alike. The reference's logits (``tune/calibration-<key>.kld``) are made on first use
    and kept in the work dir with the score of every stock file by its content (``tune/calibration-<key>.json``),
    the key naming the reference, the text, the context, the chunks and the toolchain: the fit stage after the
    tuner, and a run resumed after a kill, score nothing twice. The work dir's cleanup removes them with it."""

    def __init__(self, toolchain: Toolchain, workdir: Path, reference: Path, calibration: Path, *, ctx: int,
                 chunks: int, threads: int | None = None, folder: Path | None = None) -> None:
        self.toolchain, self.reference, self.calibration = toolchain, reference, calibration
        self.ctx, self.chunks, self.threads = ctx, chunks, threads
        ident = {"reference": records.content_sha256(reference), "calibration": records.sha256_file(calibration),
                 "ctx": ctx, "chunks": chunks, "toolchain": toolchain.version}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        folder = folder or workdir / TUNE_DIR
        self.base_path = folder / f"calibration-{digest}.kld"
        self.scores_path = folder / f"calibration-{digest}.json"
        self.ident = ident
        self.scores: dict[str, Scored] = {}
        self.runs = 0  # llama-perplexity runs made (the base included); scores read back are not runs
        if self.scores_path.is_file() and self.base_path.is_file():
            try:
                d = json.loads(self.scores_path.read_text())
                if d.get("ident") == ident:
                    self.scores = {k: Scored.from_json(v) for k, v in d.get("scores", {}).items()}
            except (OSError, ValueError, KeyError, TypeError):
                self.scores = {}

    def base(self) -> Path:
        """The reference's logits on the calibration text, made when missing (written whole, then moved in place)."""
        if not self.base_path.is_file():
            self.base_path.parent.mkdir(parents=True, exist_ok=True)
            with records.atomic_output(self.base_path) as tmp:
                evaluate.run_base(self.toolchain, self.reference, self.calibration, tmp, ctx=self.ctx,
                                  chunks=self.chunks, threads=self.threads)
            self.runs += 1
        return self.base_path

    def score(self, f: Path, *, keep: bool = True) -> Scored:
        """``f`` scored against the reference; ``keep``: a stock file, read back by its content next time."""
        sha = records.content_sha256(f) if keep else None
        if sha is not None and sha in self.scores:
            return self.scores[sha]
        s = Scored.of(evaluate.run_kld(self.toolchain, f, self.base(), ctx=self.ctx, threads=self.threads)[0])
        self.runs += 1
        if sha is not None:
            self.scores[sha] = s
            records.write_json_atomic(self.scores_path, {"ident": self.ident,
                                                         "scores": {k: v.to_json() for k, v in self.scores.items()}})
        return s

    def remove(self) -> None:
        self.base_path.unlink(missing_ok=True)
        self.scores_path.unlink(missing_ok=True)


def compare(stock: Scored, plan: Scored) -> kldfit.Paired:
    return kldfit.paired(stock.chunks, plan.chunks, (stock.kld, stock.err), (plan.kld, plan.err),
                         stock_ln_ppl=stock.ln_ppl, plan_ln_ppl=plan.ln_ppl)


# --------------------------------------------------------------------------------------------------
# Building one plan
# --------------------------------------------------------------------------------------------------
def fixed_bytes(stock_file: Path, tensors: Sequence[TensorInfo], stock: Mapping[str, str]) -> int:
    return stock_file.stat().st_size - sum(layout.tensor_bytes(t, stock[t.name]) for t in tensors)


def layout_path(workdir: Path, q: QuantType) -> Path:
    return workdir / names.layout(q.name)


def save_layout(workdir: Path, q: QuantType, lay: layout.Layout) -> Path:
    p = layout_path(workdir, q)
    p.parent.mkdir(parents=True, exist_ok=True)
    records.write_json_atomic(p, lay.to_json())
    return p


def point_names(names_: Sequence[str], ladder: str | Sequence[str] | None) -> tuple[str, ...]:
    """:func:`check_points` for a ladder as the settings and the command line give it (``"default"``, a list)."""
    return tuple(q.name for q in check_points(names_, [q.name for q in quants.parse_ladder(ladder)]))


def check_points(names_: Sequence[str], ladder: Sequence[str]) -> tuple[QuantType, ...]:
    """The size points to tune: known types that are in the ladder (the stock file is the budget); ``default``
    stands for those of :data:`DEFAULT_POINTS` the ladder has (none: nothing to tune)."""
    out: list[QuantType] = []
    for n in names_:
        if n.strip().lower() == DEFAULT:
            out += [q for q in map(quants.get, DEFAULT_POINTS) if q.name in ladder and q not in out]
            continue
        q = quants.get(n)
        if q.name not in ladder:
            raise InputError(f"tune {q.name}: not in the ladder (the stock file of a size point sets its budget)")
        if q.name in ("BF16", "F16"):
            raise InputError(f"tune {q.name}: nothing to tune in an unquantized file")
        if q not in out:
            out.append(q)
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# The size points
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Inputs:
    """What the stage hands to :func:`run_points`: the work dir's files and the toolchain."""

    workdir: Path
    reference: Path
    imatrix: Path | None
    calibration: Path
    model_name: str
    stock_files: Mapping[str, Path]  # every stock file of the ladder that is not split, by type name
    toolchain: Toolchain


@dataclasses.dataclass
class _Run:
    inp: Inputs
    options: TuneOptions
    clock: Clock
    step: Callable[[str, int, int], None] | None
    tensors: list[TensorInfo] = dataclasses.field(default_factory=list)
    groups: dict[str, str] = dataclasses.field(default_factory=dict)
    errors: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    obs: list[Observation] = dataclasses.field(default_factory=list)
    stock: dict[str, Scored] = dataclasses.field(default_factory=dict)  # each stock file on the calibration text
    cal: Calibration | None = None
    built: list[Path] = dataclasses.field(default_factory=list)  # the tuned files kept so far (builds copy from them)
    store: tensorerr.RowStore | None = None  # the measured rows' quantized bytes (builds copy them)

    def timed(self, kind: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            self.clock.add(kind, time.monotonic() - t0)

    def score(self, model: Path, *, stock: bool = False) -> Scored:
        assert self.cal is not None
        cal = self.cal
        return self.timed("calibration", lambda: cal.score(model, keep=stock))

    def group_errors(self, types: Mapping[str, str]) -> dict[str, float]:
        return kldfit.group_errors({t.name: types[t.name] for t in self.tensors}, self.errors, self.groups)


def run_points(inp: Inputs, points: Sequence[QuantType], options: TuneOptions, *,
               step: Callable[[str, int, int], None] | None = None) -> tuple[list[Path], dict[str, Any]]:
    """Tune every size point (see the module doc); returns the tuned files and the stage record's summary."""
    r = _Run(inp, options, Clock(options.time_budget), step)
    summary: dict[str, Any] = {"method": METHOD, "points": {}, "exclude": list(options.exclude)}
    outputs: list[Path] = []
    scratch = inp.workdir / TUNE_DIR / "scratch"
    try:
        stock, cands = _measure(r, points, summary)
        fit = kldfit.fit(r.obs, sorted(set(r.groups.values()))) if r.obs else uniform(r.groups)
        summary["fit"] = fit.to_json()
        for i, q in enumerate(points):
            if q.name not in stock:
                continue
            try:
                r.clock.check(f"tuning {q.name}")
                out, info, fit = _point(r, q, stock[q.name], cands[q.name], fit)
                if out is not None:
                    outputs.append(out)
                    r.built.append(out)
                summary["points"][q.name] = info
            except (InputError, CheckFailed, layout.Infeasible) as e:
                summary["points"][q.name] = {"status": "not built", "reason": str(e)}
                log.warning("tune %s: not built: %s", q.name, e)
            if step:
                step(f"tuned {q.name}", i + 1, len(points))
        summary["refit"] = fit.to_json()
    except TuneStopped as e:
        summary["stopped"] = str(e)
        for q in points:
            summary["points"].setdefault(q.name, {"status": "stopped", "reason": str(e)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    records.write_json_atomic(inp.workdir / names.MEASUREMENTS, {
        "tensors": [{"name": t.name, "shape": list(t.shape), "group": r.groups.get(t.name)} for t in r.tensors],
        "errors": r.errors, "observations": [o.to_json() for o in r.obs], "fit": summary.get("refit"),
        "counts": summary.get("counts")})
    summary["seconds"] = {**r.clock.spent, "total": round(r.clock.elapsed, 3)}
    summary["calibration_runs"] = r.cal.runs if r.cal is not None else 0
    return outputs, summary


def _measure(r: _Run, points: Sequence[QuantType], summary: dict[str, Any]
             ) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, tuple[str, ...]]]]:
    """Errors of every candidate pair, the base logits and each stock file's calibration KLD."""
    inp, o = r.inp, r.options
    stock: dict[str, dict[str, str]] = {}
    for q in points:
        if q.name not in inp.stock_files:
            summary["points"][q.name] = {"status": "not built", "reason": f"{q.name} is split into parts; tuning of "
                                                                          "split files is not supported"}
            continue
        stock[q.name] = read_types(inp.stock_files[q.name])
    r.tensors = catalogue(inp.reference, [inp.stock_files[n] for n in stock])
    nl = kldfit.n_layers([t.name for t in r.tensors])
    r.groups = {t.name: kldfit.group(t.name, nl) for t in r.tensors}
    cands = {n: candidates(r.tensors, st, o, imatrix=inp.imatrix is not None) for n, st in stock.items()}
    wanted: dict[str, list[str]] = {}
    for c in cands.values():
        for name, qs in c.items():
            wanted.setdefault(name, [])
            wanted[name] += [q for q in qs if q not in wanted[name]]
    r.clock.check("measuring errors")
    m = r.timed("errors", lambda: Measurer.open(inp.toolchain, inp.workdir, inp.reference, inp.imatrix,
                                                inp.calibration, list(inp.stock_files.values()),
                                                cache_dir=o.cache_dir, threads=o.threads, timeout=o.timeout,
                                                rows=o.rows, keep_rows=True))
    r.errors = r.timed("errors", lambda: m.errors(wanted))
    r.store = m.store
    summary["counts"] = {"tensors": len(r.tensors), "pairs": sum(len(v) for v in wanted.values()), **m.counts,
                         "seconds": m.seconds}
    if r.step:
        r.step("measured errors", 0, len(points))
    if not o.confirm:  # no calibration runs: one scale for every group; the evaluation's gate is the only check
        return stock, cands
    r.clock.check("the calibration runs")
    r.cal = Calibration(inp.toolchain, inp.workdir, inp.reference, inp.calibration, ctx=o.ctx, chunks=o.probe_chunks,
                        threads=o.threads)
    for n, st in stock.items():
        s = r.stock[n] = r.score(inp.stock_files[n], stock=True)
        summary["points"][n] = {"stock_calibration": s.to_json()}
        r.obs.append(Observation(n, s.kld, s.err, r.group_errors(st)))
    return stock, cands


def uniform(groups: Mapping[str, str]) -> Fit:
    """One scale for every group (no calibration run to fit them on): the solver then minimises the summed
    importance-weighted error, which needs no scale."""
    return Fit({g: 1.0 for g in sorted(set(groups.values()))}, 1.0, 0.0, 0)


def _point(r: _Run, q: QuantType, stock: Mapping[str, str], cands: Mapping[str, Sequence[str]], fit: Fit
           ) -> tuple[Path | None, dict[str, Any], Fit]:
    """Solve, build and confirm one size point (at most two rounds); the file when it is kept. Without
    ``confirm``: solved and built once, judged by the evaluation's gate alone."""
    inp, o = r.inp, r.options
    stock_file = inp.stock_files[q.name]
    stock_types = {t.name: stock[t.name] for t in r.tensors}
    stock_obs = next((x for x in r.obs if x.name == q.name), None)
    stock_scored = r.stock.get(q.name)
    errors = {t.name: {c: r.errors[t.name][c] for c in cands[t.name] if c in r.errors[t.name]} for t in r.tensors}
    size = stock_file.stat().st_size
    fixed = fixed_bytes(stock_file, r.tensors, stock_types)
    out = inp.workdir / file_name(inp.model_name, q)
    info: dict[str, Any] = {"stock_calibration": stock_scored.to_json() if stock_scored else None, "rounds": []}
    penalty = 0.0
    last: dict[str, str] | None = None
    for rnd in (1, 2):
        lay = r.timed("solve", lambda: solve_budget(q.name, r.tensors, errors, fit, size, fixed,
                                                     stock_types=stock_types, change_penalty=penalty,
                                                     extra={"stock_bytes": size, "stock_file": stock_file.name}))
        changed = sum(1 for t in r.tensors if lay.types[t.name] != stock_types[t.name])
        predicted = kldfit.predict(stock_obs, r.group_errors(lay.types), fit) if stock_obs else None
        row: dict[str, Any] = {"round": rnd, "changed": changed, "penalty": penalty, "predicted_kld": predicted,
                               "bytes": lay.bytes, "types": lay.type_counts()}
        info["rounds"].append(row)
        if changed == 0 or lay.types == last:
            row["result"] = "the stock layout" if changed == 0 else "the same plan again"
            break
        last = lay.types
        r.clock.check(f"building {q.name}")
        r.timed("builds", lambda: build(lay, q, inp.reference, inp.workdir, out, toolchain=inp.toolchain,
                                        imatrix=inp.imatrix, threads=o.threads, timeout=o.timeout,
                                        template=stock_file, files=[*inp.stock_files.values(), *r.built],
                                        store=r.store))
        if stock_obs is None or stock_scored is None:  # not confirmed on the calibration text (confirm off)
            rel = save_layout(inp.workdir, q, lay).relative_to(inp.workdir).as_posix()
            info.update({"status": "built", "file": out.relative_to(inp.workdir).as_posix(), "layout": rel,
                         "bytes": out.stat().st_size, "budget": lay.budget, "predicted_kld": None,
                         "measured_kld": None, "stock_kld": None, "optimal": lay.optimal, "confirmed": False})
            log.info("tune %s (not confirmed): %s", q.name, lay.describe().replace("\n", ";"))
            return out, info, fit
        plan = r.score(out)
        cmp = compare(stock_scored, plan)
        row.update({"measured_kld": plan.kld, "measured_kld_err": plan.err, "paired": cmp.to_json()})
        r.obs.append(Observation(f"{q.name}-tuned-{rnd}", plan.kld, plan.err, r.group_errors(lay.types)))
        if cmp.confirmed:
            lay = dataclasses.replace(lay, extra={**dict(lay.extra), "calibration": {
                "chunks": o.probe_chunks, "ctx": o.ctx, "stock_kld": stock_scored.kld, "predicted_kld": predicted,
                "measured_kld": plan.kld, "measured_kld_err": plan.err, "paired": cmp.to_json(), "round": rnd}})
            rel = save_layout(inp.workdir, q, lay).relative_to(inp.workdir).as_posix()
            info.update({"status": "built", "file": out.relative_to(inp.workdir).as_posix(), "layout": rel,
                         "bytes": out.stat().st_size, "budget": lay.budget, "predicted_kld": predicted,
                         "measured_kld": plan.kld, "stock_kld": stock_scored.kld, "optimal": lay.optimal})
            log.info("tune %s: %s", q.name, lay.describe().replace("\n", ";"))
            return out, info, fit
        out.unlink(missing_ok=True)
        # not confirmed: refit on every run so far, and charge each change its share of the shortfall
        shortfall = cmp.shortfall(stock_obs.kld - predicted)
        fit = kldfit.fit(r.obs, sorted(set(r.groups.values())))
        if shortfall <= 0:
            row["result"] = "gain as predicted but within the noise"
            break
        penalty = shortfall / changed
    info.update({"status": "not built", "reason": "no plan beat the stock file on the calibration text by more "
                                                  "than two standard errors without a worse perplexity"})
    return None, info, fit

