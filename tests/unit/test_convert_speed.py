"""``ggufbot convert --speed``: llama-bench runs for what the scope holds, as the bot's ``[evaluate] speed``."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.cli import build_parser
from bot.commands.core import convert_spec
from bot.jobs.job import Source


def _spec(tmp_path: Path, *flags: str):
    text = tmp_path / "eval.txt"
    text.write_text("some evaluation text\n")
    args = build_parser().parse_args(["convert", "acme/Tiny", "--out", str(tmp_path / "out"), "--no-imatrix",
                                      "--eval-text", str(text), *flags])
    return convert_spec(args, Source(repo="acme/Tiny"), "Tiny")


@pytest.mark.parametrize("flags, scope", [
    ((), None),  # stock files only: nothing in the default scope, no speed run (a plain convert as before)
    (("--tune", "Q4_K_M"), "tuned"),
    (("--fit", "16GB@32k"), "tuned"),
    (("--speed", "all"), "all"),
    (("--tune", "Q4_K_M", "--speed", "off"), None),
    (("--ladder", "Q8_0", "--tune", "default"), None),  # no default size point in this ladder: nothing tuned
])
def test_speed_options_follow_the_flag_and_what_is_tuned(tmp_path: Path, flags, scope) -> None:
    speed = _spec(tmp_path, *flags).evaluation.speed
    assert (speed.scope if speed is not None else None) == scope


def test_an_unknown_scope_is_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        _spec(tmp_path, "--speed", "fast")
    assert "invalid choice" in capsys.readouterr().err


def test_tune_confirm_reaches_the_ladder_options(tmp_path: Path) -> None:
    assert _spec(tmp_path, "--tune", "Q4_K_M").ladder.tune_confirm is False  # the cheap mode by default
    assert _spec(tmp_path, "--tune", "Q4_K_M", "--tune-no-confirm").ladder.tune_confirm is False
    assert _spec(tmp_path, "--tune", "Q4_K_M", "--tune-confirm").ladder.tune_confirm is True


def test_tune_default_is_the_default_points_of_the_ladder(tmp_path: Path) -> None:
    assert _spec(tmp_path, "--tune", "default").ladder.tune == ("Q4_K_M", "Q3_K_M", "Q2_K")
    assert _spec(tmp_path, "--ladder", "Q8_0,Q2_K", "--tune", "default").ladder.tune == ("Q2_K",)
    assert _spec(tmp_path, "--ladder", "Q8_0", "--tune", "default").ladder.tune == ()
    assert _spec(tmp_path).ladder.tune == ()  # convert tunes only when asked
