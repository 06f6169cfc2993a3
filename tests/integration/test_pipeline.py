"""The pipeline stage ``ladder`` on SmolLM2 (converters/ladder/flow.py): a 3-type ladder made and measured as tasks
on the session's converted work dir (its reference, imatrix and two of its quants are reused through their
records; Q3_K_S is made), then a ``ggufbot convert`` SIGKILLed during the sequential evaluation and resumed.

One uninterrupted run (module scope, in-process) is what both tests compare with: the files announced through
FILE_READY, each only once report.json lists it with its final verdict (on this three-type ladder every file waits
for the ladder's curve around it, so all three are settled by the last measurement), and the final ladder.json and
report.json; the killed-and-resumed run (killed while a file is held) ends with the same files, hashes and
verdicts, and measures nothing twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from converters.core import records
from converters.core.hooks import PROGRESS, Recorder
from converters.core.workdir import WorkDir
from converters.ladder import flow
from converters.ladder.job import FILE_READY, FileReady, JobContext, run_stages
from tests.conftest import SMOL_CAL_CHUNKS, SMOL_CAL_CTX
from tests.procs import die_with_the_tests, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.llama]

REPO_ROOT = Path(__file__).resolve().parents[2]
LADDER = "Q8_0,Q4_K_M,Q3_K_S"  # Q8_0 and Q4_K_M are the session ladder's; Q3_K_S is made here
EVAL_CHUNKS = 2


def linked_copy(src: Path, dst: Path) -> Path:
    """The session's work dir, its large files hard-linked (the stages replace files, never write into them)."""
    shutil.copytree(src, dst, copy_function=os.link)
    for stale in ("report.json", "size-vs-kld.png"):
        (dst / stale).unlink(missing_ok=True)
    return dst


def stages(eval_text: Path, calibration_text: Path):
    from converters.ladder.job import EvalSettings, ladder_stages
    from converters.ladder.pipeline import LadderOptions
    from converters.llama.calibrate import TextFile

    options = LadderOptions(ladder=LADDER, calibration=TextFile.of(calibration_text),
                            calibration_chunks=SMOL_CAL_CHUNKS, ctx=SMOL_CAL_CTX)
    return ladder_stages(options, EvalSettings(TextFile.of(eval_text), chunks=EVAL_CHUNKS))


class Run:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.hooks = Recorder()
        self.ready: list[tuple[FileReady, dict]] = []

    def announce(self, f: FileReady) -> None:
        # what report.json says at the moment of the announcement
        report = json.loads((self.workdir / "report.json").read_text())
        self.ready.append((f, report))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, smol_workdir, smollm2, toolchain, eval_text, calibration_text) -> Run:
    wd = linked_copy(smol_workdir, tmp_path_factory.mktemp("pipeline") / "wd")
    run = Run(wd)
    ctx = JobContext(wd, toolchain, run.hooks, smollm2.name, source_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
                     checkpoint_dir=smollm2)
    ctx.put(FILE_READY, run.announce)
    run_stages(stages(eval_text, calibration_text), ctx)
    return run


def test_the_pipeline_stage_makes_and_measures_in_publish_order_and_announces_measured_files(
        uninterrupted: Run, smol_workdir: Path) -> None:
    run, wd = uninterrupted, uninterrupted.workdir
    planned = [e for e in run.hooks.events if e.kind == "start"]
    assert [e.stage for e in planned] == ["inspect", "convert", "calibrate", "ladder"]
    # measured Q4_K_M first (the publish order), then its curve neighbours Q8_0 and Q3_K_S; Q4_K_M and Q8_0 are held
    # (no curve around them yet) until Q3_K_S is measured, then settled and announced in measuring order, each once
    # report.json has its final verdict
    assert [f.type for f, _ in run.ready] == ["Q4_K_M", "Q8_0", "Q3_K_S"]
    ladder = WorkDir(wd).ladder()
    for f, report in run.ready:
        entry = next(x for x in report["files"] if x["type"] == f.type)
        assert f.type not in report["pending"] and f.passed == (entry["status"] == "passed")
        lf = ladder.file(f.type)
        assert f.paths == tuple(lf.all_parts) and f.sha256 == tuple(lf.part_sha256)
    assert run.ready[0][1]["pending"] == [] and run.ready[0][1]["held"] == []
    # the session's quants were not made again; the new one was made before it was measured
    steps = [e for e in run.hooks.events
             if e.stage == "ladder" and e.kind == PROGRESS and e.data.get("phase") in ("start", "end")]
    order = [(e.data["task"], e.data["phase"]) for e in steps]
    assert order.index(("make Q3_K_S", "end")) < order.index(("measure Q3_K_S", "start"))
    assert order.index(("measure Q4_K_M", "start")) < order.index(("measure Q3_K_S", "start"))  # publish order
    # Q4_K_M and Q8_0 are held when measured ("measured"), and their verdicts come in steps of their own
    ends = {e.data["task"]: e.data["state"] for e in steps if e.data["phase"] == "end"}
    assert ends["measure Q4_K_M"] == ends["measure Q8_0"] == "measured" and ends["measure Q3_K_S"] != "measured"
    settled = [e for e in run.hooks.events if e.stage == "ladder" and e.data.get("phase") == "settled"]
    assert [e.data["file"] for e in settled] == ["Q4_K_M", "Q8_0"]
    assert all(e.data["state"] in ("passed", "failed") for e in settled)
    running, most = 0, 0  # never more CPU-heavy programs at once than the box's units
    for _, phase in order:
        running += 1 if phase == "start" else -1
        most = max(most, running)
    assert most <= flow.CPU_UNITS
    assert steps[-1].done == steps[-1].total == 6
    for t in ("Q8_0", "Q4_K_M"):
        assert ladder.file(t).sha256 == WorkDir(smol_workdir).ladder().file(t).sha256
    # the final ladder.json is the sequential one: every type, in ladder order, hashes of the quantize records
    assert [f.type for f in ladder.files] == ["Q8_0", "Q4_K_M", "Q3_K_S"]
    for f in ladder.files:
        assert records.load(wd, f"quantize-{f.type}").outputs[0].sha256 == f.sha256
    report = WorkDir(wd).report()
    assert report.pending == [] and [f.type for f in report.files] == ["Q8_0", "Q4_K_M", "Q3_K_S"]
    assert all(f.stats is not None and f.stats.chunks == EVAL_CHUNKS for f in report.files)
    assert records.load(wd, "evaluate") is not None
    assert not list(wd.rglob(".partial-*"))


def convert_argv(smollm2: Path, out: Path, calibration: Path, eval_text: Path) -> list[str]:
    return [sys.executable, "-m", "bot.cli", "convert", str(smollm2), "--out", str(out), "--ladder", LADDER,
            "--calibration", str(calibration), "--calibration-chunks", str(SMOL_CAL_CHUNKS), "--ctx", str(SMOL_CAL_CTX),
            "--eval-text", str(eval_text), "--eval-chunks", str(EVAL_CHUNKS)]


def test_sigkill_during_the_sequential_evaluation_then_resume_ends_as_the_uninterrupted_run(
        uninterrupted: Run, smol_workdir, smollm2, calibration_text, eval_text, tmp_path) -> None:
    wd = linked_copy(smol_workdir, tmp_path / "killed")
    report = wd / "report.json"

    def one_measured() -> bool:
        try:
            r = json.loads(report.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return len(r.get("files") or []) + len(r.get("held") or []) >= 1 and bool(r.get("pending"))

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    log = tmp_path / "killed.log"
    with open(log, "w") as err:
        p = subprocess.Popen(convert_argv(smollm2, wd, calibration_text, eval_text), cwd=REPO_ROOT, env=env,
                             stderr=err, text=True, start_new_session=True, preexec_fn=die_with_the_tests)
    try:
        # reference, imatrix and two quants are the session's (skipped); the base logits and a first file take
        # a minute on an idle 2-core box, far more on a shared one
        wait_for(lambda: one_measured() or p.poll() is not None, 900, "a first file measured", log)
        assert p.poll() is None, "the run ended before it could be killed:\n" + log.read_text()[-3000:]
        time.sleep(0.5)  # the next measurement is under way
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(60)
    assert p.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert "[convert] already done" in log.read_text()  # the session's reference was reused, not made again
    partial = json.loads(report.read_text())
    measured = {f["type"]: records.load(wd, rec).finished_at
                for f in partial["files"] + partial["held"]  # a held file too: its record has its first verdict
                if (rec := f"evaluate.{f['type']}") and records.load(wd, rec) is not None}
    assert measured and records.load(wd, "evaluate") is None

    again = subprocess.run(convert_argv(smollm2, wd, calibration_text, eval_text), cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    for t, stamp in measured.items():  # nothing measured before the kill was measured again
        assert records.load(wd, f"evaluate.{t}").finished_at == stamp, t
    want = WorkDir(uninterrupted.workdir)
    got = WorkDir(wd)
    assert [(f.type, f.sha256, f.part_sha256) for f in got.ladder().files] == \
           [(f.type, f.sha256, f.part_sha256) for f in want.ladder().files]
    assert [(f.type, f.sha256, f.status, f.reasons, f.stats.chunks) for f in got.report().files] == \
           [(f.type, f.sha256, f.status, f.reasons, f.stats.chunks) for f in want.report().files]
    assert got.report().publishable == want.report().publishable
    assert not list(wd.rglob(".partial-*"))
