"""Resolve a text given as a file, a URL or a Hub file into a local file, fetched once and cached.

Accepted forms:
- a local path;
- ``http(s)://...`` (downloaded once into the cache);
- ``hf://{datasets|spaces|models}/OWNER/NAME/PATH[@REVISION]`` (through the one Hub module);
- any of those followed by ``#MEMBER`` when the file is a zip archive: that member is extracted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import urllib.request
import zipfile
from pathlib import Path

from bot.hub.client import Hub
from converters.core import records
from converters.llama.calibrate import TextFile
from converters.core.errors import InputError
from converters.llama.toolchain import cache_root

log = logging.getLogger(__name__)

# Documented defaults (README): the calibration text the GGUF-my-repo Space falls back to, and the
# WikiText-2 raw test split that llama.cpp's own perplexity scripts download.
DEFAULT_CALIBRATION = "hf://spaces/ggml-org/gguf-my-repo/groups_merged.txt"
DEFAULT_EVALUATION = "hf://datasets/ggml-org/ci/wikitext-2-raw-v1.zip#wikitext-2-raw/wiki.test.raw"

_HF = re.compile(r"^hf://(datasets|spaces|models)/([^/]+/[^/@]+)/([^@]+?)(?:@([^/]+))?$")


def texts_cache() -> Path:
    return cache_root() / "texts"


def resolve_text(spec: str | os.PathLike[str], *, hub=None) -> TextFile:
    """Turn a text spec into a local TextFile (path, name, source, sha256, size)."""
    s = os.fspath(spec)
    member = None
    if "#" in s and not Path(s).exists():
        s, member = s.split("#", 1)
    if s.startswith(("http://", "https://")):
        local = _fetch_url(s)
    elif s.startswith("hf://"):
        local = _fetch_hub(s, hub)
    else:
        local = Path(s).expanduser()
        if not local.is_file():
            raise InputError(f"text file not found: {s}")
    if member:
        local = _extract_member(local, member)
    name = Path(member).name if member else local.name
    return TextFile.of(local, source=os.fspath(spec), name=name)


def _cache_name(source: str, name: str) -> Path:
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "text"
    return texts_cache() / key / safe  # a folder per source keeps the file's own name


def _fetch_url(url: str) -> Path:
    dest = _cache_name(url, url.rstrip("/").rsplit("/", 1)[-1])
    if dest.exists():
        return dest
    log.info("fetching text %s", url)
    try:
        with urllib.request.urlopen(url, timeout=120) as resp, records.atomic_output(dest) as tmp:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(resp, f, 1 << 20)
    except OSError as e:
        raise InputError(f"could not fetch {url}: {e}") from None
    return dest


def _fetch_hub(spec: str, hub) -> Path:
    m = _HF.match(spec)
    if not m:
        raise InputError(f"bad Hub text spec {spec!r}; use hf://datasets/OWNER/NAME/PATH[@REVISION]")
    kind, repo, path, rev = m.groups()
    repo_type = {"datasets": "dataset", "spaces": "space", "models": "model"}[kind]
    if hub is None:
        hub = Hub()
    got = Path(hub.download_file(repo, path, revision=rev, repo_type=repo_type))
    return got


def _extract_member(archive: Path, member: str) -> Path:
    dest = _cache_name(f"{archive}#{member}", Path(member).name)
    if dest.exists():
        return dest
    if not zipfile.is_zipfile(archive):
        raise InputError(f"{archive.name} is not a zip archive (asked for member {member})")
    with zipfile.ZipFile(archive) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise InputError(f"{archive.name} has no member {member}") from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, records.atomic_output(dest) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return dest


def same_text(a: TextFile, b: TextFile) -> bool:
    """True when two texts are the same file or the same content."""
    try:
        if a.path.resolve() == b.path.resolve():
            return True
    except OSError:
        pass
    return a.sha256 == b.sha256
