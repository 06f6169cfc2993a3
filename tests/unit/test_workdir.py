"""The typed work directory: file names, records that round-trip byte for byte and keep unknown fields,
schema errors, and path safety."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from converters.core.errors import InputError
from converters.core.records import write_json_atomic
from converters.core.report import Report
from converters.core.workdir import (CHART_FILE, LADDER_FILE, PLAN_FILE, REPORT_FILE, VARIANT_FILE, Ladder, LadderFile,
                                VariantInfo, WorkDir)

# ladder.json exactly as converters/ladder/pipeline.py has always written it (docs/ARCHITECTURE.md)
LADDER: dict[str, Any] = {
    "schema_version": 1,
    "model_name": "M",
    "source": {"repo": "acme/M", "revision": "a" * 40, "path": "/ckpt", "architecture": "LlamaForCausalLM",
               "parameters": 1000, "has_chat_template": True, "license": None},
    "toolchain": {"version": "llama.cpp b1", "commit": None, "cuda": False},
    "reference": {"type": "BF16", "path": "M-BF16.gguf", "size": 10, "sha256": "0" * 64},
    "imatrix": {"gguf": "M-imatrix.gguf", "dat": "M-imatrix.dat",
                "calibration": {"name": "cal.txt", "source": "hf://datasets/a/b/cal.txt", "sha256": "1" * 64,
                                "bytes": 2000, "chunks": 4, "ctx": 512}},
    "files": [
        {"type": "Q8_0", "bpw_nominal": 8.5, "needs_imatrix": False, "description": "d", "path": "M-Q8_0/M-Q8_0-00001-of-00002.gguf",
         "parts": ["M-Q8_0/M-Q8_0-00001-of-00002.gguf", "M-Q8_0/M-Q8_0-00002-of-00002.gguf"], "size": 9,
         "sha256": "2" * 64, "part_sha256": ["2" * 64, "3" * 64], "bpw": 0.072, "seconds": 1.5},
        {"type": "Q4_K_M", "bpw_nominal": 4.89, "needs_imatrix": False, "description": "e", "path": "M-Q4_K_M.gguf",
         "parts": ["M-Q4_K_M.gguf"], "size": 5, "sha256": "4" * 64, "part_sha256": ["4" * 64], "bpw": None,
         "seconds": 0.5},
    ],
    "seconds": {"convert": 1.0, "calibrate": 2.0, "quantize": 3.0},
}

VARIANT: dict[str, Any] = {
    "schema_version": 1,
    "recipe": {"name": "prune-1", "description": "d", "summary": "s", "prune": {"method": "depth"}, "distill": None},
    "teacher": {"path": "/t", "model_name": "M", "repo": None, "parameters": 10, "bytes": 20, "layers": 2,
                "intermediate_size": 8},
    "variant": {"path": "/v", "parameters": 6, "bytes": 12, "layers": 1, "intermediate_size": 8},
    "prune": {"method": "depth", "importance": "block_influence", "layers_before": 2, "layers_after": 1,
              "removed_layers": [1], "kept_layers": [0], "scores": [0.5, 0.25], "intermediate_before": 8,
              "intermediate_after": 8, "parameters_before": 10, "parameters_after": 6, "bytes_before": 20,
              "bytes_after": 12, "seconds": 1.0, "calibration": {"name": "cal.txt", "samples": 2, "seq_len": 16},
              "first_changed_layer": 1},
    "distill": None,
    "calibration": {"name": "cal.txt", "size": 100, "sha256": "5" * 64},
    "model_name": "M-prune-1",
    "evaluation": {"against": "teacher BF16 logits", "chunks": 2, "ctx": 128, "text": "wiki.test.raw",
                   "reference_kld_mean": 0.3, "reference_kld_mean_err": 0.01, "reference_same_top_p": 0.8,
                   "files": {"Q8_0": {"kld_mean": 0.31, "kld_mean_err": 0.01, "same_top_p": 0.79, "size": 9,
                                      "status": "passed"}},
                   "teacher_files": {"Q8_0": {"kld_mean": 0.001, "kld_mean_err": 0.0001, "same_top_p": 0.99,
                                              "same_top_p_err": 0.001, "size": 15}},
                   "publishable": True},
}


def _with(base: dict[str, Any], *path_and_value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with one value set at a key path (the last argument is the value)."""
    d = copy.deepcopy(base)
    *keys, last, value = path_and_value
    target: Any = d
    for k in keys:
        target = target[k]
    target[last] = value
    return d


@pytest.mark.parametrize("record, wire", [
    (Ladder, LADDER),
    (Ladder, _with(LADDER, "imatrix", None)),
    (Ladder, _with(LADDER, "future_field", {"x": [1, 2]})),  # unknown top-level field
    (Ladder, _with(LADDER, "files", 0, "new_stat", 7)),  # unknown field of a nested record
    (Ladder, _with(LADDER, "imatrix", "calibration", "lines", 12)),
    (VariantInfo, VARIANT),
    (VariantInfo, {k: v for k, v in VARIANT.items() if k not in ("model_name", "evaluation")}),  # before evaluation
    (VariantInfo, _with(VARIANT, "teacher", "gpu", "none")),
])
def test_round_trip_is_identical_and_keeps_unknown_fields(record: type, wire: dict[str, Any]) -> None:
    parsed = record.from_json(wire)
    out = parsed.to_json()
    assert out == wire
    assert list(out) == list(wire)  # the same key order, nested too
    assert json.dumps(out) == json.dumps(wire)
    assert record.from_json(out) == parsed


def test_typed_access() -> None:
    ladder = Ladder.from_json(LADDER)
    q8 = ladder.file("Q8_0")
    assert isinstance(q8, LadderFile) and q8.split and q8.all_parts == tuple(LADDER["files"][0]["parts"])
    assert not ladder.file("Q4_K_M").split and ladder.file("Q4_K_M").bpw is None
    assert ladder.types == ("Q8_0", "Q4_K_M")
    assert ladder.source.author == "acme" and ladder.toolchain.cuda is False
    assert ladder.imatrix is not None and ladder.imatrix.paths == ("M-imatrix.gguf", "M-imatrix.dat")
    assert ladder.imatrix.calibration is not None and ladder.imatrix.calibration.chunks == 4
    with pytest.raises(KeyError):
        ladder.file("IQ1_S")
    info = VariantInfo.from_json(VARIANT)
    assert info.teacher_model == "M" and info.recipe.name == "prune-1" and info.distill is None
    assert info.prune is not None and info.prune.removed_layers == (1,) and info.prune.calibration.samples == 2
    assert info.evaluation is not None and info.evaluation.teacher_files["Q8_0"].same_top_p_err == 0.001


@pytest.mark.parametrize("content, match", [
    (None, "ladder.json not found"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    (json.dumps(_with(LADDER, "schema_version", 2)), "schema_version 2"),
    (json.dumps({k: v for k, v in LADDER.items() if k != "schema_version"}), "schema_version None"),
    (json.dumps({k: v for k, v in LADDER.items() if k != "files"}), "missing field"),
    (json.dumps(_with(LADDER, "files", "Q8_0")), "must be a list"),
    (json.dumps(_with(LADDER, "source", [1])), "must be an object"),
    (json.dumps(_with(LADDER, "files", 0, "parts", 3)), "must be a list"),
])
def test_ladder_errors(tmp_path: Path, content: str | None, match: str) -> None:
    if content is not None:
        (tmp_path / LADDER_FILE).write_text(content)
    assert WorkDir(tmp_path).has_ladder() is (content is not None)
    with pytest.raises(InputError, match=match):
        WorkDir(tmp_path).ladder()


def test_write_and_read_back(tmp_path: Path) -> None:
    wd = WorkDir(tmp_path)
    path = wd.write_ladder(Ladder.from_json(LADDER))
    expected = tmp_path / "expected.json"
    write_json_atomic(expected, LADDER)  # what the pipeline wrote before the typed record
    assert path == tmp_path / LADDER_FILE and path.read_bytes() == expected.read_bytes()
    assert wd.ladder() == Ladder.from_json(LADDER)
    assert wd.variant() is None
    wd.write_variant(VariantInfo.from_json(VARIANT))
    assert wd.variant() == VariantInfo.from_json(VARIANT)
    assert json.loads(wd.variant_path.read_text()) == VARIANT
    assert not wd.has_report()
    with pytest.raises(InputError, match="report.json not found"):
        wd.report()
    report = Report(model_name="M", source={}, toolchain={}, tools={}, texts={}, settings={}, reference={},
                    checks={}, files=[], publishable=True, reasons=[], seconds={}, created_at="2024-01-01T00:00:00Z")
    wd.write_report(report)
    assert wd.has_report() and wd.report().to_json() == report.to_json()


def test_file_names(tmp_path: Path) -> None:
    wd = WorkDir(tmp_path)
    assert (wd.plan_path, wd.ladder_path, wd.report_path, wd.chart_path, wd.variant_path) == tuple(
        tmp_path / n for n in (PLAN_FILE, LADDER_FILE, REPORT_FILE, CHART_FILE, VARIANT_FILE))
    assert WorkDir(wd) == wd and WorkDir(str(tmp_path)).path == tmp_path
    assert wd.variant_dir("prune-25pct-kd") == WorkDir(tmp_path / "variants" / "prune-25pct-kd")


@pytest.mark.parametrize("rel, ok", [
    ("M-Q4_K_M.gguf", True),
    ("M-Q8_0/M-Q8_0-00001-of-00002.gguf", True),
    ("records/convert.json", True),
    ("../outside.gguf", False),
    ("a/../../outside.gguf", False),
    ("/etc/passwd", False),
    ("a\\b.gguf", False),
    ("", False),
])
def test_file_refuses_paths_outside(tmp_path: Path, rel: str, ok: bool) -> None:
    wd = WorkDir(tmp_path)
    if ok:
        assert wd.file(rel) == tmp_path / rel
    else:
        with pytest.raises(InputError):
            wd.file(rel)


@pytest.mark.parametrize("name", ["../x", "a/b"])
def test_variant_dir_refuses_paths(tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError):
        WorkDir(tmp_path).variant_dir(name)
