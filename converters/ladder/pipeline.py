"""Plan the ladder of one checkpoint: convert -> calibrate -> quantize.

:func:`plan` is pure: checkpoint facts + :class:`LadderOptions` -> the files that will be written, their
estimated sizes and the disk needed (``--dry-run`` prints it). The stages that run a plan are objects in
:mod:`converters.ladder.job`; each skips itself when its record shows it finished for the same inputs, so a killed
run resumes where it stopped. :func:`prepare` writes ``plan.json``; :func:`ladder_record` builds the
``ladder.json`` record (schema in docs/ARCHITECTURE.md) from the stage records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

from converters.llama import calibrate as calibrate_mod
from converters.llama import convert as convert_mod
from converters.llama import quantize as quantize_mod
from converters.llama import mmproj
from converters.core import names, quants
from converters.core import records
from converters.formats.checkpoint import Checkpoint
from converters.core.errors import InputError, NeedsImatrix
from converters.core.stages import check_disk, free_bytes
from converters.llama.toolchain import Toolchain
from converters.ladder import budget, layout, tune
from converters.core.workdir import (LADDER_SCHEMA, CalibrationInfo, ImatrixInfo, Ladder, LadderFile, ReferenceFile,
                                SourceInfo, ToolchainInfo, WorkDir)

log = logging.getLogger(__name__)



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
    tune: tuple[str, ...] = ()  # size points tuned per tensor (their files: ``<Model>-<TYPE>-tuned.gguf``)
    fit: tuple[str, ...] = ()  # memory budgets (``<Model>-fit-16GB-32k.gguf``, converters.ladder.fit)

    @property
    def disk_needed(self) -> int:
        """Peak bytes the work dir will hold: reference + every quant (+ one split copy at a time)."""
        split_extra = max((f.estimated_bytes for f in self.files if f.split), default=0)
        tuned = sum(f.estimated_bytes for f in self.files if f.type in self.tune)
        fits = len(self.fit) * max((f.estimated_bytes for f in self.files), default=0)  # each at most the largest
        return self.reference_bytes + sum(f.estimated_bytes for f in self.files) + split_extra + tuned + fits

    def to_json(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "source": {"repo": self.source_repo, "revision": self.source_revision, "path": str(self.checkpoint.path),
                       "architecture": self.checkpoint.architecture, "parameters": self.checkpoint.parameters},
            "reference": {"type": self.outtype.upper(), "path": self.reference, "estimated_bytes": self.reference_bytes},
            "imatrix": ({"calibration": self.calibration.describe() if self.calibration else None,
                         "chunks": self.calibration_chunks, "ctx": self.ctx} if self.imatrix else None),
            "files": [dataclasses.asdict(f) for f in self.files],
            **({"tune": list(self.tune)} if self.tune else {}),
            **({"fit": list(self.fit)} if self.fit else {}),
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
        for f, q in zip(self.files, self.ladder):
            if f.type in self.tune:
                lines.append(f"{f.type + '-tuned':<10} {'':>5} {'<=' + _gb(f.estimated_bytes):>10}  "
                             f"{f.path.replace('.gguf', '-tuned.gguf')}  (per-tensor layout, solved after measuring)")
                lines += ["           " + line for line in _tuned_layout(self.out, q)]
        for b in budget.parse_all(self.fit):
            lines.append(f"{b.type:<10} {'':>5} {'':>10}  {names.fit(self.model_name, b.label)}  (best predicted KLD "
                         f"within {_gb(b.bytes)} at {b.ctx:,} tokens, solved and loaded after the ladder)")
        if ck.vision:
            projs = ", ".join(mmproj.projector_name(self.model_name, t) for t in mmproj.TYPES)
            lines.append(f"projector  {projs}  (vision-language model; Q8_0 where the converter writes it)")
        lines.append(f"disk       ~{_gb(self.disk_needed)} needed, {_gb(free_bytes(self.out))} free")
        lines.append(f"jobs       {self.jobs} quantization(s) in parallel")
        return "\n".join(lines)


def _tuned_layout(out: Path, q: quants.QuantType) -> list[str]:
    """The plan of a tuned file when an earlier run in this work dir solved it (its layout.json), else nothing."""
    p = tune.layout_path(out, q)
    if not p.is_file():
        return []
    try:
        return ["last plan: " + layout.Layout.from_json(json.loads(p.read_text())).describe()]
    except (ValueError, KeyError, TypeError, InputError):
        return []


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def model_name_for(source: str) -> str:
    """``org/Name`` or a folder path -> ``Name`` (safe for file names)."""
    name = source.rstrip("/").split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    if not name:
        raise InputError(f"cannot derive a model name from {source!r}")
    return name


@dataclasses.dataclass(frozen=True)
class LadderOptions:
    """Everything that shapes the ladder of one checkpoint (the ladder part of a job spec)."""

    ladder: str | tuple[str, ...] | None = "default"
    outtype: str = "bf16"
    imatrix: bool = True
    calibration: calibrate_mod.TextFile | None = None
    calibration_chunks: int | None = None
    ctx: int = 512
    split_max_bytes: int = quantize_mod.DEFAULT_SPLIT_MAX_BYTES
    jobs: int = 1
    timeout: float | None = None
    tune: tuple[str, ...] = ()  # size points that also get a per-tensor tuned file (converters.ladder.tune)
    tune_seconds: float | None = None  # time budget of the tune stage
    tune_candidates: tuple[str, ...] | None = None  # ggml types measured per tensor (None: layout.DEFAULT_CANDIDATES)
    order: tuple[str, ...] = ("Q4_K_M", "Q8_0", "Q6_K", "Q5_K_M")  # publish order: made and measured first
    first_group: int = 1  # types of ``order`` in the first early commit: their curve neighbours are measured next
    pipeline: bool = True  # an evaluated ladder is made and measured as tasks (converters.ladder.flow); off: in a row
    cpu_units: int | None = None  # CPU-heavy programs at once in the pipeline (None: flow.CPU_UNITS, measured)
    tune_exclude: tuple[str, ...] = ()  # ggml types never chosen as a change from stock (benchmarks/layout.py)
    tune_confirm: bool = True  # keep a tuned file only when it beats the stock file on the calibration text
    fit: tuple[str, ...] = ()  # memory budgets "16GB@32k": a fit file each (converters.ladder.fit)
    fit_kv_type: str = "f16"  # the KV cache type a fit file's memory is measured with


def _check_options(o: LadderOptions, types: tuple[quants.QuantType, ...]) -> None:
    if o.imatrix and o.calibration is None:
        raise InputError("an importance matrix needs calibration text (give one, or turn the imatrix off)")
    if not o.imatrix:
        for q in types:
            if q.needs_imatrix:
                raise NeedsImatrix(q.name)
    if o.imatrix and o.calibration is not None and o.calibration.bytes < 2 * o.ctx:
        # a token is at least one byte: this text can never fill one chunk (llama-imatrix needs 2 x ctx tokens)
        raise InputError(f"calibration text {o.calibration.name} is too short: {o.calibration.bytes} bytes cannot "
                         f"make one chunk of {o.ctx} tokens")
    if o.jobs < 1:
        raise InputError(f"jobs must be at least 1 (got {o.jobs})")
    budget.parse_all(o.fit)
    if o.split_max_bytes < 1_000_000:
        raise InputError("split size must be at least 1 MB")


def plan(checkpoint: Checkpoint, out: Path, *, model_name: str, options: LadderOptions = LadderOptions(),
         source_repo: str | None = None, source_revision: str | None = None) -> Plan:
    """The pure planner: checkpoint facts + options -> file names, estimated sizes, disk needed."""
    o = options
    types = quants.parse_ladder(o.ladder)
    _check_options(o, types)
    tuned = tuple(q.name for q in tune.check_points(o.tune, [q.name for q in types]))
    files = []
    for q in types:
        est = checkpoint.estimate_gguf_bytes(q.bpw)
        split = est > o.split_max_bytes
        path = quantize_mod.split_names(model_name, q, max(2, -(-est // o.split_max_bytes)))[0] if split \
            else quantize_mod.file_name(model_name, q)
        files.append(PlannedFile(q.name, path, est, split, q.needs_imatrix))
    return Plan(model_name=model_name, out=Path(out), checkpoint=checkpoint, ladder=types, outtype=o.outtype.lower(),
                reference=convert_mod.reference_name(model_name, o.outtype),
                reference_bytes=checkpoint.estimate_gguf_bytes(32 if o.outtype.lower() == "f32" else 16),
                calibration=o.calibration if o.imatrix else None, calibration_chunks=o.calibration_chunks,
                ctx=o.ctx, imatrix=o.imatrix, split_max_bytes=o.split_max_bytes, jobs=o.jobs, files=tuple(files),
                source_repo=source_repo, source_revision=source_revision, tune=tuned, fit=tuple(o.fit))


def prepare(p: Plan) -> None:
    """Before the first file stage: clear what a killed run left, write plan.json, and check that what is
    still to be written fits on disk (finished outputs are already there)."""
    out = p.out
    out.mkdir(parents=True, exist_ok=True)
    removed = records.remove_partials(out)
    if removed:
        log.info("removed %d unfinished file(s) left by an earlier run", len(removed))
    records.write_json_atomic(WorkDir(out).plan_path, p.to_json())
    remaining = 0 if records.load(out, convert_mod.STAGE) else p.reference_bytes
    remaining += sum(f.estimated_bytes for f, q in zip(p.files, p.ladder)
                     if records.load(out, quantize_mod.stage_name(q)) is None)
    check_disk(out, remaining)


def ladder_file(p: Plan, q: quants.QuantType, rec: records.StageRecord) -> LadderFile:
    """ladder.json's entry of one quantized type, from its quantize record."""
    total = sum(o.size for o in rec.outputs)
    return LadderFile(
        type=q.name, bpw_nominal=q.bpw, needs_imatrix=q.needs_imatrix, description=q.description,
        path=rec.outputs[0].path, parts=tuple(o.path for o in rec.outputs), size=total,
        sha256=rec.outputs[0].sha256, part_sha256=tuple(o.sha256 for o in rec.outputs),
        bpw=round(total * 8 / p.checkpoint.parameters, 3) if p.checkpoint.parameters else None,
        seconds=rec.seconds)


def publish_order(p: Plan, order: tuple[str, ...]) -> tuple[quants.QuantType, ...]:
    """The ladder's types in the order they are made and measured: those named in ``order`` first (in that order;
    names not in the ladder ignored), then the rest in ladder order."""
    first = [q for name in order for q in p.ladder if q.name == name]
    return tuple(dict.fromkeys([*first, *p.ladder]))


def ladder_record(p: Plan, toolchain: Toolchain, conv_rec: records.StageRecord,
                  cal_rec: records.StageRecord | None, quantized: dict[str, records.StageRecord],
                  seconds: dict[str, float], *, projector: records.StageRecord | None = None) -> Ladder:
    """The ladder.json record from the stage records (``projector``: a vision-language model's projector
    conversion, :mod:`converters.llama.mmproj`). ``quantized`` may hold only some types (the pipeline writes the
    files made so far): ``files`` lists those, in ladder order."""
    files = [ladder_file(p, q, quantized[q.name]) for q in p.ladder if q.name in quantized]
    ref_out = conv_rec.outputs[0]
    ck = p.checkpoint
    imatrix = None
    if cal_rec is not None:
        imatrix = ImatrixInfo(gguf=cal_rec.outputs[0].path, dat=cal_rec.outputs[1].path,
                              calibration=CalibrationInfo.from_json({**cal_rec.extra.get("text", {}),
                                                                     "chunks": cal_rec.extra.get("chunks"),
                                                                     "ctx": cal_rec.extra.get("ctx")}))
    return Ladder(
        schema_version=LADDER_SCHEMA, model_name=p.model_name,
        source=SourceInfo(repo=p.source_repo, revision=p.source_revision, path=str(ck.path),
                          architecture=ck.architecture, parameters=ck.parameters,
                          has_chat_template=ck.has_chat_template, license=ck.license),
        toolchain=ToolchainInfo(version=toolchain.version, commit=toolchain.commit, cuda=toolchain.cuda,
                                tag=getattr(toolchain, "tag", None)),
        reference=ReferenceFile(type=p.outtype.upper(), path=ref_out.path, size=ref_out.size, sha256=ref_out.sha256),
        imatrix=imatrix, files=tuple(files), seconds=seconds, projectors=mmproj.projector_files(projector))
