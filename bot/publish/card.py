"""The model card: a pure function from facts to a context, and a Jinja2 template that renders it.

``build_context`` takes the work directory's records (:class:`~converters.core.workdir.Ladder`,
:class:`~converters.core.report.Report`, for a variant :class:`~converters.core.workdir.VariantInfo`), the facts
about the source model (:class:`~bot.publish.source_card.SourceFacts`: its card data, gating, chat template,
attention shapes) and the publishing settings (:class:`CardSettings`), and returns a plain dict; ``render`` turns
that dict into ``README.md`` with ``templates/model_card.md.j2``. Neither touches the network or the clock.

What comes from the source is untrusted input, read and made safe by :mod:`bot.publish.source_card` (the facts, the
chat template's example rendered in the sandbox, the card data copied into our YAML front matter).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import yaml

from bot.publish import fit_card, markdown, speed_card
from bot.publish.source_card import SourceFacts, gating_fields, license_link, render_chat_example, shown, source_text
from bot.publish.target import MARKER_TAG
from converters.core import artifacts
from converters.ladder import layout
from converters.llama import mmproj
from converters.core.report import PASSED, SKIPPED, FileResult, Report
from converters.core.workdir import (CalibrationInfo, DistillInfo, ImatrixInfo, Ladder, LadderFile,
                                PruneCalibration, PruneInfo, VariantEvaluation, VariantFileFigures, VariantInfo)

TEMPLATE_NAME = "model_card.md.j2"
VARIANT_TEMPLATE_NAME = "variant_section.md.j2"
# A variant's weights differ from the source's (pruned, maybe trained): the Hub's relation for a model derived
# from another by changing its weights is "finetune" (the accepted values: adapter, merge, quantized, finetune).
VARIANT_RELATION = "finetune"
TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"
BASE_TAGS = ("gguf", "llama.cpp", "quantized")
KV_CONTEXTS = (4096, 32768)
DEFAULT_RUN_TYPE = "Q4_K_M"
SOURCE_CHECK = "bf16_vs_source"  # the report's check of the BF16 conversion against the source model

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CardSettings:
    repo_id: str  # the repo the card is published in
    quantized_by: str
    hub_url: str  # base URL of the Hub for links (the client's endpoint)
    ollama_host: str = "hf.co"
    extra_tags: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- helpers
def kv_cache_bytes(n_layer: int, n_ctx: int, n_kv_heads: int, head_dim: int, bytes_per_elem: int = 2) -> int:
    """Bytes of an f16 K+V cache: 2 (K and V) * layers * context * kv heads * head dim * 2 bytes."""
    return 2 * n_layer * n_ctx * n_kv_heads * head_dim * bytes_per_elem


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "—"
    n = float(n)
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "—"
    if isinstance(x, (int, float)):
        return f"{x:.{digits}f}"
    return str(x)


def _pm(x: Any, err: Any, digits: int = 4, scale: float = 1.0, suffix: str = "") -> str:
    if not isinstance(x, (int, float)):
        return "—"
    s = f"{x * scale:.{digits}f}{suffix}"
    if isinstance(err, (int, float)):
        s += f" ± {err * scale:.{digits}f}{suffix}"
    return s


def _percent_scale(x: Any) -> float:
    """report.json gives same-top-p as a fraction (0..1) or a percentage; show percent either way."""
    return 100.0 if isinstance(x, (int, float)) and x <= 1.0 else 1.0


def _chat_example(source: SourceFacts) -> dict[str, Any]:
    """The rendered example and a fence it cannot close (the text comes from the source's template)."""
    example = render_chat_example(source.chat_template, source.bos_token, source.eos_token)
    return {"chat_example": example, "chat_fence": markdown.fence(example or "")}


def _calibration_link(source: str | None, hub_url: str) -> str | None:
    if not source:
        return None
    if source.startswith(("https://", "http://")):
        return source
    if source.startswith("hf://datasets/"):
        rest = source[len("hf://datasets/"):]
        parts = rest.split("/")
        if len(parts) >= 3:
            repo, path = "/".join(parts[:2]), "/".join(parts[2:])
            rev = "main"
            if "@" in repo:
                repo, rev = repo.split("@", 1)
            return f"{hub_url}/datasets/{repo}/blob/{rev}/{path}"
    return None  # a local path: never shown


def _checks(report: Report) -> list[dict[str, str]]:
    """The report's checks as table rows (name, passed / skipped / FAILED, detail)."""
    out = []
    for name, c in report.checks.items():
        result = ("not checked" if name == SOURCE_CHECK else "skipped") if c.status.lower() == SKIPPED \
            else "passed" if c.passed else "FAILED"
        out.append({"name": str(name).replace("_", " "), "result": result,
                    "detail": markdown.cell(c.detail)})
    return out


def _evaluation(report: Report) -> dict[str, Any] | None:
    """What the figures were measured on (the report's evaluation summary), formatted."""
    ev = report.evaluation_summary()
    if not ev["text"]:
        return None
    ppl = ev["reference_ppl"]
    return {
        "text": ev["text"],
        "tokens": f"{ev['tokens_scored']:,}" if isinstance(ev["tokens_scored"], int) else None,
        "chunks": ev["chunks"],
        "ctx": ev["ctx"],
        "reference_ppl": _pm(ppl, ev["reference_ppl_err"], 3) if isinstance(ppl, (int, float)) else None,
    }


@dataclasses.dataclass(frozen=True)
class PublishedFile:
    """A ladder file that passed the gate, with its report entry."""

    file: LadderFile
    result: FileResult

    @property
    def type(self) -> str:
        return self.file.type


def published_files(ladder: Ladder, report: Report) -> list[PublishedFile]:
    """Ladder files that passed the gate in the report, with their figures (unreported = not published)."""
    return [PublishedFile(f, r) for f, r in artifacts.passed_quants(ladder, report)]


def _projectors(ladder: Ladder, report: Report, files: Sequence[Mapping[str, Any]],
                run_type: str | None) -> dict[str, Any] | None:
    """The card's vision section: the projector files and a text model to show them with (None: no projector)."""
    projs = artifacts.published_projectors(ladder, report)
    if not projs:
        return None
    row = next((f for f in files if f["type"] == run_type), files[0] if files else None)
    return {
        "files": [{"file": p.path, "type": p.type, "size_h": human_bytes(p.size)} for p in projs],
        "main": next((p.path for p in projs if p.type == mmproj.TYPES[0]), projs[0].path),
        "model_file": (row["parts"][0] if row["split"] else row["file"]) if row else None,
    }


def withheld_files(ladder: Ladder, report: Report, coming: Sequence[str] = ()) -> list[dict[str, str]]:
    """Ladder files that are not published, each with the gate's reasons (as inert Markdown); the ones ``coming``
    (an early publication's files not measured or not uploaded yet) are not withheld."""
    by_type = {r.type: r for r in report.files}
    out = []
    for f in ladder.files:
        r = by_type.get(f.type)
        if (r is not None and r.status == PASSED) or (f.type in coming and (r is None or r.status == PASSED)):
            continue
        why = "; ".join(r.reasons) if r is not None and r.reasons else "not measured" if r is None else r.status
        out.append({"type": f.type, "file": f.path, "reason": markdown.cell(why)})  # type and name: the bot's own
    return out


def source_unchecked(report: Report) -> str | None:
    """Why the BF16 conversion was not compared with the source model (None when it was)."""
    c = report.checks.get(SOURCE_CHECK)
    if c is None:
        return "the comparison did not run"
    return markdown.cell(c.detail) if c.status.lower() == SKIPPED else None


def template_digest() -> str:
    """Identity of the card templates: a changed template republishes the card."""
    h = hashlib.sha256()
    for name in (TEMPLATE_NAME, VARIANT_TEMPLATE_NAME):
        h.update((TEMPLATES_DIR / name).read_bytes())
    return h.hexdigest()[:16]


def _change(before: Any, after: Any) -> str:
    if not isinstance(before, (int, float)) or not before or not isinstance(after, (int, float)):
        return "—"
    return f"{(after - before) / before:+.1%}"


def _pct(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "—"
    return f"{x * _percent_scale(x):.2f} %"


def _variant_files(ev: VariantEvaluation) -> list[dict[str, Any]]:
    """The variant's quants measured against the teacher, next to the teacher's own quants of the same type."""
    files = []
    for typ, f in ev.files.items():
        other = ev.teacher_files.get(typ) or VariantFileFigures()
        files.append({"type": typ, "kld": _fmt(f.kld_mean), "same_top_p": _pct(f.same_top_p),
                      "size": human_bytes(f.size), "status": f.status,
                      "teacher_kld": _fmt(other.kld_mean), "teacher_same_top_p": _pct(other.same_top_p),
                      "teacher_size": human_bytes(other.size)})
    return files


def _distill_context(d: DistillInfo) -> dict[str, Any]:
    cfg = d.config
    return {
        "steps": d.steps, "batch": cfg["batch_size"], "seq_len": cfg["seq_len"],
        "temperature": f"{cfg['temperature']:g}", "lr": f"{cfg['lr']:g}", "seed": cfg.get("seed"),
        "loss_first": _fmt(d.loss_first), "loss_last": _fmt(d.loss_last), "device": d.device, "dtype": d.dtype,
        "seconds": f"{d.seconds or 0:.0f}",
    }


def _variant_evaluation(ev: VariantEvaluation) -> dict[str, Any]:
    return {"text": ev.text, "chunks": ev.chunks, "ctx": ev.ctx, "reference_kld": _fmt(ev.reference_kld_mean),
            "reference_same_top_p": _pct(ev.reference_same_top_p), "files": _variant_files(ev),
            "has_teacher": bool(ev.teacher_files)}


def _int_text(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else "—"


def variant_context(info: VariantInfo, *, hub_url: str = "") -> dict[str, Any]:
    """The ``variant`` block of a card's context, from a variant's ``variant.json`` (pure): the recipe, layers,
    parameters and size before and after, how it was healed, and the quality measured against the teacher next
    to the teacher's own quants of the same type."""
    t, v, p = info.teacher, info.variant, info.prune or PruneInfo()
    pcal = p.calibration or PruneCalibration()
    hub = hub_url.rstrip("/")
    both_layers = isinstance(t.layers, int) and isinstance(v.layers, int)
    return {
        "recipe": info.recipe.name,
        "summary": info.recipe.summary or info.recipe.description or "",
        "heals": info.distill is not None,
        "teacher_repo": t.repo,
        "teacher_url": f"{hub}/{t.repo}" if t.repo and hub else None,
        "teacher_name": t.model_name or "the original model",
        "layers_before": t.layers, "layers_after": v.layers,
        "layers_removed": (t.layers - v.layers) if both_layers else None,
        "intermediate_before": t.intermediate_size, "intermediate_after": v.intermediate_size,
        "params_before": _int_text(t.parameters), "params_after": _int_text(v.parameters),
        "params_change": _change(t.parameters, v.parameters),
        "size_before": human_bytes(t.bytes), "size_after": human_bytes(v.bytes),
        "size_change": _change(t.bytes, v.bytes),
        "removed_layers": ", ".join(str(i) for i in p.removed_layers),
        "prune_method": p.method,
        "calibration": (info.calibration.name if info.calibration else None) or pcal.name,
        "calib_samples": pcal.samples, "calib_seq_len": pcal.seq_len,
        "distill": _distill_context(info.distill) if info.distill is not None else None,
        "evaluation": _variant_evaluation(info.evaluation) if info.evaluation is not None else None,
    }


# ---------------------------------------------------------------------------------------------- context
def _metadata(ladder: Ladder, source: SourceFacts, settings: CardSettings,
              variant: VariantInfo | None) -> dict[str, Any]:
    """The card's YAML front matter."""
    card = dict(source.card_data or {})
    meta: dict[str, Any] = {}
    base_repo = source.repo or ladder.source.repo
    if base_repo:
        meta["base_model"] = base_repo
        meta["base_model_relation"] = VARIANT_RELATION if variant is not None else "quantized"
    # what the source's card says, as text or lists of text only (source_text, license_link): never a mapping or a
    # number in our YAML, never a javascript: or data: link
    fallbacks = {"license": (source.license, ladder.source.license), "pipeline_tag": (source.pipeline_tag,)}
    for k in ("license", "license_name", "license_link", "language", "pipeline_tag"):
        for v in (card.get(k),) + fallbacks.get(k, ()):
            if k == "license_link":
                v = license_link(v, base_repo, source.revision or ladder.source.revision, settings.hub_url)
            elif k == "pipeline_tag" and v and not isinstance(v, str):  # the Hub takes one pipeline tag
                log.warning("source card of %s: pipeline_tag %s is not one string; left out", base_repo, shown(v))
                v = None
            else:
                v = source_text(v, k, base_repo)
            if v:
                meta[k] = v
                break
    # MARKER_TAG marks the repo as the bot's: bot.publish.target never writes to a repo without it (unless adopted)
    tags = list(BASE_TAGS[:1]) + (["imatrix"] if ladder.imatrix else []) + list(BASE_TAGS[1:]) + [MARKER_TAG] \
        + list(settings.extra_tags)
    if variant is not None:
        tags += ["pruned"] + (["distillation"] if variant.distill is not None else [])
    meta["tags"] = list(dict.fromkeys(tags))
    meta["quantized_by"] = settings.quantized_by
    meta.update(gating_fields(card))
    return meta


def _file_row(pf: PublishedFile, size_on_disk: int | None) -> dict[str, Any]:
    """One row of the file table."""
    f, r = pf.file, pf.result
    parts = list(f.all_parts)
    split = len(parts) > 1
    folder = str(Path(parts[0]).parent) if split else None
    size = int(size_on_disk or r.size or f.size or 0)
    fig = r.figures()
    stp = fig["same_top_p"]
    return {
        "type": f.type,
        "file": folder + "/" if split else f.path,
        "parts": parts,
        "n_parts": len(parts),
        "split": split,
        "size": size,
        "size_h": human_bytes(size),
        "bpw": _fmt(f.bpw or r.bpw, 2),
        "kld": _pm(fig["kld_mean"], fig["kld_mean_err"], 4),
        "same_top_p": _pm(stp, fig["same_top_p_err"], 2, _percent_scale(stp), " %"),
        "ppl_ratio": _fmt(fig["ppl_ratio"], 4),
        "description": markdown.cell(f.description or ""),
        "include": f"{folder}/*" if split else f.path,
        "memory": [],
        "tuned": layout.is_tuned(f.type),
    }


def _tuned_rows(ladder: Ladder, report: Report) -> list[dict[str, Any]]:
    """Per-tensor tuned files that were published, each beside its stock file's figures."""
    by_type = {r.type: r for r in report.files}
    rows = []
    for pf in published_files(ladder, report):
        if not layout.is_tuned(pf.type):
            continue
        stock = by_type.get(layout.stock_of(pf.type))
        t, s = pf.result.figures(), (stock.figures() if stock is not None else {})
        rows.append({"type": pf.type, "stock": layout.stock_of(pf.type),
                     "kld": _pm(t["kld_mean"], t["kld_mean_err"], 4),
                     "stock_kld": _pm(s.get("kld_mean"), s.get("kld_mean_err"), 4),
                     "size_h": human_bytes(pf.result.size or pf.file.size),
                     "stock_size_h": human_bytes(stock.size) if stock is not None else "n/a"})
    return rows


def _file_rows(ladder: Ladder, report: Report, sizes: Mapping[str, int]) -> list[dict[str, Any]]:
    """The file table, largest first."""
    rows = [_file_row(pf, sizes.get(pf.type)) for pf in published_files(ladder, report)]
    rows.sort(key=lambda e: (-e["size"], e["type"]))
    return rows


def _kv(source: SourceFacts, files: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The KV-cache block (and each file row's memory at the KV contexts), None without attention shapes."""
    if not (source.n_layer and source.n_kv_heads and source.head_dim):
        return None
    kv = {c: kv_cache_bytes(source.n_layer, c, source.n_kv_heads, source.head_dim) for c in KV_CONTEXTS}
    for e in files:
        e["memory"] = [human_bytes(e["size"] + kv[c]) for c in KV_CONTEXTS]
    return {"contexts": [f"{c // 1024}k" for c in KV_CONTEXTS],
            "bytes": [human_bytes(kv[c]) for c in KV_CONTEXTS],
            "shape": f"{source.n_layer} layers × {source.n_kv_heads} KV heads × {source.head_dim} head dim",
            "n_ctx_train": source.n_ctx_train,
            "beyond_training": [c > source.n_ctx_train for c in KV_CONTEXTS] if source.n_ctx_train else
            [False] * len(KV_CONTEXTS)}


def _calibration(imatrix: ImatrixInfo | None, hub: str) -> dict[str, Any] | None:
    calib = imatrix.calibration if imatrix is not None else None
    if calib is None or calib == CalibrationInfo():
        return None
    return {
        "name": calib.name,
        "bytes": calib.bytes,
        "size_h": human_bytes(calib.bytes) if calib.bytes else None,
        "link": _calibration_link(calib.source, hub),
        "chunks": calib.chunks,
        "ctx": calib.ctx,
        "sha256": calib.sha256,
    }


def _source_links(ladder: Ladder, source: SourceFacts, hub: str) -> dict[str, Any]:
    base_repo = source.repo or ladder.source.repo
    revision = source.revision or ladder.source.revision
    return {
        "base_model": base_repo,
        "base_model_url": f"{hub}/{base_repo}" if base_repo else None,
        "revision": revision,
        "revision_short": revision[:12] if revision else None,
        "revision_url": f"{hub}/{base_repo}/tree/{revision}" if base_repo and revision else None,
    }


@dataclasses.dataclass(frozen=True)
class CardExtras:
    """What a card shows beyond the work dir's records: the update note, the date, the chart, the files' sizes
    on disk (type -> bytes of all parts), for a variant its ``variant.json``, and the types still coming."""

    whats_new: Sequence[str] = ()
    date: dt.date | None = None
    chart: str | None = None
    sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)
    variant: VariantInfo | None = None
    coming: Sequence[str] = ()  # an early publication's types still to come (none: the ladder is complete)


def build_context(ladder: Ladder, report: Report, source: SourceFacts, settings: CardSettings,
                  extras: CardExtras = CardExtras()) -> dict[str, Any]:
    """Everything the template shows, as plain data (pure). With ``extras.variant`` (a variant's record) the card
    describes a pruned (and healed) model derived from the source, measured against the source."""
    hub = settings.hub_url.rstrip("/")
    files = _file_rows(ladder, report, extras.sizes)
    kv = _kv(source, files)
    types = [e["type"] for e in files]
    run_type = DEFAULT_RUN_TYPE if DEFAULT_RUN_TYPE in types else (types[len(types) // 2] if types else None)
    model_name = ladder.model_name or settings.repo_id.split("/")[-1]
    return {
        "metadata": _metadata(ladder, source, settings, extras.variant),
        "title": f"{model_name} GGUF",
        "model_name": model_name,
        "repo_id": settings.repo_id,
        "hub_url": hub,
        **_source_links(ladder, source, hub),
        "llama_cpp_version": ladder.toolchain.version or "unknown",
        "llama_cpp_commit": ladder.toolchain.commit,
        "reference_type": ladder.reference.type or "BF16",
        "imatrix": ladder.imatrix is not None,
        "imatrix_files": list(ladder.imatrix.paths) if ladder.imatrix else [],
        "calibration": _calibration(ladder.imatrix, hub),
        "has_chat_template": bool(source.chat_template),
        **_chat_example(source),
        "files": files,
        "kv": kv,
        "run_type": run_type,
        "projectors": _projectors(ladder, report, files, run_type),
        "ollama_host": settings.ollama_host,
        "chart": extras.chart,
        "checks": _checks(report),
        "evaluation": _evaluation(report),
        "withheld": withheld_files(ladder, report, extras.coming),
        "coming": list(extras.coming),
        "tuned": _tuned_rows(ladder, report),
        "speed": speed_card.speed_section(ladder, report),
        "fit": fit_card.fit_rows(ladder, report),
        "source_unchecked": source_unchecked(report),
        "notes": [markdown.cell(n) for n in report.notes],
        "whats_new": list(extras.whats_new),
        "date": extras.date.isoformat() if extras.date else None,
        "quantized_by": settings.quantized_by,
        "variant": variant_context(extras.variant, hub_url=hub) if extras.variant is not None else None,
    }


# ---------------------------------------------------------------------------------------------- render
def _to_yaml(d: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(d), sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["to_yaml"] = _to_yaml
    return env


def render(context: Mapping[str, Any]) -> str:
    """README.md text for a context from :func:`build_context`."""
    return environment().get_template(TEMPLATE_NAME).render(**context)
