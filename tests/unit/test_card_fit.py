"""The card's "Which file fits your GPU" table and a fit file's plan published beside it."""

from __future__ import annotations

import json
from pathlib import Path

from bot.publish import card, source_card
from converters.core import artifacts, names
from converters.core.workdir import WorkDir
from tests.workdirs import make_workdir

SETTINGS = card.CardSettings(repo_id="team/Tiny-Instruct-GGUF", quantized_by="team", hub_url="http://hub.test")
FIT = "fit-300MB-4k"


def _workdir(tmp_path: Path, failed=()) -> Path:
    wd = make_workdir(tmp_path, types=("Q8_0", "Q4_K_M", FIT, "Q2_K"), failed=failed)
    lad = json.loads((wd / names.LADDER).read_text())
    plan = names.fit_layout("Tiny-Instruct", "300MB-4k")
    (wd / plan).write_text("{}")
    info = {"budget": "300MB@4k", "budget_bytes": 300_000_000, "ctx": 4096, "type": FIT, "baseline": "Q4_K_M",
            "baseline_memory": {"total": 281_000_000}, "memory": {"total": 296_500_000}, "max_ctx": 4352,
            "status": "built", "layout": plan}
    lad["fit"] = {"budgets": {"300MB-4k": info}}  # ladder.json keeps the fit stage's summary at the top level
    for f in lad["files"]:
        if f["type"] == FIT:
            f["companions"] = [plan]
    (wd / names.LADDER).write_text(json.dumps(lad))
    return wd


def _card(wd: Path):
    ladder, report = WorkDir(wd).ladder(), WorkDir(wd).report()
    src = ladder.source
    facts = source_card.SourceFacts.from_checkpoint(Path(src.path), repo=src.repo, revision=src.revision)
    ctx = card.build_context(ladder, report, facts, SETTINGS)
    return ladder, report, ctx, card.render(ctx)


def test_fit_table_lists_the_baseline_and_the_fit_file(tmp_path: Path) -> None:
    ladder, report, ctx, text = _card(_workdir(tmp_path))
    assert [(r["type"], r["memory"], r["max_ctx"]) for r in ctx["fit"]] == [
        ("Q4_K_M", "281.0 MB", "—"), (FIT, "296.5 MB", "4,352")]
    assert "### Which file fits your GPU" in text
    assert f"| 300MB@4k | 4,096 | Tiny-Instruct-{FIT}.gguf | {ctx['fit'][1]['kld']} | 296.5 MB | 4,352 |" in text
    published = [rel for _, rel in artifacts.published_files(ladder, report, lambda rel: True)]
    assert names.fit_layout("Tiny-Instruct", "300MB-4k") in published
    assert artifacts.stale_in_repo("Old-fit-8GB-8k.layout.json")


def test_withheld_fit_file_leaves_only_the_baseline(tmp_path: Path) -> None:
    ladder, report, ctx, text = _card(_workdir(tmp_path, failed=(FIT,)))
    assert [r["type"] for r in ctx["fit"]] == ["Q4_K_M"]
    published = [rel for _, rel in artifacts.published_files(ladder, report, lambda rel: True)]
    assert not any(rel.endswith(".layout.json") for rel in published)


def test_no_budgets_no_table(tmp_path: Path) -> None:
    wd = make_workdir(tmp_path)
    *_, ctx, text = _card(wd)
    assert ctx["fit"] == [] and "Which file fits your GPU" not in text


def test_a_tuned_files_plan_is_published_beside_it_only_when_it_passes(tmp_path: Path) -> None:
    tuned = names.tuned_type("Q4_K_M")
    for failed in ((), (tuned,)):
        wd = make_workdir(tmp_path / f"failed-{len(failed)}", types=("Q8_0", "Q4_K_M", tuned), failed=failed)
        lad = json.loads((wd / names.LADDER).read_text())
        plan = names.tuned_layout("Tiny-Instruct", "Q4_K_M")
        assert plan == "Tiny-Instruct-Q4_K_M-tuned.layout.json"
        (wd / plan).write_text("{}")
        for f in lad["files"]:
            if f["type"] == tuned:
                f["companions"] = [plan]
        (wd / names.LADDER).write_text(json.dumps(lad))
        ladder, report = WorkDir(wd).ladder(), WorkDir(wd).report()
        published = [rel for _, rel in artifacts.published_files(ladder, report, lambda rel: True)]
        assert (plan in published) == (not failed), published
        assert plan in WorkDir(wd).content(ladder)  # hashed like every file of the ladder
    assert artifacts.stale_in_repo("Old-Q3_K_M-tuned.layout.json")
