"""Several boxes over PostgreSQL and procrastinate, as real processes: one scheduler (``ggufbot run --no-worker``)
and three workers (``ggufbot worker``, each with its own data directory, as on its own box), the real Hub client
against the local Hub server, four tiny releases with a one-type ladder.

One scenario, in order: a worker is SIGKILLed while it quantizes (its job goes to another worker once its
heartbeat is ``stale_after_seconds`` old, and starts its stages again there); then PostgreSQL becomes unreachable
for 30 s (a TCP proxy in front of the test server is cut: the shared server itself is never stopped); every
process rides it out. At the end: every release published exactly once (one commit per repo), no job run twice
(one claim each; two for the killed one), the work spread over the workers, ``status`` listing every worker.
The test's own checks read the database directly, not through the proxy.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from bot.model import jobstate as J
from bot.queue.schema import open_store
from tests.bot_fixtures import bot_config, checkpoint_files, postgres_url, scripted_model
from tests.hub_fixtures import TEST_USER, default_tokens
from tests.hubserver import free_port
from tests.models import tiny_random_checkpoint
from tests.procs import die_with_the_tests, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.llama, pytest.mark.postgres]

REPO_ROOT = Path(__file__).resolve().parents[2]
AUTHOR = "box-lab"
N_RELEASES = 4  # one job per worker at first (spread over all), the killed one's and the fourth left for the outage
N_WORKERS = 3
OUTAGE_S = 30.0
STALE_S = 20  # a loaded 2-core machine can starve a live worker's heartbeat for several seconds


class Proxy:
    """A TCP proxy to the PostgreSQL server that can be cut: ``cut()`` closes every connection and refuses new
    ones until ``restore()``."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = free_port()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.stopped = False
        self.restore()

    def restore(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(128)
        self.listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def cut(self) -> None:
        ls, self.listener = self.listener, None
        if ls is not None:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.stopped = True
        self.cut()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class World:
    def __init__(self, hub, tmp: Path, url: str, proxy: Proxy, config: Path) -> None:
        self.hub, self.tmp, self.url, self.proxy, self.config = hub, tmp, url, proxy, config
        u = sa.engine.make_url(url)
        self.proxied_url = u.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        self.store = open_store(url)  # the state and queue schemas, as the boxes open it
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = tmp / "logs"
        self.logs.mkdir()

    def env(self, box: str) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GGUFBOT__DATABASE_URL": self.proxied_url,
                "GGUFBOT__DATA_DIR": str(self.tmp / box)}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "bot.cli", "-v", *args, "--config", str(self.config)],
                             cwd=REPO_ROOT, env=self.env(name), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, preexec_fn=die_with_the_tests)
        self.procs[name] = p
        return p

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bot.cli", *args, "--config", str(self.config)], cwd=REPO_ROOT,
                              env={**self.env("cli"), "GGUFBOT__DATABASE_URL": self.url}, capture_output=True,
                              text=True, timeout=120)

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text()[-2500:] for p in sorted(self.logs.glob("*.log")))

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        end = time.monotonic() + 60
        for p in self.procs.values():
            try:
                p.wait(max(1.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


@pytest.fixture(scope="module")
def world(hub_server_session, tmp_path_factory, calibration_text, eval_text, toolchain):
    hub = hub_server_session
    hub.reset(valid_tokens=default_tokens())
    tmp = tmp_path_factory.mktemp("boxes")
    tiny = tiny_random_checkpoint("llama")
    good = scripted_model(tiny, tmp / "good", chat_template=(tiny / "chat_template.jinja").read_text())
    for i in range(N_RELEASES):
        hub.add_model(f"{AUTHOR}/Tiny-{i:02d}", checkpoint_files(good), card_data={"license": "apache-2.0"},
                      config=json.loads((good / "config.json").read_text()), safetensors_params=13_500_000,
                      pipeline_tag="text-generation", library_name="transformers")
    config = bot_config(tmp / "ggufbot.toml", data_dir=tmp / "unused", author=AUTHOR, calibration=calibration_text,
                        evaluation=eval_text, ladder="Q8_0", limits="max_attempts = 3",
                        schedule=f"stale_after_seconds = {STALE_S}")
    with postgres_url() as url:
        u = sa.engine.make_url(url)
        proxy = Proxy(u.host or "127.0.0.1", u.port or 5432)
        w = World(hub, tmp, url, proxy, config)
        try:
            yield w
        finally:
            w.stop_all()
            proxy.close()
            w.store.close()


def claims(world: World) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for e in world.store.events(kind="job.claimed", limit=1000):
        out.setdefault(e["job_id"], []).append(e["data"]["worker_id"])
    return out


def test_kill_and_outage_every_release_published_once(world: World) -> None:
    t0 = time.monotonic()
    world.start("scheduler", "run", "--no-worker")
    for i in range(N_WORKERS):
        world.start(f"box{i}", "worker", "--concurrency", "1")
    wait_for(lambda: len(world.store.jobs()) == N_RELEASES,
             120, "the poll to queue the releases", world.log_tail)

    # kill -9 a worker while it quantizes
    def quantizing():
        return next((j for j in world.store.jobs([J.Status.RUNNING]) if j.stage == "ladder"), None)
    victim = wait_for(quantizing, 600, "a job in the ladder stage", world.log_tail)
    pid = int(victim.worker_id.split(":")[1])
    box = next(n for n, p in world.procs.items() if p.pid == pid)
    os.killpg(pid, signal.SIGKILL)
    world.procs[box].wait(10)
    t_kill = time.monotonic()
    wait_for(lambda: world.store.events(job_id=victim.id, kind="job.requeued", limit=1), 120,
             "the killed worker's job back in the queue", world.log_tail)  # the next free worker takes it
    stall = time.monotonic() - t_kill

    # PostgreSQL unreachable for 30 s mid-run
    wait_for(lambda: world.store.counts().get("published", 0) >= N_RELEASES - 2, 900, "all but two jobs published",
             world.log_tail)
    running_before = [j.id for j in world.store.jobs([J.Status.RUNNING])]
    world.proxy.cut()
    time.sleep(OUTAGE_S)
    world.proxy.restore()
    t_back = time.monotonic()
    wait_for(lambda: world.store.counts().get("published", 0) == N_RELEASES,
             1500, "every job published", world.log_tail)
    print(f"boxes: {N_RELEASES} releases on {N_WORKERS} workers in {time.monotonic() - t0:.0f} s; killed job "
          f"#{victim.id} back in the queue {stall:.1f} s after the kill; {len(running_before)} job(s) running through "
          f"the {OUTAGE_S:.0f} s outage; all published {time.monotonic() - t_back:.0f} s after it")

    jobs = world.store.jobs()
    assert all(j.status == J.Status.PUBLISHED for j in jobs), {j.repo: (j.status.value, j.error_message) for j in jobs}
    for j in jobs:  # each ladder published exactly once: one commit after the repo's creation
        commits = [c for c in world.hub.commits(j.target_repo) if c.parent is not None]
        assert len(commits) == 1, (j.repo, j.target_repo, len(commits))
        assert j.target_repo == f"{TEST_USER}/Tiny-{j.repo.rsplit('-', 1)[1]}-GGUF"
    c = claims(world)
    for j in jobs:  # no job run twice: one claim each, two for the killed one (the second on another worker)
        if j.id == victim.id:
            assert len(c[j.id]) == 2 and c[j.id][0] != c[j.id][1], c[j.id]
            assert j.attempts == 2
        else:
            assert len(c[j.id]) == 1, (j.id, c[j.id])
    assert world.store.job(victim.id).worker_id.split(":")[1] != str(pid)
    ran = {w.split(":")[1] for ws in c.values() for w in ws}  # the pids of the workers that took jobs
    assert len(ran) == N_WORKERS, ran  # spread over every worker
    for p in world.procs.values():
        assert p.poll() is None or p.pid == pid, world.log_tail()  # the outage killed no process

    st = json.loads(world.cli("status", "--json").stdout)
    alive = [w for w in st["workers"] if w["alive"]]
    assert len([w for w in alive if "ggufbot" in w["queues"]]) == N_WORKERS - 1
    assert any("ggufbot-scheduler" in w["queues"] for w in alive)
    assert len({w["name"] for w in st["workers"]}) == N_WORKERS + 1  # the killed worker is listed, not alive
    text = world.cli("status").stdout
    assert "workers:" in text and "gone (no heartbeat)" in text, text

    # SIGTERM: every process exits cleanly
    for name, p in world.procs.items():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for name, p in world.procs.items():
        if p.pid != pid:
            assert p.wait(60) == 0, world.log_tail()
    for log in world.logs.glob("*.log"):
        assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


def test_a_worker_stopped_during_an_outage_exits_at_once(world: World) -> None:
    # SIGTERM while PostgreSQL is unreachable: the worker does not wait out the outage (up to 600 s) to exit
    p = world.start("late", "worker", "--concurrency", "1")
    log = world.logs / "late.log"
    wait_for(lambda: "procrastinate worker" in log.read_text(), 120, "the late worker registered", world.log_tail)
    world.proxy.cut()
    try:
        wait_for(lambda: "unreachable" in log.read_text(), 60, "the late worker to notice the outage", world.log_tail)
        t = time.monotonic()
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a worker stopped during an outage still runs after 30 s\n{log.read_text()[-3000:]}")
        took = time.monotonic() - t
    finally:
        world.proxy.restore()
    text = log.read_text()
    assert "received SIGTERM" in text and "stopped during a PostgreSQL outage" in text, text[-3000:]
    assert p.returncode == 0 and "Traceback" not in text, text[-3000:]
    print(f"boxes: a worker stopped during an outage exited in {took:.1f} s (rc {p.returncode})")
