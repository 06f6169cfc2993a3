"""The paired gate of a tuned (or fit) file against its baseline (converters/ladder/evaluate/paired.py)."""

from __future__ import annotations

import math
import random

import pytest

from converters.core.report import FileResult, SERIES, KldStats, mean_err
from converters.ladder import evaluate
from converters.ladder.evaluate import paired

TOKENS = 64 * 255  # 64 chunks of ctx 512


def stats(series: list[float], *, p99: float = 0.05, p999: float = 0.15, top: float = 0.92,
          ln_ppl: list[float] | None = None) -> KldStats:
    m, err = mean_err(series)
    d = {f: 0.1 for f in KldStats.__dataclass_fields__ if f not in (*SERIES, "kld_mean_err_token")}
    d.update(chunks=len(series), kld_mean=m, kld_mean_err=err, kld_mean_err_token=err / 3, kld_p99=p99,
             kld_p999=p999, same_top_p=top, same_top_p_err=math.sqrt(top * (1 - top) / (TOKENS - 1)))
    if ln_ppl:
        d.update(ln_ppl_ratio=sum(ln_ppl) / len(ln_ppl), ppl_ratio=math.exp(sum(ln_ppl) / len(ln_ppl)))
    return KldStats(**d, chunk_kld=tuple(series), chunk_ln_ppl_ratio=tuple(ln_ppl or ()))


def f(qtype: str, s: KldStats, size: int = 1000, **extra) -> FileResult:
    return FileResult(type=qtype, path=f"M-{qtype}.gguf", size=size, bpw=None, bpw_nominal=4.89, stats=s,
                      extra=dict(extra))


def hard_chunks(seed: int = 0, n: int = 64) -> list[float]:
    """Per-chunk KLD of a stock file: chunks differ a lot in difficulty (that spread is what pairing removes)."""
    rng = random.Random(seed)
    return [0.02 * math.exp(rng.gauss(0, 0.6)) for _ in range(n)]


def test_a_clear_win_passes_even_where_the_unpaired_errors_overlap():
    stock = hard_chunks()
    rng = random.Random(1)
    tuned = [x * 0.93 * (1 + rng.gauss(0, 0.03)) for x in stock]  # 7 % better on every chunk, with noise
    c = paired.compare(f("Q4_K_M-tuned", stats(tuned)), f("Q4_K_M", stats(stock)))
    s, t = stats(stock), stats(tuned)
    assert s.kld_mean - t.kld_mean < math.hypot(s.kld_mean_err, t.kld_mean_err)  # the old rule would refuse it
    assert c.passed and c.kld.z < -paired.Z and c.chunks == 64
    assert c.describe().startswith("Q4_K_M-tuned vs Q4_K_M: mean KLD -0.00")


def test_a_coin_flip_is_withheld():
    stock = hard_chunks()
    rng = random.Random(2)
    noise = [rng.gauss(0, 0.002) for _ in stock]
    centred = [x + d - sum(noise) / len(noise) for x, d in zip(stock, noise)]  # better on some chunks, worse on others
    c = paired.compare(f("Q4_K_M-tuned", stats(centred)), f("Q4_K_M", stats(stock)))
    assert not c.passed and abs(c.kld.z) < 1e-6
    assert "is not below zero by more than 2 standard errors" in c.reasons[0]
    # files that differ by chance alone: at most the one-sided 2-sigma share (2.3 %) would be published
    published = 0
    for seed in range(300):
        rng = random.Random(100 + seed)
        flip = [x + rng.gauss(0, 0.002) for x in stock]
        published += paired.compare(f("T", stats(flip)), f("S", stats(stock))).passed
    assert published <= 300 * 0.05


def test_a_better_mean_with_a_p99_regression_is_withheld():
    stock = hard_chunks()
    tuned = [x * 0.9 for x in stock]
    c = paired.compare(f("Q4_K_M-tuned", stats(tuned, p99=0.09)), f("Q4_K_M", stats(stock, p99=0.05)))
    assert c.kld.z < -paired.Z
    assert len(c.reasons) == 1 and c.reasons[0].startswith("p99 KLD 0.0900 is worse than Q4_K_M's 0.0500")
    # a p99 change within its error passes (the estimated error: exponential tail from p99 to p99.9, 0.10 apart;
    # n_eff = tokens / 9, the design effect of the chunks)
    n_eff = TOKENS / 9
    want = math.sqrt(0.0099 / n_eff) * 0.10 / (0.01 * math.log(10))
    assert paired.p99_error(stats(stock), None) == pytest.approx(want, rel=1e-3)
    assert paired.compare(f("T", stats(tuned, p99=0.052)), f("S", stats(stock, p99=0.05))).passed


def test_a_same_top_regression_is_withheld():
    stock = hard_chunks()
    tuned = [x * 0.9 for x in stock]
    c = paired.compare(f("T", stats(tuned, top=0.88)), f("S", stats(stock, top=0.92)))
    assert [r.split(" %")[0] for r in c.reasons] == ["same top token 88.00"]


def test_a_better_mean_kld_with_a_worse_perplexity_on_the_same_chunks_is_withheld():
    # the tuned Q2_K of the layout benchmark: mean KLD -22 %, but PPL ratio 1.225 against 1.159 on the same chunks
    stock = hard_chunks(n=8)
    tuned = [x * 0.78 for x in stock]
    rng = random.Random(5)
    ln_stock = [0.148 + rng.gauss(0, 0.03) for _ in stock]
    ln_tuned = [x + 0.055 + rng.gauss(0, 0.01) for x in ln_stock]  # ln(1.225 / 1.159) higher on every chunk
    c = paired.compare(f("Q2_K-tuned", stats(tuned, ln_ppl=ln_tuned)), f("Q2_K", stats(stock, ln_ppl=ln_stock)))
    assert c.kld.z < -paired.Z and c.ln_ppl.z > paired.Z
    assert len(c.reasons) == 1 and c.reasons[0].startswith("perplexity 1.2")
    assert "worse than Q2_K's 1.1" in c.reasons[0] and "over 8 chunks" in c.reasons[0]
    assert c.to_json()["ln_ppl"]["diff"] == pytest.approx(c.ln_ppl.value, rel=1e-5)
    # the same mean-KLD gain with a perplexity that moves by noise only passes
    ln_noise = [x + rng.gauss(0, 0.01) for x in ln_stock]
    ln_noise = [x - (sum(ln_noise) - sum(ln_stock)) / len(ln_stock) for x in ln_noise]
    ok = paired.compare(f("T", stats(tuned, ln_ppl=ln_noise)), f("S", stats(stock, ln_ppl=ln_stock)))
    assert ok.passed and abs(ok.ln_ppl.z) < 1e-6 and "ln PPL " in ok.describe()
    # a better perplexity is no reason; reports without the series (written before it) are judged without it
    assert paired.compare(f("T", stats(tuned, ln_ppl=[x - 0.05 for x in ln_stock])),
                          f("S", stats(stock, ln_ppl=ln_stock))).passed
    old = paired.compare(f("T", stats(tuned)), f("S", stats(stock)))
    assert old.passed and old.ln_ppl is None


def test_bigger_files_and_missing_series():
    stock = hard_chunks()
    better = [x * 0.9 for x in stock]
    assert "more than S's 1,000" in paired.compare(f("T", stats(better), size=1001), f("S", stats(stock))).reasons[0]
    assert paired.compare(f("T", stats(better), size=1001), f("S", stats(stock)), same_size=False).passed  # a fit file
    no_series = f("T", stats(better))
    no_series.stats = KldStats(**{**no_series.stats.__dict__, "chunk_kld": ()})
    assert "no per-chunk KLD series" in paired.compare(no_series, f("S", stats(stock))).reasons[0]
    assert paired.compare(f("T", stats(better)), None).reasons == ("its baseline was not measured",)


@pytest.mark.parametrize("ratio,err,withheld", [
    (0.97, 0.01, False),  # 3 % slower: within the tolerance
    (0.90, 0.01, True),  # 10 % slower, well measured
    (0.93, 0.02, False),  # 7 % slower but the error (2 × 2 %) reaches back inside 5 %
    (0.85, 0.03, True),
])
def test_a_slower_file_is_withheld(ratio, err, withheld):
    stock = hard_chunks()
    speed = {"vs": {"baseline": "S", "pp": {"ratio": 1.0, "ratio_err": 0.01}, "tg": {"ratio": ratio, "ratio_err": err}}}
    c = paired.compare(f("T", stats([x * 0.9 for x in stock]), speed=speed), f("S", stats(stock)))
    assert (not c.passed) == withheld
    if withheld:
        assert c.reasons[0].startswith(f"generation is {100 * (1 - ratio):.1f} ± {100 * err:.1f} % slower than S")


def test_speed_required_withholds_an_unmeasured_file():
    stock = hard_chunks()
    c = paired.compare(f("T", stats([x * 0.9 for x in stock])), f("S", stats(stock)), speed_required=True)
    assert c.reasons == ("its speed was not measured against S",)


def test_the_gate_says_the_figures_and_records_the_comparison():
    stock = hard_chunks()
    files = [f("Q4_K_M", stats(stock)), f("Q4_K_M-tuned", stats([x * 0.9 for x in stock]), size=990),
             f("Q2_K-tuned", stats(stock)), f("Q2_K", stats(stock), size=500)]
    v = evaluate.judge(files)
    assert v.reasons["Q4_K_M-tuned"] == [] and v.reasons["Q2_K-tuned"][0].startswith("not better than Q2_K: ")
    assert any(n.startswith("Q4_K_M-tuned vs Q4_K_M: mean KLD -0.00") and n.endswith(": published") for n in v.notes)
    assert files[1].extra["versus"]["passed"] is True and files[1].extra["versus"]["chunks"] == 64


def test_a_memory_budget_file_is_judged_by_the_same_rule_and_may_be_larger():
    stock = hard_chunks()
    measured = {"budget_bytes": 8 * 10**9, "ctx": 8192, "memory": {"total": 7 * 10**9}}  # within the budget
    fit = {"fit": {"baseline": "Q4_K_M", "budget": "8GB@8k", **measured}}
    files = [f("Q4_K_M", stats(stock)), f("Q3_K_M", stats([x * 2 for x in stock]), size=800),
             f("fit-8GB-8k", stats([x * 0.9 for x in stock]), size=1100, **fit),
             f("fit-6GB-8k", stats(stock), size=900, fit={"baseline": "Q3_K_M", **measured})]
    v = evaluate.judge(files)
    assert v.reasons["fit-8GB-8k"] == [] and files[2].extra["versus"]["baseline"] == "Q4_K_M"
    assert v.reasons["fit-6GB-8k"] == []  # much better than Q3_K_M
    files[3].extra["fit"]["baseline"] = "Q4_K_M"
    assert "not below zero" in evaluate.judge(files).reasons["fit-6GB-8k"][0]  # a coin flip against Q4_K_M


@pytest.mark.parametrize("draw", ["exponential", "lognormal"])
def test_the_p99_error_estimate_against_simulation(draw):
    """The estimated p99 error (exponential tail through p99 and p99.9) against the spread of p99 over repeated
    samples of independent tokens: about right for an exponential tail, overstated (never much understated) for a
    heavier one."""
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(7)
    n = 16_000
    p99s, estimates = [], []
    for _ in range(200):
        x = rng.exponential(0.01, n) if draw == "exponential" else rng.lognormal(-5, 1.5, n)
        q99, q999 = np.quantile(x, [0.99, 0.999])
        p99s.append(q99)
        s = stats([0.01, 0.02], p99=float(q99), p999=float(q999))
        s = KldStats(**{**s.__dict__, "kld_mean_err_token": s.kld_mean_err})  # independent tokens: no design effect
        estimates.append(paired.p99_error(s, n))
    ratio = float(np.mean(estimates) / np.std(p99s))
    assert (0.8 < ratio < 1.25) if draw == "exponential" else (1.0 < ratio < 2.2)


def test_judge_file_applies_the_paired_rule_against_the_files_measured_before():
    from converters.ladder.evaluate import verdict

    stock = hard_chunks()
    s = f("Q4_K_M", stats(stock))
    t = f("Q4_K_M-tuned", stats([x * 0.9 for x in stock]), size=990)
    assert verdict.judge_file(t, [s]) == []
    assert verdict.judge_file(t, [s], speed_required=True) == [
        "not better than Q4_K_M: its speed was not measured against Q4_K_M"]
    assert verdict.judge_file(t, []) == ["not better than Q4_K_M: Q4_K_M was not measured"]
    assert verdict.thresholds(t, [s], 0.001) == []  # scored to the target precision, not to a threshold
