"""Evaluation of a real SmolLM2 ladder with llama.cpp, the gate on a damaged quant, and the BF16-vs-source check.

One evaluation per session (module fixture) over the shared SmolLM2 work dir, restricted to Q8_0 / Q4_K_M /
Q2_K and a few chunks, keeps this lean; the damaged quant is measured against the same base logits.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from converters.ladder import evaluate
from converters.ladder.evaluate import inputs
from converters.llama import verify
from converters.core import report as rep
from converters.core.errors import DiskSpaceError, InputError
from converters.core.hooks import PROGRESS, Recorder
from converters.core.report import FAILED, PASSED, FileResult
from converters.core.workdir import WorkDir
from tests.ggufedit import damage_tensor, set_number

pytestmark = [pytest.mark.slow, pytest.mark.llama]

TYPES = ("Q8_0", "Q4_K_M", "Q2_K")
CHUNKS = 4
CTX = 512


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def ladder_dir(tmp_path_factory, smol_workdir: Path) -> Path:
    """The shared SmolLM2 work dir, with its ladder cut to Q8_0 / Q4_K_M / Q2_K (files hard-linked)."""
    wd = tmp_path_factory.mktemp("eval-ladder")
    ladder = json.loads((smol_workdir / "ladder.json").read_text())
    ladder["files"] = [f for f in ladder["files"] if f["type"] in TYPES]
    assert [f["type"] for f in ladder["files"]] == list(TYPES)
    for rel in [ladder["reference"]["path"]] + [p for f in ladder["files"] for p in f["parts"]]:
        _link(smol_workdir / rel, wd / rel)
    (wd / "ladder.json").write_text(json.dumps(ladder, indent=2))
    return wd


@pytest.fixture(scope="module")
def evaluated(ladder_dir: Path, eval_text: Path, calibration_text: Path, toolchain, tmp_path_factory):
    keep = tmp_path_factory.mktemp("base-logits") / "base.kld"
    hooks = Recorder()
    options = evaluate.EvalOptions(eval_text=eval_text, calibration_text=calibration_text, chunks=CHUNKS, ctx=CTX,
                                   threads=2, keep_base_logits=keep)
    report = evaluate.run(ladder_dir, options, toolchain=toolchain, hooks=hooks)
    events = [(e.text, e.done, e.total) for e in hooks.events if e.stage == "evaluate" and e.kind == PROGRESS]
    return report, keep, events


def test_figures_rise_from_q8_0_to_q2_k_with_errors(evaluated):
    report, _, _ = evaluated
    files = {f.type: f for f in report.files}
    assert list(files) == list(TYPES)
    for f in report.files:
        s = f.stats
        assert s is not None, f.error
        assert s.non_finite() == []
        assert s.kld_mean > 0 and 0 < s.kld_mean_err < s.kld_mean
        assert 0 < s.same_top_p < 1 and 0 < s.same_top_p_err < 0.05
        assert s.ppl > 1 and s.ppl_err > 0 and s.ppl_ratio_err > 0
        assert s.kld_median <= s.kld_p99 <= s.kld_p999 <= s.kld_max
        assert s.chunks == CHUNKS
    q8, q4, q2 = (files[t].stats for t in TYPES)
    assert q8.kld_mean < q4.kld_mean < q2.kld_mean
    assert q8.same_top_p > q4.same_top_p > q2.same_top_p
    assert q8.ppl_ratio < q2.ppl_ratio


def test_report_is_complete_and_everything_passes(evaluated, ladder_dir: Path, eval_text: Path):
    report, _, events = evaluated
    assert report.publishable, report.reasons
    for name in ("bf16_vs_source", "tokenizer", "chat_template", "special_tokens", "end_of_reply"):
        assert report.checks[name].status == PASSED, (name, report.checks[name].detail)
    cmp_ = report.checks["bf16_vs_source"].data
    assert cmp_["top1_agreement"] >= 0.95 and cmp_["kld_mean"] < 0.02 and cmp_["tokens"] == 2 * 255
    for f in report.files:
        assert f.status == PASSED, (f.type, f.reasons)
        assert f.checks["metadata"].passed and f.checks["generation"].passed
    on_disk = json.loads((ladder_dir / "report.json").read_text())
    assert on_disk["schema_version"] == rep.SCHEMA_VERSION
    assert on_disk["publishable"] is True
    ev = on_disk["texts"]["eval"]
    assert ev["name"] == eval_text.name and ev["chunks"] == CHUNKS and ev["tokens_scored"] == CHUNKS * 255
    assert ev["tokens"] > 100_000 and len(ev["sha256"]) == 64
    assert on_disk["texts"]["calibration"]["sha256"] != ev["sha256"]
    assert on_disk["tools"]["llama.cpp"] and on_disk["tools"]["transformers"]
    assert on_disk["source"]["repo"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "path" not in on_disk["source"]  # no local path in a published file
    assert on_disk["reference"]["ppl"] > 1 and on_disk["reference"]["ppl_err"] > 0
    for step in ("base_logits", "source_comparison", "kld", "checks", "total"):
        assert on_disk["seconds"][step] > 0
    for f in on_disk["files"]:
        for k in ("kld_mean", "kld_mean_err", "same_top_p", "same_top_p_err", "ppl", "ppl_ratio"):
            assert isinstance(f[k], float) and math.isfinite(f[k])
    png = ladder_dir / on_disk["chart"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the base-logits file is gone from the work dir (kept for these tests elsewhere)
    assert not list(ladder_dir.rglob("*.kld"))
    assert [e[0] for e in events][:2] == ["base logits", "bf16 vs source"] and events[-1][0] == "done"
    # a second run with the same inputs is free
    again = evaluate.run(ladder_dir, evaluate.EvalOptions(eval_text=eval_text, chunks=CHUNKS, ctx=CTX))
    assert again.to_json() == WorkDir(ladder_dir).report().to_json()


def test_damaged_quant_fails_the_gate(evaluated, ladder_dir: Path, toolchain, tmp_path):
    report, base, _ = evaluated
    q8 = ladder_dir / report.file("Q8_0").path
    damaged = damage_tensor(q8, tmp_path / "damaged-Q8_0.gguf", "blk.3.ffn_down.weight")
    stats, _ = evaluate.run_kld(toolchain, damaged, base, ctx=CTX, threads=2)
    bad = FileResult(type="Q8_0", path=damaged.name, size=damaged.stat().st_size, bpw=None, bpw_nominal=8.5,
                     stats=stats)
    others = [f for f in report.files if f.type != "Q8_0"]
    reasons = evaluate.gate([bad] + others)
    assert reasons["Q8_0"], "a zeroed tensor must fail the gate"
    text = " ".join(reasons["Q8_0"])
    assert "far above the ladder's curve" in text
    assert reasons["Q4_K_M"] == [] and reasons["Q2_K"] == []
    assert stats.kld_mean > 5 * report.file("Q8_0").stats.kld_mean


def test_bf16_with_wrong_rope_fails_the_source_comparison(ladder_dir: Path, eval_text: Path, smollm2: Path,
                                                           toolchain, tmp_path):
    ladder = json.loads((ladder_dir / "ladder.json").read_text())
    ref = ladder_dir / ladder["reference"]["path"]
    wrong = set_number(ref, tmp_path / "wrong-rope.gguf", "llama.rope.freq_base", 10000.0)
    facts = verify.GgufFacts.read(wrong)
    base = tmp_path / "wrong.kld"
    evaluate.run_base(toolchain, wrong, eval_text, base, ctx=CTX, chunks=1, threads=2)
    spec = evaluate.CompareSpec(chunks=1, add_bos=facts.add_bos, bos_id=facts.bos_id,
                                parameters=ladder["source"]["parameters"], threads=2)
    check = evaluate.compare_with_source(smollm2, evaluate.BaseLogits.open(base), spec)
    assert check.status == FAILED
    assert "disagree" in check.detail and "top-1 agreement" in check.detail
    assert check.data["kld_mean"] > 0.02


def test_a_model_larger_than_memory_is_compared_with_its_weights_on_disk(evaluated, ladder_dir: Path, smollm2: Path,
                                                                          tmp_path):
    """A memory budget below the model's size: accelerate keeps part of the weights on disk, and the comparison
    still runs (and agrees) instead of being skipped."""
    _, base, _ = evaluated
    facts = verify.GgufFacts.read(ladder_dir / WorkDir(ladder_dir).ladder().reference.path)
    offload = tmp_path / "offload"
    spec = evaluate.CompareSpec(chunks=1, add_bos=facts.add_bos, bos_id=facts.bos_id, parameters=134_515_008,
                                max_memory=200_000_000, offload_dir=offload, threads=2)
    assert spec.offload(__import__("torch").float32, smollm2) is not None  # 538 MB of float32 weights > 200 MB
    check = evaluate.compare_with_source(smollm2, evaluate.BaseLogits.open(base), spec)
    assert check.status == PASSED, check.detail
    assert check.data["offloaded"] is True and "weights partly on disk" in check.detail
    assert check.data["top1_agreement"] >= 0.95 and check.data["tokens"] == 255
    assert not offload.exists()  # the offloaded weights are removed afterwards


def test_a_comparison_that_cannot_run_makes_the_ladder_not_publishable(evaluated, tmp_path):
    _, base, _ = evaluated
    broken = tmp_path / "broken-checkpoint"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    spec = evaluate.CompareSpec(chunks=1, add_bos=False, bos_id=None, parameters=134_515_008)
    check = evaluate.compare_with_source(broken, evaluate.BaseLogits.open(base), spec)
    assert check.status == "skipped" and check.detail.startswith("not checked: transformers cannot load")
    ok, why = evaluate.publishable({"bf16_vs_source": check, "tokenizer": rep.Check.ok("same ids")})
    assert not ok and "not checked against the source model" in why[0]


def test_refuses_the_calibration_text(ladder_dir: Path, calibration_text: Path, tmp_path):
    with pytest.raises(InputError, match="calibration"):
        evaluate.run(ladder_dir, evaluate.EvalOptions(eval_text=calibration_text, calibration_text=calibration_text))
    copy = tmp_path / "same-content.txt"
    shutil.copyfile(calibration_text, copy)
    with pytest.raises(InputError, match="same content as the calibration text"):
        evaluate.run(ladder_dir, evaluate.EvalOptions(eval_text=copy, calibration_text=calibration_text))
    # the ladder's record of its calibration text is enough to recognise it
    with pytest.raises(InputError, match="same content as the calibration text"):
        evaluate.run(ladder_dir, evaluate.EvalOptions(eval_text=copy))


def test_base_logits_are_sized_against_free_disk_before_running(ladder_dir: Path, eval_text: Path, toolchain,
                                                                monkeypatch):
    usage = shutil.disk_usage(ladder_dir)
    monkeypatch.setattr(inputs.shutil, "disk_usage", lambda p: usage._replace(free=50 << 20))
    with pytest.raises(DiskSpaceError) as e:
        evaluate.run(ladder_dir, evaluate.EvalOptions(eval_text=eval_text, chunks=CHUNKS + 1, ctx=CTX),
                     toolchain=toolchain)
    assert e.value.needed >= evaluate.base_logits_bytes(49152, CTX, CHUNKS + 1) and e.value.free == 50 << 20
    assert not list(ladder_dir.rglob("*.kld"))
