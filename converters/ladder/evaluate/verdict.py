"""The gate (pure): ceilings, the verdict on every file, and whether a ladder may be published at all.

A file fails when its figures are not finite, when it is far above the ladder's own curve
(:mod:`converters.ladder.evaluate.curve`), when its mean KLD is above the ceiling for its type, or when one of
its checks failed; an order inversion is a note. When the BF16-vs-source comparison or the tokenizer check
fails, or the comparison could not run (unless ``require_source_check`` is off), :func:`publishable` says no.

Two ways to apply it:

- :func:`judge_file`, what the evaluation uses: one file as soon as it is measured, against the files measured
  *before* it, on the curve of the earlier files without those of them found far above it; a later outlier fails
  only itself, never an earlier file. That verdict is final (the file may be published before the rest of the
  ladder exists) only once the file's curve is *bracketed* (:func:`awaits_curve`): a stock file with types of the
  ladder on a side of it in bits per weight needs ``CurveRules.neighbours`` measured files on that side (or all the
  ladder has there). A file measured before that, the first one of a ladder always, is *held*: the evaluation
  judges it again, against every other file measured by then, when a later measurement brackets it (or when the
  ladder is finished), and only then is its verdict final. A file with no curve point (its measurement failed, its
  figures are not finite) or judged against a baseline (tuned, memory-budget) is never held. Measured in the same
  order, a ladder gets the same verdicts however it is evaluated (``run`` measures in ladder.json's order).
  :func:`thresholds` gives the mean KLDs at which the verdict changes, for the sequential evaluation's "the verdict
  cannot change any more" stop (only the ceiling for a file that will be held: its curve is not known yet).
- :func:`judge`: every file against all the others at once (re-judging a finished ladder's figures).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence

from converters.core import quants
from converters.core.errors import UnknownName
from converters.core.report import FAILED, SKIPPED, Check, FileResult
from converters.ladder import budget, speed
from converters.ladder.evaluate import curve, paired
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


def type_bits(type_name: str) -> float | None:
    """The catalogue's nominal bits per weight of a type (None: not a catalogue type)."""
    try:
        return quants.get(type_name).bpw
    except UnknownName:
        return None


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
        if not is_stock(f.type, f.extra):  # judged against a baseline
            continue
        if f.stats is not None and not f.stats.non_finite() and bits is not None:
            out.append(curve.Point(f.type, float(bits), f.stats.kld_mean, f.stats.kld_mean_err))
    return out


def judge(files: Sequence[FileResult], ceilings: Mapping[str, float] | None = None, *,
          job_checks: Mapping[str, Check] | None = None, rules: curve.CurveRules = curve.DEFAULT_RULES,
          speed_required: bool = False) -> Verdict:
    """Pure (but for each tuned file's ``extra["versus"]``, the comparison it records): reads the figures and
    checks only. A file fails on its own figures and checks, or when it is far above the ladder's own curve
    (:mod:`converters.ladder.evaluate.curve`); an order inversion is a note, not a failure. A tuned file is judged
    against its stock file (:func:`tuned_comparisons`); ``speed_required``: the speed measurement was on, so a
    tuned file without it is withheld."""
    out = {f.type: _file_reasons(f, ceilings, job_checks or {}) for f in files}
    notes = []
    for key, (why, figures) in tuned_comparisons(files, speed_required=speed_required).items():
        if why is not None:
            out[key].append(why)
        else:
            notes.append(f"{figures}: published")
    for f in files:
        out[f.type] += memory_reasons(f)
    points = curve_points(files)
    far = curve.outliers(points, rules)
    for key, outlier in far.items():
        out[key].append(outlier.reason())
    return Verdict(out, notes + curve.inversions(points, rules, skip=set(far)))


def judge_file(f: FileResult, earlier: Sequence[FileResult], ceilings: Mapping[str, float] | None = None, *,
               job_checks: Mapping[str, Check] | None = None,
               rules: curve.CurveRules = curve.DEFAULT_RULES, speed_required: bool = False) -> list[str]:
    """Pure: the reasons ``f`` fails (empty: it passes), judged against the files measured before it only (see the
    module's docstring): its own figures and checks, its stock file when it is tuned, and the curve of the earlier
    files that are not themselves far above it. A held file is judged again with ``earlier`` = every other file
    measured when its curve is bracketed."""
    why = _file_reasons(f, ceilings, job_checks or {})
    tuned = tuned_reasons([*earlier, f], speed_required=speed_required).get(f.type)
    if tuned is not None:
        why.append(tuned)
    why += memory_reasons(f)
    mine = curve_points([f])
    if mine:
        e = _earlier_curve(mine[0], earlier, rules)
        if e is not None and curve.is_outlier(mine[0], e, rules):
            why.append(curve.Outlier(mine[0], e, rules).reason())
    return why


def is_stock(type_name: str, extra: Mapping[str, object]) -> bool:
    """A stock type of the ladder: neither a tuned nor a memory-budget file (those are judged against a baseline)."""
    return speed.baseline_name(type_name, extra) is None and not budget.is_fit(type_name)


def bracketed(bits: float, ladder_bits: Sequence[float], others: Sequence[FileResult],
              rules: curve.CurveRules = curve.DEFAULT_RULES) -> bool:
    """Pure: the ladder's curve around ``bits`` is known: on each side (fewer bits, more bits), the files of
    ``others`` that are points of the curve number at least ``rules.neighbours``, or as many as ``ladder_bits`` (the
    nominal bits of the ladder's stock types, measured or not) has on that side, and no type of the ladder that is
    not measured yet lies nearer than the farthest of those neighbours (the curve's prediction comes from the
    nearest files: past the top of a ladder measured so far, a file three bits above the others would be judged by
    an extrapolation its own neighbours, once measured, would correct)."""
    points = curve_points(others)
    pending = collections.Counter(ladder_bits)
    pending.subtract(b for o in others if is_stock(o.type, o.extra) and (b := nominal_bits(o)) is not None)
    for side in (lambda b: b < bits, lambda b: b > bits):
        need = min(rules.neighbours, sum(1 for b in ladder_bits if side(b)))
        near = sorted((abs(q.bits - bits) for q in points if side(q.bits)))[:need]
        if len(near) < need:
            return False
        if near and any(n > 0 and side(b) and abs(b - bits) < near[-1] for b, n in pending.items()):
            return False
    return True


def awaits_curve(f: FileResult, ladder_bits: Sequence[float], others: Sequence[FileResult],
                 rules: curve.CurveRules = curve.DEFAULT_RULES) -> bool:
    """Pure: ``f``'s verdict is not final yet (the module's docstring): a stock file whose curve is not
    :func:`bracketed` by ``others`` (the files measured so far but ``f``). ``f`` may not be measured yet (its bits
    decide); a measured file with no point on the curve (an error, figures not finite) is final at once."""
    bits = nominal_bits(f)
    if bits is None or not is_stock(f.type, f.extra) or f.error:
        return False
    if f.stats is not None and not curve_points([f]):
        return False
    return not bracketed(float(bits), ladder_bits, [o for o in others if o.type != f.type], rules)


def _earlier_curve(p: curve.Point, earlier: Sequence[FileResult], rules: curve.CurveRules) -> curve.Expected | None:
    points = [q for q in curve_points(earlier) if q.key != p.key]
    far = curve.outliers(points, rules)
    return curve.expected(p, [q for q in points if q.key not in far], rules)


def ladder_notes(files: Sequence[FileResult], rules: curve.CurveRules = curve.DEFAULT_RULES,
                 against: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The order inversions among ``files`` (in measuring order), leaving out those found far above the curve they
    were judged on: ``against[type]`` names those files (a held file's: every other file measured when it was
    judged again); without it, the files measured before it."""
    points = curve_points(files)
    far = set()
    for i, f in enumerate(files):
        mine = curve_points([f])
        judged_on = files[:i] if against is None or f.type not in against else \
            [g for g in files if g.type in set(against[f.type]) and g.type != f.type]
        e = _earlier_curve(mine[0], judged_on, rules) if mine else None
        if e is not None and curve.is_outlier(mine[0], e, rules):
            far.add(f.type)
    return curve.inversions(points, rules, skip=far)


def thresholds(f: FileResult, earlier: Sequence[FileResult], err: float,
               ceilings: Mapping[str, float] | None = None,
               rules: curve.CurveRules = curve.DEFAULT_RULES) -> list[float]:
    """The mean KLDs at which :func:`judge_file`'s verdict on ``f`` changes, for a standard error ``err``: its
    ceiling, and the outlier limit of the earlier files' curve at its bits per weight. Empty for a tuned or fit file
    (judged against its baseline's figures, not a fixed threshold): it is scored to the target precision. For a file
    that will be held (:func:`awaits_curve`) the evaluation passes no earlier files: the curve that decides its
    verdict is not measured yet, so only its ceiling can stop its scoring early (otherwise the target precision
    does, or the cap)."""
    if speed.baseline_name(f.type, f.extra) is not None:
        return []
    out = []
    c = ceiling_for(f, ceilings)
    if c is not None:
        out.append(c)
    bits = nominal_bits(f)
    if bits is not None:
        e = _earlier_curve(curve.Point(f.type, float(bits), 0.0, err), earlier, rules)
        if e is not None:
            out.append(rules.factor * e.kld + rules.sigmas * err)
    return out


def memory_reasons(f: FileResult) -> list[str]:
    """A memory-budget file's own rule, whatever its KLD (:func:`converters.ladder.budget.memory_reason`): its memory
    at the budget's context measured within the budget, and a stock file that fits the budget to compare it with."""
    if not budget.is_fit(f.type):
        return []
    fit = f.extra.get("fit")
    if not isinstance(fit, Mapping):
        return ["its memory budget facts are missing"]
    why = budget.memory_reason(fit)
    return [why] if why is not None else []


def tuned_reasons(files: Sequence[FileResult], *, speed_required: bool = False) -> dict[str, str]:
    """A per-tensor tuned file (``<TYPE>-tuned``) is published only when it beats its stock file in the paired
    per-chunk test, at no more bytes, without a p99 / same-top / speed regression (:func:`paired.compare`)."""
    return {key: why for key, (why, _note) in tuned_comparisons(files, speed_required=speed_required).items()
            if why is not None}


def tuned_comparisons(files: Sequence[FileResult], *,
                      speed_required: bool = False) -> dict[str, tuple[str | None, str]]:
    """Per file judged against a baseline (a tuned file against its stock file; a memory-budget file against the
    largest stock file that fits its budget, :func:`converters.ladder.speed.baseline_name`): (the reason it is
    withheld or None, the comparison's figures), by :func:`paired.compare`. Each such file's ``extra["versus"]``
    records the comparison (report.json)."""
    by_type = {f.type: f for f in files}
    out: dict[str, tuple[str | None, str]] = {}
    for f in files:
        judged = speed.baseline_name(f.type, f.extra)
        if judged is None:
            continue
        name, same_size = judged
        c = paired.compare(f, by_type.get(name), same_size=same_size, speed_required=speed_required,
                           baseline_name=name)
        f.extra["versus"] = c.to_json()
        why = f"not better than {c.baseline}: " + "; ".join(c.reasons) if c.reasons else None
        out[f.type] = (why, c.describe())
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

