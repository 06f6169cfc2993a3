"""The per-chunk KLD series: its mean and chunk-based error, paired differences, report.json, and view files."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from converters.core.errors import InputError
from converters.core.report import FileResult, SERIES, KldStats, chunk_series_json, mean_err, paired_difference
from converters.ladder import evaluate
from tests.unit.test_evaluate_parse import KLD_TEXT, _write_base_file


def _stats(series, **kw) -> KldStats:
    d = {f: 0.1 for f in KldStats.__dataclass_fields__ if f not in SERIES}
    d.update(chunks=len(series), kld_mean=float(np.mean(series)) if len(series) else 0.0, **kw)
    return KldStats(**d, chunk_kld=tuple(series))


def test_mean_err_is_the_standard_error_of_chunk_means():
    xs = [0.01, 0.03, 0.02, 0.04]
    m, e = mean_err(xs)
    assert m == pytest.approx(0.025)
    assert e == pytest.approx(np.std(xs, ddof=1) / 2)
    assert mean_err([0.5]) is None and mean_err([]) is None


def test_paired_difference_removes_what_the_chunks_share():
    rng = np.random.default_rng(1)
    hard = rng.gamma(2.0, 0.01, size=40)  # chunk difficulty, shared by both files
    a = hard * 1.10 + rng.normal(0, 1e-4, 40)
    b = hard
    d, e, n = paired_difference(a, b[:30])  # common chunks only
    assert n == 30
    assert d == pytest.approx(float(np.mean(a[:30] - b[:30])))
    assert e == pytest.approx(float(np.std(a[:30] - b[:30], ddof=1) / math.sqrt(30)))
    # unpaired errors would be far larger than the paired one
    assert e < 0.2 * math.hypot(mean_err(a[:30])[1], mean_err(b[:30])[1])
    assert _stats(a).paired_difference(_stats(b))[2] == 40
    assert paired_difference([1.0], [2.0, 3.0]) is None


def test_with_chunk_error_replaces_the_per_token_error_and_keeps_it():
    s = _stats([0.01, 0.03, 0.02, 0.04], kld_mean_err=0.0001, kld_mean_err_token=None).with_chunk_error()
    assert s.kld_mean_err == pytest.approx(mean_err([0.01, 0.03, 0.02, 0.04])[1])
    assert s.kld_mean_err_token == 0.0001
    one = _stats([0.02], kld_mean_err=0.0001, kld_mean_err_token=None)
    assert one.with_chunk_error() is one  # one chunk: no chunk-based error, llama.cpp's figure stays


def test_report_json_holds_the_series_compactly_and_reads_old_reports():
    s = _stats([0.0123456789, 0.02, 1e-7]).with_chunk_error()
    f = FileResult(type="Q8_0", path="m-Q8_0.gguf", size=1, bpw=8.5, bpw_nominal=8.5, stats=s)
    d = f.to_json()
    assert d["chunk_kld"] == [0.0123457, 0.02, 1e-7] == chunk_series_json(s.chunk_kld)
    back = FileResult.from_json(d)
    assert back.stats is not None and back.stats.chunk_kld == (0.0123457, 0.02, 1e-7)
    assert back.stats.kld_mean_err_token == s.kld_mean_err_token
    ln = FileResult(type="Q8_0", path="m-Q8_0.gguf", size=1, bpw=8.5, bpw_nominal=8.5,
                    stats=KldStats(**{**s.__dict__, "chunk_ln_ppl_ratio": (0.01, -0.0023456789)}))
    assert ln.to_json()["chunk_ln_ppl_ratio"] == [0.01, -0.00234568]
    assert FileResult.from_json(ln.to_json()).stats.chunk_ln_ppl_ratio == (0.01, -0.00234568)
    assert back.stats.chunk_ln_ppl_ratio == () and d["chunk_ln_ppl_ratio"] == []
    old = {k: v for k, v in d.items() if k not in (*SERIES, "kld_mean_err_token")}  # before these fields
    again = FileResult.from_json(old)
    assert again.stats is not None and again.stats.chunk_kld == () and again.stats.kld_mean_err_token is None


def test_chunk_series_from_the_running_table_is_exact_up_to_rounding():
    # a synthetic table: the running means of known chunk means, printed as llama.cpp prints them (%10.5lf)
    rng = np.random.default_rng(7)
    true = rng.gamma(4.0, 0.0025, size=12)
    rows = []
    for i in range(1, len(true) + 1):
        m = true[:i].mean()
        rows.append(f"{i:4d}    {10.0:9.4f} ± {1.0:9.4f}    {0.001:10.5f} ± {0.001:10.5f}    {m:10.5f} ± "
                    f"{0.0001:10.5f}     1.000 ±  0.100 %    96.000 ±  1.000 %")
    series = evaluate.perplexity.chunk_klds("\n".join(rows), round(float(true.mean()), 6))
    assert len(series) == len(true)
    assert np.mean(series) == pytest.approx(round(float(true.mean()), 6), abs=1e-12)
    # chunk i carries at most i * 1e-5 of rounding (two running means, each rounded by 5e-6)
    for i, (got, want) in enumerate(zip(series, true), start=1):
        assert abs(got - want) <= i * 1e-5 + 1e-6


def test_parse_keeps_the_series_of_the_captured_run():
    s = evaluate.parse_kld_output(KLD_TEXT)
    assert len(s.chunk_kld) == s.chunks == 4
    assert s.kld_mean_err > s.kld_mean_err_token  # per-token errors understate: tokens of a chunk correlate


def test_view_file_holds_exactly_the_chosen_chunks(tmp_path):
    n_ctx, n_vocab, n_chunk = 16, 9, 5
    rng = np.random.default_rng(3)
    rows = evaluate.scored_per_chunk(n_ctx)
    raw = rng.normal(size=(n_chunk, rows, n_vocab))
    logp = raw - np.log(np.exp(raw).sum(axis=2, keepdims=True))
    tokens = rng.integers(0, n_vocab, size=n_chunk * n_ctx)
    p = tmp_path / "base.kld"
    _write_base_file(p, n_ctx, n_vocab, logp, tokens)
    base = evaluate.BaseLogits.open(p)
    view = base.write_view(tmp_path / "view.kld", 1, 4)  # chunks 1, 2, 3
    assert (view.n_ctx, view.n_vocab, view.n_chunk) == (n_ctx, n_vocab, 3)
    assert view.path.stat().st_size == evaluate.base_logits_bytes(n_vocab, n_ctx, 3)
    for i, c in enumerate(range(1, 4)):
        assert list(view.tokens(i)) == list(base.tokens(c))
        assert np.array_equal(view.log_probs(i), base.log_probs(c))
    whole = base.write_view(tmp_path / "whole.kld", 0, n_chunk)
    assert whole.path.read_bytes() == p.read_bytes()
    assert struct.unpack("<i", view.path.read_bytes()[16:20])[0] == 3
    with pytest.raises(InputError, match="not within"):
        base.write_view(tmp_path / "bad.kld", 3, 6)
