"""The sequential evaluation's rules (pure): when to stop, how many chunks next, combining batches; and the gate
applied file by file."""

from __future__ import annotations

import math

import numpy as np
import pytest

from converters.core.report import FileResult, SERIES, KldStats, mean_err
from converters.ladder.evaluate import sequential as seq
from converters.ladder.evaluate import verdict

RULE = seq.StopRule(max_chunks=64, precision=0.05, min_chunks=8)


def series(n: int, mean: float, rel_sd: float, seed: int = 0) -> list[float]:
    """``n`` chunk means around ``mean`` with a relative spread ``rel_sd`` (gamma: positive, skewed like KLDs)."""
    k = 1 / rel_sd ** 2
    return list(np.random.default_rng(seed).gamma(k, mean / k, size=n))


@pytest.mark.parametrize("name, xs, thresholds, reason", [
    ("below the floor nothing stops", series(7, 0.01, 0.01), [1.0], None),
    ("precise enough at the floor", series(8, 0.01, 0.05), [], seq.PRECISION_REACHED),
    ("noisy, no threshold: go on", series(8, 0.01, 0.6), [], None),
    # a file that passes is published with its figures: scored on to the target precision
    ("noisy but far below its ceiling: goes on to the precision", series(8, 0.01, 0.6), [0.05], None),
    ("noisy and far above its ceiling: refused whatever follows", series(8, 0.5, 0.6), [0.05], seq.VERDICT_SETTLED),
    ("above one threshold is enough to be refused", series(8, 0.5, 0.6), [5.0, 0.05], seq.VERDICT_SETTLED),
    ("noisy near its ceiling: go on", series(8, 0.045, 0.6), [0.05], None),
    ("one threshold near is enough to go on", series(8, 0.01, 0.6), [0.05, 0.012], None),
    ("the cap ends it", series(64, 0.045, 0.6), [0.05], seq.CAP),
    ("a perfect copy", [0.0] * 8, [], seq.PRECISION_REACHED),
    ("figures that are not finite fail anyway", [math.nan] * 8, [0.05], seq.VERDICT_SETTLED),
])
def test_stop_reason(name, xs, thresholds, reason):
    assert seq.stop_reason(xs, RULE, thresholds) == reason, name


def test_stop_reason_off_is_the_fixed_count():
    off = seq.StopRule(max_chunks=16, precision=0.0, min_chunks=8)
    assert not off.sequential
    assert seq.stop_reason(series(8, 0.01, 0.01), off, [1.0]) is None
    assert seq.stop_reason(series(16, 0.01, 0.6), off, []) == seq.FIXED
    assert seq.next_batch([], off) == 16  # one run over every chunk, as before


def test_next_batch_goes_to_the_floor_then_by_what_precision_needs():
    assert seq.next_batch([], RULE) == 8
    assert seq.next_batch(series(5, 0.01, 0.3), RULE) == 3
    # relative error 0.3/sqrt(8) ~ 0.106 at 8 chunks: about 8 * (0.106/0.05)^2 = 36 in all, at most 8 more now
    assert seq.next_batch(series(8, 0.01, 0.3), RULE) == 8
    # nearly there: at least a quarter of what is scored (2 of 8), never a batch of one model load per chunk
    assert seq.next_batch(series(16, 0.01, 0.21, seed=3), RULE) >= 4
    assert seq.next_batch(series(60, 0.01, 0.9), RULE) == 4  # never past the cap


def test_stopping_on_synthetic_files_uses_fewer_chunks_at_the_target_precision():
    """Driving the rule with long synthetic series: a file stops when its chunk-based error reaches 5 %."""
    for rel_sd, seed in ((0.15, 1), (0.3, 2), (0.45, 3)):
        xs = series(64, 0.02, rel_sd, seed)
        n = 0
        while (reason := seq.stop_reason(xs[:n], RULE, [])) is None:
            n += seq.next_batch(xs[:n], RULE)
        m, e = mean_err(xs[:n])
        assert reason == seq.CAP or e <= 0.05 * m
        assert n <= 64


def _batch_stats(xs: list[float], top: float) -> KldStats:
    m, e = mean_err(xs)
    return KldStats(ppl=10.0, ppl_err=0.5, ppl_base=9.9, ppl_base_err=0.5, ln_ppl_ratio=math.log(10 / 9.9),
                    ln_ppl_ratio_err=0.002, ppl_ratio=10 / 9.9, ppl_ratio_err=0.002, ppl_diff=0.1, ppl_diff_err=0.02,
                    ppl_correlation=0.99, kld_mean=m, kld_mean_err=e, kld_max=max(xs) * 5, kld_p999=max(xs) * 3,
                    kld_p99=max(xs) * 2, kld_median=m * 0.7, dp_mean=-0.001, dp_mean_err=0.0005, rms_dp=0.02,
                    rms_dp_err=0.001, same_top_p=top, same_top_p_err=0.01, chunks=len(xs), chunk_kld=tuple(xs),
                    kld_mean_err_token=e / 3)


def test_combining_batches():
    a, b = [0.010, 0.012, 0.011, 0.013], [0.020, 0.018]
    qa = {0.0: 0.0, 0.5: 0.01, 1.0: 0.05}
    qb = {0.0: 0.0, 0.5: 0.02, 1.0: 0.09}
    s = seq.combine([seq.Batch(0, 4, _batch_stats(a, 0.9), qa, 1.0), seq.Batch(4, 6, _batch_stats(b, 0.8), qb, 1.0)],
                    tokens_per_chunk=255)
    assert s.chunks == 6 and s.chunk_kld == tuple(a + b)
    assert s.kld_mean == pytest.approx(np.mean(a + b))  # every chunk scores as many tokens
    assert s.kld_mean_err == pytest.approx(mean_err(a + b)[1])  # from the chunk means
    assert s.same_top_p == pytest.approx((4 * 0.9 + 2 * 0.8) / 6)
    assert s.kld_max == max(a + b) * 5
    assert s.ppl == pytest.approx(10.0) and s.ppl_ratio == pytest.approx(10 / 9.9)
    # the median of the mixture lies between the batches' medians, nearer the larger batch's
    assert 0.01 < s.kld_median < 0.015
    one = _batch_stats(a, 0.9)
    assert seq.combine([seq.Batch(0, 4, one, qa, 1.0)], 255) is one


def test_mixture_quantile_of_equal_uniforms_is_exact():
    u = {0.0: 0.0, 0.5: 0.5, 1.0: 1.0}
    assert seq.mixture_quantile([(1, u), (3, u)], 0.99) == pytest.approx(0.99, abs=1e-9)
    lo, hi = {0.0: 0.0, 1.0: 1.0}, {0.0: 1.0, 1.0: 2.0}
    assert seq.mixture_quantile([(1, lo), (1, hi)], 0.5) == pytest.approx(1.0, abs=1e-9)
    assert seq.mixture_quantile([(1, lo), (1, hi)], 0.75) == pytest.approx(1.5, abs=1e-9)


# ---- the gate, file by file


def f(qtype: str, kld: float, err: float, bits: float) -> FileResult:
    d = {k: 0.1 for k in KldStats.__dataclass_fields__ if k not in SERIES}
    d.update(chunks=8, kld_mean=kld, kld_mean_err=err)
    return FileResult(type=qtype, path=f"M-{qtype}.gguf", size=1, bpw=None, bpw_nominal=bits, stats=KldStats(**d))


def test_judge_file_fails_a_later_outlier_only():
    q8, q6, q4 = f("Q8_0", 0.004, 0.0002, 8.5), f("Q6_K", 0.009, 0.0004, 6.56), f("Q4_K_M", 0.037, 0.002, 4.89)
    bad = f("Q5_K_M", 0.30, 0.01, 5.69)  # damaged: far above the curve of Q8_0 .. Q4_K_M
    earlier = [q8, q6, q4]
    assert all(verdict.judge_file(x, earlier[:i]) == [] for i, x in enumerate(earlier))
    why = verdict.judge_file(bad, earlier)
    assert any("far above the ladder's curve" in w for w in why)
    # a file measured after the outlier is judged on the curve without it
    assert verdict.judge_file(f("Q3_K_M", 0.10, 0.005, 3.91), [*earlier, bad]) == []
    assert verdict.ladder_notes([*earlier, bad]) == []


def test_thresholds_are_the_ceiling_and_the_curve_limit():
    q8, q4 = f("Q8_0", 0.004, 0.0002, 8.5), f("Q4_K_M", 0.037, 0.002, 4.89)
    new = f("Q6_K", 0.0, 0.0, 6.56)
    assert verdict.thresholds(new, [], 0.001) == [0.10]  # the ceiling only, no curve yet
    t = verdict.thresholds(new, [q8, q4], 0.001)
    assert t[0] == 0.10 and t[1] > 3 * 0.004  # factor x the line between Q8_0 and Q4_K_M, plus 3 errors
    assert verdict.thresholds(f("Q4_K_M-tuned", 0.0, 0.0, 4.89), [q8, q4], 0.001) == []


def test_a_file_judged_against_a_baseline_is_scored_on_exactly_its_baselines_chunks():
    rule = seq.StopRule(max_chunks=64, precision=0.05, min_chunks=8)
    same = seq.like_baseline(rule, 11)
    assert (same.min_chunks, same.max_chunks) == (11, 11) and not same.sequential
    # one run over those chunks, then the fixed stop: no precision or verdict stop before them, none after
    series = [0.1, 0.3] * 5 + [0.2]
    assert seq.next_batch([], same) == 11
    assert seq.stop_reason(series[:10], same) is None and seq.stop_reason(series, same) == seq.FIXED
    assert seq.like_baseline(rule, 200).max_chunks == 64  # never past the cap
    assert seq.like_baseline(rule, None) == rule  # no baseline measured (yet): the file's own rule
    fixed = seq.StopRule(max_chunks=16, precision=0)
    assert seq.like_baseline(fixed, 8) == fixed  # sequential evaluation off: every file on the cap already
