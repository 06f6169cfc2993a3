"""A resumed job's evaluation answers from the earlier report only for files it measured with the content on disk:
a tuned or memory-budget file made after the evaluation opens, absent from that report or changed since, is not
given the earlier figures (converters.ladder.evaluate.evaluation)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from converters.core.errors import CheckFailed
from converters.core.report import FileResult, Report
from converters.core.workdir import LadderFile
from converters.ladder.evaluate import evaluation as ev_mod


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _report(files: list[FileResult]) -> Report:
    return Report(model_name="M", source={}, toolchain={}, tools={}, texts={}, settings={}, reference={}, checks={},
                  files=files, publishable=True, reasons=[], seconds={})


def _result(t: str, path: Path) -> FileResult:
    return FileResult(type=t, path=path.name, size=path.stat().st_size, bpw=None, bpw_nominal=None,
                      sha256=_sha(path), parts=[{"path": path.name, "size": path.stat().st_size, "sha256": _sha(path)}])


def test_only_files_measured_as_they_are_on_disk(tmp_path: Path) -> None:
    tuned, fit = tmp_path / "M-Q4_K_M-tuned.gguf", tmp_path / "M-fit-8GB-4k.gguf"
    tuned.write_bytes(b"tuned")
    fit.write_bytes(b"fit")
    done = _report([_result("Q4_K_M-tuned", tuned)])
    assert ev_mod._measured_as_on_disk(done, tmp_path, [])
    assert ev_mod._measured_as_on_disk(done, tmp_path, ["Q4_K_M-tuned"])
    assert not ev_mod._measured_as_on_disk(done, tmp_path, ["Q4_K_M-tuned", "fit-8GB-4k"])  # not in the report
    tuned.write_bytes(b"built again")
    assert not ev_mod._measured_as_on_disk(done, tmp_path, ["Q4_K_M-tuned"])  # changed since it was measured
    tuned.unlink()
    assert not ev_mod._measured_as_on_disk(done, tmp_path, ["Q4_K_M-tuned"])  # not made yet


def test_a_file_the_earlier_report_lacks_or_measured_otherwise_stops_the_job(tmp_path: Path) -> None:
    stock = tmp_path / "M-Q8_0.gguf"
    stock.write_bytes(b"q8")
    ev = ev_mod.LadderEvaluation.__new__(ev_mod.LadderEvaluation)  # as open() leaves it when it takes a report
    ev._done = _report([_result("Q8_0", stock)])
    ev._handed = set()

    class Settling:
        ready: list[FileResult] = []

    ev._settling = Settling()

    def lf(t: str, sha: str) -> LadderFile:
        return LadderFile(type=t, path=f"M-{t}.gguf", size=2, sha256=sha, parts=(f"M-{t}.gguf",), part_sha256=(sha,))

    class Job:
        wd = SimpleNamespace(path=tmp_path)

    ev.job = Job()
    assert ev.measure(lf("Q8_0", _sha(stock))).type == "Q8_0"  # measured before, same content: its figures
    # ladder.json's hash is not the judge: the content on disk is (a file changed in place is measured again by
    # the open, whose record keys on the content)
    assert ev.measure(lf("Q8_0", "1" * 64)).type == "Q8_0"
    with pytest.raises(CheckFailed, match="changed after"):
        ev.measure(lf("fit-8GB-4k", "0" * 64))  # not in the earlier report
    stock.write_bytes(b"q8 made again")
    with pytest.raises(CheckFailed, match="changed after"):
        ev.measure(lf("Q8_0", _sha(stock)))  # another file under the same name since the report
