"""Stage tune: per-tensor layouts measured on the model itself, one tuned file per size point.

The design, and why:

1. **Error per tensor and type, measured.** The BF16 reference is quantized once per candidate type with
   ``llama-quantize --pure --imatrix`` and one ``--tensor-type`` rule that sends every tensor to that type (the
   same quantizer, importance matrix and fallbacks the published files get). Each tensor is read back with
   gguf-py's reader and dequantizer and compared with the reference: the error is the importance-weighted squared
   error ``sum_col imp[col] * sum_row (w - q)^2`` with ``imp = in_sum2 / counts`` from the imatrix (the mean
   square of each input column on the calibration text), i.e. the expected squared change of the tensor's output
   on that text. Tensors without an imatrix entry (a token embedding is a lookup) weigh every column alike. A
   pair is only kept when the file really holds the tensor in that type (llama.cpp falls back for rows that do
   not divide into the type's blocks), so only valid pairs become candidates. The reference type itself costs 0
   and F16 is measured by rounding, without a program.
2. **Error to expected KLD, measured.** Errors of different tensor kinds do not hurt alike (a key projection
   and a down projection with the same squared error move the logits differently), so each kind group gets a
   scale fitted on a single-group probe: that group at its smallest measured type, every other tensor at Q8_0,
   mean KLD against the BF16 reference on the calibration text (``llama-perplexity --kl-divergence``, as
   :mod:`converters.ladder.evaluate` does on the evaluation text). With ``K0`` the all-Q8_0 file's KLD,
   ``scale = (K_probe - K0) / (E_group(probe) - E_group(Q8_0))``. The predicted damage of a tensor in a type is
   ``scale(kind) * error``; for small errors KLD is close to a quadratic form of the logit change, so damages
   of independent tensors add.
3. **Solve and build.** :mod:`converters.ladder.layout` picks the type per tensor that minimises the summed damage
   under the stock file's byte size (the stock file's own types are always measured, so the stock layout is one
   of the candidates and the prediction never loses);
   the plan is ``tune/<TYPE>-tuned.layout.json`` plus the ``--tensor-type-file`` given to llama-quantize with
   the size point's own type; the file's tensor types are read back and must equal the plan.
4. **Verified like every file.** The tuned file joins ``ladder.json`` as type ``<TYPE>-tuned`` (file
   ``<Model>-<TYPE>-tuned.gguf``), the evaluation measures it on the evaluation text (disjoint from the
   calibration text the scales were fitted on) and the gate publishes it only when its mean KLD beats the stock
   file's by more than the two measurement errors combined, at no more bytes (:func:`converters.ladder.layout.tuned_verdict`).

Tuning stops at ``time_budget`` seconds (the size points not reached get no tuned file and the record says
so). The probes score ``probe_chunks`` chunks of the calibration text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converters.core import names
from converters.formats import gguf_meta
from converters.ladder import evaluate
from converters.ladder import layout
from converters.core import quants, records
from converters.core.errors import CheckFailed, InputError
from converters.ladder.layout import TensorInfo
from converters.core.quants import QuantType
from converters.core.proc import run
from converters.llama.toolchain import Toolchain

log = logging.getLogger(__name__)

STAGE = "tune"
TUNE_DIR = names.TUNE_DIR
DEFAULT_PROBE_CHUNKS = 8
PROBE_BASE_TYPE = "Q8_0"

# single-group probes: tensor kinds measured together (a kind not listed is its own group)
GROUPS: dict[str, tuple[str, ...]] = {
    "attn_qk": ("attn_q", "attn_k"),
    "attn_v": ("attn_v",),
    "attn_output": ("attn_output",),
    "ffn_gate_up": ("ffn_gate", "ffn_up"),
    "ffn_down": ("ffn_down",),
    "token_embd": ("token_embd",),
    "output": ("output",),
}


def group_of(kind: str) -> str:
    for g, kinds in GROUPS.items():
        if kind in kinds:
            return g
    return kind


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
    probe_chunks: int = DEFAULT_PROBE_CHUNKS
    ctx: int = 512
    threads: int | None = None
    time_budget: float | None = None  # seconds for all measurements, probes and solves
    timeout: float | None = None  # per program


# --------------------------------------------------------------------------------------------------
# Reading GGUF files
# --------------------------------------------------------------------------------------------------
def read_types(path: Path) -> dict[str, str]:
    """Tensor name -> ggml type name, read back with gguf-py."""
    return gguf_meta.tensor_types(path)


def read_importance(imatrix: Path | None) -> dict[str, np.ndarray]:
    """The imatrix GGUF's mean squared activation per input column: ``in_sum2 / counts`` per tensor."""
    if imatrix is None:
        return {}
    ts = gguf_meta.tensors(imatrix)
    sums = {t.name[:-len(".in_sum2")]: t for t in ts if t.name.endswith(".in_sum2")}
    counts = {t.name[:-len(".counts")]: t for t in ts if t.name.endswith(".counts")}
    out: dict[str, np.ndarray] = {}
    for name, s in sums.items():
        c = counts.get(name)
        if c is None:
            continue
        v = np.asarray(s.data, dtype=np.float64).reshape(-1, int(s.shape[0]))  # (matrices, columns)
        n = np.asarray(c.data, dtype=np.float64).reshape(-1)
        n = np.where(n > 0, n, 1.0)[: v.shape[0]]
        out[name] = (v / n[:, None]).mean(axis=0)
    return out


def _f32(t: Any) -> np.ndarray:
    return np.asarray(gguf_meta.dequantize(t), dtype=np.float32).reshape(-1, int(t.shape[0]))


def weighted_error(ref: np.ndarray, q: np.ndarray, imp: np.ndarray | None) -> float:
    """``sum_col imp[col] * sum_row (ref - q)^2`` (imp = 1 without an imatrix entry)."""
    col = np.zeros(ref.shape[1], dtype=np.float64)
    for i in range(0, ref.shape[0], 2048):  # in slices: a large embedding must not be copied whole in float64
        d = ref[i:i + 2048].astype(np.float64) - q[i:i + 2048]
        col += np.einsum("ij,ij->j", d, d)
    return float(col.sum() if imp is None or imp.shape[0] != col.shape[0] else (col * imp).sum())


def catalogue(reference: Path, quantized: Path) -> list[TensorInfo]:
    """The tensors llama-quantize quantizes (those a Q8_0 file holds in another type than the reference)."""
    ref = {t.name: t for t in gguf_meta.tensors(reference)}
    out = []
    for t in gguf_meta.tensors(quantized):
        r = ref.get(t.name)
        if r is not None and t.tensor_type != r.tensor_type and len(t.shape) >= 2:
            out.append(TensorInfo(t.name, tuple(int(s) for s in t.shape)))
    return out


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Measurements:
    """What tuning measured: the tensors, error per tensor and type, the probes and the fitted scales."""

    tensors: list[TensorInfo]
    errors: dict[str, dict[str, float]]  # tensor -> type -> weighted squared error
    probes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # group -> {kld, err, ...}
    scales: dict[str, float] = dataclasses.field(default_factory=dict)  # group -> KLD per unit of error
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def damage(self) -> dict[str, dict[str, float]]:
        """Predicted expected KLD per tensor and type."""
        out = {}
        for t in self.tensors:
            s = self.scales.get(group_of(t.kind), 0.0)
            out[t.name] = {q: s * e for q, e in self.errors.get(t.name, {}).items()}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"tensors": [{"name": t.name, "shape": list(t.shape)} for t in self.tensors], "errors": self.errors,
                "probes": self.probes, "scales": self.scales, "seconds": self.seconds}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Measurements":
        return cls([TensorInfo(t["name"], tuple(t["shape"])) for t in d["tensors"]],
                   {k: dict(v) for k, v in d["errors"].items()}, dict(d.get("probes") or {}),
                   dict(d.get("scales") or {}), dict(d.get("seconds") or {}))


class Clock:
    def __init__(self, budget: float | None) -> None:
        self.started = time.monotonic()
        self.budget = budget

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def check(self, what: str) -> None:
        if self.budget is not None and self.elapsed > self.budget:
            raise TuneStopped(f"time budget of {self.budget:g} s spent before {what}")


def _quantize(tc: Toolchain, reference: Path, out: Path, ftype: str, *, workdir: Path, imatrix: Path | None,
              rules: Sequence[str] = (), type_file: Path | None = None, pure: bool = False,
              threads: int | None = None, timeout: float | None = None) -> float:
    argv: list[Any] = [tc.program("llama-quantize")]
    if imatrix is not None:
        argv += ["--imatrix", os.path.relpath(imatrix, workdir)]
    if pure:
        argv.append("--pure")
    for r in rules:
        argv += ["--tensor-type", r]
    if type_file is not None:
        argv += ["--tensor-type-file", os.path.abspath(type_file)]
    argv += [os.path.abspath(reference), os.path.abspath(out), ftype, str(threads or os.cpu_count() or 1)]
    return run(argv, timeout=timeout, cwd=workdir).seconds


def measure(reference: Path, workdir: Path, *, toolchain: Toolchain, imatrix: Path | None, calibration: Path,
            options: TuneOptions, clock: Clock | None = None,
            step: Callable[[str, int, int], None] | None = None) -> Measurements:
    """Errors per tensor and candidate type, then the per-group scales from single-group probes."""
    clock = clock or Clock(options.time_budget)
    scratch = workdir / TUNE_DIR / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    importance = read_importance(imatrix)
    ref_tensors = gguf_meta.tensors(reference)
    ref = {t.name: t for t in ref_tensors}
    ref_type = {t.name: t.tensor_type.name for t in ref_tensors}
    seconds: dict[str, float] = {}
    types = [q for q in options.candidates if q not in layout.UNQUANTIZED]
    if PROBE_BASE_TYPE not in types:
        types.append(PROBE_BASE_TYPE)
    types.sort(key=lambda q: q != PROBE_BASE_TYPE)  # Q8_0 first: it names the tensors and is the probes' base
    if imatrix is None:
        types = [q for q in types if q not in layout.NEEDS_IMATRIX]
    tensors: list[TensorInfo] = []
    errors: dict[str, dict[str, float]] = {}
    total = len(types)
    for i, q in enumerate(types):
        clock.check(f"measuring {q}")
        out = scratch / f"all-{q}.gguf"
        t0 = time.monotonic()
        _quantize(toolchain, reference, out, PROBE_BASE_TYPE, workdir=workdir, imatrix=imatrix, rules=[f".={q}"],
                  pure=True, threads=options.threads, timeout=options.timeout)
        if not tensors:
            tensors = catalogue(reference, out)
            for t in tensors:
                errors[t.name] = {}
                rt = ref_type[t.name]
                if rt in layout.UNQUANTIZED:
                    errors[t.name][rt] = 0.0
                if "F16" in options.candidates and rt != "F16":
                    w = _f32(ref[t.name])
                    errors[t.name]["F16"] = weighted_error(w, w.astype(np.float16).astype(np.float32),
                                                           importance.get(t.name))
        names = {t.name for t in tensors}
        for t in gguf_meta.tensors(out):
            if t.name in names and t.tensor_type.name == q:
                errors[t.name][q] = weighted_error(_f32(ref[t.name]), _f32(t), importance.get(t.name))
        if q != PROBE_BASE_TYPE:
            out.unlink()
        seconds[f"measure {q}"] = round(time.monotonic() - t0, 3)
        if step:
            step(f"measured {q}", i + 1, total)
    m = Measurements(tensors, errors, seconds=seconds)
    _probe(m, reference, workdir, toolchain=toolchain, imatrix=imatrix, calibration=calibration, options=options,
           clock=clock, base_file=scratch / f"all-{PROBE_BASE_TYPE}.gguf", step=step)
    return m


def _probe(m: Measurements, reference: Path, workdir: Path, *, toolchain: Toolchain, imatrix: Path | None,
           calibration: Path, options: TuneOptions, clock: Clock, base_file: Path,
           step: Callable[[str, int, int], None] | None) -> None:
    scratch = base_file.parent
    base_logits = scratch / "calibration.kld"
    t0 = time.monotonic()
    evaluate.run_base(toolchain, reference, calibration, base_logits, ctx=options.ctx, chunks=options.probe_chunks,
                      threads=options.threads)
    m.seconds["probe base"] = round(time.monotonic() - t0, 3)
    k0, s = evaluate.run_kld(toolchain, base_file, base_logits, ctx=options.ctx, threads=options.threads)
    m.seconds["probe Q8_0"] = round(s, 3)
    m.probes["all-Q8_0"] = {"kld_mean": k0.kld_mean, "kld_mean_err": k0.kld_mean_err}
    groups: dict[str, list[TensorInfo]] = {}
    for t in m.tensors:
        groups.setdefault(group_of(t.kind), []).append(t)
    total = len(groups)
    for i, (g, ts) in enumerate(groups.items()):
        clock.check(f"probing {g}")
        t0 = time.monotonic()
        probe_types = {}
        for t in ts:  # the smallest measured type: the clearest signal
            cands = [q for q in m.errors[t.name] if q not in layout.UNQUANTIZED]
            probe_types[t.name] = min(cands, key=lambda q: (layout.tensor_bytes(t, q), q)) if cands else PROBE_BASE_TYPE
        e_probe = math.fsum(m.errors[t.name].get(probe_types[t.name], 0.0) for t in ts)
        e_base = math.fsum(m.errors[t.name].get(PROBE_BASE_TYPE, 0.0) for t in ts)
        types = {t.name: probe_types.get(t.name, PROBE_BASE_TYPE) for t in m.tensors}
        types.update({t.name: PROBE_BASE_TYPE for t in m.tensors if t.name not in probe_types})
        tf = scratch / f"probe-{g}.txt"
        layout.write_tensor_type_file(tf, types)
        out = scratch / f"probe-{g}.gguf"
        _quantize(toolchain, reference, out, PROBE_BASE_TYPE, workdir=workdir, imatrix=imatrix, type_file=tf,
                  pure=True, threads=options.threads, timeout=options.timeout)
        k, _ = evaluate.run_kld(toolchain, out, base_logits, ctx=options.ctx, threads=options.threads)
        out.unlink()
        tf.unlink()
        delta = k.kld_mean - k0.kld_mean
        m.probes[g] = {"kld_mean": k.kld_mean, "kld_mean_err": k.kld_mean_err, "error": e_probe,
                       "error_q8_0": e_base, "types": sorted(set(probe_types.values()))}
        m.scales[g] = max(delta, 0.0) / (e_probe - e_base) if e_probe > e_base else 0.0
        m.seconds[f"probe {g}"] = round(time.monotonic() - t0, 3)
        if step:
            step(f"probed {g}", i + 1, total)
    # a probe lost in the noise (no measurable KLD) still must not make its group free: the smallest positive scale
    positive = [s for s in m.scales.values() if s > 0]
    floor = min(positive) if positive else 1.0
    for g in m.scales:
        if m.scales[g] <= 0:
            m.scales[g] = floor
            m.probes[g]["scale_floored"] = True
    base_logits.unlink(missing_ok=True)
    base_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Planning and building one size point
# --------------------------------------------------------------------------------------------------
def plan_point(m: Measurements, q: QuantType, stock_file: Path, *, margin: int = 1024) -> layout.Layout:
    """The layout for size point ``q``: the budget is the stock file's size (``margin`` bytes kept for metadata)."""
    stock = read_types(stock_file)
    size = stock_file.stat().st_size
    planned = [t for t in m.tensors if t.name in stock]
    fixed = size - sum(layout.tensor_bytes(t, stock[t.name]) for t in planned)
    damage = m.damage()
    return layout.plan_layout(q.name, planned, damage, size - margin, fixed,
                              stock_types={t.name: stock[t.name] for t in planned}, scales=m.scales,
                              extra={"stock_bytes": size, "stock_file": stock_file.name})


def build(layout_: layout.Layout, q: QuantType, reference: Path, workdir: Path, out: Path, *, toolchain: Toolchain,
          imatrix: Path | None, threads: int | None = None, timeout: float | None = None,
          type_file: Path | None = None) -> Path:
    """Quantize with the layout's ``--tensor-type-file`` (written to ``type_file``, default the size point's);
    check the file's types and size against the plan."""
    tdir = workdir / TUNE_DIR
    tdir.mkdir(parents=True, exist_ok=True)
    tf = type_file or workdir / names.tensor_types(q.name)
    layout.write_tensor_type_file(tf, layout_.types)
    tmp = records.tmp_path_for(out)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        _quantize(toolchain, reference, tmp, q.base_name, workdir=workdir, imatrix=imatrix, type_file=tf,
                  threads=threads, timeout=timeout)
        got = read_types(tmp)
        wrong = {n: (t, got.get(n)) for n, t in layout_.types.items() if got.get(n) != t}
        if wrong:
            raise CheckFailed("tune", f"{len(wrong)} tensor(s) not of the planned type, e.g. "
                              + ", ".join(f"{n}: {a} planned, {b} written" for n, (a, b) in list(wrong.items())[:3]))
        if tmp.stat().st_size > layout_.budget + 1024:
            raise CheckFailed("tune", f"{out.name} is {tmp.stat().st_size} bytes, over the budget of "
                              f"{layout_.budget + 1024}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def layout_path(workdir: Path, q: QuantType) -> Path:
    return workdir / names.layout(q.name)


def save_layout(workdir: Path, q: QuantType, lay: layout.Layout) -> Path:
    p = layout_path(workdir, q)
    p.parent.mkdir(parents=True, exist_ok=True)
    records.write_json_atomic(p, lay.to_json())
    return p


def load_measurements(workdir: Path) -> Measurements | None:
    p = workdir / names.MEASUREMENTS
    if not p.exists():
        return None
    return Measurements.from_json(json.loads(p.read_text()))


def save_measurements(workdir: Path, m: Measurements) -> Path:
    p = workdir / names.MEASUREMENTS
    p.parent.mkdir(parents=True, exist_ok=True)
    records.write_json_atomic(p, m.to_json())
    return p


def check_points(names: Sequence[str], ladder: Sequence[str]) -> tuple[QuantType, ...]:
    """The size points to tune: known types that are in the ladder (the stock file is the budget)."""
    out = []
    for n in names:
        q = quants.get(n)
        if q.name not in ladder:
            raise InputError(f"tune {q.name}: not in the ladder (the stock file of a size point sets its budget)")
        if q.name in ("BF16", "F16"):
            raise InputError(f"tune {q.name}: nothing to tune in an unquantized file")
        if q not in out:
            out.append(q)
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------
