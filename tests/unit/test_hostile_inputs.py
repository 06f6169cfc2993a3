"""Hostile inputs refused before any program runs (absurd config sizes, templates that escape the sandbox), and the
hostile corpus's canaries are live: each payload, run the way it hopes to be run, does create its canary file (so
the end-to-end test's empty canary folder means something)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from converters.formats import checkpoint as ck
from converters.llama import verify
from converters.core.errors import UnsupportedModel
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
    # issue 19: every size key wherever it appears, head counts and context lengths bounded
    ({"architectures": ["X"], "thinker_config": {"text_config": {"vocab_size": 10**12}}},
     "thinker_config.text_config.vocab_size = 1000000000000"),
    ({"architectures": ["X"], "talker_config": {"audio_config": {"vision_config": {"hidden_size": -1}}}},
     "talker_config.audio_config.vision_config.hidden_size = -1"),
    ({**CFG, "block_configs": [{"ffn": {"intermediate_size": 16}}, {"ffn": {"intermediate_size": 10**12}}]},
     "block_configs[1].ffn.intermediate_size"),
    ({**CFG, "block_configs": [{"ffn": {"intermediate_size": None}}]}, None),  # a no-op block: no size at all
    ({**CFG, "num_attention_heads": 0}, "num_attention_heads = 0"),
    ({**CFG, "num_key_value_heads": 0}, "num_key_value_heads = 0"),
    ({**CFG, "n_head": 0}, "n_head = 0"),
    ({**CFG, "num_attention_heads": 4, "num_key_value_heads": None}, None),  # no GQA: kv heads = heads
    ({"architectures": ["X"], "vision_config": {"num_heads": [1, 2, 0, 8]}}, "vision_config.num_heads"),
    ({"architectures": ["X"], "vision_config": {"num_attention_heads": [1, 2, 5, 8]}}, None),  # a pyramid backbone
    ({**CFG, "max_position_embeddings": 10**15}, "max_position_embeddings = 1000000000000000"),
    ({**CFG, "max_position_embeddings": 10_485_760}, None),  # Llama 4 Scout's 10M context
    ({**CFG, "n_positions": 2**32}, "n_positions = 4294967296"),  # past GGUF's uint32 context_length
    ({**CFG, "text_config": {"max_position_embeddings": -1}}, "text_config.max_position_embeddings = -1"),
    ({"architectures": ["X"], "seq_length": "131072"}, "seq_length = 131072"),  # a string is not a size
    # the layers-vs-weights rule still reads the language model's count from text_config, not the towers'
    ({"architectures": ["X"], "text_config": {"num_hidden_layers": 2}, "vision_config": {"num_hidden_layers": 27}},
     None),
    ({"architectures": ["X"], "num_hidden_layers": 2, "vision_config": {"num_hidden_layers": 27}}, None),
    ({"architectures": ["X"], "text_config": {"num_hidden_layers": 3}, "vision_config": {"num_hidden_layers": 1}},
     "declares 3 layers but the weights hold 2"),
])
def test_config_refusal(config: dict, words: str | None) -> None:
    got = ck.config_refusal(config, NAMES)
    assert (got is None) if words is None else (words in (got or "")), got


# Released multi-part models: their sub-configs have legitimately different sizes (the defaults of transformers'
# config classes are the published checkpoints' values), and none may be refused.
REAL_MODEL_TYPES = ("llama", "qwen2_5_omni", "qwen3_omni_moe", "llama4", "gemma3", "gemma3n", "mllama",
                    "deepseek_v3", "qwen2_5_vl", "qwen3_vl_moe", "pvt_v2", "falcon", "mamba2", "whisper")


@pytest.mark.parametrize("model_type", REAL_MODEL_TYPES)
def test_real_nested_configs_pass(model_type: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type).to_dict()
    assert ck.config_refusal(config) is None


@pytest.mark.parametrize(("vocab_size", "refused"), [(16, False), (10**12, True)])
def test_a_deep_config_is_walked_without_recursion(vocab_size: int, refused: bool) -> None:
    deep: dict = {"vocab_size": vocab_size}
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = {"sub_config": deep}
    got = ck.config_refusal(deep)
    assert (got is not None) is refused and (not refused or "sub_config.sub_config.sub_config." in got), got


def test_a_config_nested_too_deep_to_parse_is_one_clear_refusal(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(UnsupportedModel, match="malformed config.json"):
        ck.inspect(tmp_path)


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
