"""Killed during quantization and started again: no finished stage is redone, outputs are identical."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from converters.core import records
from tests.conftest import SMOL_CAL_CHUNKS, SMOL_CAL_CTX, SMOL_LADDER

pytestmark = [pytest.mark.slow, pytest.mark.llama]


def convert_cmd(smollm2, out, calibration_text):
    return [sys.executable, "-m", "bot.cli", "convert", str(smollm2), "--out", str(out), "--ladder", SMOL_LADDER,
            "--calibration", str(calibration_text), "--calibration-chunks", str(SMOL_CAL_CHUNKS), "--ctx", str(SMOL_CAL_CTX),
            "--no-eval", "--jobs", "1"]


def test_sigkill_during_quantization_then_resume(smol_workdir, smollm2, calibration_text, tmp_path):
    out = tmp_path / "job"
    proc = subprocess.Popen(convert_cmd(smollm2, out, calibration_text), stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = []
    deadline = time.monotonic() + 900
    try:
        for line in proc.stderr:
            seen.append(line)
            if "[quantize] Q4_K_M done" in line:  # Q8_0 and Q4_K_M finished, IQ4_XS is being written
                time.sleep(1.0)
                os.killpg(proc.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "".join(seen)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    # the killed run left no file that passes for a finished one
    assert not (out / "SmolLM2-135M-Instruct-IQ4_XS.gguf").exists()
    assert not (out / "ladder.json").exists()
    stamps = {s: records.load(out, s).finished_at for s in ("convert", "calibrate", "quantize-Q8_0", "quantize-Q4_K_M")}

    second = subprocess.run(convert_cmd(smollm2, out, calibration_text), capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr
    assert "[convert] already done" in second.stderr and "[calibrate] already done" in second.stderr
    assert "Q8_0 (already done)" in second.stderr and "Q4_K_M (already done)" in second.stderr
    assert "IQ4_XS done" in second.stderr and "Q2_K done" in second.stderr
    for s, stamp in stamps.items():
        assert records.load(out, s).finished_at == stamp, f"{s} was redone"
    assert not list(out.rglob(".partial-*"))
    # identical to an uninterrupted run with the same inputs
    resumed = json.loads((out / "ladder.json").read_text())
    clean = json.loads((smol_workdir / "ladder.json").read_text())
    assert resumed["reference"]["sha256"] == clean["reference"]["sha256"]
    assert {f["type"]: f["sha256"] for f in resumed["files"]} == {f["type"]: f["sha256"] for f in clean["files"]}
