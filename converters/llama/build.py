"""Building the pinned llama.cpp: fetch its source distribution (pip, the hash checked), extract ``vendor/llama.cpp``,
configure and build the programs with CMake for this machine's :class:`~converters.llama.toolchain.BuildFlags`, and
move the finished build into place whole (:func:`install`; :func:`converters.llama.toolchain.find` then finds it).
Every step runs through :func:`converters.core.proc.run`, with the few more environment variables it needs
(:data:`BUILD_ENV`, :data:`FETCH_ENV`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from converters.core import proc
from converters.core.errors import ToolchainError
from converters.core.proc import run
from converters.llama.toolchain import (PINNED_PACKAGE, PINNED_SHA256, PINNED_VERSION, PROGRAMS, BuildFlags,
                                        Toolchain, active_build_name, build_flags, cache_root, find, pinned_dir)

log = logging.getLogger(__name__)

# Building llama.cpp: the compiler and CMake's own variables
BUILD_ENV = ("CC", "CXX", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "CUDACXX", "CUDAHOSTCXX", "CUDAFLAGS",
             "NVCC_", "CMAKE_", "CCACHE_", "MAKEFLAGS", "PKG_CONFIG_PATH", "LIBRARY_PATH", "CPATH", "C_INCLUDE_PATH",
             "CPLUS_INCLUDE_PATH")
# Fetching the pinned source with pip: the user's index configuration, proxies and CA certificates
FETCH_ENV = ("PIP_", "http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
             "ALL_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "XDG_CONFIG_HOME",
             "NETRC")


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
            move_into_place(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    tc = find(required=True)
    assert tc is not None
    return tc


def move_into_place(staging: Path, final: Path) -> None:
    """A finished build folder takes the place of ``final`` (one rename: the build appears whole or not at all)."""
    if final.exists():
        shutil.rmtree(final)
    os.rename(staging, final)


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
    compile_programs(src, staging, flags, jobs=jobs, on_line=on_line, timeout=timeout)
    version = f"{PINNED_PACKAGE} {PINNED_VERSION} (llama.cpp {commit[:7] if commit else 'unknown'})"
    meta = {"version": version, "package": PINNED_PACKAGE, "package_version": PINNED_VERSION, "commit": commit,
            "cuda": flags.cuda, "cmake_args": flags.cmake_args(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(time.monotonic() - started, 1)}
    (staging / "toolchain.json").write_text(json.dumps(meta, indent=2))


def compile_programs(src: Path, staging: Path, flags: BuildFlags, *, jobs: int | None,
                     on_line: Callable[[str], None] | None, timeout: float, low_priority: bool = False) -> None:
    """Configure and build the programs of the llama.cpp tree ``src`` into ``staging/bin`` (CMake's build folder
    removed after); ``low_priority``: under ``ionice -c 3`` and ``nice -n 19`` (a background build)."""
    if shutil.which("cmake") is None:
        raise ToolchainError("cmake is not installed (needed to build llama.cpp)")
    nice = lowered() if low_priority else []
    build = staging / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    log.info("toolchain: configuring llama.cpp (%s)", "CUDA" if flags.cuda else "CPU")
    run([*nice, "cmake", "-S", str(src), "-B", str(build), *gen, *flags.cmake_args()], timeout=1800,
        on_line=on_line, inherit=BUILD_ENV)
    n = jobs or proc.cpus()
    log.info("toolchain: building %s with %d jobs%s", ", ".join(PROGRAMS), n, " at low priority" if nice else "")
    run([*nice, "cmake", "--build", str(build), "--config", "Release", "-j", str(n), "--target", *PROGRAMS],
        timeout=timeout, on_line=on_line, inherit=BUILD_ENV)
    bin_dir = staging / "bin"
    bin_dir.mkdir()
    for p in PROGRAMS:
        built = build / "bin" / p
        if not built.exists():
            raise ToolchainError(f"build finished but {p} is missing")
        shutil.copy2(built, bin_dir / p)
    shutil.rmtree(build)


def lowered() -> list[str]:
    """The prefix that runs a program at the lowest CPU and I/O priority (what a background build uses)."""
    out = []
    if shutil.which("ionice"):
        out += ["ionice", "-c", "3"]
    if shutil.which("nice"):
        out += ["nice", "-n", "19"]
    return out
