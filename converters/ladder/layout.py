"""Per-tensor layout planning: which ggml type each weight tensor gets so that a file of a given byte size loses
as little as possible. Pure: no programs run here (the measurements come from :mod:`converters.ladder.tune`).

The pieces:

- a tensor catalogue (:class:`TensorInfo`: name, shape, kind from the name);
- the candidate types of each tensor (:func:`candidates`): k-quants and IQ k-types need rows divisible by 256,
  ``Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL`` by 32, F16/BF16 always; types that need an importance matrix only with one;
- the exact bytes of a tensor in a type (:func:`tensor_bytes`), from gguf-py's ``GGML_QUANT_SIZES`` (block size,
  bytes per block), padded to the file's alignment the way the GGUF writer pads tensor data;
- the solver (:func:`solve`): a multiple-choice knapsack, minimise the summed predicted damage (expected KLD) under
  one byte budget. A Lagrangian multiplier found by bisection gives a first assignment; a greedy fill spends what
  is left of the budget on the upgrades with the best damage saved per byte (and a repair step gives back bytes
  if it were ever over). When the instance is small enough, an exact dynamic program over the Pareto frontier
  (bytes, damage) then replaces it with the proven optimum; ``Layout.optimal`` says which. Ties are broken by
  type order and tensor order, so the same inputs always give the same plan.
- the plan as data (:class:`Layout`, written as ``layout.json``) and the writer for llama-quantize's
  ``--tensor-type-file`` (whitespace-separated ``regex=type`` tokens, no comments; a tensor takes the type of the
  first regex that matches its name, so every line is an anchored, escaped full name).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from converters.core.errors import InputError
from converters.formats import gguf_meta

LAYOUT_SCHEMA = 1
ALIGNMENT = 32  # GGUF's default general.alignment: every tensor's data starts on it

# Types llama.cpp refuses (or makes useless) without an importance matrix.
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
UNQUANTIZED = ("BF16", "F16")
# What the tuner measures by default: every llama.cpp k-quant, the 32-block types (the only quantized choice for
# rows not divisible by 256) and IQ4_XS; the 2-bit IQ types need an imatrix entry for every tensor they touch.
DEFAULT_CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL",
                      "Q8_0", "F16")

_BLK = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight)?$")


QUANT_SIZES: Mapping[str, tuple[int, int]] = gguf_meta.quant_sizes()  # name -> (elements per block, bytes per block)


def block_size(ggml_type: str) -> int:
    try:
        return QUANT_SIZES[ggml_type][0]
    except KeyError:
        raise InputError(f"unknown ggml type {ggml_type!r}") from None


def kind_of(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``attn_q``; ``token_embd.weight`` -> ``token_embd``; ``output.weight`` -> ``output``."""
    m = _BLK.match(name)
    if m:
        return m.group(2)
    return name[:-len(".weight")] if name.endswith(".weight") else name


def layer_of(name: str) -> int | None:
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One weight tensor of the model: its GGUF name and shape (``shape[0]`` is the row length, ggml's ne0)."""

    name: str
    shape: tuple[int, ...]

    @property
    def row_length(self) -> int:
        return int(self.shape[0])

    @property
    def elements(self) -> int:
        return math.prod(int(s) for s in self.shape)

    @property
    def kind(self) -> str:
        return kind_of(self.name)


def valid(ggml_type: str, row_length: int) -> bool:
    """Whether a row of ``row_length`` elements can be stored in ``ggml_type`` (whole blocks only)."""
    return row_length > 0 and row_length % block_size(ggml_type) == 0


def tensor_bytes(t: TensorInfo, ggml_type: str, alignment: int = ALIGNMENT) -> int:
    """Exact bytes ``t`` takes in a GGUF file in ``ggml_type``, padding to the next tensor included."""
    blk, size = QUANT_SIZES[ggml_type]
    if not valid(ggml_type, t.row_length):
        raise InputError(f"{t.name}: rows of {t.row_length} cannot be stored as {ggml_type} (blocks of {blk})")
    n = t.elements // blk * size
    return -(-n // alignment) * alignment


def candidates(t: TensorInfo, types: Iterable[str] = DEFAULT_CANDIDATES, *, imatrix: bool = True) -> tuple[str, ...]:
    """The types of ``types`` that ``t`` may take: whole blocks per row, imatrix-only types only with one."""
    return tuple(q for q in types if valid(q, t.row_length) and (imatrix or q not in NEEDS_IMATRIX))


def bits_per_weight(ggml_type: str) -> float:
    """Bits per weight of a ggml type (block bytes x 8 / block elements)."""
    blk, size = QUANT_SIZES[ggml_type]
    return size * 8 / blk


def neighbours(t: TensorInfo, stock_type: str, types: Iterable[str] = DEFAULT_CANDIDATES, *, steps: int = 1,
               imatrix: bool = True, always: Iterable[str] = ()) -> tuple[str, ...]:
    """The candidate types of ``t`` around its stock type: the valid types of ``types`` whose bits per weight are
    within ``steps`` distinct levels of the stock type's, plus the stock type itself and ``always`` (where valid).

    Levels are the distinct bits-per-weight values of the valid types (``Q4_0`` and ``IQ4_NL`` share 4.5), so one
    step up from ``Q4_0`` on a 32-block row is the next size that exists for that row, whatever its name."""
    valid_types = [q for q in dict.fromkeys(types) if q in QUANT_SIZES and q in candidates(t, (q,), imatrix=imatrix)]
    levels = sorted({bits_per_weight(q) for q in valid_types} | {bits_per_weight(stock_type)})
    i = levels.index(bits_per_weight(stock_type))
    lo, hi = levels[max(0, i - steps)], levels[min(len(levels) - 1, i + steps)]
    out = [q for q in valid_types if lo <= bits_per_weight(q) <= hi]
    extra = [stock_type] + [q for q in always if q in QUANT_SIZES and valid(q, t.row_length)]
    return tuple(dict.fromkeys(out + extra))


TOKEN_EMBD, OUTPUT = "token_embd.weight", "output.weight"


def tied_embedding(tensors: Iterable[TensorInfo]) -> bool:
    """The token embedding is also the output head (no ``output.weight``): its error then costs what an output
    head's does, which the measured error (weighted by how often each token is *read*, llama-imatrix having no entry
    for it) does not show."""
    names = {t.name for t in tensors}
    return TOKEN_EMBD in names and OUTPUT not in names


def keep_tied_embedding(tensors: Sequence[TensorInfo], stock: Mapping[str, str],
                        types: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """``types`` (candidates per tensor) where a tied token embedding may take no type with fewer bits per weight
    than its stock one. On SmolLM2 (tied, Q8_0 in the stock files) a memory-budget file measured a mean KLD of 0.066
    against its baseline's 0.034 when its embedding was free to go down, 0.018 once it was kept (benchmarks/fit.py)."""
    out = {k: tuple(v) for k, v in types.items()}
    if tied_embedding(tensors) and TOKEN_EMBD in out and TOKEN_EMBD in stock:
        floor = bits_per_weight(stock[TOKEN_EMBD]) if stock[TOKEN_EMBD] in QUANT_SIZES else 0.0
        out[TOKEN_EMBD] = tuple(q for q in out[TOKEN_EMBD] if q in QUANT_SIZES and bits_per_weight(q) >= floor)
    return out


def prune_dominated(opts: Sequence["Option"]) -> list["Option"]:
    """Options that no other option beats on both bytes and damage (ties: the first in type order is kept).

    A dominated type can never be part of an optimal plan (swapping it for its dominator saves bytes or damage and
    loses neither), so pruning before solving changes no answer and shrinks the exact program."""
    ordered = sorted(opts, key=lambda o: (o.bytes, o.damage, o.type))
    kept: list[Option] = []
    best = math.inf
    for o in ordered:
        if o.damage < best:
            kept.append(o)
            best = o.damage
    return kept


# --------------------------------------------------------------------------------------------------
# The solver
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Option:
    type: str
    bytes: int
    damage: float


@dataclasses.dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]  # per item, the index of the chosen option
    bytes: int
    damage: float
    lam: float  # the Lagrangian multiplier of the first assignment (damage per byte)
    optimal: bool  # proven optimal by the exact program


class Infeasible(InputError):
    pass


def _argmin(opts: Sequence[Option], lam: float) -> int:
    best, key = 0, None
    for j, o in enumerate(opts):
        k = (o.damage + lam * o.bytes, o.bytes, j)
        if key is None or k < key:
            best, key = j, k
    return best


def _total(items: Sequence[Sequence[Option]], choice: Sequence[int]) -> tuple[int, float]:
    return (sum(items[i][j].bytes for i, j in enumerate(choice)),
            math.fsum(items[i][j].damage for i, j in enumerate(choice)))


def lagrangian(items: Sequence[Sequence[Option]], budget: int, *, iterations: int = 100) -> tuple[list[int], float]:
    """The assignment ``argmin damage + lam * bytes`` per item for the smallest ``lam`` (found by bisection)
    whose total bytes fit the budget."""
    def pick(lam: float) -> list[int]:
        return [_argmin(opts, lam) for opts in items]

    smallest = [min(range(len(o)), key=lambda j, o=o: (o[j].bytes, o[j].damage, j)) for o in items]
    if _total(items, smallest)[0] > budget:
        raise Infeasible(f"even the smallest type of every tensor needs {_total(items, smallest)[0]} bytes, "
                         f"more than the budget of {budget}")
    lo = 0.0
    choice = pick(lo)
    if _total(items, choice)[0] <= budget:
        return choice, lo
    hi = 1e-12
    while _total(items, pick(hi))[0] > budget:
        hi *= 4
        if hi > 1e300:
            return smallest, math.inf
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if _total(items, pick(mid))[0] > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi), hi


def greedy_fill(items: Sequence[Sequence[Option]], budget: int, choice: list[int]) -> list[int]:
    """Spend the rest of the budget: repeatedly take the upgrade (any item, any other option) with the most damage
    saved per extra byte that still fits; first, while over budget, the downgrade that costs least damage per
    byte given back (repair)."""
    choice = list(choice)
    used = _total(items, choice)[0]
    while used > budget:  # repair
        best = None
        for i, opts in enumerate(items):
            cur = opts[choice[i]]
            for j, o in enumerate(opts):
                saved = cur.bytes - o.bytes
                if saved <= 0:
                    continue
                key = ((o.damage - cur.damage) / saved, i, j)
                if best is None or key < best:
                    best = key
        if best is None:
            raise Infeasible("no downgrade left and still over budget")
        _, i, j = best
        used += items[i][j].bytes - items[i][choice[i]].bytes
        choice[i] = j
    while True:
        best = None
        for i, opts in enumerate(items):
            cur = opts[choice[i]]
            for j, o in enumerate(opts):
                extra = o.bytes - cur.bytes
                gain = cur.damage - o.damage
                if gain <= 0 or used + extra > budget:
                    continue
                rate = gain / extra if extra > 0 else math.inf
                key = (-rate, -gain, i, j)
                if best is None or key < best:
                    best = key
        if best is None:
            return choice
        _, _, i, j = best
        used += items[i][j].bytes - items[i][choice[i]].bytes
        choice[i] = j


def exact(items: Sequence[Sequence[Option]], budget: int, *, max_states: int = 200_000) -> list[int] | None:
    """The optimum by dynamic programming over the Pareto frontier of (bytes, damage); None when the frontier
    grows past ``max_states`` (a large model: the Lagrangian + greedy answer stands)."""
    n = len(items)
    # the least bytes the items after i still need: states that cannot be completed are dropped early
    rest = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        rest[i] = rest[i + 1] + min(o.bytes for o in items[i])
    frontier: list[tuple[int, float, int]] = [(0, 0.0, -1)]  # (bytes, damage, back-pointer)
    history: list[list[tuple[int, int]]] = []  # per item: for each state, (parent state, option)
    for i, opts in enumerate(items):
        cand = []
        for s, (b, d, _) in enumerate(frontier):
            for j, o in enumerate(opts):
                nb = b + o.bytes
                if nb + rest[i + 1] <= budget:
                    cand.append((nb, d + o.damage, s, j))
        cand.sort(key=lambda c: (c[0], c[1], c[2], c[3]))
        kept: list[tuple[int, float, int]] = []
        back: list[tuple[int, int]] = []
        best_d = math.inf
        for nb, nd, s, j in cand:
            if nd < best_d:  # strictly better than every state with fewer or equal bytes
                best_d = nd
                kept.append((nb, nd, len(back)))
                back.append((s, j))
        if len(kept) > max_states:
            return None
        history.append(back)
        frontier = kept
    if not frontier:
        return None
    # the least damage; among equals, fewer bytes (the frontier is sorted by bytes with falling damage)
    k = len(frontier) - 1
    choice = [0] * n
    for i in range(n - 1, -1, -1):
        s, j = history[i][k]
        choice[i] = j
        k = s
    return choice


def solve(items: Sequence[Sequence[Option]], budget: int, *, exact_states: int = 200_000) -> Solution:
    """Minimise the summed damage of one option per item with total bytes <= ``budget`` (see the module doc)."""
    if not items or any(not opts for opts in items):
        raise InputError("every tensor needs at least one candidate type")
    choice, lam = lagrangian(items, budget)
    choice = greedy_fill(items, budget, choice)
    optimal = False
    if exact_states > 0:
        best = exact(items, budget, max_states=exact_states)
        if best is not None:
            b0, d0 = _total(items, choice)
            b1, d1 = _total(items, best)
            if (d1, b1) <= (d0, b0) or math.isclose(d1, d0, rel_tol=1e-12, abs_tol=0.0) and b1 <= b0:
                choice = best
            optimal = True
    b, d = _total(items, choice)
    assert b <= budget
    return Solution(tuple(choice), b, d, lam, optimal)


# --------------------------------------------------------------------------------------------------
# The plan as data
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorPlan:
    name: str
    kind: str
    shape: tuple[int, ...]
    type: str
    bytes: int
    damage: float
    stock_type: str | None = None
    candidates: tuple[Option, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "type": self.type,
                "bytes": self.bytes, "damage": self.damage, "stock_type": self.stock_type,
                "candidates": {o.type: {"bytes": o.bytes, "damage": o.damage} for o in self.candidates}}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TensorPlan":
        cands = tuple(Option(k, int(v["bytes"]), float(v["damage"])) for k, v in (d.get("candidates") or {}).items())
        return cls(name=d["name"], kind=d.get("kind") or kind_of(d["name"]), shape=tuple(d.get("shape") or ()),
                   type=d["type"], bytes=int(d["bytes"]), damage=float(d["damage"]), stock_type=d.get("stock_type"),
                   candidates=cands)


@dataclasses.dataclass(frozen=True)
class Layout:
    """``layout.json`` for one size point: the budget, the chosen type per tensor and what it predicts."""

    size_point: str  # the stock type whose size is the budget, e.g. Q4_K_M
    budget: int  # bytes the tuned file may take (the stock file's size)
    fixed_bytes: int  # bytes outside the planned tensors (metadata, norms): the same in both files
    tensors: tuple[TensorPlan, ...]
    lam: float
    optimal: bool
    stock_damage: float | None = None  # the predicted damage of the stock file's own types
    scales: Mapping[str, float] = dataclasses.field(default_factory=dict)  # expected KLD per unit of error, per kind
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def bytes(self) -> int:
        """The predicted size of the tuned file."""
        return self.fixed_bytes + sum(t.bytes for t in self.tensors)

    @property
    def damage(self) -> float:
        return math.fsum(t.damage for t in self.tensors)

    @property
    def types(self) -> dict[str, str]:
        return {t.name: t.type for t in self.tensors}

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type] = out.get(t.type, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": LAYOUT_SCHEMA, "size_point": self.size_point, "budget": self.budget,
                "bytes": self.bytes, "fixed_bytes": self.fixed_bytes, "predicted_kld": self.damage,
                "stock_predicted_kld": self.stock_damage, "lambda": self.lam, "optimal": self.optimal,
                "scales": dict(self.scales), "type_counts": self.type_counts(),
                **dict(self.extra), "tensors": [t.to_json() for t in self.tensors]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Layout":
        if d.get("schema_version") != LAYOUT_SCHEMA:
            raise InputError(f"layout.json: unsupported schema_version {d.get('schema_version')!r}")
        known = {"schema_version", "size_point", "budget", "bytes", "fixed_bytes", "predicted_kld",
                 "stock_predicted_kld", "lambda", "optimal", "scales", "type_counts", "tensors"}
        return cls(size_point=d["size_point"], budget=int(d["budget"]), fixed_bytes=int(d["fixed_bytes"]),
                   tensors=tuple(TensorPlan.from_json(t) for t in d["tensors"]), lam=float(d.get("lambda") or 0.0),
                   optimal=bool(d.get("optimal")), stock_damage=d.get("stock_predicted_kld"),
                   scales=dict(d.get("scales") or {}), extra={k: v for k, v in d.items() if k not in known})

    def describe(self) -> str:
        """A few lines for ``--dry-run`` and logs."""
        counts = ", ".join(f"{n} x {t}" for t, n in self.type_counts().items())
        lines = [f"{self.size_point}-tuned: {self.bytes:,} of {self.budget:,} bytes, predicted KLD {self.damage:.5f}"
                 + (f" (stock {self.stock_damage:.5f})" if self.stock_damage is not None else "")
                 + (", proven optimal" if self.optimal else ""),
                 f"  types: {counts}"]
        return "\n".join(lines)


def plan_layout(size_point: str, tensors: Sequence[TensorInfo], damage: Mapping[str, Mapping[str, float]],
                budget: int, fixed_bytes: int, *, stock_types: Mapping[str, str] | None = None,
                scales: Mapping[str, float] | None = None, exact_states: int = 200_000,
                extra: Mapping[str, Any] | None = None, change_penalty: float = 0.0) -> Layout:
    """Solve one size point. ``damage[tensor][type]`` is the predicted expected KLD of that tensor in that type
    (only measured pairs are candidates; a pair whose type is not valid for the row length is never one).
    ``budget`` is the whole file's byte limit, ``fixed_bytes`` what lies outside the planned tensors.

    Dominated options are pruned before solving (:func:`prune_dominated`). ``change_penalty`` (expected KLD) is
    added to every type other than a tensor's stock type while solving: a larger penalty keeps the plan closer to
    the stock layout (the shrink step of :mod:`converters.ladder.tune`); the plan's damages stay the predicted
    ones, without the penalty."""
    stock = dict(stock_types or {})
    items: list[list[Option]] = []
    for t in tensors:
        opts = [Option(q, tensor_bytes(t, q), float(d) + (change_penalty if stock and q != stock.get(t.name) else 0.0))
                for q, d in damage.get(t.name, {}).items()
                if q in QUANT_SIZES and valid(q, t.row_length) and math.isfinite(d)]
        if not opts:
            raise InputError(f"{t.name}: no measured candidate type")
        items.append(prune_dominated(opts))
    sol = solve(items, budget - fixed_bytes, exact_states=exact_states)

    def real(t: TensorInfo, o: Option) -> Option:
        return Option(o.type, o.bytes, float(damage[t.name][o.type]))

    plans = tuple(TensorPlan(t.name, t.kind, tuple(t.shape), items[i][j].type, items[i][j].bytes,
                             float(damage[t.name][items[i][j].type]), stock.get(t.name),
                             tuple(real(t, o) for o in items[i]))
                  for i, (t, j) in enumerate(zip(tensors, sol.choice)))
    stock_damage = None
    if stock:
        try:
            stock_damage = math.fsum(damage[t.name][stock[t.name]] for t in tensors)
        except KeyError:
            stock_damage = None
    return Layout(size_point, budget, fixed_bytes, plans, sol.lam, sol.optimal, stock_damage, dict(scales or {}),
                  dict(extra or {}))


def tensor_type_lines(types: Mapping[str, str]) -> list[str]:
    """``--tensor-type-file`` lines: ``^<escaped name>$=<type>`` for every tensor (llama-quantize lowercases the
    pattern and compares type names case-insensitively; our names are lowercase already)."""
    return [f"^{re.escape(name)}$={t}" for name, t in types.items()]


def write_tensor_type_file(path: Any, types: Mapping[str, str]) -> None:
    from pathlib import Path

    for name in types:
        if any(c.isspace() for c in name) or name != name.lower():
            raise InputError(f"tensor name {name!r} cannot be written to a --tensor-type-file")
    Path(path).write_text("\n".join(tensor_type_lines(types)) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Naming and the publish rule of tuned files
# --------------------------------------------------------------------------------------------------
TUNED_SUFFIX = "-tuned"  # Q4_K_M -> type "Q4_K_M-tuned", file "<Model>-Q4_K_M-tuned.gguf"


def is_tuned(type_name: str) -> bool:
    return type_name.endswith(TUNED_SUFFIX)


def stock_of(type_name: str) -> str:
    """``Q4_K_M-tuned`` -> ``Q4_K_M`` (a stock name is returned unchanged)."""
    return type_name[:-len(TUNED_SUFFIX)] if is_tuned(type_name) else type_name
