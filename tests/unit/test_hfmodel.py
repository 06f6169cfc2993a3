"""converters.formats.hfmodel: dtype choice and loading failures as the project's errors (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from converters.formats import hfmodel
from converters.core.errors import InputError, UnsupportedModel


@pytest.mark.parametrize(("device", "parameters", "limit", "expected"), [
    ("cpu", None, None, "float32"),
    ("cpu", 10, 100, "float32"),
    ("cpu", 101, 100, "bfloat16"),
    ("cuda", None, None, "bfloat16"),
    ("cuda:1", 10, 100, "bfloat16"),
])
def test_pick_dtype(device: str, parameters: int | None, limit: int | None, expected: str) -> None:
    assert hfmodel.dtype_name(hfmodel.pick_dtype(device, parameters=parameters, f32_max_params=limit)) == expected


def test_default_device_is_known() -> None:
    assert hfmodel.default_device() in (hfmodel.CPU, hfmodel.CUDA)


def test_loading_failures_are_project_errors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UnsupportedModel) as e:
        hfmodel.load_causal_lm(tmp_path)  # no safetensors weights
    assert str(tmp_path) in str(e.value) and e.value.__cause__ is not None
    with pytest.raises(InputError, match="cannot load the source tokenizer"):
        hfmodel.load_tokenizer(tmp_path / "missing")
