"""Checks against real GGUFs of SmolLM2: altered tokenizer metadata, a removed template, wrong special tokens.

Each broken file is a metadata-only copy (no tensors) of the shared ladder's Q2_K, rewritten with gguf-py:
these checks read the metadata and llama.cpp loads the vocabulary only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from converters.llama import verify
from converters.core.report import FAILED, PASSED
from tests.ggufedit import copy_with_metadata

pytestmark = [pytest.mark.slow, pytest.mark.llama]


@pytest.fixture(scope="module")
def q2k(smol_workdir: Path) -> Path:
    ladder = json.loads((smol_workdir / "ladder.json").read_text())
    return smol_workdir / next(f["path"] for f in ladder["files"] if f["type"] == "Q2_K")


@pytest.fixture(scope="module")
def reference_facts(smol_workdir: Path) -> verify.GgufFacts:
    ladder = json.loads((smol_workdir / "ladder.json").read_text())
    return verify.GgufFacts.read(smol_workdir / ladder["reference"]["path"])


def test_checks_pass_on_the_real_quant(q2k: Path, smollm2: Path, reference_facts, toolchain):
    facts = verify.GgufFacts.read(q2k)
    assert verify.chat_template_check(facts, smollm2).status == PASSED
    assert verify.special_tokens_check(facts, smollm2).status == PASSED
    assert verify.metadata_check(facts, reference_facts).status == PASSED


def test_wrong_pre_tokenizer_fails_parity_with_the_first_mismatch(q2k: Path, smollm2: Path, reference_facts,
                                                                  toolchain, tmp_path):
    bad = copy_with_metadata(q2k, tmp_path / "pre.gguf", set_keys={"tokenizer.ggml.pre": "llama-bpe"},
                             tensors=False)
    check = verify.tokenizer_parity(toolchain, bad, smollm2)
    assert check.status == FAILED
    assert check.detail.startswith("sample ") and "first difference at token" in check.detail
    assert check.data["pre"] == "llama-bpe" and check.data["source_ids"] != check.data["gguf_ids"]
    meta = verify.metadata_check(verify.GgufFacts.read(bad), reference_facts)
    assert meta.status == FAILED and "tokenizer.ggml.pre" in meta.detail


def test_unknown_pre_tokenizer_fails_parity_with_llama_cpp_s_error(q2k: Path, smollm2: Path, toolchain, tmp_path):
    bad = copy_with_metadata(q2k, tmp_path / "pre.gguf", set_keys={"tokenizer.ggml.pre": "no-such-pre"},
                             tensors=False)
    check = verify.tokenizer_parity(toolchain, bad, smollm2)
    assert check.status == FAILED and "cannot tokenize" in check.detail and "pre-tokenizer 'no-such-pre'" in check.detail


def test_removed_template_fails_the_template_check(q2k: Path, smollm2: Path, reference_facts, tmp_path):
    bad = copy_with_metadata(q2k, tmp_path / "notmpl.gguf", remove=["tokenizer.chat_template"], tensors=False)
    facts = verify.GgufFacts.read(bad)
    check = verify.chat_template_check(facts, smollm2)
    assert check.status == FAILED and "the GGUF has none" in check.detail
    meta = verify.metadata_check(facts, reference_facts)
    assert meta.status == FAILED and "missing: tokenizer.chat_template" in meta.detail


def test_changed_template_fails_with_the_first_difference(q2k: Path, smollm2: Path, tmp_path):
    facts = verify.GgufFacts.read(q2k)
    edited = facts.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    bad = copy_with_metadata(q2k, tmp_path / "tmpl.gguf", set_keys={"tokenizer.chat_template": edited},
                             tensors=False)
    check = verify.chat_template_check(verify.GgufFacts.read(bad), smollm2)
    assert check.status == FAILED and "renders a different prompt" in check.detail and "bot" in check.detail


def test_wrong_eos_fails_the_special_token_check(q2k: Path, smollm2: Path, tmp_path):
    bad = copy_with_metadata(q2k, tmp_path / "eos.gguf", set_keys={"tokenizer.ggml.eos_token_id": 5},
                             tensors=False)
    check = verify.special_tokens_check(verify.GgufFacts.read(bad), smollm2)
    assert check.status == FAILED and "EOS id 5" in check.detail


def test_base_model_without_template_passes_with_a_note(q2k: Path, smollm2: Path, tmp_path):
    src = tmp_path / "base-model"
    src.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (smollm2 / name).exists():
            (src / name).write_bytes((smollm2 / name).read_bytes())
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    bad = copy_with_metadata(q2k, tmp_path / "base.gguf", remove=["tokenizer.chat_template"], tensors=False)
    facts = verify.GgufFacts.read(bad)
    check = verify.chat_template_check(facts, src)
    assert check.status == PASSED and check.detail == "no template (base model)"
    prompt, is_chat = verify.prompt_for(facts)
    assert not is_chat and verify.end_of_reply_check(
        verify.Generation("x", False, 1, 0.0), is_chat, 8).status == "skipped"
