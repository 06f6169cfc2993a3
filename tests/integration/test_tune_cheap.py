"""Issue 21's cheap tuner on the shared SmolLM2 ladder: a tensor's quantized bytes depend only on its data, type and
imatrix (what lets the tuner read errors from the ladder's own files, and ggufbot-tensorerr quantize single rows),
the measuring program's errors equal to those read from llama-quantize's files, and one size point tuned end to end
(with the measuring program; and without it, from the files and packed quantize runs), a cache that a second pass
hits completely; ggufbot-assemble writes llama-quantize's bytes."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from converters.core import proc, quants
from converters.formats import gguf_meta
from converters.core.errors import ToolchainError
from converters.ladder import assemble as assemble_mod, layout, tensorerr, tune
from converters.llama import native
from tests import ggufedit

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


def test_the_measuring_program_gives_llama_quantizes_errors(cheap_dir, calibration_text, toolchain, tmp_path):
    """Whole tensors: the error of every (tensor, type) pair a ladder file holds, measured by ggufbot-tensorerr,
    equals the error of the file's own bytes (dequantized in Python); sampled rows estimate it."""
    reference, imatrix = cheap_dir / f"{MODEL}-BF16.gguf", cheap_dir / f"{MODEL}-imatrix.gguf"
    files = [cheap_dir / f"{MODEL}-{t}.gguf" for t in ("Q4_K_M", "IQ4_XS", "Q2_K")]
    importance = tensorerr.read_importance(imatrix)
    weights = tensorerr.Weights(importance, tensorerr.token_frequencies(toolchain, reference, calibration_text,
                                                                        49152))
    held: dict[str, list[str]] = {}
    for f in files:
        for n, q in tune.read_types(f).items():
            if q not in ("F32", "BF16") and q not in held.setdefault(n, []):
                held[n].append(q)
    wanted = {n: qs for n, qs in list(held.items())[:40] + [(tensorerr.TOKEN_EMBD, held[tensorerr.TOKEN_EMBD])]}
    key = tensorerr.CacheKey("r", "i", "c", toolchain.version)
    from_files = tensorerr.ErrorCache(tmp_path / "files", key)
    assert tensorerr.errors_from_files(reference, files, wanted, weights, from_files) == sum(map(len, wanted.values()))
    program = native.tensorerr_program(toolchain)
    whole = tensorerr.ErrorCache(tmp_path / "native", key)
    n_tensors, pairs = tensorerr.quantize_native(program, reference, tmp_path / "scratch", wanted, weights,
                                                 tensorerr.read_imatrix(imatrix), whole, threads=2)
    assert n_tensors == len(wanted) and pairs == sum(map(len, wanted.values()))
    for n, qs in wanted.items():
        for q in qs:
            assert whole.get(n, q) == pytest.approx(from_files.get(n, q), rel=1e-6), (n, q)
    # 128 sampled rows per tensor: an estimate of the same figure (576-1536-row tensors, 49152-row embedding)
    sampled = tensorerr.ErrorCache(tmp_path / "sampled", dataclasses.replace(key, rows=128))
    tensorerr.quantize_native(program, reference, tmp_path / "scratch", wanted, weights,
                              tensorerr.read_imatrix(imatrix), sampled, threads=2)
    ratios = [sampled.get(n, q) / whole.get(n, q) for n, qs in wanted.items() for q in qs if whole.get(n, q)]
    assert 0.9 < float(np.median(ratios)) < 1.1 and max(abs(r - 1) for r in ratios) < 0.5
    # a type whose block does not divide a 576-wide row is one llama.cpp would not write
    narrow = next(n for n, qs in wanted.items() if n.endswith("attn_q.weight"))
    none = tensorerr.ErrorCache(tmp_path / "na", key)
    tensorerr.quantize_native(program, reference, tmp_path / "scratch", {narrow: ["Q4_K"]}, weights,
                              tensorerr.read_imatrix(imatrix), none, threads=2)
    assert none.has(narrow, "Q4_K") and none.get(narrow, "Q4_K") is None


def test_one_size_point_from_the_ladders_own_files(cheap_dir, calibration_text, toolchain, monkeypatch):
    # without the measuring program (no compiler): errors from the ladder's files and packed quantize runs
    def no_compiler(tc, **kw):
        raise ToolchainError("no C/C++ compiler found")
    monkeypatch.setattr(native, "programs", no_compiler)  # so the plan is built by llama-quantize too
    files = {t: cheap_dir / f"{MODEL}-{t}.gguf" for t in ("Q8_0", "Q4_K_M", "IQ4_XS", "Q2_K")}
    inp = tune.Inputs(cheap_dir, cheap_dir / f"{MODEL}-BF16.gguf", cheap_dir / f"{MODEL}-imatrix.gguf",
                      calibration_text, MODEL, files, toolchain)
    # (the confirmation on the calibration text is the same with either error path: tested below; off here)
    opts = tune.TuneOptions(size_points=("Q4_K_M",), ctx=256, threads=2, confirm=False)
    outs, summary = tune.run_points(inp, [quants.get("Q4_K_M")], opts)
    counts = summary["counts"]
    assert counts["from_files"] > 0  # the ladder's files held pairs: not quantized again
    assert counts["from_files"] + counts["quantized"] + counts["cached"] <= counts["pairs"]
    assert counts["quantize_runs"] <= 4  # packed: runs = most missing types of one tensor, not one per type
    assert set(summary["seconds"]) >= {"errors", "solve", "total"}
    point = summary["points"]["Q4_K_M"]
    assert len(point["rounds"]) == 1 and point["rounds"][0]["bytes"] <= files["Q4_K_M"].stat().st_size
    (out,) = outs  # built once, by llama-quantize (no compiler), judged by the evaluation's gate alone
    assert point["status"] == "built" and point["confirmed"] is False
    lay = layout.Layout.from_json(__import__("json").loads((cheap_dir / point["layout"]).read_text()))
    assert tune.read_types(out) | lay.types == tune.read_types(out)
    assert out.stat().st_size <= files["Q4_K_M"].stat().st_size
    assert (cheap_dir / "tune" / "Q4_K_M-tuned.tensor-types.txt").is_file()
    # a second pass needs no program: every pair comes from the cache
    m = tune.Measurer.open(toolchain, cheap_dir, inp.reference, inp.imatrix, calibration_text, [], threads=2)
    stock_types = tune.read_types(files["Q4_K_M"])
    tensors = tune.catalogue(inp.reference, [files["Q4_K_M"]])
    wanted = tune.candidates(tensors, stock_types, opts, imatrix=True)
    errs = m.errors({n: list(v) for n, v in wanted.items()})
    assert m.counts["quantize_runs"] == 0 and m.counts["from_files"] == 0
    assert all(stock_types[n] in errs[n] for n in errs)


def test_one_size_point_with_the_measuring_program(cheap_dir, calibration_text, toolchain, tmp_path):
    files = {t: cheap_dir / f"{MODEL}-{t}.gguf" for t in ("Q8_0", "Q4_K_M", "IQ4_XS", "Q2_K")}
    inp = tune.Inputs(cheap_dir, cheap_dir / f"{MODEL}-BF16.gguf", cheap_dir / f"{MODEL}-imatrix.gguf",
                      calibration_text, MODEL, files, toolchain)
    opts = tune.TuneOptions(size_points=("Q2_K",), probe_chunks=3, ctx=256, threads=2, cache_dir=tmp_path)
    outs, summary = tune.run_points(inp, [quants.get("Q2_K")], opts)
    counts = summary["counts"]
    assert counts["native"] > 0 and counts["rows_per_tensor"] == tensorerr.DEFAULT_ROWS
    assert "quantize_runs" not in counts and counts["seconds"]["native"] > 0
    point = summary["points"]["Q2_K"]
    assert point["rounds"] and point["rounds"][0]["bytes"] <= files["Q2_K"].stat().st_size
    assert (point["status"] == "built") == bool(outs)
    assert set(summary["seconds"]) >= {"errors", "calibration", "solve", "total"}
    # the calibration runs are kept for the fit stage and a resumed run: the stock file's score is read back
    cal = tune.Calibration(toolchain, cheap_dir, inp.reference, calibration_text, ctx=256, chunks=3, threads=2)
    again = cal.score(files["Q2_K"])
    assert cal.runs == 0 and again.kld == point["stock_calibration"]["kld"]
    assert len(again.ln_ppl) == 3 and cal.base_path.is_file()
    other = tune.Calibration(toolchain, cheap_dir, inp.reference, calibration_text, ctx=256, chunks=2, threads=2)
    assert other.base_path != cal.base_path and not other.scores  # another chunk count: not the same runs


def test_assembled_file_is_llama_quantizes_file(cheap_dir, toolchain, tmp_path):
    """A plan of mixed types built both ways is the same file byte for byte: tensors held by the ladder's files in
    their planned type are copied, the rest quantized by ggufbot-assemble, the metadata is the stock file's."""
    reference, imatrix = cheap_dir / f"{MODEL}-BF16.gguf", cheap_dir / f"{MODEL}-imatrix.gguf"
    stock_file = cheap_dir / f"{MODEL}-Q4_K_M.gguf"
    others = [cheap_dir / f"{MODEL}-{t}.gguf" for t in ("IQ4_XS", "Q2_K")]
    stock = tune.read_types(stock_file)
    tensors = tune.catalogue(reference, [stock_file])
    iq4xs = tune.read_types(others[0])
    # in the first four blocks (the rest as in the stock file: a short test), every third tensor to another type:
    # IQ4_NL (quantized here), Q8_0, and the IQ4_XS file's own type (copied)
    types = {}
    for i, t in enumerate(tensors):
        q = stock[t.name]
        if not t.name.startswith(("blk.0.", "blk.1.", "blk.2.", "blk.3.")):
            pass
        elif i % 3 == 0:
            q = "IQ4_NL" if layout.valid("IQ4_NL", t.row_length) else q
        elif i % 3 == 1 and iq4xs[t.name] != q:
            q = iq4xs[t.name]
        elif i % 7 == 2:
            q = "Q8_0"
        types[t.name] = q
    plans = tuple(layout.TensorPlan(t.name, t.kind, t.shape, q, layout.tensor_bytes(t, q), 0.0, stock[t.name])
                  for t in tensors for q in [types[t.name]])
    lay = layout.Layout("Q4_K_M", stock_file.stat().st_size * 2, 0, plans, 0.0, True)
    q = quants.get("Q4_K_M")
    by_quantize = tune.build(lay, q, reference, cheap_dir, tmp_path / "a.gguf", toolchain=toolchain, imatrix=imatrix,
                             threads=2, type_file=tmp_path / "types.txt")
    program = native.assemble_program(toolchain)
    counts = assemble_mod.assemble(program, types, reference, stock_file, others, tmp_path / "b.gguf", imatrix=imatrix,
                           scratch=tmp_path / "scratch", threads=2)
    assert counts["copied"] > 0 and counts["quantized"] > 0
    assert (tmp_path / "b.gguf").read_bytes() == by_quantize.read_bytes()
    # through build(): the same bytes again, read back and checked
    again = tune.build(lay, q, reference, cheap_dir, tmp_path / "c.gguf", toolchain=toolchain, imatrix=imatrix,
                       threads=1, template=stock_file, files=others)
    assert again.read_bytes() == by_quantize.read_bytes()
    # rows measured by ggufbot-tensorerr (sampled, and whole small tensors) are copied, not quantized again
    weights = tensorerr.Weights(tensorerr.read_importance(imatrix), None)
    wanted = {n: [q] for n, q in types.items() if q == "IQ4_NL"}
    store = tensorerr.RowStore.empty(tmp_path / "rows")
    cache = tensorerr.ErrorCache(tmp_path / "errs", tensorerr.CacheKey("r", "i", "c", toolchain.version, rows=100))
    tensorerr.quantize_native(native.tensorerr_program(toolchain), reference, tmp_path / "scratch", wanted, weights,
                              tensorerr.read_imatrix(imatrix), cache, threads=2, store=store)
    assert len(store.entries) == len(wanted) and store.bytes_path.stat().st_size > 0
    # a pair that a file the build copies from holds whole: measured the same, its rows not kept
    first = next(iter(wanted))
    store2 = tensorerr.RowStore.empty(tmp_path / "rows2")
    cache2 = tensorerr.ErrorCache(tmp_path / "errs2", cache.key)
    tensorerr.quantize_native(native.tensorerr_program(toolchain), reference, tmp_path / "scratch", wanted, weights,
                              tensorerr.read_imatrix(imatrix), cache2, threads=2, store=store2,
                              held={(first, "IQ4_NL")})
    assert cache2.table(wanted) == cache.table(wanted)
    assert set(store2.entries) == set(store.entries) - {(first, "IQ4_NL")}
    assert 0 < store2.bytes_path.stat().st_size < store.bytes_path.stat().st_size
    # (no other file: the IQ4_XS file holds IQ4_NL tensors, its fallback for 576-wide rows)
    reused = assemble_mod.assemble(program, types, reference, stock_file, [], tmp_path / "e.gguf", imatrix=imatrix,
                           scratch=tmp_path / "scratch", threads=2, store=store)
    assert reused["rows_reused"] >= 100 * len(wanted) and reused["quantized"] >= len(wanted)
    assert (tmp_path / "e.gguf").read_bytes() == by_quantize.read_bytes()
    # a file quantized with another imatrix holds other bytes: never copied from
    other = ggufedit.copy_with_metadata(others[0], tmp_path / "other.gguf",
                                        set_keys={"quantize.imatrix.file": "another-imatrix.gguf"})
    alone = assemble_mod.assemble(program, types, reference, stock_file, [other], tmp_path / "d.gguf", imatrix=imatrix,
                          scratch=tmp_path / "scratch", threads=2)
    assert alone["quantized"] > counts["quantized"]
    assert (tmp_path / "d.gguf").read_bytes() == by_quantize.read_bytes()
