"""The ladder's own curve: what mean KLD each type of a ladder should measure, judged from its neighbours (pure).

Along a ladder, the logarithm of the mean KLD is close to linear in the nominal bits per weight between
neighbouring types. A file is an *outlier* when its mean KLD is far above what its neighbours on that curve
predict for its bits per weight: more than ``factor`` times the prediction plus ``sigmas`` of its own
standard error. Only too-high figures count: a damaged tensor can only raise the KLD, while a file that
measures *better* than its neighbours predict is legitimate (quantization-aware sources, made for one
format, give that format a lower KLD than some types with more bits).

The prediction for a file between others is the lowest of the straight lines (in ln KLD) from each of the
``neighbours`` nearest files below it to each of those above it: a damaged neighbour only raises the lines
through it, so one clean pair on either side is enough. Past the end of the ladder the prediction follows the
more lenient of the local slope and the ladder's median slope (clamped to ``[-max_slope, 0]`` nats per bit;
towards fewer bits at least ``min_fall`` steep, since the flat top of a ladder says little about its bottom;
halved towards more bits, where the curve flattens out near the reference). Outliers are removed one at a
time, the worst first, and the rest judged again without them, so one damaged file does not shield or condemn
another. With no other file there is no curve; the fixed ceilings still apply (``converters.ladder.evaluate.gate``).

An *order inversion* (a file with at least ``order_min_bits`` more bits than another measuring clearly
higher KLD) is reported as a note, not a failure, unless the file is also an outlier.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Sequence

TINY = 1e-12  # KLD floor before taking logarithms (a perfect copy measures 0)


@dataclasses.dataclass(frozen=True)
class CurveRules:
    factor: float = 3.0  # an outlier measures more than this many times its prediction ...
    sigmas: float = 3.0  # ... plus this many of its own standard errors
    max_slope: float = 2.5  # steepest plausible fall of ln(KLD) per extra bit per weight
    min_fall: float = 1.0  # past the low end, ln(KLD) rises at least this much per bit fewer (ladders measure ~1)
    neighbours: int = 2  # files used on each side of the judged one
    min_dx: float = 0.25  # two neighbours closer than this in bits give no slope of their own
    order_min_bits: float = 0.5  # an inversion note needs at least this many bits between the two files

    def to_json(self) -> dict[str, float]:
        return dataclasses.asdict(self)


DEFAULT_RULES = CurveRules()


@dataclasses.dataclass(frozen=True)
class Point:
    """One measured file: its name, nominal bits per weight and mean KLD ± standard error."""

    key: str
    bits: float
    kld: float
    err: float

    @property
    def y(self) -> float:
        return math.log(max(self.kld, TINY))


@dataclasses.dataclass(frozen=True)
class Expected:
    """What the curve predicts for one file, from which neighbours."""

    kld: float
    neighbours: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Outlier:
    point: Point
    expected: Expected
    rules: CurveRules

    def reason(self) -> str:
        p, e = self.point, self.expected
        return (f"far above the ladder's curve: mean KLD {p.kld:.4f} ± {p.err:.4f} is {p.kld / e.kld:.1f}× the "
                f"{e.kld:.4f} that its neighbours ({', '.join(e.neighbours)}) give {p.bits:g} bits per weight "
                f"(limit {self.rules.factor:g}× plus {self.rules.sigmas:g} standard errors)")


def _neighbours(p: Point, others: Sequence[Point], n: int) -> tuple[list[Point], list[Point]]:
    """The ``n`` nearest files with no more bits than ``p`` (nearest first), and the ``n`` nearest with more."""
    below = sorted((q for q in others if q.bits <= p.bits), key=lambda q: -q.bits)[:n]
    above = sorted((q for q in others if q.bits > p.bits), key=lambda q: q.bits)[:n]
    return below, above


def slope(points: Sequence[Point], rules: CurveRules = DEFAULT_RULES) -> float | None:
    """The ladder's typical fall of ln KLD per bit: the median slope over pairs of files (Theil-Sen, robust to a
    few outliers), clamped to ``[-max_slope, 0]``; None without two files ``min_dx`` apart."""
    slopes = [(b.y - a.y) / (b.bits - a.bits) for a, b in itertools.combinations(points, 2)
              if abs(b.bits - a.bits) >= rules.min_dx]
    return min(0.0, max(-rules.max_slope, statistics.median(slopes))) if slopes else None


def _across(p: Point, lo: Point, hi: Point) -> float:
    """ln KLD at ``p.bits`` on the straight line between a file below it and one above it."""
    t = (p.bits - lo.bits) / (hi.bits - lo.bits)
    return lo.y + t * (hi.y - lo.y)


def _beyond(p: Point, near: Sequence[Point], rest: Sequence[Point], rules: CurveRules) -> float:
    """ln KLD at ``p.bits`` past the end of the others, from the nearest files along the more lenient of the
    local slope (of those nearest files) and the ladder's slope: the steeper one towards fewer bits, the flatter
    one, halved, towards more bits (where the curve flattens out near the reference); the lowest value."""
    slopes = [v for v in (slope(near, rules), slope(rest, rules)) if v is not None]
    if p.bits < near[0].bits:
        # the top of a ladder is flat (near the reference): its slope would predict far too little for a file
        # bits below it, so the fall towards fewer bits is at least ``min_fall``
        s = min(min(slopes) if slopes else -rules.max_slope, -rules.min_fall)
    else:
        s = max(slopes) / 2 if slopes else 0.0
    return min(q.y + s * (p.bits - q.bits) for q in near)


def expected(p: Point, others: Sequence[Point], rules: CurveRules = DEFAULT_RULES) -> Expected | None:
    """The KLD the curve of ``others`` predicts at ``p.bits``; None without any other file.

    Between files: the lowest of the straight lines from each of the ``neighbours`` nearest files below to each
    above (a damaged neighbour only raises the lines through it). Past the end of the ladder: the ladder's own
    slope from the nearest files."""
    rest = [q for q in others if q.key != p.key]
    below, above = _neighbours(p, rest, rules.neighbours)
    if not below and not above:
        return None
    if below and above:
        value = min(_across(p, lo, hi) for lo in below for hi in above)
    else:
        value = _beyond(p, below or above, rest, rules)
    return Expected(math.exp(value), tuple(q.key for q in below + above))


def is_outlier(p: Point, e: Expected, rules: CurveRules = DEFAULT_RULES) -> bool:
    """``p`` measures more than ``factor`` times the prediction plus ``sigmas`` of its own standard errors."""
    return p.kld > rules.factor * e.kld + rules.sigmas * p.err


def outliers(points: Sequence[Point], rules: CurveRules = DEFAULT_RULES) -> dict[str, Outlier]:
    """The files far above the curve of the others, found worst first (pure)."""
    found: dict[str, Outlier] = {}
    while True:
        kept = [p for p in points if p.key not in found]
        worst: tuple[float, Outlier] | None = None
        for p in kept:
            e = expected(p, kept, rules)
            if e is not None and is_outlier(p, e, rules):
                excess = p.y - math.log(max(e.kld, TINY))
                if worst is None or excess > worst[0]:
                    worst = (excess, Outlier(p, e, rules))
        if worst is None:
            return found
        found[worst[1].point.key] = worst[1]


def inversions(points: Sequence[Point], rules: CurveRules = DEFAULT_RULES,
               skip: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Notes on files that measure clearly worse than a file with fewer bits (none for ``skip``ped files)."""
    notes = []
    for hi in points:
        if hi.key in skip:
            continue
        lower = [lo for lo in points if lo.key not in skip and lo.bits + rules.order_min_bits <= hi.bits
                 and hi.kld > lo.kld + rules.sigmas * math.hypot(hi.err, lo.err)]
        if lower:
            lo = min(lower, key=lambda q: q.kld)
            notes.append(f"order inversion: {hi.key} ({hi.bits:g} bits per weight) measures a higher mean KLD "
                         f"({hi.kld:.4f} ± {hi.err:.4f}) than {lo.key} ({lo.bits:g} bits per weight, "
                         f"{lo.kld:.4f} ± {lo.err:.4f}); both lie on the ladder's curve, as is usual for "
                         f"quantization-aware sources: not a failure")
    return notes
