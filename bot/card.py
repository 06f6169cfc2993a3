"""The model card: a pure function from facts to a context, and a Jinja2 template that renders it.

``build_context`` takes the work directory's ``ladder.json`` and ``report.json`` (as dicts), the facts
about the source model (:class:`SourceFacts`: its card data, gating, chat template, attention shapes) and
the publishing settings (:class:`CardSettings`), and returns a plain dict; ``render`` turns that dict
into ``README.md`` with ``templates/model_card.md.j2``. Neither touches the network or the clock.
``SourceFacts.from_checkpoint`` is the one helper here that reads files (the local checkpoint's
``config.json`` and chat template).

The chat template of the source is untrusted input: it is rendered in Jinja2's
``ImmutableSandboxedEnvironment`` and its failure only costs the card its prompt-format example.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_NAME = "model_card.md.j2"
VARIANT_TEMPLATE_NAME = "variant_section.md.j2"
# A variant's weights differ from the source's (pruned, maybe trained): the Hub's relation for a model derived
# from another by changing its weights is "finetune" (the accepted values: adapter, merge, quantized, finetune).
VARIANT_RELATION = "finetune"
TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "templates"
BASE_TAGS = ("gguf", "llama.cpp", "quantized")
KV_CONTEXTS = (4096, 32768)
SYSTEM_PLACEHOLDER = "{system_prompt}"
PROMPT_PLACEHOLDER = "{prompt}"
GATED_PREFIX = "extra_gated_"
DEFAULT_RUN_TYPE = "Q4_K_M"


@dataclasses.dataclass(frozen=True)
class SourceFacts:
    """What the card needs to know about the source model."""

    repo: str | None = None
    revision: str | None = None
    card_data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    gated: bool | str = False
    pipeline_tag: str | None = None
    license: str | None = None  # fallback when the card data has none (e.g. from a "license:" tag)
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    n_layer: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    n_ctx_train: int | None = None

    @staticmethod
    def shapes_from_config(config: Mapping[str, Any]) -> dict[str, int | None]:
        """Attention shapes from a transformers ``config.json`` (text_config for multimodal models)."""
        c = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
        n_layer = c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers")
        n_head = c.get("num_attention_heads") or c.get("n_head")
        n_kv = c.get("num_key_value_heads") or c.get("multi_query_group_num") or n_head
        head_dim = c.get("head_dim")
        if not head_dim and c.get("hidden_size") and n_head:
            head_dim = int(c["hidden_size"]) // int(n_head)
        ctx = c.get("max_position_embeddings") or c.get("n_positions") or c.get("seq_length")
        return {"n_layer": _int(n_layer), "n_kv_heads": _int(n_kv), "head_dim": _int(head_dim), "n_ctx_train": _int(ctx)}

    @staticmethod
    def facts_from_gguf(path: Path) -> dict[str, Any]:
        """Attention shapes and chat template from a GGUF header ({} when it cannot be read)."""
        try:
            import gguf

            reader = gguf.GGUFReader(str(path))

            def get(key: str) -> Any:
                f = reader.fields.get(key)
                return f.contents() if f is not None else None

            arch = get("general.architecture")
            n_head = _int(get(f"{arch}.attention.head_count"))
            n_kv = _int(get(f"{arch}.attention.head_count_kv")) or n_head
            head_dim = _int(get(f"{arch}.attention.key_length"))
            emb = _int(get(f"{arch}.embedding_length"))
            if not head_dim and emb and n_head:
                head_dim = emb // n_head
            tmpl = get("tokenizer.chat_template")
            out = {"n_layer": _int(get(f"{arch}.block_count")), "n_kv_heads": n_kv, "head_dim": head_dim,
                   "n_ctx_train": _int(get(f"{arch}.context_length")),
                   "chat_template": tmpl if isinstance(tmpl, str) and tmpl.strip() else None}
        except Exception:  # noqa: BLE001 - not a readable GGUF: no facts from it
            return {}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path | None, **kw: Any) -> "SourceFacts":
        """Facts read from a local HF checkpoint (config.json, chat template, special tokens) plus ``kw``."""
        facts: dict[str, Any] = {}
        if checkpoint_dir is not None and Path(checkpoint_dir).is_dir():
            d = Path(checkpoint_dir)
            cfg = _read_json(d / "config.json")
            if cfg:
                facts.update(cls.shapes_from_config(cfg))
            tok = _read_json(d / "tokenizer_config.json") or {}
            tmpl = None
            if (d / "chat_template.jinja").is_file():
                tmpl = (d / "chat_template.jinja").read_text(encoding="utf-8")
            elif (d / "chat_template.json").is_file():
                tmpl = (_read_json(d / "chat_template.json") or {}).get("chat_template")
            if tmpl is None:
                tmpl = tok.get("chat_template")
            if isinstance(tmpl, list):  # named templates: use "default"
                named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, Mapping)}
                tmpl = named.get("default") or next(iter(named.values()), None)
            facts["chat_template"] = tmpl if isinstance(tmpl, str) and tmpl.strip() else None
            facts["bos_token"] = _token_text(tok.get("bos_token"))
            facts["eos_token"] = _token_text(tok.get("eos_token"))
        facts.update({k: v for k, v in kw.items() if v is not None})
        return cls(**facts)


@dataclasses.dataclass(frozen=True)
class CardSettings:
    repo_id: str  # the repo the card is published in
    quantized_by: str
    hub_url: str  # base URL of the Hub for links (the client's endpoint)
    ollama_host: str = "hf.co"
    extra_tags: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- helpers
def _int(x: Any) -> int | None:
    try:
        return int(x) if x is not None else None
    except (TypeError, ValueError):
        return None


def _read_json(p: Path) -> dict | None:
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _token_text(t: Any) -> str | None:
    if isinstance(t, Mapping):
        t = t.get("content")
    return t if isinstance(t, str) else None


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


def render_chat_example(template: str | None, bos: str | None = None, eos: str | None = None) -> str | None:
    """The chat template applied to a sample conversation, in a sandbox; None when it cannot be rendered."""
    if not template:
        return None

    def raise_exception(msg: str) -> None:
        raise jinja2.TemplateError(msg)

    def strftime_now(fmt: str) -> str:
        return "{date}" if "%" in fmt else fmt

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    conversations = [
        [{"role": "system", "content": SYSTEM_PLACEHOLDER}, {"role": "user", "content": PROMPT_PLACEHOLDER}],
        [{"role": "user", "content": PROMPT_PLACEHOLDER}],
    ]
    try:
        tmpl = env.from_string(template)
    except jinja2.TemplateError:
        return None
    for messages in conversations:
        try:
            out = tmpl.render(messages=messages, add_generation_prompt=True, bos_token=bos or "",
                              eos_token=eos or "", tools=None, documents=None)
        except Exception:  # noqa: BLE001 - an untrusted template may fail any way it likes
            continue
        if PROMPT_PLACEHOLDER in out:
            return out.strip("\n")
    return None


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


def _checks(report: Mapping[str, Any]) -> list[dict[str, str]]:
    out = []
    checks = report.get("checks") or {}
    items: Iterable[tuple[str, Any]]
    if isinstance(checks, Mapping):
        items = checks.items()
    elif isinstance(checks, Sequence):
        items = [(str(c.get("name", "?")), c) for c in checks if isinstance(c, Mapping)]
    else:
        items = []
    for name, v in items:
        if isinstance(v, Mapping):
            ok = v.get("passed", v.get("ok"))
            if ok is None and "status" in v:
                ok = str(v["status"]).lower() in ("passed", "ok", "pass")
            detail = v.get("detail") or v.get("summary") or v.get("message") or v.get("reason") or ""
            if not detail and "value" in v:
                detail = f"{v['value']}" + (f" (limit {v['limit']})" if "limit" in v else "")
        else:
            ok, detail = bool(v), ""
        skipped = isinstance(v, Mapping) and str(v.get("status", "")).lower() == "skipped"
        out.append({"name": str(name).replace("_", " "), "result": "skipped" if skipped else "passed" if ok else "FAILED",
                    "detail": str(detail).replace("\n", " ").replace("|", "\\|")})
    return out


def _evaluation(report: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the figures were measured on (report.json's ``evaluation`` block), formatted."""
    ev = report.get("evaluation")
    if not isinstance(ev, Mapping) or not ev.get("text"):
        return None
    ppl = ev.get("reference_ppl")
    return {
        "text": ev.get("text"),
        "tokens": f"{ev['tokens_scored']:,}" if isinstance(ev.get("tokens_scored"), int) else None,
        "chunks": ev.get("chunks"),
        "ctx": ev.get("ctx"),
        "reference_ppl": _pm(ppl, ev.get("reference_ppl_err"), 3) if isinstance(ppl, (int, float)) else None,
    }


def published_files(ladder: Mapping[str, Any], report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Ladder files that passed the gate in report.json, with their figures (unreported = not published)."""
    by_type = {f.get("type"): f for f in report.get("files", []) if isinstance(f, Mapping)}
    out = []
    for f in ladder.get("files", []):
        r = by_type.get(f.get("type"))
        if r is None or r.get("status") != "passed":
            continue
        out.append({**f, "report": r})
    return out


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


def variant_context(info: Mapping[str, Any], *, hub_url: str = "") -> dict[str, Any]:
    """The ``variant`` block of a card's context, from a variant's ``variant.json`` (pure): the recipe, layers,
    parameters and size before and after, how it was healed, and the quality measured against the teacher next
    to the teacher's own quants of the same type."""
    recipe = info["recipe"]
    t, v, p = info["teacher"], info["variant"], info.get("prune") or {}
    d = info.get("distill")
    ev = info.get("evaluation")
    hub = hub_url.rstrip("/")
    teacher_repo = t.get("repo")
    files = []
    if ev:
        tf = ev.get("teacher_files") or {}
        for typ, f in (ev.get("files") or {}).items():
            other = tf.get(typ) or {}
            files.append({"type": typ, "kld": _fmt(f.get("kld_mean")), "same_top_p": _pct(f.get("same_top_p")),
                          "size": human_bytes(f.get("size")), "status": f.get("status"),
                          "teacher_kld": _fmt(other.get("kld_mean")),
                          "teacher_same_top_p": _pct(other.get("same_top_p")),
                          "teacher_size": human_bytes(other.get("size"))})
    calib = p.get("calibration") or {}
    return {
        "recipe": recipe["name"],
        "summary": recipe.get("summary") or recipe.get("description") or "",
        "heals": bool(d),
        "teacher_repo": teacher_repo,
        "teacher_url": f"{hub}/{teacher_repo}" if teacher_repo and hub else None,
        "teacher_name": t.get("model_name") or "the original model",
        "layers_before": t.get("layers"), "layers_after": v.get("layers"),
        "layers_removed": (t["layers"] - v["layers"]) if isinstance(t.get("layers"), int)
        and isinstance(v.get("layers"), int) else None,
        "intermediate_before": t.get("intermediate_size"), "intermediate_after": v.get("intermediate_size"),
        "params_before": f"{t['parameters']:,}" if isinstance(t.get("parameters"), int) else "—",
        "params_after": f"{v['parameters']:,}" if isinstance(v.get("parameters"), int) else "—",
        "params_change": _change(t.get("parameters"), v.get("parameters")),
        "size_before": human_bytes(t.get("bytes")), "size_after": human_bytes(v.get("bytes")),
        "size_change": _change(t.get("bytes"), v.get("bytes")),
        "removed_layers": ", ".join(str(i) for i in p.get("removed_layers") or []),
        "prune_method": p.get("method"),
        "calibration": (info.get("calibration") or {}).get("name") or calib.get("name"),
        "calib_samples": calib.get("samples"), "calib_seq_len": calib.get("seq_len"),
        "distill": {
            "steps": d["steps"], "batch": d["config"]["batch_size"], "seq_len": d["config"]["seq_len"],
            "temperature": f"{d['config']['temperature']:g}", "lr": f"{d['config']['lr']:g}",
            "seed": d["config"].get("seed"), "loss_first": _fmt(d.get("loss_first")),
            "loss_last": _fmt(d.get("loss_last")), "device": d.get("device"), "dtype": d.get("dtype"),
            "seconds": f"{d.get('seconds') or 0:.0f}",
        } if d else None,
        "evaluation": {"text": ev.get("text"), "chunks": ev.get("chunks"), "ctx": ev.get("ctx"),
                       "reference_kld": _fmt(ev.get("reference_kld_mean")),
                       "reference_same_top_p": _pct(ev.get("reference_same_top_p")), "files": files,
                       "has_teacher": bool(ev.get("teacher_files"))} if ev else None,
    }


# ---------------------------------------------------------------------------------------------- context
def build_context(ladder: Mapping[str, Any], report: Mapping[str, Any], source: SourceFacts,
                  settings: CardSettings, *, whats_new: Sequence[str] = (), date: dt.date | None = None,
                  chart: str | None = None, variant: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything the template shows, as plain data (pure). ``variant`` is a variant's ``variant.json``: the card
    then describes a pruned (and healed) model derived from the source, measured against the source."""
    src = ladder.get("source") or {}
    model_name = ladder.get("model_name") or settings.repo_id.split("/")[-1]
    repo = settings.repo_id
    hub = settings.hub_url.rstrip("/")
    card = dict(source.card_data or {})
    base_repo = source.repo or src.get("repo")
    revision = source.revision or src.get("revision")
    imatrix = ladder.get("imatrix") or None

    # metadata (YAML front matter)
    meta: dict[str, Any] = {}
    if base_repo:
        meta["base_model"] = base_repo
        meta["base_model_relation"] = VARIANT_RELATION if variant is not None else "quantized"
    lic = card.get("license") or source.license or src.get("license")
    if lic:
        meta["license"] = lic
    for k in ("license_name", "license_link"):
        if card.get(k):
            meta[k] = card[k]
    if card.get("language"):
        meta["language"] = card["language"]
    pipeline_tag = card.get("pipeline_tag") or source.pipeline_tag
    if pipeline_tag:
        meta["pipeline_tag"] = pipeline_tag
    tags = list(BASE_TAGS[:1]) + (["imatrix"] if imatrix else []) + list(BASE_TAGS[1:]) + list(settings.extra_tags)
    if variant is not None:
        tags += ["pruned"] + (["distillation"] if variant.get("distill") else [])
    meta["tags"] = list(dict.fromkeys(tags))
    meta["quantized_by"] = settings.quantized_by
    for k, v in card.items():  # a gated source's gating fields, as they are
        if k.startswith(GATED_PREFIX):
            meta[k] = v

    # the file table, largest first
    files = []
    for f in published_files(ladder, report):
        r = f["report"]
        parts = list(f.get("parts") or [f["path"]])
        split = len(parts) > 1
        folder = str(Path(parts[0]).parent) if split else None
        size = int(f.get("total_size") or r.get("size") or f.get("size") or 0)
        stp = r.get("same_top_p")
        entry = {
            "type": f["type"],
            "file": folder + "/" if split else f["path"],
            "parts": parts,
            "n_parts": len(parts),
            "split": split,
            "size": size,
            "size_h": human_bytes(size),
            "bpw": _fmt(f.get("bpw") or r.get("bpw"), 2),
            "kld": _pm(r.get("kld_mean"), r.get("kld_mean_err"), 4),
            "same_top_p": _pm(stp, r.get("same_top_p_err"), 2, _percent_scale(stp), " %"),
            "ppl_ratio": _fmt(r.get("ppl_ratio"), 4),
            "description": (f.get("description") or "").replace("|", "\\|"),
            "include": f"{folder}/*" if split else f["path"],
            "memory": [],
        }
        files.append(entry)
    files.sort(key=lambda e: (-e["size"], e["type"]))

    kv = None
    if source.n_layer and source.n_kv_heads and source.head_dim:
        kv = {c: kv_cache_bytes(source.n_layer, c, source.n_kv_heads, source.head_dim) for c in KV_CONTEXTS}
        for e in files:
            e["memory"] = [human_bytes(e["size"] + kv[c]) for c in KV_CONTEXTS]

    types = [e["type"] for e in files]
    run_type = DEFAULT_RUN_TYPE if DEFAULT_RUN_TYPE in types else (types[len(types) // 2] if types else None)

    calib = (imatrix or {}).get("calibration") or {}
    imatrix_files = [p for p in ((imatrix or {}).get("gguf"), (imatrix or {}).get("dat")) if p]
    example = render_chat_example(source.chat_template, source.bos_token, source.eos_token)
    toolchain = ladder.get("toolchain") or {}
    return {
        "metadata": meta,
        "title": f"{model_name} GGUF",
        "model_name": model_name,
        "repo_id": repo,
        "hub_url": hub,
        "base_model": base_repo,
        "base_model_url": f"{hub}/{base_repo}" if base_repo else None,
        "revision": revision,
        "revision_short": revision[:12] if revision else None,
        "revision_url": f"{hub}/{base_repo}/tree/{revision}" if base_repo and revision else None,
        "llama_cpp_version": toolchain.get("version") or "unknown",
        "llama_cpp_commit": toolchain.get("commit"),
        "reference_type": (ladder.get("reference") or {}).get("type") or "BF16",
        "imatrix": bool(imatrix),
        "imatrix_files": imatrix_files,
        "calibration": {
            "name": calib.get("name"),
            "bytes": calib.get("bytes"),
            "size_h": human_bytes(calib.get("bytes")) if calib.get("bytes") else None,
            "link": _calibration_link(calib.get("source"), hub),
            "chunks": calib.get("chunks"),
            "ctx": calib.get("ctx"),
            "sha256": calib.get("sha256"),
        } if calib else None,
        "has_chat_template": bool(source.chat_template),
        "chat_example": example,
        "files": files,
        "kv": {"contexts": [f"{c // 1024}k" for c in KV_CONTEXTS],
               "bytes": [human_bytes(kv[c]) for c in KV_CONTEXTS],
               "shape": f"{source.n_layer} layers × {source.n_kv_heads} KV heads × {source.head_dim} head dim",
               "n_ctx_train": source.n_ctx_train,
               "beyond_training": [c > source.n_ctx_train for c in KV_CONTEXTS] if source.n_ctx_train else
               [False] * len(KV_CONTEXTS)} if kv else None,
        "run_type": run_type,
        "ollama_host": settings.ollama_host,
        "chart": chart,
        "checks": _checks(report),
        "evaluation": _evaluation(report),
        "whats_new": list(whats_new),
        "date": date.isoformat() if date else None,
        "quantized_by": settings.quantized_by,
        "variant": variant_context(variant, hub_url=hub) if variant is not None else None,
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
