"""Children get an allow-listed environment, never the bot's minus ``*_TOKEN``/``*_KEY`` (issue 19, section 4), and
can fetch nothing from the Hub (section 2): every program started through ``converters.core.proc.run``, and the two
that used to bypass it (``nvidia-smi``, ``llama-quantize --version`` of a LLAMA_CPP_DIR)."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from converters.core import proc
from converters.llama import toolchain
from converters.llama.build import BUILD_ENV, FETCH_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]

# What reached children before: secrets not named *_TOKEN/*_KEY, a database URL with its password, credential paths
SECRETS = {
    "PGPASSWORD": "pg-secret-1",
    "PGPASSFILE": "/run/secrets/pgpass",
    "DATABASE_URL": "postgresql://u:db-secret-2@h/db",
    "GGUFBOT__DATABASE_URL": "postgresql://u:db-secret-3@h/db",
    "GITHUB_PAT": "ghp_secret4",
    "OPENAI_APIKEY": "sk-secret5",
    "SENTRY_DSN": "https://secret6@sentry.example/1",
    "GGUFBOT_HUB__TOKEN_FILE": "/run/secrets/hf_token",
    "CREDENTIALS_DIRECTORY": "/run/credentials/ggufbot.service",
    "HF_TOKEN": "hf_secret7",
    "AWS_SECRET_ACCESS_KEY": "aws-secret8",
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# what a child needs and keeps: the basics, thread counts, the GPU runtime's variables
KEPT = {"LANG": "C.UTF-8", "OMP_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": "0", "GGML_CUDA_NO_PINNED": "1"}
PRINT_ENV = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]


def bot_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {**SECRETS, **KEPT}.items():
        monkeypatch.setenv(k, v)
    for k in OFFLINE:
        monkeypatch.setenv(k, "0")  # the bot's environment says online: children are offline all the same


def assert_clean(env: dict[str, str]) -> None:
    assert not set(SECRETS) & set(env), sorted(set(SECRETS) & set(env))
    leaked = [k for k, v in env.items() if any(s in v for s in SECRETS.values())]
    assert not leaked, leaked
    assert {k: env.get(k) for k in OFFLINE} == OFFLINE


def test_a_child_sees_no_secret_and_is_offline(monkeypatch):
    bot_environment(monkeypatch)
    env = json.loads(proc.run(PRINT_ENV).stdout)
    assert_clean(env)
    assert {k: env.get(k) for k in KEPT} == KEPT
    assert env["PATH"] == os.environ["PATH"] and env["HOME"] == os.environ["HOME"]
    assert not any(k.startswith("GGUFBOT") for k in env)


def test_what_the_caller_adds_is_passed_but_never_a_secret_or_online(monkeypatch):
    bot_environment(monkeypatch)
    env = json.loads(proc.run(PRINT_ENV, env={"MTMD_DEBUG_EMBEDDINGS": "/x", "EXTRA_TOKEN": "t",
                                                   "HF_HUB_OFFLINE": "0"}).stdout)
    assert env["MTMD_DEBUG_EMBEDDINGS"] == "/x" and "EXTRA_TOKEN" not in env
    assert_clean(env)


def test_the_converter_gets_its_gguf_py_and_nothing_more(monkeypatch, tmp_path):
    bot_environment(monkeypatch)
    tc = toolchain.Toolchain(root=tmp_path, bin_dir=tmp_path, version="test", commit=None, cuda=False, origin="pinned")
    env = json.loads(proc.run(PRINT_ENV, env=tc.python_env()).stdout)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "gguf-py")
    assert_clean(env)


def test_a_build_inherits_the_compiler_and_pip_settings_it_names(monkeypatch):
    bot_environment(monkeypatch)
    monkeypatch.setenv("CC", "gcc-13")
    monkeypatch.setenv("PIP_INDEX_URL", "https://pypi.example/simple")
    plain = json.loads(proc.run(PRINT_ENV).stdout)
    assert "CC" not in plain and "PIP_INDEX_URL" not in plain
    build = json.loads(proc.run(PRINT_ENV, inherit=BUILD_ENV).stdout)
    fetch = json.loads(proc.run(PRINT_ENV, inherit=FETCH_ENV).stdout)
    assert build["CC"] == "gcc-13" and fetch["PIP_INDEX_URL"] == "https://pypi.example/simple"
    assert_clean(build)
    assert_clean(fetch)


def env_dumper(path: Path, out: Path, then: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\nenv > {out}.part && mv {out}.part {out}\n{then}\n")
    path.chmod(0o755)


def read_env(out: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)


def test_nvidia_smi_runs_through_run(monkeypatch, tmp_path):
    """gpu_visible() used subprocess.run directly: nvidia-smi saw the whole environment."""
    out = tmp_path / "smi.env"
    env_dumper(tmp_path / "bin" / "nvidia-smi", out, then="echo 'GPU 0: NVIDIA L4 (UUID: GPU-x)'")
    bot_environment(monkeypatch)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert toolchain.gpu_visible() is True
    assert_clean(read_env(out))
    out.unlink()
    assert toolchain.gpus() == []  # the query's output is not the CSV: no row, but the same clean environment
    assert_clean(read_env(out))


def test_the_ggufbot_command_runs_a_user_llama_quantize_through_run(tmp_path):
    """``ggufbot toolchain info`` with LLAMA_CPP_DIR asks the user's llama-quantize for its version; it used to run
    it with subprocess.run and the bot's whole environment."""
    root = tmp_path / "llama.cpp"
    out = tmp_path / "quantize.env"
    env_dumper(root / "bin" / "llama-quantize", out, then="echo 'version: 4321 (abcdef0)' >&2")
    env = {**{k: v for k, v in os.environ.items() if k != "LLAMA_CPP_DIR"}, **SECRETS, **{k: "0" for k in OFFLINE},
           "PYTHONPATH": str(REPO_ROOT), "LLAMA_CPP_DIR": str(root)}
    r = subprocess.run([sys.executable, "-m", "bot.cli", "toolchain", "info"], cwd=REPO_ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert "LLAMA_CPP_DIR" in r.stderr  # the other programs are missing: refused, after asking the version
    assert_clean(read_env(out))
    assert toolchain._from_user_dir(root).version == "llama.cpp b4321 (abcdef0)"


OWN = textwrap.dedent("""
    import ctypes, json
    from converters.core import proc
    prctl = ctypes.CDLL(None).prctl
    before = prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
    proc.own_children()
    flag = ctypes.c_int(0)
    prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER
    print(json.dumps([before, prctl(3, 0, 0, 0, 0), flag.value]))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl")
def test_the_bot_process_is_a_subreaper_and_not_dumpable():
    """Not dumpable: a same-user child can read neither the bot's memory nor /proc/BOT/environ (which holds what the
    children are not given); a subreaper: orphans of its programs come back to it (tests/integration/test_children)."""
    r = subprocess.run([sys.executable, "-c", OWN], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert json.loads(r.stdout) == [1, 0, 1], r.stderr
    assert ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == 1  # the test process itself untouched
