"""The supervisor every program runs under (started by :func:`converters.core.proc.run`, never imported by it).

``python -I -S reaper.py PARENT STATUS_FD CPU AS FSIZE -- PROGRAM_PATH ARGS...``

``PR_SET_PDEATHSIG`` reaches only a direct child: a program's own children (``sh -c 'sleep 123 &'``, a helper that
calls ``setsid``) would outlive a killed ggufbot as orphans of PID 1. This process sits between the two. It is a
child subreaper (``PR_SET_CHILD_SUBREAPER``: every orphaned descendant of the program is re-parented to it, not to
PID 1) and gets SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, also for a SIGKILL of ggufbot). It starts the
program in a process group of its own with the resource limits (``-`` for none) and ``PR_SET_PDEATHSIG`` SIGKILL.
When the program exits, or on SIGTERM/SIGINT/SIGHUP (ggufbot's kill request, or its death), it kills the program's
group, then every process re-parented to it, until it has no child left, and exits with the program's status
(killed by signal N: by the same signal; stopped on request: SIGKILL, as a killed program would).

A program that could not be started is reported on STATUS_FD as ``errno\\nmessage``; the file descriptor is closed
without a word once the program runs. Standard streams are the program's alone (this process holds them no longer),
so the output pipes reach end-of-file when the program and its descendants are gone. Only C modules are imported
(``posix``, ``_signal``, ``_ctypes``): start-up costs little more than a bare ``python -I -S``.
"""

import _ctypes
import _signal as signal  # C modules only: ``signal``'s enums, ``os`` and ``ctypes`` would double the start-up time
import posix as os
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WATCHED = {*STOP, signal.SIGCHLD}


class _CFunction(_ctypes.CFuncPtr):
    _flags_ = _ctypes.FUNCFLAG_CDECL  # int f(int, ...): what the ctypes package would build, without importing it


class _LibC:
    _handle = _ctypes.dlopen(None)


prctl = _CFunction(("prctl", _LibC))


def main(argv: list[str]) -> None:
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)  # nothing interrupts: signals are read below
    parent, status_fd = int(argv[1]), int(argv[2])
    limits = [None if a == "-" else int(a) for a in argv[3:6]]
    program = argv[7:]
    os.set_inheritable(status_fd, False)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    with _suppress(), open("/proc/self/comm", "w") as comm:  # the name ps and top show (and tests look for) is the
        comm.write(program[0].rsplit("/", 1)[-1][:15])          # program's: this process stands for it
    if os.getppid() != parent:  # ggufbot died before PR_SET_PDEATHSIG was set: never start as an orphan
        os._exit(137)
    me = os.getpid()
    err_r, err_w = os.pipe()  # both ends close-on-exec: end-of-file without data means the exec worked
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != me:
                os._exit(137)
            if any(v is not None for v in limits):
                import resource

                for res, value in zip((resource.RLIMIT_CPU, resource.RLIMIT_AS, resource.RLIMIT_FSIZE), limits):
                    if value is not None:
                        resource.setrlimit(res, (value, value))
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.execv(program[0], program)  # a path: run() looked the name up in the child's PATH
        except BaseException as e:  # noqa: BLE001 - anything: report it, never run on as a copy of this process
            code = e.errno if isinstance(e, OSError) and e.errno else 0
            msg = str(e) if code == 0 else str(e.filename if e.filename is not None else program[0])
            os.write(err_w, f"{code}\n{msg}".encode("utf-8", "replace"))
            os._exit(127)
    with _suppress():
        os.setpgid(pid, pid)  # also here: the group exists before anything below can signal it
    os.close(err_w)
    failed = _read_all(err_r)
    os.close(err_r)
    if failed:
        os.write(status_fd, failed)
        os.waitpid(pid, 0)
        os._exit(127)
    os.close(status_fd)
    # the program's standard streams are its own: end-of-file reaches ggufbot when the program's tree is gone
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    status = _wait_program(pid)
    _kill_tree(pid)
    _exit_like(status)


def _wait_program(pid: int) -> int:
    """Wait for the program (reaping orphans that exit meanwhile); its exit code, -N for a signal; -SIGKILL for a
    stop signal. The program is left unreaped either way."""
    while True:
        info = signal.sigwaitinfo(WATCHED)
        if info.si_signo in STOP:
            return -signal.SIGKILL  # the caller kills the tree: the program is not reaped yet
        while True:  # SIGCHLD: reap what exited, but leave the program a zombie (its group id stays ours) until
            try:
                w = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return 0
            if w is None:
                break
            if w.si_pid == pid:
                return w.si_status if w.si_code == os.CLD_EXITED else -w.si_status
            with _suppress():
                os.waitpid(w.si_pid, 0)


def _kill_tree(pid: int) -> None:
    """Kill the program's group (the program still unreaped, so its id is not reused), then every child this process
    has (the program, descendants re-parented here, theirs in turn once their parent dies), until none is left."""
    with _suppress():
        os.killpg(pid, signal.SIGKILL)
    own_group = os.getpgrp()
    while True:
        for child in _children():
            with _suppress():
                os.kill(child, signal.SIGKILL)
            with _suppress():
                pgid = os.getpgid(child)
                if pgid != own_group:
                    os.killpg(pgid, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _children() -> list[int]:
    me = os.getpid()
    try:
        return [int(p) for t in os.listdir(f"/proc/{me}/task")
                for p in open(f"/proc/{me}/task/{t}/children").read().split()]
    except OSError:  # a kernel without /proc/PID/task/TID/children: look at every process's parent
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                            out.append(int(name))
                except (OSError, IndexError, ValueError):
                    pass
        return out


def _read_all(fd: int) -> bytes:
    out = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return out
        out += chunk


def _exit_like(status: int) -> None:
    """Exit as the program did: its code, or death by its signal (without a core file)."""
    if status >= 0:
        os._exit(status)
    sig = -status
    with _suppress():
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if sig != signal.SIGKILL:
        with _suppress():
            signal.signal(sig, signal.SIG_DFL)
        with _suppress():
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # a signal whose default is not to end a process


class _suppress:
    """contextlib.suppress(OSError, ValueError) without importing contextlib."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, tb: object) -> bool:
        return kind is not None and issubclass(kind, (OSError, ValueError))  # type: ignore[arg-type]


if __name__ == "__main__":
    main(sys.argv)
