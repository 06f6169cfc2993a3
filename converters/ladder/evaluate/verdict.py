"""The gate (pure): ceilings, the verdict on every file, and whether a ladder may be published at all.

:func:`judge` marks a file failed when its figures are not finite, when it is far above the ladder's own curve
(:mod:`converters.ladder.evaluate.curve`), when its mean KLD is above the ceiling for its type, or when one of
its checks failed; an order inversion is a note. When the BF16-vs-source comparison or the tokenizer check
fails, or the comparison could not run (unless ``require_source_check`` is off), :func:`publishable` says no.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from converters.core import quants
from converters.core.errors import UnknownName
from converters.core.report import FAILED, SKIPPED, Check, FileResult
from converters.ladder import budget, layout
from converters.ladder.evaluate import curve
from converters.llama import mmproj



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
        if layout.is_tuned(f.type) or budget.is_fit(f.type):  # judged against a stock file instead
            continue
        if f.stats is not None and not f.stats.non_finite() and bits is not None:
            out.append(curve.Point(f.type, float(bits), f.stats.kld_mean, f.stats.kld_mean_err))
    return out


def judge(files: Sequence[FileResult], ceilings: Mapping[str, float] | None = None, *,
          job_checks: Mapping[str, Check] | None = None, rules: curve.CurveRules = curve.DEFAULT_RULES) -> Verdict:
    """Pure: reads the figures and checks only. A file fails on its own figures and checks, or when it is far
    above the ladder's own curve (:mod:`converters.ladder.evaluate.curve`); an order inversion is a note, not a
    failure."""
    out = {f.type: _file_reasons(f, ceilings, job_checks or {}) for f in files}
    for key, why in {**tuned_reasons(files), **budget.fit_reasons(files)}.items():
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

