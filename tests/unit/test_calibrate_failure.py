"""converters.llama.calibrate: why llama-imatrix failed, told from its output and from the reference's tensor data.

llama-imatrix prints ``non-finite values detected in <tensor>`` and exits at once; its logger thread can lose
that line, so the reason must not depend on it."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from converters.llama import calibrate
from converters.core.errors import ToolError

LOST = "0.00.359.397 I compute_imatrix: computing over 2 chunks, n_ctx=256, batch_size=2048, n_seq=8\n"
SAID = LOST + "0.00.412.001 E collect_imatrix: non-finite values detected in blk.0.attn_q.weight\n"


def _gguf(path: Path, poison: bool) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    for i in range(5):
        a = np.ones((8, 32), dtype=np.float32)
        if poison and i != 2:
            a[0, 0] = np.nan
        data = gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16)
        w.add_tensor(f"blk.{i}.attn_q.weight", data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _error(tail: str, code: int | None = 1, timed_out: bool = False) -> ToolError:
    return ToolError(["/x/llama-imatrix", "-m", "m.gguf"], code, tail, timed_out=timed_out)


def test_nan_weights_are_named_even_when_the_line_is_lost(tmp_path: Path) -> None:
    bad = _gguf(tmp_path / "bad.gguf", poison=True)
    why = calibrate._non_finite(_error(LOST), bad)
    assert why == ("the model's tensor data is non-finite (NaN/inf) in 4 tensor(s): blk.0.attn_q.weight (1 values), "
                   "blk.1.attn_q.weight (1 values), blk.3.attn_q.weight (1 values) and 1 more")
    assert calibrate._non_finite(_error(SAID), bad) == why  # the weights are the cause, said or not


def test_finite_weights_with_the_line_mean_overflowing_activations(tmp_path: Path) -> None:
    good = _gguf(tmp_path / "good.gguf", poison=False)
    why = calibrate._non_finite(_error(SAID), good)
    assert why is not None and "non-finite activations in blk.0.attn_q.weight" in why and "weights are finite" in why
    assert calibrate._non_finite(_error(LOST), good) is None  # no evidence: the tool's own error stands


def test_kills_timeouts_and_unreadable_files_are_not_explained(tmp_path: Path) -> None:
    bad = _gguf(tmp_path / "bad.gguf", poison=True)
    assert calibrate._non_finite(_error(SAID, code=-9), bad) is None  # stopped by a signal: no scan of the file
    assert calibrate._non_finite(_error(SAID, code=None, timed_out=True), bad) is None
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf")
    assert "non-finite activations" in calibrate._non_finite(_error(SAID), junk)
