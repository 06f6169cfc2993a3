"""The one place that starts programs: every child of ggufbot runs through :func:`run`.

An argument list (never a shell string), a timeout, the exit code checked, and the tail of stderr kept in the raised
:class:`ToolError`. Each child gets an allow-listed environment (:func:`child_env`: no secret, no database URL, no
credential path; the Hub offline), kernel resource limits when asked (:class:`ResourceLimits`), and runs under a small
supervisor (``converters/core/reaper.py``) that dies with this process (``PR_SET_PDEATHSIG``, a SIGKILL of ggufbot
included) and takes the program's whole tree with it: the program's process group and every descendant re-parented to
it (``PR_SET_CHILD_SUBREAPER``), also when the program exits normally. A :class:`Watch` (set per stage with
:func:`watched`) caps the run time of every program started under it, asks whether to stop and hears every line
printed. :func:`kill_all` (the command line's signal handlers) kills every running one at once; :func:`own_children`
makes the ggufbot process itself a subreaper and :func:`kill_children` ends what is left of its children on the way
out.

What runs is not this module's business: llama.cpp's programs are found and built by
:mod:`converters.llama.toolchain` and :mod:`converters.llama.build`, the sandboxed children of
:mod:`converters.formats.chat` and :mod:`converters.formats.hfchild` are Python modules.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from converters.core.errors import ToolError

log = logging.getLogger(__name__)

STDERR_TAIL_CHARS = 4000

# What a child gets of this process's environment: these names, and names starting with those ending in "_". The
# system's basics, thread counts, the GPU runtime's variables; nothing else (no database URL or password, no token,
# no path to a credential). A program that needs more names them: run(..., inherit=...).
CHILD_ENV = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_", "TZ", "TMPDIR", "TEMP", "TMP", "NO_COLOR",
    "LD_LIBRARY_PATH",  # CUDA images find the driver's libraries through it
    "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "GOTO_NUM_THREADS", "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_", "TOKENIZERS_PARALLELISM",
    "CUDA_", "NVIDIA_", "CUBLAS_", "GGML_", "HIP_", "ROCR_", "HSA_", "PYTORCH_",
)
# Set in every child whatever this process's environment says: nothing a child does fetches code or files from the Hub
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Names a child never gets, even when allowed above or passed by the caller: the Hub token, anything named like a secret
SECRET_ENV = re.compile(r"^(HF_TOKEN|HUGGING_FACE_HUB_TOKEN)$|_(TOKEN|KEY|SECRET|PASSWORD)$", re.I)
POLL_SECONDS = 0.2  # how often a waiting run() checks its deadline and the stop request
STOP_GRACE_SECONDS = 10.0  # a supervisor asked to stop that is still there after this is killed itself
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
REAPER = Path(__file__).resolve().parent / "reaper.py"


@dataclasses.dataclass(frozen=True)
class RunResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class ResourceLimits:
    """Kernel limits (``setrlimit``) of one child: CPU seconds, address space and written-file bytes."""

    cpu_seconds: int | None = None
    memory_bytes: int | None = None
    file_bytes: int | None = None

    def pairs(self) -> list[tuple[int, int]]:
        import resource

        wanted = ((resource.RLIMIT_CPU, self.cpu_seconds), (resource.RLIMIT_AS, self.memory_bytes),
                  (resource.RLIMIT_FSIZE, self.file_bytes))
        return [(res, int(v)) for res, v in wanted if v is not None]


@dataclasses.dataclass(frozen=True)
class Watch:
    """What every program started in the current context obeys (``converters.ladder.job.run_stages`` sets one per stage):
    ``timeout`` caps any one program's run time (scaled from the model's size), ``check`` is asked every
    :data:`POLL_SECONDS` whether to stop (it raises; the program's process group is killed first), ``alive`` is
    called for every line a program prints (a sign of life for stuck-job detection)."""

    timeout: float | None = None
    check: Callable[[], None] | None = None
    alive: Callable[[], None] | None = None


_WATCH: contextvars.ContextVar[Watch] = contextvars.ContextVar("ggufbot_toolchain_watch", default=Watch())
_LIVE: dict[int, subprocess.Popen] = {}  # pid -> running child, for the signal handlers (kill_all)
_LIVE_LOCK = threading.Lock()
_CLOSING = threading.Event()  # set by kill_all(closing=True): no new program starts
_KILLED = threading.Event()  # set by kill_all(): the running programs were killed on purpose


def killed_on_request() -> bool:
    """True once :func:`kill_all` ran: a program that died of a signal since was stopped, it did not crash."""
    return _KILLED.is_set()


@contextlib.contextmanager
def watched(watch: Watch) -> Iterator[Watch]:
    """Run the block with ``watch`` applying to every program started in it (threads: copy the context)."""
    token = _WATCH.set(watch)
    try:
        yield watch
    finally:
        _WATCH.reset(token)


def current_watch() -> Watch:
    return _WATCH.get()


def kill_all(*, closing: bool = False) -> int:
    """Kill the process group of every running child (a signal handler's work); ``closing`` also refuses any
    program started afterwards. Returns how many were killed."""
    _KILLED.set()
    if closing:
        _CLOSING.set()
    with _LIVE_LOCK:
        procs = list(_LIVE.values())
    for p in procs:
        _stop(p)
    return len(procs)


def _stop(proc: subprocess.Popen) -> None:
    """Ask a program's supervisor to kill the program's tree (it then dies of SIGKILL, as the program would have);
    safe in a signal handler: it only sends a signal."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        proc.send_signal(signal.SIGTERM)


def _allowed(name: str, allow: Sequence[str]) -> bool:
    return any(name.startswith(a) if a.endswith("_") else name == a for a in allow)


def cpus() -> int:
    """The cores this process may run on: its CPU affinity (a container's cpuset, ``taskset``), which the programs it
    starts inherit, not every core of the machine (``os.cpu_count()``): a program given more threads than it has
    cores spins in its barriers waiting for threads that are not running."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def child_env(extra: Mapping[str, str] | None = None, inherit: Sequence[str] = ()) -> dict[str, str]:
    """A child's environment: the allow-listed part of this process's (:data:`CHILD_ENV` and ``inherit``: names, or
    prefixes ending in ``_``), then ``extra``; never a name like a secret (:data:`SECRET_ENV`); the Hub, transformers
    and datasets always offline (:data:`OFFLINE_ENV`)."""
    allow = (*CHILD_ENV, *inherit)
    env = {k: v for k, v in os.environ.items() if _allowed(k, allow)}
    env.update(extra or {})
    env = {k: v for k, v in env.items() if not SECRET_ENV.search(k)}
    env.update(OFFLINE_ENV)
    return env


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def own_children() -> bool:
    """Make this process (the ``ggufbot`` command, at start) a child subreaper: a descendant orphaned under it (a
    supervisor killed outright) is re-parented here, not to PID 1, so :func:`kill_children` finds it. Also make it
    not dumpable: a child of the same user can then read neither its memory nor ``/proc/PID/environ`` (which holds
    what the children are not given). False where the kernel has no prctl."""
    if _PRCTL is None:
        return False
    _PRCTL(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _PRCTL(PR_SET_DUMPABLE, 0, 0, 0, 0)
    return True


def kill_children(within: float = 5.0) -> int:
    """On the way out of the ``ggufbot`` command: stop every running program (:func:`kill_all`), kill every other
    child of this process and its process group (when not ours), reap them, and again for what is re-parented here
    meanwhile, for at most ``within`` seconds. Returns how many children were killed."""
    kill_all(closing=True)
    me, own_group, killed, seen = os.getpid(), os.getpgrp(), 0, set()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        kids = _children_of(me)
        if not kids:
            break
        with _LIVE_LOCK:
            supervisors = set(_LIVE)
        for pid in kids:
            if pid in supervisors:
                continue  # asked to stop above; it kills its own tree, then exits
            with contextlib.suppress(OSError):
                pgid = os.getpgid(pid)
                if pgid != own_group:
                    os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            if pid not in seen:
                seen.add(pid)
                killed += 1
        for pid in set(kids) - supervisors:  # a supervisor is reaped by the run() waiting for it
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    return killed


def _children_of(pid: int) -> list[int]:
    """Live (not zombie) children of ``pid``, from /proc."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out.append(int(d))
    return out


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    inherit: Sequence[str] = (),
    on_line: Callable[[str], None] | None = None,
    keep_output: int = 2_000_000,
    stdin: bytes | None = None,
    limits: ResourceLimits | None = None,
) -> RunResult:
    """Run one program and return its output; raise ToolError on a non-zero exit or a timeout.

    The child gets an allow-listed environment (:func:`child_env`; ``env`` adds to it, ``inherit`` names more of this
    process's variables it needs) and ``limits``, and runs under the supervisor (``converters/core/reaper.py``): in its
    own process group, killed with every descendant when it exits, when this process dies (even of SIGKILL) or when
    asked. Its run time is capped by ``timeout`` and by the current :class:`Watch`'s; the watch's stop request kills
    the whole tree within :data:`POLL_SECONDS`. ``on_line`` is called with every line the program prints (stdout
    and stderr); ``stdin`` is written to its standard input. At most ``keep_output`` characters of each stream are kept.
    """
    args = [os.fspath(a) for a in argv]
    if not args:
        raise ValueError("empty argument list")
    watch = _WATCH.get()
    caps = [t for t in (timeout, watch.timeout) if t is not None]
    started = time.monotonic()
    log.debug("run: %s", " ".join(args))
    proc = _start(args, cwd, child_env(env, inherit), stdin is not None, limits)
    try:
        out_buf, err_buf, threads = _pump(proc, on_line, watch.alive, keep_output, stdin)
        timed_out = _wait(proc, min(caps) if caps else None, watch.check)
        for t in threads:
            t.join(timeout=10)
    finally:
        with _LIVE_LOCK:
            _LIVE.pop(proc.pid, None)
    stdout, stderr = "".join(out_buf), "".join(err_buf)
    if timed_out or proc.returncode != 0:
        if watch.check is not None and proc.returncode is not None and proc.returncode < 0:
            watch.check()  # killed because a stop was asked for: say so rather than "killed by a signal"
        raise ToolError(args, None if timed_out else proc.returncode,
                        stderr[-STDERR_TAIL_CHARS:] or stdout[-STDERR_TAIL_CHARS:], timed_out=timed_out)
    return RunResult(tuple(args), proc.returncode, stdout, stderr, time.monotonic() - started)


def _start(args: list[str], cwd: Any, env: dict[str, str], with_stdin: bool,
           limits: ResourceLimits | None) -> subprocess.Popen:
    """Start ``args`` under the supervisor; a program that cannot be started raises ToolError as Popen's would."""
    if _CLOSING.is_set():
        raise ToolError(args, None, "not started: ggufbot is shutting down")
    program = _which(args[0], env)
    if program is None:
        err = FileNotFoundError(2, os.strerror(2), args[0])
        raise ToolError(args, None, f"could not start: {err}")
    lim = limits or ResourceLimits()
    wrapper = [sys.executable, "-I", "-S", str(REAPER), str(os.getpid()), "", *(
        "-" if v is None else str(int(v)) for v in (lim.cpu_seconds, lim.memory_bytes, lim.file_bytes)),
        "--", program, *args[1:]]
    status_r, status_w = os.pipe()
    wrapper[5] = str(status_w)
    try:
        proc = subprocess.Popen(wrapper, cwd=cwd, env=env, stdin=subprocess.PIPE if with_stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                pass_fds=(status_w,))
    except (OSError, subprocess.SubprocessError) as e:
        os.close(status_r)
        raise ToolError(args, None, f"could not start: {e}") from e
    finally:
        os.close(status_w)
    with _LIVE_LOCK:
        _LIVE[proc.pid] = proc
    try:
        with open(status_r, "rb") as status:  # end-of-file once the program runs (or the supervisor is gone)
            failed = status.read()
        if _CLOSING.is_set():  # a signal arrived while it was starting
            _kill_group(proc)
    except BaseException:
        _kill_group(proc)
        raise
    if failed:
        proc.wait()
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                stream.close()
        with _LIVE_LOCK:
            _LIVE.pop(proc.pid, None)
        code, _, what = failed.decode("utf-8", "replace").partition("\n")
        err = OSError(int(code), os.strerror(int(code)), what) if int(code) else RuntimeError(what)
        raise ToolError(args, None, f"could not start: {err}")
    return proc


def _which(name: str, env: Mapping[str, str]) -> str | None:
    """The path the program ``name`` runs from, looked up as ``execvp`` would in the child's PATH (relative to the
    child's working directory when it holds a slash)."""
    if os.sep in name:
        return name
    for d in os.get_exec_path(dict(env)):
        path = os.path.join(d, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def output_pieces(stream: Any) -> Iterator[bytes]:
    """A program's output as it comes: each line (ended by ``\\n``, or ``\\r`` for a redrawn progress bar), and what
    it flushed without ending a line once nothing more follows for a moment (``llama-imatrix``'s ``[1]5.81,`` chunk
    counter) as one piece."""
    fd, pending = stream.fileno(), b""
    while True:
        if pending and not select.select([fd], [], [], PARTIAL_LINE_WAIT)[0]:
            yield pending
            pending = b""
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        *done, pending = LINE_END.split(pending + chunk)
        yield from (p for p in done if p)
    if pending:
        yield pending


LINE_END = re.compile(rb"(?<=\n)|(?<=\r)(?!\n)")
PARTIAL_LINE_WAIT = 0.2  # seconds without more output after which an unended line is passed on as it is


def _pump(proc: subprocess.Popen, on_line: Callable[[str], None] | None, alive: Callable[[], None] | None,
          keep_output: int, stdin: bytes | None) -> tuple[deque[str], deque[str], list[threading.Thread]]:
    """Threads that read both streams line by line (and write ``stdin``); the kept tails fill as they run."""
    out_buf: deque[str] = deque()
    err_buf: deque[str] = deque()

    def pump(stream: Any, buf: deque[str]) -> None:
        size = 0
        for raw in output_pieces(stream):
            line = raw.decode("utf-8", "replace")
            buf.append(line)
            size += len(line)
            while size > keep_output and len(buf) > 1:
                size -= len(buf.popleft())
            for cb in (alive, None if on_line is None else lambda: on_line(line.rstrip("\r\n"))):
                if cb is not None:
                    try:
                        cb()
                    except Exception:  # progress must never break the run
                        log.debug("output callback failed", exc_info=True)
        stream.close()

    def feed() -> None:
        with contextlib.suppress(OSError):  # the program may exit without reading it all
            proc.stdin.write(stdin)
            proc.stdin.close()

    threads = [threading.Thread(target=pump, args=(proc.stdout, out_buf), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err_buf), daemon=True)]
    if stdin is not None:
        threads.append(threading.Thread(target=feed, daemon=True))
    for t in threads:
        t.start()
    return out_buf, err_buf, threads


def _wait(proc: subprocess.Popen, timeout: float | None, check: Callable[[], None] | None) -> bool:
    """Wait for the program; True when it ran out of time (its group is killed). A stop request from ``check``
    (or our own interruption) kills the group and propagates."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            try:
                proc.wait(timeout=POLL_SECONDS)
                return False
            except subprocess.TimeoutExpired:
                pass
            if deadline is not None and time.monotonic() >= deadline:
                _kill_group(proc)
                return True
            if check is not None:
                check()
    except BaseException:
        # a stop request, KeyboardInterrupt, a signal turned into an exception...: never leave the child running
        _kill_group(proc)
        raise


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the program's tree (through its supervisor) and wait for it; a supervisor that does not answer within
    :data:`STOP_GRACE_SECONDS` is killed with its process group (the program dies with it: PR_SET_PDEATHSIG)."""
    _stop(proc)
    try:
        proc.wait(timeout=STOP_GRACE_SECONDS)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
