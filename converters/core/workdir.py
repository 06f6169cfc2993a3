"""The work directory of one model: every file name in one place, and its JSON files as typed records.

``WorkDir(path)`` knows where ``plan.json``, ``ladder.json``, ``report.json``, ``variant.json``, the chart and
the stage records live (layout: docs/ARCHITECTURE.md) and reads and writes the JSON files as typed, versioned
records: :class:`Ladder` (``ladder.json``), :class:`~converters.core.report.Report` (``report.json``) and
:class:`VariantInfo` (``variant.json``).

Each record parses its wire dict once (``from_json``) and keeps the fields it does not know in ``extra``,
written back unchanged after the known ones (the way ``huggingface_hub``'s ``ModelInfo`` keeps extras);
``to_json`` writes the known fields in the order the writers always have, so the files stay byte-identical.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, TypeVar

from converters.core.errors import InputError
from converters.core import names
from converters.core import records
from converters.core.records import write_json_atomic
from converters.core.report import Report

log = logging.getLogger(__name__)

# the work dir's names are built in converters.core.names; these are the records this module reads and writes
PLAN_FILE = names.PLAN
LADDER_FILE = names.LADDER
REPORT_FILE = names.REPORT
CHART_FILE = names.CHART
VARIANT_FILE = names.VARIANT
RECORDS_DIR = names.RECORDS_DIR
VARIANTS_DIR = names.VARIANTS_DIR

LADDER_SCHEMA = 1
VARIANT_SCHEMA = 1

R = TypeVar("R", bound="Record")


# --------------------------------------------------------------------------------------------------
# The record machinery: declared fields in wire order, unknown fields kept
# --------------------------------------------------------------------------------------------------
def field(default: Any = None, *, sub: type | None = None, many: bool = False, by_key: bool = False,
          seq: bool = False, omit_none: bool = False) -> Any:
    """A record field. ``sub``: a nested record (``many``: a list of them, ``by_key``: a dict of them);
    ``seq``: a list kept as a tuple; ``omit_none``: not written while None (a field added later in a job)."""
    meta = {"sub": sub, "many": many, "by_key": by_key, "seq": seq, "omit_none": omit_none}
    if many or seq:
        return dataclasses.field(default=(), metadata=meta)
    if by_key or isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _extra() -> Any:
    return dataclasses.field(default_factory=dict, metadata={"extra": True})


def _load(f: dataclasses.Field, value: Any) -> Any:
    sub, meta = f.metadata.get("sub"), f.metadata
    if value is None:
        return () if (meta.get("many") or meta.get("seq")) else None
    if meta.get("many"):
        return tuple(sub.from_json(v) for v in _list(value, f.name))
    if meta.get("by_key"):
        return {str(k): sub.from_json(v) for k, v in _object(value, f.name).items()}
    if sub is not None:
        return sub.from_json(value)
    if meta.get("seq"):
        return tuple(_list(value, f.name))
    return value


def _dump(f: dataclasses.Field, value: Any) -> Any:
    meta = f.metadata
    if meta.get("many"):
        return [v.to_json() for v in value]
    if meta.get("by_key"):
        return {k: v.to_json() for k, v in value.items()}
    if meta.get("sub") is not None:
        return None if value is None else value.to_json()
    if meta.get("seq"):
        return list(value)
    return value


def _list(value: Any, name: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise InputError(f"field {name!r} must be a list, not {type(value).__name__}")
    return list(value)


def _object(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InputError(f"field {name!r} must be an object, not {type(value).__name__}")
    return value


class Record:
    """Base of the typed records: ``from_json`` / ``to_json`` from the dataclass fields, extras kept."""

    REQUIRED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _wire_fields(cls) -> tuple[dataclasses.Field, ...]:
        return tuple(f for f in dataclasses.fields(cls) if not f.metadata.get("extra"))  # type: ignore[arg-type]

    @classmethod
    def from_json(cls: type[R], data: Any) -> R:
        d = _object(data, cls.__name__)
        missing = [k for k in cls.REQUIRED if d.get(k) is None]
        if missing:
            raise InputError(f"{cls.__name__}: missing field(s) {', '.join(missing)}")
        fields = cls._wire_fields()
        names = {f.name for f in fields}
        known = {f.name: _load(f, d[f.name]) for f in fields if f.name in d}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})  # type: ignore[call-arg]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in self._wire_fields():
            value = getattr(self, f.name)
            if f.metadata.get("omit_none") and (value is None or value == ()):
                continue
            out[f.name] = _dump(f, value)
        out.update({k: v for k, v in getattr(self, "extra").items() if k not in out})
        return out


_record = dataclasses.dataclass(frozen=True, kw_only=True)


# --------------------------------------------------------------------------------------------------
# ladder.json
# --------------------------------------------------------------------------------------------------
@_record
class SourceInfo(Record):
    repo: str | None = field()
    revision: str | None = field()
    path: str | None = field()
    architecture: str | None = field()
    parameters: int | None = field()
    has_chat_template: bool | None = field()
    license: str | None = field()
    extra: dict[str, Any] = _extra()

    @property
    def author(self) -> str | None:
        """The owner of the source repo (``acme`` of ``acme/Model``), None for a local source."""
        return (self.repo or "").split("/")[0] or None


@_record
class ToolchainInfo(Record):
    version: str | None = field()
    commit: str | None = field()
    cuda: bool | None = field()
    tag: str | None = field(omit_none=True)  # the llama.cpp release tag (a git or dir build), when known
    extra: dict[str, Any] = _extra()


@_record
class ReferenceFile(Record):
    REQUIRED = ("path",)
    type: str = field("BF16")
    path: str = field("")
    size: int = field(0)
    sha256: str = field("")
    extra: dict[str, Any] = _extra()


@_record
class CalibrationInfo(Record):
    name: str | None = field()
    source: str | None = field()
    sha256: str | None = field()
    bytes: int | None = field()
    chunks: int | None = field()
    ctx: int | None = field()
    extra: dict[str, Any] = _extra()


@_record
class ImatrixInfo(Record):
    gguf: str | None = field()
    dat: str | None = field()
    calibration: CalibrationInfo | None = field(sub=CalibrationInfo)
    extra: dict[str, Any] = _extra()

    @property
    def paths(self) -> tuple[str, ...]:
        """The imatrix files that exist in the ladder (GGUF form first)."""
        return tuple(p for p in (self.gguf, self.dat) if p)


@_record
class LadderFile(Record):
    REQUIRED = ("type", "path")
    type: str = field("")
    bpw_nominal: float | None = field()
    needs_imatrix: bool = field(False)
    description: str = field("")
    path: str = field("")  # the first part when split
    parts: tuple[str, ...] = field(seq=True)
    size: int = field(0)
    sha256: str = field("")  # of the single file or of part 1
    part_sha256: tuple[str, ...] = field(seq=True)
    bpw: float | None = field()
    seconds: float | None = field()
    # files published beside this one when it is (a memory-budget file's layout.json); not written when None
    companions: tuple[str, ...] | None = field(omit_none=True)
    extra: dict[str, Any] = _extra()

    @property
    def companion_paths(self) -> tuple[str, ...]:
        return tuple(self.companions or ())

    @property
    def all_parts(self) -> tuple[str, ...]:
        """Every file of this quant, relative to the work dir (``(path,)`` when not split)."""
        return self.parts or (self.path,)

    @property
    def split(self) -> bool:
        return len(self.all_parts) > 1


@_record
class ProjectorFile(Record):
    """A vision-language model's multimodal projector (``mmproj-<Model>-<TYPE>.gguf``), converted once beside the
    text ladder (:mod:`converters.llama.mmproj`)."""

    REQUIRED = ("type", "path")
    type: str = field("")  # F16, Q8_0
    path: str = field("")
    size: int = field(0)
    sha256: str = field("")
    extra: dict[str, Any] = _extra()


@_record
class Ladder(Record):
    """``ladder.json``: what the ladder pipeline produced (schema in docs/ARCHITECTURE.md)."""

    REQUIRED = ("reference", "files")
    schema_version: int = field(LADDER_SCHEMA)
    model_name: str = field("")
    source: SourceInfo = field(SourceInfo(), sub=SourceInfo)
    toolchain: ToolchainInfo = field(ToolchainInfo(), sub=ToolchainInfo)
    reference: ReferenceFile = field(ReferenceFile(), sub=ReferenceFile)
    imatrix: ImatrixInfo | None = field(sub=ImatrixInfo)
    files: tuple[LadderFile, ...] = field(sub=LadderFile, many=True)
    seconds: dict[str, float] = field({})
    # a vision-language model's projector files; not written for a text-only model
    projectors: tuple[ProjectorFile, ...] = field(sub=ProjectorFile, many=True, omit_none=True)
    extra: dict[str, Any] = _extra()

    @classmethod
    def from_json(cls, data: Any) -> "Ladder":
        version = _object(data, "ladder.json").get("schema_version")
        if version != LADDER_SCHEMA:
            raise InputError(f"ladder.json: unsupported schema_version {version!r} (expected {LADDER_SCHEMA})")
        ladder = super().from_json(data)
        if ladder.source is None or ladder.toolchain is None:
            return dataclasses.replace(ladder, source=ladder.source or SourceInfo(),
                                       toolchain=ladder.toolchain or ToolchainInfo())
        return ladder

    def file(self, qtype: str) -> LadderFile:
        for f in self.files:
            if f.type == qtype:
                return f
        raise KeyError(qtype)

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(f.type for f in self.files)


# --------------------------------------------------------------------------------------------------
# variant.json
# --------------------------------------------------------------------------------------------------
@_record
class RecipeInfo(Record):
    REQUIRED = ("name",)
    name: str = field("")
    description: str | None = field()
    summary: str | None = field()
    prune: dict[str, Any] | None = field()
    distill: dict[str, Any] | None = field()
    extra: dict[str, Any] = _extra()


@_record
class TeacherInfo(Record):
    path: str | None = field()
    model_name: str | None = field()
    repo: str | None = field()
    parameters: int | None = field()
    bytes: int | None = field()
    layers: int | None = field()
    intermediate_size: int | None = field()
    extra: dict[str, Any] = _extra()


@_record
class VariantModel(Record):
    path: str | None = field()
    parameters: int | None = field()
    bytes: int | None = field()
    layers: int | None = field()
    intermediate_size: int | None = field()
    extra: dict[str, Any] = _extra()


@_record
class PruneCalibration(Record):
    name: str | None = field()
    samples: int | None = field()
    seq_len: int | None = field()
    extra: dict[str, Any] = _extra()


@_record
class PruneInfo(Record):
    """The pruning stage's result (``converters.variants.prune.PruneResult.to_json``)."""

    method: str | None = field()
    importance: str | None = field()
    layers_before: int | None = field()
    layers_after: int | None = field()
    removed_layers: tuple[int, ...] = field(seq=True)
    kept_layers: tuple[int, ...] = field(seq=True)
    scores: tuple[float, ...] = field(seq=True)
    intermediate_before: int | None = field()
    intermediate_after: int | None = field()
    parameters_before: int | None = field()
    parameters_after: int | None = field()
    bytes_before: int | None = field()
    bytes_after: int | None = field()
    seconds: float | None = field()
    calibration: PruneCalibration | None = field(sub=PruneCalibration)
    first_changed_layer: int | None = field()
    extra: dict[str, Any] = _extra()


@_record
class DistillInfo(Record):
    """The distillation stage's result (``converters.variants.distill.DistillResult.to_json``)."""

    steps: int | None = field()
    losses: tuple[float, ...] = field(seq=True)
    seconds: float | None = field()
    device: str | None = field()
    dtype: str | None = field()
    mode: str | None = field()
    first_trainable_layer: int | None = field()
    trainable_parameters: int | None = field()
    tokens: int | None = field()
    teacher_passes: int | None = field()
    config: dict[str, Any] = field({})  # the DistillConfig it ran with
    loss_first: float | None = field()
    loss_last: float | None = field()
    extra: dict[str, Any] = _extra()


@_record
class VariantCalibration(Record):
    """The calibration text of pruning and healing: its name and fingerprint (size, hash)."""

    name: str | None = field()
    extra: dict[str, Any] = _extra()


@_record
class VariantFileFigures(Record):
    """One quant of a variant measured against the teacher (or, in ``teacher_files``, a teacher's own quant)."""

    kld_mean: float | None = field()
    kld_mean_err: float | None = field()
    same_top_p: float | None = field()
    same_top_p_err: float | None = field(omit_none=True)
    size: int | None = field()
    status: str | None = field(omit_none=True)
    extra: dict[str, Any] = _extra()


@_record
class VariantEvaluation(Record):
    against: str | None = field()
    chunks: int | None = field()
    ctx: int | None = field()
    text: str | None = field()
    reference_kld_mean: float | None = field()
    reference_kld_mean_err: float | None = field()
    reference_same_top_p: float | None = field()
    files: dict[str, VariantFileFigures] = field(sub=VariantFileFigures, by_key=True)
    teacher_files: dict[str, VariantFileFigures] = field(sub=VariantFileFigures, by_key=True)
    publishable: bool | None = field()
    extra: dict[str, Any] = _extra()


@_record
class VariantInfo(Record):
    """``variant.json``: how a variant was made from its teacher and how it measures (docs/VARIANTS.md)."""

    REQUIRED = ("recipe", "teacher", "variant")
    schema_version: int = field(VARIANT_SCHEMA)
    recipe: RecipeInfo = field(RecipeInfo(), sub=RecipeInfo)
    teacher: TeacherInfo = field(TeacherInfo(), sub=TeacherInfo)
    variant: VariantModel = field(VariantModel(), sub=VariantModel)
    prune: PruneInfo | None = field(sub=PruneInfo)
    distill: DistillInfo | None = field(sub=DistillInfo)
    calibration: VariantCalibration | None = field(sub=VariantCalibration)
    model_name: str | None = field(omit_none=True)  # set once the variant's ladder is built
    evaluation: VariantEvaluation | None = field(sub=VariantEvaluation, omit_none=True)
    extra: dict[str, Any] = _extra()

    @property
    def teacher_model(self) -> str:
        """The teacher's model name (its folder name when variant.json has none)."""
        return self.teacher.model_name or Path(self.teacher.path or "model").name


# --------------------------------------------------------------------------------------------------
# The work directory
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WorkDir:
    """One model's work directory: its file names and its records."""

    path: Path

    def __init__(self, path: "Path | str | WorkDir") -> None:
        object.__setattr__(self, "path", Path(path.path if isinstance(path, WorkDir) else path))

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def plan_path(self) -> Path:
        return self.path / PLAN_FILE

    @property
    def ladder_path(self) -> Path:
        return self.path / LADDER_FILE

    @property
    def report_path(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def chart_path(self) -> Path:
        return self.path / CHART_FILE

    @property
    def variant_path(self) -> Path:
        return self.path / VARIANT_FILE

    @property
    def records_path(self) -> Path:
        return self.path / RECORDS_DIR

    def file(self, rel: str) -> Path:
        """``path / rel`` for a relative path inside the work dir; refuses absolute paths and ``..``."""
        if not isinstance(rel, str) or not rel or "\\" in rel:
            raise InputError(f"{rel!r} is not a file name inside the work directory")
        pure = PurePosixPath(rel)
        if pure.is_absolute() or ".." in pure.parts or Path(rel).is_absolute():
            raise InputError(f"refusing {rel!r}: not a path inside the work directory")
        return self.path / rel

    def content(self, ladder: Ladder) -> dict[str, dict[str, Any]]:
        """``{relative path: {"size", "sha256"}}`` of the ladder's files as they are now: the reference, every part
        of every quant, the imatrix files and the vision projectors (those present). Full content hashes, cached by
        size + mtime + inode in this work dir's records: what evaluation records as measured and publishing checks
        before upload."""
        rels = [ladder.reference.path, *(p for f in ladder.files for p in (*f.all_parts, *f.companion_paths)),
                *(ladder.imatrix.paths if ladder.imatrix else ()), *(p.path for p in ladder.projectors)]
        out: dict[str, dict[str, Any]] = {}
        for rel in dict.fromkeys(r for r in rels if r):
            p = self.file(rel)
            if p.is_file():
                out[rel] = {"size": p.stat().st_size, "sha256": records.content_sha256(p, self.path)}
        return out

    def variant_dir(self, recipe_name: str) -> "WorkDir":
        """The work dir of a variant built from this one: ``<path>/variants/<recipe>``."""
        if "/" in recipe_name:
            raise InputError(f"{recipe_name!r} is not a variant name")
        return WorkDir(self.file(f"{VARIANTS_DIR}/{recipe_name}"))

    # ---- ladder.json
    def has_ladder(self) -> bool:
        return self.ladder_path.is_file()

    def ladder(self) -> Ladder:
        """The ladder; InputError when missing, not JSON or of another schema."""
        return self._parse(LADDER_FILE, Ladder.from_json)

    def write_ladder(self, ladder: Ladder) -> Path:
        write_json_atomic(self.ladder_path, ladder.to_json())
        return self.ladder_path

    # ---- report.json
    def has_report(self) -> bool:
        return self.report_path.is_file()

    def report(self) -> Report:
        return self._parse(REPORT_FILE, Report.from_json)

    def write_report(self, report: Report) -> Path:
        write_json_atomic(self.report_path, report.to_json())
        return self.report_path

    # ---- variant.json
    def variant(self) -> VariantInfo | None:
        """The variant's record, None when this is not a variant's work dir."""
        if not self.variant_path.is_file():
            return None
        return self._parse(VARIANT_FILE, VariantInfo.from_json)

    def write_variant(self, info: VariantInfo) -> Path:
        write_json_atomic(self.variant_path, info.to_json())
        return self.variant_path

    def _parse(self, name: str, parse: Any) -> Any:
        path = self.path / name
        try:
            data = records.read_json_object(path)
        except FileNotFoundError:
            raise InputError(f"{name} not found in {self.path.name}/: run the earlier stages first") from None
        except records.NotAnObject:
            raise InputError(f"{name} must hold a JSON object") from None
        except (OSError, ValueError) as e:
            raise InputError(f"{name} is not valid JSON: {e}") from None
        try:
            return parse(data)
        except (TypeError, ValueError, AttributeError) as e:
            raise InputError(f"{name}: malformed: {e}") from None
