"""The gate and the publishable verdict: pure functions of figures and checks (table-driven)."""

from __future__ import annotations

import pytest

from converters.ladder import evaluate
from converters.core.report import Check, FileResult, SERIES, KldStats

NAN = float("nan")


def stats(kld: float, err: float, **kw) -> KldStats:
    d = {f: 0.1 for f in KldStats.__dataclass_fields__ if f not in SERIES}
    d.update(chunks=4, kld_mean=kld, kld_mean_err=err)
    d.update(kw)
    return KldStats(**d)


def f(qtype: str, kld: float | None = None, err: float = 0.001, *, bits: float | None = None, checks=None,
      error: str | None = None, **kw) -> FileResult:
    return FileResult(type=qtype, path=f"M-{qtype}.gguf", size=1, bpw=None, bpw_nominal=bits,
                      stats=stats(kld, err, **kw) if kld is not None else None, checks=checks or {}, error=error)


# (name, files, ceilings, {type: expected reason fragments (empty: passes)})
CASES = [
    ("a normal ladder passes",
     [f("Q8_0", 0.004, 0.0002), f("Q4_K_M", 0.037, 0.002), f("Q2_K", 0.30, 0.01)], None,
     {"Q8_0": [], "Q4_K_M": [], "Q2_K": []}),
    ("a damaged high-bit file is far above the curve and above its ceiling",
     [f("Q8_0", 0.18, 0.017), f("Q4_K_M", 0.037, 0.002), f("Q2_K", 0.30, 0.01)], None,
     {"Q8_0": ["far above the ladder's curve", "neighbours (Q4_K_M, Q2_K)", "above the Q8_0 ceiling of 0.05"],
      "Q4_K_M": [], "Q2_K": []}),
    ("within the errors is not out of line",
     [f("Q6_K", 0.011, 0.002), f("Q5_K_M", 0.010, 0.002)], None, {"Q6_K": [], "Q5_K_M": []}),
    ("close bit widths may swap (an imatrix IQ type beating a K type)",
     [f("Q4_K_S", 0.043, 0.0003), f("IQ4_XS", 0.036, 0.0003)], None, {"Q4_K_S": [], "IQ4_XS": []}),
    ("an order inversion between distant types is not a failure",
     [f("Q8_0", 0.013, 0.0001), f("Q6_K", 0.010, 0.0001)], None, {"Q8_0": [], "Q6_K": []}),
    ("NaN figures fail",
     [f("Q4_K_M", NAN, NAN), f("Q2_K", 0.3, 0.01)], None,
     {"Q4_K_M": ["not finite: kld_mean, kld_mean_err"], "Q2_K": []}),
    ("infinite maximum fails",
     [f("Q4_K_M", 0.03, 0.001, kld_max=float("inf"))], None, {"Q4_K_M": ["not finite: kld_max"]}),
    ("a configured ceiling",
     [f("Q4_K_M", 0.037, 0.002), f("Q2_K", 0.30, 0.01)], {"Q2_K": 0.25},
     {"Q4_K_M": [], "Q2_K": ["above the Q2_K ceiling of 0.25"]}),
    ("a configured default ceiling",
     [f("Q4_K_M", 0.037, 0.002), f("Q2_K", 0.30, 0.01)], {"default": 0.03},
     {"Q4_K_M": ["ceiling of 0.03"], "Q2_K": ["ceiling of 0.03"]}),
    ("a failed measurement",
     [f("Q4_K_M", error="llama-perplexity exited with code 134")], None,
     {"Q4_K_M": ["measurement failed: llama-perplexity exited with code 134"]}),
    ("not measured",
     [f("Q4_K_M")], None, {"Q4_K_M": ["not measured"]}),
    ("a failed file check",
     [f("Q4_K_M", 0.037, checks={"generation": Check.fail("degenerate output (empty output)")})], None,
     {"Q4_K_M": ["generation check failed: degenerate output (empty output)"]}),
    ("nominal bits from the ladder override the catalogue",
     [f("Q8_0", 0.05, 0.001, bits=4.0), f("Q4_K_M", 0.04, 0.001, bits=4.0)], {"default": 1.0},
     {"Q8_0": [], "Q4_K_M": []}),
]


@pytest.mark.parametrize("name, files, ceilings, expected", CASES, ids=[c[0] for c in CASES])
def test_gate(name, files, ceilings, expected):
    got = evaluate.gate(files, ceilings)
    assert set(got) == set(expected)
    for qtype, fragments in expected.items():
        if not fragments:
            assert got[qtype] == [], (qtype, got[qtype])
        joined = " | ".join(got[qtype])
        for frag in fragments:
            assert frag in joined, (qtype, frag, joined)


def test_failed_job_checks_fail_every_file():
    files = [f("Q8_0", 0.004), f("Q2_K", 0.3, 0.01)]
    got = evaluate.gate(files, job_checks={"chat_template": Check.fail("the GGUF has no chat template"),
                                            "special_tokens": Check.ok("fine")})
    for reasons in got.values():
        assert reasons == ["chat_template check failed on the reference: the GGUF has no chat template"]


@pytest.mark.parametrize("bpw, ceiling", [(8.5, 0.05), (6.56, 0.10), (5.5, 0.20), (4.89, 0.40), (3.5, 0.80),
                                          (2.96, 1.50), (1.75, 3.0)])
def test_default_ceilings_loosen_with_fewer_bits(bpw, ceiling):
    assert evaluate.default_ceiling(bpw) == ceiling


@pytest.mark.parametrize("checks, ok, fragment", [
    ({"bf16_vs_source": Check.ok("x"), "tokenizer": Check.ok("y")}, True, None),
    ({"bf16_vs_source": Check.skip("not checked: out of memory"), "tokenizer": Check.ok("y")}, False,
     "was not checked against the source model (not checked: out of memory)"),
    ({"bf16_vs_source": Check.fail("top-1 80 %"), "tokenizer": Check.ok("y")}, False, "disagrees with the source"),
    ({"bf16_vs_source": Check.ok("x"), "tokenizer": Check.fail("sample 'digits'")}, False, "tokenizer differs"),
    ({"bf16_vs_source": Check.ok("x")}, False, "tokenizer check did not run"),
    ({"bf16_vs_source": Check.ok("x"), "tokenizer": Check.ok("y"), "chat_template": Check.fail("z")}, True, None),
])
def test_publishable(checks, ok, fragment):
    got, reasons = evaluate.publishable(checks)
    assert got is ok
    if fragment:
        assert any(fragment in r for r in reasons)
    else:
        assert reasons == []


def test_an_unchecked_conversion_is_publishable_only_by_setting():
    checks = {"bf16_vs_source": Check.skip("not checked: transformers cannot load it"), "tokenizer": Check.ok("y")}
    assert evaluate.publishable(checks, require_source_check=False) == (True, [])
    failed = {"bf16_vs_source": Check.fail("top-1 80 %"), "tokenizer": Check.ok("y")}
    assert evaluate.publishable(failed, require_source_check=False)[0] is False  # a failure is never allowed


@pytest.mark.parametrize("items, expected", [
    ([], {}),
    (["q4_k_m=0.1"], {"Q4_K_M": 0.1}),
    (["Q2_K=1", "default=0.5"], {"Q2_K": 1.0, "default": 0.5}),
])
def test_cli_ceilings(items, expected):
    from bot.commands.evaluate import parse_ceilings

    assert parse_ceilings(items) == expected


@pytest.mark.parametrize("bad", ["Q4_K_M", "Q4_K_M=x", "=1"])
def test_cli_ceilings_refuse_garbage(bad):
    from bot.commands.evaluate import parse_ceilings
    from converters.core.errors import InputError

    with pytest.raises(InputError, match="bad --ceiling"):
        parse_ceilings([bad])


# ------------------------------------------------------------------------------------------ the ladder's curve
# Measured on SmolLM2-135M-Instruct (no imatrix, 2 chunks of 256 tokens of WikiText-2; its weights come from a
# Q4_1 file, so Q5_K_M measures worse than Q4_K_M): (type, mean KLD, standard error).
SMOL = [("Q8_0", 0.00394, 0.00029), ("Q6_K", 0.00927, 0.00072), ("Q5_K_M", 0.07499, 0.00775),
        ("Q4_K_M", 0.0536, 0.00503), ("Q3_K_M", 0.13715, 0.01456), ("Q2_K", 0.43279, 0.03257)]
# Measured the same way on damaged copies (one tensor zeroed with tests/ggufedit.damage_tensor).
SMOL_Q4_FFN_UP_1 = (0.39025, 0.05602)  # Q4_K_M, blk.1.ffn_up.weight: below the Q4_K_M ceiling of 0.4
SMOL_Q4_ATTN_OUT_20 = (0.24186, 0.02128)  # Q4_K_M, blk.20.attn_output.weight
SMOL_Q2_ATTN_OUT_0 = (3.57344, 0.13331)  # Q2_K, blk.0.attn_output.weight
# Measured by the bot (imatrix of 2 chunks, 2 evaluation chunks of 256 tokens) with the same two tensors zeroed:
# after both damaged files go, the good Q3_K_M below them is judged from the flat top of the ladder alone.
SMOL_IMATRIX_DAMAGED = [("Q8_0", 0.004393, 0.000449), ("Q6_K", 0.008177, 0.000582), ("Q5_K_M", 0.007248, 0.000546),
                        ("Q4_K_M", 0.407618, 0.04953), ("Q3_K_M", 0.094642, 0.007108), ("Q2_K", 3.067807, 0.099469)]
# The shape of a larger model's imatrix ladder (every type of the default ladder; figures made up along it).
NORMAL = [("Q8_0", 0.0011, 0.00005), ("Q6_K", 0.0046, 0.0001), ("Q5_K_M", 0.0098, 0.0002),
          ("Q5_K_S", 0.0112, 0.0002), ("Q4_K_M", 0.031, 0.0005), ("Q4_K_S", 0.038, 0.0006),
          ("IQ4_XS", 0.036, 0.0006), ("Q3_K_L", 0.071, 0.001), ("Q3_K_M", 0.094, 0.0013), ("Q3_K_S", 0.19, 0.002),
          ("IQ3_M", 0.086, 0.0012), ("Q2_K", 0.37, 0.004)]
# A quantization-aware source made for Q4_K_M: Q4_K_M 0.0047 and Q6_K 0.0064 as measured on such a model; the
# other figures made up along them.
QAT = [("Q8_0", 0.0021, 0.0001), ("Q6_K", 0.0064, 0.0003), ("Q5_K_M", 0.0055, 0.0003), ("Q4_K_M", 0.0047, 0.0002),
       ("Q3_K_M", 0.041, 0.002), ("Q2_K", 0.19, 0.008)]


def ladder(rows, **changed):
    return [f(t, *changed.get(t, (kld, err))) for t, kld, err in rows]


def pick(rows, *types):
    return [r for r in rows if r[0] in types]


# (name, files, {type: reason fragments} for the refused files (the rest must pass), note fragments)
CURVES = [
    ("SmolLM2 as measured: every file passes", ladder(SMOL), {}, []),
    ("a typical full ladder passes", ladder(NORMAL), {}, []),
    ("QAT: Q6_K above Q4_K_M is a note, not a failure", ladder(QAT), {},
     ["order inversion: Q6_K", "than Q4_K_M", "not a failure"]),
    ("one outlier below its ceiling: a damaged Q4_K_M",
     ladder(SMOL, Q4_K_M=SMOL_Q4_FFN_UP_1), {"Q4_K_M": ["far above the ladder's curve", "(limit 3×"]}, []),
    ("a milder damage of Q4_K_M is still refused",
     ladder(SMOL, Q4_K_M=SMOL_Q4_ATTN_OUT_20), {"Q4_K_M": ["far above the ladder's curve"]}, []),
    ("two outliers: damaged Q4_K_M and Q2_K",
     ladder(SMOL, Q4_K_M=SMOL_Q4_FFN_UP_1, Q2_K=SMOL_Q2_ATTN_OUT_0),
     {"Q4_K_M": ["far above"], "Q2_K": ["far above", "above the Q2_K ceiling of 1.5"]}, []),
    ("two outliers around a good file: the good one is not refused (measured through the bot)",
     ladder(SMOL_IMATRIX_DAMAGED), {"Q4_K_M": ["far above"], "Q2_K": ["far above"]}, []),
    ("two outliers below their ceilings, one at the end of the ladder",
     ladder(SMOL, Q4_K_M=SMOL_Q4_FFN_UP_1, Q2_K=(1.40, 0.05)), {"Q4_K_M": ["far above"], "Q2_K": ["far above"]}, []),
    ("two adjacent outliers do not shield each other",
     ladder(NORMAL, Q4_K_M=(0.25, 0.004), Q4_K_S=(0.30, 0.005)), {"Q4_K_M": ["far above"], "Q4_K_S": ["far above"]},
     []),
    ("a damaged top of the ladder", ladder(NORMAL, Q8_0=(0.02, 0.001)), {"Q8_0": ["far above"]}, []),
    ("a damaged bottom of the ladder", ladder(NORMAL, Q2_K=(1.3, 0.02)), {"Q2_K": ["far above"]}, []),
    ("a QAT ladder with a damaged Q5_K_M", ladder(QAT, Q5_K_M=(0.03, 0.001)), {"Q5_K_M": ["far above"]},
     ["order inversion: Q6_K"]),
    ("one file: no curve", ladder(pick(SMOL, "Q4_K_M")), {}, []),
    ("one damaged file: only its ceiling", ladder(pick(SMOL, "Q4_K_M"), Q4_K_M=(0.5, 0.05)),
     {"Q4_K_M": ["above the Q4_K_M ceiling of 0.4"]}, []),
    ("two files", ladder(pick(SMOL, "Q8_0", "Q4_K_M")), {}, []),
    ("two files, QAT", ladder(pick(QAT, "Q6_K", "Q4_K_M")), {}, ["order inversion: Q6_K"]),
    ("two files, the higher one damaged", ladder(pick(SMOL, "Q8_0", "Q4_K_M"), Q8_0=(0.2, 0.01)),
     {"Q8_0": ["far above", "neighbours (Q4_K_M)"]}, []),
    ("two files cannot judge their bottom below its ceiling", ladder(pick(SMOL, "Q4_K_M", "Q2_K"), Q2_K=(1.4, 0.05)),
     {}, []),
]


@pytest.mark.parametrize("name, files, refused, notes", CURVES, ids=[c[0] for c in CURVES])
def test_curve(name, files, refused, notes):
    verdict = evaluate.judge(files)
    assert {t for t, why in verdict.reasons.items() if why} == set(refused), verdict.reasons
    for qtype, fragments in refused.items():
        joined = " | ".join(verdict.reasons[qtype])
        for frag in fragments:
            assert frag in joined, (qtype, frag, joined)
    joined = " | ".join(verdict.notes)
    assert bool(verdict.notes) == bool(notes), verdict.notes
    for frag in notes:
        assert frag in joined, (frag, joined)


def test_expected_kld_follows_the_curve_without_its_outliers():
    clean = evaluate.expected_klds(ladder(SMOL))
    damaged = evaluate.expected_klds(ladder(SMOL, Q4_K_M=SMOL_Q4_FFN_UP_1))
    assert set(clean) == {t for t, _, _ in SMOL}
    assert 0.02 < clean["Q4_K_M"] < 0.1 and clean["Q4_K_M"] == pytest.approx(damaged["Q4_K_M"])
    assert damaged["Q5_K_M"] == pytest.approx(clean["Q5_K_M"], rel=0.6)  # the outlier does not move the others much
    assert evaluate.expected_klds(ladder(pick(SMOL, "Q4_K_M"))) == {"Q4_K_M": None}
