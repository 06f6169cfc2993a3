"""The gate and the publishable verdict: pure functions of figures and checks (table-driven)."""

from __future__ import annotations

import pytest

from converters import evaluate
from converters.report import Check, FileResult, KldStats

NAN = float("nan")


def stats(kld: float, err: float, **kw) -> KldStats:
    d = {f: 0.1 for f in KldStats.__dataclass_fields__}
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
    ("a damaged high-bit file is out of line and above its ceiling",
     [f("Q8_0", 0.18, 0.017), f("Q4_K_M", 0.037, 0.002), f("Q2_K", 0.30, 0.01)], None,
     {"Q8_0": ["out of line with the ladder", "Q4_K_M's 0.0370", "above the Q8_0 ceiling of 0.05"],
      "Q4_K_M": [], "Q2_K": []}),
    ("within the errors is not out of line",
     [f("Q6_K", 0.011, 0.002), f("Q5_K_M", 0.010, 0.002)], None, {"Q6_K": [], "Q5_K_M": []}),
    ("close bit widths may swap (an imatrix IQ type beating a K type)",
     [f("Q4_K_S", 0.043, 0.0003), f("IQ4_XS", 0.036, 0.0003)], None, {"Q4_K_S": [], "IQ4_XS": []}),
    ("a relative tolerance of 25 % between distant types",
     [f("Q8_0", 0.012, 0.0001), f("Q6_K", 0.010, 0.0001)], None, {"Q8_0": [], "Q6_K": []}),
    ("beyond the relative tolerance",
     [f("Q8_0", 0.013, 0.0001), f("Q6_K", 0.010, 0.0001)], None,
     {"Q8_0": ["out of line", "Q6_K's"], "Q6_K": []}),
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
    ({"bf16_vs_source": Check.skip("too large"), "tokenizer": Check.ok("y")}, True, None),
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
    from converters.errors import InputError

    with pytest.raises(InputError, match="bad --ceiling"):
        parse_ceilings([bad])
