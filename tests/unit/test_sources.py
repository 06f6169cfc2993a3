"""llama.cpp source trees from git and local directories (converters/llama/sources.py), against a local repository
served over file:// (no machine here reaches GitHub)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from converters.core.errors import ConfigError, ToolchainError
from converters.llama import sources


def git(cwd: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> dict[str, str]:
    r = tmp_path / "llama.cpp"
    (r / "ggml").mkdir(parents=True)
    (r / "CMakeLists.txt").write_text("project(x)\n")
    (r / "ggml" / "a.c").write_text("int a;\n")
    (r / "convert_hf_to_gguf.py").write_text("# converter 1\n")
    git(r, "init", "-q", "-b", "master")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "one")
    git(r, "tag", "b100")
    c1 = git(r, "rev-parse", "HEAD").strip()
    (r / "convert_hf_to_gguf.py").write_text("# converter 2: a new architecture\n")
    git(r, "commit", "-qam", "two")
    git(r, "tag", "-a", "b101", "-m", "release b101")  # annotated: ls-remote's peeled line names the commit
    c2 = git(r, "rev-parse", "HEAD").strip()
    (r / "ggml" / "a.c").write_text("int a = 2;\n")
    git(r, "commit", "-qam", "three")
    c3 = git(r, "rev-parse", "HEAD").strip()
    return {"url": r.as_uri(), "path": str(r), "c1": c1, "c2": c2, "c3": c3}


def test_remote_tags_peel_annotated_tags_and_the_newest_release_is_numeric(repo):
    tags = sources.remote_tags(repo["url"])
    assert tags == {"b100": repo["c1"], "b101": repo["c2"]}
    assert sources.newest_release(["b99", "b1000", "b101", "v2"]) == "b1000"
    assert sources.newest_release(["v1"]) is None


@pytest.mark.parametrize("ref,commit,tag", [("b100", "c1", "b100"), ("b101", "c2", "b101"), ("master", "c3", None),
                                            (None, "c3", None), ("c2", "c2", "b101")])
def test_fetch_git_checks_out_the_ref_and_records_commit_and_tag(repo, tmp_path, ref, commit, tag):
    ref = repo[ref] if ref in ("c1", "c2", "c3") else ref
    co = sources.fetch_git(repo["url"], ref, tmp_path / "out")
    assert co.commit == repo[commit]
    assert co.tag == tag
    assert not (co.root / ".git").exists()
    text = (co.root / "convert_hf_to_gguf.py").read_text()
    assert ("converter 1" in text) == (commit == "c1")


def test_an_unknown_ref_fails_with_the_git_reason(repo, tmp_path):
    with pytest.raises(ToolchainError, match="git fetch"):
        sources.fetch_git(repo["url"], "b999", tmp_path / "out")


def test_native_digest_ignores_the_converter_but_not_the_c_sources(repo, tmp_path):
    d1 = sources.native_digest(sources.fetch_git(repo["url"], "b100", tmp_path / "1").root)
    d2 = sources.native_digest(sources.fetch_git(repo["url"], "b101", tmp_path / "2").root)
    d3 = sources.native_digest(sources.fetch_git(repo["url"], "master", tmp_path / "3").root)
    assert d1 == d2  # only convert_hf_to_gguf.py changed: the programs are the same
    assert d3 != d2


def test_copy_dir_records_the_commit_only_when_clean(repo, tmp_path):
    src = Path(repo["path"])
    co = sources.copy_dir(src, tmp_path / "clean")
    assert (co.commit, co.tag) == (repo["c3"], None)
    assert not (co.root / ".git").exists()
    git(src, "checkout", "-q", "b101")
    assert sources.copy_dir(src, tmp_path / "tagged").tag == "b101"
    (src / "ggml" / "a.c").write_text("int a = 3;\n")
    dirty = sources.copy_dir(src, tmp_path / "dirty")
    assert dirty.commit is None
    assert (dirty.root / "ggml" / "a.c").read_text() == "int a = 3;\n"
    with pytest.raises(ToolchainError, match="not a llama.cpp checkout"):
        sources.copy_dir(tmp_path, tmp_path / "nothing")


def test_source_settings_are_checked():
    with pytest.raises(ConfigError, match="needs url"):
        sources.Source("git")
    with pytest.raises(ConfigError, match="one of"):
        sources.Source("svn")
    with pytest.raises(ConfigError, match="not a git ref"):
        sources.Source("git", url="file:///x", ref="--upload-pack=evil")
