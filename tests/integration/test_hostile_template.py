"""A chat template that loops, allocates or recurses without end fails the template check with a reason in
seconds (and costs the card only its example); nothing stalls. SmolLM2's tokenizer, no llama.cpp."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from bot.publish import source_card
from converters.formats import chat
from converters.llama import verify
from converters.core.report import FAILED, PASSED

LOOPS = "{% for a in range(100000) %}{% for b in range(100000) %}{% if a < 0 %}x{% endif %}{% endfor %}{% endfor %}"
HUGE = "{{ 'x' * 10**10 }}"
DEEP = "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}"
BUDGET = chat.RENDER_SECONDS + 5  # one rendering at most, never one per sample conversation
pytestmark = pytest.mark.usefixtures("quick_render_limit")  # looping templates stop sooner


def facts(template: str | None) -> verify.GgufFacts:
    return verify.GgufFacts(path=Path("x.gguf"), arch="llama", tokenizer_model="gpt2", pre=None, tokens=(),
                            bos_id=None, eos_id=None, eot_id=None, eom_id=None, add_bos=False,
                            chat_template=template, digests={})


def source_with(smollm2: Path, dest: Path, template: str) -> Path:
    dest.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2 / name).exists():
            (dest / name).write_bytes((smollm2 / name).read_bytes())
    (dest / chat.JINJA_FILE).write_text(template)  # where transformers looks first
    return dest


def good_template(smollm2: Path) -> str:
    found = chat.find_template(smollm2)
    assert found
    return found


def test_the_real_template_still_passes(smollm2: Path) -> None:
    check = verify.chat_template_check(facts(good_template(smollm2)), smollm2)
    assert check.status == PASSED, check.detail


@pytest.mark.parametrize(("template", "kind"), [(LOOPS, "cpu"), (HUGE, "memory"), (DEEP, "recursion")])
def test_a_hostile_gguf_template_fails_the_check_in_seconds(smollm2: Path, template: str, kind: str) -> None:
    t0 = time.monotonic()
    check = verify.chat_template_check(facts(template), smollm2)
    assert check.status == FAILED and "the GGUF's chat template does not render" in check.detail
    assert kind in check.detail or (kind == "cpu" and "time:" in check.detail), check.detail
    assert time.monotonic() - t0 < BUDGET
    t0 = time.monotonic()
    assert verify.prompt_for(facts(template)) == (verify.PLAIN_PROMPT, False)  # the smoke test falls back
    assert time.monotonic() - t0 < BUDGET


def test_a_hostile_source_template_fails_the_check_in_seconds(smollm2: Path, tmp_path: Path) -> None:
    src = source_with(smollm2, tmp_path / "src", LOOPS)
    t0 = time.monotonic()
    check = verify.chat_template_check(facts(LOOPS), src)
    assert check.status == FAILED and "the source's chat template does not render" in check.detail, check.detail
    assert time.monotonic() - t0 < BUDGET


def test_a_hostile_template_costs_the_card_only_its_example(smollm2: Path) -> None:
    t0 = time.monotonic()
    assert source_card.render_chat_example(LOOPS) is None
    assert time.monotonic() - t0 < BUDGET
    example = source_card.render_chat_example(good_template(smollm2))
    assert example is not None and source_card.PROMPT_PLACEHOLDER in example


def test_the_source_side_renders_like_transformers(smollm2: Path) -> None:
    """The source's template goes through the same renderer with the tokenizer's special tokens, as transformers'
    apply_chat_template passes them: the two renderings agree."""
    from converters.formats import hfmodel

    tok = hfmodel.load_tokenizer(smollm2)
    conv = verify.SAMPLE_CONVERSATIONS[0]
    ours = chat.render(good_template(smollm2), conv, context=dict(tok.special_tokens_map))
    assert ours == tok.apply_chat_template(list(conv), tokenize=False, add_generation_prompt=True)
    assert dataclasses.is_dataclass(facts(None))
