"""``timeout 600 ggufbot convert ...`` used to exit and leave ``llama-imatrix`` running as an orphan (it has its own
process group and nothing stopped it). SIGTERM, SIGINT, SIGHUP or SIGKILL to a ``ggufbot convert`` running
``llama-imatrix`` must end the program at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import gone, kill_quietly, wait_for_child

pytestmark = [pytest.mark.slow, pytest.mark.llama]


def test_a_signalled_convert_leaves_no_llama_imatrix(tmp_path: Path, smollm2, calibration_text, toolchain):
    out = tmp_path / "work"
    argv = [sys.executable, "-m", "bot.cli", "convert", str(smollm2), "--out", str(out), "--ladder", "Q8_0",
            "--calibration", str(calibration_text), "--calibration-chunks", "400", "--ctx", "256", "--no-eval"]
    # the first run converts (the BF16 record is kept); each run then spends its time in llama-imatrix
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL):
        bot = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        imatrix = program = None
        try:
            # ggufbot's child is the program's supervisor (converters/core/reaper.py, named after it), the program its child
            imatrix = wait_for_child(bot.pid, "llama-imatrix", within=240)
            program = wait_for_child(imatrix, "llama-imatrix", within=30)
            time.sleep(1.0)
            t0 = time.monotonic()
            bot.send_signal(sig)
            bot.wait(timeout=15)
            assert gone(program, within=5), f"llama-imatrix outlived ggufbot convert after {sig.name}"
            assert gone(imatrix, within=5), f"its supervisor outlived ggufbot convert after {sig.name}"
            assert time.monotonic() - t0 < 5
            err = bot.stderr.read().decode()
            if sig != signal.SIGKILL:
                assert bot.returncode == 128 + sig and "Traceback" not in err, err[-2000:]
        finally:
            kill_quietly(bot.pid, *([imatrix] if imatrix else []), *([program] if program else []))
    assert not list(out.glob("*-imatrix.gguf"))  # never finished, nothing half-written in place
