"""No program's descendant outlives the run that started it, or ggufbot (issue 19, section 4).

``PR_SET_PDEATHSIG`` reaches only a direct child: ``sh -c 'sleep 123 &'`` left its ``sleep`` running with ppid 1
after a normal return, a timeout, ``kill_all`` or a SIGKILL of ggufbot. Each program here leaves grandchildren
behind (one in the program's process group, one that called ``setsid``) and writes their pids to a file; after
each way the run can end, none of them may remain (/proc, polled for a bounded time)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from converters.core import proc
from converters.core.errors import ToolError
from tests.procs import gone, kill_quietly

REPO_ROOT = Path(__file__).resolve().parents[2]


def leaver(tmp_path: Path, name: str = "leaver", then: str = "") -> Path:
    """A program that starts two sleeping grandchildren (``sleep 123 &`` in its group, ``setsid sleep 124 &``
    in a session of its own), writes their pids and its own to ``<name>.pids`` once both run, then does ``then``
    (``exec sleep``: the program itself waits, so that the test knows every process it leaves)."""
    prog = tmp_path / name
    pids = tmp_path / f"{name}.pids"
    prog.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        sleep 123 &
        a=$!
        setsid sleep 124 &
        b=$!
        echo "$a $b $$" > {pids}.part && mv {pids}.part {pids}
        {then}
        """))
    prog.chmod(0o755)
    return prog


def grandchildren(prog: Path, within: float = 10.0) -> list[int]:
    pids = prog.with_name(prog.name + ".pids")
    deadline = time.monotonic() + within
    while not pids.exists():
        assert time.monotonic() < deadline, f"{prog.name} did not start its grandchildren"
        time.sleep(0.05)
    found = [int(p) for p in pids.read_text().split()]
    assert len(found) == 3
    return found[:2]


def everything(prog: Path) -> list[int]:
    """The program and its grandchildren, for a test's clean-up whatever happened (the code under test may be wrong)."""
    pids = prog.with_name(prog.name + ".pids")
    return [int(p) for p in pids.read_text().split()] if pids.exists() else []


def assert_all_gone(pids: list[int], after: str, prog: Path) -> None:
    try:
        left = [p for p in pids if not gone(p, within=5)]
        assert not left, f"grandchildren {left} outlived the program after {after}: " + " / ".join(
            Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ") for p in left if Path(f"/proc/{p}").exists())
    finally:
        kill_quietly(*pids, *everything(prog))


def test_a_normal_return_leaves_no_grandchild(tmp_path):
    prog = leaver(tmp_path, then="echo done")
    res = proc.run([prog], timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "done"
    assert_all_gone(grandchildren(prog, within=0), "a normal return", prog)


def test_a_failing_program_keeps_its_exit_code_and_leaves_no_grandchild(tmp_path):
    prog = leaver(tmp_path, then="echo 'the reason' >&2; exit 7")
    with pytest.raises(ToolError) as ei:
        proc.run([prog], timeout=60)
    assert ei.value.returncode == 7 and "the reason" in ei.value.stderr_tail
    assert_all_gone(grandchildren(prog, within=0), "a failure", prog)


def test_a_timeout_leaves_no_grandchild(tmp_path):
    prog = leaver(tmp_path, then="exec sleep 60")
    t0 = time.monotonic()
    with pytest.raises(ToolError) as ei:
        proc.run([prog], timeout=2)
    assert ei.value.timed_out and time.monotonic() - t0 < 15
    assert_all_gone(grandchildren(prog, within=0), "a timeout", prog)


def test_kill_all_leaves_no_grandchild(tmp_path):
    prog = leaver(tmp_path, then="exec sleep 60")
    errors: list[BaseException] = []

    def target() -> None:
        try:
            proc.run([prog], timeout=60)
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    pids = grandchildren(prog)
    t0 = time.monotonic()
    assert proc.kill_all() == 1
    t.join(timeout=15)
    assert not t.is_alive() and time.monotonic() - t0 < 5
    assert isinstance(errors[0], ToolError) and errors[0].returncode == -signal.SIGKILL  # as a killed program's
    assert_all_gone(pids, "kill_all", prog)


def test_a_program_killed_by_a_signal_is_reported_so(tmp_path):
    with pytest.raises(ToolError) as ei:
        proc.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    assert ei.value.returncode == -signal.SIGSEGV


# A ggufbot in miniature, as the command starts: subreaper, signal handlers, one program, the way out.
PARENT = textwrap.dedent("""
    import sys
    from bot import cli
    from converters.core import proc
    proc.own_children()
    cli.install_signal_handlers()
    try:
        proc.run([sys.argv[1]])
    except KeyboardInterrupt as e:
        sys.exit(128 + getattr(e, "signum", 2))
    finally:
        proc.kill_children()
""")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_parent_leaves_no_grandchild(tmp_path, sig):
    prog = leaver(tmp_path, then="exec sleep 120")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(prog)], cwd=REPO_ROOT)
    pids: list[int] = []
    try:
        pids = grandchildren(prog, within=30)
        parent.send_signal(sig)
        assert parent.wait(timeout=10) == (-sig if sig == signal.SIGKILL else 128 + sig)
        assert_all_gone(pids, f"{sig.name} of the parent", prog)
    finally:
        kill_quietly(parent.pid, *pids, *everything(prog))


def fake_llama_cpp(tmp_path: Path, then: str) -> tuple[Path, Path]:
    """A LLAMA_CPP_DIR whose llama-quantize (run with --version by toolchain.find) leaves grandchildren."""
    root = tmp_path / "llama.cpp"
    (root / "bin").mkdir(parents=True)
    prog = leaver(root / "bin", "llama-quantize", then=then)
    return root, prog


def ggufbot_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_DIR"}
    return {**env, "PYTHONPATH": str(REPO_ROOT), **extra}


def test_sigkill_of_the_ggufbot_command_leaves_no_grandchild(tmp_path):
    """The real command line: ``ggufbot toolchain info`` with LLAMA_CPP_DIR runs ``llama-quantize --version``
    (through proc.run since issue 19: it used to be a bare subprocess.run, which even a SIGTERM left behind)."""
    root, prog = fake_llama_cpp(tmp_path, then="exec sleep 120")
    bot = subprocess.Popen([sys.executable, "-m", "bot.cli", "toolchain", "info"], cwd=REPO_ROOT,
                           env=ggufbot_env(LLAMA_CPP_DIR=str(root)), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        pids = grandchildren(prog, within=60)
        bot.kill()
        assert bot.wait(timeout=10) == -signal.SIGKILL
        assert_all_gone(pids, "SIGKILL of ggufbot", prog)
    finally:
        kill_quietly(bot.pid, *pids, *everything(prog))


def test_the_ggufbot_command_leaves_no_orphan_on_its_way_out(tmp_path):
    """A supervisor killed outright (here: SIGKILL while the program runs) hands its orphans to the ggufbot process,
    the subreaper, which kills them when the command ends; without it they would be PID 1's, running on."""
    root, prog = fake_llama_cpp(tmp_path, then="exec sleep 120")
    bot = subprocess.Popen([sys.executable, "-m", "bot.cli", "toolchain", "info"], cwd=REPO_ROOT,
                           env=ggufbot_env(LLAMA_CPP_DIR=str(root)), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = grandchildren(prog, within=60)
        supervisor = next(p for p in _children(bot.pid))
        os.kill(supervisor, signal.SIGKILL)  # the program dies with it (PDEATHSIG); its children come to ggufbot
        assert gone(supervisor)
        # the program gets its death signal when the supervisor dies: until it is gone, its children are still its own
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_ppid(pid) not in (bot.pid, None) for pid in pids):
            time.sleep(0.05)
        for pid in pids:
            assert _ppid(pid) in (bot.pid, None), f"grandchild {pid} was not re-parented to ggufbot"
        out, err = bot.communicate(timeout=60)
        assert_all_gone(pids, "the end of the ggufbot command", prog)
    finally:
        kill_quietly(bot.pid, *pids, *everything(prog))


def _children(ppid: int) -> list[int]:
    from tests.procs import children

    return children(ppid)


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except FileNotFoundError:
        return None


def test_the_supervisor_starts_quickly():
    """What the supervisor adds to every program's start, against a bare interpreter's start (the floor)."""
    def median(f) -> float:
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    bare = median(lambda: subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True))
    supervised = median(lambda: proc.run(["true"]))
    print(f"run(['true']) {supervised * 1000:.1f} ms, python -I -S {bare * 1000:.1f} ms")
    assert supervised < bare * 3 + 0.1
