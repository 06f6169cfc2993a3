"""Plan, then execute, the ladder of one checkpoint: convert -> calibrate -> quantize.

:func:`plan` is pure: checkpoint facts + options -> the files that will be written, their estimated
sizes and the disk needed (``--dry-run`` prints it). :func:`execute` runs it; every stage skips itself
when its record shows it finished for the same inputs, so a killed run resumes where it stopped.
Writes ``plan.json`` and, at the end, ``ladder.json`` (schema in docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from converters import calibrate as calibrate_mod
from converters import convert as convert_mod
from converters import quantize as quantize_mod
from converters import quants, records
from converters.checkpoint import Checkpoint
from converters.errors import Cancelled, InputError, NeedsImatrix
from converters.stages import check_disk, free_bytes
from converters.toolchain import Toolchain

log = logging.getLogger(__name__)

LADDER_SCHEMA = 1
EventCallback = Callable[[str, str, dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class PlannedFile:
    type: str
    path: str  # relative to the work dir; the first part when split
    estimated_bytes: int
    split: bool
    needs_imatrix: bool


@dataclasses.dataclass(frozen=True)
class Plan:
    model_name: str
    out: Path
    checkpoint: Checkpoint
    ladder: tuple[quants.QuantType, ...]
    outtype: str
    reference: str
    reference_bytes: int
    calibration: calibrate_mod.TextFile | None
    calibration_chunks: int | None
    ctx: int
    imatrix: bool
    split_max_bytes: int
    jobs: int
    files: tuple[PlannedFile, ...]
    source_repo: str | None = None
    source_revision: str | None = None

    @property
    def disk_needed(self) -> int:
        """Peak bytes the work dir will hold: reference + every quant (+ one split copy at a time)."""
        split_extra = max((f.estimated_bytes for f in self.files if f.split), default=0)
        return self.reference_bytes + sum(f.estimated_bytes for f in self.files) + split_extra

    def to_json(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "source": {"repo": self.source_repo, "revision": self.source_revision, "path": str(self.checkpoint.path),
                       "architecture": self.checkpoint.architecture, "parameters": self.checkpoint.parameters},
            "reference": {"type": self.outtype.upper(), "path": self.reference, "estimated_bytes": self.reference_bytes},
            "imatrix": ({"calibration": self.calibration.describe() if self.calibration else None,
                         "chunks": self.calibration_chunks, "ctx": self.ctx} if self.imatrix else None),
            "files": [dataclasses.asdict(f) for f in self.files],
            "split_max_bytes": self.split_max_bytes,
            "jobs": self.jobs,
            "disk_needed": self.disk_needed,
        }

    def describe(self) -> str:
        """Human-readable plan for --dry-run."""
        ck = self.checkpoint
        lines = [
            f"model      {self.model_name} ({ck.architecture}, {ck.parameters / 1e6:,.1f} M parameters)",
            f"source     {self.source_repo or ck.path}" + (f" @ {self.source_revision}" if self.source_revision else ""),
            f"out        {self.out}",
            f"reference  {self.reference}  ~{_gb(self.reference_bytes)}",
        ]
        if self.imatrix:
            cal = self.calibration.name if self.calibration else "(none)"
            lines.append(f"imatrix    {cal}, {self.calibration_chunks or 'all'} chunks of {self.ctx} tokens")
        else:
            lines.append("imatrix    off")
        lines.append(f"{'type':<10} {'bpw':>5} {'estimated':>10}  file")
        for f, q in zip(self.files, self.ladder):
            lines.append(f"{f.type:<10} {q.bpw:>5.2f} {_gb(f.estimated_bytes):>10}  {f.path}" + ("  (split)" if f.split else ""))
        lines.append(f"disk       ~{_gb(self.disk_needed)} needed, {_gb(free_bytes(self.out))} free")
        lines.append(f"jobs       {self.jobs} quantization(s) in parallel")
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def model_name_for(source: str) -> str:
    """``org/Name`` or a folder path -> ``Name`` (safe for file names)."""
    name = source.rstrip("/").split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not name:
        raise InputError(f"cannot derive a model name from {source!r}")
    return name


def plan(checkpoint: Checkpoint, out: Path, *, model_name: str, ladder: str | tuple[str, ...] | list[str] | None = "default",
         outtype: str = "bf16", calibration: calibrate_mod.TextFile | None = None,
         calibration_chunks: int | None = None, ctx: int = 512, imatrix: bool = True,
         split_max_bytes: int = quantize_mod.DEFAULT_SPLIT_MAX_BYTES, jobs: int = 1,
         source_repo: str | None = None, source_revision: str | None = None) -> Plan:
    types = quants.parse_ladder(ladder)
    if imatrix and calibration is None:
        raise InputError("an importance matrix needs calibration text (give one, or turn the imatrix off)")
    if not imatrix:
        for q in types:
            if q.needs_imatrix:
                raise NeedsImatrix(q.name)
    if imatrix and calibration is not None and calibration.bytes < 2 * ctx:
        # a token is at least one byte: this text can never fill one chunk (llama-imatrix needs 2 x ctx tokens)
        raise InputError(f"calibration text {calibration.name} is too short: {calibration.bytes} bytes cannot make "
                         f"one chunk of {ctx} tokens")
    if jobs < 1:
        raise InputError(f"jobs must be at least 1 (got {jobs})")
    if split_max_bytes < 1_000_000:
        raise InputError("split size must be at least 1 MB")
    files = []
    for q in types:
        est = checkpoint.estimate_gguf_bytes(q.bpw)
        split = est > split_max_bytes
        path = quantize_mod.split_names(model_name, q, max(2, -(-est // split_max_bytes)))[0] if split \
            else quantize_mod.file_name(model_name, q)
        files.append(PlannedFile(q.name, path, est, split, q.needs_imatrix))
    return Plan(model_name=model_name, out=Path(out), checkpoint=checkpoint, ladder=types, outtype=outtype.lower(),
                reference=convert_mod.reference_name(model_name, outtype),
                reference_bytes=checkpoint.estimate_gguf_bytes(32 if outtype.lower() == "f32" else 16),
                calibration=calibration if imatrix else None, calibration_chunks=calibration_chunks, ctx=ctx,
                imatrix=imatrix, split_max_bytes=split_max_bytes, jobs=jobs, files=tuple(files),
                source_repo=source_repo, source_revision=source_revision)


def execute(p: Plan, *, toolchain: Toolchain, on_event: EventCallback | None = None,
            should_stop: Callable[[], bool] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """Run the plan; return (and write) the ladder.json content."""
    out = p.out
    out.mkdir(parents=True, exist_ok=True)
    removed = records.remove_partials(out)
    if removed:
        log.info("removed %d unfinished file(s) left by an earlier run", len(removed))
    records.write_json_atomic(out / "plan.json", p.to_json())
    emit = on_event or (lambda stage, state, info: None)

    def checkpoint_stop() -> None:
        if should_stop is not None and should_stop():
            raise Cancelled("stopped on request between stages; finished stages are kept")

    # disk: what is still to be written must fit (finished outputs are already on disk)
    remaining = 0 if records.load(out, "convert") else p.reference_bytes
    remaining += sum(f.estimated_bytes for f, q in zip(p.files, p.ladder)
                     if records.load(out, quantize_mod.stage_name(q)) is None)
    check_disk(out, remaining)
    seconds: dict[str, float] = {}

    checkpoint_stop()
    t0 = time.monotonic()
    emit("convert", "start", {})
    conv = convert_mod.convert(p.checkpoint, out, p.model_name, toolchain=toolchain, outtype=p.outtype,
                               timeout=timeout, on_line=_progress(emit, "convert"))
    emit("convert", "skip" if conv.skipped else "end", {"seconds": conv.record.seconds})
    seconds["convert"] = round(time.monotonic() - t0, 3)
    reference = out / conv.record.outputs[0].path

    imatrix_path: Path | None = None
    cal_rec = None
    if p.imatrix:
        checkpoint_stop()
        assert p.calibration is not None
        t0 = time.monotonic()
        emit("calibrate", "start", {})
        cal = calibrate_mod.calibrate(reference, out, p.model_name, p.calibration, toolchain=toolchain,
                                      chunks=p.calibration_chunks, ctx=p.ctx, timeout=timeout,
                                      on_line=_progress(emit, "calibrate"))
        emit("calibrate", "skip" if cal.skipped else "end", {"seconds": cal.record.seconds})
        seconds["calibrate"] = round(time.monotonic() - t0, 3)
        cal_rec = cal.record
        imatrix_path = out / cal.record.outputs[0].path

    checkpoint_stop()
    t0 = time.monotonic()
    emit("quantize", "start", {"types": [q.name for q in p.ladder]})
    cores = os.cpu_count() or 1
    threads = max(1, cores // p.jobs)
    results: dict[str, Any] = {}
    done_count = 0

    def one(q: quants.QuantType, est: int):
        checkpoint_stop()
        return quantize_mod.quantize(reference, out, p.model_name, q, toolchain=toolchain, imatrix=imatrix_path,
                                     threads=threads, split_max_bytes=p.split_max_bytes, estimated_bytes=est,
                                     timeout=timeout)

    with concurrent.futures.ThreadPoolExecutor(max_workers=p.jobs) as pool:
        futs = {pool.submit(one, q, f.estimated_bytes): q for q, f in zip(p.ladder, p.files)}
        try:
            for fut in concurrent.futures.as_completed(futs):
                q = futs[fut]
                res = fut.result()
                results[q.name] = res
                done_count += 1
                emit("quantize", "progress", {"type": q.name, "skipped": res.skipped, "done": done_count,
                                              "total": len(p.ladder)})
        except BaseException:
            for f in futs:
                f.cancel()
            raise
    emit("quantize", "end", {})
    seconds["quantize"] = round(time.monotonic() - t0, 3)

    files = []
    for q in p.ladder:
        rec = results[q.name].record
        total = sum(o.size for o in rec.outputs)
        files.append({
            "type": q.name, "bpw_nominal": q.bpw, "needs_imatrix": q.needs_imatrix, "description": q.description,
            "path": rec.outputs[0].path, "parts": [o.path for o in rec.outputs], "size": total,
            "sha256": rec.outputs[0].sha256, "part_sha256": [o.sha256 for o in rec.outputs],
            "bpw": round(total * 8 / p.checkpoint.parameters, 3) if p.checkpoint.parameters else None,
            "seconds": rec.seconds,
        })
    ref_out = conv.record.outputs[0]
    ladder = {
        "schema_version": LADDER_SCHEMA,
        "model_name": p.model_name,
        "source": {"repo": p.source_repo, "revision": p.source_revision, "path": str(p.checkpoint.path),
                   "architecture": p.checkpoint.architecture, "parameters": p.checkpoint.parameters,
                   "has_chat_template": p.checkpoint.has_chat_template, "license": p.checkpoint.license},
        "toolchain": {"version": toolchain.version, "commit": toolchain.commit, "cuda": toolchain.cuda},
        "reference": {"type": p.outtype.upper(), "path": ref_out.path, "size": ref_out.size, "sha256": ref_out.sha256},
        "imatrix": None,
        "files": files,
        "seconds": seconds,
    }
    if cal_rec is not None:
        ladder["imatrix"] = {
            "gguf": cal_rec.outputs[0].path, "dat": cal_rec.outputs[1].path,
            "calibration": {**cal_rec.extra.get("text", {}), "chunks": cal_rec.extra.get("chunks"),
                            "ctx": cal_rec.extra.get("ctx")},
        }
    records.write_json_atomic(out / "ladder.json", ladder)
    return ladder


def load_ladder(workdir: Path) -> dict[str, Any]:
    path = Path(workdir) / "ladder.json"
    if not path.exists():
        raise InputError(f"{workdir} has no ladder.json; run 'ggufbot convert' first")
    data = json.loads(path.read_text())
    if data.get("schema_version") != LADDER_SCHEMA:
        raise InputError(f"{path}: unsupported schema_version {data.get('schema_version')}")
    return data


def _progress(emit: EventCallback, stage: str) -> Callable[[str], None]:
    last = [0.0]

    def cb(line: str) -> None:
        now = time.monotonic()
        if now - last[0] >= 2.0:  # at most one progress event every 2 s
            last[0] = now
            emit(stage, "progress", {"line": line[-200:]})

    return cb
