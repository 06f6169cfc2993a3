"""The BF16 reference against the source checkpoint in transformers, and the checks against the source folder.

The converter itself can be wrong (rope, norms, tokenizer) in a way GGUF-against-GGUF cannot see, so the
reference's stored log-probabilities are compared with the source checkpoint run in ``transformers`` on the
same token ids (top-1 agreement and mean KL divergence), for every model size: one that does not fit in memory
is run with part of its weights on disk (accelerate's offload). The source model is untrusted input: it is
loaded and run in a child with memory, CPU-time and time limits, offline (:mod:`converters.formats.hfchild`),
as is the source tokenizer the checks use.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from converters.core import proc
from converters.core import records
from converters.core.errors import GgufbotError, InputError, UnsupportedModel
from converters.core.report import Check
from converters.formats import hfchild
from converters.formats import hfmodel
from converters.ladder.evaluate.perplexity import BaseLogits
from converters.llama import verify

# BF16-vs-source comparison: pass when top-1 agreement is at least this and mean KLD at most this.
COMPARE_MIN_TOP1 = 0.95
COMPARE_MAX_KLD = 0.02
COMPARE_F32_MAX_PARAMS = 1_500_000_000  # larger models run in bfloat16 on the transformers side


@dataclasses.dataclass(frozen=True)
class CompareSpec:
    """How the reference is compared with the source: on how many chunks, with which BOS, up to which size."""

    chunks: int
    add_bos: bool
    bos_id: int | None
    parameters: int | None
    max_memory: int | None = None  # bytes the source model may use in RAM (None: what is available now)
    offload_dir: Path | None = None  # where weights beyond ``max_memory`` go (None: a folder beside the source)
    threads: int | None = None
    min_top1: float = COMPARE_MIN_TOP1
    max_kld: float = COMPARE_MAX_KLD

    def offload(self, dtype: Any, source_dir: Path) -> hfmodel.Offload | None:
        """How to load the source: in memory when it fits, else with its weights partly on disk."""
        budget = self.max_memory if self.max_memory is not None else hfmodel.available_memory() * 3 // 4
        if not hfmodel.needs_offload(self.parameters, dtype, budget):
            return None
        return hfmodel.Offload(budget, self.offload_dir or records.tmp_path_for(source_dir.parent / "offload"))


def not_checked(why: str, **data: Any) -> Check:
    """A comparison that could not run: ``skipped``, and the ladder is not publishable unless a setting allows it."""
    return Check.skip(f"not checked: {why}"[:400], **data)


def _source_log_probs(model: Any, base: BaseLogits, spec: CompareSpec) -> tuple[Any, int, int, int]:
    """Per-token KLD(GGUF || transformers) over the compared chunks, top-1 agreements, tokens, chunks."""
    import numpy as np
    import torch

    n = min(spec.chunks, base.n_chunk)
    first = base.n_ctx // 2
    klds: list[Any] = []
    agree = total = 0
    for c in range(n):
        ids = base.tokens(c).astype(np.int64)
        if spec.add_bos and spec.bos_id is not None:
            ids[0] = spec.bos_id
        with torch.no_grad():
            logits = model(torch.from_numpy(ids)[None, :]).logits[0, first:base.n_ctx - 1].float()
        hf = torch.log_softmax(logits, dim=-1).double().numpy()
        gg = base.log_probs(c)
        if hf.shape[1] < base.n_vocab:  # a padded GGUF vocabulary: extra entries have no HF logit
            gg = gg[:, :hf.shape[1]]
        hf = hf[:, :gg.shape[1]]
        p = np.where(gg > -16.0, np.exp(gg), 0.0)  # llama.cpp's cut-off for stored log-probabilities
        klds.append((p * (gg - hf)).sum(axis=1))
        agree += int((gg.argmax(axis=1) == hf.argmax(axis=1)).sum())
        total += gg.shape[0]
    return np.concatenate(klds), agree, total, n


# The child that runs the source model (converters.formats.hfchild): its memory is the budget the model may take in RAM
# (beyond it, weights go to disk) plus room for torch, the activations and the log-probabilities of a chunk
COMPARE_HEADROOM = 2 << 30
COMPARE_MIN_SECONDS = 1800.0
COMPARE_SECONDS_PER_GB = 600.0  # of 16-bit weights


def compare_limits(spec: CompareSpec, base: BaseLogits, budget: int) -> tuple[Any, float]:
    """The source model's child: (limits, wall-clock seconds). Memory: ``budget`` plus the headroom and six
    float64 copies of one chunk's logits (``RLIMIT_DATA``, which torch's address-space reservations do not
    reach; see :mod:`converters.formats.hfchild`); time: scaled from the model's size; CPU time: that on every thread."""
    chunk = base.n_ctx * base.n_vocab * 8 * 6
    seconds = max(COMPARE_MIN_SECONDS, COMPARE_SECONDS_PER_GB * 2 * (spec.parameters or 0) / 1e9)
    threads = spec.threads or proc.cpus()
    return hfchild.ChildLimits(cpu_seconds=int(seconds * threads), data_bytes=budget + COMPARE_HEADROOM + chunk), \
        seconds


def compare_with_source(source_dir: Path, base: BaseLogits, spec: CompareSpec) -> Check:
    """Top-1 agreement and mean KLD(GGUF || transformers) on the same tokens as the stored reference run. The
    source model is loaded and run in a child (:mod:`converters.formats.hfchild`) with memory, CPU-time and time limits,
    offline; a child that hits a limit leaves the comparison not checked, with the reason."""
    budget = spec.max_memory if spec.max_memory is not None else hfmodel.available_memory() * 3 // 4
    offload_dir = spec.offload_dir or records.tmp_path_for(Path(source_dir).parent / "offload")
    request = {"op": "compare", "source_dir": str(source_dir),
               "base": {"path": str(base.path), "n_ctx": base.n_ctx, "n_vocab": base.n_vocab,
                        "n_chunk": base.n_chunk},
               "spec": {**dataclasses.asdict(spec), "max_memory": budget, "offload_dir": str(offload_dir)}}
    limits, seconds = compare_limits(spec, base, budget)
    try:
        out = hfchild.call(request, entry=compare_here, limits=limits, timeout=seconds)
    except hfchild.ChildFailed as e:
        shutil.rmtree(offload_dir, ignore_errors=True)  # the child's own clean-up did not run
        return not_checked(f"the source model could not be run within its limits: {e.message}")
    if out.get("error") == "load":
        return not_checked(f"transformers cannot load the source model ({out['type']}: {out['message']})")
    if "error" in out:
        return not_checked(f"the source model could not be run ({out.get('type', out['error'])}: {out['message']})")
    agree, total, n = int(out["agree"]), int(out["total"]), int(out["chunks"])
    offload = bool(out["offloaded"])
    kld_mean, kld_err, kld_max = out["kld_mean"], out["kld_mean_err"], out["kld_max"]
    dtype = out["dtype"]
    top1 = agree / total
    top1_err = math.sqrt(top1 * (1 - top1) / max(1, total - 1))
    data = {"top1_agreement": top1, "top1_agreement_err": top1_err, "kld_mean": kld_mean,
            "kld_mean_err": kld_err, "kld_max": kld_max, "tokens": total, "chunks": n, "dtype": dtype,
            "offloaded": offload, "min_top1": spec.min_top1, "max_kld": spec.max_kld}
    summary = (f"top-1 agreement {100 * top1:.2f} ± {100 * top1_err:.2f} %, mean KLD {data['kld_mean']:.5f} "
               f"on {total} tokens ({n} chunks, transformers {data['dtype']}"
               f"{', weights partly on disk' if offload else ''})")
    if not all(math.isfinite(x) for x in (top1, data["kld_mean"])):
        return Check.fail(f"BF16 GGUF and source disagree: figures not finite ({summary})", **data)
    if top1 < spec.min_top1 or data["kld_mean"] > spec.max_kld:
        return Check.fail(f"BF16 GGUF and source disagree (a converter bug: rope, norms, tokenizer?): {summary}; "
                          f"limits: top-1 >= {100 * spec.min_top1:.0f} %, KLD <= {spec.max_kld}", **data)
    return Check.ok(summary, **data)


def compare_here(request: Mapping[str, Any]) -> dict[str, Any]:
    """The child's work (``converters.formats.hfchild``): load the source model within the memory budget (the rest of its
    weights on disk), run it on the stored reference's tokens, return the figures (or ``error``: ``load`` when
    transformers cannot load it, ``run`` when it could not be run)."""
    source_dir = Path(request["source_dir"])
    b = request["base"]
    base = BaseLogits(Path(b["path"]), int(b["n_ctx"]), int(b["n_vocab"]), int(b["n_chunk"]))
    sp = dict(request["spec"])
    spec = CompareSpec(**{**sp, "offload_dir": Path(sp["offload_dir"]) if sp.get("offload_dir") else None})
    dtype = hfmodel.pick_dtype(hfmodel.CPU, parameters=spec.parameters, f32_max_params=COMPARE_F32_MAX_PARAMS)
    hfmodel.set_threads(spec.threads)
    offload = spec.offload(dtype, source_dir)
    try:
        model = hfmodel.load_causal_lm(source_dir, dtype=dtype, offload=offload)
        model.eval()
        kld, agree, total, n = _source_log_probs(model, base, spec)
    except UnsupportedModel as e:  # an architecture transformers cannot run: not checked, not a crash
        cause = e.__cause__ or e
        return {"error": "load", "type": type(cause).__name__, "message": str(cause)}
    except (RuntimeError, MemoryError, ValueError, OSError) as e:  # e.g. out of memory or disk during the run
        return {"error": "run", "type": type(e).__name__, "message": str(e)}
    finally:
        model = None
        if offload is not None:
            shutil.rmtree(offload.folder, ignore_errors=True)
    return {"agree": agree, "total": total, "chunks": n, "kld_mean": float(kld.mean()),
            "kld_mean_err": float(kld.std(ddof=1) / math.sqrt(len(kld))) if len(kld) > 1 else None,
            "kld_max": float(kld.max()), "dtype": hfmodel.dtype_name(dtype), "offloaded": offload is not None}



def source_checks(tc: Any, reference: Path, facts: verify.GgufFacts, src: Path) -> tuple[dict[str, Check], Any]:
    """The tokenizer (parity of ``reference`` with the source's), chat template and special-token checks against
    the source folder ``src``; also returns the source tokenizer (None when it does not load)."""
    try:  # one child answers every check below: the tokenizer is kept with the sample texts encoded
        tok = hfmodel.load_tokenizer(src, texts=[text for _, text in verify.TOKENIZER_SAMPLES])
    except InputError as e:
        return {"tokenizer": Check.fail(str(e))}, None
    out: dict[str, Check] = {}
    for name, fn in (("tokenizer", lambda: verify.tokenizer_parity(tc, reference, src)),
                     ("chat_template", lambda: verify.chat_template_check(facts, src)),
                     ("special_tokens", lambda: verify.special_tokens_check(facts, src, tok))):
        try:
            out[name] = fn()
        except GgufbotError as e:
            out[name] = Check.fail(f"the check could not run: {e.short()}")
    return out, tok

