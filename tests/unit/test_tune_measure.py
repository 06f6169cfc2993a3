"""converters.ladder.tune's pure parts on small GGUF files written with gguf-py: importance, errors, the size point's plan."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import quantize

from converters.ladder import layout
from converters.ladder import kldfit, tune


def _write(path, tensors: dict, arch: str = "llama") -> None:
    w = GGUFWriter(str(path), arch)
    for name, (arr, qtype) in tensors.items():
        if qtype is None:
            w.add_tensor(name, arr)
        else:
            data = quantize(arr, qtype)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_importance_is_in_sum2_over_counts(tmp_path):
    p = tmp_path / "imatrix.gguf"
    _write(p, {"blk.0.ffn_up.weight.in_sum2": (np.array([[2.0, 4.0, 6.0, 8.0]], dtype=np.float32), None),
               "blk.0.ffn_up.weight.counts": (np.array([2.0], dtype=np.float32), None)}, arch="imatrix")
    imp = tune.read_importance(p)
    assert list(imp) == ["blk.0.ffn_up.weight"]
    assert imp["blk.0.ffn_up.weight"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert tune.read_importance(None) == {}


def test_weighted_error_weighs_columns():
    ref = np.zeros((2, 3), dtype=np.float32)
    q = np.array([[1, 0, 0], [0, 2, 0]], dtype=np.float32)
    assert tune.weighted_error(ref, q, None) == 5.0
    assert tune.weighted_error(ref, q, np.array([10.0, 1.0, 0.0])) == 14.0


def test_solve_budget_keeps_within_the_stock_file(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 256)).astype(np.float32)
    b = rng.standard_normal((32, 256)).astype(np.float32)
    stock = tmp_path / "stock.gguf"
    _write(stock, {"blk.0.ffn_up.weight": (a, T.Q4_0), "blk.0.attn_q.weight": (b, T.Q8_0),
                   "blk.0.attn_norm.weight": (np.ones(256, dtype=np.float32), None)})
    types = tune.read_types(stock)
    assert types == {"blk.0.ffn_up.weight": "Q4_0", "blk.0.attn_q.weight": "Q8_0", "blk.0.attn_norm.weight": "F32"}
    tensors = [layout.TensorInfo("blk.0.ffn_up.weight", (256, 64)), layout.TensorInfo("blk.0.attn_q.weight", (256, 32))]
    errors = {"blk.0.ffn_up.weight": {"Q4_0": 4.0, "Q8_0": 0.1, "Q5_0": 1.0},
              "blk.0.attn_q.weight": {"Q4_0": 9.0, "Q8_0": 0.2, "Q5_0": 2.0}}
    fit = kldfit.Fit({"ffn_gate_up@first": 0.01, "attn_qk@first": 0.02}, 0.01, 0.0, 2)
    size = stock.stat().st_size
    fixed = tune.fixed_bytes(stock, tensors, types)
    lay = tune.solve_budget("Q8_0", tensors, errors, fit, size, fixed, stock_types=types)
    assert lay.budget == size and lay.bytes <= lay.budget
    assert lay.stock_damage == pytest.approx(0.01 * 4.0 + 0.02 * 0.2)
    assert lay.damage <= lay.stock_damage
    # the fixed part is what lies outside the planned tensors: metadata and the norm
    assert fixed == size - sum(layout.tensor_bytes(t, s) for t, s in zip(tensors, ("Q4_0", "Q8_0")))
