"""Stage quantize: one quant type of the ladder with llama-quantize, split when over the size limit."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from pathlib import Path

from converters.core import proc
from converters.core import names
from converters.core import records
from converters.core.errors import NeedsImatrix
from converters.core.hooks import NULL_HOOKS, Hooks
from converters.core.quants import QuantType
from converters.core.stages import StageOutcome, check_disk
from converters.formats import gguf_meta
from converters.core.proc import run
from converters.llama.toolchain import Toolchain

log = logging.getLogger(__name__)

DEFAULT_SPLIT_MAX_BYTES = 45_000_000_000  # the Hub's per-file limit is 50 GB


def stage_name(q: QuantType) -> str:
    return f"quantize-{q.name}"


def file_name(model_name: str, q: QuantType) -> str:
    return names.quant(model_name, q.name)


def split_names(model_name: str, q: QuantType, n: int) -> list[str]:
    """Relative paths of split parts: a folder per type, as llama.cpp and the Hub's -hf loader expect."""
    return names.split_parts(model_name, q.name, n)


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """How one type is made: threads for llama-quantize, the split limit, the estimate checked against the free
    disk, the tool's timeout."""

    threads: int | None = None
    split_max_bytes: int = DEFAULT_SPLIT_MAX_BYTES
    estimated_bytes: int | None = None
    timeout: float | None = None


def _inputs(reference: Path, workdir: Path, q: QuantType, toolchain: Toolchain, imatrix: Path | None,
            split_max_bytes: int) -> dict[str, object]:
    return {
        "reference": records.content_sha256(reference, workdir),
        "imatrix": records.content_sha256(imatrix, workdir) if imatrix else None,
        "type": q.name,
        "split_max_bytes": split_max_bytes,
        "toolchain": toolchain.version,
    }


def finished(reference: Path, workdir: Path, q: QuantType, *, toolchain: Toolchain, imatrix: Path | None = None,
             split_max_bytes: int = DEFAULT_SPLIT_MAX_BYTES) -> records.StageRecord | None:
    """The record of ``q`` when it was made already for these inputs (what :func:`quantize` would skip)."""
    return records.complete(workdir, stage_name(q), _inputs(reference, workdir, q, toolchain, imatrix, split_max_bytes))


def quantize(reference: Path, workdir: Path, model_name: str, q: QuantType, *, toolchain: Toolchain,
             imatrix: Path | None = None, options: QuantizeOptions = QuantizeOptions(),
             hooks: Hooks = NULL_HOOKS) -> StageOutcome:
    """One type of the ladder; ``hooks`` is asked to stop before the tool starts (its lines are not shown)."""
    threads, split_max_bytes = options.threads, options.split_max_bytes
    estimated_bytes, timeout = options.estimated_bytes, options.timeout
    if q.needs_imatrix and imatrix is None:
        raise NeedsImatrix(q.name)
    hooks.check_cancel()
    stage = stage_name(q)
    inputs = _inputs(reference, workdir, q, toolchain, imatrix, split_max_bytes)
    done = records.complete(workdir, stage, inputs)
    if done is not None:
        log.info("quantize %s: already done, skipped", q.name)
        return StageOutcome(stage, done, skipped=True)
    if estimated_bytes:
        check_disk(workdir, estimated_bytes * (2 if estimated_bytes > split_max_bytes else 1))
    single = workdir / file_name(model_name, q)
    started = time.monotonic()
    argv: list[str | os.PathLike[str]] = [toolchain.program("llama-quantize")]
    if imatrix is not None:
        # relative to the work dir (the cwd below): llama-quantize records this name in the file's metadata,
        # and a published GGUF must not carry the bot's paths (it also makes outputs independent of the dir)
        argv += ["--imatrix", os.path.relpath(imatrix, workdir)]
    if q.large:
        argv += ["--token-embedding-type", "q8_0", "--output-tensor-type", "q8_0"]
    log.info("quantize %s: start", q.name)
    tmp = records.tmp_path_for(single)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        argv += [reference, tmp, q.base_name, str(threads or proc.cpus())]
        run([os.path.abspath(a) if isinstance(a, Path) else a for a in argv], timeout=timeout, cwd=workdir)
        if tmp.stat().st_size > split_max_bytes:
            outputs = _split(tmp, workdir, model_name, q, split_max_bytes, toolchain, timeout)
        else:
            os.replace(tmp, single)
            outputs = [single]
    finally:
        tmp.unlink(missing_ok=True)
        try:
            tmp.parent.rmdir()
        except OSError:
            pass
    # a previous run with another split limit may have left the other form of this file
    if len(outputs) > 1 and single.exists():
        single.unlink()
    elif len(outputs) == 1 and (workdir / single.stem).is_dir():
        shutil.rmtree(workdir / single.stem)
    seconds = time.monotonic() - started
    rec = records.save(workdir, stage, inputs, outputs, seconds, toolchain.version,
                       extra={"type": q.name, "parts": len(outputs)})
    log.info("quantize %s: done in %.1f s, %d file(s)", q.name, seconds, len(outputs))
    return StageOutcome(stage, rec, skipped=False)


def _split(src: Path, workdir: Path, model_name: str, q: QuantType, max_bytes: int, toolchain: Toolchain,
           timeout: float | None) -> list[Path]:
    """Split ``src`` with llama-gguf-split into ``<Model>-<TYPE>/...-0000i-of-0000N.gguf``."""
    stem = names.split_dir(model_name, q.name)
    folder = workdir / stem
    scratch = records.tmp_dir_for(workdir) / stem  # the whole folder appears at once, by one rename
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    # llama-gguf-split limits the tensor data of a part; the first part also holds all metadata (vocabulary,
    # template), so leave room for it and for alignment padding to keep every part under max_bytes
    header = gguf_meta.data_offset(src)
    max_mb = max(1, math.floor((max_bytes - header - 1_000_000) / 1_000_000))
    run([toolchain.program("llama-gguf-split"), "--split", "--split-max-size", f"{max_mb}M", src, scratch / stem],
        timeout=timeout)
    parts = sorted(scratch.glob(f"{stem}-*-of-*.gguf"))
    rels = split_names(model_name, q, len(parts))
    if not parts or [f"{stem}/{p.name}" for p in parts] != rels:
        raise FileNotFoundError(f"llama-gguf-split wrote unexpected parts for {src.name}: {[p.name for p in parts]}")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(scratch, folder)
    return [workdir / rel for rel in rels]
