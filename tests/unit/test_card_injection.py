"""Text from the source repo cannot break out of the bot's card: the chat example stays inside its code block,
table cells stay plain text, and only the Hub's known gating keys pass, with plain-text values. The card is
rendered as CommonMark (markdown-it-py, tables on) and the HTML is inspected."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from bot.publish import card, source_card
from bot.publish import markdown
from converters.core.report import Check
from converters.core.workdir import WorkDir
from tests.hubserver import _validate_front_matter
from tests.workdirs import make_workdir

EVIL = "https://evil.example/x"
# a template whose output closes any ``` fence, then adds a link, an image, raw HTML and a heading
HOSTILE_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}\n````\n"
                    "[click](" + EVIL + ") ![img](" + EVIL + ".png) <script>alert(1)</script>\n# Owned\n````")
SETTINGS = card.CardSettings(repo_id="team/Tiny-Instruct-GGUF", quantized_by="team", hub_url="http://hub.test")


def html_of(text: str) -> str:
    body = text.split("\n---\n", 1)[1]  # after the YAML front matter
    return MarkdownIt("commonmark").enable("table").render(body)


def build(tmp_path: Path, template: str | None, **facts) -> str:
    wd = make_workdir(tmp_path, chat_template=template)
    ladder, report = WorkDir(wd).ladder(), WorkDir(wd).report()
    src = ladder.source
    f = source_card.SourceFacts.from_checkpoint(Path(src.path), repo=src.repo, revision=src.revision, **facts)
    return card.render(card.build_context(ladder, report, f, SETTINGS))


def test_a_chat_example_cannot_close_its_fence_or_inject(tmp_path: Path) -> None:
    text = build(tmp_path, HOSTILE_TEMPLATE)
    html = html_of(text)
    assert "````\n[click]" in text  # the example is there, whole...
    assert "`````" in text  # ...inside a fence longer than its longest backtick run
    assert EVIL not in html.replace(f"({EVIL}", "").replace(f"({EVIL}.png", "")  # only as code text
    assert "<script>" not in html and "<img" not in html and "<h1>Owned" not in html
    assert 'href="' + EVIL not in html
    code = html.split("<pre><code>", 1)[1].split("</code></pre>", 1)[0]
    assert "[click](" + EVIL in code and "&lt;script&gt;" in code


def test_table_cells_and_sentences_from_the_source_are_plain_text(tmp_path: Path) -> None:
    wd = make_workdir(tmp_path, chat_template=None)
    ladder, report = WorkDir(wd).ladder(), WorkDir(wd).report()
    hostile = f"x | y\n[a]({EVIL}) <img src=x onerror=alert(1)> www.evil.example `code` *b* {EVIL} me@evil.example"
    report = report.__class__.from_json({**report.to_json(),
                                         "checks": {"chat_template": Check.fail(hostile).to_json()}})
    f = source_card.SourceFacts.from_checkpoint(Path(ladder.source.path), repo=ladder.source.repo)
    html = html_of(card.render(card.build_context(ladder, report, f, SETTINGS)))
    row = next(r for r in html.split("<tr>") if "<td>chat template</td>" in r).split("</tr>")[0]
    assert "<a " not in row and "<img" not in row and "<code>" not in row and "<em>" not in row
    assert row.count("<td>") == 3  # the pipe did not open a fourth cell
    assert "x | y" in row and "[a](https://evil.example/x)" in row and "&lt;img src=x" in row


def test_markdown_helpers() -> None:
    assert markdown.fence("a ``` b") == "````" and markdown.fence("plain") == "```"
    assert markdown.cell("a\nb | c") == "a b \\| c"
    assert "\\:" in markdown.cell("see https://x.example") and "www\\." in markdown.cell("www.x.example")


def test_only_known_gating_keys_pass_with_plain_text_values() -> None:
    data = {
        "license": "mit",
        "extra_gated_prompt": f"Agree to [the terms]({EVIL}) <b>now</b>",
        "extra_gated_heading": "Access",
        "extra_gated_button_content": ["not", "text"],
        "extra_gated_eu_disallowed": True,
        "extra_gated_injected": "<script>alert(1)</script>",
        "extra_gated_fields": {"Name": "text", "Country": "country", "Why": {"type": "select", "options": ["a", f"[b]({EVIL})"]},
                               "Evil": {"type": "iframe", "src": EVIL}, "Bad": 5},
    }
    got = source_card.gating_fields(data)
    assert set(got) == {"extra_gated_prompt", "extra_gated_heading", "extra_gated_eu_disallowed", "extra_gated_fields"}
    assert got["extra_gated_prompt"] == markdown.cell(data["extra_gated_prompt"])
    assert "<a " not in MarkdownIt("commonmark").render(got["extra_gated_prompt"])
    assert "<b>" not in MarkdownIt("commonmark").render(got["extra_gated_prompt"])
    assert got["extra_gated_fields"] == {"Name": "text", "Country": "country",
                                         "Why": {"type": "select", "options": ["a", markdown.cell(f"[b]({EVIL})")]}}


# --------------------------------------------------------------------------------------------------
# Card data copied from the source (issue 19): strings or lists of strings only, license_link only http(s)
# --------------------------------------------------------------------------------------------------
REV = "a" * 40
SOURCE_LICENSE = f"http://hub.test/acme/Tiny-Instruct/blob/{REV}/LICENSE"
COPIED = [
    # (source card data, the copied metadata expected; absent keys must be absent)
    ({"license": "apache-2.0", "language": "en", "pipeline_tag": "text-generation"},
     {"license": "apache-2.0", "language": "en", "pipeline_tag": "text-generation"}),
    ({"license": "other", "license_name": "tiny-license", "license_link": "https://acme.example/LICENSE",
      "language": ["en", "fr", "de"]},
     {"license": "other", "license_name": "tiny-license", "license_link": "https://acme.example/LICENSE",
      "language": ["en", "fr", "de"]}),
    ({"license": {"evil": "x"}}, {}),
    ({"license": 5, "language": 7, "pipeline_tag": ["text-generation"]}, {}),  # the Hub wants one pipeline_tag
    ({"language": ["en", {"x": 1}, ["fr"], 3, "de"]}, {"language": ["en", "de"]}),
    ({"language": [[["en"]]]}, {}),
    ({"license_name": ["tiny", "license"]}, {"license_name": ["tiny", "license"]}),
    ({"license_name": {"a": "b"}}, {}),
    ({"license_link": "javascript:alert(1)"}, {}),
    ({"license_link": "JavaScript:alert(1)"}, {}),
    ({"license_link": "data:text/html,<script>alert(1)</script>"}, {}),
    ({"license_link": "file:///etc/passwd"}, {}),
    ({"license_link": "file://host/etc/passwd"}, {}),
    ({"license_link": "javascript://acme.example/%0Aalert(1)"}, {}),  # a scheme with a host is still no web address
    ({"license_link": "ftp://acme.example/LICENSE"}, {}),
    ({"license_link": "//evil.example/x"}, {}),
    ({"license_link": "https://"}, {}),
    ({"license_link": "https://acme.example/a b"}, {}),
    ({"license_link": ["https://acme.example/LICENSE"]}, {}),
    ({"license_link": "http://acme.example/LICENSE"}, {"license_link": "http://acme.example/LICENSE"}),
    # a link relative to the source repo points at that repo's file at the converted revision (ours has none)
    ({"license_link": "LICENSE"}, {"license_link": SOURCE_LICENSE}),
    ({"license_link": "./LICENSE"}, {"license_link": SOURCE_LICENSE}),
    ({"license_link": "../../other/repo/LICENSE"}, {}),
    ({"license_link": "/etc/passwd"}, {}),
]
COPIED_KEYS = ("license", "license_name", "license_link", "language", "pipeline_tag")


@pytest.mark.parametrize(("data", "expected"), COPIED)
def test_card_data_from_the_source_is_text_or_lists_of_text(tmp_path: Path, data: dict, expected: dict,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    wd = make_workdir(tmp_path, chat_template=None)
    ladder, report = WorkDir(wd).ladder(), WorkDir(wd).report()
    ladder = dataclasses.replace(ladder, source=dataclasses.replace(ladder.source, license=None))
    facts = source_card.SourceFacts.from_checkpoint(Path(ladder.source.path), repo=ladder.source.repo,
                                             revision=ladder.source.revision, card_data=data)
    with caplog.at_level(logging.INFO, logger="bot.publish"):
        ctx = card.build_context(ladder, report, facts, SETTINGS)
    assert {k: v for k, v in ctx["metadata"].items() if k in COPIED_KEYS} == expected
    dropped = sorted(k for k in data if k not in expected or (isinstance(data[k], list) and expected[k] != data[k]))
    for k in dropped:  # each value or list item left out is said in the log, naming its key
        assert any(k in r.getMessage() for r in caplog.records), (k, caplog.text)
    if not dropped:
        assert not caplog.records
    assert not _validate_front_matter(card.render(ctx))


def test_a_hub_license_fallback_is_text_too(tmp_path: Path) -> None:
    wd = make_workdir(tmp_path, chat_template=None)
    ladder, report = WorkDir(wd).ladder(), WorkDir(wd).report()
    ladder = dataclasses.replace(ladder, source=dataclasses.replace(ladder.source, license=None))
    facts = source_card.SourceFacts(repo="acme/Tiny-Instruct", card_data={"license": ["mit", {"x": 1}]},
                             license={"evil": 1}, pipeline_tag={"evil": 1})  # type: ignore[arg-type]
    meta = card.build_context(ladder, report, facts, SETTINGS)["metadata"]
    assert meta["license"] == ["mit"] and "pipeline_tag" not in meta
