"""The evaluation-vs-calibration text overlap check (converters/ladder/evaluate/overlap.py)."""

from __future__ import annotations

import random

import pytest

from converters.core.errors import InputError
from converters.ladder.evaluate import overlap


def _prose(seed: int, words: int) -> str:
    """Random prose over a small vocabulary: independent texts of it share short runs, almost never 13 words."""
    rng = random.Random(seed)
    vocab = [f"{a}{b}" for a in ("ka", "lo", "mi", "su", "te", "ra", "vo", "ne") for b in ("n", "r", "s", "t", "")]
    out, line = [], []
    for _ in range(words):
        line.append(rng.choice(vocab))
        if len(line) == 12:
            out.append(" ".join(line) + rng.choice([".", ",", ";"]))
            line = []
    return "\n".join(out) + "\n"


def test_independent_texts_do_not_overlap(tmp_path):
    a, b = tmp_path / "eval.txt", tmp_path / "cal.txt"
    a.write_text(_prose(1, 20_000))
    b.write_text(_prose(2, 8_000))
    o = overlap.check(a, b)
    assert o.shared == 0 and o.eval_shingles > 19_000 and o.calibration_shingles > 7_000


def test_a_paragraph_of_the_calibration_text_inside_the_evaluation_text_is_refused(tmp_path):
    cal_text = _prose(2, 3_000)
    paragraph = " ".join(cal_text.split()[1000:1300])  # 300 words, re-wrapped and in other case/punctuation
    ev, cal = tmp_path / "eval.txt", tmp_path / "cal.txt"
    ev.write_text(_prose(1, 10_000) + "\n" + paragraph.upper().replace(",", " ,") + "\n" + _prose(3, 2_000))
    cal.write_text(cal_text)
    o = overlap.measure(ev, cal)
    assert o.shared == 300 - overlap.N_WORDS + 1  # every 13-word run of the paragraph, none elsewhere
    assert o.calibration_fraction == pytest.approx(o.shared / o.calibration_shingles)
    assert 0.01 < o.eval_fraction < o.calibration_fraction  # the short calibration text is the more overlapped
    with pytest.raises(InputError, match=rf"overlaps the calibration text cal.txt: {o.eval_fraction:.1%} of the "
                                         rf"evaluation text's 13-word runs and {o.calibration_fraction:.1%} of"):
        overlap.check(ev, cal)


def test_blocks_do_not_cut_words_or_runs(tmp_path, monkeypatch):
    text = _prose(5, 5_000)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(text)
    b.write_text(text)
    whole = overlap.shingles(a)
    monkeypatch.setattr(overlap, "BLOCK_BYTES", 997)  # blocks end inside words and inside runs
    assert overlap.shingles(a).tolist() == whole.tolist()
    assert overlap.measure(a, b).fraction == 1.0
