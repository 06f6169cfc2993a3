"""converters.formats.chat: where a checkpoint keeps its chat template, and the one sandboxed renderer."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from jinja2.exceptions import SecurityError

from converters.formats import chat
from converters.core.errors import TemplateError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NAMED = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "DEFAULT"}]


def _files(root: Path, files: dict[str, object]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (root / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return root


@pytest.mark.parametrize(("files", "expected"), [
    ({}, None),
    ({"chat_template.jinja": "JINJA"}, "JINJA"),
    ({"chat_template.jinja": "JINJA", "tokenizer_config.json": {"chat_template": "TOK"}}, "JINJA"),
    ({"chat_template.json": {"chat_template": "JSON"}, "tokenizer_config.json": {"chat_template": "TOK"}}, "JSON"),
    ({"chat_template.json": "not json", "tokenizer_config.json": {"chat_template": "TOK"}}, "TOK"),
    ({"chat_template.json": {"other": 1}, "tokenizer_config.json": {"chat_template": "TOK"}}, "TOK"),
    ({"tokenizer_config.json": {"chat_template": "TOK"}}, "TOK"),
    ({"tokenizer_config.json": {"chat_template": NAMED}}, "DEFAULT"),
    ({"tokenizer_config.json": {"chat_template": NAMED[:1]}}, None),  # no default: transformers renders none
    ({"chat_template.json": {"chat_template": NAMED}}, "DEFAULT"),
    ({"chat_template.jinja": "  \n"}, None),  # blank
    ({"tokenizer_config.json": {"chat_template": 42}}, None),
    ({"tokenizer_config.json": "[1, 2]"}, None),
])
def test_find_template(tmp_path: Path, files: dict[str, object], expected: str | None) -> None:
    assert chat.find_template(_files(tmp_path / "ck", files)) == expected


def test_find_template_uses_a_tokenizer_config_already_read(tmp_path: Path) -> None:
    root = _files(tmp_path / "ck", {"tokenizer_config.json": {"chat_template": "ON DISK"}})
    assert chat.find_template(root, {"chat_template": "GIVEN"}) == "GIVEN"


class _Tok:
    def __init__(self, template: object) -> None:
        self.chat_template = template


@pytest.mark.parametrize(("template", "expected"), [
    ("T", "T"), (None, None), ("", None), ({"default": "D", "tools": "X"}, "D"), ({"tools": "X"}, None),
])
def test_tokenizer_template(template: object, expected: str | None) -> None:
    assert chat.tokenizer_template(_Tok(template)) == expected


def test_render_as_transformers() -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    assert chat.render(CHATML, msgs) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert chat.render(CHATML, msgs, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert chat.render("{{ bos_token }}x{{ eos_token }}", msgs, bos="<s>", eos="</s>") == "<s>x</s>"


@pytest.mark.parametrize(("template", "expected"), [
    ("{{ messages | tojson }}", '[{"role": "user", "content": "é"}]'),
    ("{{ messages | tojson(ensure_ascii=True) }}", '[{"role": "user", "content": "\\u00e9"}]'),
    ("{% for m in messages %}{{ m.role }}{% break %}{% endfor %}", "user"),
    ("{{ strftime_now('%Y') }}", "FIXED"),
])
def test_render_features(template: str, expected: str) -> None:
    got = chat.render(template, [{"role": "user", "content": "é"}], fixed_date="FIXED")
    assert got == expected


def test_raise_exception_and_sandbox() -> None:
    with pytest.raises(TemplateError, match="no system"):
        chat.render("{{ raise_exception('no system') }}", [])
    with pytest.raises(TemplateError) as ei:
        chat.render("{{ messages.append(1) }}", [])  # immutable sandbox: no mutation
    assert ei.value.kind == SecurityError.__name__
    with pytest.raises(TemplateError) as ei:
        chat.render("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])
    assert ei.value.kind == SecurityError.__name__


def test_lenient_undefined_only_when_asked() -> None:
    tmpl = "{{ messages[0].meta.name }}ok"
    with pytest.raises(TemplateError) as ei:
        chat.render(tmpl, [{"role": "user", "content": "x"}])
    assert ei.value.kind == jinja2.UndefinedError.__name__
    assert chat.render(tmpl, [{"role": "user", "content": "x"}], lenient=True) == "ok"


LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}{% if a < 0 %}x{% endif %}{% endfor %}{% endfor %}"


@pytest.mark.parametrize(("template", "kinds"), [
    (LOOPS, {"cpu", "time"}),  # 10**10 silent iterations: the CPU-time limit
    ("{{ 'x' * 10**10 }}", {"memory"}),  # the address-space limit
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", {"recursion"}),
    ("{% for a in range(100000) %}{% for b in range(100000) %}{{ a }}{% endfor %}{% endfor %}", {"output"}),
])
def test_a_hostile_template_fails_with_a_reason_within_seconds(template: str, kinds: set[str]) -> None:
    import time

    t0 = time.monotonic()
    with pytest.raises(TemplateError) as ei:
        chat.render(template, [{"role": "user", "content": "x"}])
    assert ei.value.kind in kinds, ei.value
    assert time.monotonic() - t0 < chat.RENDER_SECONDS + 2

