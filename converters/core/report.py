"""report.json: the typed result of evaluation and checks and its versioned schema (read and written by
:class:`converters.core.workdir.WorkDir`).

The schema is documented field by field in ``docs/REPORT.md``. Publishing reads ``files[].type``,
``files[].status``, ``files[].reasons``, the figures (``kld_mean``, ``kld_mean_err``, ``same_top_p``,
``same_top_p_err``, ``ppl``, ``ppl_ratio``), the ``checks`` block and ``publishable``.

Conventions: every measured figure ``x`` that has an uncertainty carries it as ``x_err`` (one standard
error, as llama.cpp computes it, except ``kld_mean_err``: computed from the per-chunk means ``chunk_kld``, since
tokens within a chunk are correlated; llama.cpp's per-token figure is ``kld_mean_err_token``); probabilities and shares are fractions in [0, 1], never percentages;
a figure that was not measured is ``null``, never 0. Unknown fields found when loading a report are kept
(``extra``) and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from converters.core.errors import InputError

SCHEMA_VERSION = 1

PASSED = "passed"
FAILED = "failed"
SKIPPED = "skipped"


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KldStats:
    """What ``llama-perplexity --kl-divergence`` reports for one file, against the reference logits."""

    ppl: float  # Mean PPL(Q)
    ppl_err: float
    ppl_base: float  # Mean PPL(base), recomputed from the stored reference log-probabilities
    ppl_base_err: float
    ln_ppl_ratio: float  # Mean ln(PPL(Q)/PPL(base))
    ln_ppl_ratio_err: float
    ppl_ratio: float  # Mean PPL(Q)/PPL(base)
    ppl_ratio_err: float
    ppl_diff: float  # Mean PPL(Q)-PPL(base)
    ppl_diff_err: float
    ppl_correlation: float | None  # Cor(ln(PPL(Q)), ln(PPL(base))) as a fraction
    kld_mean: float
    kld_mean_err: float
    kld_max: float
    kld_p999: float
    kld_p99: float
    kld_median: float
    dp_mean: float  # Mean Δp (fraction)
    dp_mean_err: float
    rms_dp: float  # RMS Δp (fraction)
    rms_dp_err: float
    same_top_p: float  # fraction of tokens where both models have the same most likely token
    same_top_p_err: float
    chunks: int  # chunks scored (from the per-chunk table)
    # the mean KLD of each chunk, in chunk order (chunk_kld[i] is chunk i of the text): what the chunk-based error
    # is computed from (tokens within a chunk are correlated; chunks are close to independent)
    chunk_kld: tuple[float, ...] = ()
    kld_mean_err_token: float | None = None  # llama.cpp's per-token standard error (too small: tokens correlate)
    # the mean ln(p_base / p_Q) of the scored tokens of each chunk (its mean over chunks is ``ln_ppl_ratio``): what
    # the paired perplexity test of two files is computed from
    chunk_ln_ppl_ratio: tuple[float, ...] = ()

    def figures(self) -> dict[str, float | None]:
        """The scalar figures (the per-chunk series, :data:`SERIES`, are serialized on their own)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in SERIES}

    def non_finite(self) -> list[str]:
        return [k for k, v in self.figures().items() if isinstance(v, float) and not math.isfinite(v)]

    def chunk_mean_err(self) -> tuple[float, float] | None:
        """Mean KLD and its standard error from the per-chunk means (None without two chunk means)."""
        return mean_err(self.chunk_kld)

    def paired_difference(self, other: "KldStats") -> tuple[float, float, int] | None:
        """``self - other`` over their common chunks (both scored on the same text and base logits): mean
        difference of the chunk means, its standard error, and the number of chunks it is computed from."""
        return paired_difference(self.chunk_kld, other.chunk_kld)

    def with_chunk_error(self) -> "KldStats":
        """The figures with ``kld_mean_err`` computed from the chunk means (llama.cpp's per-token figure kept as
        ``kld_mean_err_token``); unchanged without two chunk means."""
        me = self.chunk_mean_err()
        if me is None:
            return self
        token = self.kld_mean_err_token if self.kld_mean_err_token is not None else self.kld_mean_err
        return dataclasses.replace(self, kld_mean_err=me[1], kld_mean_err_token=token)


SERIES = ("chunk_kld", "chunk_ln_ppl_ratio")  # KldStats' per-chunk series (not scalar figures)


def mean_err(series: Sequence[float]) -> tuple[float, float] | None:
    """Mean of per-chunk means and its standard error (sample standard deviation / sqrt(n)); None below 2."""
    n = len(series)
    if n < 2:
        return None
    m = math.fsum(series) / n
    var = math.fsum((x - m) ** 2 for x in series) / (n - 1)
    return m, math.sqrt(var / n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, int] | None:
    """Mean of ``a[i] - b[i]`` over the common chunks (the shorter series' length), its standard error from the
    per-chunk differences (the pairing removes what the chunks share: a hard chunk is hard for both files),
    and how many chunks; None below 2 common chunks."""
    n = min(len(a), len(b))
    me = mean_err([x - y for x, y in zip(a[:n], b[:n])])
    return (me[0], me[1], n) if me is not None else None


def chunk_series_json(series: Sequence[float]) -> list[float]:
    """The per-chunk series as report.json holds it: 6 significant digits (llama.cpp prints 5-6 decimals)."""
    return [float(f"{x:.6g}") for x in series]


@dataclasses.dataclass
class Check:
    """One check's verdict. ``passed`` is False only when the check failed (a skipped check passes)."""

    status: str  # passed / failed / skipped
    detail: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status != FAILED

    @classmethod
    def ok(cls, detail: str, **data: Any) -> "Check":
        return cls(PASSED, detail, data)

    @classmethod
    def fail(cls, detail: str, **data: Any) -> "Check":
        return cls(FAILED, detail, data)

    @classmethod
    def skip(cls, detail: str, **data: Any) -> "Check":
        return cls(SKIPPED, detail, data)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "passed": self.passed, "detail": self.detail, **self.data}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Check":
        status = d.get("status") or (PASSED if d.get("passed") else FAILED)
        data = {k: v for k, v in d.items() if k not in ("status", "passed", "detail")}
        return cls(str(status), str(d.get("detail", "")), data)


@dataclasses.dataclass
class FileResult:
    """One quant file: its figures against the reference, its checks and the gate's verdict."""

    type: str
    path: str
    size: int
    bpw: float | None
    bpw_nominal: float | None
    stats: KldStats | None = None
    checks: dict[str, Check] = dataclasses.field(default_factory=dict)
    status: str = PASSED
    reasons: list[str] = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str | None = None  # the measurement failed (tool crash, unparsable output)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    sha256: str | None = None  # content measured: of the single file or of part 1 (as ladder.json)
    parts: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # every part: {"path", "size", "sha256"}
    # why the evaluation stopped scoring chunks (converters.ladder.evaluate.sequential: "precision", "verdict",
    # "cap" or "fixed"); the chunks scored are ``stats.chunks``
    stop: str | None = None

    @property
    def chunks(self) -> int | None:
        """Chunks of the evaluation text this file was scored on."""
        return self.stats.chunks if self.stats is not None else None

    def figures(self) -> dict[str, Any]:
        """The figures as report.json holds them: None when not measured, a non-finite one as a string."""
        figures = self.stats.figures() if self.stats else {f.name: None for f in dataclasses.fields(KldStats)
                                                           if f.name not in SERIES}
        return {k: wire_number(v) for k, v in figures.items()}

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update({"type": self.type, "path": self.path, "size": self.size, "sha256": self.sha256,
                  "parts": [dict(p) for p in self.parts], "bpw": self.bpw,
                  "bpw_nominal": self.bpw_nominal, "status": self.status, "reasons": list(self.reasons)})
        d.update(self.figures())
        for series in SERIES:
            d[series] = chunk_series_json(getattr(self.stats, series)) if self.stats else None
        d["checks"] = {k: c.to_json() for k, c in self.checks.items()}
        d["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        d["error"] = self.error
        d["stop"] = self.stop
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FileResult":
        names = [f.name for f in dataclasses.fields(KldStats)]
        optional = {*SERIES, "kld_mean_err_token"}  # absent from reports written before the per-chunk series
        stats = None
        if d.get("kld_mean") is not None and all(n in d for n in names if n not in optional):
            values = {n: _denum(d[n]) for n in names if n in d and n not in SERIES}
            stats = KldStats(**values, **{k: tuple(float(x) for x in d.get(k) or ()) for k in SERIES})
        known = {"type", "path", "size", "sha256", "parts", "bpw", "bpw_nominal", "status", "reasons", "checks",
                 "seconds", "error", "stop", *names}
        return cls(type=d["type"], path=d.get("path", ""), size=int(d.get("size") or 0), bpw=d.get("bpw"),
                   bpw_nominal=d.get("bpw_nominal"), stats=stats,
                   checks={k: Check.from_json(v) for k, v in (d.get("checks") or {}).items()},
                   status=d.get("status", FAILED), reasons=list(d.get("reasons") or []),
                   seconds=dict(d.get("seconds") or {}), error=d.get("error"),
                   extra={k: v for k, v in d.items() if k not in known}, sha256=d.get("sha256"),
                   parts=[dict(p) for p in d.get("parts") or [] if isinstance(p, Mapping)], stop=d.get("stop"))


@dataclasses.dataclass
class TextInfo:
    name: str
    sha256: str
    bytes: int
    tokens: int | None = None  # tokens of the whole text with the model's tokenizer
    tokens_scored: int | None = None  # tokens whose predictions were scored (evaluation only)
    chunks: int | None = None
    ctx: int | None = None
    source: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    model_name: str
    source: dict[str, Any]
    toolchain: dict[str, Any]
    tools: dict[str, str | None]
    texts: dict[str, TextInfo | None]
    settings: dict[str, Any]
    reference: dict[str, Any]
    checks: dict[str, Check]
    files: list[FileResult]
    publishable: bool
    reasons: list[str]
    seconds: dict[str, float]
    created_at: str = dataclasses.field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    chart: str | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)  # remarks that fail nothing (the ladder's curve)
    # {relative path: {"size", "sha256"}} of every file the evaluation read: reference, quant parts, imatrix
    file_hashes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # quant types not measured yet while the ladder is being evaluated file by file (empty once finished)
    pending: list[str] = dataclasses.field(default_factory=list)
    # measured files among ``pending`` whose verdict is not final yet (held until the ladder's curve around them is
    # measured, converters.ladder.evaluate.verdict.awaits_curve): their figures, no status (empty once finished)
    held: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def file(self, qtype: str) -> FileResult:
        for f in self.files:
            if f.type == qtype:
                return f
        raise KeyError(qtype)

    def evaluation_summary(self) -> dict[str, Any]:
        """A small block for the model card: what the figures were measured on."""
        ev = self.texts.get("eval")
        return {
            "text": ev.name if ev else None,
            "tokens_scored": ev.tokens_scored if ev else None,
            "chunks": ev.chunks if ev else None,
            "ctx": ev.ctx if ev else None,
            "reference": self.reference.get("type"),
            "reference_ppl": self.reference.get("ppl"),
            "reference_ppl_err": self.reference.get("ppl_err"),
            "source_comparison": self.checks["bf16_vs_source"].detail if "bf16_vs_source" in self.checks else None,
        }

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update({
            "schema_version": self.schema_version,
            "model_name": self.model_name,
            "created_at": self.created_at,
            "source": self.source,
            "toolchain": self.toolchain,
            "tools": self.tools,
            "texts": {k: (v.to_json() if v else None) for k, v in self.texts.items()},
            "settings": self.settings,
            "reference": {k: wire_number(v) for k, v in self.reference.items()},
            "evaluation": {k: wire_number(v) for k, v in self.evaluation_summary().items()},
            "checks": {k: c.to_json() for k, c in self.checks.items()},
            "files": [f.to_json() for f in self.files],
            "publishable": self.publishable,
            "reasons": list(self.reasons),
            "notes": list(self.notes),
            "chart": self.chart,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "file_hashes": {k: dict(v) for k, v in sorted(self.file_hashes.items())},
            "pending": list(self.pending),
            "held": [dict(h) for h in self.held],
        })
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Report":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(f"report.json schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        known = {"schema_version", "model_name", "created_at", "source", "toolchain", "tools", "texts", "settings",
                 "notes",
                 "reference", "evaluation", "checks", "files", "publishable", "reasons", "chart", "seconds", "file_hashes",
                 "pending", "held"}
        texts = {k: (TextInfo(**v) if v else None) for k, v in (d.get("texts") or {}).items()}
        return cls(model_name=d.get("model_name", ""), source=dict(d.get("source") or {}),
                   toolchain=dict(d.get("toolchain") or {}), tools=dict(d.get("tools") or {}), texts=texts,
                   settings=dict(d.get("settings") or {}), reference=dict(d.get("reference") or {}),
                   checks={k: Check.from_json(v) for k, v in (d.get("checks") or {}).items()},
                   files=[FileResult.from_json(f) for f in d.get("files") or []],
                   publishable=bool(d.get("publishable")), reasons=list(d.get("reasons") or []),
                   seconds=dict(d.get("seconds") or {}), created_at=d.get("created_at", ""),
                   chart=d.get("chart"), schema_version=SCHEMA_VERSION,
                   notes=[str(n) for n in d.get("notes") or []],
                   extra={k: v for k, v in d.items() if k not in known},
                   file_hashes={str(k): dict(v) for k, v in (d.get("file_hashes") or {}).items()
                                if isinstance(v, Mapping)},
                   pending=[str(t) for t in d.get("pending") or []],
                   held=[dict(h) for h in d.get("held") or [] if isinstance(h, Mapping)])


def wire_number(v: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so a broken figure stays visible (and is never a 0)."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def _denum(v: Any) -> Any:
    if isinstance(v, str) and v in ("nan", "inf", "-inf"):
        return float(v)
    return v
