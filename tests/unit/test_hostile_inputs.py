"""Hostile inputs refused before any program runs (absurd config sizes, templates that escape the sandbox), and the
hostile corpus's canaries are live: each payload, run the way it hopes to be run, does create its canary file (so
the end-to-end test's empty canary folder means something)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from converters import checkpoint as ck
from converters import verify
from converters.errors import UnsupportedModel
from tests.bot_fixtures import (
    SMALL_LAYER,
    canary_code,
    canary_pickle,
    escape_template,
    safetensors_bytes,
    shell_canary,
)

CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8,
       "intermediate_size": [16, 16], "vocab_size": 16}
NAMES = list(SMALL_LAYER)  # layers 0 and 1


@pytest.mark.parametrize(("config", "words"), [
    (CFG, None),
    ({**CFG, "num_hidden_layers": 10**9}, "num_hidden_layers = 1000000000"),
    ({**CFG, "num_hidden_layers": 3}, "declares 3 layers but the weights hold 2"),
    ({**CFG, "num_hidden_layers": 1}, None),  # more blocks than declared: e.g. multi-token-prediction layers
    ({**CFG, "hidden_size": -8}, "hidden_size = -8"),
    ({**CFG, "vocab_size": 2.5}, "vocab_size = 2.5"),
    ({**CFG, "num_attention_heads": True}, "num_attention_heads = True"),
    ({**CFG, "intermediate_size": [16, 1 << 40]}, "intermediate_size"),
    ({"architectures": ["X"], "text_config": {"num_hidden_layers": 10**12}}, "text_config.num_hidden_layers"),
    ({"architectures": ["X"], "text_config": {"num_hidden_layers": 5}}, "declares 5 layers"),
    ({"architectures": ["X"], "vision_config": {"num_hidden_layers": 27}}, None),  # a vision tower: not the LM's
])
def test_config_refusal(config: dict, words: str | None) -> None:
    got = ck.config_refusal(config, NAMES)
    assert (got is None) if words is None else (words in (got or "")), got


def test_inspect_refuses_an_absurd_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**CFG, "num_hidden_layers": 10**9}))
    (tmp_path / "model.safetensors").write_bytes(safetensors_bytes(SMALL_LAYER))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UnsupportedModel, match="num_hidden_layers = 1000000000"):
        ck.inspect(tmp_path)


@pytest.mark.parametrize(("template", "words"), [
    (None, None),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", None),
    # the template's own refusal (e.g. of a system message) is the template check's to judge, not a refusal
    ("{{ raise_exception('no system messages') }}", None),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "within the sandbox's limits"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "tries to leave the sandbox"),
])
def test_template_refusal(template: str | None, words: str | None) -> None:
    got = verify.template_refusal(template, {"bos_token": "<s>", "eos_token": "</s>", "pad_token": {"x": 1}})
    assert (got is None) if words is None else (words in (got or "")), got


def test_the_escape_template_is_refused(tmp_path: Path) -> None:
    assert "tries to leave the sandbox" in (verify.template_refusal(escape_template(tmp_path), {}) or "")
    assert list(tmp_path.iterdir()) == []


def test_the_canaries_are_live(tmp_path: Path) -> None:
    """Each payload of the corpus creates its canary when run as it hopes to be (outside the product)."""
    import jinja2

    subprocess.run([sys.executable, "-c", canary_code(tmp_path, "py")], check=True)
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
                   input=canary_pickle(tmp_path, "pickle"), check=True)
    jinja2.Environment().from_string(escape_template(tmp_path)).render(messages=[])  # no sandbox: it escapes
    subprocess.run(["sh", "-c", f"echo {shell_canary(tmp_path)}"], check=True)  # a shell string would run it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pickle", "py", "shell", "template"]
