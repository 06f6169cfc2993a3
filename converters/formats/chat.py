"""Chat templates: the one place that finds a checkpoint's template and the one sandboxed renderer.

A chat template is untrusted input (it comes with the model). It is rendered only here, in Jinja2's
``ImmutableSandboxedEnvironment`` with what transformers provides to templates (``raise_exception``,
``strftime_now``, ``tojson``, loop controls, ``bos_token``/``eos_token``, ``add_generation_prompt``), in a child
process (started by :func:`converters.core.proc.run`: no secrets in its environment) with CPU-time, memory and
output-size limits, so that a template that loops, allocates or recurses without end fails with a reason in
seconds instead of stalling the bot.

Where a checkpoint keeps its template, in transformers' order of precedence: ``chat_template.jinja``,
``chat_template.json`` (``{"chat_template": ...}``), ``tokenizer_config.json``'s ``chat_template``. A list of
named templates gives its ``default`` one (none without it: that is what transformers renders by default and
what gguf-py writes as ``tokenizer.chat_template``). A blank template is no template.

That order is transformers'; the pinned converter's gguf-py has its own (``tokenizer_config.json``'s
``chat_template`` first, then ``chat_template.jinja`` with ``additional_chat_templates/*.jinja`` as named ones, then
``chat_template.json``), and llama.cpp renders the GGUF's ``tokenizer.chat_template`` and named
``tokenizer.chat_template.<name>`` when it loads a model for chat. So a check of "the" template proves nothing
about the file: :func:`template_candidates` lists every template any of them may pick, and each one is rendered
in the sandbox before anything is converted (``converters.llama.verify.templates_refusal``).
"""

from __future__ import annotations

import datetime
import json
import logging
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from converters.core.errors import TemplateError, ToolError
from converters.core.proc import ResourceLimits, run

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


def tokenizer_settings(checkpoint_dir: Path) -> dict[str, Any]:
    """A checkpoint's ``tokenizer_config.json`` ({} when it is missing or not a JSON object)."""
    return _json_object(Path(checkpoint_dir) / TOKENIZER_CONFIG)


def find_template(checkpoint_dir: Path, tokenizer_config: Mapping[str, Any] | None = None) -> str | None:
    """The chat template of a local checkpoint, or None. ``tokenizer_config``: the parsed file, when already read."""
    root = Path(checkpoint_dir)
    if (root / JINJA_FILE).is_file():
        return pick((root / JINJA_FILE).read_text(encoding="utf-8"))
    from_json = _json_object(root / JSON_FILE).get("chat_template") if (root / JSON_FILE).is_file() else None
    if isinstance(from_json, (str, list)):
        return pick(from_json)
    if tokenizer_config is None:
        tokenizer_config = tokenizer_settings(root)
    return pick(tokenizer_config.get("chat_template"))


EXTRA_DIR = "additional_chat_templates"  # <name>.jinja: named templates beside chat_template.jinja


def _named(where: str, value: Any) -> list[tuple[str, str]]:
    """Every template of a config value: a string, a list of ``{"name", "template"}`` or a name -> template map."""
    if isinstance(value, str):
        return [(where, value)]
    items: list[tuple[Any, Any]] = []
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list):
        items = [(t.get("name"), t.get("template")) for t in value if isinstance(t, Mapping)]
    return [(f"{where} {name!r}", t) for name, t in items if isinstance(t, str)]


def template_candidates(checkpoint_dir: Path,
                        tokenizer_config: Mapping[str, Any] | None = None) -> list[tuple[str, str]]:
    """Every chat template of a local checkpoint that a converter or a runtime may pick, as (where, template):
    ``tokenizer_config.json``'s ``chat_template`` (a string, or each of a list of named templates),
    ``chat_template.jinja``, ``additional_chat_templates/<name>.jinja``, ``chat_template.json``'s ``chat_template``.
    Blank templates are left out, and a text already listed is listed once (under its first place)."""
    root = Path(checkpoint_dir)
    if tokenizer_config is None:
        tokenizer_config = tokenizer_settings(root)
    found = _named(f"{TOKENIZER_CONFIG} chat_template", tokenizer_config.get("chat_template"))
    if (root / JINJA_FILE).is_file():
        found.append((JINJA_FILE, (root / JINJA_FILE).read_text(encoding="utf-8", errors="replace")))
    extra = root / EXTRA_DIR
    if extra.is_dir():
        found += [(f"{EXTRA_DIR}/{f.name}", f.read_text(encoding="utf-8", errors="replace"))
                  for f in sorted(extra.glob("*.jinja")) if f.is_file()]
    if (root / JSON_FILE).is_file():
        found += _named(f"{JSON_FILE} chat_template", _json_object(root / JSON_FILE).get("chat_template"))
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for where, text in found:
        if text.strip() and text not in seen:
            seen.add(text)
            out.append((where, text))
    return out


def tokenizer_template(tok: Any) -> str | None:
    """The chat template a loaded transformers tokenizer renders by default."""
    return pick(getattr(tok, "chat_template", None))


def _environment(lenient: bool, fixed_date: str | None) -> Any:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        raise jinja2.TemplateError(msg)

    def strftime_now(fmt: str) -> str:
        return fixed_date if fixed_date is not None and "%" in fmt else _clock(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                                        undefined=jinja2.ChainableUndefined if lenient else jinja2.Undefined)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env


# What one rendering may use: the template is untrusted (nested loops, 'x' * 10**10, endless recursion...)
RENDER_LIMITS = ResourceLimits(cpu_seconds=3, memory_bytes=1 << 30, file_bytes=0)
RENDER_SECONDS = 20.0  # wall clock, starting the child included
# The reasons a rendering stopped on a limit (not the template's own error): trying other input will not help
LIMIT_KINDS = frozenset({"time", "cpu", "memory", "output", "recursion", "crash"})
SANDBOX_VIOLATION = "SecurityError"  # the kind of a template that reached for what the sandbox forbids
MAX_OUTPUT_CHARS = 1 << 20


def render(template: str, messages: Sequence[Mapping[str, Any]], *, bos: str = "", eos: str = "",
           add_generation_prompt: bool = True, fixed_date: str | None = None, lenient: bool = False,
           context: Mapping[str, Any] | None = None) -> str:
    """Render ``template`` for ``messages`` as transformers does, in the sandbox, in a child process with CPU-time,
    memory and output-size limits; raises :class:`~converters.core.errors.TemplateError` with the reason.

    ``fixed_date``: what the template's clock (``strftime_now``) returns, for a reproducible rendering;
    ``lenient``: undefined attributes chain instead of failing (for illustrations, not for checks);
    ``context``: more variables, e.g. a tokenizer's special tokens as transformers passes them.
    """
    request = {"template": template, "messages": [dict(m) for m in messages],
               "variables": {"bos_token": bos, "eos_token": eos, **(context or {}),
                             "add_generation_prompt": add_generation_prompt},
               "fixed_date": fixed_date, "lenient": lenient, "max_chars": MAX_OUTPUT_CHARS}
    try:
        res = run([sys.executable, "-I", "-m", __name__], stdin=json.dumps(request).encode(), timeout=RENDER_SECONDS,
                  limits=RENDER_LIMITS, keep_output=8 * MAX_OUTPUT_CHARS)
    except ToolError as e:
        raise _limit_error(e) from None
    try:
        answer = json.loads(res.stdout)
    except ValueError:
        raise TemplateError("output", "the renderer's answer was not readable") from None
    if "error" in answer:
        raise TemplateError(answer["error"], answer["message"])
    return answer["text"]


def render_probes(template: str, probes: Sequence[tuple[Sequence[Mapping[str, Any]], Mapping[str, Any]]], *,
                  context: Mapping[str, Any] | None = None) -> list[str | TemplateError]:
    """Render ``template`` once per probe (messages, more variables) in one sandboxed child with :func:`render`'s
    limits for all of them: a text or the :class:`~converters.core.errors.TemplateError` of each probe. A limit stops
    the child: its error is then the last item (the probes after it are not rendered); a template's own error
    does not stop the others."""
    request = {"template": template, "probes": [{"messages": [dict(m) for m in msgs], "variables": dict(extra)}
                                                for msgs, extra in probes],
               "variables": {"bos_token": "", "eos_token": "", **(context or {}), "add_generation_prompt": True},
               "fixed_date": None, "lenient": False, "max_chars": MAX_OUTPUT_CHARS}
    try:
        res = run([sys.executable, "-I", "-m", __name__], stdin=json.dumps(request).encode(), timeout=RENDER_SECONDS,
                  limits=RENDER_LIMITS, keep_output=8 * MAX_OUTPUT_CHARS)
    except ToolError as e:
        return [_limit_error(e)]
    try:
        answers = json.loads(res.stdout)["answers"]
    except (ValueError, KeyError, TypeError):
        return [TemplateError("output", "the renderer's answer was not readable")]
    return [a["text"] if "text" in a else TemplateError(a["error"], a["message"]) for a in answers]


def _limit_error(e: ToolError) -> TemplateError:
    if e.timed_out:
        return TemplateError("time", f"rendering took longer than {RENDER_SECONDS:.0f} s")
    if e.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return TemplateError("cpu", f"rendering used more than {RENDER_LIMITS.cpu_seconds} s of CPU time")
    return TemplateError("crash", f"the renderer died ({e.short()})")


def _render_here(request: Mapping[str, Any], env: Any = None) -> str:
    """The child's work: render in the sandbox, streaming, and stop once the output is too long."""
    env = env if env is not None else _environment(bool(request["lenient"]), request["fixed_date"])
    variables = {"tools": None, "documents": None, **request["variables"], "messages": request["messages"]}
    out: list[str] = []
    size, limit = 0, int(request["max_chars"])
    for piece in env.from_string(request["template"]).generate(**variables):
        out.append(piece)
        size += len(piece)
        if size > limit:
            raise TemplateError("output", f"the rendering is longer than {limit} characters")
    return "".join(out)


def _answer(request: Mapping[str, Any], env: Any = None) -> dict[str, Any]:
    try:
        return {"text": _render_here(request, env)}
    except TemplateError as e:
        return {"error": e.kind, "message": e.message}
    except MemoryError:
        return {"error": "memory", "message": f"rendering needed more than {RENDER_LIMITS.memory_bytes >> 20} MB"}
    except RecursionError:
        return {"error": "recursion", "message": "the template recursed too deeply"}
    except Exception as e:  # noqa: BLE001 - whatever the template raised is its failure
        return {"error": type(e).__name__, "message": str(e)[:500]}


def _child() -> None:
    """``python -m converters.formats.chat``: one request (JSON) on stdin, ``{"text"}`` or ``{"error", "message"}`` out;
    a request with ``probes``: ``{"answers": [...]}``, one per probe, up to the first that hits a limit."""
    sys.setrecursionlimit(2000)
    request = json.loads(sys.stdin.buffer.read())
    if "probes" not in request:
        sys.stdout.write(json.dumps(_answer(request)))
        return
    env = _environment(bool(request["lenient"]), request["fixed_date"])
    answers: list[dict[str, Any]] = []
    for probe in request["probes"]:
        answers.append(_answer({**request, "messages": probe["messages"],
                                "variables": {**request["variables"], **probe["variables"]}}, env))
        if answers[-1].get("error") in LIMIT_KINDS:
            break
    sys.stdout.write(json.dumps({"answers": answers}))


if __name__ == "__main__":
    _child()
