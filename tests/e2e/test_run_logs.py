"""``ggufbot run`` as a real process: every Hub warning is logged once, by ggufbot's handler."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.llama]

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_hub_warning_is_logged_once_under_run(hub_server, tmp_path: Path, toolchain) -> None:
    config = tmp_path / "ggufbot.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n\n[[sources]]\nauthor = "acme"\n')
    hub_server.fail_next(1, status=503, path_prefix="/api/models")  # the client retries once, with a warning
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "run", "--exit-when-idle", "--config", str(config)],
                          cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    retries = [line for line in proc.stderr.splitlines() if "Retrying in" in line]
    assert len(retries) == 1, proc.stderr
    assert " WARNING huggingface_hub" in retries[0]  # ggufbot's format: time, level, logger
    assert "polled author=acme" in proc.stderr
