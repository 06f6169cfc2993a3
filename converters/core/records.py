"""Stage records and atomic files: what makes a killed job resumable and a re-run free.

Each stage writes its outputs under temporary names and renames them into place, then writes a small
JSON record: the identity of its inputs (full content hashes, never sizes alone), each output's size and
sha256, the seconds spent and the tool version. A stage whose record matches its current inputs, and whose
outputs still have the recorded content, is skipped. Content hashes are cached by size + mtime + ctime + inode
(:func:`content_sha256`), so checking an unchanged file costs a ``stat``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from converters.core import names

RECORD_SCHEMA = 1
RECORDS_DIR = names.RECORDS_DIR
TMP_MARK = ".partial-"  # prefix of scratch folders; see tmp_dir_for


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_file(path: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """Identity of an input file: its size and the sha256 of its whole content (:func:`content_sha256`)."""
    return {"name": path.name, "size": path.stat().st_size, "sha256": content_sha256(path, cache_dir)}


# ------------------------------------------------------------------------------------ content hashes
# A file's full sha256 is reused while its size, mtime (ns), ctime (ns), inode and device are unchanged: any write
# to the file (in place, same size) or its replacement by another file changes one of them. The mtime alone is not
# enough: ``os.utime`` sets it back after a same-size rewrite; the ctime cannot be set by a program (the kernel
# moves it on every write, and on the utime call itself). The cache lives in memory (per process) and, given a work
# directory, in its records/HASH_CACHE_FILE, so a resumed run re-hashes nothing.
HASH_CACHE_FILE = "sha256-cache.json"
_HASH_LOCK = threading.Lock()
_HASH_MEMO: dict[str, tuple[list[int], str]] = {}


def forget_memory_hashes() -> None:
    """Drop this process's in-memory hashes (the work dirs' cache files stay): what a new process sees."""
    with _HASH_LOCK:
        _HASH_MEMO.clear()


def stat_key(path: str | os.PathLike[str]) -> list[int]:
    """What changes when a file's content may have changed: size, mtime, ctime, inode, device."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _cache_file(cache_dir: Path) -> Path:
    return Path(cache_dir) / RECORDS_DIR / HASH_CACHE_FILE


def _load_hash_cache(cache_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(_cache_file(cache_dir).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remember_sha256(path: Path, sha256: str, cache_dir: Path | None = None, key: list[int] | None = None) -> None:
    """Record ``sha256`` as the content hash of ``path`` as it is now (``key``: its stat key when hashed)."""
    p = Path(path).absolute()
    key = key or stat_key(p)
    with _HASH_LOCK:
        _HASH_MEMO[str(p)] = (key, sha256)
        if cache_dir is not None:
            data = _load_hash_cache(cache_dir)
            data[str(p)] = [*key, sha256]
            write_json_atomic(_cache_file(cache_dir), data)


def _cached(p: Path, key: list[int], cache_dir: Path | None) -> str | None:
    with _HASH_LOCK:
        hit = _HASH_MEMO.get(str(p))
        if hit is not None and hit[0] == key:
            return hit[1]
        if cache_dir is not None:
            row = _load_hash_cache(cache_dir).get(str(p))
            if isinstance(row, list) and len(row) == len(key) + 1 and row[:-1] == key:  # older rows: a miss
                _HASH_MEMO[str(p)] = (key, row[-1])
                return str(row[-1])
    return None


def content_sha256(path: str | os.PathLike[str], cache_dir: Path | None = None) -> str:
    """The sha256 of the whole file, from the cache when its size, mtime, ctime, inode and device are unchanged."""
    p = Path(path).absolute()
    key = stat_key(p)
    hit = _cached(p, key, cache_dir)
    if hit is not None:
        return hit
    sha = sha256_file(p)
    if stat_key(p) == key:  # not changed while it was read
        remember_sha256(p, sha, cache_dir, key)
    return sha


def tmp_dir_for(directory: Path) -> Path:
    """This thread's scratch folder inside ``directory``: ``.partial-<pid>-<thread>``. Nothing in it is
    finished; one folder per thread, so parallel stages never remove each other's scratch space."""
    return directory / f"{TMP_MARK}{os.getpid()}-{threading.get_ident()}"


def tmp_path_for(final: Path) -> Path:
    """Where to write ``final`` before it is complete: same name (tools that read the extension still
    work) inside the scratch folder, so a killed write never leaves a file that passes for a finished one."""
    return tmp_dir_for(final.parent) / final.name


@contextlib.contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success rename it to ``final``; on failure remove it."""
    tmp = tmp_path_for(final)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp} was not written")
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with contextlib.suppress(OSError):
            tmp.parent.rmdir()  # only when empty: other outputs of this process may be in flight


class NotAnObject(ValueError):
    """A JSON file that parsed but does not hold an object."""


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``. Raises FileNotFoundError, ValueError (not JSON, not UTF-8) or
    :class:`NotAnObject`; callers turn these into their own typed errors."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise NotAnObject("not a JSON object")
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def remove_partials(directory: Path) -> list[Path]:
    """Delete temporary files left by a killed stage; return what was removed."""
    removed = []
    if directory.exists():
        for p in sorted(directory.rglob(f"{TMP_MARK}*"), reverse=True):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            elif p.exists():
                p.unlink()
                removed.append(p)
    return removed


@dataclasses.dataclass(frozen=True)
class Output:
    path: str  # relative to the work directory
    size: int
    sha256: str

    @classmethod
    def of(cls, workdir: Path, path: Path) -> "Output":
        return cls(path=str(path.relative_to(workdir)), size=path.stat().st_size,
                   sha256=content_sha256(path, workdir))


@dataclasses.dataclass(frozen=True)
class StageRecord:
    stage: str
    inputs: dict[str, Any]
    outputs: tuple[Output, ...]
    seconds: float
    tool_version: str | None
    finished_at: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema: int = RECORD_SCHEMA

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["outputs"] = [dataclasses.asdict(o) for o in self.outputs]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StageRecord":
        return cls(stage=d["stage"], inputs=d["inputs"], outputs=tuple(Output(**o) for o in d["outputs"]),
                   seconds=d["seconds"], tool_version=d.get("tool_version"), finished_at=d["finished_at"],
                   extra=d.get("extra", {}), schema=d.get("schema", RECORD_SCHEMA))

    def output_paths(self, workdir: Path) -> list[Path]:
        return [workdir / o.path for o in self.outputs]


def record_path(workdir: Path, stage: str) -> Path:
    return workdir / names.record(stage)


def load(workdir: Path, stage: str) -> StageRecord | None:
    p = record_path(workdir, stage)
    if not p.exists():
        return None
    try:
        rec = StageRecord.from_json(json.loads(p.read_text()))
    except (ValueError, KeyError, TypeError):
        return None
    return rec if rec.schema == RECORD_SCHEMA else None


def complete(workdir: Path, stage: str, inputs: dict[str, Any]) -> StageRecord | None:
    """The stage's record if it is finished for these exact inputs and its outputs are intact: each output's
    content hash still equals the recorded one (re-read only when the file's :func:`stat_key` changed)."""
    rec = load(workdir, stage)
    if rec is None or _canon(rec.inputs) != _canon(inputs):
        return None
    for o in rec.outputs:
        p = workdir / o.path
        if not p.is_file() or p.stat().st_size != o.size or content_sha256(p, workdir) != o.sha256:
            return None
    return rec


def save(workdir: Path, stage: str, inputs: dict[str, Any], outputs: list[Path], seconds: float,
         tool_version: str | None, extra: dict[str, Any] | None = None) -> StageRecord:
    rec = StageRecord(
        stage=stage,
        inputs=inputs,
        outputs=tuple(Output.of(workdir, p) for p in outputs),
        seconds=round(seconds, 3),
        tool_version=tool_version,
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        extra=extra or {},
    )
    write_json_atomic(record_path(workdir, stage), rec.to_json())
    return rec


def _canon(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=str)
