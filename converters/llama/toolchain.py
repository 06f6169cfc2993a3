"""Finding llama.cpp: the pinned build of this machine, or a user's ``LLAMA_CPP_DIR``.

The pinned llama.cpp comes from the source distribution of ``llama-cpp-python`` on PyPI (its
``vendor/llama.cpp`` holds the C++ tools, ``convert_hf_to_gguf.py`` and ``gguf-py``). It is built once
per (version, build flags) into a cache directory outside any work tree (:mod:`converters.llama.build`); an install
lock makes two processes installing at once safe. A user can instead point ``LLAMA_CPP_DIR`` at a llama.cpp checkout
with built programs. :func:`find` gives the :class:`Toolchain` to use; :class:`BuildFlags` names the build this
machine needs (CPU features, CUDA when a GPU is visible), which is also the key of its directory.

Every program, llama.cpp's and ``nvidia-smi`` included, is started through :func:`converters.core.proc.run`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import re
import shutil
from pathlib import Path

from converters.core.errors import ToolchainError, ToolError
from converters.core.proc import run

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
    "llama-bench",  # prompt and generation speed of each published file (the card's tokens/s)
)


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
