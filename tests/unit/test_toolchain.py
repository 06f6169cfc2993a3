import sys
import time

import pytest

from converters.core import proc
from converters.llama import toolchain
from converters.core.errors import ToolchainError, ToolError


def test_run_returns_output_of_an_argument_list():
    res = proc.run([sys.executable, "-c", "import sys; print('out; $HOME'); print('err', file=sys.stderr)"])
    assert res.stdout.strip() == "out; $HOME"  # no shell: nothing is expanded
    assert res.stderr.strip() == "err" and res.returncode == 0


def test_non_zero_exit_raises_with_stderr_tail():
    code = "import sys; sys.stderr.write('x' * 10000 + '\\nfinal reason\\n'); sys.exit(3)"
    with pytest.raises(ToolError) as ei:
        proc.run([sys.executable, "-c", code])
    e = ei.value
    assert e.returncode == 3 and not e.timed_out and not e.transient
    assert e.stderr_tail.endswith("final reason\n") and len(e.stderr_tail) <= proc.STDERR_TAIL_CHARS
    assert "final reason" in str(e) and "code 3" in str(e)


def test_timeout_kills_the_process_group(tmp_path):
    marker = tmp_path / "child.pid"
    code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f"open({str(marker)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    t0 = time.monotonic()
    with pytest.raises(ToolError) as ei:
        proc.run([sys.executable, "-c", code], timeout=2)
    assert ei.value.timed_out and ei.value.transient
    assert time.monotonic() - t0 < 30
    child = int(marker.read_text())
    assert _dead(child)  # the grandchild died with the group


def _dead(pid: int) -> bool:
    for _ in range(50):
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):  # killed, waiting to be reaped by init
            return True
        time.sleep(0.1)
    return False


def test_missing_program_is_a_tool_error(tmp_path):
    with pytest.raises(ToolError):
        proc.run([str(tmp_path / "no-such-program")])


def test_on_line_sees_every_line():
    lines = []
    proc.run([sys.executable, "-c", "print('a'); print('b')"], on_line=lines.append)
    assert lines == ["a", "b"]


def test_build_key_depends_on_flags():
    assert toolchain.BuildFlags(cuda=False).key() != toolchain.BuildFlags(cuda=True).key()
    assert "-DGGML_CUDA=ON" in toolchain.BuildFlags(cuda=True).cmake_args()


@pytest.mark.parametrize("cpu, on, off", [
    # a Sapphire Rapids class CPU: every AVX-512 extension on, AMX never (ggml's AMX backend segfaults there)
    ({"sse4_2", "avx", "avx2", "bmi2", "fma", "f16c", "avx_vnni", "avx512f", "avx512cd", "avx512vl", "avx512dq",
      "avx512bw", "avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"},
     {"AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI"}, {"AMX_TILE", "AMX_INT8", "AMX_BF16"}),
    # an AVX2-only CPU: no AVX-512 code that would die on an illegal instruction
    ({"sse4_2", "avx", "avx2", "bmi2", "fma", "f16c"}, {"AVX", "AVX2", "FMA", "F16C"},
     {"AVX512", "AVX512_VNNI", "AVX_VNNI", "AMX_INT8"}),
    # AVX-512 needs all five of its base extensions
    ({"avx512f", "avx512cd"}, set(), {"AVX512"}),
])
def test_native_x86_build_names_the_cpu_features_and_never_amx(monkeypatch, cpu, on, off):
    monkeypatch.setattr(toolchain.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(toolchain, "_cpu_flags", lambda: frozenset(cpu))
    args = toolchain.BuildFlags(cuda=False).cmake_args()
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_NATIVE=ON" not in args
    for opt in on:
        assert f"-DGGML_{opt}=ON" in args
    for opt in off:
        assert f"-DGGML_{opt}=OFF" in args


def test_cuda_needs_a_visible_gpu_not_just_nvcc(monkeypatch):
    monkeypatch.delenv("GGUFBOT_CUDA", raising=False)
    monkeypatch.setattr(toolchain, "gpu_visible", lambda: False)
    assert toolchain.want_cuda() is False
    monkeypatch.setenv("GGUFBOT_CUDA", "1")
    assert toolchain.want_cuda() is True


def test_user_dir_without_programs_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(ToolchainError) as ei:
        toolchain.find(required=True)
    assert "llama-quantize" in str(ei.value)


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GGUFBOT_CACHE", str(tmp_path))
    assert toolchain.cache_root() == tmp_path
    assert toolchain.pinned_dir().parent == tmp_path / "llama.cpp"


FAKE_INSTALL = r"""
import json, os, sys, time
from pathlib import Path
from converters.llama import build, toolchain

def fake_build(staging, flags, **kw):
    with open(os.environ["COUNTER"], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(1.0)  # long enough for the other process to arrive at the lock
    (staging / "src").mkdir()
    (staging / "src" / "convert_hf_to_gguf.py").write_text("")
    (staging / "bin").mkdir()
    for p in toolchain.PROGRAMS:
        (staging / "bin" / p).write_text("")
    (staging / "toolchain.json").write_text(json.dumps({"version": "fake", "cuda": False}))

build._build_into = fake_build
tc = build.install()
print(tc.bin_dir)
"""


def test_concurrent_installs_build_once(tmp_path):
    import subprocess

    env = {**__import__("os").environ, "GGUFBOT_CACHE": str(tmp_path / "cache"), "COUNTER": str(tmp_path / "n"),
           "GGUFBOT_CUDA": "0"}
    env.pop("LLAMA_CPP_DIR", None)
    procs = [subprocess.Popen([sys.executable, "-c", FAKE_INSTALL], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and outs[0].endswith("/bin")
    assert len((tmp_path / "n").read_text().splitlines()) == 1  # the second waited and found the build
    leftovers = [p.name for p in (tmp_path / "cache" / "llama.cpp").iterdir() if ".build-" in p.name]
    assert leftovers == []


def test_on_line_gets_what_a_program_flushed_without_ending_the_line():
    """llama-imatrix prints its chunk counter as ``[1]5.81,[2]6.02,`` with no newline until the end: each flushed
    piece reaches ``on_line`` while the program runs; lines split by ``\\r`` (progress bars) come one by one."""
    seen: list[tuple[str, float]] = []
    code = ("import sys, time\nfor i in (1, 2):\n    sys.stdout.write(f'[{i}]5.8,'); sys.stdout.flush(); time.sleep(0.5)\n"
            "print(); print('10%\\r50%\\r100%')")
    started = time.monotonic()
    res = proc.run([sys.executable, "-c", code], on_line=lambda s: seen.append((s, time.monotonic())))
    assert [s for s, _ in seen] == ["[1]5.8,", "[2]5.8,", "", "10%", "50%", "100%"]
    assert seen[0][1] - started < res.seconds - 0.4  # the first piece came while the program was still running
    assert res.stdout == "[1]5.8,[2]5.8,\n10%\r50%\r100%\n"
