"""A job whose program hangs without a word is stuck: the heartbeat sees its progress stand still, its program's
process group is killed, it is retried as transient, then failed; the queue goes on with the next job at
``concurrency = 1``. A cancelled job's program is killed within seconds. The hanging program stands in for a
hostile converter (the tiny llama checkpoint is real, fetched from the test Hub through the real client)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from bot.model import jobstate as J
from bot.hub.client import Hub
from bot.service.runner import Runner
from bot.model.settings import from_mapping
from bot.state.store import Store
from converters.llama.toolchain import Toolchain
from tests.bot_fixtures import checkpoint_files
from tests.hub_fixtures import TEST_TOKEN
from tests.models import tiny_random_checkpoint
from tests.procs import gone

def hang(pidfile: Path) -> str:
    """A converter that writes its pid to ``pidfile`` (named in its text: a child gets no test variable), prints
    nothing and never ends."""
    return f"import os, time\nopen({str(pidfile)!r}, 'a').write(f'{{os.getpid()}}\\n')\ntime.sleep(600)\n"


@pytest.fixture
def world(hub_server, tmp_path: Path, monkeypatch, calibration_text, eval_text):
    root = tmp_path / "llama.cpp"
    root.mkdir()
    pidfile = tmp_path / "pids"
    (root / "convert_hf_to_gguf.py").write_text(hang(pidfile))  # prints nothing, never ends
    tc = Toolchain(root=root, bin_dir=root, version="hang", commit=None, cuda=False, origin="test")
    settings = from_mapping({"data_dir": str(tmp_path / "data"), "sources": [{"author": "acme"}],
                             "target": {"publish": False},
                             "quantize": {"ladder": "Q8_0", "calibration_text": str(calibration_text),
                                          "evaluation_text": str(eval_text)},
                             "limits": {"max_model_gb": 5.0, "min_free_disk_gb": 0.0, "max_attempts": 2},
                             "schedule": {"heartbeat_seconds": 0.5, "stale_after_seconds": 30,
                                          "stuck_after_seconds": 3, "retry_base_seconds": 1,
                                          "retry_max_seconds": 1}},
                            env={"HF_TOKEN": TEST_TOKEN}, free_disk=10**13)
    store = Store(settings.database_url)
    files = checkpoint_files(tiny_random_checkpoint("llama"))
    for name in ("Hostile-1B", "Next-1B"):
        hub_server.add_model(f"acme/{name}", files, pipeline_tag="text-generation")
    hub = Hub(token=TEST_TOKEN, endpoint=hub_server.url, sleep=lambda s: None)
    runner = Runner(settings, store, hub, worker_id="w1", toolchain=tc)
    return runner, store, hub_server, pidfile


def pids(pidfile: Path) -> list[int]:
    return [int(x) for x in pidfile.read_text().split()] if pidfile.exists() else []


def test_a_stuck_job_is_killed_retried_then_failed_and_the_queue_goes_on(world) -> None:
    runner, store, server, pidfile = world
    hostile = store.enqueue("acme/Hostile-1B", server.head("acme/Hostile-1B"), reason="test", now=1, max_attempts=2)
    nxt = store.enqueue("acme/Next-1B", server.head("acme/Next-1B"), reason="test", now=2)
    t0 = time.monotonic()
    out = runner.run_one(now=10)
    job = store.job(hostile)
    assert out is not None and out.status == J.Status.RETRYING == job.status  # stuck is transient
    assert job.error_type == "Stuck" and "no progress for" in job.error_message and job.stage == "convert"
    assert time.monotonic() - t0 < 60
    assert all(gone(p, within=5) for p in pids(pidfile))  # its program was killed
    out = runner.run_one(now=job.not_before + 1)  # the retry: stuck again, attempts used up
    job = store.job(hostile)
    assert out.job_id == hostile and job.status == J.Status.FAILED and job.error_type == "Stuck"
    assert all(gone(p, within=5) for p in pids(pidfile))
    out = runner.run_one(now=job.updated_at + 1)  # the next job starts: one hostile job blocks nothing
    assert out is not None and out.job_id == nxt


def test_cancelling_a_job_kills_its_program_within_seconds(world) -> None:
    runner, store, server, pidfile = world
    jid = store.enqueue("acme/Hostile-1B", server.head("acme/Hostile-1B"), reason="test", now=1)
    result: list = []
    t = threading.Thread(target=lambda: result.append(runner.run_one(now=10)))
    t.start()
    deadline = time.monotonic() + 60
    while not pids(pidfile) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pids(pidfile), "the converter never started"
    store.transition(jid, J.Status.CANCELLED, now=11, message="cancelled by the operator")
    t0 = time.monotonic()
    t.join(timeout=30)
    assert not t.is_alive() and gone(pids(pidfile)[0], within=1)
    assert time.monotonic() - t0 < 2 * 2.0 + 2  # WATCH_SECONDS, the poll, the kill
    assert store.job(jid).status == J.Status.CANCELLED
