"""The bot end to end: ``ggufbot watch --once`` and ``ggufbot run`` as real processes, the real Hub client
against the local Hub-compatible server, a real SQLite state file, the real llama.cpp pipeline on SmolLM2.

One scenario in order (the tests share the server and the state; each step builds on the previous one):
1. ``watch --once`` accepts only the new SmolLM2 release; gated, remote-code, pickle-only, already-GGUF,
   too-large and path-escaping repos are skipped with their reasons; ``status`` shows them;
2. ``run`` is SIGKILLed during quantization; two ``run`` processes started on the same database resume the
   job from its last finished stage, only one of them runs it, and it is published exactly once with its card;
3. a new upstream revision changing only README.md queues nothing; one changing the model config queues a
   re-quantization (a full job: a template or tokenizer fix would be a metadata patch, tests/integration/
   test_metapatch.py); SIGTERM during its conversion exits cleanly and releases the job, which resumes after the
   finished conversion on the next start and updates the published repo.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bot.model import jobstate as J
from bot.state.store import Store
from tests.bot_fixtures import bot_config, checkpoint_files, populate
from tests.hub_fixtures import TEST_USER, default_tokens
from tests.procs import die_with_the_tests, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.llama]

REPO_ROOT = Path(__file__).resolve().parents[2]
AUTHOR = "smol-labs"
MODEL = "SmolLM2-135M-Instruct"
SOURCE = f"{AUTHOR}/{MODEL}"
TARGET = f"{TEST_USER}/{MODEL}-GGUF"


class World:
    def __init__(self, hub, tmp: Path, ckpt: Path, cal: Path, ev: Path):
        self.hub = hub
        self.tmp = tmp
        self.ckpt = ckpt
        self.data = tmp / "data"
        self.config = bot_config(tmp / "ggufbot.toml", data_dir=self.data, author=AUTHOR, calibration=cal,
                                 evaluation=ev)
        self.store = Store(f"sqlite:///{self.data / 'ggufbot.db'}")
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.n = 0

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bot.cli", *args, "--config", str(self.config)], cwd=REPO_ROOT,
                              env=self.env(), capture_output=True, text=True, timeout=timeout)

    def start_run(self, *extra: str) -> subprocess.Popen:
        self.n += 1
        log = open(self.logs / f"run-{self.n}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "bot.cli", "-v", "run", "--config", str(self.config), *extra],
                                cwd=REPO_ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_the_tests)

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text()[-3000:] for p in sorted(self.logs.glob("*.log")))


@pytest.fixture(scope="module")
def world(hub_server_session, tmp_path_factory, smollm2, calibration_text, eval_text, toolchain):
    hub_server_session.reset(valid_tokens=default_tokens())
    tmp = tmp_path_factory.mktemp("bot-e2e")
    cfg = json.loads((smollm2 / "config.json").read_text())
    w = World(hub_server_session, tmp, smollm2, calibration_text, eval_text)
    w.expected = populate(hub_server_session, AUTHOR, MODEL, checkpoint_files(smollm2), release_config=cfg)
    yield w
    w.store.close()


def target_commits(world: World) -> int:
    """Publications: commits made by publishing that complete one (the repo's creation commit, which has no parent,
    is not one; nor an early publication's commits before its last, whose message names the files still coming)."""
    return sum(1 for c in world.hub.commits(TARGET) if c.parent is not None and "coming" not in c.summary)


def test_watch_once_accepts_only_the_release(world: World) -> None:
    r = world.cli("watch", "--once")
    assert r.returncode == 0, r.stderr
    assert "1 queued" in r.stdout and SOURCE in r.stdout
    [job] = world.store.jobs()
    assert (job.repo, job.status) == (SOURCE, J.Status.QUEUED)
    rows = world.store.decided(list(world.expected))
    assert {repo: rows[repo].code for repo in world.expected} == world.expected
    r = world.cli("status", "--json")
    st = json.loads(r.stdout)
    assert st["queue"][0]["repo"] == SOURCE and st["publishing"] is True
    assert {s["repo"]: s["code"] for s in st["skipped"]} == world.expected
    text = world.cli("status").stdout
    assert "remote_code" in text and "auto_map" in text  # the reasons are shown


def test_killed_run_resumes_and_publishes_once(world: World) -> None:
    [job] = world.store.jobs()
    p1 = world.start_run("--no-poll")
    try:
        wait_for(lambda: (j := world.store.job(job.id)) and j.stage == "ladder",
                 400, "the ladder stage (quantize + evaluate)", world.log_tail, every=0.1)
    finally:
        os.killpg(p1.pid, signal.SIGKILL)
        p1.wait(30)
    killed = world.store.job(job.id)
    assert killed.status == J.Status.RUNNING and killed.stage == "ladder" and killed.attempts == 1
    assert target_commits(world) == 0

    # two processes on the same database: the dead worker's job is recovered and run by exactly one of them
    procs = [world.start_run("--exit-when-idle"), world.start_run("--exit-when-idle")]
    for p in procs:
        try:
            assert p.wait(600) == 0, world.log_tail()
        except subprocess.TimeoutExpired:
            for q in procs:  # each on its own: one that already exited must not spare the other
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(q.pid, signal.SIGKILL)
            pytest.fail("run did not finish\n" + world.log_tail())
    done = world.store.job(job.id)
    assert done.status == J.Status.PUBLISHED, (done, world.log_tail())
    assert done.target_repo == TARGET and done.attempts == 2
    events = list(reversed(world.store.events(job_id=job.id, limit=500)))
    claims = [e for e in events if e["kind"] == "job.claimed"]
    assert len(claims) == 2 and claims[0]["data"]["worker_id"] != claims[1]["data"]["worker_id"]
    after = events[events.index(claims[1]):]
    skipped = {e["message"].split()[0] for e in after if e["kind"] == "stage.skip"}
    assert {"convert", "calibrate"} <= skipped  # resumed from its last finished stage
    assert sum(e["kind"] == "job.published" for e in events) == 1
    assert target_commits(world) == 1  # published exactly once
    files = world.hub.files(TARGET)
    assert {f"{MODEL}-Q8_0.gguf", f"{MODEL}-Q4_K_M.gguf", "README.md", "report.json"} <= set(files)
    assert SOURCE in files["README.md"].decode()
    # the work directory is gone; report and imatrix are kept
    assert not any((world.data / "work").glob(f"job-{job.id}-*"))
    kept = {Path(k).name for k in done.result["kept"]}
    assert {"report.json", f"{MODEL}-imatrix.gguf"} <= kept
    text = world.cli("status").stdout
    assert TARGET in text


def test_new_revisions_requeue_only_on_result_changes(world: World) -> None:
    world.hub.add_commit(SOURCE, {"README.md": "---\nlicense: apache-2.0\n---\n# Now with better docs\n"},
                         message="docs")
    r = world.cli("watch", "--once")
    assert r.returncode == 0 and "0 queued" in r.stdout, r.stdout + r.stderr
    assert world.store.model(SOURCE).decision == "unchanged"
    assert len(world.store.jobs()) == 1

    cfg = json.loads((world.ckpt / "config.json").read_text())
    cfg["max_position_embeddings"] = cfg["max_position_embeddings"] // 2  # a model config change: a full job
    new_sha = world.hub.add_commit(SOURCE, {"config.json": json.dumps(cfg, indent=1)},
                                   message="fix the context length")
    r = world.cli("watch", "--once")
    assert r.returncode == 0 and "1 queued" in r.stdout, r.stdout + r.stderr
    job2 = world.store.jobs()[-1]
    assert job2.revision == new_sha and "config.json" in job2.reason
    # SIGTERM during the conversion: the step finishes, the job goes back to the queue, the process exits 0
    p = world.start_run("--exit-when-idle", "--no-poll")
    wait_for(lambda: (j := world.store.job(job2.id)) and j.stage == "convert",
             300, "the convert stage", world.log_tail, every=0.1)
    p.send_signal(signal.SIGTERM)
    assert p.wait(300) == 0, world.log_tail()
    released = world.store.job(job2.id)
    assert released.status == J.Status.QUEUED and released.attempts == 0, released
    # started again, it resumes after the finished conversion and publishes the update
    p = world.start_run("--exit-when-idle", "--no-poll")
    assert p.wait(600) == 0, world.log_tail()
    events = list(reversed(world.store.events(job_id=job2.id, limit=500)))
    last_claim = max(i for i, e in enumerate(events) if e["kind"] == "job.claimed")
    assert any(e["kind"] == "stage.skip" and e["message"].startswith("convert") for e in events[last_claim:])
    done = world.store.job(job2.id)
    assert done.status == J.Status.PUBLISHED, (done, world.log_tail())
    assert done.result["kind"] == "full" and "model config changed" in done.result["kind_reason"]
    assert target_commits(world) == 2  # the published repo was updated, once
    report = json.loads(world.hub.files(TARGET)["report.json"])
    assert new_sha in json.dumps(report)
