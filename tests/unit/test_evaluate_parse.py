"""Parsing llama-perplexity's output and the base-logits file format, without running anything.

The two captured outputs in ``data/`` come from the pinned llama.cpp (0c1e570) on SmolLM2-135M-Instruct:
``--kl-divergence-base`` of the BF16 GGUF over 4x512 tokens of wiki.test.raw, and ``--kl-divergence`` of its
Q8_0 against that file.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest

from converters.ladder import evaluate
from converters.llama import verify
from converters.core.errors import InputError, ParseError
from converters.core.report import Check, FileResult, SERIES, KldStats, Report, TextInfo

DATA = Path(__file__).parent / "data"
KLD_TEXT = (DATA / "perplexity_kld_q8_0.txt").read_text()
BASE_TEXT = (DATA / "perplexity_kld_base.txt").read_text()


def test_parse_kld_output_reads_every_figure_of_the_final_block():
    s = evaluate.parse_kld_output(KLD_TEXT)
    # each figure as printed in the captured output (percentages become fractions)
    expected = {
        "ppl": 22.183070, "ppl_err": 2.217088, "ppl_base": 22.058413, "ppl_base_err": 2.202824,
        "ln_ppl_ratio": 0.005635, "ln_ppl_ratio_err": 0.004135, "ppl_ratio": 1.005651, "ppl_ratio_err": 0.004158,
        "ppl_diff": 0.124657, "ppl_diff_err": 0.092554, "ppl_correlation": 0.9991,
        "kld_mean": 0.004345, "kld_mean_err_token": 0.000242, "kld_max": 0.201449, "kld_p999": 0.061329,
        "kld_p99": 0.020238, "kld_median": 0.003076, "dp_mean": -0.00114, "dp_mean_err": 0.00047,
        "rms_dp": 0.01494, "rms_dp_err": 0.00099, "same_top_p": 0.96373, "same_top_p_err": 0.00586, "chunks": 4,
    }
    got = s.figures()
    assert set(got) == set(expected) | {"kld_mean_err"}
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert s.non_finite() == []
    # the per-chunk means, differenced from the running means of the table, shifted onto the 6-decimal mean
    chunks = [0.00376, 2 * 0.00439 - 0.00376, 3 * 0.00458 - 2 * 0.00439, 4 * 0.00434 - 3 * 0.00458]
    assert s.chunk_kld == pytest.approx([c + 0.000005 for c in chunks], abs=1e-12)
    assert s.kld_mean_err == pytest.approx(np.std(chunks, ddof=1) / 2, rel=1e-9)  # from chunk means, not tokens
    # the per-chunk ln(PPL(Q)/PPL(base)) the same way, from its running column, shifted onto the 6-decimal mean
    ln = [-0.00137, 2 * 0.00544 + 0.00137, 3 * 0.00510 - 2 * 0.00544, 4 * 0.00564 - 3 * 0.00510]
    assert s.chunk_ln_ppl_ratio == pytest.approx([c + 0.005635 - 0.00564 for c in ln], abs=1e-12)
    assert sum(s.chunk_ln_ppl_ratio) / 4 == pytest.approx(s.ln_ppl_ratio, abs=1e-12)


def test_ratio_is_exp_of_ln_ratio_as_llama_cpp_computes_it():
    s = evaluate.parse_kld_output(KLD_TEXT)
    assert s.ppl_ratio == pytest.approx(math.exp(s.ln_ppl_ratio), rel=1e-5)
    assert s.ppl / s.ppl_base == pytest.approx(s.ppl_ratio, rel=1e-5)


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.split("====== KL divergence statistics ======")[0], "no KL divergence statistics"),
    (lambda t: t.replace("Same top p:", "Same top q:"), "same_top_p"),
    (lambda t: t.replace("Mean    KLD:", "Mean KL:"), "kld_mean"),
    (lambda t: t.replace("Median  KLD:", "Median KLD"), "kld_median"),
    (lambda t: "", "no KL divergence statistics"),
    (lambda t: "kl_divergence: failed reading log-probs for chunk 3\n", "failed reading log-probs"),
])
def test_parse_kld_output_raises_instead_of_guessing(mutate, message):
    with pytest.raises(ParseError, match=message):
        evaluate.parse_kld_output(mutate(KLD_TEXT))


def test_nan_figures_are_parsed_as_nan_not_zero():
    text = KLD_TEXT.replace("Mean    KLD:   0.004345 ±   0.000242", "Mean    KLD:        nan ±        nan")
    text = text.replace("Maximum KLD:   0.201449", "Maximum KLD:        inf")
    s = evaluate.parse_kld_output(text)
    assert math.isnan(s.kld_mean) and math.isinf(s.kld_max)
    assert set(s.non_finite()) == {"kld_mean", "kld_mean_err", "kld_mean_err_token", "kld_max"}


def test_parse_base_output():
    ppl, err = evaluate.parse_base_output(BASE_TEXT)
    assert (ppl, err) == (22.1134, 2.21601)
    with pytest.raises(ParseError, match="need at least"):
        evaluate.parse_base_output("perplexity: you need at least 1024 tokens to evaluate perplexity with a context "
                                   "of 512\n")


def test_base_logits_size_formula_matches_the_captured_run():
    # the captured base run wrote 100286452 bytes: 4 chunks, ctx 512, vocabulary 49152
    assert evaluate.base_logits_bytes(49152, 512, 4) == 100_286_452
    assert evaluate.scored_per_chunk(512) == 255


def _write_base_file(path: Path, n_ctx: int, n_vocab: int, logp: np.ndarray, tokens: np.ndarray) -> None:
    """A base-logits file in llama.cpp's layout, quantizing log-probs as perplexity.cpp does."""
    n_chunk, rows, _ = logp.shape
    nv = 2 * ((n_vocab + 1) // 2) + 4
    with open(path, "wb") as f:
        f.write(b"_logits_" + struct.pack("<Iii", n_ctx, n_vocab, n_chunk))
        f.write(tokens.astype("<i4").tobytes())
        for c in range(n_chunk):
            for r in range(rows):
                lp = logp[c, r]
                mx, mn = lp.max(), max(lp.min(), lp.max() - 16)
                scale = (mx - mn) / 65535
                q = np.where(lp > mn, np.rint((lp - mn) / scale), 0).astype("<u2")
                row = np.zeros(nv, dtype="<u2")
                row[:4] = np.frombuffer(struct.pack("<ff", scale, mn), dtype="<u2")
                row[4:4 + n_vocab] = q
                f.write(row.tobytes())


@pytest.mark.parametrize("n_ctx, n_vocab, n_chunk", [(16, 7, 2), (32, 10, 3), (8, 5, 1)])
def test_base_logits_reader_round_trips(tmp_path, n_ctx, n_vocab, n_chunk):
    rng = np.random.default_rng(n_ctx + n_vocab)
    rows = evaluate.scored_per_chunk(n_ctx)
    raw = rng.normal(size=(n_chunk, rows, n_vocab))
    logp = raw - np.log(np.exp(raw).sum(axis=2, keepdims=True))
    tokens = rng.integers(0, n_vocab, size=n_chunk * n_ctx)
    p = tmp_path / "base.kld"
    _write_base_file(p, n_ctx, n_vocab, logp, tokens)
    assert p.stat().st_size == evaluate.base_logits_bytes(n_vocab, n_ctx, n_chunk)
    bl = evaluate.BaseLogits.open(p)
    assert (bl.n_ctx, bl.n_vocab, bl.n_chunk) == (n_ctx, n_vocab, n_chunk)
    for c in range(n_chunk):
        assert list(bl.tokens(c)) == list(tokens[c * n_ctx:(c + 1) * n_ctx])
        # 16-bit quantization over a range of at most 16 nats: error below 16/65535 per entry
        assert np.abs(bl.log_probs(c) - logp[c]).max() < 16 / 65535 + 1e-6


def test_base_logits_reader_rejects_other_files(tmp_path):
    p = tmp_path / "x.kld"
    p.write_bytes(b"GGUF" + b"\0" * 40)
    with pytest.raises(InputError, match="not a llama.cpp base-logits"):
        evaluate.BaseLogits.open(p)
    p.write_bytes(b"_logits_" + struct.pack("<Iii", 16, 7, 2) + b"\0" * 10)
    with pytest.raises(InputError, match="expected"):
        evaluate.BaseLogits.open(p)


@pytest.mark.parametrize("stdout, ids", [
    ("[1, 2, 3]\n", [1, 2, 3]),
    ("[]\n", []),
    ("some log line\n[19556, 216]\n", [19556, 216]),
])
def test_parse_ids(stdout, ids):
    assert verify.parse_ids(stdout) == ids


def test_parse_ids_without_a_list_raises():
    with pytest.raises(ParseError):
        verify.parse_ids("error: could not load model\n")


@pytest.mark.parametrize("a, b, index", [
    ([1, 2, 3], [1, 2, 3], None),
    ([1, 2, 3], [1, 5, 3], 1),
    ([1, 2], [1, 2, 3], 2),
    ([], [7], 0),
])
def test_first_mismatch(a, b, index):
    assert verify.first_mismatch(a, b) == index


@pytest.mark.parametrize("text, bad", [
    ("The capital of France is Paris.", None),
    ("", "empty output"),
    ("   \n ", "empty output"),
    ("the the the the the the the the the", "one token repeated"),
    ("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!", "one token repeated"),
    ("a b a b a b a b a b a b a b a b a b a b a b a b", "a loop over 2 distinct tokens"),
    ("ab ba ab ba ab ba ab ba cd ab ba ab ba ab ba ab ba ab ba ab ba ab ba ab", "a loop over"),
    ("\ufffd\ufffd\ufffd\ufffd\ufffd\ufffd\ufffdxy", "invalid UTF-8"),
    ("Paris is the capital and largest city of France, on the Seine.", None),
    ("1. Apples\n2. Pears\n3. Plums\n4. Cherries", None),
])
def test_degenerate(text, bad):
    got = verify.degenerate(text)
    if bad is None:
        assert got is None
    else:
        assert got is not None and bad in got


def _stats(**kw) -> KldStats:
    base = {f: 0.0 for f in KldStats.__dataclass_fields__ if f not in SERIES}
    base.update(chunks=4, ppl=10.0, ppl_base=10.0, ppl_ratio=1.0)
    base.update(kw)
    return KldStats(**base)


def test_report_round_trips_and_keeps_unknown_fields(tmp_path):
    from converters.core.workdir import WorkDir

    f = FileResult(type="Q4_K_M", path="M-Q4_K_M.gguf", size=10, bpw=4.9, bpw_nominal=4.89,
                   stats=_stats(kld_mean=0.03, kld_mean_err=0.001, kld_max=float("inf")),
                   checks={"generation": Check.ok("fine", tokens=9)}, status="failed", reasons=["x"])
    r = Report(model_name="M", source={"repo": "a/b"}, toolchain={}, tools={"llama.cpp": "v"},
               texts={"eval": TextInfo(name="wiki.test.raw", sha256="0" * 64, bytes=1, tokens=5)}, settings={},
               reference={"type": "BF16"}, checks={"tokenizer": Check.fail("mismatch", index=3)},
               files=[f], publishable=False, reasons=["r"], seconds={"total": 1.0}, extra={"future": {"k": 1}})
    WorkDir(tmp_path).write_report(r)
    back = WorkDir(tmp_path).report()
    assert back.to_json() == r.to_json()
    d = back.to_json()
    assert d["files"][0]["kld_max"] == "inf"  # non-finite figures stay visible; JSON has no inf
    assert d["files"][0]["checks"]["generation"] == {"status": "passed", "passed": True, "detail": "fine", "tokens": 9}
    assert d["checks"]["tokenizer"]["passed"] is False
    assert d["future"] == {"k": 1}
    assert math.isinf(back.files[0].stats.kld_max)


def test_report_of_another_schema_version_is_refused(tmp_path):
    from converters.core.workdir import WorkDir

    (tmp_path / "report.json").write_text('{"schema_version": 99}')
    with pytest.raises(InputError, match="schema_version"):
        WorkDir(tmp_path).report()
