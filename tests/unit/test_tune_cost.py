"""Issue 21's cheap tuner, pure parts: candidates around the stock type, dominated types pruned, the error cache and
its key, the packed quantize rounds, the token-embedding weights, and the error-to-KLD fit on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from converters.ladder import kldfit, layout, tensorerr, tune
from converters.ladder.kldfit import Observation
from converters.ladder.layout import Option, TensorInfo

NARROW = TensorInfo("blk.0.ffn_up.weight", (576, 1536))  # 576: 32-block types only
WIDE = TensorInfo("blk.0.ffn_down.weight", (1536, 576))  # 1536: k-quants too


# ------------------------------------------------------------------------------------------ candidates
def test_neighbours_are_one_bits_step_around_the_stock_type():
    # 32-block rows: levels 4.5 (Q4_0, IQ4_NL), 5.0 (Q4_1), 5.5 (Q5_0), 6.0 (Q5_1), 8.5 (Q8_0), 16 (F16)
    assert layout.neighbours(NARROW, "Q5_0") == ("Q4_1", "Q5_0", "Q5_1")
    assert layout.neighbours(NARROW, "Q4_0") == ("Q4_0", "Q4_1", "IQ4_NL")
    assert set(layout.neighbours(NARROW, "Q5_0", steps=2)) == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q8_0"}
    # an excluded type is skipped: the next size that exists is one step
    allowed = [q for q in layout.DEFAULT_CANDIDATES if q not in ("Q4_1", "Q5_1")]
    assert layout.neighbours(NARROW, "Q5_0", allowed) == ("Q4_0", "Q5_0", "IQ4_NL", "Q8_0")
    # k-quant rows: Q3_K (3.4375) .. Q5_K (5.5) around Q4_K; never a type invalid for the row
    got = layout.neighbours(WIDE, "Q4_K")
    assert "Q4_K" in got and "Q6_K" not in got and "Q2_K" not in got
    assert all(layout.valid(q, WIDE.row_length) for q in got)
    assert "Q4_K" not in layout.neighbours(NARROW, "Q4_0")


def test_stock_and_the_L_type_are_always_candidates():
    emb = TensorInfo("token_embd.weight", (576, 49152))
    st = tune.TuneOptions(size_points=("Q2_K",), exclude=("Q4_1", "Q5_1"))
    c = tune.candidates([emb, NARROW], {emb.name: "Q4_1", NARROW.name: "Q4_1"}, st, imatrix=True)
    assert "Q8_0" in c[emb.name] and "Q4_1" in c[emb.name]  # _L type; the stock type even when excluded
    assert "Q8_0" not in c[NARROW.name] and "Q4_1" in c[NARROW.name] and "Q5_1" not in c[NARROW.name]


def test_dominated_options_are_pruned_and_the_answer_is_unchanged():
    opts = [Option("A", 100, 5.0), Option("B", 100, 4.0), Option("C", 120, 4.0), Option("D", 150, 1.0),
            Option("E", 90, 9.0)]
    assert [o.type for o in layout.prune_dominated(opts)] == ["E", "B", "D"]
    rng = np.random.default_rng(3)
    for _ in range(30):
        items = [[Option(str(j), int(rng.integers(10, 60)), float(rng.random())) for j in range(5)] for _ in range(6)]
        budget = int(sum(min(o.bytes for o in it) for it in items) + 60)
        full = layout.solve(items, budget)
        pruned = layout.solve([layout.prune_dominated(it) for it in items], budget)
        assert math.isclose(full.damage, pruned.damage, rel_tol=1e-12, abs_tol=1e-15)


def test_change_penalty_shrinks_toward_stock():
    ts = [TensorInfo(f"blk.{i}.ffn_down.weight", (256, 64)) for i in range(4)]
    # every tensor could trade: stock Q4_K; Q5_K costs bytes, Q3_K saves them
    dmg = {t.name: {"Q3_K": 3.0 + i, "Q4_K": 2.0, "Q5_K": 1.0 - 0.1 * i} for i, t in enumerate(ts)}
    stock = {t.name: "Q4_K" for t in ts}
    budget = sum(layout.tensor_bytes(t, "Q4_K") for t in ts)
    free = layout.plan_layout("Q4_K_M", ts, dmg, budget, 0, stock_types=stock)
    held = layout.plan_layout("Q4_K_M", ts, dmg, budget, 0, stock_types=stock, change_penalty=10.0)
    changed = lambda lay: sum(lay.types[t.name] != "Q4_K" for t in ts)  # noqa: E731
    assert changed(free) > 0 and changed(held) == 0
    assert held.damage == pytest.approx(8.0)  # the damages recorded are the predicted ones, without the penalty


# ------------------------------------------------------------------------------------------ errors and cache
def test_cache_key_names_every_input_and_survives_a_reload(tmp_path):
    key = tensorerr.CacheKey("r" * 64, "i" * 64, "c" * 64, "llama.cpp abc")
    others = [tensorerr.CacheKey("x" * 64, "i" * 64, "c" * 64, "llama.cpp abc"),
              tensorerr.CacheKey("r" * 64, None, "c" * 64, "llama.cpp abc"),
              tensorerr.CacheKey("r" * 64, "i" * 64, "d" * 64, "llama.cpp abc"),
              tensorerr.CacheKey("r" * 64, "i" * 64, "c" * 64, "llama.cpp def"),
              tensorerr.CacheKey("r" * 64, "i" * 64, "c" * 64, "llama.cpp abc", seed=7),
              tensorerr.CacheKey("r" * 64, "i" * 64, "c" * 64, "llama.cpp abc", rows=1024)]
    assert len({key.digest()} | {k.digest() for k in others}) == 7
    c = tensorerr.ErrorCache(tmp_path, key)
    c.put("blk.0.ffn_up.weight", "Q4_0", 1.5)
    c.put("blk.0.ffn_up.weight", "Q4_K", None)  # a fallback: not measured again, never a candidate
    c.save()
    again = tensorerr.ErrorCache(tmp_path, key)
    wanted = {"blk.0.ffn_up.weight": ["Q4_0", "Q4_K", "Q5_0"]}
    assert again.missing(wanted) == {"blk.0.ffn_up.weight": ["Q5_0"]}
    assert again.table(wanted) == {"blk.0.ffn_up.weight": {"Q4_0": 1.5}}
    assert tensorerr.ErrorCache(tmp_path, others[0]).missing(wanted) == wanted  # another reference: nothing reused


def test_sampled_rows_estimate_the_whole_tensors_error_without_bias():
    rng = np.random.default_rng(3)
    per_row = rng.gamma(2.0, 1.0, size=5000)  # each row's error: rows differ a lot
    rows, w = tensorerr.sample_rows("blk.3.ffn_up.weight", 5000, 500, None, seed=0)
    assert len(rows) == 500 and len(set(rows.tolist())) == 500 and list(rows) == sorted(rows)
    assert w[rows] == pytest.approx(np.full(500, 10.0)) and float(w.sum()) == pytest.approx(5000)
    again, _ = tensorerr.sample_rows("blk.3.ffn_up.weight", 5000, 500, None, seed=0)
    other, _ = tensorerr.sample_rows("blk.4.ffn_up.weight", 5000, 500, None, seed=0)
    assert (again == rows).all() and not (other == rows).all()  # reproducible, and not the same rows everywhere
    estimates = [float((w * per_row)[r].sum()) for r, w in
                 (tensorerr.sample_rows("t", 5000, 500, None, seed=s) for s in range(200))]
    assert np.mean(estimates) == pytest.approx(per_row.sum(), rel=0.01)  # unbiased
    assert np.std(estimates) / per_row.sum() < 0.05
    # small tensors, or rows=0: every row, unweighted
    assert tensorerr.sample_rows("t", 400, 500, None, seed=0) == (None, None)
    assert tensorerr.sample_rows("t", 5000, 0, None, seed=0) == (None, None)


def test_token_embedding_rows_keep_the_frequent_tokens_and_weigh_the_drawn_ones():
    rng = np.random.default_rng(4)
    freq = np.zeros(20000)
    seen = rng.choice(20000, size=3000, replace=False)
    freq[seen] = rng.zipf(1.5, size=3000).astype(float)
    freq /= freq.sum()
    per_row = rng.gamma(2.0, 1.0, size=20000)
    truth = float((freq * per_row).sum())
    rows, w = tensorerr.sample_rows("token_embd.weight", 20000, 512, freq, seed=0)
    assert len(rows) == 512 and set(rows.tolist()) <= set(seen.tolist())  # never a token the text lacks
    top = np.argsort(-freq, kind="stable")[:256]
    assert set(top.tolist()) <= set(rows.tolist()) and (w[top] == freq[top].astype(np.float32)).all()
    estimates = [float((w * per_row)[r].sum()) for r, w in
                 (tensorerr.sample_rows("token_embd.weight", 20000, 512, freq, seed=s) for s in range(200))]
    assert np.mean(estimates) == pytest.approx(truth, rel=0.01)
    # few enough tokens seen: every one of them, at its own weight (exact)
    rows, w = tensorerr.sample_rows("token_embd.weight", 20000, 4000, freq, seed=0)
    assert sorted(rows.tolist()) == sorted(seen.tolist()) and float((w * per_row)[rows].sum()) == pytest.approx(truth)


def test_the_measuring_program_is_built_from_the_trees_own_list_of_base_sources(tmp_path):
    from converters.core.errors import ToolchainError
    from converters.llama import native

    src = tmp_path / "ggml" / "src"
    src.mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("add_library(ggml\n  ggml-backend-reg.cpp)\n"
                                        "add_library(ggml-base\n  ../include/ggml.h\n  ggml.c\n  ggml-quants.c\n"
                                        "  ggml-quants.h\n  gguf.cpp)\n")
    for n in ("ggml.c", "ggml-quants.c", "gguf.cpp"):
        (src / n).write_text("")
    assert [p.name for p in native.base_sources(tmp_path / "ggml")] == ["ggml.c", "ggml-quants.c", "gguf.cpp"]
    (src / "gguf.cpp").unlink()
    with pytest.raises(ToolchainError, match="gguf.cpp"):
        native.base_sources(tmp_path / "ggml")


def test_packing_rounds_need_as_many_runs_as_the_most_missing_types():
    rounds = tensorerr.packing_rounds({"a": ["Q4_0", "Q5_0", "Q8_0"], "b": ["Q4_1"], "c": ["Q5_1", "Q4_0"]})
    assert rounds == [{"a": "Q4_0", "b": "Q4_1", "c": "Q5_1"}, {"a": "Q5_0", "c": "Q4_0"}, {"a": "Q8_0"}]
    assert tensorerr.packing_rounds({}) == []


def test_token_embedding_rows_weighed_by_token_frequency():
    assert tensorerr.parse_token_ids("[1, 5, 5, 2]\n") == [1, 5, 5, 2]
    f = tensorerr.frequencies([1, 5, 5, 2, 99], 6)
    assert f.tolist() == [0, 0.25, 0.25, 0, 0, 0.5]
    ref = np.zeros((3, 2), dtype=np.float32)
    q = np.array([[1, 1], [2, 0], [0, 3]], dtype=np.float32)
    w = tensorerr.Weights({}, np.array([0.5, 0.5, 0.0]))
    assert w.error(tensorerr.TOKEN_EMBD, ref, q) == pytest.approx(0.5 * 2 + 0.5 * 4)
    assert w.error("blk.0.attn_q.weight", ref, q) == pytest.approx(2 + 4 + 9)  # no entry, not the embedding


# ------------------------------------------------------------------------------------------ the fit
def test_groups_by_kind_and_depth():
    assert kldfit.group("blk.0.attn_k.weight", 30) == "attn_qk@first"
    assert kldfit.group("blk.15.ffn_up.weight", 30) == "ffn_gate_up@middle"
    assert kldfit.group("blk.29.ffn_down.weight", 30) == "ffn_down@last"
    assert kldfit.group("token_embd.weight", 30) == "token_embd"
    assert kldfit.n_layers(["blk.0.a.weight", "blk.29.b.weight", "output.weight"]) == 30


def _synthetic(rng, truth: dict[str, float], n: int, c: float = 0.002, noise: float = 0.0) -> list[Observation]:
    out = []
    for i in range(n):
        e = {g: float(rng.uniform(0.5, 2.0)) for g in truth}
        k = c + sum(truth[g] * e[g] for g in truth)
        k *= 1 + noise * float(rng.standard_normal())
        out.append(Observation(f"f{i}", k, 0.01 * k, e))
    return out


def test_fit_recovers_scales_from_enough_observations():
    rng = np.random.default_rng(0)
    truth = {"ffn_down@first": 0.02, "ffn_down@last": 0.005, "attn_qk@middle": 0.01}
    f = kldfit.fit(_synthetic(rng, truth, 40), list(truth), prior=0.01)
    for g, s in truth.items():
        assert f.scale(g) == pytest.approx(s, rel=0.05)


def test_fit_with_few_observations_stays_near_one_global_scale():
    rng = np.random.default_rng(1)
    truth = {"a": 0.02, "b": 0.005, "c": 0.01}
    obs = _synthetic(rng, truth, 2)
    f = kldfit.fit(obs, list(truth))
    s0, _ = kldfit.global_fit(obs)
    assert f.s0 == s0 > 0
    assert all(0.5 * s0 < f.scale(g) < 2 * s0 for g in truth)
    # predictions anchored on a stock observation reproduce it exactly, and move with the scaled difference
    stock = obs[0]
    assert kldfit.predict(stock, stock.errors, f) == pytest.approx(stock.kld)
    more = {g: e + 1.0 for g, e in stock.errors.items()}
    assert kldfit.predict(stock, more, f) == pytest.approx(stock.kld + sum(f.scale(g) for g in truth))


def test_a_missed_prediction_moves_the_scales_of_the_groups_it_changed():
    stock = [Observation("s1", 0.03, 0.0005, {"a": 1.0, "b": 1.0}), Observation("s2", 0.06, 0.001, {"a": 2.0, "b": 2.0})]
    f0 = kldfit.fit(stock, ["a", "b"])
    plan = {"a": 1.5, "b": 0.5}  # trades b's error for a's
    predicted = kldfit.predict(stock[0], plan, f0)
    assert predicted == pytest.approx(0.03, abs=1e-9)  # one global scale: a zero-sum trade predicts no change
    measured = Observation("p", 0.04, 0.0005, plan)  # but a hurts more than b
    f1 = kldfit.fit(stock + [measured], ["a", "b"])
    assert f1.scale("a") > f0.scale("a") and f1.scale("b") < f0.scale("b")
    assert kldfit.predict(stock[0], plan, f1) > predicted


def test_paired_difference_uses_chunks_when_both_have_them():
    p = kldfit.paired([0.10, 0.20, 0.30], [0.08, 0.17, 0.29], (0.2, 0.05), (0.18, 0.05))
    assert p.paired and p.gain == pytest.approx(0.02) and p.confirmed
    assert p.err == pytest.approx(np.std([0.02, 0.03, 0.01], ddof=1) / math.sqrt(3))
    u = kldfit.paired([], [], (0.2, 0.05), (0.18, 0.05))
    assert not u.paired and not u.confirmed and u.err == pytest.approx(math.hypot(0.05, 0.05))
    assert u.ln_ppl is None and not u.ppl_worse


def test_a_plan_with_a_worse_perplexity_is_not_confirmed_however_much_better_its_kld():
    stock, plan = [0.10, 0.20, 0.30, 0.25], [0.08, 0.17, 0.27, 0.22]  # KLD better on every chunk
    ln_stock = [0.10, 0.16, 0.21, 0.18]
    worse = kldfit.paired(stock, plan, (0.21, 0.04), (0.185, 0.04), stock_ln_ppl=ln_stock,
                          plan_ln_ppl=[x + 0.03 + d for x, d in zip(ln_stock, (0.001, -0.002, 0.002, -0.001))])
    assert worse.gain > 2 * worse.err and worse.ppl_worse and not worse.confirmed
    assert worse.ln_ppl[0] == pytest.approx(0.03) and worse.to_json()["ppl_worse"] is True
    noisy = kldfit.paired(stock, plan, (0.21, 0.04), (0.185, 0.04), stock_ln_ppl=ln_stock,
                          plan_ln_ppl=[x + d for x, d in zip(ln_stock, (0.01, -0.02, 0.02, -0.01))])
    assert not noisy.ppl_worse and noisy.confirmed
    # what a shrink toward stock charges: the gain predicted and not measured; with a worse perplexity, all of it
    assert noisy.shortfall(0.05) == pytest.approx(0.05 - noisy.gain)
    assert worse.gain > 0 and worse.shortfall(0.01) == pytest.approx(0.01) and worse.shortfall(0.1) == pytest.approx(0.1)


def test_grid_types_are_the_ones_beating_larger_types():
    errors = {f"t{i}": {"Q4_0": 4.0, "Q4_1": 0.01, "Q5_0": 2.0, "Q5_1": 0.005, "Q8_0": 0.1, "BF16": 0.0}
              for i in range(5)}
    errors["t9"] = {"Q4_1": 3.0, "Q8_0": 0.1}  # one tensor off the grid does not change the verdict
    assert tensorerr.grid_types(errors) == ["Q4_1", "Q5_1"]
    normal = {f"t{i}": {"Q4_0": 4.0, "Q4_1": 3.0, "Q5_0": 2.0, "Q5_1": 1.5, "Q8_0": 0.1} for i in range(5)}
    assert tensorerr.grid_types(normal) == []
