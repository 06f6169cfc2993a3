"""The deploy files carry what a GPU box needs (issue 15), read as their tools read them; the portable and CUDA
build flags of the image; the token from a systemd credential; `ggufbot doctor`'s GPU rows.

The slow proofs stay outside the suite: deploy/prove.py (the cpu image built, started, stopped, resumed) and
deploy/check_cuda.py (hadolint, CMake's CUDA configure step with nvcc)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from bot.model import settings as settings_mod
from converters.llama import toolchain

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


# ------------------------------------------------------------------------------------------------ Dockerfile
def stages(text: str) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out: dict[str, list[str]] = {}
    current = None
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(2)
            out[current] = [line]
        elif current is not None:
            out[current].append(line)
    return out


def test_dockerfile_two_targets_multistage_portable() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    st = stages(text)
    assert list(st) == ["cpu-builder", "cpu", "cuda-builder", "cuda"]  # cpu first: the classic builder builds in order
    header = text.split("\nFROM ", 1)[0]
    assert re.search(r"^ARG BASE_IMAGE=", header, re.M) and re.search(r"^ARG CUDA_DEVEL_IMAGE=", header, re.M)
    assert st["cpu-builder"][0].startswith("FROM ${BASE_IMAGE}") and st["cpu"][0].startswith("FROM ${BASE_IMAGE}")
    assert "nvidia/cuda" in text and "-devel-" in re.search(r"ARG CUDA_DEVEL_IMAGE=(\S+)", text).group(1)
    assert "-runtime-" in re.search(r"ARG CUDA_RUNTIME_IMAGE=(\S+)", text).group(1)
    assert "march=native" not in " ".join(" ".join(s) for s in st.values())  # comments may say "never"
    for name in ("cpu", "cuda"):
        body = " ".join(st[name])
        assert "build-packages" not in body and "run-packages" in body  # the runtime gets no compiler
        assert f"COPY --from={name}-builder /opt/ggufbot /opt/ggufbot" in body
        assert "GGUFBOT_PORTABLE=1" in body and "STOPSIGNAL SIGTERM" in body
        assert re.search(r"USER \d+", body)
    builder = " ".join(st["cuda-builder"])
    assert "GGUFBOT_CUDA=1" in builder and "GGUFBOT_CUDA_ARCHS=${CUDA_ARCHS}" in builder
    archs = re.search(r"ARG CUDA_ARCHS=(\S+)", builder).group(1)
    assert "native" not in archs and len(archs.split(";")) >= 4
    assert "GGUFBOT_CUDA=0" in " ".join(st["cpu-builder"])
    assert "CPU_TORCH_INDEX_URL" in " ".join(st["cpu-builder"])
    assert "CUDA_TORCH_INDEX_URL" in builder
    for name in ("cpu-builder", "cuda-builder"):  # a mirror or a local wheelhouse can be given to pip
        assert {"ARG PIP_FIND_LINKS", "ARG PIP_NO_INDEX", "ARG PIP_INDEX_URL"} <= set(st[name])


def test_dockerignore_keeps_the_venv_out() -> None:
    lines = (DEPLOY.parent / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*" and "!bot" in lines and "!deploy/image-build.sh" in lines
    assert not any(ln.startswith("!.venv") or ln == "!tests" for ln in lines)


# ---------------------------------------------------------------------------------------------- compose file
def test_compose_gpu_secret_health_and_profiles() -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    bot = doc["services"]["ggufbot"]
    devices = bot["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert bot["build"]["dockerfile"] == "deploy/Dockerfile" and "cuda" in bot["build"]["target"]
    assert "hf_token" in bot["secrets"] and doc["secrets"]["hf_token"]["file"]
    env = bot["environment"]
    assert env["GGUFBOT_HUB__TOKEN_FILE"] == "/run/secrets/hf_token"
    assert not any("TOKEN" in k and k != "GGUFBOT_HUB__TOKEN_FILE" for k in env)  # no token in docker inspect
    assert any(v.endswith(":/data") for v in bot["volumes"]) and any(v.endswith(":/cache") for v in bot["volumes"])
    assert "/healthz" in " ".join(bot["healthcheck"]["test"])
    assert bot["stop_signal"] == "SIGTERM" and re.fullmatch(r"\d+[hm]", bot["stop_grace_period"])
    assert doc["services"]["worker"]["profiles"] == ["worker"] and "worker" in doc["services"]["worker"]["command"]
    assert doc["services"]["worker"]["deploy"] == bot["deploy"]
    assert doc["services"]["postgres"]["profiles"] == ["postgres"]
    assert "POSTGRES_PASSWORD" not in doc["services"]["postgres"]["environment"]  # the _FILE form only


def seconds(value: str) -> int:
    n, unit = re.fullmatch(r"(\d+)\s*(h|min|m|s)?", value).groups()
    return int(n) * {"h": 3600, "min": 60, "m": 60, "s": 1, None: 1}[unit]


def test_compose_grace_matches_the_unit_stop_timeout() -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    unit = unit_keys()
    assert seconds(doc["services"]["ggufbot"]["stop_grace_period"]) == seconds(unit["TimeoutStopSec"][0]) >= 1800


# ------------------------------------------------------------------------------------------------ systemd unit
def unit_keys() -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in (DEPLOY / "ggufbot.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            k, v = line.split("=", 1)
            keys.setdefault(k.strip(), []).append(v.strip())
    return keys


def test_unit_stop_restart_hardening_credential() -> None:
    k = unit_keys()
    assert k["KillMode"] == ["mixed"] and k["KillSignal"] == ["SIGTERM"] and k["Restart"] == ["on-failure"]
    assert k["NoNewPrivileges"] == ["true"] and k["ProtectSystem"] == ["strict"] and k["PrivateTmp"] == ["true"]
    writable = " ".join(k["ReadWritePaths"]).split()
    data = next(v.split("=", 1)[1] for v in k["Environment"] if v.startswith("GGUFBOT__DATA_DIR="))
    cache = next(v.split("=", 1)[1] for v in k["Environment"] if v.startswith("GGUFBOT_CACHE="))
    assert data in writable and cache in writable
    assert k["LoadCredential"][0].startswith(f"{settings_mod.CREDENTIAL_NAME}:")
    assert not any("HF_TOKEN" in v for v in k.get("Environment", [])) and "EnvironmentFile" not in k


def test_unit_keeps_what_the_bot_writes_and_sees_to_its_user() -> None:
    """A child runs as the bot's user (docs/SECURITY.md): the unit makes what the service writes private to that user
    and hides other users' processes from the service and its children."""
    k = unit_keys()
    assert k["UMask"] == ["0077"] and k["ProtectProc"] == ["invisible"]
    assert "ProcSubset" not in k  # /proc/cpuinfo must stay readable: the toolchain's build key reads it


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify with a root holding the unit, its ExecStart and systemd's own units (this machine has no /opt/ggufbot)."""
    k = unit_keys()
    exe = tmp_path / k["ExecStart"][0].split()[0].lstrip("/")
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(DEPLOY / "ggufbot.service", tmp_path / "etc/systemd/system/ggufbot.service")
    shutil.copytree("/lib/systemd/system", tmp_path / "lib/systemd/system", symlinks=True)
    r = subprocess.run(["systemd-analyze", "verify", f"--root={tmp_path}", "ggufbot.service"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr  # warnings count too


# ------------------------------------------------------------------------------------------------ build flags
def test_default_build_key_ignores_nothing_new(monkeypatch) -> None:
    for var in ("GGUFBOT_PORTABLE", "GGUFBOT_CUDA_ARCHS"):
        monkeypatch.delenv(var, raising=False)
    assert toolchain.build_flags() == toolchain.BuildFlags(cuda=toolchain.want_cuda())
    assert toolchain.pinned_dir() == toolchain.pinned_dir(toolchain.BuildFlags(cuda=toolchain.want_cuda()))


def test_portable_and_cuda_arch_flags(monkeypatch) -> None:
    monkeypatch.setenv("GGUFBOT_PORTABLE", "1")
    monkeypatch.setenv("GGUFBOT_CUDA", "1")
    monkeypatch.setenv("GGUFBOT_CUDA_ARCHS", "75;86")
    flags = toolchain.build_flags()
    assert flags == toolchain.BuildFlags(cuda=True, native=False, cuda_archs="75;86")
    args = flags.cmake_args()
    assert "-DGGML_CUDA=ON" in args and "-DCMAKE_CUDA_ARCHITECTURES=75;86" in args and "-DGGML_NATIVE=OFF" in args
    assert not any("march" in a for a in args)
    if toolchain.platform.machine() in ("x86_64", "AMD64"):
        assert "-DGGML_AVX2=ON" in args and "-DGGML_AVX512=OFF" in args and "-DGGML_AMX_INT8=OFF" in args
    # the same flags on any machine: the key does not depend on this CPU
    monkeypatch.setattr(toolchain, "_cpu_flags_digest", lambda: "another-cpu")
    monkeypatch.setattr(toolchain, "_cpu_flags", lambda: frozenset())
    assert toolchain.build_flags().key() == flags.key()
    assert flags.key() != toolchain.BuildFlags(cuda=True, native=False, cuda_archs="90").key()
    assert "CMAKE_CUDA_ARCHITECTURES" not in " ".join(toolchain.BuildFlags(cuda=False, cuda_archs="75").cmake_args())


def test_toolchain_root_apart_from_the_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GGUFBOT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GGUFBOT_TOOLCHAIN_ROOT", raising=False)
    assert toolchain.pinned_dir().parent == tmp_path / "cache" / "llama.cpp"
    monkeypatch.setenv("GGUFBOT_TOOLCHAIN_ROOT", str(tmp_path / "image"))
    assert toolchain.pinned_dir().parent == tmp_path / "image"


# ------------------------------------------------------------------------------------------------ the token
def test_token_from_systemd_credential(tmp_path: Path) -> None:
    (tmp_path / "hf_token").write_text("hf_from_credential\n")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "GGUFBOT__DATA_DIR": str(tmp_path / "data")}
    assert settings_mod.load(env=env).token == "hf_from_credential"
    assert settings_mod.load(env={**env, "HF_TOKEN": "hf_env"}).token == "hf_env"  # the environment first
    assert settings_mod.load(env={"GGUFBOT__DATA_DIR": str(tmp_path / "data")}).token is None


# ------------------------------------------------------------------------------------------------ doctor
def fake_smi(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\n{body}\n")
    smi.chmod(0o755)


def fake_toolchain(tmp_path: Path, cuda: bool) -> toolchain.Toolchain:
    root = tmp_path / "tc"
    (root / "bin").mkdir(parents=True, exist_ok=True)
    args = toolchain.BuildFlags(cuda=cuda, native=False, cuda_archs="75;89").cmake_args()
    (root / "toolchain.json").write_text(json.dumps({"cmake_args": args}))
    return toolchain.Toolchain(root=root / "src", bin_dir=root / "bin", version="llama.cpp test", commit=None,
                               cuda=cuda, origin="pinned")


def doctor(capsys, monkeypatch, tc: toolchain.Toolchain) -> tuple[int, str]:
    from bot.commands import core

    monkeypatch.setattr(toolchain, "find", lambda required=True: tc)
    code = core.cmd_doctor(argparse.Namespace())
    return code, capsys.readouterr().out


def test_doctor_reports_gpu_vram_and_cuda_build(tmp_path: Path, monkeypatch, capsys) -> None:
    fake_smi(tmp_path / "bin", 'echo "NVIDIA L4, 23034, 22500, 570.86.15"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    _, out = doctor(capsys, monkeypatch, fake_toolchain(tmp_path, cuda=True))
    assert re.search(r"GPU 0\s+NVIDIA L4, VRAM 22\.5 GiB \(22\.0 GiB free\), driver 570\.86\.15", out), out
    assert re.search(r"CUDA build\s+yes, compute capabilities 75;89", out), out
    assert "no GPU is usable" not in out


def test_doctor_without_gpu(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", f"{tmp_path / 'nothing'}:/usr/bin:/bin")
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    _, out = doctor(capsys, monkeypatch, fake_toolchain(tmp_path, cuda=False))
    assert re.search(r"GPU\s+none \(no nvidia-smi\)", out) and re.search(r"CUDA build\s+no \(CPU\)", out), out
    # a CUDA build where no GPU is usable (a container started without it) is a problem
    fake_smi(tmp_path / "bin", 'echo "NVIDIA-SMI has failed because it could not communicate with the driver" >&2\n'
                               "exit 9")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    code, out = doctor(capsys, monkeypatch, fake_toolchain(tmp_path, cuda=True))
    assert code == 1 and re.search(r"GPU\s+none: nvidia-smi exited with code 9: NVIDIA-SMI has failed", out), out
    assert "llama.cpp is a CUDA build but no GPU is usable" in out
