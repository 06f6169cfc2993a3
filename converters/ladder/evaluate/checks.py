"""The evaluation's checks: the reference's (against the source, once per job) and each quant's own.

- :func:`compare` -- the reference against the source checkpoint in transformers, on the stored logits;
- :func:`reference_checks` -- tokenizer, chat template and special tokens against the source, and the
  reference's generation (what every quant's generation is judged with: the prompt);
- :func:`file_checks` -- one quant's metadata against the reference's, and a short generation;
- :func:`projector_check` -- a vision-language model's projectors with the ladder's largest text model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from converters.core import records
from converters.core.errors import InputError, ParseError, ToolError
from converters.core.report import Check
from converters.ladder.evaluate.inputs import N_PREDICT, EvalJob, Scoring, remove_scratch
from converters.ladder.evaluate.perplexity import BaseLogits, run_base
from converters.ladder.evaluate.source import CompareSpec, compare_with_source, source_checks
from converters.llama import mmproj
from converters.llama import verify


def compare(job: EvalJob, facts: verify.GgufFacts, scoring: Scoring) -> Check:
    """The reference against the source in transformers, on the stored logits (or a short run of its own)."""
    o = job.opts
    if job.src_path is None or not job.src_path.is_dir():
        return Check.fail("the source checkpoint is not available, so the conversion cannot be compared with it")
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
            remove_scratch(tmp)


def _source_checks(job: EvalJob, ref_facts: verify.GgufFacts) -> tuple[dict[str, Check], Any]:
    """Tokenizer, chat template and special tokens against the source (and its tokenizer, when it loads)."""
    src = job.src_path
    if src is None or not src.is_dir():
        missing = Check.fail("the source checkpoint is not available")
        return {"tokenizer": missing, "chat_template": missing, "special_tokens": missing}, None
    return source_checks(job.tc, job.reference, ref_facts, src)


def reference_checks(job: EvalJob, ref_facts: verify.GgufFacts) -> tuple[dict[str, Check], str]:
    """The checks that do not depend on a quant, and the prompt every quant's generation is run with."""
    checks, tok = _source_checks(job, ref_facts)
    prompt, is_chat = verify.prompt_for(ref_facts, tok)
    try:
        gen = verify.generate(job.tc, job.reference, prompt, n_predict=N_PREDICT, threads=job.opts.threads)
        checks["end_of_reply"] = verify.end_of_reply_check(gen, is_chat, N_PREDICT)
        checks["generation"] = verify.generation_check(gen)
    except ToolError as e:
        checks["generation"] = Check.fail(f"the reference does not generate: {verify.tool_error_reason(e)}")
    return checks, prompt


def file_checks(job: EvalJob, path: Path, ref_facts: verify.GgufFacts, prompt: str) -> dict[str, Check]:
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


def projector_check(job: EvalJob) -> Check | None:
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
