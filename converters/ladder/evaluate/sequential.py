"""Sequential evaluation: score a file's chunks in batches until its mean KLD is known well enough.

The reference's log-probabilities are stored once per job over the *cap* (``max_chunks``) chunks. A file is
scored on chunks ``[0, n)`` in batches: each batch is a view of the base-logits file holding chunks ``[a, b)``
(:meth:`~converters.ladder.evaluate.perplexity.BaseLogits.write_view`), scored by one ``llama-perplexity
--kl-divergence`` run, which prints the batch's full summary (mean KLD to 6 decimals, percentiles, same-top-p)
and a running mean per chunk (5 decimals). The per-chunk means of a batch are the differences of its running
means (:func:`~converters.ladder.evaluate.perplexity.chunk_klds`), whose rounding grows with the chunk's place
in its run (about ``i * 1e-5`` for the i-th): a batch holds a few chunks, so the error stays near 1e-5 however
long the text, where one run over hundreds of chunks would bury a Q8_0-size KLD of 1e-3 in rounding. Each
batch costs one model load; the batches grow with what the series says is still needed (below).

After each batch, :func:`stop_reason` (pure) decides, from the per-chunk series:

- ``precision``: the standard error of the mean, from the chunk means (tokens within a chunk are correlated, so
  never per token), is at most ``precision`` times the mean (default 5 %);
- ``verdict``: the file is refused whatever follows: the mean minus ``Z_VERDICT`` standard errors lies above a
  threshold the gate compares this file's mean KLD with (its ceiling, or the outlier limit of the ladder's curve
  as measured so far), or its figures are not finite. A file that will pass is scored on to the target
  precision instead: its mean KLD ± error is published on the card, so it gets the precision every published
  figure gets; a refused file's figures are only the reason it is withheld;
- ``cap``: ``max_chunks`` are scored (today's fixed count);

never before ``min_chunks`` (a standard error from a handful of chunks is itself too uncertain). ``precision =
0`` turns it off: every file is scored on ``max_chunks`` chunks in one run (``fixed``), as before.

The file's figures over several batches are combined (:func:`combine`): means weighted by tokens (every chunk
scores the same number of tokens), per-token errors pooled from the batches' means and errors, the maximum
exact; the median and the 99th and 99.9th percentiles are read off the mixture of the batches' distributions,
each interpolated between the eleven percentiles llama.cpp prints (an estimate, exact with one batch).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from converters.core.report import KldStats, mean_err
from converters.ladder.evaluate.perplexity import BaseLogits, run_kld_batch, scored_per_chunk
from converters.llama import toolchain as tc_mod

PRECISION = 0.05  # target relative standard error of a file's mean KLD (setting [evaluate] precision)
MIN_CHUNKS = 8  # floor of chunks before any stop (setting [evaluate] min_chunks)
# a file is refused whatever follows when its mean is this many standard errors above a threshold: 3 (one-sided 0.13 % per
# look for a normal mean; the few looks of a file and the t-distribution of a small series keep it near 1 %)
Z_VERDICT = 3.0

FIXED = "fixed"  # sequential evaluation off: the cap, in one run
PRECISION_REACHED = "precision"
VERDICT_SETTLED = "verdict"
CAP = "cap"


@dataclasses.dataclass(frozen=True)
class StopRule:
    """When to stop scoring a file's chunks (see the module's docstring)."""

    max_chunks: int
    precision: float = PRECISION
    min_chunks: int = MIN_CHUNKS
    z: float = Z_VERDICT

    @property
    def sequential(self) -> bool:
        return self.precision > 0 and self.min_chunks < self.max_chunks

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def like_baseline(rule: StopRule, baseline_chunks: int | None) -> StopRule:
    """The rule for a file judged against a baseline (a tuned or memory-budget file) already measured on
    ``baseline_chunks`` chunks: exactly those chunks, so that every figure the card and the gate compare (mean KLD,
    p99, same top token, PPL) is over the same text as its baseline's; the paired gate only ever uses the chunks both
    files have. None (no baseline measured): ``rule`` as it is."""
    if baseline_chunks is None or baseline_chunks < 1 or not rule.sequential:
        return rule
    n = min(baseline_chunks, rule.max_chunks)
    return dataclasses.replace(rule, min_chunks=n, max_chunks=n)


def stop_reason(series: Sequence[float], rule: StopRule, thresholds: Sequence[float] = ()) -> str | None:
    """Why scoring stops after the chunks of ``series`` (their mean KLDs, in order), or None to go on (pure).

    ``thresholds``: the mean KLDs at which the gate's verdict on this file changes (empty: no verdict stop)."""
    n = len(series)
    if not rule.sequential:
        return FIXED if n >= rule.max_chunks else None
    if n >= rule.max_chunks:
        return CAP
    if n < max(2, rule.min_chunks):
        return None
    me = mean_err(series)
    assert me is not None
    m, e = me
    if not (math.isfinite(m) and math.isfinite(e)):
        return VERDICT_SETTLED  # figures that are not finite fail the file whatever follows
    if e <= rule.precision * m or (m <= 0 and e == 0):
        return PRECISION_REACHED
    finite = [t for t in thresholds if t is not None and math.isfinite(t)]
    if any(m - rule.z * e > t for t in finite):  # refused whatever follows (a passing file goes on to precision)
        return VERDICT_SETTLED
    return None


def next_batch(series: Sequence[float], rule: StopRule) -> int:
    """How many chunks the next batch scores: up to the floor first; then what the series' error says the
    target precision needs (``n * (err / (precision * mean))**2`` in all), at least a quarter of what is scored
    (few model loads) and at most as many again (the estimate is rough); never past the cap."""
    n = len(series)
    room = rule.max_chunks - n
    if not rule.sequential or room <= 0:
        return max(0, room)
    if n < rule.min_chunks:
        return min(room, rule.min_chunks - n)
    want = n
    me = mean_err(series)
    if me is not None and me[0] > 0 and math.isfinite(me[1]):
        need = math.ceil(n * (me[1] / (rule.precision * me[0])) ** 2)
        want = min(max(need - n, max(2, n // 4)), n)
    return max(1, min(room, want))


# --------------------------------------------------------------------------------------------------
# Scoring one file
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Batch:
    """One llama-perplexity run over chunks ``[start, stop)``: its figures and its KLD percentiles."""

    start: int
    stop: int
    stats: KldStats
    quantiles: dict[float, float]
    seconds: float


@dataclasses.dataclass(frozen=True)
class Scored:
    stats: KldStats
    reason: str
    batches: int
    seconds: float


def score(tc: tc_mod.Toolchain, model: Path, base: BaseLogits, scratch: Path, rule: StopRule,
          thresholds: Callable[[float], Sequence[float]] = lambda err: (), *,
          threads: int | None = None) -> Scored:
    """Score ``model`` against ``base`` in batches until :func:`stop_reason` says stop. ``thresholds(err)``: the
    gate's thresholds for a file whose standard error is ``err``. Views are written into ``scratch`` and
    removed after their run."""
    rule = dataclasses.replace(rule, max_chunks=min(rule.max_chunks, base.n_chunk))
    batches: list[Batch] = []
    series: list[float] = []
    reason = None
    while reason is None:
        start = len(series)
        stop = start + next_batch(series, rule)
        view = base.path if (start, stop) == (0, base.n_chunk) else scratch / f"view-{start}-{stop}.kld"
        try:
            if view != base.path:
                base.write_view(view, start, stop)
            stats, quantiles, secs = run_kld_batch(tc, model, view, ctx=base.n_ctx, threads=threads)
        finally:
            if view != base.path:
                with contextlib.suppress(FileNotFoundError):
                    view.unlink()
        batches.append(Batch(start, stop, stats, quantiles, secs))
        series += stats.chunk_kld if len(stats.chunk_kld) == stop - start else [stats.kld_mean] * (stop - start)
        me = mean_err(series)
        reason = stop_reason(series, rule, thresholds(me[1]) if me is not None else ())
    return Scored(combine(batches, scored_per_chunk(base.n_ctx)), reason, len(batches),
                  sum(b.seconds for b in batches))


# --------------------------------------------------------------------------------------------------
# Combining batches
# --------------------------------------------------------------------------------------------------


def _pool(parts: Sequence[tuple[int, float, float]]) -> tuple[float, float]:
    """Mean and per-token standard error over every token from ``(tokens, mean, err)`` of each batch, err as
    llama.cpp computes it (``sqrt(var / (n - 1))``, var the population variance)."""
    n = sum(t for t, _, _ in parts)
    m = math.fsum(t * x for t, x, _ in parts) / n
    var = math.fsum(t * (e * e * (t - 1) + (x - m) ** 2) for t, x, e in parts) / n
    return m, math.sqrt(var / (n - 1)) if n > 1 else 0.0


def mixture_quantile(tables: Sequence[tuple[int, dict[float, float]]], q: float) -> float:
    """The ``q`` quantile of a mixture of distributions, each known by a few quantiles ``{level: value}``
    (levels 0 and 1 being the minimum and maximum) and weighted by its count: each CDF linear between its known
    quantiles, the mixture's CDF solved for ``q`` by bisection."""
    total = sum(w for w, _ in tables)
    curves = [(w, sorted(t.items(), key=lambda kv: kv[1])) for w, t in tables]

    def cdf(x: float) -> float:
        acc = 0.0
        for w, pts in curves:
            values = [v for _, v in pts]
            i = bisect.bisect_right(values, x)
            if i == 0:
                f = 0.0
            elif i == len(pts):
                f = 1.0
            else:
                (l0, v0), (l1, v1) = pts[i - 1], pts[i]
                f = l0 + (l1 - l0) * ((x - v0) / (v1 - v0) if v1 > v0 else 1.0)
            acc += w * f
        return acc / total

    lo = min(pts[0][1] for _, pts in curves)
    hi = max(pts[-1][1] for _, pts in curves)
    for _ in range(100):
        mid = (lo + hi) / 2
        if cdf(mid) < q:
            lo = mid
        else:
            hi = mid
    return hi


def combine(batches: Sequence[Batch], tokens_per_chunk: int) -> KldStats:
    """One file's figures from its batches (see the module's docstring); a single batch as it is."""
    if len(batches) == 1:
        return batches[0].stats
    ss = [b.stats for b in batches]
    tok = [(b.stop - b.start) * tokens_per_chunk for b in batches]
    n = sum(tok)

    def pooled(value: Callable[[KldStats], float], err: Callable[[KldStats], float]) -> tuple[float, float]:
        return _pool([(t, value(s), err(s)) for t, s in zip(tok, ss)])

    lnq, lnq_err = pooled(lambda s: math.log(s.ppl), lambda s: s.ppl_err / s.ppl)
    lnb, lnb_err = pooled(lambda s: math.log(s.ppl_base), lambda s: s.ppl_base_err / s.ppl_base)
    lnr, lnr_err = pooled(lambda s: s.ln_ppl_ratio, lambda s: s.ln_ppl_ratio_err)
    ppl, ppl_base = math.exp(lnq), math.exp(lnb)
    cov = (lnq_err ** 2 + lnb_err ** 2 - lnr_err ** 2) / 2
    kld, kld_err_token = pooled(lambda s: s.kld_mean, lambda s: s.kld_mean_err_token or s.kld_mean_err)
    dp, dp_err = pooled(lambda s: s.dp_mean, lambda s: s.dp_mean_err)
    mse, mse_err = pooled(lambda s: s.rms_dp ** 2, lambda s: 2 * s.rms_dp * s.rms_dp_err)
    top = math.fsum(t * s.same_top_p for t, s in zip(tok, ss)) / n
    tables = [(t, b.quantiles) for t, b in zip(tok, batches)]
    rms = math.sqrt(mse)
    out = KldStats(
        ppl=ppl, ppl_err=ppl * lnq_err, ppl_base=ppl_base, ppl_base_err=ppl_base * lnb_err,
        ln_ppl_ratio=lnr, ln_ppl_ratio_err=lnr_err, ppl_ratio=math.exp(lnr), ppl_ratio_err=math.exp(lnr) * lnr_err,
        ppl_diff=ppl - ppl_base, ppl_diff_err=math.sqrt(ppl * ppl_base) * lnr_err,
        ppl_correlation=cov / (lnq_err * lnb_err) if lnq_err > 0 and lnb_err > 0 else None,
        kld_mean=kld, kld_mean_err=kld_err_token, kld_max=max(s.kld_max for s in ss),
        kld_p999=mixture_quantile(tables, 0.999), kld_p99=mixture_quantile(tables, 0.99),
        kld_median=mixture_quantile(tables, 0.5), dp_mean=dp, dp_mean_err=dp_err,
        rms_dp=rms, rms_dp_err=0.5 / rms * mse_err if rms > 0 else 0.0,
        same_top_p=top, same_top_p_err=math.sqrt(top * (1 - top) / (n - 1)),
        chunks=sum(s.chunks for s in ss), chunk_kld=tuple(x for s in ss for x in s.chunk_kld),
        chunk_ln_ppl_ratio=(tuple(x for s in ss for x in s.chunk_ln_ppl_ratio)
                            if all(len(s.chunk_ln_ppl_ratio) == s.chunks for s in ss) else ()),
        kld_mean_err_token=kld_err_token)
    return out.with_chunk_error()
