"""Shared helpers of the file stages: the outcome type, disk checks, timing."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from converters.core.errors import DiskSpaceError
from converters.core.records import StageRecord

DISK_MARGIN = 1.10  # 10 % head room over the estimate


@dataclasses.dataclass(frozen=True)
class StageOutcome:
    stage: str
    record: StageRecord
    skipped: bool  # True when a finished record for the same inputs was found


def free_bytes(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check_disk(path: Path, needed: int) -> None:
    """Raise DiskSpaceError when ``needed`` bytes (plus a margin) will not fit under ``path``."""
    need = int(needed * DISK_MARGIN)
    free = free_bytes(path)
    if need > free:
        raise DiskSpaceError(str(path), need, free)
