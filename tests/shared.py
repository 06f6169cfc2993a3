"""Expensive test artefacts built once per test run, also when pytest-xdist runs the suite in several workers.

:func:`built_once` builds ``<root>/<name>`` with ``build(tmp_dir)`` the first time any worker asks for it and hands
the same folder to every later caller: the first caller builds it in place under a file lock and marks it complete
(the artefacts record absolute paths, so they are built where they stay); a folder left incomplete by a failed
build is built again. ``root`` is the run's base temporary folder, which pytest-xdist
shares between its workers (each worker's own base folder is a child of it), so a run builds each artefact once
however its tests are spread over the workers; it goes with the run's other temporary folders. The artefacts are
read-only for the tests that use them.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder shared by every worker of this test run (the base temporary folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """``<run root>/<name>``, built by ``build(folder)`` once per run (see the module's docstring)."""
    root = run_root(tmp_path_factory)
    out = root / name
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / f".{name}.built"
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            done.touch()
    return out
