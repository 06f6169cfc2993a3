"""The card names every withheld file with its reason, says when the conversion was not checked, shows notes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bot.publish import card, source_card
from converters.core.report import Check
from converters.core.workdir import WorkDir
from tests.workdirs import make_workdir

SETTINGS = card.CardSettings(repo_id="team/Tiny-Instruct-GGUF", quantized_by="team", hub_url="http://hub.test")


def _render(wd: Path, report=None) -> tuple[dict, str]:
    ladder = WorkDir(wd).ladder()
    report = report or WorkDir(wd).report()
    facts = source_card.SourceFacts.from_checkpoint(Path(ladder.source.path), repo=ladder.source.repo)
    ctx = card.build_context(ladder, report, facts, SETTINGS)
    return ctx, card.render(ctx)


def test_withheld_files_are_named_with_their_reasons(tmp_path: Path) -> None:
    wd = make_workdir(tmp_path, types=("Q8_0", "Q4_K_M", "Q2_K"), failed=("Q4_K_M", "Q2_K"))
    report = WorkDir(wd).report()
    reason = ("far above the ladder's curve: mean KLD 0.3903 ± 0.0560 is 7.7× the 0.0506 that its neighbours "
              "(Q5_K_M, Q3_K_M) give 4.89 bits per weight")
    report.file("Q4_K_M").reasons = [reason]
    ctx, text = _render(wd, report)
    assert [w["type"] for w in ctx["withheld"]] == ["Q4_K_M", "Q2_K"]
    assert [f["type"] for f in ctx["files"]] == ["Q8_0"]
    assert "Withheld: 2 files of the ladder were made but not published" in text
    assert "| Q4_K_M | Tiny-Instruct-Q4_K_M.gguf | far above the ladder's curve: mean KLD 0.3903" in text
    assert "| Q2_K | Tiny-Instruct-Q2_K.gguf | mean KLD above the gate |" in text


def test_no_withheld_section_when_everything_passed(tmp_path: Path) -> None:
    ctx, text = _render(make_workdir(tmp_path))
    assert ctx["withheld"] == [] and "Withheld" not in text
    assert ctx["source_unchecked"] is None and "Not checked" not in text


def test_an_unchecked_conversion_says_not_checked(tmp_path: Path) -> None:
    wd = make_workdir(tmp_path)
    report = WorkDir(wd).report()
    report.checks["bf16_vs_source"] = Check.skip("not checked: transformers cannot load the source model (KeyError)")
    ctx, text = _render(wd, report)
    assert ctx["source_unchecked"].startswith("not checked: transformers cannot load")
    assert "**Not checked** against the source model: the BF16 conversion could not be compared" in text
    assert "| bf16 vs source | not checked | not checked: transformers cannot load" in text


def test_notes_are_shown_and_inert(tmp_path: Path) -> None:
    wd = make_workdir(tmp_path)
    report = dataclasses.replace(WorkDir(wd).report(), notes=["order inversion: Q6_K [x](http://evil) <b>"])
    _, text = _render(wd, report)
    assert "Notes (nothing failed):" in text
    assert "- order inversion: Q6\\_K \\[x\\]\\(http\\:" in text and "<b>" not in text


def test_require_source_check_reaches_the_evaluation(tmp_path: Path) -> None:
    from bot.jobs.job import JobSpec
    from bot.model.settings import load
    from converters.llama.calibrate import TextFile

    text = tmp_path / "eval.txt"
    text.write_text("some text\n")
    config = tmp_path / "ggufbot.toml"
    for toml, env, want in (("", {}, True), ("[quantize]\nrequire_source_check = false\n", {}, False),
                            ("", {"GGUFBOT_QUANTIZE__REQUIRE_SOURCE_CHECK": "false"}, False)):
        config.write_text(f"data_dir = {str(tmp_path / 'data')!r}\n[limits]\nmax_model_gb = 10\n" + toml)
        s = load(config, env=env)
        assert s.quantize.require_source_check is want
        spec = JobSpec.from_settings(s, "acme/Tiny", "a" * 40, calibration=None, evaluation=TextFile.of(text))
        assert spec.evaluation is not None and spec.evaluation.require_source_check is want
