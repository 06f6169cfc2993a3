"""The runner's claim and state transitions on the in-memory store, with an in-memory Hub (no database file).

A permanent error fails the job at once with its type and reason; a transient one (Hub 503, a timeout) puts it in
``retrying`` with the backoff of the settings, until its attempts run out; a stop request releases the job
without using up an attempt; a cancelled job is not run, and a job cancelled while it runs stays cancelled; the
bot's scheduler loop polls, dispatches and exits when idle. Nothing here gets past the fetch, so no llama.cpp
program is started.
"""

from __future__ import annotations

import json
import threading
import types
from pathlib import Path
from typing import Any

import pytest

from bot.model import jobstate as J
from bot.state.memstore import MemoryStore
from bot.service.runner import Runner
from bot.service.scheduler import Bot
from bot.model.settings import Settings, from_mapping
from converters.core.errors import HubError, HubNotFound
from tests.bot_fixtures import FakeHub

REPO = "acme/Tiny-1B"
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
TOOLCHAIN = types.SimpleNamespace(version="test toolchain", commit=None, cuda=False)  # never run here


def files() -> dict[str, Any]:
    return {"config.json": json.dumps(CONFIG), "model.safetensors": b"\0" * 64, "tokenizer.json": "{}"}


@pytest.fixture
def env(tmp_path: Path) -> tuple[Settings, MemoryStore, FakeHub]:
    texts = {}
    for kind in ("calibration", "evaluation"):  # local texts: nothing to fetch for them
        texts[f"{kind}_text"] = str(tmp_path / f"{kind}.txt")
        Path(texts[f"{kind}_text"]).write_text(f"{kind} text. " * 200)
    settings = from_mapping({"data_dir": str(tmp_path / "data"), "sources": [{"author": "acme"}],
                             "limits": {"max_model_gb": 1.0, "min_free_disk_gb": 0.0},
                             "schedule": {"retry_base_seconds": 60}, "quantize": texts},
                            env={}, free_disk=10**13)
    yield settings, MemoryStore(), FakeHub()
    assert not list(tmp_path.rglob("*.db"))  # the state never touched a database file


class Clock:
    """The runner's clock, set by the test (``now`` passed to ``run_one`` only times the claim)."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def runner(settings: Settings, store: MemoryStore, hub: Any, clock: Clock | None = None, **kw: Any) -> Runner:
    return Runner(settings, store, hub, worker_id="w1", toolchain=TOOLCHAIN, clock=clock or Clock(), **kw)


ERRORS = [
    # (name, what model_info raises or returns, status, error type, words in the message, retry delay)
    ("not found", HubNotFound("model_info acme/Tiny-1B: repository not found", status=404), J.Status.FAILED,
     "HubNotFound", "repository not found", None),
    ("hub 503", HubError("model_info acme/Tiny-1B: the Hub answered 503", status=503), J.Status.RETRYING,
     "HubError", "503", 60.0),
    ("timeout", HubError("model_info acme/Tiny-1B: timed out (ReadTimeout)", status=None), J.Status.RETRYING,
     "HubError", "timed out", 60.0),
    ("remote code", "auto_map", J.Status.FAILED, "UnsupportedModel", "needs remote code", None),
]


@pytest.mark.parametrize("name,error,status,etype,words,delay", ERRORS, ids=[e[0] for e in ERRORS])
def test_an_error_fails_or_retries_the_job(env, name: str, error: Any, status: J.Status, etype: str, words: str,
                                           delay: float | None) -> None:
    settings, store, hub = env
    if error == "auto_map":  # the fetch re-checks the safety rules on the exact revision
        sha = hub.commit(REPO, files(), config={**CONFIG, "auto_map": {"AutoModel": "m.M"}})
    else:
        sha = hub.commit(REPO, files())
        hub.errors["model_info"] = error
    jid = store.enqueue(REPO, sha, reason="test", now=1000)
    out = runner(settings, store, hub).run_one(now=1000)
    job = store.job(jid)
    assert out.job_id == jid and out.status == status == job.status
    assert job.error_type == etype and words in job.error_message and job.attempts == 1
    assert job.stage == "fetch" and job.worker_id == "w1"
    assert job.not_before == (None if delay is None else 1000 + delay)
    assert job.finished_at == (1000 if status == J.Status.FAILED else None)
    assert hub.requests("download_snapshot") == []  # nothing was downloaded
    kinds = [e["kind"] for e in store.events(job_id=jid)]
    assert kinds[0] == f"job.{status.value}" and kinds[-2:] == ["job.claimed", "job.queued"]


def test_a_retrying_job_waits_then_fails_when_its_attempts_run_out(env) -> None:
    settings, store, hub = env
    sha = hub.commit(REPO, files())
    hub.errors["model_info"] = HubError("model_info: the Hub answered 503", status=503)
    jid = store.enqueue(REPO, sha, reason="test", now=0, max_attempts=2)
    clock = Clock(0)
    r = runner(settings, store, hub, clock)
    assert r.run_one(now=0).status == J.Status.RETRYING
    assert r.run_one(now=59) is None  # still waiting for its backoff
    clock.t = 60
    out = r.run_one(now=60)
    job = store.job(jid)
    assert out.status == J.Status.FAILED == job.status and job.attempts == 2 and "503" in job.error_message
    assert store.counts() == {"failed": 1}


class StopDuringDownload(FakeHub):
    """A stop request (SIGTERM) arrives while the files are downloaded."""

    def __init__(self, stop: threading.Event):
        super().__init__()
        self.stop = stop

    def download_snapshot(self, *a: Any, **kw: Any) -> Path:
        res = super().download_snapshot(*a, **kw)
        self.stop.set()
        return res


def test_a_stop_request_releases_the_job_without_using_an_attempt(env) -> None:
    settings, store, _ = env
    stop = threading.Event()
    hub = StopDuringDownload(stop)
    sha = hub.commit(REPO, files())
    jid = store.enqueue(REPO, sha, reason="test", now=1)
    out = runner(settings, store, hub, stop=stop).run_one(now=2)
    job = store.job(jid)
    assert out.status == J.Status.QUEUED == job.status
    assert job.attempts == 0 and job.error_type is None and job.heartbeat_at is None
    assert (Path(job.workdir) / "source" / "model.safetensors").is_file()  # the finished fetch is kept
    assert runner(settings, store, hub, stop=stop).run_one(now=3) is None  # a stopped runner claims nothing


def test_a_cancelled_job_is_not_run(env) -> None:
    settings, store, hub = env
    sha = hub.commit(REPO, files())
    jid = store.enqueue(REPO, sha, reason="test", now=1)
    store.transition(jid, J.Status.CANCELLED, now=2, message="cancelled by the operator")
    assert runner(settings, store, hub).run_one(now=3) is None
    assert hub.calls == [] and store.job(jid).status == J.Status.CANCELLED and store.job(jid).attempts == 0


class CancelDuringLookup(FakeHub):
    """The operator cancels the job while the runner looks it up on the Hub."""

    def __init__(self, store: MemoryStore):
        super().__init__()
        self.store = store

    def model_info(self, repo_id: str, revision: str | None = None) -> Any:
        for job in self.store.jobs([J.Status.RUNNING]):
            self.store.transition(job.id, J.Status.CANCELLED, now=5, message="cancelled by the operator")
        return super().model_info(repo_id, revision)


def test_a_job_cancelled_while_it_runs_stays_cancelled(env) -> None:
    settings, store, _ = env
    hub = CancelDuringLookup(store)
    sha = hub.commit(REPO, files())
    jid = store.enqueue(REPO, sha, reason="test", now=1)
    out = runner(settings, store, hub).run_one(now=2)
    job = store.job(jid)
    assert out.status == J.Status.CANCELLED == job.status
    assert job.error_type is None and job.finished_at == 5


def test_recover_puts_back_the_jobs_of_silent_workers(env) -> None:
    settings, store, hub = env
    jid = store.enqueue(REPO, "a" * 40, reason="test", now=0)
    store.claim("elsewhere:1:abc", now=0)  # another host's worker, never heard of again
    r = runner(settings, store, hub)
    assert r.recover(now=settings.schedule.stale_after_seconds - 1) == []
    assert r.recover(now=settings.schedule.stale_after_seconds + 1) == [jid]
    job = store.job(jid)
    assert job.status == J.Status.QUEUED and job.attempts == 1 and job.heartbeat_at is None


@pytest.mark.parametrize("poll", [True, False])
def test_the_bot_runs_until_idle_on_the_memory_store(env, poll: bool) -> None:
    settings, store, hub = env
    jid = store.enqueue("acme/Gone-1B", "b" * 40, reason="test", now=1)  # the Hub no longer knows it
    bot = Bot(settings, store=store, hub=hub, toolchain=TOOLCHAIN, worker_id="h:1:a", resolve_namespace=False)
    assert bot.serve(exit_when_idle=True, poll=poll, install_signals=False) == 0
    job = store.job(jid)
    assert job.status == J.Status.FAILED and job.error_type == "HubNotFound"
    assert hub.requests("list_models") == (["acme"] if poll else [])
    assert bool(store.events(kind="poll.ok")) is poll
