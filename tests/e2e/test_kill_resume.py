"""SIGKILL during convert, during calibrate, during evaluation and during upload: each restart resumes and the
end is the same publication as an uninterrupted run.

``ggufbot convert ORG/NAME --publish`` as a real process (the bot's job: fetch from the local Hub server, convert,
calibrate, quantize, evaluate, publish), on a tiny SmolLM2 ladder. One uninterrupted reference run (module
scope) is published to its own repo; the kill cases then share one work directory, in order: each case kills a
run during its stage, and the next case's run is the restart that must resume it (finished stages skipped,
the killed one done again). The last restart ends the job, and its repo must hold exactly the reference's files.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from converters.core import records
from tests.bot_fixtures import checkpoint_files
from tests.hub_fixtures import TEST_ORG, default_tokens
from tests.procs import die_with_the_tests

pytestmark = [pytest.mark.slow, pytest.mark.llama]

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE = "smol-labs/SmolLM2-135M-Instruct"
MODEL = "SmolLM2-135M-Instruct"
REF_REPO = f"{TEST_ORG}/reference-GGUF"
KILL_REPO = f"{TEST_ORG}/killed-GGUF"


class Runs:
    def __init__(self, hub, tmp: Path, cal: Path, ev: Path) -> None:
        self.hub, self.tmp, self.cal, self.ev = hub, tmp, cal, ev
        self.workdir = tmp / "killed"
        self.log: list[str] = []

    def argv(self, out: Path, repo: str) -> list[str]:
        return [sys.executable, "-m", "bot.cli", "convert", SOURCE, "--out", str(out), "--ladder", "Q8_0,Q4_K_M",
                "--calibration", str(self.cal), "--calibration-chunks", "2", "--ctx", "256", "--eval-text",
                str(self.ev), "--eval-chunks", "2", "--jobs", "1", "--publish", "--repo", repo]

    def run(self, out: Path, repo: str) -> str:
        r = subprocess.run(self.argv(out, repo), cwd=REPO_ROOT, env=self.env(), capture_output=True, text=True,
                           timeout=900)
        self.log.append(r.stderr)
        assert r.returncode == 0, r.stderr[-4000:]
        return r.stderr

    def run_and_kill(self, marker: str, delay: float, ready=lambda: True) -> str:
        """Start a run on the shared work dir; SIGKILL it ``delay`` s after the stderr line ``marker`` once
        ``ready()`` holds; return what it printed."""
        p = subprocess.Popen(self.argv(self.workdir, KILL_REPO), cwd=REPO_ROOT, env=self.env(),
                             stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=die_with_the_tests)
        seen: list[str] = []
        try:
            assert p.stderr is not None
            for line in p.stderr:
                seen.append(line)
                if line.startswith(marker):
                    end = time.monotonic() + 120
                    while not ready() and time.monotonic() < end and p.poll() is None:
                        time.sleep(0.05)
                    time.sleep(delay)
                    break
            assert p.poll() is None, "the run ended before it could be killed:\n" + "".join(seen)
            os.killpg(p.pid, signal.SIGKILL)
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(60)
        assert p.returncode == -signal.SIGKILL, "".join(seen)
        self.log.append("".join(seen))
        return "".join(seen)

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def published(hub, repo: str) -> dict[str, dict]:
    """Path -> size and sha256 of every published file but the card and the report (which name the repo and
    the time), from the publication block; checked against the files the server holds."""
    files = hub.files(repo)
    block = json.loads(files["report.json"])["publication"]["files"]
    for path, meta in block.items():
        assert hashlib.sha256(files[path]).hexdigest() == meta["sha256"], path
    assert set(files) == set(block) | {".gitattributes", "README.md", "report.json"}
    return block


@pytest.fixture(scope="module")
def runs(hub_server_session, tmp_path_factory, smollm2, calibration_text, eval_text, toolchain) -> Runs:
    hub_server_session.reset(valid_tokens=default_tokens())
    cfg = json.loads((smollm2 / "config.json").read_text())
    hub_server_session.add_model(SOURCE, checkpoint_files(smollm2), card_data={"license": "apache-2.0"},
                                 pipeline_tag="text-generation", library_name="transformers", config=cfg,
                                 safetensors_params=134_515_008)
    return Runs(hub_server_session, tmp_path_factory.mktemp("kill-resume"), calibration_text, eval_text)


@pytest.fixture(scope="module")
def reference(runs: Runs) -> dict[str, dict]:
    """The uninterrupted run's publication."""
    runs.run(runs.tmp / "reference", REF_REPO)
    return published(runs.hub, REF_REPO)


def test_kill_during_convert(runs: Runs, reference) -> None:
    runs.run_and_kill("[convert] start", 1.5)
    wd = runs.workdir
    assert records.load(wd, "convert") is None and not (wd / f"{MODEL}-BF16.gguf").exists()
    assert records.load(wd, "fetch") is not None


def test_kill_during_calibrate_after_resuming_convert(runs: Runs, reference) -> None:
    out = runs.run_and_kill("[calibrate] start", 1.0)
    assert "[convert] done" in out  # the killed conversion was done again, from the fetched files
    wd = runs.workdir
    assert records.load(wd, "convert") is not None and records.load(wd, "calibrate") is None
    assert not (wd / f"{MODEL}-imatrix.gguf").exists()


def test_kill_during_evaluation_after_resuming_calibrate(runs: Runs, reference) -> None:
    out = runs.run_and_kill("[ladder] start", 3.0)  # the pipeline stage: quantize and evaluate as tasks
    assert "[convert] already done" in out and "[calibrate] done" in out
    assert records.load(runs.workdir, "evaluate") is None


def test_kill_during_upload_after_resuming_evaluation(runs: Runs, reference) -> None:
    hub = runs.hub
    # the server already holds these LFS objects (the reference published the same bytes): the upload is the
    # LFS batch negotiation and the commit; the batch request is held open and the run killed during it
    batch = f"/{KILL_REPO}.git/info/lfs/objects/batch"
    hub.slow_next(1, seconds=30.0, path_prefix=batch, method="POST")
    out = runs.run_and_kill("[publish] start", 0.5, ready=lambda: hub.count("POST", batch) > 0)
    hub.clear_faults()
    assert "[ladder] done" in out and "[calibrate] already done" in out
    assert hub.count("POST", batch) == 1  # killed while uploading
    # the repo was created, nothing was committed to it
    assert set(hub.files(KILL_REPO)) == {".gitattributes"}


def test_the_last_restart_publishes_what_the_uninterrupted_run_did(runs: Runs, reference) -> None:
    evaluated = records.load(runs.workdir, "evaluate").finished_at
    out = runs.run(runs.workdir, KILL_REPO)
    for stage in ("convert", "calibrate"):
        assert f"[{stage}] already done" in out, out
    assert records.load(runs.workdir, "evaluate").finished_at == evaluated  # the finished evaluation is not redone
    assert published(runs.hub, KILL_REPO) == reference
    assert not list(runs.workdir.rglob(".partial-*"))
    assert sum(1 for c in runs.hub.commits(KILL_REPO) if c.parent is not None) == 1
