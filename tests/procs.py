"""Looking at processes from the tests: the children of a process, whether one is gone."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    name, rest = text.split(" (", 1)[1].rsplit(") ", 1)
    return [name, *rest.split()]


def children(ppid: int, name: str | None = None) -> list[int]:
    """Live processes whose parent is ``ppid`` (and whose command name starts with ``name``)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        st = _stat(int(d.name))
        if st and int(st[2]) == ppid and st[1] not in ("Z", "X") and (name is None or st[0].startswith(name[:15])):
            out.append(int(d.name))
    return out


def gone(pid: int, within: float = 5.0) -> bool:
    """True when ``pid`` has exited (or is a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        st = _stat(pid)
        if st is None or st[1] in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def wait_for_child(ppid: int, name: str, within: float) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = children(ppid, name)
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no {name} child of {ppid} within {within} s")


def wait_for(pred: Callable[[], Any], timeout: float, what: str, tail: Callable[[], str] | Path | None = None,
             every: float = 0.2) -> Any:
    """Poll ``pred`` every ``every`` s until it returns something true, and return that; after ``timeout`` s fail
    the test with ``what`` and the end of the log (``tail``: a log file, or a function returning the text)."""
    import pytest

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    text = tail.read_text()[-4000:] if isinstance(tail, Path) else tail() if tail is not None else ""
    pytest.fail(f"timed out waiting for {what}" + (f"\n{text}" if text else ""))


def kill_quietly(*pids: int) -> None:
    for pid in pids:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def die_with_the_tests() -> None:
    """``preexec_fn`` for a long-running program a test starts: SIGKILL when the test process dies (even killed
    itself, before its teardown could stop it); the program's own children die with it in turn."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
