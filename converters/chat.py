"""Chat templates: the one place that finds a checkpoint's template and the one sandboxed renderer.

A chat template is untrusted input (it comes with the model). It is rendered only here, in Jinja2's
``ImmutableSandboxedEnvironment`` with what transformers provides to templates (``raise_exception``,
``strftime_now``, ``tojson``, loop controls, ``bos_token``/``eos_token``, ``add_generation_prompt``), in a child
process (started by :func:`converters.toolchain.run`: no secrets in its environment) with CPU-time, memory and
output-size limits, so that a template that loops, allocates or recurses without end fails with a reason in
seconds instead of stalling the bot.

Where a checkpoint keeps its template, in transformers' order of precedence: ``chat_template.jinja``,
``chat_template.json`` (``{"chat_template": ...}``), ``tokenizer_config.json``'s ``chat_template``. A list of
named templates gives its ``default`` one (none without it: that is what transformers renders by default and
what gguf-py writes as ``tokenizer.chat_template``). A blank template is no template.
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

from converters.errors import TemplateError, ToolError
from converters.toolchain import ResourceLimits, run

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
    memory and output-size limits; raises :class:`~converters.errors.TemplateError` with the reason.

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


def _limit_error(e: ToolError) -> TemplateError:
    if e.timed_out:
        return TemplateError("time", f"rendering took longer than {RENDER_SECONDS:.0f} s")
    if e.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        return TemplateError("cpu", f"rendering used more than {RENDER_LIMITS.cpu_seconds} s of CPU time")
    return TemplateError("crash", f"the renderer died ({e.short()})")


def _render_here(request: Mapping[str, Any]) -> str:
    """The child's work: render in the sandbox, streaming, and stop once the output is too long."""
    env = _environment(bool(request["lenient"]), request["fixed_date"])
    variables = dict(request["variables"], messages=request["messages"], tools=None, documents=None)
    out: list[str] = []
    size, limit = 0, int(request["max_chars"])
    for piece in env.from_string(request["template"]).generate(**variables):
        out.append(piece)
        size += len(piece)
        if size > limit:
            raise TemplateError("output", f"the rendering is longer than {limit} characters")
    return "".join(out)


def _child() -> None:
    """``python -m converters.chat``: one request (JSON) on stdin, ``{"text"}`` or ``{"error", "message"}`` out."""
    sys.setrecursionlimit(2000)
    try:
        answer: dict[str, Any] = {"text": _render_here(json.loads(sys.stdin.buffer.read()))}
    except TemplateError as e:
        answer = {"error": e.kind, "message": e.message}
    except MemoryError:
        answer = {"error": "memory", "message": f"rendering needed more than {RENDER_LIMITS.memory_bytes >> 20} MB"}
    except RecursionError:
        answer = {"error": "recursion", "message": "the template recursed too deeply"}
    except Exception as e:  # noqa: BLE001 - whatever the template raised is its failure
        answer = {"error": type(e).__name__, "message": str(e)[:500]}
    sys.stdout.write(json.dumps(answer))


if __name__ == "__main__":
    _child()
