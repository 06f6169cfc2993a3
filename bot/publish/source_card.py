"""What the card takes from the source model, all of it untrusted: :class:`SourceFacts` (its card data, gating,
chat template, attention shapes; :meth:`SourceFacts.from_checkpoint` is the one helper of the card that reads
files), the chat template's example rendered in the sandbox (:func:`render_chat_example`), and the source's card data
made safe for our card's YAML front matter (:func:`source_text`, :func:`license_link`, :func:`gating_fields`).

The chat template of the source is rendered in :mod:`converters.formats.chat`'s sandbox and its failure only costs
the card its prompt-format example. :mod:`bot.publish.card` builds the card from these.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bot.publish import markdown
from converters.core.errors import TemplateError
from converters.formats import chat, gguf_meta

SYSTEM_PLACEHOLDER = "{system_prompt}"
PROMPT_PLACEHOLDER = "{prompt}"
# The Hub's gating keys a source's card may pass on (with plain-text values); any other extra_gated_* is dropped
GATED_TEXT_KEYS = ("extra_gated_prompt", "extra_gated_heading", "extra_gated_description",
                   "extra_gated_button_content")
GATED_FIELD_TYPES = ("text", "checkbox", "date_picker", "country")
# A license_link relative to the source repo: plain path segments, each starting with a letter or digit (so no
# "..", no leading "/", no scheme, query or fragment)
_SAFE_RELATIVE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*")

log = logging.getLogger(__name__)


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
            meta = gguf_meta.read(path)
        except Exception:  # noqa: BLE001 - not a readable GGUF: no facts from it
            return {}
        tmpl = meta.get(gguf_meta.CHAT_TEMPLATE)
        out = {**meta.attention_shapes(), "chat_template": tmpl if isinstance(tmpl, str) and tmpl.strip() else None}
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
            facts["chat_template"] = chat.find_template(d, tok)
            facts["bos_token"] = _token_text(tok.get("bos_token"))
            facts["eos_token"] = _token_text(tok.get("eos_token"))
        facts.update({k: v for k, v in kw.items() if v is not None})
        return cls(**facts)


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


# ---------------------------------------------------------------------------------------------- chat example
DATE_PLACEHOLDER = "{date}"  # the template's clock in a card, so the card does not depend on the day it was made


def render_chat_example(template: str | None, bos: str | None = None, eos: str | None = None) -> str | None:
    """The chat template applied to a sample conversation, in a sandbox; None when it cannot be rendered."""
    if not template:
        return None
    conversations = [
        [{"role": "system", "content": SYSTEM_PLACEHOLDER}, {"role": "user", "content": PROMPT_PLACEHOLDER}],
        [{"role": "user", "content": PROMPT_PLACEHOLDER}],
    ]
    for messages in conversations:
        try:
            out = chat.render(template, messages, bos=bos or "", eos=eos or "", fixed_date=DATE_PLACEHOLDER,
                              lenient=True)
        except TemplateError as e:  # an untrusted template may fail any way it likes
            if e.kind in chat.LIMIT_KINDS:
                return None  # it ran out of time, memory or output: another conversation will not do better
            continue
        if PROMPT_PLACEHOLDER in out:
            return out.strip("\n")
    return None


# ---------------------------------------------------------------------------------------------- source card data
def _gating_field(value: Any) -> Any:
    """One ``extra_gated_fields`` value as plain data: a known field type, or a select of plain-text options."""
    if isinstance(value, str) and value in GATED_FIELD_TYPES:
        return value
    if isinstance(value, Mapping) and value.get("type") == "select" and isinstance(value.get("options"), list):
        options = [markdown.cell(o) for o in value["options"] if isinstance(o, (str, int, float))]
        return {"type": "select", "options": options} if options else None
    return None


def gating_fields(card: Mapping[str, Any]) -> dict[str, Any]:
    """The Hub's known gating keys of a gated source's card data, with plain-text values (escaped so that the
    Hub's Markdown shows no link or HTML); unknown ``extra_gated_*`` keys and other value types are dropped."""
    out: dict[str, Any] = {}
    for k in GATED_TEXT_KEYS:
        if isinstance(card.get(k), str):
            out[k] = markdown.cell(card[k])
    if isinstance(card.get("extra_gated_eu_disallowed"), bool):
        out["extra_gated_eu_disallowed"] = card["extra_gated_eu_disallowed"]
    fields = card.get("extra_gated_fields")
    if isinstance(fields, Mapping):
        kept = {markdown.cell(name): v for name, v in ((n, _gating_field(v)) for n, v in fields.items())
                if isinstance(name, str) and v is not None}
        if kept:
            out["extra_gated_fields"] = kept
    return out


def shown(v: Any) -> str:
    return f"{type(v).__name__} {str(v)[:60]!r}"


def source_text(v: Any, key: str, repo: str | None = None) -> str | list[str] | None:
    """A value of the source's card data (``key``) as the Hub reads it (text, or a list of text), or None. A mapping,
    a number or a nested list is left out, and so is each such item of a list (logged): the rest goes into our
    card's YAML unchanged."""
    if isinstance(v, str) or not v:
        return v or None
    if isinstance(v, list):
        kept = [x for x in v if isinstance(x, str) and x]
        if len(kept) != len(v):
            log.warning("source card of %s: %s items that are not text left out: %s", repo, key,
                     shown([x for x in v if not (isinstance(x, str) and x)]))
        return kept or None
    log.warning("source card of %s: %s %s is not text or a list of text; left out", repo, key, shown(v))
    return None


def license_link(value: Any, repo: str | None, revision: str | None, hub_url: str) -> str | None:
    """The source's ``license_link`` for our card: an absolute http(s) address as it is; a plain path relative to the
    source repo (``LICENSE``) as that file's address in the source repo at the converted revision (our repo has no
    such file); anything else (``javascript:``, ``data:``, ``file:``, ``//host``, ``..``, spaces) None, logged."""
    if not value:
        return None
    if isinstance(value, str):
        link = value.strip()
        parts = urllib.parse.urlsplit(link) if not re.search(r"[\s<>\"'\\\x00-\x1f\x7f]", link) else None
        if parts is not None and parts.scheme.lower() in ("http", "https") and parts.hostname:
            return link
        rel = link[2:] if link.startswith("./") else link
        if parts is not None and not parts.scheme and repo and _SAFE_RELATIVE.fullmatch(rel):
            return f"{hub_url.rstrip('/')}/{repo}/blob/{revision or 'main'}/{rel}"
    log.warning("source card of %s: license_link %s is not a web address; left out", repo, shown(value))
    return None
