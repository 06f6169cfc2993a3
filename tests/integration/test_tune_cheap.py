"""Issue 21's cheap tuner on the shared SmolLM2 ladder: a tensor's quantized bytes depend only on its data, type and
imatrix (what lets the tuner read errors from the ladder's own files), and one size point tuned end to end with
errors from the files, packed quantize runs for the rest, a cache that a second pass hits completely."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from converters.core import proc, quants
from converters.formats import gguf_meta
from converters.ladder import layout, tune
from converters.ladder.evaluate import perplexity

pytestmark = [pytest.mark.slow, pytest.mark.llama]

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def cheap_dir(smol_workdir, tmp_path_factory) -> Path:
    """The shared ladder's reference, imatrix and stock files, hard-linked into a private work dir."""
    out = tmp_path_factory.mktemp("tune-cheap")
    for p in smol_workdir.glob("*.gguf"):
        os.link(p, out / p.name)
    return out


def _data(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, bytes(t.data)) for t in gguf_meta.reader(path).tensors}


def test_same_tensor_same_type_same_bytes(cheap_dir, toolchain):
    a = _data(cheap_dir / f"{MODEL}-Q4_K_M.gguf")
    b = _data(cheap_dir / f"{MODEL}-Q2_K.gguf")
    c = _data(cheap_dir / f"{MODEL}-IQ4_XS.gguf")
    shared = [n for n in a if n in b and a[n][0] == b[n][0] and a[n][0] not in ("F32", "BF16")]
    shared += [n for n in a if n in c and a[n][0] == c[n][0] and a[n][0] not in ("F32", "BF16")]
    # SmolLM2's 576-wide rows make most k-quant tensors fall back, so the files share few (tensor, type) pairs:
    # token_embd at least; the --pure run below checks more tensors
    assert shared
    for n in shared:
        assert a[n][1] == (b[n][1] if b[n][0] == a[n][0] else c[n][1]), n
    # a --pure run that sends a few tensors to the types the Q4_K_M file holds them in: the same bytes
    picked = {n: a[n][0] for n in list(a)[:200] if a[n][0] not in ("F32", "BF16")}
    picked = dict(list({n: q for n, q in picked.items() if q != "Q8_0"}.items())[:6] + [(shared[0], a[shared[0]][0])])
    tf = cheap_dir / "pure-types.txt"
    layout.write_tensor_type_file(tf, picked)
    out = cheap_dir / "pure.gguf"
    # (a quantized file type: with an unquantized one llama-quantize copies every tensor and ignores the overrides)
    proc.run([toolchain.program("llama-quantize"), "--imatrix", f"{MODEL}-imatrix.gguf", "--pure",
              "--tensor-type-file", tf, cheap_dir / f"{MODEL}-BF16.gguf", out, "Q8_0", "2"], timeout=600, cwd=cheap_dir)
    pure = _data(out)
    out.unlink()
    assert len(picked) >= 3
    for n, q in picked.items():
        assert pure[n] == a[n], n


def test_one_size_point_from_the_ladders_own_files(cheap_dir, calibration_text, toolchain):
    files = {t: cheap_dir / f"{MODEL}-{t}.gguf" for t in ("Q8_0", "Q4_K_M", "IQ4_XS", "Q2_K")}
    inp = tune.Inputs(cheap_dir, cheap_dir / f"{MODEL}-BF16.gguf", cheap_dir / f"{MODEL}-imatrix.gguf",
                      calibration_text, MODEL, files, toolchain)
    opts = tune.TuneOptions(size_points=("Q4_K_M",), probe_chunks=3, ctx=256, threads=2)
    outs, summary = tune.run_points(inp, [quants.get("Q4_K_M")], opts)
    counts = summary["counts"]
    assert counts["from_files"] > 0  # the ladder's files held pairs: not quantized again
    assert counts["from_files"] + counts["quantized"] + counts["cached"] <= counts["pairs"]
    assert counts["quantize_runs"] <= 4  # packed: runs = most missing types of one tensor, not one per type
    assert set(summary["seconds"]) >= {"errors", "calibration", "solve", "total"}
    point = summary["points"]["Q4_K_M"]
    stock = point["stock_calibration"]
    assert stock["kld"] > 0 and len(point["rounds"]) >= 1
    first = point["rounds"][0]
    # the prediction is anchored on the stock file's measured KLD; the plan fits the stock file's bytes
    assert first["bytes"] <= files["Q4_K_M"].stat().st_size
    if point["status"] == "built":
        (out,) = outs
        lay = layout.Layout.from_json(__import__("json").loads((cheap_dir / point["layout"]).read_text()))
        assert tune.read_types(out) | lay.types == tune.read_types(out)
        assert out.stat().st_size <= files["Q4_K_M"].stat().st_size
        assert lay.extra["calibration"]["paired"]["confirmed"]
    else:
        assert not outs and point["reason"]
    # a second pass needs no program: every pair comes from the cache
    m = tune.Measurer.open(toolchain, cheap_dir, inp.reference, inp.imatrix, calibration_text, [], threads=2)
    stock_types = tune.read_types(files["Q4_K_M"])
    tensors = tune.catalogue(inp.reference, [files["Q4_K_M"]])
    wanted = tune.candidates(tensors, stock_types, opts, imatrix=True)
    errs = m.errors({n: list(v) for n, v in wanted.items()})
    assert m.counts["quantize_runs"] == 0 and m.counts["from_files"] == 0
    assert all(stock_types[n] in errs[n] for n in errs)
    assert perplexity.LOGITS_MAGIC  # the calibration runs used the evaluation's own base-logits format
