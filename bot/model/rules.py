"""The acceptance rules: which Hub models the bot converts, and the reason when it does not.

The one module for every place that accepts or refuses a Hub model:

- the watcher's decision for a listed model and for ``ggufbot enqueue`` (:func:`decide`);
- the runner's re-check of the exact revision it is about to fetch (:func:`fetch_refusal`);
- ``ggufbot convert ORG/NAME`` before anything is downloaded (:func:`convert_refusal`).

The model-level rules that need only file names or a config (pickle-only weights, no safetensors, ``auto_map``
remote code) are the pure functions of :mod:`converters.formats.checkpoint`, which ``checkpoint.inspect`` applies to a
local folder; the rules here apply them to a Hub record (``converters/`` never imports ``bot/``).

:func:`decide` runs the rules registered with :func:`rule`, in the order they are defined; the first that
returns a :class:`Decision` wins. Each rule sees a :class:`Candidate` (the record, the settings, the source,
whether the record carries file sizes, whether the token can read a gated repo) and returns a skip or None.
The rules run in two passes so that a poll costs as few Hub requests as possible: on the listing record (no
request), then on the full record (``model_info`` with file sizes) for a candidate that passed the first pass.
Decision codes and reasons are stored and shown by ``ggufbot status``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Mapping

from bot.model.record import ModelRecord
from bot.model.settings import Settings, Source
from converters.formats.checkpoint import PICKLE_ONLY, Refusal, remote_code_refusal, safe_name, weights_refusal

QUANTIZED_TAGS = frozenset({"gguf", "gptq", "awq", "exl2", "exl3", "mlx", "bitsandbytes", "4-bit", "8-bit",
                            "quantized", "compressed-tensors", "hqq", "aqlm"})
QUANTIZED_LIBRARIES = frozenset({"gguf", "mlx", "onnx", "ctranslate2"})
QUANTIZED_NAME = re.compile(r"(?i)(?:^|[-_.])(gguf|ggml|gptq|awq|exl2|exl3|mlx|bnb|4bit|8bit|int4|int8|nf4|hqq|"
                            r"aqlm|w4a16|w8a8|w8a16)(?:$|[-_.])")
# quantization_config methods that llama.cpp's converter can dequantize (an FP8 release is a source release)
SOURCE_QUANT_METHODS = frozenset({"fp8"})
# codes the runner does not hold against the revision it fetches: the download itself proves access to a gated
# repo, and the pipeline tag only selects what a poll looks at
FETCH_IGNORED = frozenset({"gated", "pipeline_tag"})


@dataclasses.dataclass(frozen=True)
class Decision:
    accept: bool
    code: str
    reason: str

    @property
    def decision(self) -> str:
        return "accepted" if self.accept else "skipped"


ACCEPT = Decision(True, "accepted", "accepted")


def skip(code: str, reason: str) -> Decision:
    return Decision(False, code, reason)


# --------------------------------------------------------------------------------------------------
# Facts read from a model record (bot.model.record.ModelRecord)
# --------------------------------------------------------------------------------------------------


def sibling_names(rec: ModelRecord) -> list[str]:
    return [s.rfilename for s in (getattr(rec, "siblings", None) or ())]


def unsafe_name(name: str) -> bool:
    """True for a repo file name that could escape a directory it is downloaded into."""
    return not safe_name(name)


def record_license(rec: ModelRecord) -> str | None:
    cd = getattr(rec, "card_data", None) or {}
    lic = getattr(rec, "license", None) or (cd.get("license") if isinstance(cd, Mapping) else None)
    if isinstance(lic, list):
        lic = lic[0] if lic else None
    if not lic:
        for t in getattr(rec, "tags", None) or ():
            if isinstance(t, str) and t.startswith("license:"):
                return t.split(":", 1)[1].lower()
    return str(lic).lower() if lic else None


def weight_bytes(rec: ModelRecord) -> int | None:
    """Sum of the safetensors weight files' sizes, or None when the record carries no sizes."""
    total = 0
    for s in getattr(rec, "siblings", None) or ():
        if s.rfilename.endswith(".safetensors"):
            if s.size is None:
                return None
            total += int(s.size)
    return total


def params_of(rec: ModelRecord) -> int | None:
    p = getattr(rec, "safetensors_total", None)
    return int(p) if p else None


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def quantized_reason(rec: ModelRecord, names: Iterable[str]) -> str | None:
    """Why ``rec`` is already a quantized or converted release (GGUF files, library, tags, config, name)."""
    names = list(names)
    gg = next((n for n in names if n.lower().endswith(".gguf")), None)
    if gg:
        return f"already GGUF ({gg})"
    lib = (getattr(rec, "library_name", None) or "").lower()
    if lib in QUANTIZED_LIBRARIES:
        return f"already converted (library {lib})"
    tags = {str(t).lower() for t in (getattr(rec, "tags", None) or ())}
    hit = sorted(tags & QUANTIZED_TAGS)
    if hit:
        return f"already quantized (tag {hit[0]})"
    if any(t.startswith("base_model:quantized:") for t in tags):
        return "already quantized (a quantized derivative of another model)"
    cfg = getattr(rec, "config", None) or {}
    qc = cfg.get("quantization_config") if isinstance(cfg, Mapping) else None
    if isinstance(qc, Mapping):
        method = str(qc.get("quant_method") or "").lower()
        if method not in SOURCE_QUANT_METHODS:
            return f"already quantized (quantization_config {method or '?'})"
    m = QUANTIZED_NAME.search(rec.id.split("/")[-1])
    if m:
        return f"already quantized (name says {m.group(1)})"
    return None


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
    """What a rule sees. ``full``: the record carries file sizes (from ``model_info``), so the exact size rule
    applies. ``has_access``: whether the token can read a gated repo (None: not checked yet)."""

    rec: ModelRecord
    settings: Settings
    source: Source | None = None
    full: bool = False
    has_access: bool | None = None

    @functools.cached_property
    def names(self) -> list[str]:
        return sibling_names(self.rec)


Rule = Callable[[Candidate], "Decision | None"]
_RULES: list[tuple[str, Rule]] = []


def rule(name: str) -> Callable[[Rule], Rule]:
    """Register a rule under ``name``; rules run in the order they are registered."""
    def register(fn: Rule) -> Rule:
        if any(n == name for n, _ in _RULES):
            raise ValueError(f"rule {name!r} is registered twice")
        _RULES.append((name, fn))
        return fn
    return register


def rule_names() -> tuple[str, ...]:
    return tuple(n for n, _ in _RULES)


def decide(rec: ModelRecord, settings: Settings, source: Source | None = None, *, full: bool = False,
           has_access: bool | None = None) -> Decision:
    """Accept or skip ``rec`` (see :class:`Candidate` for ``full`` and ``has_access``)."""
    cand = Candidate(rec, settings, source, full, has_access)
    for _, fn in _RULES:
        d = fn(cand)
        if d is not None:
            return d
    return ACCEPT


# --------------------------------------------------------------------------------------------------
# The rules, in order
# --------------------------------------------------------------------------------------------------


@rule("disabled")
def _disabled(c: Candidate) -> Decision | None:
    return skip("disabled", "the repo is disabled on the Hub") if getattr(c.rec, "disabled", False) else None


@rule("private")
def _private(c: Candidate) -> Decision | None:
    return skip("private", "the repo is private") if getattr(c.rec, "private", False) else None


@rule("excluded")
def _excluded(c: Candidate) -> Decision | None:
    pat = c.settings.excluded(c.rec.id)
    return skip("excluded", f"name matches the exclude pattern {pat!r}") if pat else None


@rule("unsafe_filename")
def _unsafe_filename(c: Candidate) -> Decision | None:
    bad = next((n for n in c.names if unsafe_name(n)), None)
    return None if bad is None else skip("unsafe_filename", f"file name {bad!r} would escape the download folder")


@rule("quantized")
def _quantized(c: Candidate) -> Decision | None:
    q = quantized_reason(c.rec, c.names) if c.settings.filters.skip_quantized else None
    return skip("quantized", q) if q else None


@rule("remote_code")
def _remote_code(c: Candidate) -> Decision | None:
    remote = remote_code_refusal(getattr(c.rec, "config", None) or {})
    if remote is not None:
        keys = ", ".join(remote.names) or "auto_map"
        return skip(remote.code, f"needs remote code (config auto_map: {keys}); never executed")
    if "custom_code" in (getattr(c.rec, "tags", None) or ()):
        return skip("remote_code", "tagged custom_code (needs trust_remote_code); never executed")
    return None


@rule("weights")
def _weights(c: Candidate) -> Decision | None:
    names = c.names
    refused = weights_refusal(names) if names else None  # a listing may carry no file names
    if refused is None:
        return None
    if refused.code == PICKLE_ONLY:
        return skip(refused.code, f"pickle-only weights ({refused.names[0]}); safetensors required, never unpickled")
    return skip(refused.code, "no safetensors weights in the repo")


@rule("license")
def _license(c: Candidate) -> Decision | None:
    f = c.settings.filters
    lic = record_license(c.rec)
    deny = {x.lower() for x in f.licenses_deny}
    allow = {x.lower() for x in f.licenses_allow}
    if lic and lic in deny:
        return skip("license", f"licence {lic} is on the deny list")
    if allow and (lic or "none") not in allow:
        return skip("license", f"licence {lic or 'none'} is not on the allow list")
    return None


@rule("pipeline_tag")
def _pipeline_tag(c: Candidate) -> Decision | None:
    want = c.source.pipeline_tag if c.source else None
    tag = getattr(c.rec, "pipeline_tag", None)
    return skip("pipeline_tag", f"pipeline tag {tag}, watching {want}") if want and tag and tag != want else None


@rule("params")
def _params(c: Candidate) -> Decision | None:
    f = c.settings.filters
    params = params_of(c.rec)
    if params is not None and f.min_params is not None and params < f.min_params:
        return skip("params", f"{params:,} parameters, below the minimum {f.min_params:,}")
    if params is not None and f.max_params is not None and params > f.max_params:
        return skip("params", f"{params:,} parameters, above the maximum {f.max_params:,}")
    return None


@rule("too_large")
def _too_large(c: Candidate) -> Decision | None:
    limit = c.settings.max_model_bytes
    params = params_of(c.rec)
    size = weight_bytes(c.rec) if c.full else None
    if size is not None and limit and size > limit:
        return skip("too_large", f"weights are {_gb(size)}, over the size limit of {_gb(limit)}")
    if size is None and params and limit and params * 2 > limit:  # at least 2 bytes per weight in a source release
        return skip("too_large",
                    f"{params:,} parameters (about {_gb(params * 2)}), over the size limit of {_gb(limit)}")
    return None


@rule("gated")
def _gated(c: Candidate) -> Decision | None:
    gated = getattr(c.rec, "gated", False)
    if gated and c.settings.filters.skip_gated:
        return skip("gated", f"gated ({gated}); gated models are skipped by the settings")
    if gated and c.has_access is False:
        return skip("gated", f"gated ({gated}) and the token has no access")
    return None


# --------------------------------------------------------------------------------------------------
# The other places that accept or refuse a Hub model
# --------------------------------------------------------------------------------------------------


def fetch_refusal(rec: ModelRecord, settings: Settings) -> Decision | None:
    """The runner, on the full record of the exact revision it fetches: the safety rules again (a job may have
    been queued under other settings, or the revision may differ from the listing); None to go ahead."""
    d = decide(rec, settings, None, full=True)
    return None if d.accept or d.code in FETCH_IGNORED else d


def convert_refusal(rec: ModelRecord) -> str | None:
    """``ggufbot convert ORG/NAME``: the reason to refuse the repo before anything is downloaded (what
    ``checkpoint.inspect`` would refuse from its files and config), or None."""
    weights = weights_refusal(sibling_names(rec))
    if weights is not None:
        return Refusal(weights.code).reason()  # the Hub check names no files
    remote = remote_code_refusal(getattr(rec, "config", None) or {})
    if remote is not None:  # never allowed: there is no switch
        return remote.reason()
    return None
