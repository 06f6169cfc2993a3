"""converters.ladder.layout: bytes, candidates, the knapsack solver against brute force, the tensor-type file."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from converters.ladder import layout
from converters.ladder.layout import Option, TensorInfo


def _brute(items, budget):
    best = None
    for choice in itertools.product(*(range(len(o)) for o in items)):
        b = sum(items[i][j].bytes for i, j in enumerate(choice))
        if b > budget:
            continue
        d = math.fsum(items[i][j].damage for i, j in enumerate(choice))
        if best is None or d < best[0] - 1e-15:
            best = (d, b)
    return best


def _instance(rng: random.Random, n: int, m: int):
    items = []
    for _ in range(n):
        opts = []
        for k in range(m):
            opts.append(Option(f"T{k}", rng.randint(1, 60), rng.random()))
        items.append(opts)
    lo = sum(min(o.bytes for o in opts) for opts in items)
    hi = sum(max(o.bytes for o in opts) for opts in items)
    return items, rng.randint(lo, hi)


@pytest.mark.parametrize("seed", range(60))
def test_solver_matches_brute_force(seed):
    rng = random.Random(seed)
    items, budget = _instance(rng, rng.randint(1, 6), rng.randint(1, 4))
    sol = layout.solve(items, budget)
    best_d, _ = _brute(items, budget)
    assert sol.optimal
    assert sol.bytes <= budget
    assert sol.damage == pytest.approx(best_d, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("seed", range(30))
def test_heuristic_alone_stays_in_budget_and_close(seed):
    """Lagrangian + greedy fill without the exact program: never over budget, and on instances shaped like
    real ones (damage falling with bytes) within a few percent of the optimum."""
    rng = random.Random(1000 + seed)
    items = []
    for _ in range(rng.randint(2, 7)):
        base = rng.uniform(0.5, 2.0)
        size = rng.randint(10, 40)
        opts = [Option(f"T{k}", size * (k + 2), base * 2.0 ** -(1.5 * k) * rng.uniform(0.8, 1.2)) for k in range(4)]
        items.append(opts)
    lo = sum(o[0].bytes for o in items)
    hi = sum(o[-1].bytes for o in items)
    budget = rng.randint(lo, hi)
    sol = layout.solve(items, budget, exact_states=0)
    assert not sol.optimal
    assert sol.bytes <= budget
    best_d, _ = _brute(items, budget)
    assert sol.damage >= best_d - 1e-12
    assert sol.damage <= best_d * 1.5 + 1e-9


def test_budget_too_small_is_refused():
    items = [[Option("A", 10, 1.0), Option("B", 20, 0.5)]] * 3
    with pytest.raises(layout.Infeasible):
        layout.solve(items, 29)


def test_solver_is_deterministic():
    rng = random.Random(7)
    items, budget = _instance(rng, 40, 5)
    a = layout.solve(items, budget, exact_states=0)
    b = layout.solve([list(o) for o in items], budget, exact_states=0)
    assert a == b
    assert layout.solve(items, budget) == layout.solve(items, budget)


def test_greedy_lands_close_to_a_large_budget():
    """A model-sized instance with many small steps: the greedy fill leaves less than 0.5 % unspent."""
    rng = random.Random(3)
    tensors = [TensorInfo(f"blk.{i // 7}.t{i % 7}.weight", (4096, rng.choice([1024, 4096, 11008]))) for i in range(210)]
    types = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
    dmg = {t.name: {q: rng.uniform(0.5, 1.5) * 2.0 ** -k * t.elements / 1e6 for k, q in enumerate(types)}
           for t in tensors}
    full = sum(layout.tensor_bytes(t, "Q4_K") for t in tensors)
    plan = layout.plan_layout("Q4_K_M", tensors, dmg, full + 1000, 1000, exact_states=0)
    assert plan.bytes <= full + 1000
    assert plan.bytes >= (full + 1000) * 0.995


def test_bytes_come_from_the_block_size():
    t = TensorInfo("blk.0.attn_q.weight", (576, 576))
    assert layout.tensor_bytes(t, "Q8_0") == 576 * 576 // 32 * 34
    assert layout.tensor_bytes(t, "F16") == 576 * 576 * 2
    t2 = TensorInfo("blk.0.ffn_down.weight", (1536, 576))
    assert layout.tensor_bytes(t2, "Q4_K") == 1536 * 576 // 256 * 144
    assert layout.tensor_bytes(TensorInfo("x.weight", (32, 1)), "Q4_0") == 32  # 18 bytes padded to 32
    with pytest.raises(layout.InputError):
        layout.tensor_bytes(t, "Q4_K")  # 576 is not a multiple of 256


def test_candidates_follow_row_length_and_imatrix():
    t576 = TensorInfo("blk.0.attn_q.weight", (576, 576))
    t1536 = TensorInfo("blk.0.ffn_down.weight", (1536, 576))
    c = layout.candidates(t576, ("Q4_K", "IQ4_XS", "Q4_0", "IQ4_NL", "Q8_0", "F16", "BF16", "IQ2_XS"))
    assert c == ("Q4_0", "IQ4_NL", "Q8_0", "F16", "BF16")
    c = layout.candidates(t1536, ("Q4_K", "IQ2_XS", "IQ4_XS"), imatrix=False)
    assert c == ("Q4_K", "IQ4_XS")
    assert "IQ2_XS" in layout.candidates(t1536, ("Q4_K", "IQ2_XS"), imatrix=True)


def test_invalid_pairs_are_never_chosen():
    """A measured damage for a type the rows cannot take (even a tempting zero) is not a candidate."""
    t = TensorInfo("blk.0.attn_q.weight", (576, 576))
    dmg = {t.name: {"Q2_K": 0.0, "Q4_0": 0.5, "Q8_0": 0.1}}
    plan = layout.plan_layout("Q2_K", [t], dmg, budget=10**9, fixed_bytes=0)
    assert plan.tensors[0].type == "Q8_0"
    assert {o.type for o in plan.tensors[0].candidates} == {"Q4_0", "Q8_0"}


def test_layout_json_round_trip_and_type_file(tmp_path):
    tensors = [TensorInfo("token_embd.weight", (256, 1000)), TensorInfo("blk.0.ffn_up.weight", (256, 512))]
    dmg = {t.name: {"Q4_K": 1.0, "Q6_K": 0.2, "Q8_0": 0.05} for t in tensors}
    stock = {t.name: "Q4_K" for t in tensors}
    budget = 4096 + sum(layout.tensor_bytes(t, "Q4_K") for t in tensors)
    plan = layout.plan_layout("Q4_K_M", tensors, dmg, budget, 4096, stock_types=stock, scales={"ffn_up": 2.0})
    assert plan.bytes <= budget
    assert plan.damage <= plan.stock_damage
    back = layout.Layout.from_json(plan.to_json())
    assert back.types == plan.types and back.bytes == plan.bytes and back.scales == {"ffn_up": 2.0}
    f = tmp_path / "types.txt"
    layout.write_tensor_type_file(f, plan.types)
    lines = f.read_text().split()
    assert lines == [f"^token_embd\\.weight$={plan.types['token_embd.weight']}",
                     f"^blk\\.0\\.ffn_up\\.weight$={plan.types['blk.0.ffn_up.weight']}"]


def test_kind_from_name():
    assert layout.kind_of("blk.12.attn_output.weight") == "attn_output"
    assert layout.kind_of("token_embd.weight") == "token_embd"
    assert layout.kind_of("output.weight") == "output"
    assert layout.layer_of("blk.12.attn_output.weight") == 12


def test_a_tied_token_embedding_never_goes_below_its_stock_type():
    embd = layout.TensorInfo("token_embd.weight", (576, 49152))
    ffn = layout.TensorInfo("blk.0.ffn_down.weight", (1536, 576))
    stock = {embd.name: "Q8_0", ffn.name: "Q4_K"}
    cands = {embd.name: ("IQ4_NL", "Q5_0", "Q8_0", "F16"), ffn.name: ("Q3_K", "Q4_K", "Q5_K")}
    tied = layout.keep_tied_embedding([embd, ffn], stock, cands)
    assert layout.tied_embedding([embd, ffn])
    assert tied[embd.name] == ("Q8_0", "F16") and tied[ffn.name] == cands[ffn.name]  # other tensors as they were
    # with its own output head the embedding is only read: every candidate stays
    out = layout.TensorInfo("output.weight", (576, 49152))
    assert not layout.tied_embedding([embd, ffn, out])
    assert layout.keep_tied_embedding([embd, ffn, out], stock, cands) == cands
