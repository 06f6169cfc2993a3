"""Memory budgets (pure): ``"16GB@32k"`` parsed, the margin kept, the stock baseline chosen, the largest context
that fits, and the publish rule of a memory-budget file (``<Model>-fit-16GB-32k.gguf``, :mod:`converters.ladder.fit`).

A budget is the memory a user has for one model at one context: weights + KV cache at that context + llama.cpp's
compute and output buffers must fit in it. ``GB`` and ``MB`` are decimal (10^9, 10^6 bytes, as GPU makers quote
memory), ``GiB`` and ``MiB`` binary; ``k`` after the context is 1024 tokens (``32k`` = 32768).

**The margin.** The solver's byte budget for the weights is ``budget - KV - compute - output - margin`` with the KV,
compute and output bytes llama.cpp reported when it loaded the baseline at that context. The margin
(:func:`margin`: 0.5 % of the budget plus 1 MiB) covers what a different weight layout can change in llama.cpp's
buffers (tensor alignment, a graph that dequantizes another type) and the runtime's own allocations; the built file is
then loaded at the budget's context, and it is withheld when what llama.cpp reports exceeds the budget.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from converters.core import names
from converters.core.errors import InputError

UNITS = {"GB": 10**9, "GIB": 2**30, "MB": 10**6, "MIB": 2**20}
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GB|GiB|MB|MiB)\s*@\s*(\d+)\s*(k?)\s*$", re.IGNORECASE)
MARGIN_FRACTION = 0.005
MARGIN_BYTES = 1 << 20
CTX_STEP = 256  # llama.cpp pads a context to a multiple of 256 cells


@dataclasses.dataclass(frozen=True)
class FitBudget:
    """One memory budget: ``bytes`` of memory for the model at ``ctx`` tokens of context."""

    text: str  # as written ("16GB@32k")
    bytes: int
    ctx: int
    label: str  # in file names: "16GB-32k"

    @property
    def type(self) -> str:
        """The ladder type of its file: ``fit-16GB-32k``."""
        return names.fit_type(self.label)


def parse(text: str) -> FitBudget:
    """``"16GB@32k"``, ``"8 GiB @ 8k"``, ``"500MB@4096"`` -> :class:`FitBudget`; InputError naming the syntax."""
    m = _BUDGET.match(str(text))
    if not m:
        raise InputError(f"bad memory budget {text!r}: use SIZE UNIT @ CONTEXT, e.g. 16GB@32k, 8GiB@8k or 500MB@4096 "
                         "(GB/MB decimal, GiB/MiB binary, k = 1024 tokens)")
    number, unit, ctx, k = m.groups()
    unit = {u.upper(): u for u in ("GB", "GiB", "MB", "MiB")}[unit.upper()]
    size = int(float(number) * UNITS[unit.upper()])
    tokens = int(ctx) * (1024 if k else 1)
    if size <= 0:
        raise InputError(f"memory budget {text!r}: the size must be positive")
    if tokens < 16:
        raise InputError(f"memory budget {text!r}: the context must be at least 16 tokens")
    ctx_label = f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)
    number_label = number.rstrip("0").rstrip(".") if "." in number else number
    return FitBudget(text=str(text).strip(), bytes=size, ctx=tokens, label=f"{number_label}{unit}-{ctx_label}")


def parse_all(texts: Sequence[str]) -> tuple[FitBudget, ...]:
    """Every budget, in order; the same file name twice is refused."""
    out: list[FitBudget] = []
    for t in texts:
        b = parse(t)
        if any(o.label == b.label for o in out):
            raise InputError(f"memory budget {t!r} is given twice")
        out.append(b)
    return tuple(out)


def is_fit(type_name: str) -> bool:
    return type_name.startswith(names.FIT_PREFIX)


def margin(budget_bytes: int) -> int:
    """Bytes kept free when solving (see the module doc)."""
    return int(budget_bytes * MARGIN_FRACTION) + MARGIN_BYTES


def largest_fitting(totals: Mapping[str, int], budget_bytes: int) -> str | None:
    """The stock type whose (measured or predicted) total memory is the largest that still fits the budget."""
    fitting = [(b, t) for t, b in totals.items() if b <= budget_bytes]
    return max(fitting)[1] if fitting else None


def weight_budget(budget_bytes: int, overhead_bytes: int, baseline_weights: int | None) -> int:
    """The solver's budget for the file's weights: ``budget - overhead - margin``, never less than the baseline's own
    weights when the baseline was measured to fit (its layout stays a candidate)."""
    room = budget_bytes - overhead_bytes - margin(budget_bytes)
    return max(room, baseline_weights or 0)


def max_context(budget_bytes: int, fixed_bytes: int, per_token_bytes: float, *, step: int = CTX_STEP) -> int:
    """The largest context (a multiple of ``step``) whose memory ``fixed + per_token * ctx`` fits the budget; 0 when
    none does. ``fixed``: what does not grow with the context (weights, compute, output buffers)."""
    if per_token_bytes <= 0:
        raise InputError("per-token KV bytes must be positive")
    room = budget_bytes - fixed_bytes
    if room <= 0:
        return 0
    return int(room // per_token_bytes) // step * step


# --------------------------------------------------------------------------------------------------
# The publish rule (read by converters.ladder.evaluate.verdict)
# --------------------------------------------------------------------------------------------------
def memory_reason(fit: Mapping[str, Any]) -> str | None:
    """Why a memory-budget file cannot be published whatever its KLD (None: it may): its memory at the budget's
    context was not measured or is over the budget, or no stock file fits the budget (nothing to compare it with)."""
    budget = fit.get("budget_bytes")
    measured = (fit.get("memory") or {}).get("total")
    if not isinstance(measured, int):
        return "its memory at the budget's context was not measured"
    if not isinstance(budget, int) or measured > budget:
        return f"llama.cpp needs {measured:,} bytes at {fit.get('ctx')} tokens, over the budget of {budget:,}"
    if not fit.get("baseline"):
        return "no stock file of the ladder fits this budget, so there is nothing to compare it with"
    return None


def human(n: float) -> str:
    """Bytes for a log line or the card: ``1.23 GB`` / ``456.7 MB``."""
    if not math.isfinite(n):
        return "n/a"
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:.1f} MB"
