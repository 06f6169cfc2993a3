"""The file-by-file, sequential evaluation on the shared SmolLM2 work dir (ctx 256, at most 12 chunks).

One evaluation measures Q8_0 and is dropped (a killed job); a second one resumes: the base logits and Q8_0 come
from their records, neither computed again, Q8_0 with the same verdict, and the rest are measured. The batches' views agree with one run over
the same chunks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from converters.core.report import PASSED, mean_err
from converters.core.workdir import WorkDir
from converters.ladder import evaluate
from converters.ladder.evaluate import checks as checks_mod
from converters.ladder.evaluate import evaluation
from converters.ladder.evaluate import sequential as seq

pytestmark = [pytest.mark.slow, pytest.mark.llama]

TYPES = ("Q8_0", "Q4_K_M", "Q2_K")
CTX = 256
CAP = 12
MIN = 4


@pytest.fixture(scope="module")
def seq_dir(tmp_path_factory, smol_workdir: Path) -> Path:
    """The shared SmolLM2 work dir cut to Q8_0 / Q4_K_M / Q2_K (files hard-linked)."""
    wd = tmp_path_factory.mktemp("eval-seq")
    ladder = json.loads((smol_workdir / "ladder.json").read_text())
    ladder["files"] = [f for f in ladder["files"] if f["type"] in TYPES]
    for rel in [ladder["reference"]["path"]] + [p for f in ladder["files"] for p in f["parts"]]:
        try:
            os.link(smol_workdir / rel, wd / rel)
        except OSError:
            shutil.copy2(smol_workdir / rel, wd / rel)
    (wd / "ladder.json").write_text(json.dumps(ladder, indent=2))
    return wd


def test_file_by_file_evaluation_resumes_from_its_records(seq_dir: Path, eval_text: Path, calibration_text: Path,
                                                          toolchain, monkeypatch, tmp_path: Path):
    keep = tmp_path / "base.kld"
    opts = evaluate.EvalOptions(eval_text=eval_text, calibration_text=calibration_text, chunks=CAP, ctx=CTX,
                                threads=2, hf_compare_chunks=1, precision=0.05, min_chunks=MIN,
                                keep_base_logits=keep)
    ladder = WorkDir(seq_dir).ladder()
    ev = evaluate.LadderEvaluation.open(seq_dir, opts, toolchain=toolchain)
    first = ev.measure(ladder.files[0])
    s = first.stats
    assert s is not None and first.status == PASSED, (first.error, first.reasons)
    assert MIN <= s.chunks <= CAP and len(s.chunk_kld) == s.chunks
    assert first.stop in (seq.PRECISION_REACHED, seq.VERDICT_SETTLED, seq.CAP)
    m, e = mean_err(s.chunk_kld)
    assert s.kld_mean == pytest.approx(m, abs=2e-6) and s.kld_mean_err == pytest.approx(e)
    if first.stop == seq.PRECISION_REACHED:
        assert e <= 0.05 * m
    partial = json.loads((seq_dir / "report.json").read_text())
    # measured first, Q8_0 is held (no file below it measured yet): not final, so still pending, its figures under held
    assert partial["files"] == [] and partial["pending"] == ["Q8_0", "Q4_K_M", "Q2_K"]
    assert [h["type"] for h in partial["held"]] == ["Q8_0"] and ev.settled() == []
    assert partial["held"][0]["chunks"] == s.chunks and partial["held"][0]["stop"] == first.stop
    assert (seq_dir / "records" / "evaluate.Q8_0.json").is_file()
    ev.close()  # the job is killed here: its base logits stay, with their record, for the resumed run
    stored = seq_dir / "base-logits.kld"
    assert [p.name for p in seq_dir.rglob("*.kld")] == [stored.name]
    assert (seq_dir / "records" / f"{evaluate.BASE_STAGE}.json").is_file()
    stored_stat = stored.stat()

    # the resumed job: the reference's checks answer as before (what they cost is not what is tested here)
    monkeypatch.setattr(checks_mod, "compare", lambda *a: ev.checks["bf16_vs_source"])
    monkeypatch.setattr(checks_mod, "reference_checks",
                        lambda *a: ({k: v for k, v in ev.checks.items() if k != "bf16_vs_source"}, ev._prompt))
    scored: list[str] = []
    real = seq.score

    def counting(tc, model, *a, **kw):
        scored.append(model.name)
        return real(tc, model, *a, **kw)

    monkeypatch.setattr(evaluation.sequential, "score", counting)
    monkeypatch.setattr(evaluation, "run_base", lambda *a, **kw: pytest.fail("the base logits were computed again"))
    report = evaluate.run(seq_dir, opts, toolchain=toolchain)
    assert scored == [Path(f.path).name for f in ladder.files[1:]]  # Q8_0 was not scored again
    # the kept base logits were used (then moved to keep_base_logits: the evaluation finished) and the record went
    assert keep.stat().st_ino == stored_stat.st_ino and keep.stat().st_mtime_ns == stored_stat.st_mtime_ns
    assert not stored.exists() and not (seq_dir / "records" / f"{evaluate.BASE_STAGE}.json").exists()
    assert report.reference["ppl"] == ev.ref_block["ppl"] and report.seconds["base_logits"] == 0.0
    again = report.file("Q8_0")
    assert again.to_json() == first.to_json()
    assert report.pending == [] and [f.type for f in report.files] == list(TYPES)
    for f in report.files:
        assert f.status == PASSED, (f.type, f.reasons)
        assert f.stats is not None and MIN <= f.stats.chunks <= CAP and f.stop is not None
    assert report.settings["sequential"]["on"] and report.settings["chunks"] == CAP

    # the first batch (the floor's chunks) read through its view is what one run over those chunks gives
    q2 = report.file("Q2_K")
    base = evaluate.BaseLogits.open(keep)
    view = base.write_view(tmp_path / "view.kld", 0, MIN)
    first_batch, _ = evaluate.run_kld(toolchain, seq_dir / q2.path, view.path, ctx=CTX, threads=2)
    assert first_batch.chunk_kld == pytest.approx(q2.stats.chunk_kld[:MIN], abs=MIN * 1e-5)
    # and the batches together give what one run over all its chunks gives, within what llama.cpp's own figures
    # move when more chunks share a run (its sequences share one KV cache: with 7 chunks at ctx 256 in one run every
    # chunk's KLD of a Q2_K moved by up to 0.6 %, in another run 1.6 %, against 1e-5 for runs of 2, 4 or 6 chunks)
    view = base.write_view(tmp_path / "view.kld", 0, q2.stats.chunks)
    whole, _ = evaluate.run_kld(toolchain, seq_dir / q2.path, view.path, ctx=CTX, threads=2)
    assert whole.kld_mean == pytest.approx(q2.stats.kld_mean, rel=1e-2)
    assert whole.chunk_kld == pytest.approx(q2.stats.chunk_kld, rel=3e-2)
    assert whole.same_top_p == pytest.approx(q2.stats.same_top_p, abs=1e-2)
    assert whole.kld_max == pytest.approx(q2.stats.kld_max, rel=5e-2)
