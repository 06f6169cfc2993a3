"""llama-imatrix's output as progress: parsed in ``converters.llama.calibrate``, shown by the CLI (``CliHooks``) and in
the bot's progress column (``JobHooks``)."""

from __future__ import annotations

import types

from bot.commands import CliHooks
from bot.state.memstore import MemoryStore
from bot.service.runner import JobHooks
from converters.llama.calibrate import ImatrixProgress
from converters.core.hooks import PROGRESS, START, Event, Recorder

# what the pinned llama-imatrix printed for 12 chunks of 128 tokens of the SmolLM2 fixture (-b 256), in the pieces
# converters.core.proc.run passes on: the header on stderr, then per pass of 2 chunks a flushed, unended piece
IMATRIX_OUTPUT = [
    "0.00.501.023 I compute_imatrix: computing over 12 chunks, n_ctx=128, batch_size=256, n_seq=2",
    "0.02.567.074 I compute_imatrix: 2.07 seconds per pass - ETA ",
    "0.20 minutes",
    "[1]27.8431,[2]28.2698,", "[3]21.7604,[4]21.8728,", "[5]23.1911,[6]21.6714,", "[7]20.8625,[8]20.6737,",
    "[9]21.0972,[10]21.1125,", "[11]23.8489,[12]21.5677,",
    "Final estimate: PPL = 21.5677 +/- 2.47451",
]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def parsed() -> list[Event]:
    rec, clock = Recorder(), Clock()
    parse = ImatrixProgress(rec, clock=clock)
    for line in IMATRIX_OUTPUT:
        parse(line)
        clock.t += 2.0  # one pass of two chunks every 2 s
    return rec.events


def test_llama_imatrix_output_becomes_chunk_events_with_an_eta() -> None:
    events = parsed()
    assert all(e.kind == PROGRESS and e.stage == "calibrate" and e.total == 12 for e in events)
    assert [e.done for e in events] == [0, 2, 4, 6, 8, 10, 12]
    assert [e.data["eta_seconds"] for e in events] == [None, 10.3, 16.0, 10.0, 6.0, 2.8, 0.0]
    assert events[2].describe() == "chunk 4/12, ETA 16 s"


def test_the_cli_prints_chunk_lines_a_few_seconds_apart_and_the_last(capsys) -> None:
    hooks = CliHooks(every=3600)
    for e in parsed():
        hooks.progress(e)
    assert capsys.readouterr().err.splitlines() == ["[calibrate] chunk 0/12", "[calibrate] chunk 12/12, ETA 0 s"]
    hooks = CliHooks(every=0)
    for e in parsed()[:3]:
        hooks.progress(e)
    assert capsys.readouterr().err.splitlines()[-1] == "[calibrate] chunk 4/12, ETA 16 s"


def test_the_bots_progress_column_shows_the_chunk_and_eta() -> None:
    store = MemoryStore()
    jid = store.enqueue("acme/Tiny-1B", "a" * 40, reason="test", now=1)
    job = store.claim("w1", now=2)
    runner = types.SimpleNamespace(store=store, worker_id="w1", clock=lambda: 3.0)
    hooks = JobHooks(runner, job)
    hooks.progress(Event("calibrate", START))
    for e in parsed()[:4]:
        hooks.progress(e)
    row = store.job(jid)
    assert (row.stage, row.progress) == ("calibrate", "chunk 6/12, ETA 10 s")
