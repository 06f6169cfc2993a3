"""The gate of a file that must beat a baseline (pure): a tuned file against its stock file, a memory-budget file
against the largest stock file that fits the same budget. One function, :func:`compare`, for both.

Both files are scored on the same chunks of the same text against the same base logits, so the comparison is
paired, chunk by chunk:

- **Mean KLD** (the claim): the per-chunk mean KLDs (``KldStats.chunk_kld``: chunk means, not tokens, because the
  tokens of a chunk are correlated while chunks are close to independent) are differenced chunk by chunk; the
  candidate passes only when the mean difference is below zero by more than :data:`Z` (2) standard errors of the
  paired difference (``sd(differences) / sqrt(chunks)``). A hard chunk is hard for both files, so pairing removes
  most of the chunk-to-chunk spread that an unpaired comparison of two ``kld_mean ± err`` would carry: a coin flip
  (differences centred on zero) fails whatever the chunk count; a real gain passes with few chunks.
- **Perplexity** (no regression of the model's own predictions hidden behind a better mean KLD): the per-chunk
  ``ln(PPL(Q)/PPL(base))`` series (``KldStats.chunk_ln_ppl_ratio``) of the two files are differenced chunk by chunk
  like the KLD; the candidate is withheld when its ln PPL is higher than the baseline's by more than :data:`Z`
  standard errors of that paired difference. (A tuned Q2_K passed a gate without this check with a better mean KLD
  and top-token rate but a PPL ratio of 1.225 against the stock file's 1.159 on the same chunks.)
- **p99 KLD and same top token** (no regression hidden behind a better mean): not worse beyond 2 errors of their
  difference. llama-perplexity prints these over all tokens only (no per-chunk values), so their errors are
  estimated, and how is part of the verdict's meaning:

  * the tokens' *effective* count: ``n_eff = tokens / deff``, the design effect ``deff`` being the ratio of the
    chunk-based to the per-token variance of the mean KLD (``(kld_mean_err / kld_mean_err_token)**2``, at least 1),
    i.e. how much the correlation within chunks shrinks the information; ``tokens`` comes from llama.cpp's
    binomial error of same-top (``p(1-p)/err**2``) when not given;
  * same top: ``sqrt(p(1-p)/n_eff)`` per file;
  * p99: the standard error of a sample quantile, ``sqrt(p(1-p)/n_eff) / f(q)``; the density ``f`` at the 99th
    percentile comes from the tail llama.cpp prints, the share of tokens above x taken as log-linear between p99
    (1 %) and p99.9 (0.1 %), i.e. an exponential tail: ``f = 0.01 * ln(10) / (p99.9 - p99)``. Checked by
    simulation (``tests/unit/test_paired.py``): on independent tokens it gives 0.9-1.1 times the true standard
    error of p99 for exponential and gamma tails and up to 2 times for heavier, lognormal ones (it overstates,
    never much understates);
  * the two files' errors are combined as independent (``hypot``): their errors are positively correlated (same
    tokens), so this too overstates the error of the difference. These two checks catch clear regressions only;
    the mean-KLD test above is the strict one.
- **Bytes**: a tuned file may not be larger than its stock file (``same_size``); a fit file is judged against a
  baseline chosen by the same budget and may be larger.
- **Speed** (:mod:`converters.ladder.speed`, when measured): prompt or generation throughput more than
  :data:`SPEED_TOLERANCE` (5 %) below the baseline's beyond 2 errors of the interleaved ratio withholds the file.

:func:`compare` returns a :class:`Comparison` whose ``reasons`` are empty when the candidate passes and whose
:meth:`Comparison.describe` says the figures either way (the verdict's note or reason).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from converters.core.report import FileResult, KldStats, paired_difference
from converters.ladder.speed import SPEED_KEY

Z = 2.0  # standard errors a difference must exceed
P99_DENSITY = 0.01 * math.log(10)  # density at p99 times (p99.9 - p99) for an exponential tail
SPEED_TOLERANCE = 0.05  # a candidate may be this much slower than its baseline (beyond the error) and still pass


@dataclasses.dataclass(frozen=True)
class Delta:
    """``candidate - baseline`` of one figure and the standard error of that difference."""

    value: float
    err: float

    @property
    def z(self) -> float:
        return self.value / self.err if self.err > 0 else (math.copysign(math.inf, self.value) if self.value else 0.0)

    def to_json(self) -> dict[str, float]:
        return {"diff": float(f"{self.value:.6g}"), "err": float(f"{self.err:.6g}")}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The paired comparison of ``candidate`` with ``baseline``; ``reasons`` empty: the candidate passes."""

    candidate: str
    baseline: str
    chunks: int
    kld: Delta | None
    p99: Delta | None
    same_top: Delta | None
    speed: dict[str, Delta]
    reasons: tuple[str, ...]
    ln_ppl: Delta | None = None  # paired per chunk, like ``kld``

    @property
    def passed(self) -> bool:
        return not self.reasons

    def describe(self) -> str:
        """The figures, one line (the verdict text)."""
        parts = []
        if self.kld is not None:
            parts.append(f"mean KLD {self.kld.value:+.5f} ± {self.kld.err:.5f} (paired over {self.chunks} chunks, "
                         f"{self.kld.z:+.1f} SE)")
        if self.ln_ppl is not None:
            parts.append(f"ln PPL {self.ln_ppl.value:+.5f} ± {self.ln_ppl.err:.5f} (paired)")
        if self.p99 is not None:
            parts.append(f"p99 KLD {self.p99.value:+.4f} ± {self.p99.err:.4f}")
        if self.same_top is not None:
            parts.append(f"same top token {100 * self.same_top.value:+.2f} ± {100 * self.same_top.err:.2f} points")
        for what, d in self.speed.items():
            parts.append(f"{what} speed {100 * d.value:+.1f} ± {100 * d.err:.1f} %")
        return f"{self.candidate} vs {self.baseline}: " + ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "chunks": self.chunks, "passed": self.passed,
                "kld_mean": self.kld.to_json() if self.kld else None,
                "ln_ppl": self.ln_ppl.to_json() if self.ln_ppl else None,
                "kld_p99": self.p99.to_json() if self.p99 else None,
                "same_top_p": self.same_top.to_json() if self.same_top else None,
                "speed": {k: d.to_json() for k, d in self.speed.items()}, "z": Z, "reasons": list(self.reasons)}


def effective_tokens(s: KldStats, tokens: int | None = None) -> float | None:
    """Tokens scored divided by the design effect of the chunks (see the module doc); None when unknown."""
    n = tokens
    if n is None:
        p, e = s.same_top_p, s.same_top_p_err
        if not (0.0 < p < 1.0 and e > 0):
            return None
        n = round(p * (1 - p) / (e * e)) + 1  # llama.cpp: sqrt(p(1-p)/(n-1))
    token_err = s.kld_mean_err_token if s.kld_mean_err_token else s.kld_mean_err
    deff = max(1.0, (s.kld_mean_err / token_err) ** 2) if token_err > 0 else 1.0
    return n / deff


def p99_error(s: KldStats, tokens: int | None = None) -> float | None:
    """Standard error of the 99th percentile of the KLD (module doc); None when it cannot be estimated."""
    n = effective_tokens(s, tokens)
    spread = s.kld_p999 - s.kld_p99
    if n is None or n <= 0 or not spread > 0:
        return None
    return math.sqrt(0.99 * 0.01 / n) * spread / P99_DENSITY


def same_top_error(s: KldStats, tokens: int | None = None) -> float | None:
    n = effective_tokens(s, tokens)
    if n is None or n <= 0:
        return None
    p = s.same_top_p
    return math.sqrt(max(p * (1 - p), 0.25 / n) / n)  # never 0: p of 0 or 1 on n tokens is not certainty


def _unpaired(a: float, ea: float | None, b: float, eb: float | None) -> Delta | None:
    if ea is None or eb is None:
        return None
    return Delta(a - b, math.hypot(ea, eb))


def speed_ratios(f: FileResult) -> dict[str, Delta]:
    """The interleaved speed ratios ``candidate / baseline - 1`` recorded for ``f`` (prompt ``pp``, generation
    ``tg``) by :mod:`converters.ladder.speed`; {} when not measured."""
    vs = (f.extra.get(SPEED_KEY) or {}).get("vs") if isinstance(f.extra.get(SPEED_KEY), Mapping) else None
    out = {}
    for what in ("pp", "tg"):
        r = (vs or {}).get(what)
        if isinstance(r, Mapping) and r.get("ratio") is not None and r.get("ratio_err") is not None:
            out[what] = Delta(float(r["ratio"]) - 1.0, float(r["ratio_err"]))
    return out


def compare(candidate: FileResult, baseline: FileResult | None, *, same_size: bool = True,
            tokens: int | None = None, speed_required: bool = False, baseline_name: str | None = None) -> Comparison:
    """Does ``candidate`` beat ``baseline`` (module doc)? ``same_size``: it may not have more bytes (a tuned file);
    ``tokens``: tokens scored per file (else estimated from the figures); ``speed_required``: the speed
    measurement was asked for, so a candidate without it is withheld; ``baseline_name``: what to call a missing
    baseline."""
    name = baseline.type if baseline is not None else (baseline_name or "its baseline")
    why: list[str] = []
    b, c = (baseline.stats if baseline is not None else None), candidate.stats
    if baseline is None or b is None or b.non_finite():
        return Comparison(candidate.type, name, 0, None, None, None, {}, (f"{name} was not measured",))
    if c is None or c.non_finite():
        return Comparison(candidate.type, name, 0, None, None, None, {}, ("not measured",))
    if same_size and candidate.size > baseline.size:
        why.append(f"{candidate.size:,} bytes, more than {name}'s {baseline.size:,}")
    pd = paired_difference(c.chunk_kld, b.chunk_kld)
    kld = Delta(pd[0], pd[1]) if pd is not None else None
    chunks = pd[2] if pd is not None else 0
    if kld is None:
        why.append("no per-chunk KLD series of both files to pair (at least 2 common chunks are needed)")
    elif not -kld.value > Z * kld.err:
        why.append(f"mean KLD {c.kld_mean:.5f} vs {b.kld_mean:.5f}: the paired difference {kld.value:+.5f} ± "
                   f"{kld.err:.5f} over {chunks} chunks is not below zero by more than {Z:g} standard errors")
    lp = paired_difference(c.chunk_ln_ppl_ratio, b.chunk_ln_ppl_ratio)
    ln_ppl = Delta(lp[0], lp[1]) if lp is not None else None
    if ln_ppl is not None and ln_ppl.value > Z * ln_ppl.err:
        why.append(f"perplexity {c.ppl_ratio:.4f} × the reference's, worse than {name}'s {b.ppl_ratio:.4f}: the paired "
                   f"ln PPL difference {ln_ppl.value:+.5f} ± {ln_ppl.err:.5f} over {lp[2]} chunks is above zero by "
                   f"more than {Z:g} standard errors")
    p99 = _unpaired(c.kld_p99, p99_error(c, tokens), b.kld_p99, p99_error(b, tokens))
    if p99 is None:
        p99 = Delta(c.kld_p99 - b.kld_p99, 0.0)  # no error estimate: any increase counts
    if p99.value > Z * p99.err:
        why.append(f"p99 KLD {c.kld_p99:.4f} is worse than {name}'s {b.kld_p99:.4f} by {p99.value:.4f}, more than "
                   f"{Z:g} × its error {p99.err:.4f}")
    top = _unpaired(c.same_top_p, same_top_error(c, tokens), b.same_top_p, same_top_error(b, tokens))
    if top is None:
        top = Delta(c.same_top_p - b.same_top_p, 0.0)
    if -top.value > Z * top.err:
        why.append(f"same top token {100 * c.same_top_p:.2f} % is worse than {name}'s {100 * b.same_top_p:.2f} % "
                   f"by {-100 * top.value:.2f} points, more than {Z:g} × its error {100 * top.err:.2f}")
    speed = speed_ratios(candidate)
    if speed_required and not speed:
        why.append("its speed was not measured against " + name)
    for what, d in speed.items():
        if d.value + Z * d.err < -SPEED_TOLERANCE:
            label = "prompt processing" if what == "pp" else "generation"
            why.append(f"{label} is {-100 * d.value:.1f} ± {100 * d.err:.1f} % slower than {name}: more than "
                       f"{100 * SPEED_TOLERANCE:g} % beyond {Z:g} errors")
    return Comparison(candidate.type, name, chunks, kld, p99, top, speed, tuple(why), ln_ppl)
