"""Measure every quant of a ladder against its reference, check it, gate it, and write report.json.

The measurements are llama.cpp's own: ``llama-perplexity --kl-divergence-base`` stores the reference
(BF16) model's log-probabilities over the evaluation text once; ``--kl-divergence`` then scores each quant
against that file (each quant is read once). The output is parsed into :class:`~converters.core.report.KldStats`;
output that cannot be parsed raises :class:`~converters.core.errors.ParseError` (a figure is never a silent 0).

The converter itself can be wrong (rope, norms, tokenizer) in a way GGUF-against-GGUF cannot see, so the
reference's stored log-probabilities are also compared with the source checkpoint run in ``transformers``
on the same token ids (top-1 agreement and mean KL divergence), for every model size: one that does not fit
in memory is run with part of its weights on disk (accelerate's offload). The source model is untrusted input:
it is loaded and run in a child with memory, CPU-time and time limits, offline (:mod:`converters.formats.hfchild`), as
is the source tokenizer the checks use.

The gate (:func:`judge`, a pure function) marks a file failed when its figures are not finite, when it is
far above the ladder's own curve (:mod:`converters.ladder.curve`), when its mean KLD is above the ceiling for its
type, or when one of its checks failed; an order inversion is a note. When the BF16-vs-source comparison or
the tokenizer check fails, or the comparison could not run (unless ``require_source_check`` is off), the
report says ``publishable: false``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from converters.formats import checkpoint as checkpoint_mod
from converters.ladder import curve
from converters.formats import hfmodel
from converters.ladder import layout
from converters.llama import mmproj
from converters.core import quants
from converters.core import records
from converters.llama import verify
from converters.core import proc
from converters.llama import toolchain as tc_mod
from converters.core.errors import (DiskSpaceError, GgufbotError, InputError, ParseError, ToolError, UnknownName,
                               UnsupportedModel)
from converters.core.hooks import NULL_HOOKS, PROGRESS, Hooks
from converters.core.report import FAILED, PASSED, SKIPPED, Check, FileResult, KldStats, Report, TextInfo
from converters.core.workdir import CalibrationInfo, Ladder, LadderFile, WorkDir

log = logging.getLogger(__name__)

STAGE = "evaluate"
DEFAULT_CHUNKS = 64  # chunks of ``ctx`` tokens when not given: about 16k scored tokens at ctx 512
KLD_TIMEOUT = 48 * 3600
TOKENIZE_TIMEOUT = 1800
DISK_MARGIN = 256 << 20
N_PREDICT = 96  # bound on the smoke-test generation (and on the length of the reference's chat reply)

# BF16-vs-source comparison: pass when top-1 agreement is at least this and mean KLD at most this.
COMPARE_MIN_TOP1 = 0.95
COMPARE_MAX_KLD = 0.02
COMPARE_F32_MAX_PARAMS = 1_500_000_000  # larger models run in bfloat16 on the transformers side


# --------------------------------------------------------------------------------------------------
# Parsing llama-perplexity's output
# --------------------------------------------------------------------------------------------------

_NUM = r"([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf))"
_PM = _NUM + r"\s*±\s*" + _NUM

_KLD_FIELDS: tuple[tuple[str, str, int], ...] = (
    # (regex, figure names, how many numbers)
    (r"Mean PPL\(Q\)\s*:\s*" + _PM, "ppl ppl_err", 2),
    (r"Mean PPL\(base\)\s*:\s*" + _PM, "ppl_base ppl_base_err", 2),
    (r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*" + _PM, "ln_ppl_ratio ln_ppl_ratio_err", 2),
    (r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*" + _PM, "ppl_ratio ppl_ratio_err", 2),
    (r"Mean PPL\(Q\)-PPL\(base\)\s*:\s*" + _PM, "ppl_diff ppl_diff_err", 2),
    (r"Mean\s+KLD:\s*" + _PM, "kld_mean kld_mean_err", 2),
    (r"Maximum KLD:\s*" + _NUM, "kld_max", 1),
    (r"99\.9%\s+KLD:\s*" + _NUM, "kld_p999", 1),
    (r"99\.0%\s+KLD:\s*" + _NUM, "kld_p99", 1),
    (r"Median\s+KLD:\s*" + _NUM, "kld_median", 1),
    (r"Mean\s+Δp:\s*" + _PM + r"\s*%", "dp_mean dp_mean_err", 2),
    (r"RMS Δp\s*:\s*" + _PM + r"\s*%", "rms_dp rms_dp_err", 2),
    (r"Same top p:\s*" + _PM + r"\s*%", "same_top_p same_top_p_err", 2),
)
_PERCENT = {"dp_mean", "dp_mean_err", "rms_dp", "rms_dp_err", "same_top_p", "same_top_p_err"}


def _float(s: str) -> float:
    return float(s.lower().lstrip("+"))


def parse_kld_output(text: str) -> KldStats:
    """The final statistics of ``llama-perplexity --kl-divergence`` (stdout and stderr together)."""
    if "====== KL divergence statistics ======" not in text:
        errors = [ln for ln in text.splitlines() if re.search(r"\b(error|failed|inconsistent)\b", ln, re.I)]
        hint = errors[-1].strip() if errors else "no statistics block (fewer than 100 tokens scored?)"
        raise ParseError(f"llama-perplexity --kl-divergence printed no KL divergence statistics: {hint}")
    values: dict[str, Any] = {}
    for pattern, names, _n in _KLD_FIELDS:
        m = re.search(pattern, text, re.I)
        if not m:
            raise ParseError(f"llama-perplexity output has no {names.split()[0]!r} line (pattern {pattern!r})")
        for name, raw in zip(names.split(), m.groups()):
            v = _float(raw)
            if name in _PERCENT:
                v = round(v / 100.0, 12) if math.isfinite(v) else v / 100.0
            values[name] = v
    m = re.search(r"Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\):\s*" + _NUM + r"\s*%", text, re.I)
    values["ppl_correlation"] = round(_float(m.group(1)) / 100.0, 12) if m else None
    chunk_rows = re.findall(r"^\s*(\d+)\s+" + _PM, text, re.M | re.I)
    if not chunk_rows:
        raise ParseError("llama-perplexity output has no per-chunk table")
    values["chunks"] = int(chunk_rows[-1][0])
    return KldStats(**values)


def parse_base_output(text: str) -> tuple[float, float]:
    """PPL ± error of the reference from ``llama-perplexity --kl-divergence-base`` (its final estimate)."""
    m = re.search(r"Final estimate: PPL = " + _NUM + r" \+/- " + _NUM, text, re.I)
    if not m:
        errors = [ln for ln in text.splitlines() if re.search(r"\b(error|failed|need at least)\b", ln, re.I)]
        hint = errors[-1].strip() if errors else "no final estimate"
        raise ParseError(f"llama-perplexity --kl-divergence-base did not finish: {hint}")
    return _float(m.group(1)), _float(m.group(2))


# --------------------------------------------------------------------------------------------------
# The base-logits file (format written by tools/perplexity/perplexity.cpp)
# --------------------------------------------------------------------------------------------------
# "_logits_" | n_ctx u32 | n_vocab i32 | n_chunk i32 | tokens i32[n_chunk*n_ctx] |
# per chunk, per scored position (n_ctx - 1 - n_ctx/2 of them): nv = 2*((n_vocab+1)/2) + 4 uint16, the
# first four holding two float32 (scale, min_log_prob), then log p_i = scale * q_i + min_log_prob.

LOGITS_MAGIC = b"_logits_"


def scored_per_chunk(ctx: int) -> int:
    return ctx - 1 - ctx // 2


def base_logits_bytes(n_vocab: int, ctx: int, chunks: int) -> int:
    nv = 2 * ((n_vocab + 1) // 2) + 4
    return 8 + 12 + 4 * ctx * chunks + chunks * scored_per_chunk(ctx) * nv * 2


@dataclasses.dataclass(frozen=True)
class BaseLogits:
    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int

    @property
    def nv(self) -> int:
        return 2 * ((self.n_vocab + 1) // 2) + 4

    @property
    def header_bytes(self) -> int:
        return 20 + 4 * self.n_ctx * self.n_chunk

    @classmethod
    def open(cls, path: Path) -> "BaseLogits":
        import numpy as np

        with open(path, "rb") as f:
            head = f.read(20)
        if len(head) < 20 or head[:8] != LOGITS_MAGIC:
            raise InputError(f"{path.name} is not a llama.cpp base-logits file")
        n_ctx, n_vocab, n_chunk = (int(x) for x in np.frombuffer(head[8:20], dtype="<i4"))
        bl = cls(path, n_ctx, n_vocab, n_chunk)
        expected = base_logits_bytes(n_vocab, n_ctx, n_chunk)
        if path.stat().st_size != expected:
            raise InputError(f"{path.name}: {path.stat().st_size} bytes, expected {expected} for "
                             f"{n_chunk} chunks of {n_ctx} tokens and {n_vocab} vocabulary entries")
        return bl

    def tokens(self, chunk: int):
        import numpy as np

        return np.fromfile(self.path, dtype="<i4", count=self.n_ctx, offset=20 + 4 * self.n_ctx * chunk)

    def log_probs(self, chunk: int):
        """float64 [scored positions, n_vocab] log-probabilities of the reference for one chunk."""
        import numpy as np

        rows = scored_per_chunk(self.n_ctx)
        off = self.header_bytes + chunk * rows * self.nv * 2
        q = np.fromfile(self.path, dtype="<u2", count=rows * self.nv, offset=off).reshape(rows, self.nv)
        head = np.ascontiguousarray(q[:, :4]).view("<f4").reshape(rows, 2).astype(np.float64)
        return head[:, :1] * q[:, 4:4 + self.n_vocab].astype(np.float64) + head[:, 1:2]


# --------------------------------------------------------------------------------------------------
# The BF16 reference against the source checkpoint in transformers
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompareSpec:
    """How the reference is compared with the source: on how many chunks, with which BOS, up to which size."""

    chunks: int
    add_bos: bool
    bos_id: int | None
    parameters: int | None
    max_memory: int | None = None  # bytes the source model may use in RAM (None: what is available now)
    offload_dir: Path | None = None  # where weights beyond ``max_memory`` go (None: a folder beside the source)
    threads: int | None = None
    min_top1: float = COMPARE_MIN_TOP1
    max_kld: float = COMPARE_MAX_KLD

    def offload(self, dtype: Any, source_dir: Path) -> hfmodel.Offload | None:
        """How to load the source: in memory when it fits, else with its weights partly on disk."""
        budget = self.max_memory if self.max_memory is not None else hfmodel.available_memory() * 3 // 4
        if not hfmodel.needs_offload(self.parameters, dtype, budget):
            return None
        return hfmodel.Offload(budget, self.offload_dir or records.tmp_path_for(source_dir.parent / "offload"))


def not_checked(why: str, **data: Any) -> Check:
    """A comparison that could not run: ``skipped``, and the ladder is not publishable unless a setting allows it."""
    return Check.skip(f"not checked: {why}"[:400], **data)


def _source_log_probs(model: Any, base: BaseLogits, spec: CompareSpec) -> tuple[Any, int, int, int]:
    """Per-token KLD(GGUF || transformers) over the compared chunks, top-1 agreements, tokens, chunks."""
    import numpy as np
    import torch

    n = min(spec.chunks, base.n_chunk)
    first = base.n_ctx // 2
    klds: list[Any] = []
    agree = total = 0
    for c in range(n):
        ids = base.tokens(c).astype(np.int64)
        if spec.add_bos and spec.bos_id is not None:
            ids[0] = spec.bos_id
        with torch.no_grad():
            logits = model(torch.from_numpy(ids)[None, :]).logits[0, first:base.n_ctx - 1].float()
        hf = torch.log_softmax(logits, dim=-1).double().numpy()
        gg = base.log_probs(c)
        if hf.shape[1] < base.n_vocab:  # a padded GGUF vocabulary: extra entries have no HF logit
            gg = gg[:, :hf.shape[1]]
        hf = hf[:, :gg.shape[1]]
        p = np.where(gg > -16.0, np.exp(gg), 0.0)  # llama.cpp's cut-off for stored log-probabilities
        klds.append((p * (gg - hf)).sum(axis=1))
        agree += int((gg.argmax(axis=1) == hf.argmax(axis=1)).sum())
        total += gg.shape[0]
    return np.concatenate(klds), agree, total, n


# The child that runs the source model (converters.formats.hfchild): its memory is the budget the model may take in RAM
# (beyond it, weights go to disk) plus room for torch, the activations and the log-probabilities of a chunk
COMPARE_HEADROOM = 2 << 30
COMPARE_MIN_SECONDS = 1800.0
COMPARE_SECONDS_PER_GB = 600.0  # of 16-bit weights


def compare_limits(spec: CompareSpec, base: BaseLogits, budget: int) -> tuple[Any, float]:
    """The source model's child: (limits, wall-clock seconds). Memory: ``budget`` plus the headroom and six
    float64 copies of one chunk's logits (``RLIMIT_DATA``, which torch's address-space reservations do not
    reach; see :mod:`converters.formats.hfchild`); time: scaled from the model's size; CPU time: that on every thread."""
    from converters.formats import hfchild

    chunk = base.n_ctx * base.n_vocab * 8 * 6
    seconds = max(COMPARE_MIN_SECONDS, COMPARE_SECONDS_PER_GB * 2 * (spec.parameters or 0) / 1e9)
    threads = spec.threads or os.cpu_count() or 1
    return hfchild.ChildLimits(cpu_seconds=int(seconds * threads), data_bytes=budget + COMPARE_HEADROOM + chunk), \
        seconds


def compare_with_source(source_dir: Path, base: BaseLogits, spec: CompareSpec) -> Check:
    """Top-1 agreement and mean KLD(GGUF || transformers) on the same tokens as the stored reference run. The
    source model is loaded and run in a child (:mod:`converters.formats.hfchild`) with memory, CPU-time and time limits,
    offline; a child that hits a limit leaves the comparison not checked, with the reason."""
    from converters.formats import hfchild

    budget = spec.max_memory if spec.max_memory is not None else hfmodel.available_memory() * 3 // 4
    offload_dir = spec.offload_dir or records.tmp_path_for(Path(source_dir).parent / "offload")
    request = {"op": "compare", "source_dir": str(source_dir),
               "base": {"path": str(base.path), "n_ctx": base.n_ctx, "n_vocab": base.n_vocab,
                        "n_chunk": base.n_chunk},
               "spec": {**dataclasses.asdict(spec), "max_memory": budget, "offload_dir": str(offload_dir)}}
    limits, seconds = compare_limits(spec, base, budget)
    try:
        out = hfchild.call(request, entry=compare_here, limits=limits, timeout=seconds)
    except hfchild.ChildFailed as e:
        shutil.rmtree(offload_dir, ignore_errors=True)  # the child's own clean-up did not run
        return not_checked(f"the source model could not be run within its limits: {e.message}")
    if out.get("error") == "load":
        return not_checked(f"transformers cannot load the source model ({out['type']}: {out['message']})")
    if "error" in out:
        return not_checked(f"the source model could not be run ({out.get('type', out['error'])}: {out['message']})")
    agree, total, n = int(out["agree"]), int(out["total"]), int(out["chunks"])
    offload = bool(out["offloaded"])
    kld_mean, kld_err, kld_max = out["kld_mean"], out["kld_mean_err"], out["kld_max"]
    dtype = out["dtype"]
    top1 = agree / total
    top1_err = math.sqrt(top1 * (1 - top1) / max(1, total - 1))
    data = {"top1_agreement": top1, "top1_agreement_err": top1_err, "kld_mean": kld_mean,
            "kld_mean_err": kld_err, "kld_max": kld_max, "tokens": total, "chunks": n, "dtype": dtype,
            "offloaded": offload, "min_top1": spec.min_top1, "max_kld": spec.max_kld}
    summary = (f"top-1 agreement {100 * top1:.2f} ± {100 * top1_err:.2f} %, mean KLD {data['kld_mean']:.5f} "
               f"on {total} tokens ({n} chunks, transformers {data['dtype']}"
               f"{', weights partly on disk' if offload else ''})")
    if not all(math.isfinite(x) for x in (top1, data["kld_mean"])):
        return Check.fail(f"BF16 GGUF and source disagree: figures not finite ({summary})", **data)
    if top1 < spec.min_top1 or data["kld_mean"] > spec.max_kld:
        return Check.fail(f"BF16 GGUF and source disagree (a converter bug: rope, norms, tokenizer?): {summary}; "
                          f"limits: top-1 >= {100 * spec.min_top1:.0f} %, KLD <= {spec.max_kld}", **data)
    return Check.ok(summary, **data)


def compare_here(request: Mapping[str, Any]) -> dict[str, Any]:
    """The child's work (``converters.formats.hfchild``): load the source model within the memory budget (the rest of its
    weights on disk), run it on the stored reference's tokens, return the figures (or ``error``: ``load`` when
    transformers cannot load it, ``run`` when it could not be run)."""
    source_dir = Path(request["source_dir"])
    b = request["base"]
    base = BaseLogits(Path(b["path"]), int(b["n_ctx"]), int(b["n_vocab"]), int(b["n_chunk"]))
    sp = dict(request["spec"])
    spec = CompareSpec(**{**sp, "offload_dir": Path(sp["offload_dir"]) if sp.get("offload_dir") else None})
    dtype = hfmodel.pick_dtype(hfmodel.CPU, parameters=spec.parameters, f32_max_params=COMPARE_F32_MAX_PARAMS)
    hfmodel.set_threads(spec.threads)
    offload = spec.offload(dtype, source_dir)
    try:
        model = hfmodel.load_causal_lm(source_dir, dtype=dtype, offload=offload)
        model.eval()
        kld, agree, total, n = _source_log_probs(model, base, spec)
    except UnsupportedModel as e:  # an architecture transformers cannot run: not checked, not a crash
        cause = e.__cause__ or e
        return {"error": "load", "type": type(cause).__name__, "message": str(cause)}
    except (RuntimeError, MemoryError, ValueError, OSError) as e:  # e.g. out of memory or disk during the run
        return {"error": "run", "type": type(e).__name__, "message": str(e)}
    finally:
        model = None
        if offload is not None:
            shutil.rmtree(offload.folder, ignore_errors=True)
    return {"agree": agree, "total": total, "chunks": n, "kld_mean": float(kld.mean()),
            "kld_mean_err": float(kld.std(ddof=1) / math.sqrt(len(kld))) if len(kld) > 1 else None,
            "kld_max": float(kld.max()), "dtype": hfmodel.dtype_name(dtype), "offloaded": offload is not None}


# --------------------------------------------------------------------------------------------------
# The gate (pure)
# --------------------------------------------------------------------------------------------------


def default_ceiling(bpw: float) -> float:
    """Mean-KLD ceiling by nominal bits per weight: generous (small models lose the most), never absurd."""
    for bits, ceiling in ((7.5, 0.05), (6.0, 0.10), (5.0, 0.20), (4.0, 0.40), (3.0, 0.80), (2.0, 1.50)):
        if bpw >= bits:
            return ceiling
    return 3.0


def nominal_bits(f: FileResult) -> float | None:
    if f.bpw_nominal is not None:
        return float(f.bpw_nominal)
    try:
        return quants.get(f.type).bpw
    except UnknownName:
        return f.bpw


def ceiling_for(f: FileResult, overrides: Mapping[str, float] | None = None) -> float | None:
    if overrides:
        for k, v in overrides.items():
            if k.upper() == f.type.upper():
                return float(v)
        if "default" in overrides:
            return float(overrides["default"])
    bits = nominal_bits(f)
    return default_ceiling(bits) if bits is not None else None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The gate's verdict: the reasons each file fails (empty: it passes) and notes on the ladder as a whole."""

    reasons: dict[str, list[str]]
    notes: list[str]


def _file_reasons(f: FileResult, ceilings: Mapping[str, float] | None, job_checks: Mapping[str, Check]) -> list[str]:
    """A file's own failures: its measurement, its ceiling, its checks and the reference's checks."""
    why: list[str] = []
    if f.error:
        why.append(f"measurement failed: {f.error}")
    elif f.stats is None:
        why.append("not measured")
    elif bad := f.stats.non_finite():
        why.append("figures are not finite: " + ", ".join(bad))
    else:
        c = ceiling_for(f, ceilings)
        if c is not None and f.stats.kld_mean > c:
            why.append(f"mean KLD {f.stats.kld_mean:.4f} ± {f.stats.kld_mean_err:.4f} is above the "
                       f"{f.type} ceiling of {c:g}")
    why += [f"{name} check failed: {c.detail}" for name, c in f.checks.items() if c.status == FAILED]
    why += [f"{name} check failed on the reference: {c.detail}" for name, c in job_checks.items()
            if c.status == FAILED]
    return why


def curve_points(files: Sequence[FileResult]) -> list[curve.Point]:
    """The measured files as points of the ladder's curve (files without finite figures are left out)."""
    out = []
    for f in files:
        bits = nominal_bits(f)
        if layout.is_tuned(f.type):  # judged against its stock file instead (tuned_reasons)
            continue
        if f.stats is not None and not f.stats.non_finite() and bits is not None:
            out.append(curve.Point(f.type, float(bits), f.stats.kld_mean, f.stats.kld_mean_err))
    return out


def judge(files: Sequence[FileResult], ceilings: Mapping[str, float] | None = None, *,
          job_checks: Mapping[str, Check] | None = None, rules: curve.CurveRules = curve.DEFAULT_RULES) -> Verdict:
    """Pure: reads the figures and checks only. A file fails on its own figures and checks, or when it is far
    above the ladder's own curve (:mod:`converters.ladder.curve`); an order inversion is a note, not a failure."""
    out = {f.type: _file_reasons(f, ceilings, job_checks or {}) for f in files}
    for key, why in tuned_reasons(files).items():
        out[key].append(why)
    points = curve_points(files)
    far = curve.outliers(points, rules)
    for key, outlier in far.items():
        out[key].append(outlier.reason())
    return Verdict(out, curve.inversions(points, rules, skip=set(far)))


def tuned_reasons(files: Sequence[FileResult]) -> dict[str, str]:
    """A per-tensor tuned file (``<TYPE>-tuned``) is published only when it beats its stock file's mean KLD by
    more than the measurement error at no more bytes (:func:`converters.ladder.layout.tuned_verdict`)."""
    by_type = {f.type: f for f in files}
    out = {}
    for f in files:
        if not layout.is_tuned(f.type):
            continue
        s = by_type.get(layout.stock_of(f.type))
        ok = s is not None and s.stats is not None and not s.stats.non_finite()
        why = layout.tuned_verdict(s.stats.kld_mean if ok else None, s.stats.kld_mean_err if ok else None,
                                   s.size if ok else None,
                                   f.stats.kld_mean if f.stats is not None else None,
                                   f.stats.kld_mean_err if f.stats is not None else None, f.size)
        if why is not None:
            out[f.type] = f"not better than {layout.stock_of(f.type)}: {why}"
    return out


def gate(files: Sequence[FileResult], ceilings: Mapping[str, float] | None = None, *,
         job_checks: Mapping[str, Check] | None = None,
         rules: curve.CurveRules = curve.DEFAULT_RULES) -> dict[str, list[str]]:
    """Reasons each file fails (an empty list: it passes); see :func:`judge`."""
    return judge(files, ceilings, job_checks=job_checks, rules=rules).reasons


def expected_klds(files: Sequence[FileResult],
                  rules: curve.CurveRules = curve.DEFAULT_RULES) -> dict[str, float | None]:
    """The mean KLD the ladder's curve (without its outliers) predicts for each file; None without a curve."""
    points = curve_points(files)
    far = curve.outliers(points, rules)
    kept = [p for p in points if p.key not in far]
    return {p.key: (e.kld if (e := curve.expected(p, kept, rules)) is not None else None) for p in points}


def publishable(checks: Mapping[str, Check], *, require_source_check: bool = True) -> tuple[bool, list[str]]:
    """Nothing is published when the conversion itself is suspect: BF16-vs-source or tokenizer failed, or (unless
    ``require_source_check`` is off) the BF16-vs-source comparison was skipped; nor when a vision-language model's
    projector failed its check."""
    reasons = []
    src = checks.get("bf16_vs_source")
    if require_source_check and src is not None and src.status == SKIPPED:
        reasons.append(f"the BF16 conversion was not checked against the source model ({src.detail}); "
                       "require_source_check = false publishes it anyway")
    for name, what in (("bf16_vs_source", "the BF16 conversion disagrees with the source model"),
                       ("tokenizer", "the GGUF tokenizer differs from the source tokenizer")):
        c = checks.get(name)
        if c is None:
            reasons.append(f"{name} check did not run")
        elif c.status == FAILED:
            reasons.append(f"{what}: {c.detail}")
    proj = checks.get(mmproj.CHECK)  # only a vision-language model has one
    if proj is not None and proj.status == FAILED:
        reasons.append(f"the vision projector does not work: {proj.detail}")
    return not reasons, reasons


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def _sha256_text(path: Path) -> str:
    return records.sha256_file(path)


def count_tokens(tc: tc_mod.Toolchain, gguf: Path, text: Path) -> int:
    res = proc.run([tc.program("llama-tokenize"), "-m", gguf, "-f", text, "--ids", "--show-count", "--log-disable"],
                     timeout=TOKENIZE_TIMEOUT, keep_output=20_000)
    m = re.search(r"Total number of tokens:\s*(\d+)", res.stdout)
    if not m:
        raise ParseError("llama-tokenize printed no token count")
    return int(m.group(1))


def _tool_versions(tc: tc_mod.Toolchain) -> dict[str, str | None]:
    out: dict[str, str | None] = {"llama.cpp": tc.version, "llama.cpp_commit": tc.commit}
    for dist in ("ggufbot", "transformers", "torch", "gguf", "jinja2", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _ladder_identity(ladder: Ladder) -> dict[str, Any]:
    """ladder.json without its timings (rewritten by every run of the quantize stage, finished or skipped)."""
    d = ladder.to_json()
    d.pop("seconds", None)
    d["files"] = [{k: v for k, v in f.items() if k != "seconds"} for f in d.get("files", [])]
    return d


def _fingerprint(path: Path | None, cache_dir: Path) -> dict[str, Any] | None:
    return records.fingerprint_file(path, cache_dir) if path is not None and path.exists() else None


# --------------------------------------------------------------------------------------------------
# Running llama-perplexity
# --------------------------------------------------------------------------------------------------


def _perplexity_argv(tc: tc_mod.Toolchain, model: Path, threads: int | None) -> list[Any]:
    argv: list[Any] = [tc.program("llama-perplexity"), "-m", model]
    if threads:
        argv += ["-t", str(threads)]
    return argv


def _run_parsed(argv: list[Any], parse: Callable[[str], Any]) -> tuple[Any, float]:
    """Run and parse; a run whose output cannot be parsed is repeated once before ParseError is raised.

    (llama.cpp prints through a logging thread; a lost final block would otherwise fail a good file.)
    """
    seconds = 0.0
    for attempt in (1, 2):
        res = proc.run(argv, timeout=KLD_TIMEOUT)
        seconds += res.seconds
        try:
            return parse(res.stdout + "\n" + res.stderr), seconds
        except ParseError as e:
            if attempt == 2:
                raise
            log.warning("evaluate: %s; running %s once more", e, Path(str(argv[0])).name)
    raise AssertionError("unreachable")


def run_base(tc: tc_mod.Toolchain, model: Path, text: Path, out: Path, *, ctx: int, chunks: int,
             threads: int | None = None) -> tuple[float, float, float]:
    """Store the reference's log-probabilities in ``out``; return (PPL, PPL error, seconds)."""
    argv = _perplexity_argv(tc, model, threads) + ["-f", text, "-c", str(ctx), "--chunks", str(chunks),
                                                    "--kl-divergence-base", out]
    (ppl, err), seconds = _run_parsed(argv, parse_base_output)
    if not out.exists():
        raise ParseError("llama-perplexity did not write the base-logits file")
    return ppl, err, seconds


def run_kld(tc: tc_mod.Toolchain, model: Path, base: Path, *, ctx: int,
            threads: int | None = None) -> tuple[KldStats, float]:
    """Score ``model`` against the stored reference log-probabilities: (figures, seconds)."""
    argv = _perplexity_argv(tc, model, threads) + ["-c", str(ctx), "--kl-divergence-base", base, "--kl-divergence"]
    stats, seconds = _run_parsed(argv, parse_kld_output)
    return stats, seconds


# --------------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What to evaluate with. ``reference_logits``: a base-logits file to measure against instead of the work
    dir's own reference (for pruned or distilled variants: the teacher's BF16); it is read, never deleted.
    ``eval_text_name`` / ``eval_text_source``: how the report names the text (a URL or hf:// address is
    recorded; a local path never is). ``keep_base_logits``: move the base-logits file there instead of
    deleting it (benchmarks, tests)."""

    eval_text: Path
    calibration_text: Path | None = None
    chunks: int | None = None
    ctx: int = 512
    threads: int | None = None
    source_dir: Path | None = None
    reference_logits: Path | None = None
    hf_compare_max_memory: int | None = None  # bytes of RAM for the source model (None: 3/4 of what is available)
    require_source_check: bool = True  # a skipped BF16-vs-source comparison makes the ladder not publishable
    hf_compare_chunks: int = 2
    ceilings: dict[str, float] | None = None
    eval_text_name: str | None = None
    eval_text_source: str | None = None
    keep_base_logits: Path | None = None


@dataclasses.dataclass(frozen=True)
class _Job:
    """The validated inputs of one evaluation."""

    wd: WorkDir
    ladder: Ladder
    opts: EvalOptions
    eval_text: Path
    eval_sha: str
    cal_sha: str | None
    src_path: Path | None
    reference: Path
    tc: tc_mod.Toolchain
    hooks: Hooks
    content: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # WorkDir.content: what is measured

    @property
    def calibration(self) -> CalibrationInfo | None:
        return self.ladder.imatrix.calibration if self.ladder.imatrix is not None else None

    def step(self, text: str, done: int, total: int) -> None:
        self.hooks.step(STAGE, done, total, text)


@dataclasses.dataclass(frozen=True)
class _Scoring:
    """The tokens every file is scored on: the base-logits file and its shape."""

    ctx: int
    n_chunks: int
    text_tokens: int
    base_path: Path
    own_base: Path | None  # written by this run (removed at the end), None when given


def run(workdir: Path | WorkDir, options: EvalOptions, *, toolchain: tc_mod.Toolchain | None = None,
        hooks: Hooks = NULL_HOOKS) -> Report:
    """Evaluate and check every file of ``workdir/ladder.json``; write report.json and the chart; return the report.

    Progress goes to ``hooks.step("evaluate", done, total, what)``, which may stop the run between steps.
    """
    started = time.monotonic()
    job = _prepare(WorkDir(workdir), options, toolchain, hooks)
    inputs = _record_inputs(job)
    done = records.complete(job.wd.path, STAGE, inputs)
    if done is not None and job.wd.has_report():
        log.info("evaluate: %s already evaluated for these inputs; skipped", _model_name(job))
        return job.wd.report()
    seconds: dict[str, float] = {}
    ref_facts = verify.GgufFacts.read(job.reference)
    for stale in job.wd.path.glob(f"{records.TMP_MARK}*/base-logits*.kld"):  # left by a killed evaluation
        _remove_scratch(stale)
    t0 = time.monotonic()
    text_tokens = count_tokens(job.tc, job.reference, job.eval_text)
    seconds["tokenize"] = time.monotonic() - t0
    ref_block: dict[str, Any] = {"type": job.ladder.reference.type, "path": job.ladder.reference.path,
                                 "size": job.reference.stat().st_size,
                                 "sha256": job.content.get(job.ladder.reference.path, {}).get("sha256")}
    scoring = _scoring(job, len(ref_facts.tokens), text_tokens, ref_block)
    checks: dict[str, Check] = {}
    files = _measure(job, scoring, ref_facts, ref_block, checks, seconds)
    total_steps = len(job.ladder.files) + 3
    job.step("checks", total_steps - 1, total_steps)
    t0 = time.monotonic()
    notes = _check(job, ref_facts, files, checks)
    seconds["checks"] = time.monotonic() - t0
    report = _report(job, scoring, files, checks, ref_block, seconds)
    report.notes = notes
    _write(job, report, inputs, started)
    hooks.emit(STAGE, PROGRESS, done=total_steps, total=total_steps, text="done")
    log.info("evaluate: %s: %d/%d files passed, publishable=%s (%.0f s)", report.model_name,
             sum(f.status == PASSED for f in files), len(files), report.publishable, seconds["total"])
    return report


def _model_name(job: _Job) -> str:
    return job.ladder.model_name or job.wd.name


def _prepare(wd: WorkDir, opts: EvalOptions, toolchain: tc_mod.Toolchain | None, hooks: Hooks) -> _Job:
    """Read the ladder and refuse bad inputs before any long run."""
    eval_text = Path(opts.eval_text)
    ladder = wd.ladder()
    if not eval_text.is_file():
        raise InputError(f"evaluation text not found: {eval_text}")
    eval_sha = _sha256_text(eval_text)
    cal_sha = None
    if opts.calibration_text is not None:
        if Path(opts.calibration_text).resolve() == eval_text.resolve():
            raise InputError("the evaluation text is the calibration text: a quant must not be judged on the text "
                             "it was calibrated on")
        cal_sha = _sha256_text(Path(opts.calibration_text))
    cal = ladder.imatrix.calibration if ladder.imatrix is not None else None
    if eval_sha in {cal_sha, cal.sha256 if cal is not None else None}:
        raise InputError(f"the evaluation text {eval_text.name} has the same content as the calibration text: a quant "
                         "must not be judged on the text it was calibrated on")
    if opts.chunks is not None and opts.chunks < 1:
        raise InputError(f"chunks must be at least 1, not {opts.chunks}")
    for k in opts.ceilings or {}:
        if k != "default":
            quants.get(k)  # UnknownName for a typo
    src_path = opts.source_dir or (Path(ladder.source.path) if ladder.source.path else None)
    tc = toolchain or tc_mod.find(required=True)
    assert tc is not None
    reference = wd.path / ladder.reference.path
    if not reference.exists():
        raise InputError(f"the reference GGUF {ladder.reference.path} is missing from {wd.path}")
    verify.require_sandboxed_templates(reference)  # a work dir from elsewhere: its templates pass before any program
    return _Job(wd=wd, ladder=ladder, opts=opts, eval_text=eval_text, eval_sha=eval_sha, cal_sha=cal_sha,
                src_path=src_path, reference=reference, tc=tc, hooks=hooks, content=wd.content(ladder))


def _record_inputs(job: _Job) -> dict[str, Any]:
    o = job.opts
    # every file's full content (a quant changed in place, same size, is measured again) and the source's files
    source = checkpoint_mod.files_fingerprint(job.src_path, job.wd.path) if job.src_path else None
    return {"ladder": _ladder_identity(job.ladder), "files": job.content, "source": source,
            "eval_text": job.eval_sha, "chunks": o.chunks, "ctx": o.ctx,
            "reference_logits": _fingerprint(o.reference_logits, job.wd.path), "ceilings": o.ceilings or {},
            "hf_compare_max_memory": o.hf_compare_max_memory, "hf_compare_chunks": o.hf_compare_chunks,
            "require_source_check": o.require_source_check,
            "source_dir": str(job.src_path) if job.src_path else None, "toolchain": job.tc.version}


def _scoring(job: _Job, n_vocab: int, text_tokens: int, ref_block: dict[str, Any]) -> _Scoring:
    """Given base logits (their shape decides), or the chunks this run stores the reference's logits for."""
    o = job.opts
    if o.reference_logits is not None:
        base = BaseLogits.open(Path(o.reference_logits))
        if base.n_vocab != n_vocab:
            raise InputError(f"reference logits have {base.n_vocab} vocabulary entries, the model {n_vocab}")
        ref_block["logits"] = {"name": Path(o.reference_logits).name, "chunks": base.n_chunk, "ctx": base.n_ctx,
                               "given": True}
        return _Scoring(base.n_ctx, base.n_chunk, text_tokens, Path(o.reference_logits), None)
    ctx = o.ctx
    available = text_tokens // ctx
    if available < 2:
        raise InputError(f"the evaluation text {job.eval_text.name} has {text_tokens} tokens: at least {2 * ctx} are "
                         f"needed for a context of {ctx}")
    n_chunks = min(o.chunks or DEFAULT_CHUNKS, available)
    if n_chunks * scored_per_chunk(ctx) < 100:
        n_chunks = min(available, -(-100 // scored_per_chunk(ctx)))  # llama.cpp reports nothing below 100 tokens
    need = base_logits_bytes(n_vocab, ctx, n_chunks)
    free = shutil.disk_usage(job.wd.path).free
    if free < need + DISK_MARGIN:
        raise DiskSpaceError(str(job.wd.path), need + DISK_MARGIN, free)
    own = records.tmp_path_for(job.wd.path / "base-logits.kld")
    own.parent.mkdir(parents=True, exist_ok=True)
    return _Scoring(ctx, n_chunks, text_tokens, own, own)


def _measure(job: _Job, scoring: _Scoring, ref_facts: verify.GgufFacts, ref_block: dict[str, Any],
             checks: dict[str, Check], seconds: dict[str, float]) -> list[FileResult]:
    """The reference runs, then every quant against the reference; the base logits removed (or kept) after."""
    try:
        _reference_runs(job, scoring, ref_facts, ref_block, checks, seconds)
        files = [_measure_file(job, scoring, lf, i + 2, len(job.ladder.files) + 3)
                 for i, lf in enumerate(job.ladder.files)]
        if "ppl" not in ref_block:
            first = next((f.stats for f in files if f.stats), None)
            if first is not None:
                ref_block.update(ppl=first.ppl_base, ppl_err=first.ppl_base_err)
    finally:
        own = scoring.own_base
        if own is not None:
            if job.opts.keep_base_logits is not None and own.exists():
                shutil.move(own, job.opts.keep_base_logits)
            _remove_scratch(own)
    seconds["kld"] = sum(f.seconds.get("kld", 0.0) for f in files)
    return files


def _reference_runs(job: _Job, scoring: _Scoring, ref_facts: verify.GgufFacts, ref_block: dict[str, Any],
                    checks: dict[str, Check], seconds: dict[str, float]) -> None:
    """Store the reference's log-probabilities, compare it with the source, measure it against given logits."""
    total = len(job.ladder.files) + 3
    o = job.opts
    if scoring.own_base is not None:
        job.step("base logits", 0, total)
        log.info("evaluate: base logits of %s over %d chunks of %d tokens (%.2f GB)", job.reference.name,
                 scoring.n_chunks, scoring.ctx,
                 base_logits_bytes(len(ref_facts.tokens), scoring.ctx, scoring.n_chunks) / 1e9)
        ppl, ppl_err, secs = run_base(job.tc, job.reference, job.eval_text, scoring.own_base, ctx=scoring.ctx,
                                      chunks=scoring.n_chunks, threads=o.threads)
        ref_block.update(ppl=ppl, ppl_err=ppl_err)
        seconds["base_logits"] = secs
    job.step("bf16 vs source", 1, total)
    t0 = time.monotonic()
    if job.src_path is None or not job.src_path.is_dir():
        checks["bf16_vs_source"] = Check.fail("the source checkpoint is not available, so the conversion cannot "
                                              "be compared with it")
    else:
        checks["bf16_vs_source"] = _compare(job, ref_facts, scoring)
    seconds["source_comparison"] = time.monotonic() - t0
    if o.reference_logits is not None:  # the variant's own reference, measured against the teacher
        try:
            stats, secs = run_kld(job.tc, job.reference, scoring.base_path, ctx=scoring.ctx, threads=o.threads)
            ref_block.update(dict(stats.figures().items()))
            ref_block.update(ppl=stats.ppl, ppl_err=stats.ppl_err)
            seconds["reference_kld"] = secs
        except (ToolError, ParseError) as e:
            ref_block["error"] = e.short()


def _measure_file(job: _Job, scoring: _Scoring, lf: LadderFile, step: int, total: int) -> FileResult:
    """One quant's figures against the reference (a failed run is recorded in the result, not raised)."""
    job.step(f"kld {lf.type}", step, total)
    fr = FileResult(type=lf.type, path=lf.path, size=int(lf.size or 0), bpw=lf.bpw, bpw_nominal=lf.bpw_nominal,
                    parts=[{"path": p, **job.content[p]} for p in lf.all_parts if p in job.content])
    fr.sha256 = fr.parts[0]["sha256"] if fr.parts and fr.parts[0]["path"] == lf.path else None
    path = job.wd.path / lf.path
    if not path.exists():
        fr.error = f"{lf.path} is missing"
    else:
        try:
            fr.stats, fr.seconds["kld"] = run_kld(job.tc, path, scoring.base_path, ctx=scoring.ctx,
                                                  threads=job.opts.threads)
        except ToolError as e:
            fr.error = verify.tool_error_reason(e)
        except ParseError as e:
            fr.error = str(e)
    log.info("evaluate: %s %s", lf.type, f"KLD {fr.stats.kld_mean:.5f} ± {fr.stats.kld_mean_err:.5f}"
             if fr.stats else f"failed: {fr.error}")
    return fr


def _check(job: _Job, ref_facts: verify.GgufFacts, files: Sequence[FileResult],
           checks: dict[str, Check]) -> list[str]:
    """The checks (into ``checks`` and each file's), then the gate's verdict on every file; returns its notes."""
    job_checks, file_checks = _run_checks(job, ref_facts, files)
    checks.update(job_checks)
    for f in files:
        f.checks.update(file_checks.get(f.type, {}))
    per_job = {k: v for k, v in checks.items() if k in ("chat_template", "special_tokens", "end_of_reply")}
    verdict = judge(files, job.opts.ceilings, job_checks=per_job)
    for f in files:
        f.reasons = verdict.reasons[f.type]
        f.status = FAILED if f.reasons else PASSED
    return verdict.notes


def _settings(job: _Job, scoring: _Scoring, files: Sequence[FileResult]) -> dict[str, Any]:
    o = job.opts
    return {"chunks": scoring.n_chunks, "chunks_asked": o.chunks, "ctx": scoring.ctx, "threads": o.threads,
            "ceilings": {f.type: ceiling_for(f, o.ceilings) for f in files},
            "curve": curve.DEFAULT_RULES.to_json(),
            "expected_kld": expected_klds(files),
            "require_source_check": o.require_source_check,
            "hf_compare": {"max_memory": o.hf_compare_max_memory, "chunks": o.hf_compare_chunks,
                           "min_top1": COMPARE_MIN_TOP1, "max_kld": COMPARE_MAX_KLD},
            "n_predict": N_PREDICT, "reference_logits": o.reference_logits is not None}


def _texts(job: _Job, scoring: _Scoring) -> dict[str, TextInfo | None]:
    o, cal = job.opts, job.calibration
    ev = TextInfo(name=o.eval_text_name or job.eval_text.name, source=_public_source(o.eval_text_source),
                  sha256=job.eval_sha, bytes=job.eval_text.stat().st_size, tokens=scoring.text_tokens,
                  tokens_scored=scoring.n_chunks * scored_per_chunk(scoring.ctx), chunks=scoring.n_chunks,
                  ctx=scoring.ctx)
    if cal is None and not o.calibration_text:
        return {"eval": ev, "calibration": None}
    c = cal or CalibrationInfo()
    return {"eval": ev, "calibration": TextInfo(
        name=c.name or (Path(o.calibration_text).name if o.calibration_text else ""),
        sha256=c.sha256 or job.cal_sha or "", bytes=int(c.bytes or 0), chunks=c.chunks, ctx=c.ctx,
        source=_public_source(c.source))}


def _report(job: _Job, scoring: _Scoring, files: list[FileResult], checks: dict[str, Check],
            ref_block: dict[str, Any], seconds: dict[str, float]) -> Report:
    ok, why = publishable(checks, require_source_check=job.opts.require_source_check)
    src = job.ladder.source
    source = {k: getattr(src, k) for k in ("repo", "revision", "architecture", "parameters", "has_chat_template",
                                          "license")}
    return Report(model_name=_model_name(job), source=source, toolchain=job.ladder.toolchain.to_json(),
                  tools=_tool_versions(job.tc), texts=_texts(job, scoring), settings=_settings(job, scoring, files),
                  reference=ref_block, checks=checks, files=files, publishable=ok, reasons=why, seconds=seconds,
                  file_hashes=dict(job.content))


def _write(job: _Job, report: Report, inputs: dict[str, Any], started: float) -> None:
    """The chart (decoration: its failure is logged), report.json and the stage record."""
    t0 = time.monotonic()
    try:
        from converters.formats import chart

        report.chart = chart.render(report, job.wd.chart_path).name
        png = job.wd.chart_path  # published with the quants, so checked like them (bot.publish.commit.verified_hashes)
        report.file_hashes[report.chart] = {"size": png.stat().st_size,
                                            "sha256": records.content_sha256(png, job.wd.path)}
    except Exception as e:  # noqa: BLE001 - a chart is decoration; its failure must not lose the measurements
        log.warning("evaluate: chart failed: %s", e)
        report.chart = None
    report.seconds["chart"] = time.monotonic() - t0
    report.seconds["total"] = time.monotonic() - started
    out = job.wd.write_report(report)
    outputs = [out] + ([job.wd.path / report.chart] if report.chart else [])
    records.save(job.wd.path, STAGE, inputs, outputs, report.seconds["total"], job.tc.version,
                 extra={"publishable": report.publishable,
                        "failed": [f.type for f in report.files if f.status == FAILED]})


def _remove_scratch(path: Path) -> None:
    """Delete a base-logits file (they are large) and its scratch folder when that is left empty."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def _public_source(source: str | None) -> str | None:
    """A URL or hf:// address may be published; a local path never is."""
    if source and re.match(r"^(https?|hf)://", source):
        return source
    return None


def _compare(job: _Job, facts: verify.GgufFacts, scoring: _Scoring) -> Check:
    """The reference against the source in transformers, on the stored logits (or a short run of its own)."""
    o = job.opts
    assert job.src_path is not None
    spec = CompareSpec(chunks=o.hf_compare_chunks, add_bos=facts.add_bos, bos_id=facts.bos_id,
                       parameters=job.ladder.source.parameters, max_memory=o.hf_compare_max_memory,
                       offload_dir=records.tmp_path_for(job.wd.path / "offload"), threads=o.threads)
    tmp = None
    try:
        if scoring.own_base is None:  # measured against someone else's logits: a short run of our own reference
            tmp = records.tmp_path_for(job.wd.path / "base-logits-compare.kld")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            run_base(job.tc, job.reference, job.eval_text, tmp, ctx=scoring.ctx, chunks=o.hf_compare_chunks,
                     threads=o.threads)
            base = BaseLogits.open(tmp)
        else:
            base = BaseLogits.open(scoring.own_base)
        return compare_with_source(job.src_path, base, spec)
    except (ToolError, ParseError) as e:
        return Check.fail(f"the reference could not be run for the comparison: {e.short()}")
    finally:
        if tmp is not None:
            _remove_scratch(tmp)


def _source_checks(job: _Job, ref_facts: verify.GgufFacts) -> tuple[dict[str, Check], Any]:
    """Tokenizer, chat template and special tokens against the source (and its tokenizer, when it loads)."""
    src = job.src_path
    if src is None or not src.is_dir():
        missing = Check.fail("the source checkpoint is not available")
        return {"tokenizer": missing, "chat_template": missing, "special_tokens": missing}, None
    return source_checks(job.tc, job.reference, ref_facts, src)


def source_checks(tc: Any, reference: Path, facts: verify.GgufFacts, src: Path) -> tuple[dict[str, Check], Any]:
    """The tokenizer (parity of ``reference`` with the source's), chat template and special-token checks against
    the source folder ``src``; also returns the source tokenizer (None when it does not load)."""
    try:  # one child answers every check below: the tokenizer is kept with the sample texts encoded
        tok = hfmodel.load_tokenizer(src, texts=[text for _, text in verify.TOKENIZER_SAMPLES])
    except InputError as e:
        return {"tokenizer": Check.fail(str(e))}, None
    out: dict[str, Check] = {}
    for name, fn in (("tokenizer", lambda: verify.tokenizer_parity(tc, reference, src)),
                     ("chat_template", lambda: verify.chat_template_check(facts, src)),
                     ("special_tokens", lambda: verify.special_tokens_check(facts, src, tok))):
        try:
            out[name] = fn()
        except GgufbotError as e:
            out[name] = Check.fail(f"the check could not run: {e.short()}")
    return out, tok


def _file_checks(job: _Job, path: Path, ref_facts: verify.GgufFacts, prompt: str) -> dict[str, Check]:
    """A quant's metadata against the reference's, and a short generation."""
    checks: dict[str, Check] = {}
    if not path.exists():
        return checks
    try:
        checks["metadata"] = verify.metadata_check(verify.GgufFacts.read(path), ref_facts)
    except InputError as e:
        checks["metadata"] = Check.fail(str(e))
    try:
        checks["generation"] = verify.generation_check(
            verify.generate(job.tc, path, prompt, n_predict=N_PREDICT, threads=job.opts.threads))
    except ToolError as e:
        checks["generation"] = Check.fail(f"llama.cpp cannot generate with it: {verify.tool_error_reason(e)}")
    return checks


def _run_checks(job: _Job, ref_facts: verify.GgufFacts,
                files: Sequence[FileResult]) -> tuple[dict[str, Check], dict[str, dict[str, Check]]]:
    checks, tok = _source_checks(job, ref_facts)
    prompt, is_chat = verify.prompt_for(ref_facts, tok)
    try:
        gen = verify.generate(job.tc, job.reference, prompt, n_predict=N_PREDICT, threads=job.opts.threads)
        checks["end_of_reply"] = verify.end_of_reply_check(gen, is_chat, N_PREDICT)
        checks["generation"] = verify.generation_check(gen)
    except ToolError as e:
        checks["generation"] = Check.fail(f"the reference does not generate: {verify.tool_error_reason(e)}")
    per_file = {f.type: _file_checks(job, job.wd.path / f.path, ref_facts, prompt) for f in files}
    projector = _projector_check(job)
    if projector is not None:
        checks[mmproj.CHECK] = projector
    return checks, per_file


def _projector_check(job: _Job) -> Check | None:
    """A vision-language model's projector files, each loaded in ``llama-mtmd-cli`` with the ladder's largest text
    model (the reference when no quant is there) on a generated test image: finite embeddings or failed."""
    projectors = [job.wd.path / p.path for p in job.ladder.projectors]
    if not projectors:
        return None
    missing = [p.name for p in projectors if not p.is_file()]
    if missing:
        return Check.fail(f"projector file(s) missing from the work directory: {', '.join(missing)}")
    by_bits = sorted(job.ladder.files, key=lambda f: -(f.bpw_nominal or 0.0))
    text_model = next((job.wd.path / f.path for f in by_bits if (job.wd.path / f.path).is_file()), job.reference)
    scratch = records.tmp_dir_for(job.wd.path)
    try:
        return mmproj.projector_check(job.tc, text_model, projectors, scratch, threads=job.opts.threads)
    finally:
        with contextlib.suppress(OSError):
            scratch.rmdir()
