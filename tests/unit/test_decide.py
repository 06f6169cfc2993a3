"""The acceptance rules (bot.model.rules): one table row per reason, on the project's own ModelRecord; the watcher's
fingerprints of result-changing files."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from bot.model.record import ModelRecord
from bot.model.rules import convert_refusal, decide, fetch_refusal, quantized_reason, rule, rule_names, unsafe_name
from bot.model.settings import Source, from_mapping
from bot.model.revisions import changed_files, diff_fingerprints, fingerprint
from bot.service.watcher import iso
from tests.bot_fixtures import GB, GOOD_FILES, model_record

SETTINGS = from_mapping({"limits": {"max_model_gb": 10}}, env={}, free_disk=10**13)
SRC = Source(author="acme")


def rec(files: tuple = GOOD_FILES, **kw: Any) -> ModelRecord:
    return model_record(files, **kw)


def settings(**sections: Any):
    return from_mapping({"limits": {"max_model_gb": 10}, **sections}, env={}, free_disk=10**13)


CASES = [
    # (name, record, settings, kwargs, expected code, words in the reason)
    ("accept", rec(), SETTINGS, {}, "accepted", ""),
    ("disabled", rec(disabled=True), SETTINGS, {}, "disabled", "disabled"),
    ("private", rec(private=True), SETTINGS, {}, "private", "private"),
    ("exclude", rec(), settings(filters={"exclude_patterns": ["acme/*-instruct"]}), {}, "excluded", "acme/*-instruct"),
    ("escape", rec(files=GOOD_FILES + (("../../etc/passwd", 10, None),)), SETTINGS, {}, "unsafe_filename", "../"),
    ("absolute", rec(files=GOOD_FILES + (("/abs", 10, None),)), SETTINGS, {}, "unsafe_filename", "/abs"),
    ("gguf file", rec(files=GOOD_FILES + (("m-Q4_K_M.gguf", 10, "b" * 64),)), SETTINGS, {}, "quantized", "GGUF"),
    ("gguf name", rec(id="acme/Model-GGUF", files=(("config.json", 1, None), ("x.safetensors", 1, "c" * 64))),
     SETTINGS, {}, "quantized", "gguf"),
    ("awq tag", rec(tags=("awq",)), SETTINGS, {}, "quantized", "awq"),
    ("gptq config", rec(config={"quantization_config": {"quant_method": "gptq"}}), SETTINGS, {}, "quantized", "gptq"),
    ("fp8 is a source", rec(config={"quantization_config": {"quant_method": "fp8"}}), SETTINGS, {}, "accepted", ""),
    ("quantized allowed", rec(tags=("awq",)), settings(filters={"skip_quantized": False}), {}, "accepted", ""),
    ("auto_map", rec(config={"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}), SETTINGS, {},
     "remote_code", "AutoModelForCausalLM"),
    ("custom_code tag", rec(tags=("custom_code",)), SETTINGS, {}, "remote_code", "custom_code"),
    ("pickle only", rec(files=(("config.json", 1, None), ("pytorch_model.bin", 2 * GB, "d" * 64))), SETTINGS, {},
     "pickle_only", "pytorch_model.bin"),
    ("no weights", rec(files=(("config.json", 1, None), ("README.md", 1, None))), SETTINGS, {}, "no_safetensors", ""),
    ("licence deny", rec(), settings(filters={"licenses_deny": ["Apache-2.0"]}), {}, "license", "deny"),
    ("licence allow", rec(), settings(filters={"licenses_allow": ["mit"]}), {}, "license", "allow"),
    ("licence from tags", rec(license=None, card_data={}, tags=("license:mit",)),
     settings(filters={"licenses_deny": ["mit"]}), {}, "license", "mit"),
    ("pipeline", rec(pipeline_tag="text-to-image"), SETTINGS, {}, "pipeline_tag", "text-to-image"),
    ("too few params", rec(), settings(filters={"min_params": 2_000_000_000}), {}, "params", "below"),
    ("too many params", rec(), settings(filters={"max_params": 500_000_000}), {}, "params", "above"),
    ("size exact", rec(files=(("config.json", 1, None), ("a.safetensors", 6 * GB, "e" * 64),
                              ("b.safetensors", 6 * GB, "f" * 64))), SETTINGS, {"full": True}, "too_large", "12.0 GB"),
    ("size exact only when full", rec(files=(("config.json", 1, None), ("a.safetensors", 12 * GB, "e" * 64))),
     SETTINGS, {}, "accepted", ""),
    ("size estimate", rec(safetensors_total=70_000_000_000), SETTINGS, {}, "too_large", "70,000,000,000"),
    ("gated, access unknown", rec(gated="manual"), SETTINGS, {}, "accepted", ""),
    ("gated, no access", rec(gated="manual"), SETTINGS, {"has_access": False}, "gated", "no access"),
    ("gated, access", rec(gated="auto"), SETTINGS, {"has_access": True}, "accepted", ""),
    ("gated, skipped by settings", rec(gated="auto"), settings(filters={"skip_gated": True}), {"has_access": True},
     "gated", "settings"),
]


@pytest.mark.parametrize("name,record,cfg,kwargs,code,words", CASES, ids=[c[0] for c in CASES])
def test_decide(name: str, record: ModelRecord, cfg, kwargs: dict, code: str, words: str) -> None:
    d = decide(record, cfg, SRC, **kwargs)
    assert d.code == code, d.reason
    assert d.accept == (code == "accepted")
    assert words.lower() in d.reason.lower()


@pytest.mark.parametrize("name,unsafe", [
    ("model.safetensors", False), ("sub/dir/file.json", False), ("../x", True), ("a/../../x", True),
    ("a/./b", False), ("/etc/passwd", True), ("a\\..\\b", True), ("C:/x", True), ("a//b", True), ("", True),
])
def test_unsafe_names(name: str, unsafe: bool) -> None:
    assert unsafe_name(name) is unsafe


def test_quantized_reason_none_for_a_plain_release() -> None:
    assert quantized_reason(rec(), ["model.safetensors"]) is None


def test_rules_run_in_registration_order_and_names_are_unique() -> None:
    assert rule_names() == ("disabled", "private", "excluded", "unsafe_filename", "quantized", "remote_code",
                            "weights", "license", "pipeline_tag", "params", "too_large", "gated")
    with pytest.raises(ValueError, match="registered twice"):
        rule("gated")(lambda c: None)
    # the first rule that applies wins: a disabled, private, pickle-only repo is skipped as disabled
    both = rec(disabled=True, private=True, files=(("pytorch_model.bin", 1, "d" * 64),))
    assert decide(both, SETTINGS, SRC).code == "disabled"


def test_a_listing_without_file_names_is_not_refused_for_its_weights() -> None:
    assert decide(rec(files=()), SETTINGS, SRC).code == "accepted"


FETCH_CASES = [
    # the runner's re-check of the revision it fetches: gated and pipeline tag do not count there
    ("accept", rec(), SETTINGS, None),
    ("gated, no access known", rec(gated="manual"), settings(filters={"skip_gated": True}), None),
    ("pipeline tag", rec(pipeline_tag="text-to-image"), SETTINGS, None),
    ("remote code", rec(tags=("custom_code",)), SETTINGS, "remote_code"),
    ("too large", rec(files=(("a.safetensors", 12 * GB, "e" * 64),)), SETTINGS, "too_large"),
]


@pytest.mark.parametrize("name,record,cfg,code", FETCH_CASES, ids=[c[0] for c in FETCH_CASES])
def test_fetch_refusal(name: str, record: ModelRecord, cfg, code: str | None) -> None:
    d = fetch_refusal(record, cfg)
    assert (d.code if d else None) == code


CONVERT_CASES = [
    # ggufbot convert ORG/NAME: the converter's words, the same as checkpoint.inspect's
    ("good", rec(), None),
    ("pickle only", rec(files=(("config.json", 1, None), ("pytorch_model.bin", 9, "d" * 64))),
     "only pickle weights; refused: pickle can run code"),
    ("no weights", rec(files=(("config.json", 1, None),)), "no safetensors weights"),
    ("no files at all", rec(files=()), "no safetensors weights"),
    ("auto_map", rec(config={"auto_map": {"AutoModel": "m.M"}}),
     "needs trust_remote_code (config has auto_map); refused: remote code is never run"),
    ("pickle before auto_map", rec(files=(("model.pt", 1, None),), config={"auto_map": {"A": "m.M"}}),
     "only pickle weights; refused: pickle can run code"),
]


@pytest.mark.parametrize("name,record,reason", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_convert_refusal(name: str, record: ModelRecord, reason: str | None) -> None:
    assert convert_refusal(record) == reason


class FakeTextHub:
    """Stands in for Hub.read_text only: the content of small, non-LFS files per revision."""

    def __init__(self, texts: dict[tuple[str, str], str]):
        self.texts = texts
        self.reads: list[tuple[str, str]] = []

    def read_text(self, repo: str, name: str, revision: str | None = None) -> str | None:
        self.reads.append((name, revision))
        return self.texts.get((name, revision))


def test_fingerprint_covers_result_files_only_and_needs_no_request() -> None:
    files = GOOD_FILES + (("README.md", 5, None), ("chat_template.jinja", 30, None), ("tokenizer.model", 9, "9" * 64))
    fp = fingerprint(rec(files=files))
    assert fp == {"config.json": "size:700", "model.safetensors": "sha256:" + "a" * 64, "tokenizer.json": "size:2000",
                  "chat_template.jinja": "size:30", "tokenizer.model": "sha256:" + "9" * 64}


def test_changed_files_reads_same_size_small_files_at_both_revisions() -> None:
    old = {"config.json": "size:2", "tokenizer.json": "size:7", "model.safetensors": "sha256:1"}
    texts = {("config.json", "r1"): "{}", ("config.json", "r2"): "{}",
             ("tokenizer.json", "r1"): '{"v":1}', ("tokenizer.json", "r2"): '{"v":2}'}
    hub = FakeTextHub(texts)
    assert changed_files(old, dict(old), hub=hub, repo="o/m", old_rev="r1", new_rev="r2") == ["tokenizer.json"]
    assert ("model.safetensors", "r1") not in hub.reads  # LFS files are compared by their sha256
    new = {**old, "model.safetensors": "sha256:2", "tokenizer.json": "size:8", "chat_template.jinja": "size:3"}
    hub2 = FakeTextHub(texts)
    assert changed_files(old, new, hub=hub2, repo="o/m", old_rev="r1", new_rev="r2") == [
        "chat_template.jinja", "model.safetensors", "tokenizer.json"]
    assert [n for n, _ in hub2.reads] == ["config.json", "config.json"]  # only the same-size file is read
    assert diff_fingerprints(old, dict(old)) == [] and diff_fingerprints(None, {"a": "1"}) == ["a"]


def test_iso_is_comparable() -> None:
    a = iso(dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.timezone.utc))
    b = iso("2026-11-20T08:00:00.000Z")
    c = iso(dt.datetime(2026, 11, 20, 9, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))))  # 07:00 UTC
    assert a == b and c < a
