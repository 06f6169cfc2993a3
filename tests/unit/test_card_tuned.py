"""The card's tuned rows: marked in the file table, explained, stock vs tuned KLD side by side."""

from __future__ import annotations

from pathlib import Path

from bot.publish import card, source_card
from converters.core.workdir import WorkDir
from tests.workdirs import make_workdir

SETTINGS = card.CardSettings(repo_id="team/Tiny-Instruct-GGUF", quantized_by="team", hub_url="http://hub.test")


def _card(tmp_path: Path, failed=()):
    wd = make_workdir(tmp_path, types=("Q8_0", "Q4_K_M", "Q4_K_M-tuned", "Q2_K"), failed=failed)
    ladder, report = WorkDir(wd).ladder(), WorkDir(wd).report()
    src = ladder.source
    facts = source_card.SourceFacts.from_checkpoint(Path(src.path), repo=src.repo, revision=src.revision)
    ctx = card.build_context(ladder, report, facts, SETTINGS)
    return ctx, card.render(ctx)


def test_published_tuned_file_is_marked_and_compared(tmp_path):
    ctx, text = _card(tmp_path)
    rows = {f["type"]: f for f in ctx["files"]}
    assert rows["Q4_K_M-tuned"]["tuned"] and not rows["Q4_K_M"]["tuned"]
    assert [t["stock"] for t in ctx["tuned"]] == ["Q4_K_M"]
    t = ctx["tuned"][0]
    assert t["stock_kld"] == rows["Q4_K_M"]["kld"] and t["kld"] == rows["Q4_K_M-tuned"]["kld"]
    assert "| Q4_K_M-tuned ✱ |" in text
    assert f"| Q4_K_M | {t['stock_size_h']} | {t['stock_kld']} | {t['size_h']} | {t['kld']} |" in text
    assert "✱ Tuned (`-tuned`)" in text


def test_withheld_tuned_file_gets_no_note(tmp_path):
    ctx, text = _card(tmp_path, failed=("Q4_K_M-tuned",))
    assert ctx["tuned"] == [] and "✱" not in text
    assert any(w["type"] == "Q4_K_M-tuned" for w in ctx["withheld"])
