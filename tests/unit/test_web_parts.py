"""The pure parts of the maintainer's view: ``[web]`` settings, the webhook payload and source matching, the
running job's progress and ETA, and the command line's progress bars on a terminal."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from bot.model import jobstate as J
from bot.model import settings as settings_mod
from bot.commands import CLI_HOOKS, TtyHooks, cli_hooks
from bot.service.status import running_view
from bot.web.webhooks import HubEvent, watching_source
from converters.core.errors import ConfigError, InputError
from converters.core.hooks import END, PROGRESS, START, Event
from tests.bot_fixtures import model_record


def load(**web) -> settings_mod.Settings:
    return settings_mod.from_mapping({"web": web}, env={}, free_disk=10**12)


def test_web_settings() -> None:
    assert load().web.listen == ""  # off unless set
    assert load(listen="127.0.0.1:8080").web.listen == "127.0.0.1:8080"
    assert settings_mod.parse_listen("[::1]:9000") == ("::1", 9000)
    for bad in ("8080", "host:", "host:99999", ":80"):
        with pytest.raises(ConfigError, match="web.listen"):
            load(listen=bad)
    with pytest.raises(ConfigError, match="web.port"):
        load(port=1)


def test_webhook_payload() -> None:
    ev = HubEvent.from_json({"event": {"action": "update", "scope": "repo.content"},
                             "repo": {"type": "model", "name": "acme/M", "headSha": "a" * 40},
                             "updatedRefs": [{"ref": "refs/heads/main", "newSha": "a" * 40}], "webhook": {"id": "x"}})
    assert (ev.scope, ev.repo, ev.head_sha, ev.updated_refs) == ("repo.content", "acme/M", "a" * 40,
                                                               ("refs/heads/main",))
    for bad in ([], {"event": {}}, {"event": {"scope": 3}, "repo": {}}, {"event": {"scope": "x"}, "repo": {},
                                                                         "updatedRefs": "main"}):
        with pytest.raises(InputError):
            HubEvent.from_json(bad)


def test_watching_source() -> None:
    s = settings_mod.from_mapping({"sources": [{"author": "acme"}, {"search": "Llama", "filters": ["safetensors"]}]},
                                  env={}, free_disk=10**12)
    assert watching_source(s, model_record(id="acme/M")) is s.sources[0]
    assert watching_source(s, model_record(id="other/Llama-3")) is s.sources[1]
    assert watching_source(s, model_record(id="other/Llama-3", tags=("gguf",))) is None
    assert watching_source(s, model_record(id="acme/M", pipeline_tag="text-to-image")) is None


def job(stage: str, progress: str | None, started: float) -> SimpleNamespace:
    return SimpleNamespace(id=1, repo="a/b", revision="c" * 40, status=J.Status.RUNNING, stage=stage,
                           progress=progress, attempts=1, max_attempts=4, reason="new release", error_type=None,
                           error_message=None, worker_id="w", heartbeat_at=started, not_before=None,
                           target_repo=None, created_at=started, started_at=started, finished_at=None, result=None)


# the stages a full ladder job records when it starts (bot.service.runner.JobHooks.planned)
FULL_LADDER = ("fetch", "inspect", "convert", "calibrate", "quantize", "evaluate", "publish", "cleanup")


def test_running_view_eta() -> None:
    timings = {"convert": 50.0, "calibrate": 100.0, "quantize": 200.0, "evaluate": 400.0}
    # 60 s into quantize at 1 of 4: 180 s left, then evaluate's 400 s
    v = running_view(job("quantize", "Q8_0 1/4", 0.0), timings, {1: 940.0}, now=1000.0, stages=FULL_LADDER)
    assert (v.stage_index, v.stage_count, v.step, v.eta_s) == (5, 8, (1, 4), 580.0)
    assert v.percent == pytest.approx(100 * 4.25 / 8, abs=0.1)
    # no step yet: what is left of the stage's usual time
    v = running_view(job("calibrate", None, 0.0), timings, {1: 970.0}, now=1000.0, stages=FULL_LADDER)
    assert v.eta_s == 70.0 + 200.0 + 400.0
    # nothing to go by
    assert running_view(job("convert", None, 0.0), {}, {}, now=10.0, stages=FULL_LADDER).eta_s is None


def test_progress_bars_on_a_terminal_and_lines_otherwise(capsys) -> None:
    out = io.StringIO()
    with TtyHooks(console=Console(file=out, force_terminal=True, width=100)) as hooks:
        hooks.progress(Event("quantize", START, data={"quiet": False}))
        hooks.progress(Event("quantize", PROGRESS, done=2, total=4, text="Q4_K_M", data={"type": "Q4_K_M"}))
        hooks.progress(Event("quantize", END, data={"seconds": 3.0}))
    text = out.getvalue()
    assert "quantize" in text and "4/4" in text and "━" in text and "done in 3.0 s" in text
    assert capsys.readouterr().err == ""  # the bars replace the lines
    assert cli_hooks(io.StringIO()) is CLI_HOOKS
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    assert isinstance(cli_hooks(tty), TtyHooks)
