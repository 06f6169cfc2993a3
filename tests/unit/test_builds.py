"""The build registry (converters/llama/builds.py) on small fake trees: a git tree with the native digest of a cached
build reuses its programs, a second install is the cache entry, ``use``/``select`` by tag, commit and ``pinned``; and
the canary's comparison (bot/service/canary.compare)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bot.service.canary import Figures, compare
from converters.core.errors import ToolchainError
from converters.llama import builds, sources
from converters.llama import toolchain as tc
from tests.unit.test_sources import git


def _tree(root: Path, converter: str) -> None:
    (root / "ggml").mkdir(parents=True)
    (root / "CMakeLists.txt").write_text("project(x)\n")
    (root / "ggml" / "a.c").write_text("int a;\n")
    (root / "convert_hf_to_gguf.py").write_text(converter)


@pytest.fixture
def root(tmp_path: Path, monkeypatch) -> Path:
    r = tmp_path / "builds"
    monkeypatch.setenv("GGUFBOT_TOOLCHAIN_ROOT", str(r))
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    pinned = tc.pinned_dir()
    _tree(pinned / "src", "# pinned converter\n")
    (pinned / "bin").mkdir()
    for p in tc.PROGRAMS:
        (pinned / "bin" / p).write_text(f"#!/bin/sh\necho {p}\n")
    (pinned / "toolchain.json").write_text(json.dumps({"version": "pinned v", "commit": "c" * 40, "cuda": False}))
    return r


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "llama.cpp"
    _tree(r, "# converter b2: a new architecture\n")
    git(r, "init", "-q", "-b", "master")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "b2")
    git(r, "tag", "b2")
    (r / "ggml" / "a.c").write_text("int a = 3;\n")
    git(r, "commit", "-qam", "native change")
    git(r, "tag", "b3")
    return r


def test_same_native_digest_reuses_the_programs_and_a_second_install_is_the_cache(root, repo, monkeypatch):
    compiled = []
    monkeypatch.setattr(builds.build_mod, "compile_programs", lambda *a, **k: compiled.append(a))
    b = builds.install(sources.Source("git", url=repo.as_uri(), ref="b2"))
    assert compiled == [] and b.reused_from == tc.pinned_dir().name
    assert (b.tag, b.source, b.version) == ("b2", "git", f"llama.cpp b2 ({b.commit[:7]})")
    assert (b.path / "bin" / "llama-quantize").stat().st_ino == (tc.pinned_dir() / "bin" / "llama-quantize").stat().st_ino
    assert "b2" in (b.path / "src" / "convert_hf_to_gguf.py").read_text()  # its own converter
    assert builds.install(sources.Source("git", url=repo.as_uri(), ref="b2")) == b
    assert builds.in_use().name == tc.pinned_dir().name  # installing is not using
    builds.use("b2")
    found = tc.find()
    assert (found.tag, found.commit, found.origin, found.root) == ("b2", b.commit, "git", b.path / "src")
    assert builds.select(b.commit[:8]) == b
    builds.use("pinned")
    assert tc.find().origin == "pinned" and builds.active() is None
    with pytest.raises(ToolchainError, match="no build matches"):
        builds.select("b999")


def test_a_native_change_compiles(root, repo, monkeypatch):
    def fake_compile(tree, staging, flags, **kw):
        assert kw["low_priority"] is True
        shutil.copytree(tc.pinned_dir() / "bin", staging / "bin")

    monkeypatch.setattr(builds.build_mod, "compile_programs", fake_compile)
    b = builds.install(sources.Source("git", url=repo.as_uri(), ref="b3"), low_priority=True)
    assert b.reused_from is None and b.tag == "b3"
    assert b.native_digest != builds.digest_of(builds.load(tc.pinned_dir()))


def test_a_dir_build_is_keyed_by_its_files_when_not_a_clean_checkout(root, tmp_path, monkeypatch):
    monkeypatch.setattr(builds.build_mod, "compile_programs", lambda *a, **k: pytest.fail("compiled"))
    src = tmp_path / "checkout"
    _tree(src, "# local converter\n")
    b = builds.install(sources.Source("dir", path=src))
    assert b.name.startswith("dir-") and b.commit is None and b.version.startswith("llama.cpp local tree ")
    assert json.loads((b.path / "toolchain.json").read_text())["url"] is None


def _figs(build: str, kld: float, err: float = 0.001, *, publishable: bool = True, tok: str = "passed",
          status: str = "passed") -> Figures:
    return Figures(build=build, revision="r", publishable=publishable, reasons=() if publishable else ("tokenizer",),
                   checks={"tokenizer": tok, "chat_template": "skipped"},
                   files={"Q8_0": {"status": status, "kld_mean": kld, "kld_mean_err": err}})


@pytest.mark.parametrize("new,ok,why", [
    (_figs("b2", 0.0105), True, ""),
    (_figs("b2", 0.030), False, "mean KLD"),
    (_figs("b2", 0.010, publishable=False), False, "not publishable"),
    (_figs("b2", 0.010, tok="failed"), False, "check tokenizer passed with b1 and fails with b2"),
    (_figs("b2", 0.010, status="failed"), False, "Q8_0 failed the gate"),
    (Figures("b2", "r", False, (), {}, {}, error="ToolError: crashed"), False, "canary job failed"),
])
def test_canary_compare(new, ok, why):
    v = compare(new, _figs("b1", 0.010), tolerance=3.0)
    assert v.passed is ok and why in v.summary()
