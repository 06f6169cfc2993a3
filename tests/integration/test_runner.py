"""The runner's error paths and the bot's CLI commands, without llama.cpp: real store, real Hub client, local server.

Transient Hub errors put a job in ``retrying`` with a backoff; permanent ones fail it at once with the reason; the
fetch re-checks the safety rules; a stop request releases the job without losing an attempt or the finished fetch.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from bot import cli
from bot.model import jobstate as J
from bot.hub.client import Hub
from bot.service.runner import Runner
from bot.model.settings import from_mapping
from bot.state.store import Store
from tests.bot_fixtures import SMALL_CONFIG, populate
from tests.hub_fixtures import TEST_TOKEN

AUTHOR = "acme"


@pytest.fixture
def env(hub_server, tmp_path: Path):
    settings = from_mapping({"data_dir": str(tmp_path / "data"), "sources": [{"author": AUTHOR}],
                             "limits": {"max_model_gb": 1.0, "min_free_disk_gb": 0.0},
                             "schedule": {"retry_base_seconds": 60}},
                            env={"HF_TOKEN": TEST_TOKEN}, free_disk=10**13)
    store = Store(settings.database_url)
    hub = Hub(token=TEST_TOKEN, endpoint=hub_server.url, sleep=lambda s: None)
    return settings, store, hub, hub_server


def files() -> dict[str, str | bytes]:
    return {"config.json": json.dumps(SMALL_CONFIG), "model.safetensors": b"\0" * 1024, "tokenizer.json": "{}"}


def test_transient_error_retries_with_backoff_then_permanent_fails(env) -> None:
    settings, store, hub, server = env
    sha = server.add_model(f"{AUTHOR}/M-1B", files(), pipeline_tag="text-generation")
    jid = store.enqueue(f"{AUTHOR}/M-1B", sha, reason="test", now=1000)
    runner = Runner(settings, store, hub, worker_id="w1")
    server.fail_next(None, status=503, path_prefix=f"/api/models/{AUTHOR}/M-1B")
    out = runner.run_one(now=1000)
    server.clear_faults()
    job = store.job(jid)
    assert out.status == J.Status.RETRYING == job.status
    assert job.error_type == "HubError" and "503" in job.error_message and job.stage == "fetch"
    assert job.not_before >= 1000 + 60 - 1  # backoff from the settings
    assert runner.run_one(now=1010) is None  # still waiting
    # the repo disappears: a permanent error fails the job at once, with the reason
    server.repos.pop(("model", f"{AUTHOR}/M-1B"))
    out = runner.run_one(now=job.not_before + 1)
    job = store.job(jid)
    assert out.status == J.Status.FAILED == job.status and job.attempts == 2
    assert job.error_type == "HubNotFound" and "not found" in job.error_message


def test_fetch_rechecks_the_safety_rules(env) -> None:
    settings, store, hub, server = env
    populate(server, AUTHOR, "Good-1B", files())
    runner = Runner(settings, store, hub, worker_id="w1")
    for name, words in (("Remote-1B", "remote code"), ("Escape-1B", "escape"), ("Pickle-1B", "pickle")):
        jid = store.enqueue(f"{AUTHOR}/{name}", server.head(f"{AUTHOR}/{name}"), reason="forced", now=1)
        out = runner.run_one(now=2)
        job = store.job(jid)
        assert out.status == J.Status.FAILED and job.error_type == "UnsupportedModel" and words in job.error_message
    assert not any("/resolve/" in p for _, p in server.requests)  # nothing was downloaded


class StopAfterDownload:
    """The real Hub adapter, with a stop request arriving while the download runs (like a SIGTERM)."""

    def __init__(self, hub: Hub, stop: threading.Event):
        self.hub, self.stop = hub, stop

    def __getattr__(self, name):
        return getattr(self.hub, name)

    def download_snapshot(self, *a, **kw):
        res = self.hub.download_snapshot(*a, **kw)
        self.stop.set()
        return res


def test_stop_request_releases_the_job_and_keeps_the_fetch(env) -> None:
    settings, store, hub, server = env
    sha = server.add_model(f"{AUTHOR}/M-1B", files(), pipeline_tag="text-generation")
    jid = store.enqueue(f"{AUTHOR}/M-1B", sha, reason="test", now=1)
    stop = threading.Event()
    runner = Runner(settings, store, StopAfterDownload(hub, stop), worker_id="w1", stop=stop)
    out = runner.run_one(now=2)
    job = store.job(jid)
    assert out.status == J.Status.QUEUED == job.status
    assert job.attempts == 0 and job.stage == "fetch"  # the stop did not use up an attempt
    assert (Path(job.workdir) / "records" / "fetch.json").exists()
    server.clear_log()
    stop.clear()
    runner2 = Runner(settings, store, hub, worker_id="w2")
    runner2.run_one(now=3)  # resumes: the fetch is not repeated (it then fails on the fake weights)
    assert not any("/resolve/" in p for _, p in server.requests)
    job = store.job(jid)
    assert job.worker_id == "w2" and job.stage == "inspect" and job.status == J.Status.FAILED


def run_cli(capsys, config: Path, *args: str) -> tuple[int, str]:
    code = cli.main([*args[:1], "--config", str(config), *args[1:]])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def test_cli_commands(env, tmp_path: Path, capsys) -> None:
    settings, store, hub, server = env
    expected = populate(server, AUTHOR, "Good-1B", files())
    config = tmp_path / "c.toml"
    config.write_text(f'data_dir = "{settings.data_dir}"\n[[sources]]\nauthor = "{AUTHOR}"\n'
                      '[limits]\nmax_model_gb = 1.0\n')
    code, out = run_cli(capsys, config, "watch", "--once")
    assert code == 0 and "1 queued" in out and f"{AUTHOR}/Good-1B" in out
    code, out = run_cli(capsys, config, "status", "--json")
    data = json.loads(out)
    assert [j["repo"] for j in data["queue"]] == [f"{AUTHOR}/Good-1B"]
    assert {s["repo"]: s["code"] for s in data["skipped"]} == expected
    jid = data["queue"][0]["id"]
    code, out = run_cli(capsys, config, "status")
    assert code == 0 and "queue:" in out and "pickle_only" in out
    # enqueue refuses what the rules refuse, with the reason
    code, out = run_cli(capsys, config, "enqueue", f"{AUTHOR}/Remote-1B")
    assert code == 1 and "not queued" in out and "remote code" in out
    code, out = run_cli(capsys, config, "enqueue", f"{AUTHOR}/Good-1B")
    assert code == 1 and "already has a job" in out  # already queued at this commit
    # cancel, retry
    assert run_cli(capsys, config, "cancel", str(jid))[0] == 0
    assert store.job(jid).status == J.Status.CANCELLED
    assert run_cli(capsys, config, "cancel", str(jid))[0] == 1  # cancelled -> cancelled is illegal
    assert run_cli(capsys, config, "retry", str(jid))[0] == 0
    assert store.job(jid).status == J.Status.QUEUED and store.job(jid).attempts == 0
    # skip cancels queued jobs and keeps the repo out of later polls; unskip lets the next poll decide again
    code, out = run_cli(capsys, config, "skip", f"{AUTHOR}/Good-1B", "--reason", "not wanted")
    assert code == 0 and f"cancelled job(s) {jid}" in out
    assert store.model(f"{AUTHOR}/Good-1B").manual_skip
    sha2 = server.add_commit(f"{AUTHOR}/Good-1B", {"tokenizer.json": '{"v": 2}'})
    run_cli(capsys, config, "watch", "--once")
    assert len(store.jobs()) == 1 and store.model(f"{AUTHOR}/Good-1B").reason == "not wanted"
    assert run_cli(capsys, config, "unskip", f"{AUTHOR}/Good-1B")[0] == 0
    code, out = run_cli(capsys, config, "watch", "--once")
    assert "1 queued" in out
    assert store.jobs()[-1].revision == sha2
    # a manual enqueue names a revision; a commit that already had a job is refused
    first_sha = store.job(jid).revision
    code, out = run_cli(capsys, config, "enqueue", f"{AUTHOR}/Good-1B@{first_sha}")
    assert code == 1 and "already has a job" in out
    code, out = run_cli(capsys, config, "enqueue", "not-a-repo")
    assert code == 1 and "OWNER/NAME" in out


def test_toolchain_change_requeues_published_models(env) -> None:
    settings, store, hub, server = env
    from bot.service.watcher import Watcher

    jid = store.enqueue(f"{AUTHOR}/M-1B", "a" * 40, reason="new release", now=1, fingerprint={"x": "1"})
    store.claim("w", now=2)
    store.transition(jid, J.Status.PUBLISHED, now=3, worker_id="w", toolchain_version="llama.cpp b1")
    off = Watcher(settings, store, hub, toolchain_version="llama.cpp b2")
    assert off.requeue_for_toolchain(now=4) == []  # the setting is off by default
    on_settings = from_mapping({"data_dir": str(settings.data_dir), "requeue": {"on_toolchain_change": True}},
                               env={}, free_disk=10**13)
    on = Watcher(on_settings, store, hub, toolchain_version="llama.cpp b2")
    [new] = on.requeue_for_toolchain(now=5)
    job = store.job(new)
    assert (job.repo, job.revision, job.status) == (f"{AUTHOR}/M-1B", "a" * 40, J.Status.QUEUED)
    assert "llama.cpp b1 -> llama.cpp b2" in job.reason
    assert on.requeue_for_toolchain(now=6) == []  # once per toolchain version
    same = Watcher(on_settings, store, hub, toolchain_version="llama.cpp b1")
    assert same.requeue_for_toolchain(now=7) == []


def test_bot_duties_take_now_and_say_when_nothing_is_published(env, tmp_path: Path) -> None:
    settings, store, hub, server = env
    from bot.service.scheduler import Bot

    no_token = from_mapping({"data_dir": str(settings.data_dir), "sources": [{"author": AUTHOR}]}, env={},
                            free_disk=10**13)
    bot = Bot(no_token, store=store, hub=Hub(token=None, endpoint=server.url, sleep=lambda s: None),
              toolchain=None, worker_id="h:1:a")
    assert "NOT published" in bot.publish_note
    assert Bot(settings, store=store, hub=hub, worker_id="h:1:b").publish_note.startswith("publishing to tester/")
    # housekeeping at a given time recovers a job whose heartbeat is older than stale_after_seconds
    jid = store.enqueue(f"{AUTHOR}/M-1B", "b" * 40, reason="r", now=0)
    store.claim("gone:1:x", now=100)
    assert bot.housekeeping(now=100 + settings.schedule.stale_after_seconds - 1)["recovered"] == []
    assert bot.housekeeping(now=100 + settings.schedule.stale_after_seconds + 1)["recovered"] == [jid]
    assert store.job(jid).status == J.Status.QUEUED
    assert not bot.queue_empty(now=1000) and not bot.busy()
