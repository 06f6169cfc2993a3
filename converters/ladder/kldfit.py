"""From measured tensor errors to expected KLD: scales per tensor kind and depth, fitted around the stock layout.

A file's mean KLD on the calibration text is modelled as ``c + sum_g s_g * E_g``: ``E_g`` is the summed
importance-weighted error (:mod:`converters.ladder.tensorerr`) of the file's tensors in group ``g`` (a kind group
such as ``ffn_down`` at a depth band: the first, middle or last third of the layers; ``token_embd`` and ``output``
alone), ``s_g`` the expected KLD per unit of error of that group. For small errors KLD is close to a quadratic
form of the logit change, so independent tensors' damages add.

The observations are runs the tuner needs anyway: each size point's stock file, and then each solved plan, scored
on the calibration text against the reference's logits. They are few (one per size point) and nearly collinear
(stock mixes differ little between groups), so the fit is a ridge regression: first one global scale ``s0`` (and the
intercept ``c``) from all observations, then each group's scale as ``s0 * (1 + x_g)`` with a prior that pulls ``x_g``
to 0 (:data:`PRIOR`: a relative deviation of 1 costs as much as one observation off by one standard error). A group
the observations do not separate keeps ``s0``; a plan whose measured KLD misses its prediction moves the scales of
the groups it changed. Predictions are differences from the stock file's measured KLD (:func:`predict`), so the
intercept (what the model does not explain: rounding the activations, the fixed tensors) cancels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from converters.core.report import paired_difference
from converters.ladder import layout

PRIOR = 1.0  # weight of the prior x_g = 0, in observations at one standard error
REL_FLOOR = 0.05  # an observation's error is at least this fraction of its KLD (no single point rules the fit)
MIN_FACTOR, MAX_FACTOR = 0.1, 10.0  # s_g / s0 is kept within these

# tensor kinds measured together (a kind not listed is its own group)
KIND_GROUPS: dict[str, tuple[str, ...]] = {
    "attn_qk": ("attn_q", "attn_k"),
    "attn_v": ("attn_v",),
    "attn_output": ("attn_output",),
    "ffn_gate_up": ("ffn_gate", "ffn_up"),
    "ffn_down": ("ffn_down",),
    "token_embd": ("token_embd",),
    "output": ("output",),
}
BANDS = ("first", "middle", "last")


def kind_group(kind: str) -> str:
    for g, kinds in KIND_GROUPS.items():
        if kind in kinds:
            return g
    return kind


def band(layer: int, n_layers: int) -> str:
    """The depth band of a layer: first, middle or last third (a model of one or two layers: first/last)."""
    if n_layers <= 1:
        return BANDS[0]
    return BANDS[min(2, 3 * layer // n_layers)]


def group(name: str, n_layers: int) -> str:
    """``blk.3.ffn_down.weight`` in a 30-layer model -> ``ffn_down@first``; ``token_embd.weight`` -> ``token_embd``."""
    g = kind_group(layout.kind_of(name))
    layer = layout.layer_of(name)
    return g if layer is None else f"{g}@{band(layer, n_layers)}"


def n_layers(names: Sequence[str]) -> int:
    layers = [x for x in (layout.layer_of(n) for n in names) if x is not None]
    return max(layers) + 1 if layers else 0


def group_errors(types: Mapping[str, str], errors: Mapping[str, Mapping[str, float]], groups: Mapping[str, str]
                 ) -> dict[str, float]:
    """``E_g`` of a layout: the summed error of its tensors per group (a pair not measured raises KeyError)."""
    out: dict[str, float] = {}
    for name, q in types.items():
        g = groups[name]
        out[g] = out.get(g, 0.0) + float(errors[name][q])
    return out


@dataclasses.dataclass(frozen=True)
class Observation:
    """One file scored on the calibration text: its mean KLD (and error) and its errors per group."""

    name: str
    kld: float
    kld_err: float
    errors: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kld": self.kld, "kld_err": self.kld_err, "errors": dict(self.errors)}


@dataclasses.dataclass(frozen=True)
class Fit:
    """Scales per group (expected KLD per unit of error), the global scale and the intercept."""

    scales: Mapping[str, float]
    s0: float
    intercept: float
    observations: int

    def scale(self, g: str) -> float:
        return float(self.scales.get(g, self.s0))

    def to_json(self) -> dict[str, Any]:
        return {"s0": self.s0, "intercept": self.intercept, "observations": self.observations,
                "scales": dict(sorted(self.scales.items()))}


def _sigma(o: Observation) -> float:
    return max(o.kld_err, REL_FLOOR * abs(o.kld), 1e-12)


def global_fit(obs: Sequence[Observation]) -> tuple[float, float]:
    """(s0, c): one scale for every group and an intercept, by weighted least squares; the line through zero
    (c = 0) with one observation, or when the slope or the intercept comes out negative."""
    if not obs:
        raise ValueError("no observation to fit scales on")
    e = np.array([math.fsum(o.errors.values()) for o in obs])
    k = np.array([o.kld for o in obs])
    w = 1.0 / np.array([_sigma(o) for o in obs])

    def through_zero() -> tuple[float, float]:
        s = float(np.sum(w * w * e * k) / np.sum(w * w * e * e)) if np.any(e > 0) else 0.0
        return max(s, 0.0), 0.0

    if len(obs) < 2 or np.ptp(e) <= 0:
        return through_zero()
    a = np.stack([e, np.ones_like(e)], axis=1) * w[:, None]
    (s, c), *_ = np.linalg.lstsq(a, k * w, rcond=None)
    if s <= 0 or c < 0:  # not physical (noise, or collinear files): the line through zero
        return through_zero()
    return float(s), float(c)


def fit(obs: Sequence[Observation], groups: Sequence[str], *, prior: float = PRIOR) -> Fit:
    """Scales per group around the global scale (see the module doc)."""
    s0, c0 = global_fit(obs)
    gs = list(dict.fromkeys(groups))
    if s0 <= 0 or not gs:
        return Fit({g: s0 for g in gs}, s0, c0, len(obs))
    # unknowns: x_g per group, then c; rows: observations (K - s0 * E_total = c + s0 * sum_g E_g x_g), priors
    rows, rhs = [], []
    for o in obs:
        w = 1.0 / _sigma(o)
        rows.append([w * s0 * o.errors.get(g, 0.0) for g in gs] + [w])
        rhs.append(w * (o.kld - s0 * math.fsum(o.errors.values())))
    for i in range(len(gs)):
        r = [0.0] * (len(gs) + 1)
        r[i] = prior
        rows.append(r)
        rhs.append(0.0)
    r = [0.0] * (len(gs) + 1)
    r[-1] = prior / max(_sigma(obs[0]), 1e-12) * 1e-3  # a weak pull of the intercept towards the global one
    rows.append(r)
    rhs.append(r[-1] * c0)
    x, *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    scales = {g: s0 * float(np.clip(1.0 + x[i], MIN_FACTOR, MAX_FACTOR)) for i, g in enumerate(gs)}
    return Fit(scales, s0, float(max(x[-1], 0.0)), len(obs))


def damage(errors: Mapping[str, Mapping[str, float]], groups: Mapping[str, str], f: Fit
           ) -> dict[str, dict[str, float]]:
    """Predicted expected KLD per tensor and type: ``s_g(tensor) * error``."""
    return {name: {q: f.scale(groups[name]) * e for q, e in row.items()} for name, row in errors.items()}


def predict(stock: Observation, plan_errors: Mapping[str, float], f: Fit) -> float:
    """A plan's calibration KLD: the stock file's measured KLD plus the scaled difference of the group errors."""
    gs = set(stock.errors) | set(plan_errors)
    return stock.kld + math.fsum(f.scale(g) * (plan_errors.get(g, 0.0) - stock.errors.get(g, 0.0)) for g in gs)


@dataclasses.dataclass(frozen=True)
class Paired:
    """The stock file's KLD minus the plan's on the same calibration chunks: the gain, its standard error, and
    whether the error is paired (per-chunk) or the two files' errors combined; ``ln_ppl``: the plan's ln PPL minus
    the stock file's, paired per chunk (mean, error), when both files carry the series."""

    gain: float
    err: float
    paired: bool
    ln_ppl: tuple[float, float] | None = None

    @property
    def ppl_worse(self) -> bool:
        """The plan's perplexity is higher than the stock file's by more than two standard errors (the gate's
        perplexity rule, :mod:`converters.ladder.evaluate.paired`)."""
        return self.ln_ppl is not None and self.ln_ppl[0] > 2 * self.ln_ppl[1]

    @property
    def confirmed(self) -> bool:
        """The plan is better by more than two standard errors, and its perplexity not worse beyond two."""
        return self.gain > 2 * self.err and not self.ppl_worse

    def shortfall(self, predicted_gain: float) -> float:
        """How much of ``predicted_gain`` the plan did not deliver; with a worse perplexity, at least the whole of it
        (what a shrink toward stock charges the plan's changes)."""
        short = predicted_gain - self.gain
        return max(short, predicted_gain) if self.ppl_worse else short

    def to_json(self) -> dict[str, Any]:
        return {"gain": self.gain, "err": self.err, "paired": self.paired,
                "ln_ppl": list(self.ln_ppl) if self.ln_ppl else None, "ppl_worse": self.ppl_worse,
                "confirmed": self.confirmed}


def paired(stock_chunks: Sequence[float], plan_chunks: Sequence[float], stock: tuple[float, float],
           plan: tuple[float, float], *, stock_ln_ppl: Sequence[float] = (),
           plan_ln_ppl: Sequence[float] = ()) -> Paired:
    """Per-chunk paired difference over the chunks both series cover (two or more: ``report.paired_difference``);
    otherwise the means' difference with the root of the summed squared errors (``stock``/``plan``: mean, error).
    The per-chunk ln PPL series, when both are given, are paired the same way."""
    lp = paired_difference(plan_ln_ppl, stock_ln_ppl)
    ln = (lp[0], lp[1]) if lp is not None else None
    d = paired_difference(stock_chunks, plan_chunks)
    if d is not None:
        return Paired(d[0], d[1], True, ln)
    return Paired(stock[0] - plan[0], math.hypot(stock[1], plan[1]), False, ln)
