"""report.json of an evaluation: its blocks (settings, texts, the report itself) and writing it with the chart and
the stage record."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converters.core import records
from converters.core.report import FAILED, Check, FileResult, Report, TextInfo
from converters.core.workdir import CalibrationInfo
from converters.formats import chart
from converters.ladder.evaluate import curve
from converters.ladder.evaluate.inputs import N_PREDICT, STAGE, EvalJob, Scoring, tool_versions
from converters.ladder.evaluate.perplexity import scored_per_chunk
from converters.ladder.evaluate.sequential import Z_VERDICT
from converters.ladder.evaluate.source import COMPARE_MAX_KLD, COMPARE_MIN_TOP1
from converters.ladder.evaluate.verdict import ceiling_for, expected_klds, publishable

log = logging.getLogger(__package__)


def public_source(source: str | None) -> str | None:
    """A URL or hf:// address may be published; a local path never is."""
    if source and re.match(r"^(https?|hf)://", source):
        return source
    return None


def _settings(job: EvalJob, scoring: Scoring, files: Sequence[FileResult]) -> dict[str, Any]:
    o = job.opts
    rule = scoring.rule(o)
    return {"chunks": scoring.n_chunks, "chunks_asked": o.chunks, "ctx": scoring.ctx, "threads": o.threads,
            "sequential": {"on": rule.sequential, "precision": o.precision, "min_chunks": o.min_chunks,
                           "max_chunks": scoring.n_chunks, "z": Z_VERDICT},
            "ceilings": {f.type: ceiling_for(f, o.ceilings) for f in files},
            "curve": curve.DEFAULT_RULES.to_json(),
            "expected_kld": expected_klds(files),
            "require_source_check": o.require_source_check,
            "hf_compare": {"max_memory": o.hf_compare_max_memory, "chunks": o.hf_compare_chunks,
                           "min_top1": COMPARE_MIN_TOP1, "max_kld": COMPARE_MAX_KLD},
            "n_predict": N_PREDICT, "reference_logits": o.reference_logits is not None}


def _texts(job: EvalJob, scoring: Scoring) -> dict[str, TextInfo | None]:
    o, cal = job.opts, job.calibration
    ev = TextInfo(name=o.eval_text_name or job.eval_text.name, source=public_source(o.eval_text_source),
                  sha256=job.eval_sha, bytes=job.eval_text.stat().st_size, tokens=scoring.text_tokens,
                  tokens_scored=scoring.n_chunks * scored_per_chunk(scoring.ctx), chunks=scoring.n_chunks,
                  ctx=scoring.ctx)
    if cal is None and not o.calibration_text:
        return {"eval": ev, "calibration": None}
    c = cal or CalibrationInfo()
    return {"eval": ev, "calibration": TextInfo(
        name=c.name or (Path(o.calibration_text).name if o.calibration_text else ""),
        sha256=c.sha256 or job.cal_sha or "", bytes=int(c.bytes or 0), chunks=c.chunks, ctx=c.ctx,
        source=public_source(c.source))}


def build(job: EvalJob, scoring: Scoring, files: list[FileResult], checks: dict[str, Check],
          ref_block: dict[str, Any], seconds: dict[str, float], pending: Sequence[str] = ()) -> Report:
    ok, why = publishable(checks, require_source_check=job.opts.require_source_check)
    src = job.ladder.source
    source = {k: getattr(src, k) for k in ("repo", "revision", "architecture", "parameters", "has_chat_template",
                                          "license")}
    return Report(model_name=job.model_name, source=source, toolchain=job.ladder.toolchain.to_json(),
                  tools=tool_versions(job.tc), texts=_texts(job, scoring), settings=_settings(job, scoring, files),
                  reference=dict(ref_block), checks=dict(checks), files=list(files), publishable=ok, reasons=why,
                  seconds=dict(seconds), file_hashes=dict(job.content), pending=list(pending))


def write(job: EvalJob, report: Report, inputs: dict[str, Any], started: float) -> None:
    """The chart (decoration: its failure is logged), report.json and the stage record."""
    t0 = time.monotonic()
    try:
        report.chart = chart.render(report, job.wd.chart_path).name
        png = job.wd.chart_path  # published with the quants, so checked like them (bot.publish.commit.verified_hashes)
        report.file_hashes[report.chart] = {"size": png.stat().st_size,
                                            "sha256": records.content_sha256(png, job.wd.path)}
    except Exception as e:  # noqa: BLE001 - a chart is decoration; its failure must not lose the measurements
        log.warning("evaluate: chart failed: %s", e)
        report.chart = None
    report.seconds["chart"] = time.monotonic() - t0
    report.seconds["total"] = time.monotonic() - started
    out = job.wd.write_report(report)
    outputs = [out] + ([job.wd.path / report.chart] if report.chart else [])
    records.save(job.wd.path, STAGE, inputs, outputs, report.seconds["total"], job.tc.version,
                 extra={"publishable": report.publishable,
                        "failed": [f.type for f in report.files if f.status == FAILED]})
