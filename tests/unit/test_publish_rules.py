"""Pure parts of publishing: repo names, the "What's new" line, which files are published."""

from __future__ import annotations

import pytest

from bot.publish.card import published_files
from bot.model.repo_names import repo_name
from bot.publish.commit import DEFAULT_VARIANT_TEMPLATE, whats_new
from converters.core.errors import ConfigError
from converters.core.report import Report
from converters.core.workdir import Ladder


@pytest.mark.parametrize("template, expected", [
    ("{org}/{model}-GGUF", "team/Tiny-GGUF"),
    ("{model}-GGUF", "team/Tiny-GGUF"),  # settings' form without the namespace
    ("{org}/{author}_{model}-GGUF", "team/acme_Tiny-GGUF"),
    ("other/{model}", "other/Tiny"),
])
def test_repo_name(template: str, expected: str) -> None:
    assert repo_name(template, namespace="team", model="Tiny", author="acme") == expected


@pytest.mark.parametrize("template", ["{org}/{nope}-GGUF", "{org}/{0}", "{org}/{model"])
def test_bad_repo_template(template: str) -> None:
    with pytest.raises(ConfigError):
        repo_name(template, namespace="team", model="Tiny")


@pytest.mark.parametrize("template, model, variant, expected", [
    (DEFAULT_VARIANT_TEMPLATE, "SmolLM2-135M-Instruct", "prune-25pct-kd", "acme/SmolLM2-135M-Instruct-prune-25pct-kd-GGUF"),
    ("{org}/{variant}-of-{model}", "M", "v", "acme/v-of-M"),
])
def test_variant_repo_name(template: str, model: str, variant: str, expected: str) -> None:
    assert repo_name(template, namespace="acme", model=model, variant=variant) == expected


@pytest.mark.parametrize("template, namespace", [
    ("{org}/{model}-GGUF", "acme"),  # a variant template must name the variant
    ("{model}-{variant}-GGUF", "acme"),  # ... and the namespace
    ("{org}/{model}-{variant}-{size}", "acme"),  # unknown field
    (DEFAULT_VARIANT_TEMPLATE, "ac me"),  # not a valid repo id
])
def test_bad_variant_repo_name(template: str, namespace: str) -> None:
    with pytest.raises(ConfigError) as e:
        repo_name(template, namespace=namespace, model="M", variant="v")
    assert e.value.key == "target.variant_repo_template"


def _pub(rev: str = "a" * 40, tc: str = "b1", files: dict | None = None) -> dict:
    return {"source": {"repo": "acme/Tiny", "revision": rev}, "toolchain": tc,
            "files": files if files is not None else {"T-Q4_K_M.gguf": {"sha256": "1"}, "T-Q2_K.gguf": {"sha256": "2"}}}


@pytest.mark.parametrize("old, new, expected", [
    (None, _pub(), []),
    (_pub(), _pub(rev="c" * 40), [f"rebuilt from source commit {'c' * 12} (was {'a' * 12})"]),
    (_pub(), _pub(tc="llama.cpp b2"), ["requantized with llama.cpp b2 (was b1)"]),
    (_pub(), _pub(files={"T-Q4_K_M.gguf": {"sha256": "1"}}), ["removed T-Q2_K.gguf"]),
    (_pub(), _pub(files={"T-Q4_K_M.gguf": {"sha256": "1"}, "T-Q2_K.gguf": {"sha256": "2"}, "T-Q8_0.gguf": {"sha256": "3"}}),
     ["added T-Q8_0.gguf"]),
    (_pub(), _pub(files={"T-Q4_K_M.gguf": {"sha256": "9"}, "T-Q2_K.gguf": {"sha256": "2"}}), ["updated T-Q4_K_M.gguf"]),
    (_pub(), _pub(), ["model card updated"]),
])
def test_whats_new(old, new, expected) -> None:
    assert whats_new(old, new) == expected


def test_only_passed_files_are_published() -> None:
    ladder = Ladder.from_json({"schema_version": 1, "reference": {"path": "M-BF16.gguf"},
                               "files": [{"type": t, "path": f"M-{t}.gguf"} for t in ("Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K")]})
    report = Report.from_json({"schema_version": 1, "files": [
        {"type": "Q8_0", "status": "passed"}, {"type": "Q4_K_M", "status": "failed"},
        {"type": "Q3_K_M", "status": "skipped"}]})  # Q2_K: not in the report at all
    published = published_files(ladder, report)
    assert [f.type for f in published] == ["Q8_0"]
    assert published[0].file is ladder.file("Q8_0") and published[0].result is report.file("Q8_0")
