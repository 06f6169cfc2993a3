"""The README and every command's ``--help`` agree: every flag the README shows for a command exists on it, and
every (not deprecated) flag of a command the README documents is shown in the README."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from bot.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"
COMMAND = re.compile(r"ggufbot ((?:[a-z]+)(?:\|[a-z]+)*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def flags(parser: argparse.ArgumentParser, *, hidden: bool) -> set[str]:
    """The long options of a command (and of its own subcommands); deprecated aliases only with ``hidden``."""
    out: set[str] = set()
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                out |= flags(sp, hidden=hidden)
        elif hidden or a.help != argparse.SUPPRESS:
            out |= {o for o in a.option_strings if o.startswith("--") and o != "--help"}
    return out


def blocks(text: str) -> list[str]:
    """Fenced code blocks whole; other text split at blank lines and list items."""
    out, fenced = [], re.split(r"(```.*?```)", text, flags=re.S)
    for part in fenced:
        if part.startswith("```"):
            out.append(part)
        else:
            out += [b for b in re.split(r"\n\s*\n|\n(?=- )", part) if b.strip()]
    return out


def readme_segments() -> list[tuple[list[str], str]]:
    """(commands, text) for every stretch of the README from a ``ggufbot CMD`` to the next one or the block's end."""
    out = []
    for block in blocks(README.read_text()):
        hits = list(COMMAND.finditer(block))
        for i, m in enumerate(hits):
            end = hits[i + 1].start() if i + 1 < len(hits) else len(block)
            out.append((m.group(1).split("|"), block[m.end():end]))
    return out


def test_every_flag_the_readme_shows_for_a_command_exists() -> None:
    cmds = commands()
    bad = []
    for names, text in readme_segments():
        known = [n for n in names if n in cmds]
        if not known:
            continue
        have = set().union(*(flags(cmds[n], hidden=True) for n in known))
        bad += [f"ggufbot {'|'.join(names)} {f}" for f in FLAG.findall(text) if f not in have]
    every = set().union(*(flags(p, hidden=True) for p in cmds.values())) | {"--verbose"}
    bad += [f"{f} (no command has it)" for f in FLAG.findall(README.read_text()) if f not in every]
    assert not bad, bad


def test_every_flag_of_a_documented_command_is_in_the_readme() -> None:
    cmds = commands()
    shown: dict[str, set[str]] = {}
    for names, text in readme_segments():
        for n in names:
            shown.setdefault(n, set()).update(FLAG.findall(text))
    missing = [f"ggufbot {n} {f}" for n in sorted(shown) if n in cmds
               for f in sorted(flags(cmds[n], hidden=False) - shown[n])]
    assert not missing, missing


@pytest.mark.parametrize("command,old,dest", [("convert", "--chunks", "calibration_chunks"),
                                              ("variant", "--chunks", "calibration_chunks"),
                                              ("evaluate", "--chunks", "eval_chunks")])
def test_old_spellings_still_work_with_a_warning(command, old, dest, capsys) -> None:
    first = {"convert": ["SRC", "--out", "DIR"], "variant": ["SRC"], "evaluate": ["DIR"]}[command]
    args = build_parser().parse_args([command, *first, old, "3"])
    assert getattr(args, dest) == 3
    assert f"warning: {old} is deprecated" in capsys.readouterr().err
    assert old not in commands()[command].format_help().replace(f"{old}-", "")
