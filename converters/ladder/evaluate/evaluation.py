"""The whole evaluation of a ladder: measure every quant against its reference, check it, gate it, write report.json.

:func:`run` reads ``ladder.json``, refuses bad inputs before any long run, stores the reference's
log-probabilities (:mod:`.perplexity`), compares the reference with the source (:mod:`.source`), scores every
quant, runs the checks, asks the gate (:mod:`.verdict`) and writes report.json, the chart and the stage record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converters.core import quants
from converters.core import records
from converters.core.errors import DiskSpaceError, InputError, ParseError, ToolError
from converters.core.hooks import NULL_HOOKS, PROGRESS, Hooks
from converters.core.report import FAILED, PASSED, Check, FileResult, Report, TextInfo
from converters.core.workdir import CalibrationInfo, Ladder, LadderFile, WorkDir
from converters.formats import chart
from converters.formats import checkpoint as checkpoint_mod
from converters.ladder.evaluate import curve
from converters.ladder.evaluate.perplexity import (BaseLogits, base_logits_bytes, count_tokens, run_base, run_kld,
                                                   scored_per_chunk)
from converters.ladder.evaluate.source import (COMPARE_MAX_KLD, COMPARE_MIN_TOP1, CompareSpec, compare_with_source,
                                               source_checks)
from converters.ladder.evaluate.verdict import ceiling_for, expected_klds, judge, publishable
from converters.llama import mmproj
from converters.llama import toolchain as tc_mod
from converters.llama import verify

log = logging.getLogger(__package__)  # the package's name, as before the split (log lines name it)

STAGE = "evaluate"
DEFAULT_CHUNKS = 64  # chunks of ``ctx`` tokens when not given: about 16k scored tokens at ctx 512
DISK_MARGIN = 256 << 20
N_PREDICT = 96  # bound on the smoke-test generation (and on the length of the reference's chat reply)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def _sha256_text(path: Path) -> str:
    return records.sha256_file(path)


def _tool_versions(tc: tc_mod.Toolchain) -> dict[str, str | None]:
    out: dict[str, str | None] = {"llama.cpp": tc.version, "llama.cpp_commit": tc.commit}
    for dist in ("ggufbot", "transformers", "torch", "gguf", "jinja2", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _ladder_identity(ladder: Ladder) -> dict[str, Any]:
    """ladder.json without its timings (rewritten by every run of the quantize stage, finished or skipped)."""
    d = ladder.to_json()
    d.pop("seconds", None)
    d["files"] = [{k: v for k, v in f.items() if k != "seconds"} for f in d.get("files", [])]
    return d


def _fingerprint(path: Path | None, cache_dir: Path) -> dict[str, Any] | None:
    return records.fingerprint_file(path, cache_dir) if path is not None and path.exists() else None


# --------------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What to evaluate with. ``reference_logits``: a base-logits file to measure against instead of the work
    dir's own reference (for pruned or distilled variants: the teacher's BF16); it is read, never deleted.
    ``eval_text_name`` / ``eval_text_source``: how the report names the text (a URL or hf:// address is
    recorded; a local path never is). ``keep_base_logits``: move the base-logits file there instead of
    deleting it (benchmarks, tests)."""

    eval_text: Path
    calibration_text: Path | None = None
    chunks: int | None = None
    ctx: int = 512
    threads: int | None = None
    source_dir: Path | None = None
    reference_logits: Path | None = None
    hf_compare_max_memory: int | None = None  # bytes of RAM for the source model (None: 3/4 of what is available)
    require_source_check: bool = True  # a skipped BF16-vs-source comparison makes the ladder not publishable
    hf_compare_chunks: int = 2
    ceilings: dict[str, float] | None = None
    eval_text_name: str | None = None
    eval_text_source: str | None = None
    keep_base_logits: Path | None = None


@dataclasses.dataclass(frozen=True)
class _Job:
    """The validated inputs of one evaluation."""

    wd: WorkDir
    ladder: Ladder
    opts: EvalOptions
    eval_text: Path
    eval_sha: str
    cal_sha: str | None
    src_path: Path | None
    reference: Path
    tc: tc_mod.Toolchain
    hooks: Hooks
    content: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # WorkDir.content: what is measured

    @property
    def calibration(self) -> CalibrationInfo | None:
        return self.ladder.imatrix.calibration if self.ladder.imatrix is not None else None

    def step(self, text: str, done: int, total: int) -> None:
        self.hooks.step(STAGE, done, total, text)


@dataclasses.dataclass(frozen=True)
class _Scoring:
    """The tokens every file is scored on: the base-logits file and its shape."""

    ctx: int
    n_chunks: int
    text_tokens: int
    base_path: Path
    own_base: Path | None  # written by this run (removed at the end), None when given


def run(workdir: Path | WorkDir, options: EvalOptions, *, toolchain: tc_mod.Toolchain | None = None,
        hooks: Hooks = NULL_HOOKS) -> Report:
    """Evaluate and check every file of ``workdir/ladder.json``; write report.json and the chart; return the report.

    Progress goes to ``hooks.step("evaluate", done, total, what)``, which may stop the run between steps.
    """
    started = time.monotonic()
    job = _prepare(WorkDir(workdir), options, toolchain, hooks)
    inputs = _record_inputs(job)
    done = records.complete(job.wd.path, STAGE, inputs)
    if done is not None and job.wd.has_report():
        log.info("evaluate: %s already evaluated for these inputs; skipped", _model_name(job))
        return job.wd.report()
    seconds: dict[str, float] = {}
    ref_facts = verify.GgufFacts.read(job.reference)
    for stale in job.wd.path.glob(f"{records.TMP_MARK}*/base-logits*.kld"):  # left by a killed evaluation
        _remove_scratch(stale)
    t0 = time.monotonic()
    text_tokens = count_tokens(job.tc, job.reference, job.eval_text)
    seconds["tokenize"] = time.monotonic() - t0
    ref_block: dict[str, Any] = {"type": job.ladder.reference.type, "path": job.ladder.reference.path,
                                 "size": job.reference.stat().st_size,
                                 "sha256": job.content.get(job.ladder.reference.path, {}).get("sha256")}
    scoring = _scoring(job, len(ref_facts.tokens), text_tokens, ref_block)
    checks: dict[str, Check] = {}
    files = _measure(job, scoring, ref_facts, ref_block, checks, seconds)
    total_steps = len(job.ladder.files) + 3
    job.step("checks", total_steps - 1, total_steps)
    t0 = time.monotonic()
    notes = _check(job, ref_facts, files, checks)
    seconds["checks"] = time.monotonic() - t0
    report = _report(job, scoring, files, checks, ref_block, seconds)
    report.notes = notes
    _write(job, report, inputs, started)
    hooks.emit(STAGE, PROGRESS, done=total_steps, total=total_steps, text="done")
    log.info("evaluate: %s: %d/%d files passed, publishable=%s (%.0f s)", report.model_name,
             sum(f.status == PASSED for f in files), len(files), report.publishable, seconds["total"])
    return report


def _model_name(job: _Job) -> str:
    return job.ladder.model_name or job.wd.name


def _prepare(wd: WorkDir, opts: EvalOptions, toolchain: tc_mod.Toolchain | None, hooks: Hooks) -> _Job:
    """Read the ladder and refuse bad inputs before any long run."""
    eval_text = Path(opts.eval_text)
    ladder = wd.ladder()
    if not eval_text.is_file():
        raise InputError(f"evaluation text not found: {eval_text}")
    eval_sha = _sha256_text(eval_text)
    cal_sha = None
    if opts.calibration_text is not None:
        if Path(opts.calibration_text).resolve() == eval_text.resolve():
            raise InputError("the evaluation text is the calibration text: a quant must not be judged on the text "
                             "it was calibrated on")
        cal_sha = _sha256_text(Path(opts.calibration_text))
    cal = ladder.imatrix.calibration if ladder.imatrix is not None else None
    if eval_sha in {cal_sha, cal.sha256 if cal is not None else None}:
        raise InputError(f"the evaluation text {eval_text.name} has the same content as the calibration text: a quant "
                         "must not be judged on the text it was calibrated on")
    if opts.chunks is not None and opts.chunks < 1:
        raise InputError(f"chunks must be at least 1, not {opts.chunks}")
    for k in opts.ceilings or {}:
        if k != "default":
            quants.get(k)  # UnknownName for a typo
    src_path = opts.source_dir or (Path(ladder.source.path) if ladder.source.path else None)
    tc = toolchain or tc_mod.find(required=True)
    assert tc is not None
    reference = wd.path / ladder.reference.path
    if not reference.exists():
        raise InputError(f"the reference GGUF {ladder.reference.path} is missing from {wd.path}")
    verify.require_sandboxed_templates(reference)  # a work dir from elsewhere: its templates pass before any program
    return _Job(wd=wd, ladder=ladder, opts=opts, eval_text=eval_text, eval_sha=eval_sha, cal_sha=cal_sha,
                src_path=src_path, reference=reference, tc=tc, hooks=hooks, content=wd.content(ladder))


def _record_inputs(job: _Job) -> dict[str, Any]:
    o = job.opts
    # every file's full content (a quant changed in place, same size, is measured again) and the source's files
    source = checkpoint_mod.files_fingerprint(job.src_path, job.wd.path) if job.src_path else None
    return {"ladder": _ladder_identity(job.ladder), "files": job.content, "source": source,
            "eval_text": job.eval_sha, "chunks": o.chunks, "ctx": o.ctx,
            "reference_logits": _fingerprint(o.reference_logits, job.wd.path), "ceilings": o.ceilings or {},
            "hf_compare_max_memory": o.hf_compare_max_memory, "hf_compare_chunks": o.hf_compare_chunks,
            "require_source_check": o.require_source_check,
            "source_dir": str(job.src_path) if job.src_path else None, "toolchain": job.tc.version}


def _scoring(job: _Job, n_vocab: int, text_tokens: int, ref_block: dict[str, Any]) -> _Scoring:
    """Given base logits (their shape decides), or the chunks this run stores the reference's logits for."""
    o = job.opts
    if o.reference_logits is not None:
        base = BaseLogits.open(Path(o.reference_logits))
        if base.n_vocab != n_vocab:
            raise InputError(f"reference logits have {base.n_vocab} vocabulary entries, the model {n_vocab}")
        ref_block["logits"] = {"name": Path(o.reference_logits).name, "chunks": base.n_chunk, "ctx": base.n_ctx,
                               "given": True}
        return _Scoring(base.n_ctx, base.n_chunk, text_tokens, Path(o.reference_logits), None)
    ctx = o.ctx
    available = text_tokens // ctx
    if available < 2:
        raise InputError(f"the evaluation text {job.eval_text.name} has {text_tokens} tokens: at least {2 * ctx} are "
                         f"needed for a context of {ctx}")
    n_chunks = min(o.chunks or DEFAULT_CHUNKS, available)
    if n_chunks * scored_per_chunk(ctx) < 100:
        n_chunks = min(available, -(-100 // scored_per_chunk(ctx)))  # llama.cpp reports nothing below 100 tokens
    need = base_logits_bytes(n_vocab, ctx, n_chunks)
    free = shutil.disk_usage(job.wd.path).free
    if free < need + DISK_MARGIN:
        raise DiskSpaceError(str(job.wd.path), need + DISK_MARGIN, free)
    own = records.tmp_path_for(job.wd.path / "base-logits.kld")
    own.parent.mkdir(parents=True, exist_ok=True)
    return _Scoring(ctx, n_chunks, text_tokens, own, own)


def _measure(job: _Job, scoring: _Scoring, ref_facts: verify.GgufFacts, ref_block: dict[str, Any],
             checks: dict[str, Check], seconds: dict[str, float]) -> list[FileResult]:
    """The reference runs, then every quant against the reference; the base logits removed (or kept) after."""
    try:
        _reference_runs(job, scoring, ref_facts, ref_block, checks, seconds)
        files = [_measure_file(job, scoring, lf, i + 2, len(job.ladder.files) + 3)
                 for i, lf in enumerate(job.ladder.files)]
        if "ppl" not in ref_block:
            first = next((f.stats for f in files if f.stats), None)
            if first is not None:
                ref_block.update(ppl=first.ppl_base, ppl_err=first.ppl_base_err)
    finally:
        own = scoring.own_base
        if own is not None:
            if job.opts.keep_base_logits is not None and own.exists():
                shutil.move(own, job.opts.keep_base_logits)
            _remove_scratch(own)
    seconds["kld"] = sum(f.seconds.get("kld", 0.0) for f in files)
    return files


def _reference_runs(job: _Job, scoring: _Scoring, ref_facts: verify.GgufFacts, ref_block: dict[str, Any],
                    checks: dict[str, Check], seconds: dict[str, float]) -> None:
    """Store the reference's log-probabilities, compare it with the source, measure it against given logits."""
    total = len(job.ladder.files) + 3
    o = job.opts
    if scoring.own_base is not None:
        job.step("base logits", 0, total)
        log.info("evaluate: base logits of %s over %d chunks of %d tokens (%.2f GB)", job.reference.name,
                 scoring.n_chunks, scoring.ctx,
                 base_logits_bytes(len(ref_facts.tokens), scoring.ctx, scoring.n_chunks) / 1e9)
        ppl, ppl_err, secs = run_base(job.tc, job.reference, job.eval_text, scoring.own_base, ctx=scoring.ctx,
                                      chunks=scoring.n_chunks, threads=o.threads)
        ref_block.update(ppl=ppl, ppl_err=ppl_err)
        seconds["base_logits"] = secs
    job.step("bf16 vs source", 1, total)
    t0 = time.monotonic()
    if job.src_path is None or not job.src_path.is_dir():
        checks["bf16_vs_source"] = Check.fail("the source checkpoint is not available, so the conversion cannot "
                                              "be compared with it")
    else:
        checks["bf16_vs_source"] = _compare(job, ref_facts, scoring)
    seconds["source_comparison"] = time.monotonic() - t0
    if o.reference_logits is not None:  # the variant's own reference, measured against the teacher
        try:
            stats, secs = run_kld(job.tc, job.reference, scoring.base_path, ctx=scoring.ctx, threads=o.threads)
            ref_block.update(dict(stats.figures().items()))
            ref_block.update(ppl=stats.ppl, ppl_err=stats.ppl_err)
            seconds["reference_kld"] = secs
        except (ToolError, ParseError) as e:
            ref_block["error"] = e.short()


def _measure_file(job: _Job, scoring: _Scoring, lf: LadderFile, step: int, total: int) -> FileResult:
    """One quant's figures against the reference (a failed run is recorded in the result, not raised)."""
    job.step(f"kld {lf.type}", step, total)
    fr = FileResult(type=lf.type, path=lf.path, size=int(lf.size or 0), bpw=lf.bpw, bpw_nominal=lf.bpw_nominal,
                    parts=[{"path": p, **job.content[p]} for p in lf.all_parts if p in job.content],
                    extra={"fit": lf.extra["fit"]} if "fit" in lf.extra else {})  # a fit file's facts: its gate
    fr.sha256 = fr.parts[0]["sha256"] if fr.parts and fr.parts[0]["path"] == lf.path else None
    path = job.wd.path / lf.path
    if not path.exists():
        fr.error = f"{lf.path} is missing"
    else:
        try:
            fr.stats, fr.seconds["kld"] = run_kld(job.tc, path, scoring.base_path, ctx=scoring.ctx,
                                                  threads=job.opts.threads)
        except ToolError as e:
            fr.error = verify.tool_error_reason(e)
        except ParseError as e:
            fr.error = str(e)
    log.info("evaluate: %s %s", lf.type, f"KLD {fr.stats.kld_mean:.5f} ± {fr.stats.kld_mean_err:.5f}"
             if fr.stats else f"failed: {fr.error}")
    return fr


def _check(job: _Job, ref_facts: verify.GgufFacts, files: Sequence[FileResult],
           checks: dict[str, Check]) -> list[str]:
    """The checks (into ``checks`` and each file's), then the gate's verdict on every file; returns its notes."""
    job_checks, file_checks = _run_checks(job, ref_facts, files)
    checks.update(job_checks)
    for f in files:
        f.checks.update(file_checks.get(f.type, {}))
    per_job = {k: v for k, v in checks.items() if k in ("chat_template", "special_tokens", "end_of_reply")}
    verdict = judge(files, job.opts.ceilings, job_checks=per_job)
    for f in files:
        f.reasons = verdict.reasons[f.type]
        f.status = FAILED if f.reasons else PASSED
    return verdict.notes


def _settings(job: _Job, scoring: _Scoring, files: Sequence[FileResult]) -> dict[str, Any]:
    o = job.opts
    return {"chunks": scoring.n_chunks, "chunks_asked": o.chunks, "ctx": scoring.ctx, "threads": o.threads,
            "ceilings": {f.type: ceiling_for(f, o.ceilings) for f in files},
            "curve": curve.DEFAULT_RULES.to_json(),
            "expected_kld": expected_klds(files),
            "require_source_check": o.require_source_check,
            "hf_compare": {"max_memory": o.hf_compare_max_memory, "chunks": o.hf_compare_chunks,
                           "min_top1": COMPARE_MIN_TOP1, "max_kld": COMPARE_MAX_KLD},
            "n_predict": N_PREDICT, "reference_logits": o.reference_logits is not None}


def _texts(job: _Job, scoring: _Scoring) -> dict[str, TextInfo | None]:
    o, cal = job.opts, job.calibration
    ev = TextInfo(name=o.eval_text_name or job.eval_text.name, source=_public_source(o.eval_text_source),
                  sha256=job.eval_sha, bytes=job.eval_text.stat().st_size, tokens=scoring.text_tokens,
                  tokens_scored=scoring.n_chunks * scored_per_chunk(scoring.ctx), chunks=scoring.n_chunks,
                  ctx=scoring.ctx)
    if cal is None and not o.calibration_text:
        return {"eval": ev, "calibration": None}
    c = cal or CalibrationInfo()
    return {"eval": ev, "calibration": TextInfo(
        name=c.name or (Path(o.calibration_text).name if o.calibration_text else ""),
        sha256=c.sha256 or job.cal_sha or "", bytes=int(c.bytes or 0), chunks=c.chunks, ctx=c.ctx,
        source=_public_source(c.source))}


def _report(job: _Job, scoring: _Scoring, files: list[FileResult], checks: dict[str, Check],
            ref_block: dict[str, Any], seconds: dict[str, float]) -> Report:
    ok, why = publishable(checks, require_source_check=job.opts.require_source_check)
    src = job.ladder.source
    source = {k: getattr(src, k) for k in ("repo", "revision", "architecture", "parameters", "has_chat_template",
                                          "license")}
    return Report(model_name=_model_name(job), source=source, toolchain=job.ladder.toolchain.to_json(),
                  tools=_tool_versions(job.tc), texts=_texts(job, scoring), settings=_settings(job, scoring, files),
                  reference=ref_block, checks=checks, files=files, publishable=ok, reasons=why, seconds=seconds,
                  file_hashes=dict(job.content))


def _write(job: _Job, report: Report, inputs: dict[str, Any], started: float) -> None:
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


def _remove_scratch(path: Path) -> None:
    """Delete a base-logits file (they are large) and its scratch folder when that is left empty."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def _public_source(source: str | None) -> str | None:
    """A URL or hf:// address may be published; a local path never is."""
    if source and re.match(r"^(https?|hf)://", source):
        return source
    return None


def _compare(job: _Job, facts: verify.GgufFacts, scoring: _Scoring) -> Check:
    """The reference against the source in transformers, on the stored logits (or a short run of its own)."""
    o = job.opts
    assert job.src_path is not None
    spec = CompareSpec(chunks=o.hf_compare_chunks, add_bos=facts.add_bos, bos_id=facts.bos_id,
                       parameters=job.ladder.source.parameters, max_memory=o.hf_compare_max_memory,
                       offload_dir=records.tmp_path_for(job.wd.path / "offload"), threads=o.threads)
    tmp = None
    try:
        if scoring.own_base is None:  # measured against someone else's logits: a short run of our own reference
            tmp = records.tmp_path_for(job.wd.path / "base-logits-compare.kld")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            run_base(job.tc, job.reference, job.eval_text, tmp, ctx=scoring.ctx, chunks=o.hf_compare_chunks,
                     threads=o.threads)
            base = BaseLogits.open(tmp)
        else:
            base = BaseLogits.open(scoring.own_base)
        return compare_with_source(job.src_path, base, spec)
    except (ToolError, ParseError) as e:
        return Check.fail(f"the reference could not be run for the comparison: {e.short()}")
    finally:
        if tmp is not None:
            _remove_scratch(tmp)


def _source_checks(job: _Job, ref_facts: verify.GgufFacts) -> tuple[dict[str, Check], Any]:
    """Tokenizer, chat template and special tokens against the source (and its tokenizer, when it loads)."""
    src = job.src_path
    if src is None or not src.is_dir():
        missing = Check.fail("the source checkpoint is not available")
        return {"tokenizer": missing, "chat_template": missing, "special_tokens": missing}, None
    return source_checks(job.tc, job.reference, ref_facts, src)



def _file_checks(job: _Job, path: Path, ref_facts: verify.GgufFacts, prompt: str) -> dict[str, Check]:
    """A quant's metadata against the reference's, and a short generation."""
    checks: dict[str, Check] = {}
    if not path.exists():
        return checks
    try:
        checks["metadata"] = verify.metadata_check(verify.GgufFacts.read(path), ref_facts)
    except InputError as e:
        checks["metadata"] = Check.fail(str(e))
    try:
        checks["generation"] = verify.generation_check(
            verify.generate(job.tc, path, prompt, n_predict=N_PREDICT, threads=job.opts.threads))
    except ToolError as e:
        checks["generation"] = Check.fail(f"llama.cpp cannot generate with it: {verify.tool_error_reason(e)}")
    return checks


def _run_checks(job: _Job, ref_facts: verify.GgufFacts,
                files: Sequence[FileResult]) -> tuple[dict[str, Check], dict[str, dict[str, Check]]]:
    checks, tok = _source_checks(job, ref_facts)
    prompt, is_chat = verify.prompt_for(ref_facts, tok)
    try:
        gen = verify.generate(job.tc, job.reference, prompt, n_predict=N_PREDICT, threads=job.opts.threads)
        checks["end_of_reply"] = verify.end_of_reply_check(gen, is_chat, N_PREDICT)
        checks["generation"] = verify.generation_check(gen)
    except ToolError as e:
        checks["generation"] = Check.fail(f"the reference does not generate: {verify.tool_error_reason(e)}")
    per_file = {f.type: _file_checks(job, job.wd.path / f.path, ref_facts, prompt) for f in files}
    projector = _projector_check(job)
    if projector is not None:
        checks[mmproj.CHECK] = projector
    return checks, per_file


def _projector_check(job: _Job) -> Check | None:
    """A vision-language model's projector files, each loaded in ``llama-mtmd-cli`` with the ladder's largest text
    model (the reference when no quant is there) on a generated test image: finite embeddings or failed."""
    projectors = [job.wd.path / p.path for p in job.ladder.projectors]
    if not projectors:
        return None
    missing = [p.name for p in projectors if not p.is_file()]
    if missing:
        return Check.fail(f"projector file(s) missing from the work directory: {', '.join(missing)}")
    by_bits = sorted(job.ladder.files, key=lambda f: -(f.bpw_nominal or 0.0))
    text_model = next((job.wd.path / f.path for f in by_bits if (job.wd.path / f.path).is_file()), job.reference)
    scratch = records.tmp_dir_for(job.wd.path)
    try:
        return mmproj.projector_check(job.tc, text_model, projectors, scratch, threads=job.opts.threads)
    finally:
        with contextlib.suppress(OSError):
            scratch.rmdir()
