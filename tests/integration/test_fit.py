"""A memory-budget file on the shared SmolLM2 ladder: the budget is what llama.cpp needs to load Q4_K_M at 1k tokens
plus 1 MB as predicted, so Q4_K_M is the largest stock file that fits; the fit file is solved, built, loaded at that context
within the budget, and its facts reach ladder.json (and so the evaluation's gate).

The per-tensor damage given to the solver is a stand-in (squared quantization step per weight, from each type's bits):
measuring it is the tuner's job, tested in test_tune.py and measured for real in benchmarks/fit.py; here it would cost
minutes. What this test checks is the memory side: baseline by loading, the solver's byte budget, the build, the
load at the budget's context and the largest context."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from converters.core import names
from converters.core.workdir import Ladder
from converters.ladder import budget, fit, layout, tune
from converters.llama import memory

CTX = 1024


def _workdir(src: Path, dst: Path, keep: tuple[str, ...]) -> Ladder:
    """A work dir of links to the shared one's reference, imatrix and stock files ``keep`` (the shared one is never
    written), with its ladder.json limited to those files."""
    lad = Ladder.from_json(json.loads((src / names.LADDER).read_text()))
    files = tuple(f for f in lad.files if f.type in keep)
    for rel in [lad.reference.path, *lad.imatrix.paths, *(f.path for f in files)]:
        (dst / rel).symlink_to(src / rel)
    return Ladder.from_json({**lad.to_json(), "files": [f.to_json() for f in files]})


def stand_in_damage(reference: Path, stock: Path, extra: tuple[str, ...]) -> fit.Damage:
    """Damage ``elements x 4^-bits`` per tensor and type (the stock file's own types and ``extra``)."""
    tensors = tune.catalogue(reference, [stock])
    types = set(tune.read_types(stock).values()) | set(extra)
    errors = {}
    for t in tensors:
        errors[t.name] = {}
        for q in sorted(types):
            if q in layout.QUANT_SIZES and q != "F32" and layout.valid(q, t.row_length):
                blk, size = layout.QUANT_SIZES[q]
                errors[t.name][q] = t.elements * 4.0 ** (-8 * size / blk)
    return fit.Damage(tensors, errors)


def test_fit_file_loads_within_its_budget(smol_workdir: Path, calibration_text: Path, toolchain, tmp_path) -> None:
    ladder = _workdir(smol_workdir, tmp_path, ("Q8_0", "Q4_K_M"))
    q4 = ladder.file("Q4_K_M")
    att = memory.Attention.read(tmp_path / ladder.reference.path)
    # the predicted memory (an upper estimate: the compute estimate is above what llama.cpp reserves) plus 1 MB
    text = f"{(fit.predicted_total(q4, att, CTX, 'f16') + 1_000_000) / 1e6:.2f}MB@1k"
    b = budget.parse(text)
    reference = tmp_path / ladder.reference.path
    m = stand_in_damage(reference, tmp_path / q4.path, ("Q8_0", "Q5_0", "Q4_0"))
    inp = fit.FitInputs(tmp_path, ladder, reference, tmp_path / ladder.imatrix.gguf, calibration_text, toolchain, m)
    opts = fit.FitOptions(budgets=(text,), confirm=False)  # the stand-in damage is not the point here
    out, rec, skipped = fit.run(inp, opts)
    assert not skipped
    info = rec.extra["budgets"][b.label]
    assert info["status"] == "built", info
    assert info["baseline"] == "Q4_K_M"  # Q8_0 does not fit
    assert info["stock_loads"][0]["type"] == "Q4_K_M" and info["stock_loads"][0]["fits"]
    f = out.file(b.type)
    assert f.path == names.fit(ladder.model_name, b.label) and f.companions == (info["layout"],)
    assert f.size <= info["weight_budget"] + (q4.size - info["baseline_memory"]["model"]) + 1024
    mem = f.extra["fit"]["memory"]
    # loaded at the budget's context, within the budget; the largest context was confirmed by a load
    assert mem["ctx"] == CTX and mem["total"] <= b.bytes and mem["kv"] == memory.kv_bytes(att, CTX)
    assert info["max_ctx"] >= CTX and info["max_ctx_memory"]["total"] <= b.bytes
    assert info["max_ctx_memory"]["ctx"] == info["max_ctx"]
    plan = json.loads((tmp_path / info["layout"]).read_text())
    assert plan["memory"] == mem and plan["baseline"] == "Q4_K_M"
    # the same inputs again: nothing is rebuilt
    again, rec2, skipped2 = fit.run(dataclasses.replace(inp, ladder=out), opts)
    assert skipped2 and again.file(b.type).sha256 == f.sha256



def test_fit_damage_is_measured_by_the_tuners_measurer_from_the_ladders_files(
        smol_workdir: Path, calibration_text: Path, toolchain, tmp_path, monkeypatch) -> None:
    """The production path of a fit file's damage (no stand-in): the tuner's measurer, here with Q8_0 as the only
    candidate besides the stock files' own types, measured by ggufbot-tensorerr in one run; each tensor gets the
    errors of those types, Q8_0's below the 4-bit file's, cached for the next call, and a scale to expected KLD
    fitted on the stock files' calibration KLD."""
    from converters.ladder import tensorerr

    ladder = _workdir(smol_workdir, tmp_path, ("Q8_0", "Q4_K_M"))
    runs: list[int] = []
    real = tensorerr.quantize_native

    def counting(*a, **kw):
        n, pairs = real(*a, **kw)
        runs.append(pairs)
        return n, pairs

    monkeypatch.setattr(tensorerr, "quantize_native", counting)
    reference = tmp_path / ladder.reference.path
    inp = fit.FitInputs(tmp_path, ladder, reference, tmp_path / ladder.imatrix.gguf, calibration_text, toolchain)
    m = fit._measurements(inp, fit.FitOptions(budgets=(), candidates=("Q8_0",), kld_scales=True), ladder)
    q4_types = tune.read_types(tmp_path / ladder.file("Q4_K_M").path)
    q8_types = tune.read_types(tmp_path / ladder.file("Q8_0").path)
    # every pair in one run of the measuring program
    assert len(runs) == 1 and runs[0] >= len(q4_types) // 2
    names_ = {t.name for t in m.tensors}
    for t in m.tensors:  # besides the candidates, a tensor is measured only in the types the stock files hold it in
        assert set(m.errors[t.name]) <= {"Q8_0", q4_types.get(t.name), q8_types.get(t.name)}, (t.name, m.errors[t.name])
    assert "token_embd.weight" in names_ and any(n.startswith("blk.0.") for n in names_)
    lower = 0
    for t in m.tensors:
        errs = m.errors[t.name]
        assert all(e is None or (e >= 0 and e == e) for e in errs.values()), (t.name, errs)
        q8, q4 = q8_types.get(t.name), q4_types.get(t.name)
        if q8 in errs and q4 in errs and q8 != q4:
            assert errs[q8] < errs[q4], (t.name, q8, q4, errs)
            lower += 1
    assert lower >= len(m.tensors) // 2  # most tensors differ between the two files
    # scaled to expected KLD per tensor kind and depth, fitted on the two files scored on the calibration text
    assert set(m.scales) == names_ and all(v > 0 for v in m.scales.values())
    assert m.damage()["token_embd.weight"] == {q: e * m.scales["token_embd.weight"]
                                               for q, e in m.errors["token_embd.weight"].items()}
    # the errors were cached where the tuner keeps them: a second call quantizes and reads nothing new
    again = fit._measurements(inp, fit.FitOptions(budgets=(), candidates=("Q8_0",), kld_scales=False), ladder)
    assert again.scales == {}
    assert again.errors == m.errors and runs[1:] == [0]
