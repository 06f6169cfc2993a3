"""The one place that finds, builds and runs llama.cpp programs.

The pinned llama.cpp comes from the source distribution of ``llama-cpp-python`` on PyPI (its
``vendor/llama.cpp`` holds the C++ tools, ``convert_hf_to_gguf.py`` and ``gguf-py``). It is built once
per (version, build flags) into a cache directory outside any work tree; an install lock makes two
processes installing at once safe. A user can instead point ``LLAMA_CPP_DIR`` at a llama.cpp checkout
with built programs.

Every program is started through :func:`run`: an argument list (never a shell string), a timeout, the
exit code checked, and the tail of stderr kept in the raised :class:`ToolError`. Each child gets an allow-listed
environment (:func:`child_env`: no secret, no database URL, no credential path; the Hub offline), kernel resource
limits when asked, and runs under a small supervisor (``converters/core/reaper.py``) that dies with this process
(``PR_SET_PDEATHSIG``, a SIGKILL of ggufbot included) and takes the program's whole tree with it: the program's
process group and every descendant re-parented to it (``PR_SET_CHILD_SUBREAPER``), also when the program exits
normally. :func:`kill_all` (the command line's signal handlers) kills every running one at once;
:func:`own_children` makes the ggufbot process itself a subreaper and :func:`kill_children` ends what is left of
its children on the way out.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from converters.core.errors import ToolchainError, ToolError

log = logging.getLogger(__name__)

# The pinned engine. Changing these is an upgrade of every published quant: the version is recorded in
# each stage record and report, so the bot can re-quantize what was built with an older one.
PINNED_PACKAGE = "llama-cpp-python"
PINNED_VERSION = "0.3.36"
PINNED_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

# The programs the pipeline uses. llama-completion is the plain text-generation tool.
PROGRAMS = (
    "llama-quantize",
    "llama-imatrix",
    "llama-perplexity",
    "llama-gguf-split",
    "llama-mtmd-cli",  # loads a vision projector (mmproj) with its text model
    "llama-tokenize",
    "llama-completion",
)

STDERR_TAIL_CHARS = 4000


# --------------------------------------------------------------------------------------------------
# Running programs
# --------------------------------------------------------------------------------------------------

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
# Building llama.cpp: the compiler and CMake's own variables
BUILD_ENV = ("CC", "CXX", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "CUDACXX", "CUDAHOSTCXX", "CUDAFLAGS",
             "NVCC_", "CMAKE_", "CCACHE_", "MAKEFLAGS", "PKG_CONFIG_PATH", "LIBRARY_PATH", "CPATH", "C_INCLUDE_PATH",
             "CPLUS_INCLUDE_PATH")
# Fetching the pinned source with pip: the user's index configuration, proxies and CA certificates
FETCH_ENV = ("PIP_", "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
             "ALL_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "XDG_CONFIG_HOME",
             "NETRC")
# Set in every child whatever this process's environment says: nothing a child does fetches code or files from the Hub
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Names a child never gets, even when allowed above or passed by the caller: the Hub token, anything named like a secret
SECRET_ENV = re.compile(r"^(HF_TOKEN|HUGGING_FACE_HUB_TOKEN)$|_(TOKEN|KEY|SECRET|PASSWORD)$", re.I)
POLL_SECONDS = 0.2  # how often a waiting run() checks its deadline and the stop request
STOP_GRACE_SECONDS = 10.0  # a supervisor asked to stop that is still there after this is killed itself
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
REAPER = Path(__file__).resolve().parents[1] / "core" / "reaper.py"


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


# --------------------------------------------------------------------------------------------------
# Finding and building
# --------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where builds and fetched files are cached: $GGUFBOT_CACHE, else $XDG_CACHE_HOME/ggufbot, else ~/.cache/ggufbot."""
    if os.environ.get("GGUFBOT_CACHE"):
        return Path(os.environ["GGUFBOT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ggufbot"


def gpu_visible() -> bool:
    """True when an NVIDIA GPU is usable: nvidia-smi lists one. A CUDA compiler alone is not enough."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = run([smi, "-L"], timeout=20)
    except ToolError:
        return False
    return "GPU" in out.stdout


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    vram_mib: int
    free_mib: int
    driver: str


def gpus() -> list[Gpu]:
    """The NVIDIA GPUs nvidia-smi lists (name, VRAM, driver); [] without nvidia-smi. A failing nvidia-smi (no driver,
    a container started without the GPU) raises ToolError with its message."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    res = run([smi, "--query-gpu=name,memory.total,memory.free,driver_version", "--format=csv,noheader,nounits"],
              timeout=30)
    out = []
    for line in res.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[1].isdigit():
            out.append(Gpu(parts[0], int(parts[1]), int(parts[2]) if parts[2].isdigit() else 0, parts[3]))
    return out


def want_cuda() -> bool:
    """CUDA on when nvcc is found and a GPU is visible; GGUFBOT_CUDA=1/0 forces it either way."""
    forced = os.environ.get("GGUFBOT_CUDA", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return shutil.which("nvcc") is not None and gpu_visible()


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def build_flags() -> BuildFlags:
    """The flags of this machine's build. GGUFBOT_PORTABLE=1: a build that runs on any x86-64-v3 (AVX2) CPU, not
    only this one (a container image); GGUFBOT_CUDA_ARCHS (e.g. "75;80;86;89;90"): the CUDA compute capabilities
    to build for instead of CMake's default (a GPU may be absent at build time)."""
    archs = os.environ.get("GGUFBOT_CUDA_ARCHS", "").strip() or None
    return BuildFlags(cuda=want_cuda(), native=not _env_on("GGUFBOT_PORTABLE"), cuda_archs=archs)


@dataclasses.dataclass(frozen=True)
class BuildFlags:
    cuda: bool
    native: bool = True
    cuda_archs: str | None = None  # CMAKE_CUDA_ARCHITECTURES of a CUDA build; None: CMake's default

    def cmake_args(self) -> list[str]:
        args = [
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_BUILD_APP=OFF",
            "-DLLAMA_BUILD_UI=OFF",
            "-DLLAMA_OPENSSL=OFF",
            f"-DGGML_CUDA={'ON' if self.cuda else 'OFF'}",
        ]
        if self.native and platform.machine() in ("x86_64", "AMD64"):
            # "native minus AMX": every SIMD extension this CPU has, named one by one, and never AMX. ggml's AMX
            # backend segfaults in ggml_backend_amx_mul_mat on Sapphire Rapids class CPUs for quantized models
            # (llama.cpp issue 20824, closed without a fix), while -march=native would switch it on.
            flags = _cpu_flags()
            args.append("-DGGML_NATIVE=OFF")
            args += [f"-DGGML_{opt}={'ON' if all(f in flags for f in need) else 'OFF'}" for opt, need in _X86_FEATURES]
            args += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
        elif platform.machine() in ("x86_64", "AMD64"):
            # portable: the x86-64-v3 baseline (AVX2, FMA, F16C: any x86 server CPU since 2013), nothing above it
            args.append("-DGGML_NATIVE=OFF")
            args += [f"-DGGML_{opt}={'ON' if opt in _X86_PORTABLE else 'OFF'}" for opt, _ in _X86_FEATURES]
            args += ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
        else:
            args.append(f"-DGGML_NATIVE={'ON' if self.native else 'OFF'}")
        if self.cuda and self.cuda_archs:
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={self.cuda_archs}")
        return args

    def key(self) -> str:
        # a native build is only valid on the same CPU family: the key includes the machine
        ident = json.dumps({"cmake": self.cmake_args(), "programs": PROGRAMS, "machine": platform.machine(),
                            "cpu": _cpu_flags_digest() if self.native else ""}, sort_keys=True)
        return hashlib.sha256(ident.encode()).hexdigest()[:12]


# ggml's x86 build options and the /proc/cpuinfo flags each needs
_X86_FEATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SSE42", ("sse4_2",)), ("AVX", ("avx",)), ("AVX2", ("avx2",)), ("BMI2", ("bmi2",)), ("FMA", ("fma",)),
    ("F16C", ("f16c",)), ("AVX_VNNI", ("avx_vnni",)),
    ("AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")), ("AVX512_VBMI", ("avx512vbmi",)),
    ("AVX512_VNNI", ("avx512_vnni",)), ("AVX512_BF16", ("avx512_bf16",)),
)
_X86_PORTABLE = frozenset({"SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C"})


def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    m = re.search(r"^(flags|Features)\s*:\s*(.*)$", text, re.M)
    return frozenset(m.group(2).split()) if m else frozenset()


def _cpu_flags_digest() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    m = re.search(r"^(flags|Features)\s*:\s*(.*)$", text, re.M)
    return hashlib.sha256((m.group(2) if m else "").encode()).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """A usable llama.cpp: source tree (converter, gguf-py) and built programs."""

    root: Path  # llama.cpp source tree
    bin_dir: Path
    version: str  # e.g. "llama-cpp-python 0.3.36 (llama.cpp 0c1e570)"
    commit: str | None
    cuda: bool
    origin: str  # "pinned", "git", "dir" (converters/llama/builds.py) or "LLAMA_CPP_DIR"
    tag: str | None = None  # the llama.cpp release tag of a git or dir build, when its commit carries one

    def program(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.exists():
            raise ToolchainError(f"{name} is missing from {self.bin_dir}; run 'ggufbot toolchain install'")
        return path

    @property
    def converter(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"

    def python_env(self) -> dict[str, str]:
        """Environment for running the converter with the gguf-py that matches it."""
        pp = os.environ.get("PYTHONPATH", "")
        return {"PYTHONPATH": str(self.gguf_py) + (os.pathsep + pp if pp else ""),
                "NO_LOCAL_GGUF": ""}

    def missing(self) -> list[str]:
        out = [p for p in PROGRAMS if not (self.bin_dir / p).exists()]
        if not self.converter.exists():
            out.append("convert_hf_to_gguf.py")
        return out

    def describe(self) -> dict:
        return {"version": self.version, "commit": self.commit, "tag": self.tag, "cuda": self.cuda, "origin": self.origin,
                "root": str(self.root), "bin_dir": str(self.bin_dir), "missing": self.missing()}


def builds_root() -> Path:
    """Where pinned builds live: $GGUFBOT_TOOLCHAIN_ROOT (a container image's own copy, apart from the cache volume),
    else <cache>/llama.cpp."""
    if os.environ.get("GGUFBOT_TOOLCHAIN_ROOT"):
        return Path(os.environ["GGUFBOT_TOOLCHAIN_ROOT"]).expanduser()
    return cache_root() / "llama.cpp"


def pinned_dir(flags: BuildFlags | None = None) -> Path:
    flags = flags or build_flags()
    return builds_root() / f"{PINNED_VERSION}-{flags.key()}"


ACTIVE_FILE = "active.json"  # beside the builds: the build in use when it is not the pinned one (builds.use)


def active_build_name() -> str | None:
    """The build ``active.json`` names (converters/llama/builds.py); None: the pinned build."""
    try:
        name = json.loads((builds_root() / ACTIVE_FILE).read_text()).get("build")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name and "/" not in name and not name.startswith(".") else None


def find(required: bool = True) -> Toolchain | None:
    """The toolchain to use: LLAMA_CPP_DIR if set, else the build ``active.json`` names, else the pinned build."""
    user_dir = os.environ.get("LLAMA_CPP_DIR")
    if user_dir:
        tc = _from_user_dir(Path(user_dir).expanduser())
        if required and tc.missing():
            raise ToolchainError(f"LLAMA_CPP_DIR={user_dir} lacks: {', '.join(tc.missing())}")
        return tc
    name = active_build_name()
    if name is not None and (builds_root() / name / "toolchain.json").exists():
        d = builds_root() / name
        info = json.loads((d / "toolchain.json").read_text())
        return Toolchain(root=d / "src", bin_dir=d / "bin", version=info["version"], commit=info.get("commit"),
                         cuda=bool(info.get("cuda")), origin=info.get("source") or "git", tag=info.get("tag"))
    d = pinned_dir()
    meta = d / "toolchain.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        return Toolchain(root=d / "src", bin_dir=d / "bin", version=info["version"], commit=info.get("commit"),
                         cuda=info["cuda"], origin="pinned")
    if required:
        raise ToolchainError("llama.cpp is not installed; run 'ggufbot toolchain install' (about 6 minutes on 2 cores)")
    return None


def _from_user_dir(root: Path) -> Toolchain:
    bin_dir = next((b for b in (root / "build" / "bin", root / "bin", root) if (b / "llama-quantize").exists()),
                   root / "build" / "bin")
    version = "llama.cpp (user build)"
    commit = None
    q = bin_dir / "llama-quantize"
    if q.exists():
        try:
            res = run([q, "--version"], timeout=30)
            text = res.stdout + res.stderr
        except ToolError as e:  # some builds exit non-zero after printing it
            text = e.stderr_tail
        m = re.search(r"version:\s*(\d+)\s*\(([0-9a-f]+)\)", text)
        if m:
            version = f"llama.cpp b{m.group(1)} ({m.group(2)})"
            commit = m.group(2)
    return Toolchain(root=root, bin_dir=bin_dir, version=version, commit=commit, cuda=False, origin="LLAMA_CPP_DIR")


def install(*, jobs: int | None = None, sdist: Path | None = None, on_line: Callable[[str], None] | None = None,
            timeout: float = 3 * 3600) -> Toolchain:
    """Fetch and build the pinned llama.cpp unless already built; safe to call from several processes."""
    if os.environ.get("LLAMA_CPP_DIR"):
        tc = find(required=True)
        assert tc is not None
        return tc
    flags = build_flags()
    final = pinned_dir(flags)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f"{final.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second installer waits here, then finds the build done
        existing = find(required=False) if active_build_name() is None else None  # another build in use: not it
        if existing is not None and not existing.missing():
            return existing
        staging = Path(tempfile.mkdtemp(prefix=f"{final.name}.build-", dir=final.parent))
        staging.chmod(0o755)  # mkdtemp makes it 0700: the finished build must be readable by other users (an image)
        try:
            _build_into(staging, flags, jobs=jobs, sdist=sdist, on_line=on_line, timeout=timeout)
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)  # the build appears whole or not at all
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    tc = find(required=True)
    assert tc is not None
    return tc


def _fetch_sdist(dest: Path, on_line: Callable[[str], None] | None) -> Path:
    """Download the pinned sdist with pip (so the user's index configuration applies); check its hash."""
    cached = cache_root() / "downloads" / f"llama_cpp_python-{PINNED_VERSION}.tar.gz"
    if cached.exists() and _sha256(cached) == PINNED_SHA256:
        return cached
    dest.mkdir(parents=True, exist_ok=True)
    # --no-binary names the package alone: its build backend may come as a wheel (a wheelhouse without sdists)
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PINNED_PACKAGE,
         "--disable-pip-version-check", "-d", str(dest), f"{PINNED_PACKAGE}=={PINNED_VERSION}"],
        timeout=1800, on_line=on_line, inherit=FETCH_ENV)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise ToolchainError(f"pip did not produce the {PINNED_PACKAGE} {PINNED_VERSION} source distribution")
    got = _sha256(found[0])
    if got != PINNED_SHA256:
        raise ToolchainError(f"{found[0].name}: sha256 {got} does not match the pinned {PINNED_SHA256}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".part")
    shutil.copyfile(found[0], tmp)
    os.replace(tmp, cached)
    return cached


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _extract_llama_cpp(sdist: Path, dest: Path) -> str | None:
    """Extract vendor/llama.cpp into dest; return the llama.cpp commit recorded in the sdist, if any."""
    commit = None
    prefix_vendor = None
    with tarfile.open(sdist, "r:gz") as tf:
        members = []
        for m in tf.getmembers():
            parts = m.name.split("/", 1)
            if len(parts) < 2:
                continue
            rel = parts[1]
            if rel == ".git/modules/vendor/llama.cpp/HEAD":
                f = tf.extractfile(m)
                if f is not None:
                    head = f.read().decode().strip()
                    if re.fullmatch(r"[0-9a-f]{40}", head):
                        commit = head
            if rel.startswith("vendor/llama.cpp/"):
                prefix_vendor = parts[0] + "/vendor/llama.cpp/"
                sub = m.name[len(prefix_vendor):]
                if not sub or sub == ".git":
                    continue
                m.name = sub
                members.append(m)
        if prefix_vendor is None:
            raise ToolchainError(f"{sdist.name} holds no vendor/llama.cpp")
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, members=members, filter="data")
        else:  # Python before 3.11.4 (Debian 12's 3.11.2): no filters; the sdist's hash is pinned, check names anyway
            bad = [m.name for m in members if m.name.startswith("/") or ".." in Path(m.name).parts
                   or m.issym() or m.islnk() or m.isdev()]
            if bad:
                raise ToolchainError(f"{sdist.name}: unsafe members {bad[:3]}")
            tf.extractall(dest, members=members)
    return commit


def _build_into(staging: Path, flags: BuildFlags, *, jobs: int | None, sdist: Path | None,
                on_line: Callable[[str], None] | None, timeout: float) -> None:
    started = time.monotonic()
    if shutil.which("cmake") is None:
        raise ToolchainError("cmake is not installed (needed to build llama.cpp)")
    sdist = sdist or _fetch_sdist(staging / "download", on_line)
    src = staging / "src"
    src.mkdir()
    commit = _extract_llama_cpp(sdist, src)
    shutil.rmtree(staging / "download", ignore_errors=True)
    build = staging / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    log.info("toolchain: configuring llama.cpp (%s)", "CUDA" if flags.cuda else "CPU")
    run(["cmake", "-S", str(src), "-B", str(build), *gen, *flags.cmake_args()], timeout=1800, on_line=on_line,
        inherit=BUILD_ENV)
    n = jobs or os.cpu_count() or 2
    log.info("toolchain: building %s with %d jobs", ", ".join(PROGRAMS), n)
    run(["cmake", "--build", str(build), "--config", "Release", "-j", str(n), "--target", *PROGRAMS],
        timeout=timeout, on_line=on_line, inherit=BUILD_ENV)
    bin_dir = staging / "bin"
    bin_dir.mkdir()
    for p in PROGRAMS:
        built = build / "bin" / p
        if not built.exists():
            raise ToolchainError(f"build finished but {p} is missing")
        shutil.copy2(built, bin_dir / p)
    shutil.rmtree(build)
    version = f"{PINNED_PACKAGE} {PINNED_VERSION} (llama.cpp {commit[:7] if commit else 'unknown'})"
    meta = {"version": version, "package": PINNED_PACKAGE, "package_version": PINNED_VERSION, "commit": commit,
            "cuda": flags.cuda, "cmake_args": flags.cmake_args(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - started, 1)}
    (staging / "toolchain.json").write_text(json.dumps(meta, indent=2))
