"""The evaluation of a ladder, file by file: measure each quant against its reference, check it, gate it.

:class:`LadderEvaluation` is opened once per job: it refuses bad inputs before any long run (:mod:`.inputs`),
stores the reference's log-probabilities over the most chunks a file may need (:mod:`.perplexity`; once per
job, shared by every file, tuned files included), compares the reference with the source and runs the checks
that do not depend on a quant (:mod:`.checks`). Then :meth:`~LadderEvaluation.measure` takes one quant as soon
as it exists: its chunks are scored until its mean KLD is known well enough (:mod:`.sequential`), its own checks
run, and the gate gives its verdict against the files measured before it (:func:`.verdict.judge_file`).

A verdict is final (the file may be published before the rest of the ladder exists) only once the ladder's curve
around the file is measured (:func:`.verdict.awaits_curve`: enough measured files on each side of it in bits per
weight, where the ladder has types). A stock file measured before that (the first file of a ladder always) is
*held*: when a later measurement brackets it, or at :meth:`~LadderEvaluation.finish`, it is judged again, purely,
against every other file measured by then, and only then is it *settled*. Files bracketed when measured are settled
at once. :meth:`~LadderEvaluation.settled` hands out the files settled since its last call, in order: the pipeline
announces a file only then (``FILE_READY``).

Each measured file is recorded (``records/evaluate.<TYPE>.json``, keyed by its content, the evaluation's inputs
and the files measured before it: their hashes, not their verdicts), so a killed job resumes without measuring it
again (:mod:`.settle` holds and settles the files). The record holds the file's first verdict; a resumed job takes the files from their records in the same
order and holds and re-judges them as the first run did (pure), so the verdicts are the same and no other record
is needed. report.json is rewritten after each file: ``files`` are the settled files, ``pending`` the types not
settled yet, held ones included, whose figures are under ``held`` (no status: none is final).
:meth:`~LadderEvaluation.finish` settles every held file and adds what needs the whole ladder (the projector
check, the curve's notes, the chart), writes the stage record and removes the base logits. :func:`run` is open,
measure every file of ladder.json in its order, finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from converters.core import records
from converters.core.errors import CheckFailed, InputError, ParseError, ToolError
from converters.core.hooks import NULL_HOOKS, PROGRESS, Hooks
from converters.core.report import FAILED, PASSED, Check, FileResult, Report
from converters.core.workdir import LadderFile, WorkDir
from converters.ladder import speed
from converters.ladder.evaluate import checks as checks_mod
from converters.ladder.evaluate import reporting
from converters.ladder.evaluate import sequential, settle
from converters.ladder.evaluate import verdict
from converters.ladder.evaluate.inputs import (BASE_STAGE, N_PREDICT, STAGE, EvalJob, EvalOptions, Scoring,
                                               base_inputs, common_inputs, file_inputs, file_record, prepare,
                                               record_inputs, remove_base, remove_scratch, scoring)
from converters.ladder.evaluate.perplexity import BaseLogits, base_logits_bytes, count_tokens, run_base, run_kld
from converters.ladder.evaluate.verdict import judge_file, ladder_notes, thresholds
from converters.llama import mmproj
from converters.llama import toolchain as tc_mod
from converters.llama import verify

__all__ = ["N_PREDICT", "STAGE", "EvalOptions", "LadderEvaluation", "run"]

log = logging.getLogger(__package__)  # the package's name, as before the split (log lines name it)

JOB_CHECKS = ("chat_template", "special_tokens", "end_of_reply")  # the reference's checks that fail every file


class LadderEvaluation:
    """One job's evaluation, file by file (see the module's docstring). Use :meth:`open`; close it (or use it as
    a context manager) when a job stops before :meth:`finish`, so its base logits are removed."""

    def __init__(self, job: EvalJob, started: float, expected: Sequence[str] = ()) -> None:
        self.job = job
        self._common = common_inputs(job)  # hashes the source's files once
        self.files: list[FileResult] = []
        self.checks: dict[str, Check] = {}
        self.ref_block: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self._started = started
        self._expected = list(expected)
        self._done: Report | None = None
        self._scoring: Scoring | None = None
        self._base: BaseLogits | None = None
        self._ref_facts: verify.GgufFacts | None = None
        self._prompt = ""
        self._settling = settle.Settling(lambda f, others: judge_file(f, others, self.job.opts.ceilings,
                                                                      job_checks=self._job_checks()))
        self._handed: set[str] = set()  # the types settled() has handed out (a finished evaluation's report)

    # ---- opening
    @classmethod
    def open(cls, workdir: Path | WorkDir, options: EvalOptions, *, toolchain: tc_mod.Toolchain | None = None,
             hooks: Hooks = NULL_HOOKS, expected: Sequence[str] = ()) -> "LadderEvaluation":
        """Validate the inputs, store (or take) the base logits, compare the reference with the source, run the
        reference's checks, and write report.json with no file measured yet. ``expected``: quant types still to
        come that ladder.json does not list yet (reported as ``pending``). A ladder already evaluated for
        exactly these inputs is not evaluated again: :meth:`measure` and :meth:`finish` answer from its report."""
        started = time.monotonic()
        job = prepare(WorkDir(workdir), options, toolchain, hooks)
        ev = cls(job, started, expected)
        if records.complete(job.wd.path, STAGE, record_inputs(job, ev._common)) is not None and job.wd.has_report():
            done = job.wd.report()
            if _measured_as_on_disk(done, job.wd.path, ev._expected):
                log.info("evaluate: %s already evaluated for these inputs; skipped", job.model_name)
                ev._done = done
                return ev
            log.info("evaluate: %s: the files still to come (%s) are not those the earlier evaluation measured; "
                     "evaluated again", job.model_name, ", ".join(ev._expected))
        try:
            ev._start()
        except BaseException:
            ev.close()
            raise
        return ev

    def _start(self) -> None:
        job = self.job
        ref_facts = self._ref_facts = verify.GgufFacts.read(job.reference)
        for stale in [*job.wd.path.glob(f"{records.TMP_MARK}*/base-logits*.kld"),  # left by a killed evaluation
                      *job.wd.path.glob(f"{records.TMP_MARK}*/view-*.kld")]:
            remove_scratch(stale)
        t0 = time.monotonic()
        text_tokens = count_tokens(job.tc, job.reference, job.eval_text)
        self.seconds["tokenize"] = time.monotonic() - t0
        self.ref_block.update({"type": job.ladder.reference.type, "path": job.ladder.reference.path,
                               "size": job.reference.stat().st_size,
                               "sha256": job.content.get(job.ladder.reference.path, {}).get("sha256")})
        self._scoring = scoring(job, len(ref_facts.tokens), text_tokens, self.ref_block)
        self._reference_runs()
        self._base = BaseLogits.open(self._scoring.base_path)
        t0 = time.monotonic()
        ref_checks, self._prompt = checks_mod.reference_checks(job, ref_facts)
        self.checks.update(ref_checks)
        self.seconds["reference_checks"] = time.monotonic() - t0
        self._write_partial()

    def _reference_runs(self) -> None:
        """Store the reference's log-probabilities, compare it with the source, measure it against given logits."""
        job, sc, o = self.job, self._scoring, self.job.opts
        assert sc is not None and self._ref_facts is not None
        total = self._total()
        if sc.own_base is not None:
            job.step("base logits", 0, total)
            key = base_inputs(job, sc)
            kept = records.complete(job.wd.path, BASE_STAGE, key)
            if kept is not None:  # stored by a run of this evaluation that was killed
                log.info("evaluate: base logits of %s over %d chunks of %d tokens: kept from the interrupted run",
                         job.reference.name, sc.n_chunks, sc.ctx)
                self.ref_block.update(ppl=kept.extra["ppl"], ppl_err=kept.extra["ppl_err"])
                self.seconds["base_logits"] = 0.0
            else:
                log.info("evaluate: base logits of %s over %d chunks of %d tokens (%.2f GB)", job.reference.name,
                         sc.n_chunks, sc.ctx,
                         base_logits_bytes(len(self._ref_facts.tokens), sc.ctx, sc.n_chunks) / 1e9)
                remove_base(job.wd.path, sc.own_base)  # other inputs' (the disk check counted them as free)
                with records.atomic_output(sc.own_base) as tmp:
                    ppl, ppl_err, secs = run_base(job.tc, job.reference, job.eval_text, tmp, ctx=sc.ctx,
                                                  chunks=sc.n_chunks, threads=o.threads)
                records.save(job.wd.path, BASE_STAGE, key, [sc.own_base], secs, job.tc.version,
                             extra={"ppl": ppl, "ppl_err": ppl_err})
                self.ref_block.update(ppl=ppl, ppl_err=ppl_err)
                self.seconds["base_logits"] = secs
        job.step("bf16 vs source", 1, total)
        t0 = time.monotonic()
        self.checks["bf16_vs_source"] = checks_mod.compare(job, self._ref_facts, sc)
        self.seconds["source_comparison"] = time.monotonic() - t0
        if o.reference_logits is not None:  # the variant's own reference, measured against the teacher
            try:
                stats, secs = run_kld(job.tc, job.reference, sc.base_path, ctx=sc.ctx, threads=o.threads)
                self.ref_block.update(dict(stats.figures().items()))
                self.ref_block.update(ppl=stats.ppl, ppl_err=stats.ppl_err)
                self.seconds["reference_kld"] = secs
            except (ToolError, ParseError) as e:
                self.ref_block["error"] = e.short()

    # ---- measuring
    def ladder_files(self) -> list[LadderFile]:
        """The quants of ladder.json as it is now (the quantize stage may still be adding some)."""
        try:
            return list(self.job.wd.ladder().files)
        except InputError:  # being rewritten, or gone: what it listed when the evaluation opened
            return list(self.job.ladder.files)

    def pending(self) -> list[str]:
        """The types whose verdict is not final yet: not measured, or held (in ladder order, then the expected)."""
        final = {f.type for f in self.files if not self._settling.is_held(f.type)}
        types = [lf.type for lf in self.ladder_files()] + self._expected + self._settling.held
        return [t for t in dict.fromkeys(types) if t not in final]

    def held(self) -> list[FileResult]:
        """The measured files whose verdict is not final yet, in measuring order."""
        return [f for t in self._settling.held for f in self.files if f.type == t]

    def settled(self) -> list[FileResult]:
        """The files whose verdict became final since the last call, in the order they became final (within one
        measurement: the held files it brackets in measuring order, then the measured file). Each file once."""
        return self._settling.settled()

    def _total(self) -> int:
        measured = {f.type for f in self.files}
        return len(self.files) + sum(t not in measured for t in self.pending()) + 3

    def _ladder_bits(self) -> list[float]:
        """The nominal bits per weight of the ladder's stock types, measured or not (ladder.json's, and those still
        expected)."""
        nominal = {lf.type: (lf.extra, lf.bpw_nominal) for lf in self.ladder_files()}
        for t in self._expected:
            nominal.setdefault(t, ({}, None))
        out = []
        for t, (extra, bits) in nominal.items():
            b = bits if bits is not None else verdict.type_bits(t)
            if verdict.is_stock(t, extra) and b is not None:
                out.append(float(b))
        return out

    def measure(self, lf: LadderFile) -> FileResult:
        """One quant as soon as it exists: its figures (sequential), its checks, and the gate's verdict against
        the files measured before it: final, or held until the curve around it is measured (the module's
        docstring; :meth:`settled` says which files became final). A file measured before for the same inputs (a
        resumed job) is taken from its record, not measured again."""
        if self._done is not None:
            try:
                done = self._done.file(lf.type)
            except KeyError:
                done = None
            if done is None or not _same_as_on_disk(done, self.job.wd.path):
                # made again since the evaluation opened (a tuned or fit file rebuilt by changed settings): its old
                # figures are not this file's; the job stops here, and its next run measures the file (the open
                # above refuses the earlier evaluation once this file is on disk)
                raise CheckFailed(STAGE, f"{lf.type} changed after the evaluation took the earlier one's figures; "
                                         "run the job again to measure it")
            if done.type not in self._handed:
                self._handed.add(done.type)
                self._settling.ready.append(done)
            return done
        for f in self.files:
            if f.type == lf.type:
                return f
        job = self.job
        job.step(f"kld {lf.type}", len(self.files) + 2, self._total())
        content = {p: {"size": (job.wd.path / p).stat().st_size,
                       "sha256": records.content_sha256(job.wd.path / p, job.wd.path)}
                   for p in lf.all_parts if (job.wd.path / p).is_file()}
        earlier = [{"type": f.type, "sha256": f.sha256, "parts": f.parts} for f in self.files]
        key = file_inputs(job, lf, content, earlier, self._common)
        name = file_record(lf.type)
        fr = None
        rec = records.complete(job.wd.path, name, key)
        if rec is not None and isinstance(rec.extra.get("result"), dict):
            fr = FileResult.from_json(rec.extra["result"])
            log.info("evaluate: %s already measured for these inputs (%s)", lf.type, fr.status)
        if fr is None:
            t0 = time.monotonic()
            fr = self._measure_new(lf, content)
            records.save(job.wd.path, name, key, [], time.monotonic() - t0, job.tc.version,
                         extra={"result": fr.to_json()})
        self.files.append(fr)
        self._settling.measured(fr, self.files, self._ladder_bits())
        job.content.update(content)
        if "ppl" not in self.ref_block and fr.stats is not None:  # given logits: the reference's PPL from a run
            self.ref_block.update(ppl=fr.stats.ppl_base, ppl_err=fr.stats.ppl_base_err)
        self._write_partial()
        return fr

    def _measure_new(self, lf: LadderFile, content: dict[str, dict[str, Any]]) -> FileResult:
        job, o = self.job, self.job.opts
        assert self._scoring is not None and self._base is not None and self._ref_facts is not None
        fr = FileResult(type=lf.type, path=lf.path, size=int(lf.size or 0), bpw=lf.bpw, bpw_nominal=lf.bpw_nominal,
                        parts=[{"path": p, **content[p]} for p in lf.all_parts if p in content],
                        extra={"fit": lf.extra["fit"]} if "fit" in lf.extra else {})  # a fit file's facts: its gate
        fr.sha256 = fr.parts[0]["sha256"] if fr.parts and fr.parts[0]["path"] == lf.path else None
        path = job.wd.path / lf.path
        earlier = list(self.files)
        # a file that will be held has no curve to stop on yet: only its ceiling (verdict.thresholds)
        curve_earlier = [] if verdict.awaits_curve(fr, self._ladder_bits(), earlier) else earlier
        if not path.exists():
            fr.error = f"{lf.path} is missing"
        else:
            scratch = records.tmp_dir_for(job.wd.path)
            scratch.mkdir(parents=True, exist_ok=True)
            try:
                judged = speed.baseline_name(fr.type, fr.extra)  # a tuned or fit file: its baseline's chunks
                base_f = next((f for f in earlier if judged and f.type == judged[0] and f.stats), None)
                rule = sequential.like_baseline(self._scoring.rule(o), base_f.stats.chunks if base_f else None)
                scored = sequential.score(job.tc, path, self._base, scratch, rule,
                                          lambda err: thresholds(fr, curve_earlier, err, o.ceilings),
                                          threads=o.threads)
                fr.stats, fr.stop = scored.stats, scored.reason
                fr.seconds["kld"] = scored.seconds
                fr.extra["kld_batches"] = scored.batches
            except ToolError as e:
                fr.error = verify.tool_error_reason(e)
            except ParseError as e:
                fr.error = str(e)
            finally:
                with contextlib.suppress(OSError):  # the folder, when empty (it may hold the base logits)
                    scratch.rmdir()
        log.info("evaluate: %s %s", lf.type,
                 f"KLD {fr.stats.kld_mean:.5f} ± {fr.stats.kld_mean_err:.5f} on {fr.stats.chunks} chunks ({fr.stop})"
                 if fr.stats else f"failed: {fr.error}")
        t0 = time.monotonic()
        fr.checks.update(checks_mod.file_checks(job, path, self._ref_facts, self._prompt))
        fr.seconds["checks"] = time.monotonic() - t0
        speed_required = speed.attach(job.wd.path, [*earlier, fr])  # llama-bench's figures (the speed stage)
        fr.reasons = judge_file(fr, earlier, o.ceilings, job_checks=self._job_checks(), speed_required=speed_required)
        fr.status = FAILED if fr.reasons else PASSED
        return fr

    def _job_checks(self) -> dict[str, Check]:
        return {k: v for k, v in self.checks.items() if k in JOB_CHECKS}

    def _write_partial(self) -> None:
        """report.json with the settled files and those still to come, held ones included (their figures under
        ``held``, not their verdict: it is not final); no chart, no stage record."""
        assert self._scoring is not None
        seconds = {**self.seconds, "kld": sum(f.seconds.get("kld", 0.0) for f in self.files)}
        final = [f for f in self.files if not self._settling.is_held(f.type)]
        report = reporting.build(self.job, self._scoring, final, self.checks, self.ref_block, seconds,
                                 pending=self.pending())
        report.held = [{"type": f.type, "kld_mean": f.stats.kld_mean if f.stats else None,
                        "kld_mean_err": f.stats.kld_mean_err if f.stats else None, "chunks": f.chunks,
                        "stop": f.stop, "awaiting": "the ladder's curve around it"} for f in self.held()]
        report.notes = ladder_notes(final, against=self._settling.against)
        self.job.wd.write_report(report)

    # ---- finishing
    def finish(self) -> Report:
        """Measure what ladder.json lists and was not measured yet, settle every held file (judged against all the
        others), then the ladder-wide checks and notes, the chart, report.json and the stage record; removes the
        base logits."""
        if self._done is not None:
            for f in self._done.files:
                if f.type not in self._handed:
                    self._handed.add(f.type)
                    self._settling.ready.append(f)
            return self._done
        for lf in self.ladder_files():
            self.measure(lf)
        self._settling.finish(self.files)  # the whole ladder is measured: no curve will get any closer
        wd = self.job.wd
        ladder = wd.ladder()
        job = self.job = dataclasses.replace(self.job, ladder=ladder, content=wd.content(ladder))
        total = self._total()
        job.step("checks", total - 1, total)
        t0 = time.monotonic()
        projector = checks_mod.projector_check(job)
        if projector is not None:
            self.checks[mmproj.CHECK] = projector
        self.seconds["checks"] = time.monotonic() - t0 + self.seconds.pop("reference_checks", 0.0)
        self.seconds["kld"] = sum(f.seconds.get("kld", 0.0) for f in self.files)
        self.close(finished=True)
        assert self._scoring is not None
        report = reporting.build(job, self._scoring, self.files, self.checks, self.ref_block, self.seconds)
        report.notes = ladder_notes(self.files, against=self._settling.against)
        reporting.write(job, report, record_inputs(job, self._common), self._started)
        job.hooks.emit(STAGE, PROGRESS, done=total, total=total, text="done")
        log.info("evaluate: %s: %d/%d files passed on %d chunks in all, publishable=%s (%.0f s)", report.model_name,
                 sum(f.status == PASSED for f in self.files), len(self.files),
                 sum(f.chunks or 0 for f in self.files), report.publishable, report.seconds["total"])
        self._done = report
        return report

    def close(self, finished: bool = False) -> None:
        """Once the evaluation is ``finished``, remove (or keep, ``keep_base_logits``) its own base logits; safe to
        call again. Before that they stay, with their record, for the run that resumes this one (they are
        recomputed when its inputs differ)."""
        own = self._scoring.own_base if self._scoring is not None else None
        if not finished or own is None:
            return
        if own.exists() and self.job.opts.keep_base_logits is not None:
            shutil.move(own, self.job.opts.keep_base_logits)
        remove_base(self.job.wd.path, own)

    def __enter__(self) -> "LadderEvaluation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run(workdir: Path | WorkDir, options: EvalOptions, *, toolchain: tc_mod.Toolchain | None = None,
        hooks: Hooks = NULL_HOOKS) -> Report:
    """Evaluate and check every file of ``workdir/ladder.json`` (in its order; :meth:`LadderEvaluation.finish`
    settles the files held until the end); write report.json and the chart; return the report.

    Progress goes to ``hooks.step("evaluate", done, total, what)``, which may stop the run between steps.
    """
    with LadderEvaluation.open(workdir, options, toolchain=toolchain, hooks=hooks) as ev:
        for lf in ev.job.ladder.files:
            ev.measure(lf)
        return ev.finish()


def _measured_as_on_disk(done: Report, workdir: Path, expected: Sequence[str]) -> bool:
    """Every file still to come (``expected``: tuned and memory-budget files, made after the evaluation opens) is in
    the earlier report, with the content that is on disk now: else that report cannot answer for them."""
    for t in expected:
        try:
            f = done.file(t)
        except KeyError:
            return False
        if not _same_as_on_disk(f, workdir):
            return False
    return True


def _same_as_on_disk(f: FileResult, workdir: Path) -> bool:
    """The file is on disk with the content it was measured with (or still missing, if it was missing then); the
    content hash is cached by the file's stat (:func:`converters.core.records.content_sha256`)."""
    for part in f.parts or [{"path": f.path, "sha256": f.sha256}]:
        p, sha = workdir / str(part.get("path")), part.get("sha256")
        if sha is None:
            if p.exists():
                return False
        elif not p.is_file() or records.content_sha256(p, workdir) != sha:
            return False
    return True
