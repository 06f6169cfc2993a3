"""Following llama.cpp's releases (issue 23), against a local repository served over file:// (tests/llama_repo.py):

1. ``ggufbot toolchain install --source git --url file:///... --ref b1`` builds (reusing the pinned programs: same
   native digest), ``toolchain info`` names the commit and tag, a second install reuses the cache entry;
2. a model of architecture ``SmolTestForCausalLM`` is refused by b1's converter;
3. the bot follows to b2 (the newest tag): b2 is built, its canary passes against b1, the refused job is queued again
   with the reason "llama.cpp b2 supports it" and published with b2 (report.json names the commit and tag);
4. b3 appears, its converter damages the embeddings: its canary fails, b2 stays in use, the reason is recorded and
   shown by ``ggufbot status``;
5. the scheduler's tick starts the check in the background and returns at once.

The bot runs in this process (its duties called with ``now``, as the scheduler would), against the local Hub server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bot.hub.client import Hub
from bot.model import jobstate as J
from bot.model.settings import load
from bot.service import follow as follow_mod
from bot.service.scheduler import Bot
from bot.state.store import Store
from converters.llama import builds
from converters.llama import toolchain as tc_mod
from tests.bot_fixtures import scripted_model
from tests.hub_fixtures import TEST_TOKEN, TEST_USER, default_tokens
from tests.llama_repo import TEST_ARCH, LlamaRepo, make_llama_repo

pytestmark = [pytest.mark.slow, pytest.mark.llama]

REPO_ROOT = Path(__file__).resolve().parents[2]
AUTHOR = "day0-labs"
MODEL = "Smol-Test-2L"
SOURCE = f"{AUTHOR}/{MODEL}"
CANARY = "canary-org/Canary-Tiny"
CARD = {"license": "apache-2.0", "pipeline_tag": "text-generation", "library_name": "transformers"}


@pytest.fixture(scope="session")
def llama_repo(tmp_path_factory, toolchain) -> LlamaRepo:
    """The local llama.cpp repository, made once per session from the pinned tree (toolchain.find().root)."""
    return make_llama_repo(toolchain.root, tmp_path_factory.mktemp("llama-git") / "llama.cpp.git")


class World:
    def __init__(self, tmp: Path, repo: LlamaRepo, hub_server, cal: Path, ev: Path) -> None:
        self.tmp, self.repo, self.hub_server = tmp, repo, hub_server
        self.data = tmp / "data"
        self.config = tmp / "ggufbot.toml"
        self.config.write_text(f"""
data_dir = "{self.data}"

[[sources]]
author = "{AUTHOR}"
lookback_days = 2

[hub]
endpoint = "{hub_server.url}"

[target]
namespace = "{TEST_USER}"

[limits]
max_model_gb = 1.0
min_free_disk_gb = 0.1

[quantize]
ladder = "Q8_0"
calibration_text = "{cal}"
evaluation_text = "{ev}"
calibration_chunks = 2
evaluation_chunks = 2
ctx = 256

[schedule]
retry_base_seconds = 1

[toolchain]
url = "{repo.url}"
follow = "releases"
follow_hours = 6
canary_repo = "{CANARY}"
canary_ladder = "Q8_0"
canary_chunks = 2
""")
        self.settings = load(self.config, env={"HF_TOKEN": TEST_TOKEN})
        self.store = Store(self.settings.database_url)
        self.hub = Hub(token=TEST_TOKEN, endpoint=hub_server.url, sleep=lambda s: None)

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_TOKEN": TEST_TOKEN}

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bot.cli", *args], cwd=REPO_ROOT, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory, llama_repo, hub_server_session, calibration_text, eval_text, toolchain):
    """A builds root of its own (the pinned build linked into it, nothing else), the test model and the canary model
    on the Hub."""
    from tests.models import tiny_random_checkpoint

    tmp = tmp_path_factory.mktemp("follow")
    root = tmp / "builds"
    root.mkdir()
    pinned = tc_mod.pinned_dir()
    (root / pinned.name).symlink_to(pinned)
    saved = os.environ.get("GGUFBOT_TOOLCHAIN_ROOT")
    os.environ["GGUFBOT_TOOLCHAIN_ROOT"] = str(root)
    hub_server_session.reset(valid_tokens=default_tokens())
    tiny = tiny_random_checkpoint("llama")
    canary = scripted_model(tiny, tmp / "canary")
    model = scripted_model(tiny, tmp / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = [TEST_ARCH]
    (model / "config.json").write_text(json.dumps(cfg, indent=2))
    for repo, path, config in ((CANARY, canary, json.loads((canary / "config.json").read_text())),
                               (SOURCE, model, cfg)):
        files = {p.name: p for p in sorted(path.iterdir()) if p.is_file()}
        hub_server_session.add_model(repo, files, card_data=CARD, config=config, safetensors_params=20_000_000,
                                     pipeline_tag="text-generation", library_name="transformers")
    w = World(tmp, llama_repo, hub_server_session, calibration_text, eval_text)
    w.root = root
    yield w
    w.store.close()
    if saved is None:
        os.environ.pop("GGUFBOT_TOOLCHAIN_ROOT", None)
    else:
        os.environ["GGUFBOT_TOOLCHAIN_ROOT"] = saved


def test_install_from_git_names_the_commit_and_reuses_the_cache(world: World) -> None:
    url = world.repo.url
    r = world.cli("toolchain", "install", "--source", "git", "--url", url, "--ref", "b1")
    assert r.returncode == 0, r.stderr
    assert "programs of 0.3.36-" in r.stdout  # same native digest as the pinned tree: nothing compiled
    info = json.loads(world.cli("toolchain", "info").stdout)
    assert (info["commit"], info["tag"], info["source"]) == (world.repo.commits["b1"], "b1", "git")
    assert info["version"] == f"llama.cpp b1 ({world.repo.commits['b1'][:7]})"
    before = sorted(p.name for p in world.root.iterdir())
    t0 = time.monotonic()
    again = world.cli("toolchain", "install", "--source", "git", "--url", url, "--ref", "b1")
    assert again.returncode == 0 and again.stdout.split(" as ")[1].split()[0] == info["build"]
    assert time.monotonic() - t0 < 20  # the cache entry, not a fetch
    assert sorted(p.name for p in world.root.iterdir()) == before
    listed = json.loads(world.cli("toolchain", "list", "--json").stdout)
    assert [b["in_use"] for b in listed if b["tag"] == "b1"] == [True]


def test_a_model_the_converter_does_not_know_is_refused(world: World) -> None:
    bot = Bot(world.settings, store=world.store, hub=world.hub, toolchain=tc_mod.find(), resolve_namespace=False)
    world.bot = bot
    now = time.time()
    assert bot.poll(now).queued
    [out] = bot.dispatch(now)
    assert out.status == J.Status.FAILED
    [job] = world.store.jobs(repo=SOURCE)
    assert job.error_type == "UnsupportedModel" and TEST_ARCH in job.error_message


def test_the_bot_follows_to_b2_and_publishes_the_refused_model(world: World) -> None:
    bot = world.bot
    now = time.time()
    st = bot.follow.step(now)
    assert st["newest_tag"] == "b2" and st["canary"]["passed"], st
    assert st["in_use"]["tag"] == "b2" and st["in_use"]["commit"] == world.repo.commits["b2"]
    assert all(r.toolchain.tag == "b2" for r in bot.runners) and bot.toolchain_version == st["in_use"]["version"]
    [queued] = world.store.jobs([J.Status.QUEUED], repo=SOURCE)
    assert queued.reason == "llama.cpp b2 supports it" and st["requeued"] == [queued.id]
    outs = bot.dispatch(now)
    assert [o.status for o in outs] == [J.Status.PUBLISHED], outs
    report = json.loads(world.hub_server.files(f"{TEST_USER}/{MODEL}-GGUF")["report.json"])
    assert report["toolchain"]["tag"] == "b2" and report["toolchain"]["commit"] == world.repo.commits["b2"]
    # nothing new: the next check is a no-op
    assert bot.follow.step(now + 1)["action"] == "up to date"


def test_a_failing_canary_keeps_the_build_in_use(world: World) -> None:
    bot = world.bot
    world.repo.tag("b3")
    st = bot.follow.step(time.time())
    assert st["newest_tag"] == "b3" and st["canary"]["passed"] is False
    assert st["in_use"]["tag"] == "b2" and builds.in_use().tag == "b2"
    assert all(r.toolchain.tag == "b2" for r in bot.runners)
    reasons = " ".join(st["canary"]["reasons"])
    assert "not publishable" in reasons, reasons
    assert st["action"].startswith("kept git-")
    # the refused tag is not built again, and status shows the verdict
    assert "refused by its canary" in bot.follow.step(time.time())["action"]
    text = world.cli("status", "--config", str(world.config)).stdout
    assert "canary of b3 failed" in text and "llama.cpp b2" in text and "newest tag b3" in text


def test_the_tick_starts_the_check_in_the_background(world: World, monkeypatch) -> None:
    release = threading.Event()
    calls = []

    def slow_step(now: float) -> dict:
        calls.append(now)
        release.wait(30)
        return {}

    f = follow_mod.Follower(world.settings, world.store, world.hub)
    monkeypatch.setattr(f, "step", slow_step)
    later = time.time() + 7 * 3600  # the last check is older than follow_hours
    t0 = time.monotonic()
    assert f.tick(later) == {"started": True}
    assert f.tick(later + 1) == {"running": True}  # one at a time
    assert time.monotonic() - t0 < 1.0
    release.set()
    f.join(10)
    assert len(calls) == 1
    assert f.tick(time.time()) is None  # checked recently: not due
