"""Pure parts of publishing: repo names, the "What's new" line, which files are published."""

from __future__ import annotations

import pytest

from bot.card import published_files
from bot.publish import repo_name, whats_new
from converters.errors import ConfigError


@pytest.mark.parametrize("template, expected", [
    ("{org}/{model}-GGUF", "team/Tiny-GGUF"),
    ("{model}-GGUF", "team/Tiny-GGUF"),  # settings' form without the namespace
    ("{org}/{author}_{model}-GGUF", "team/acme_Tiny-GGUF"),
    ("other/{model}", "other/Tiny"),
])
def test_repo_name(template: str, expected: str) -> None:
    assert repo_name(template, org="team", model="Tiny", author="acme") == expected


@pytest.mark.parametrize("template", ["{org}/{nope}-GGUF", "{org}/{0}", "{org}/{model"])
def test_bad_repo_template(template: str) -> None:
    with pytest.raises(ConfigError):
        repo_name(template, org="team", model="Tiny")


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
    ladder = {"files": [{"type": t, "path": f"M-{t}.gguf"} for t in ("Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K")]}
    report = {"files": [{"type": "Q8_0", "status": "passed"}, {"type": "Q4_K_M", "status": "failed"},
                        {"type": "Q3_K_M", "status": "skipped"}]}  # Q2_K: not in the report at all
    assert [f["type"] for f in published_files(ladder, report)] == ["Q8_0"]
