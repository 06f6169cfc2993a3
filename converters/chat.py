"""Chat templates: the one place that finds a checkpoint's template and the one sandboxed renderer.

A chat template is untrusted input (it comes with the model). It is rendered only here, in Jinja2's
``ImmutableSandboxedEnvironment`` with what transformers provides to templates (``raise_exception``,
``strftime_now``, ``tojson``, loop controls, ``bos_token``/``eos_token``, ``add_generation_prompt``).

Where a checkpoint keeps its template, in transformers' order of precedence: ``chat_template.jinja``,
``chat_template.json`` (``{"chat_template": ...}``), ``tokenizer_config.json``'s ``chat_template``. A list of
named templates gives its ``default`` one (none without it: that is what transformers renders by default and
what gguf-py writes as ``tokenizer.chat_template``). A blank template is no template.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

JINJA_FILE = "chat_template.jinja"
JSON_FILE = "chat_template.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
DEFAULT_NAME = "default"


def _clock(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def pick(value: Any) -> str | None:
    """A template from what a config holds: a string, or the ``default`` of a list/dict of named templates."""
    if isinstance(value, Mapping):
        value = value.get(DEFAULT_NAME)
    elif isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        value = named.get(DEFAULT_NAME)
    return value if isinstance(value, str) and value.strip() else None


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def find_template(checkpoint_dir: Path, tokenizer_config: Mapping[str, Any] | None = None) -> str | None:
    """The chat template of a local checkpoint, or None. ``tokenizer_config``: the parsed file, when already read."""
    root = Path(checkpoint_dir)
    if (root / JINJA_FILE).is_file():
        return pick((root / JINJA_FILE).read_text(encoding="utf-8"))
    from_json = _json_object(root / JSON_FILE).get("chat_template") if (root / JSON_FILE).is_file() else None
    if isinstance(from_json, (str, list)):
        return pick(from_json)
    if tokenizer_config is None:
        tokenizer_config = _json_object(root / TOKENIZER_CONFIG)
    return pick(tokenizer_config.get("chat_template"))


def tokenizer_template(tok: Any) -> str | None:
    """The chat template a loaded transformers tokenizer renders by default."""
    return pick(getattr(tok, "chat_template", None))


def _environment(lenient: bool, strftime_now: Callable[[str], str]) -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        raise jinja2.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                                        undefined=jinja2.ChainableUndefined if lenient else jinja2.Undefined)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


def render(template: str, messages: Sequence[Mapping[str, Any]], *, bos: str = "", eos: str = "",
           add_generation_prompt: bool = True, strftime_now: Callable[[str], str] = _clock,
           lenient: bool = False) -> str:
    """Render ``template`` for ``messages`` as transformers does, in the sandbox; raises what the template raises.

    ``strftime_now``: what the template's clock returns (a fixed text keeps a rendering reproducible);
    ``lenient``: undefined attributes chain instead of failing (for illustrations, not for checks).
    """
    env = _environment(lenient, strftime_now)
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            bos_token=bos, eos_token=eos, tools=None, documents=None)
