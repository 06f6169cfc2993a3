"""What an evaluation runs on: its options, its validated inputs, the record keys and the scored chunks.

:func:`prepare` reads ``ladder.json`` and refuses bad inputs before any long run; :func:`record_inputs` is the key
of the whole stage's record, :func:`file_inputs` that of one measured file (its own content and the evaluation's
inputs, never the other files'), so a killed job resumes without measuring a file again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import shutil
from pathlib import Path
from typing import Any

from converters.core import quants
from converters.core import names, records
from converters.core.errors import DiskSpaceError, InputError
from converters.core.hooks import Hooks
from converters.core.workdir import CalibrationInfo, Ladder, LadderFile, WorkDir
from converters.formats import checkpoint as checkpoint_mod
from converters.ladder import speed
from converters.ladder.evaluate import overlap
from converters.ladder.evaluate.perplexity import BaseLogits, base_logits_bytes, scored_per_chunk
from converters.ladder.evaluate.sequential import MIN_CHUNKS, PRECISION, StopRule
from converters.llama import toolchain as tc_mod
from converters.llama import verify

log = logging.getLogger(__package__)  # the package's name (log lines name it)

STAGE = "evaluate"
BASE_STAGE = "evaluate.base-logits"  # the stored base logits' record: a killed evaluation resumes with them
DEFAULT_CHUNKS = 64  # chunks of ``ctx`` tokens when not given: about 16k scored tokens at ctx 512 (the cap)
DISK_MARGIN = 256 << 20
N_PREDICT = 96  # bound on the smoke-test generation (and on the length of the reference's chat reply)


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """What to evaluate with. ``chunks``: the most chunks a file is scored on (the base logits hold that many);
    ``precision`` / ``min_chunks``: the sequential evaluation (:mod:`.sequential`; ``precision = 0``: every file
    on ``chunks`` chunks). ``reference_logits``: a base-logits file to measure against instead of the work
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
    precision: float = PRECISION
    min_chunks: int = MIN_CHUNKS


@dataclasses.dataclass(frozen=True)
class EvalJob:
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

    @property
    def model_name(self) -> str:
        return self.ladder.model_name or self.wd.name

    def step(self, text: str, done: int, total: int) -> None:
        self.hooks.step(STAGE, done, total, text)


@dataclasses.dataclass(frozen=True)
class Scoring:
    """The tokens every file is scored on: the base-logits file and its shape."""

    ctx: int
    n_chunks: int  # the cap: chunks the base logits hold
    text_tokens: int
    base_path: Path
    own_base: Path | None  # written by this run (removed at the end), None when given

    def rule(self, opts: EvalOptions) -> StopRule:
        return StopRule(max_chunks=self.n_chunks, precision=opts.precision, min_chunks=opts.min_chunks)


def tool_versions(tc: tc_mod.Toolchain) -> dict[str, str | None]:
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


def prepare(wd: WorkDir, opts: EvalOptions, toolchain: tc_mod.Toolchain | None, hooks: Hooks) -> EvalJob:
    """Read the ladder and refuse bad inputs before any long run."""
    eval_text = Path(opts.eval_text)
    ladder = wd.ladder()
    if not eval_text.is_file():
        raise InputError(f"evaluation text not found: {eval_text}")
    eval_sha = records.sha256_file(eval_text)
    cal_sha = None
    if opts.calibration_text is not None:
        if Path(opts.calibration_text).resolve() == eval_text.resolve():
            raise InputError("the evaluation text is the calibration text: a quant must not be judged on the text "
                             "it was calibrated on")
        cal_sha = records.sha256_file(Path(opts.calibration_text))
        if eval_sha != cal_sha:  # equal content is refused below with its own message
            shared = overlap.check(eval_text, Path(opts.calibration_text))  # InputError above overlap.MAX_FRACTION
            log.info("evaluate: evaluation and calibration texts share %.3f%% of their %d-word runs (%.2f s)",
                     100 * shared.fraction, shared.n, shared.seconds)
    cal = ladder.imatrix.calibration if ladder.imatrix is not None else None
    if eval_sha in {cal_sha, cal.sha256 if cal is not None else None}:
        raise InputError(f"the evaluation text {eval_text.name} has the same content as the calibration text: a quant "
                         "must not be judged on the text it was calibrated on")
    if opts.chunks is not None and opts.chunks < 1:
        raise InputError(f"chunks must be at least 1, not {opts.chunks}")
    if opts.precision < 0 or opts.min_chunks < 1:
        raise InputError(f"precision must be at least 0 and min_chunks at least 1, not {opts.precision} and "
                         f"{opts.min_chunks}")
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
    return EvalJob(wd=wd, ladder=ladder, opts=opts, eval_text=eval_text, eval_sha=eval_sha, cal_sha=cal_sha,
                   src_path=src_path, reference=reference, tc=tc, hooks=hooks, content=wd.content(ladder))


def common_inputs(job: EvalJob) -> dict[str, Any]:
    """What every record of the evaluation is keyed on besides the files: the source's files and the options."""
    o = job.opts
    source = checkpoint_mod.files_fingerprint(job.src_path, job.wd.path) if job.src_path else None
    return {"source": source, "eval_text": job.eval_sha, "chunks": o.chunks, "ctx": o.ctx,
            "precision": o.precision, "min_chunks": o.min_chunks,
            "reference_logits": _fingerprint(o.reference_logits, job.wd.path), "ceilings": o.ceilings or {},
            "hf_compare_max_memory": o.hf_compare_max_memory, "hf_compare_chunks": o.hf_compare_chunks,
            "require_source_check": o.require_source_check,
            "source_dir": str(job.src_path) if job.src_path else None, "toolchain": job.tc.version}


def record_inputs(job: EvalJob, common: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole stage's record key: every file's full content (a quant changed in place, same size, is measured
    again), the source's files and the options (``common``: :func:`common_inputs`, when already computed)."""
    return {"ladder": _ladder_identity(job.ladder), "files": job.content, **(common or common_inputs(job)),
            "speed": _fingerprint(job.wd.path / names.SPEED, job.wd.path)}  # the gate reads it


def file_record(qtype: str) -> str:
    """The stage name of one measured file's record (``records/evaluate.<TYPE>.json``)."""
    return f"{STAGE}.{qtype}"


def file_inputs(job: EvalJob, lf: LadderFile, content: dict[str, dict[str, Any]],
                earlier: list[dict[str, Any]], common: dict[str, Any]) -> dict[str, Any]:
    """One measured file's record key: its parts' content, the reference's, the options, and what it was judged
    against (the files measured before it: type and content)."""
    ref = job.ladder.reference.path
    return {"type": lf.type, "bpw_nominal": lf.bpw_nominal, "parts": content, "reference": job.content.get(ref),
            "calibration": job.calibration.sha256 if job.calibration else None, "earlier": earlier,
            "speed": speed.entry(job.wd.path, lf.type), **common}


def scoring(job: EvalJob, n_vocab: int, text_tokens: int, ref_block: dict[str, Any]) -> Scoring:
    """Given base logits (their shape decides), or the chunks this run stores the reference's logits for."""
    o = job.opts
    if o.reference_logits is not None:
        base = BaseLogits.open(Path(o.reference_logits))
        if base.n_vocab != n_vocab:
            raise InputError(f"reference logits have {base.n_vocab} vocabulary entries, the model {n_vocab}")
        ref_block["logits"] = {"name": Path(o.reference_logits).name, "chunks": base.n_chunk, "ctx": base.n_ctx,
                               "given": True}
        return Scoring(base.n_ctx, base.n_chunk, text_tokens, Path(o.reference_logits), None)
    ctx = o.ctx
    available = text_tokens // ctx
    if available < 2:
        raise InputError(f"the evaluation text {job.eval_text.name} has {text_tokens} tokens: at least {2 * ctx} are "
                         f"needed for a context of {ctx}")
    n_chunks = min(o.chunks or DEFAULT_CHUNKS, available)
    if n_chunks * scored_per_chunk(ctx) < 100:
        n_chunks = min(available, -(-100 // scored_per_chunk(ctx)))  # llama.cpp reports nothing below 100 tokens
    need = base_logits_bytes(n_vocab, ctx, n_chunks)
    if o.precision > 0 and o.min_chunks < n_chunks:  # the largest view of a batch (sequential.next_batch): the
        need += base_logits_bytes(n_vocab, ctx, max(o.min_chunks, n_chunks // 2))  # floor, then at most half
    own = job.wd.path / names.BASE_LOGITS
    if own.is_file():  # a killed evaluation's: reused, or removed before they are written again
        need -= own.stat().st_size
    free = shutil.disk_usage(job.wd.path).free
    if free < need + DISK_MARGIN:
        raise DiskSpaceError(str(job.wd.path), need + DISK_MARGIN, free)
    return Scoring(ctx, n_chunks, text_tokens, own, own)


def base_inputs(job: EvalJob, sc: Scoring) -> dict[str, Any]:
    """What the stored base logits depend on (their record's key, :data:`BASE_STAGE`): the reference's content,
    the evaluation text, the chunks and their context, and the llama.cpp that wrote them."""
    return {"reference": job.content.get(job.ladder.reference.path), "eval_text": job.eval_sha, "ctx": sc.ctx,
            "chunks": sc.n_chunks, "toolchain": job.tc.version, "llama.cpp_commit": job.tc.commit}


def remove_base(workdir: Path, path: Path) -> None:
    """Delete stored base logits and their record (the record first: it never names a file that is gone)."""
    with contextlib.suppress(FileNotFoundError):
        records.record_path(workdir, BASE_STAGE).unlink()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def remove_scratch(path: Path) -> None:
    """Delete a base-logits file (they are large) and its scratch folder when that is left empty."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()
