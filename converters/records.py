"""Stage records and atomic files: what makes a killed job resumable and a re-run free.

Each stage writes its outputs under temporary names and renames them into place, then writes a small
JSON record: the identity of its inputs, each output's size and sha256, the seconds spent and the tool
version. A stage whose record matches its current inputs, and whose outputs are still there with the
recorded sizes, is skipped.
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

RECORD_SCHEMA = 1
RECORDS_DIR = "records"
TMP_MARK = ".partial-"  # prefix of scratch folders; see tmp_dir_for


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_file(path: Path, full_hash_limit: int = 64 << 20) -> dict[str, Any]:
    """Identity of an input file: size and sha256 (files larger than the limit: hash of head, tail and size)."""
    size = path.stat().st_size
    if size <= full_hash_limit:
        return {"name": path.name, "size": size, "sha256": sha256_file(path)}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    h.update(str(size).encode())
    return {"name": path.name, "size": size, "sample_sha256": h.hexdigest()}


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
        return cls(path=str(path.relative_to(workdir)), size=path.stat().st_size, sha256=sha256_file(path))


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
    return workdir / RECORDS_DIR / f"{stage}.json"


def load(workdir: Path, stage: str) -> StageRecord | None:
    p = record_path(workdir, stage)
    if not p.exists():
        return None
    try:
        rec = StageRecord.from_json(json.loads(p.read_text()))
    except (ValueError, KeyError, TypeError):
        return None
    return rec if rec.schema == RECORD_SCHEMA else None


def complete(workdir: Path, stage: str, inputs: dict[str, Any], verify_hash: bool = False) -> StageRecord | None:
    """The stage's record if it is finished for these exact inputs and its outputs are intact."""
    rec = load(workdir, stage)
    if rec is None or _canon(rec.inputs) != _canon(inputs):
        return None
    for o in rec.outputs:
        p = workdir / o.path
        if not p.exists() or p.stat().st_size != o.size:
            return None
        if verify_hash and sha256_file(p) != o.sha256:
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
