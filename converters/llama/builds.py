"""The registry of llama.cpp builds: install one from any source, list them, choose the one in use.

Every build lives in its own folder of :func:`toolchain.builds_root` with ``src/`` (the tree: converter, gguf-py and
the sources of the programs), ``bin/`` (the programs) and ``toolchain.json`` (source kind, commit, release tag,
native digest, build flags). The folder's name is its cache key:

- ``<pinned version>-<flags>``: the pinned build (:func:`converters.llama.build.install`, unchanged);
- ``git-<commit>-<flags>``: a commit of a git repository;
- ``dir-<commit or tree digest>-<flags>``: a local checkout (its commit when clean, else the digest of its files).

Installing a build that already exists is a no-op. A new tree whose native digest (:func:`sources.native_digest`:
every file the programs are compiled from) and flags equal an existing build's reuses that build's programs
(hard links, or a copy across file systems) instead of compiling: the programs are a function of those files, the
flags and the compiler, so a release that only changed ``convert_hf_to_gguf.py`` or gguf-py (most of them) is
ready in seconds, and its converter still comes from its own tree.

The build in use is named in ``active.json`` beside the builds (:func:`use`); without it, the pinned build is used
(:func:`toolchain.find` reads the file). ``LLAMA_CPP_DIR`` still overrides both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from converters.core.errors import ToolchainError
from converters.llama import build as build_mod
from converters.llama import sources
from converters.llama import toolchain as tc
from converters.llama.sources import Checkout, Source

log = logging.getLogger(__name__)

META = "toolchain.json"
DIGEST_FILE = "native_digest"  # the cached native digest of a build whose toolchain.json does not hold it (the pinned one)


@dataclasses.dataclass(frozen=True)
class Build:
    """One finished build in the registry."""

    name: str
    path: Path
    source: str  # pinned | git | dir
    version: str
    commit: str | None
    tag: str | None
    flags_key: str
    cuda: bool
    native_digest: str | None
    reused_from: str | None = None  # the build whose programs this one links to
    built_at: str | None = None

    def toolchain(self) -> tc.Toolchain:
        return tc.Toolchain(root=self.path / "src", bin_dir=self.path / "bin", version=self.version,
                            commit=self.commit, cuda=self.cuda, origin=self.source, tag=self.tag)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "version": self.version, "commit": self.commit,
                "tag": self.tag, "flags": self.flags_key, "cuda": self.cuda, "native_digest": self.native_digest,
                "reused_from": self.reused_from, "built_at": self.built_at}


def load(path: Path) -> Build | None:
    """The build in ``path``; None when it is not a finished build."""
    try:
        info = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    if not (path / "bin").is_dir() or not (path / "src").is_dir():
        return None
    source = info.get("source") or "pinned"
    digest = info.get("native_digest")
    if digest is None:
        with contextlib.suppress(OSError):
            digest = _digest_file(path.name).read_text().strip() or None
    flags_key = info.get("flags_key") or path.name.rsplit("-", 1)[-1]
    return Build(name=path.name, path=path, source=source, version=info.get("version") or path.name,
                 commit=info.get("commit"), tag=info.get("tag"), flags_key=flags_key, cuda=bool(info.get("cuda")),
                 native_digest=digest, reused_from=info.get("reused_from"), built_at=info.get("built_at"))


def builds() -> list[Build]:
    """Every finished build, oldest first."""
    root = tc.builds_root()
    if not root.is_dir():
        return []
    found = [b for p in sorted(root.iterdir()) if p.is_dir() and (b := load(p)) is not None]
    return sorted(found, key=lambda b: (b.built_at or "", b.name))


def _active_file() -> Path:
    return tc.builds_root() / tc.ACTIVE_FILE


def active() -> Build | None:
    """The build named in ``active.json``; None: the pinned build is in use."""
    name = tc.active_build_name()
    return load(tc.builds_root() / name) if name else None


def in_use() -> Build | None:
    """The build :func:`toolchain.find` uses (None under ``LLAMA_CPP_DIR`` or when nothing is built)."""
    if os.environ.get("LLAMA_CPP_DIR"):
        return None
    return active() or load(tc.pinned_dir())


def select(selector: str) -> Build:
    """A build by name, release tag, commit (or its prefix, 7 characters at least), or ``pinned``."""
    if selector == "pinned":
        b = load(tc.pinned_dir())
        if b is None:
            raise ToolchainError("the pinned build is not installed; run 'ggufbot toolchain install'")
        return b
    flags = tc.build_flags().key()
    every = builds()
    for test in (lambda b: b.name == selector, lambda b: b.tag == selector,
                 lambda b: len(selector) >= 7 and (b.commit or "").startswith(selector)):
        hits = [b for b in every if test(b)]
        if hits:  # this machine's flags first, then the newest
            return sorted(hits, key=lambda b: (b.flags_key == flags, b.built_at or ""))[-1]
    raise ToolchainError(f"no build matches {selector!r} (see 'ggufbot toolchain list')")


def use(selector: str | Build) -> Build:
    """Make a build the one in use (``pinned``: back to the pinned build). Jobs already running keep theirs."""
    b = selector if isinstance(selector, Build) else select(selector)
    f = _active_file()
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".{f.name}.{os.getpid()}")
    if b.path == tc.pinned_dir():
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    else:
        tmp.write_text(json.dumps({"build": b.name, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        os.replace(tmp, f)
    log.info("toolchain: %s is now in use (%s)", b.name, b.version)
    return b


def digest_of(b: Build) -> str:
    """The build's native digest; computed once from its tree for a build that does not record it."""
    if b.native_digest:
        return b.native_digest
    digest = sources.native_digest(b.path / "src")
    with contextlib.suppress(OSError):
        _digest_file(b.name).write_text(digest + "\n")
    return digest


def _digest_file(name: str) -> Path:
    """Where the native digest of a build that does not record it is kept: beside the builds, never inside one (the
    pinned build may be read-only, or shared)."""
    return tc.builds_root() / f".{name}.{DIGEST_FILE}"


def donor_for(digest: str, flags_key: str, *, exclude: str | None = None) -> Build | None:
    """A finished build of the same native digest and flags, whose programs another tree can reuse."""
    for b in reversed(builds()):
        if b.name == exclude or b.flags_key != flags_key or b.toolchain().missing():
            continue
        if digest_of(b) == digest:
            return b
    return None


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    root = tc.builds_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second installer waits here, then finds the build done
        yield


def install(source: Source, *, jobs: int | None = None, on_line: Callable[[str], None] | None = None,
            timeout: float = 3 * 3600, low_priority: bool = False) -> Build:
    """The build of ``source``: the cached one when it exists, else a new one (reusing the programs of a build with
    the same native digest and flags, else compiling; ``low_priority``: under ``nice``/``ionice``)."""
    if source.kind == "pinned":
        b = load(tc.pinned_dir())
        if b is not None and not b.toolchain().missing():
            return b  # built already (whichever build is in use)
        build_mod.install(jobs=jobs, on_line=on_line, timeout=timeout)
        b = load(tc.pinned_dir())
        assert b is not None
        return b
    flags = tc.build_flags()
    fkey = flags.key()
    if source.kind == "git":
        known = _known_commit(source)
        if known is not None and (b := load(tc.builds_root() / f"git-{known[:12]}-{fkey}")) is not None:
            return b
    with _locked(f"install-{source.kind}"):
        root = tc.builds_root()
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        staging.chmod(0o755)
        try:
            co = _checkout(source, staging / "src")
            key = (co.commit or sources.tree_digest(co.root))[:12]
            final = root / f"{source.kind}-{key}-{fkey}"
            existing = load(final)
            if existing is not None:
                return existing
            digest = sources.native_digest(co.root)
            donor = donor_for(digest, fkey)
            started = time.monotonic()
            if donor is not None:
                log.info("toolchain: %s has the native digest of %s: reusing its programs", key, donor.name)
                _link_programs(donor.path / "bin", staging / "bin")
            else:
                build_mod.compile_programs(co.root, staging, flags, jobs=jobs, on_line=on_line, timeout=timeout,
                                           low_priority=low_priority)
            meta = {"version": _version(source, co), "source": source.kind, "url": source.url, "ref": source.ref,
                    "commit": co.commit, "tag": co.tag, "native_digest": digest, "flags_key": fkey,
                    "cuda": flags.cuda, "cmake_args": flags.cmake_args(),
                    "reused_from": donor.name if donor else None,
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "build_seconds": round(time.monotonic() - started, 1)}
            if source.kind == "dir":
                meta["url"] = None  # a machine path is no business of a report
            (staging / META).write_text(json.dumps(meta, indent=2))
            build_mod.move_into_place(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    b = load(final)
    if b is None or b.toolchain().missing():
        raise ToolchainError(f"build {final.name} is incomplete: {', '.join(b.toolchain().missing()) if b else META}")
    return b


def _known_commit(source: Source) -> str | None:
    """The commit a git ref names without fetching it: a full commit id, or a tag of the remote."""
    ref = source.ref or ""
    if len(ref) == 40 and all(c in "0123456789abcdef" for c in ref):
        return ref
    if ref and source.url:
        return sources.remote_tags(source.url).get(ref)
    return None


def _checkout(source: Source, dest: Path) -> Checkout:
    if source.kind == "git":
        assert source.url is not None
        return sources.fetch_git(source.url, source.ref, dest)
    assert source.path is not None
    return sources.copy_dir(source.path, dest)


def _version(source: Source, co: Checkout) -> str:
    """``llama.cpp b6500 (1a2b3c4)``: the release tag and commit, as the card and report.json name them."""
    if co.commit is None:
        return f"llama.cpp local tree {sources.tree_digest(co.root)[:7]}"
    return f"llama.cpp {co.tag} ({co.commit[:7]})" if co.tag else f"llama.cpp {co.commit[:7]}"


def _link_programs(src: Path, dest: Path) -> None:
    dest.mkdir()
    for p in tc.PROGRAMS:
        try:
            os.link(src / p, dest / p)
        except OSError:
            shutil.copy2(src / p, dest / p)
