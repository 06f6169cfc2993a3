"""Where a llama.cpp source tree comes from: the pinned source distribution, a git repository, or a local directory.

A :class:`Source` names one of three kinds (the ``[toolchain] source`` setting):

- ``pinned``: the ``vendor/llama.cpp`` of the pinned ``llama-cpp-python`` source distribution, hash-checked
  (converters/llama/toolchain.py fetches it);
- ``git``: a repository URL and a ref (a tag such as ``b6500``, a branch or a commit), fetched shallow with git; the
  commit it resolved to is recorded, and the release tag when the commit carries one;
- ``dir``: a local checkout, copied as it is (a snapshot: the converter, gguf-py and the programs come from the
  same files even if the checkout changes during the build).

Everything here is plain ``git`` run through the supervised :func:`run` with an allow-listed environment: no token
and no Hub variable reaches it, and a URL is passed as one argument after ``--`` where git allows it.

:func:`native_digest` hashes the parts of a tree that the programs are compiled from. Two trees with the same
native digest (a release that only changed ``convert_hf_to_gguf.py``, say) build the same programs, so a build of one
is reused for the other (builds.py) instead of compiling for 12 minutes again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from converters.core.errors import ConfigError, ToolchainError, ToolError
from converters.core.proc import run

KINDS = ("pinned", "git", "dir")
RELEASE_TAG = re.compile(r"^b(\d+)$")  # llama.cpp's release tags: b6500, b6501, ...
GIT_ENV = ("GIT_SSL_CAINFO", "GIT_SSL_NO_VERIFY", "GIT_ALLOW_PROTOCOL", "SSL_CERT_FILE", "SSL_CERT_DIR",
           "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "all_proxy")
GIT_TIMEOUT = 1800.0
# Not compiled into any program: a change here never changes a build (everything else counts, conservatively)
NOT_NATIVE_DIRS = frozenset({".git", ".github", ".devops", "docs", "gguf-py", "media", "__pycache__"})
NOT_NATIVE_SUFFIXES = (".py", ".md", ".pyc")


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str = "pinned"
    url: str | None = None  # git: the repository (https://..., file://..., a path)
    ref: str | None = None  # git: tag, branch or commit; None: the remote's default branch
    path: Path | None = None  # dir: the checkout

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"[toolchain] source = {self.kind!r}: one of {', '.join(KINDS)}")
        if self.kind == "git" and not self.url:
            raise ConfigError("[toolchain] source = 'git' needs url (a llama.cpp repository)")
        if self.kind == "dir" and self.path is None:
            raise ConfigError("[toolchain] source = 'dir' needs path (a llama.cpp checkout)")
        if self.ref is not None and (not self.ref or self.ref.startswith("-") or any(c.isspace() for c in self.ref)):
            raise ConfigError(f"[toolchain] ref = {self.ref!r} is not a git ref")

    def describe(self) -> dict[str, str | None]:
        return {"kind": self.kind, "url": self.url, "ref": self.ref, "path": str(self.path) if self.path else None}


@dataclasses.dataclass(frozen=True)
class Checkout:
    """A source tree fetched into ``root``: the commit it is (None: a dir that is not a clean git checkout) and
    the release tag that names that commit, if any."""

    root: Path
    commit: str | None
    tag: str | None


def _git(args: list[str], *, cwd: Path | None = None, timeout: float = GIT_TIMEOUT) -> str:
    env = {"GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1", "GIT_ASKPASS": "true"}
    try:
        return run(["git", "-c", "protocol.file.allow=always", *args], cwd=cwd, env=env, inherit=GIT_ENV,
                   timeout=timeout).stdout
    except ToolError as e:
        raise ToolchainError(f"git {args[0]}: {e.stderr_tail.strip().splitlines()[-1:] or e}") from e


def remote_tags(url: str) -> dict[str, str]:
    """Every tag of the repository at ``url`` and the commit it points to (annotated tags peeled)."""
    out = _git(["ls-remote", "--tags", "--", url])
    tags: dict[str, str] = {}
    for line in out.splitlines():
        sha, _, ref = line.partition("\t")
        if not ref.startswith("refs/tags/"):
            continue
        name = ref[len("refs/tags/"):]
        if name.endswith("^{}"):
            tags[name[:-3]] = sha  # the peeled commit of an annotated tag wins
        else:
            tags.setdefault(name, sha)
    return tags


def release_number(tag: str | None) -> int | None:
    m = RELEASE_TAG.match(tag or "")
    return int(m.group(1)) if m else None


def newest_release(tags: Iterable[str]) -> str | None:
    """The highest ``bNNNN`` tag, or None."""
    numbered = [(n, t) for t in tags if (n := release_number(t)) is not None]
    return max(numbered)[1] if numbered else None


def fetch_git(url: str, ref: str | None, dest: Path) -> Checkout:
    """A shallow checkout of ``ref`` (default branch when None) of ``url`` into ``dest`` (created, must not exist)."""
    tags = remote_tags(url)
    dest.mkdir(parents=True)
    _git(["init", "-q", str(dest)])
    want = ref or "HEAD"
    try:
        _git(["fetch", "-q", "--depth", "1", "--", url, want], cwd=dest)
    except ToolchainError:
        if not re.fullmatch(r"[0-9a-f]{7,40}", want):
            raise
        # a commit the server will not send alone: fetch every branch and tag, then check it out
        _git(["fetch", "-q", "--", url, "+refs/heads/*:refs/remotes/all/*", "+refs/tags/*:refs/tags/*"], cwd=dest)
        _git(["checkout", "-q", "--detach", want], cwd=dest)
    else:
        _git(["checkout", "-q", "--detach", "FETCH_HEAD"], cwd=dest)
    commit = _git(["rev-parse", "HEAD"], cwd=dest).strip()
    shutil.rmtree(dest / ".git")  # the tree only: the build must not read git state
    tag = ref if ref in tags and tags[ref] == commit else _tag_of(commit, tags)
    return Checkout(root=dest, commit=commit, tag=tag)


def _tag_of(commit: str, tags: dict[str, str]) -> str | None:
    names = [t for t, c in tags.items() if c == commit]
    return newest_release(names) or (sorted(names)[0] if names else None)


def copy_dir(src: Path, dest: Path) -> Checkout:
    """A snapshot of a local checkout; its commit when it is a git checkout without local changes."""
    src = src.expanduser().resolve()
    if not (src / "convert_hf_to_gguf.py").is_file() or not (src / "CMakeLists.txt").is_file():
        raise ToolchainError(f"{src} is not a llama.cpp checkout (convert_hf_to_gguf.py, CMakeLists.txt)")
    commit = tag = None
    if (src / ".git").exists():
        try:
            if not _git(["status", "--porcelain", "--untracked-files=no"], cwd=src).strip():
                commit = _git(["rev-parse", "HEAD"], cwd=src).strip()
                names = _git(["tag", "--points-at", "HEAD"], cwd=src).split()
                tag = newest_release(names) or (sorted(names)[0] if names else None)
        except ToolchainError:
            commit = None
    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns(".git", "build", "build-*", "__pycache__"))
    return Checkout(root=dest, commit=commit, tag=tag)


def native_digest(root: Path) -> str:
    """sha256 over the path and bytes of every file the programs may be compiled from (all but the Python
    converter and gguf-py, docs and CI files)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in NOT_NATIVE_DIRS and not d.startswith("build"))
        for name in sorted(filenames):
            if name.endswith(NOT_NATIVE_SUFFIXES):
                continue
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            h.update(rel.encode() + b"\0")
            if path.is_symlink():
                h.update(b"link:" + os.readlink(path).encode())
            else:
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
            h.update(b"\0")
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """sha256 over every file of a tree (a ``dir`` source that is not a clean git checkout is keyed by this)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", "__pycache__"))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()
