"""The publish rule of per-tensor tuned files: better than the stock file by more than the error, no bigger."""

from __future__ import annotations

import math

import pytest

from converters.ladder import evaluate
from converters.ladder import layout
from converters.core.report import FileResult, SERIES, KldStats


def stats(kld: float, err: float) -> KldStats:
    """Four chunks around ``kld`` whose chunk-to-chunk spread gives the standard error ``err``; the hard chunks are
    the same for every file (what the paired test relies on)."""
    d = {f: 0.1 for f in KldStats.__dataclass_fields__ if f not in (*SERIES, "kld_mean_err_token")}
    d.update(chunks=4, kld_mean=kld, kld_mean_err=err)
    step = err * 2 / math.sqrt(5 / 3)  # offsets -1.5, -0.5, 0.5, 1.5 steps: sd = step * sqrt(5/3), err = sd / 2
    return KldStats(**d, chunk_kld=tuple(kld + k * step for k in (-1.5, -0.5, 0.5, 1.5)))


BITS = {"Q8_0": 8.5, "Q4_K_M": 4.89, "Q2_K": 2.96}


def f(qtype: str, kld: float, err: float, size: int) -> FileResult:
    return FileResult(type=qtype, path=f"M-{qtype}.gguf", size=size, bpw=None,
                      bpw_nominal=BITS[layout.stock_of(qtype)], stats=stats(kld, err))


@pytest.mark.parametrize("stock,tuned,fragment", [
    ((0.040, 0.002, 1000), (0.030, 0.002, 1000), None),  # 0.010 better on every chunk: published
    ((0.040, 0.010, 1000), (0.039, 0.002, 990), "not below zero by more than 2 standard errors"),  # within the error
    ((0.040, 0.002, 1000), (0.045, 0.002, 990), "not below zero"),  # worse
    ((0.040, 0.002, 1000), (0.020, 0.002, 1001), "more than Q4_K_M's 1,000"),  # bigger
])
def test_tuned_file_is_gated_against_its_stock_file(stock, tuned, fragment):
    files = [f("Q8_0", 0.004, 0.0002, 2000), f("Q4_K_M", *stock), f("Q4_K_M-tuned", *tuned), f("Q2_K", 0.3, 0.01, 500)]
    reasons = evaluate.gate(files)
    assert reasons["Q4_K_M"] == [] and reasons["Q8_0"] == [] and reasons["Q2_K"] == []
    if fragment is None:
        assert reasons["Q4_K_M-tuned"] == []
    else:
        assert len(reasons["Q4_K_M-tuned"]) == 1 and fragment in reasons["Q4_K_M-tuned"][0]
        assert reasons["Q4_K_M-tuned"][0].startswith("not better than Q4_K_M")


def test_tuned_file_without_its_stock_file_is_withheld():
    files = [f("Q8_0", 0.004, 0.0002, 2000), f("Q2_K-tuned", 0.1, 0.01, 500)]
    assert evaluate.gate(files)["Q2_K-tuned"] == ["not better than Q2_K: Q2_K was not measured"]


def test_tuned_files_stay_off_the_ladder_curve():
    files = [f("Q8_0", 0.004, 0.0002, 2000), f("Q4_K_M", 0.04, 0.002, 1000), f("Q4_K_M-tuned", 0.001, 0.0001, 999)]
    assert [p.key for p in evaluate.curve_points(files)] == ["Q8_0", "Q4_K_M"]


def test_names():
    assert layout.is_tuned("Q4_K_M-tuned") and not layout.is_tuned("Q4_K_M")
    assert layout.stock_of("Q4_K_M-tuned") == "Q4_K_M" and layout.stock_of("Q2_K") == "Q2_K"
