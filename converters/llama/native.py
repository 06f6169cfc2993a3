"""Small programs of ggufbot's own, compiled against the toolchain's llama.cpp source tree (its ggml, unchanged).

``ggufbot-tensorerr`` (``native/tensorerr.cpp``) measures the importance-weighted error of a tensor quantized to a
type with ggml's own quantizer and dequantizer, on chosen rows (:mod:`converters.ladder.tensorerr` uses it).
``ggufbot-assemble`` (``native/assemble.cpp``) writes a file of planned tensor types byte for byte as llama-quantize
would, copying each tensor another file already holds in its planned type and quantizing only the rest
(:func:`converters.ladder.tune.build` uses it). Both link only ggml's base library (quantization, type traits, the
GGUF reader and writer), whose sources are read from the tree's ``ggml/src/CMakeLists.txt`` so that another
llama.cpp version builds its own list. Built together once per (program sources, ggml sources, compiler flags) into
:func:`helpers_root` (about half a minute on 2 cores), under a lock, moved into place whole; ``ggufbot toolchain
install`` builds them with the toolchain, and so does the container image's builder.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from converters.core import proc
from converters.core.errors import ToolchainError
from converters.core.proc import run
from converters.llama.toolchain import Toolchain, cache_root

log = logging.getLogger(__name__)

TENSORERR = "ggufbot-tensorerr"
ASSEMBLE = "ggufbot-assemble"
SOURCES = {TENSORERR: Path(__file__).parent / "native" / "tensorerr.cpp",
           ASSEMBLE: Path(__file__).parent / "native" / "assemble.cpp"}
COMMON = Path(__file__).parent / "native" / "common.h"  # what both include
# as ggml's CMake builds its base library for a Release build (no -march: the base library is portable, so its
# float arithmetic, and with it every quantized byte, is what llama-quantize computes)
C_FLAGS = ("-O3", "-std=gnu11", "-D_GNU_SOURCE", "-D_XOPEN_SOURCE=600", "-DNDEBUG")
CXX_FLAGS = ("-O3", "-std=gnu++17", "-D_GNU_SOURCE", "-D_XOPEN_SOURCE=600", "-DNDEBUG")
BUILD_TIMEOUT = 1800


def base_sources(ggml: Path) -> list[Path]:
    """The C and C++ files of ggml's base library, from ``add_library(ggml-base ...)`` in its CMakeLists."""
    text = (ggml / "src" / "CMakeLists.txt").read_text()
    m = re.search(r"add_library\(ggml-base\b(.*?)\)", text, re.S)
    if not m:
        raise ToolchainError(f"{ggml / 'src' / 'CMakeLists.txt'} declares no ggml-base library")
    names = [w for w in m.group(1).split() if w.endswith((".c", ".cpp"))]
    out = [ggml / "src" / n for n in names]
    missing = [p.name for p in out if not p.is_file()]
    if missing or not out:
        raise ToolchainError(f"ggml-base sources missing from {ggml / 'src'}: {', '.join(missing) or 'none listed'}")
    return out


def _compilers() -> tuple[str, str]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cc or not cxx:
        raise ToolchainError("no C/C++ compiler found (needed to build ggufbot's measuring program)")
    return cc, cxx


def _key(sources: list[Path], cc: str, cxx: str) -> str:
    h = hashlib.sha256()
    for p in [*SOURCES.values(), COMMON, *sources, *sorted((sources[0].parent.parent / "include").glob("*.h")),
              *sorted(sources[0].parent.glob("*.h"))]:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(repr((C_FLAGS, CXX_FLAGS, Path(cc).name, Path(cxx).name)).encode())
    return h.hexdigest()[:12]


def helpers_root() -> Path:
    """Beside the toolchain builds: ``<cache>/helpers``, or next to $GGUFBOT_TOOLCHAIN_ROOT (a container image's own
    copy, built in its builder stage, where the runtime image has no compiler)."""
    if os.environ.get("GGUFBOT_TOOLCHAIN_ROOT"):
        return Path(os.environ["GGUFBOT_TOOLCHAIN_ROOT"]).expanduser().parent / "helpers"
    return cache_root() / "helpers"


def tensorerr_program(tc: Toolchain, *, timeout: float = BUILD_TIMEOUT) -> Path:
    """The path of ``ggufbot-tensorerr`` for ``tc``'s ggml, built first when missing (safe across processes)."""
    return programs(tc, timeout=timeout) / TENSORERR


def assemble_program(tc: Toolchain, *, timeout: float = BUILD_TIMEOUT) -> Path:
    """The path of ``ggufbot-assemble`` for ``tc``'s ggml, built first when missing (safe across processes)."""
    return programs(tc, timeout=timeout) / ASSEMBLE


def programs(tc: Toolchain, *, timeout: float = BUILD_TIMEOUT) -> Path:
    """The folder of ggufbot's programs for ``tc``'s ggml, built first when missing (safe across processes)."""
    ggml = tc.root / "ggml"
    sources = base_sources(ggml)
    cc, cxx = _compilers()
    final = helpers_root() / f"native-{_key(sources, cc, cxx)}"
    if all((final / name).is_file() for name in SOURCES):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((final / name).is_file() for name in SOURCES):
            return final
        log.info("building %s against %s (about half a minute)", ", ".join(SOURCES), ggml)
        staging = Path(tempfile.mkdtemp(prefix=f"{final.name}.build-", dir=final.parent))
        try:
            gen = staging / "gen"
            gen.mkdir()
            # what CMake's configure_file makes of ggml-version.h.in
            (gen / "ggml-version.h").write_text('#pragma once\n#define GGML_VERSION "ggufbot"\n'
                                                '#define GGML_COMMIT "ggufbot"\n')
            inc = ["-I", str(gen), "-I", str(ggml / "include"), "-I", str(ggml / "src")]
            objects = []
            for i, src in enumerate(sources):
                obj = staging / f"{i}-{src.name}.o"
                compiler, flags = (cc, C_FLAGS) if src.suffix == ".c" else (cxx, CXX_FLAGS)
                run([compiler, *flags, *inc, "-c", src, "-o", obj], timeout=timeout, cwd=staging)
                objects.append(obj)
            for name, source in SOURCES.items():
                run([cxx, *CXX_FLAGS, "-I", str(ggml / "include"), source, *objects, "-o", staging / name,
                     "-lpthread", "-lm"], timeout=timeout, cwd=staging)
            for obj in objects:
                obj.unlink()
            shutil.rmtree(gen)
            staging.chmod(0o755)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return final


def threads_arg(threads: int | None) -> str:
    return str(threads or proc.cpus())
