"""``ggufbot evaluate DIR`` notices any change of any file: a quant changed in place (one tensor zeroed, same
size, same inode) is measured again, never answered from the old record; report.json names the content it
measured."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bot.cli import main
from converters.core import records
from converters.core.workdir import WorkDir

pytestmark = [pytest.mark.slow, pytest.mark.llama]

TYPES = ("Q8_0", "Q4_K_M")


def _zero_tensor_in_place(path: Path, name: str) -> None:
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    [t] = [t for t in reader.tensors if t.name == name]
    t.data[...] = 0
    reader.data.flush()
    del reader


@pytest.fixture
def ladder_dir(tmp_path: Path, smol_workdir: Path) -> Path:
    """The shared SmolLM2 ladder cut to Q8_0 / Q4_K_M; the reference and Q8_0 hard-linked, Q4_K_M copied (it is
    edited in place)."""
    wd = tmp_path / "wd"
    wd.mkdir()
    ladder = json.loads((smol_workdir / "ladder.json").read_text())
    ladder["files"] = [f for f in ladder["files"] if f["type"] in TYPES]
    for rel in [ladder["reference"]["path"]] + [p for f in ladder["files"] for p in f["parts"]]:
        if "Q4_K_M" in rel:
            shutil.copy2(smol_workdir / rel, wd / rel)
        else:
            os.link(smol_workdir / rel, wd / rel)
    (wd / "ladder.json").write_text(json.dumps(ladder, indent=2))
    return wd


def _evaluate(wd: Path, eval_text: Path, capsys) -> dict:
    code = main(["evaluate", str(wd), "--eval-text", str(eval_text), "--eval-chunks", "2", "--ctx", "256", "--threads",
                 "2", "--json"])
    out = capsys.readouterr().out
    assert code in (0, 2), out
    return json.loads(out[out.index("{"):])


def test_a_quant_changed_in_place_is_measured_again(ladder_dir: Path, eval_text: Path, capsys) -> None:
    q4 = ladder_dir / "SmolLM2-135M-Instruct-Q4_K_M.gguf"
    first = _evaluate(ladder_dir, eval_text, capsys)
    before = {f["type"]: f for f in first["files"]}
    assert before["Q4_K_M"]["status"] == "passed"
    assert before["Q4_K_M"]["sha256"] == records.sha256_file(q4)
    assert before["Q4_K_M"]["parts"] == [{"path": q4.name, "size": q4.stat().st_size,
                                          "sha256": records.sha256_file(q4)}]
    assert first["file_hashes"][q4.name]["sha256"] == records.sha256_file(q4)
    assert first["reference"]["sha256"] == records.sha256_file(ladder_dir / first["reference"]["path"])

    size, ino = q4.stat().st_size, q4.stat().st_ino
    _zero_tensor_in_place(q4, "blk.3.ffn_down.weight")
    assert (q4.stat().st_size, q4.stat().st_ino) == (size, ino)  # same size, same file

    second = _evaluate(ladder_dir, eval_text, capsys)
    after = {f["type"]: f for f in second["files"]}
    assert after["Q4_K_M"]["sha256"] == records.sha256_file(q4) != before["Q4_K_M"]["sha256"]
    assert after["Q4_K_M"]["kld_mean"] > 5 * before["Q4_K_M"]["kld_mean"], "the changed file was not re-measured"
    assert WorkDir(ladder_dir).report().file("Q4_K_M").sha256 == after["Q4_K_M"]["sha256"]

    # unchanged files: the next run is answered from its record (content hashes cached by size+mtime+inode)
    rec = records.load(ladder_dir, "evaluate")
    third = _evaluate(ladder_dir, eval_text, capsys)
    assert third["created_at"] == second["created_at"]
    assert records.load(ladder_dir, "evaluate").finished_at == rec.finished_at
