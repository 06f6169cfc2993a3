"""The bot against a corpus of hostile releases, end to end: ``ggufbot watch --once`` and ``ggufbot run
--exit-when-idle`` as real processes, the real Hub client against the local Hub-compatible server, a real SQLite
state file and the real llama.cpp pipeline on the tiny random llama fixture.

Next to one good release, each hostile repo of :func:`tests.bot_fixtures.populate_hostile` (remote code, pickle,
shard-index escape, crafted header, declared size, absurd config, looping and sandbox-escaping templates, a template
that emits a code fence and a link, a gated repo, NaN tensors, ``..`` file names, a name collision) must be refused
(before any download, or by its job) or contained, with the reason stored and shown by ``ggufbot status``; nothing
is published for a refused one and no repo of another source is touched; no code of any of them runs (a canary
folder stays empty); the good release is published; the bot exits cleanly having brought every job to an end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot import jobs as J
from bot.store import Store
from tests.bot_fixtures import (
    FENCE_LINK,
    bot_config,
    checkpoint_files,
    populate_hostile,
    scripted_model,
)
from tests.hub_fixtures import TEST_USER, default_tokens
from tests.models import tiny_random_checkpoint
from tests.procs import die_with_the_tests

pytestmark = [pytest.mark.slow, pytest.mark.llama]

REPO_ROOT = Path(__file__).resolve().parents[2]
AUTHOR = "mixed-lab"
GOOD = f"{AUTHOR}/Tiny-Good"


class World:
    def __init__(self, hub, tmp: Path, config: Path, corpus: dict, canary: Path):
        self.hub, self.tmp, self.config, self.corpus, self.canary = hub, tmp, config, corpus, canary
        self.store = Store(f"sqlite:///{tmp / 'data' / 'ggufbot.db'}")
        self.log = tmp / "run.log"

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bot.cli", *args, "--config", str(self.config)], cwd=REPO_ROOT,
                              env=self.env(), capture_output=True, text=True, timeout=180, check=False)

    def run_until_idle(self, timeout: float) -> int:
        with open(self.log, "w") as log:
            p = subprocess.Popen([sys.executable, "-m", "bot.cli", "-v", "run", "--exit-when-idle", "--no-poll",
                                  "--config", str(self.config)], cwd=REPO_ROOT, env=self.env(), stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_the_tests)
            try:
                return p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)
                pytest.fail(f"ggufbot run did not finish in {timeout:.0f} s\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text()[-6000:] if self.log.exists() else ""

    def by_stop(self, how: str) -> dict:
        return {repo: h for repo, h in self.corpus.items() if h.stopped_by == how}


def served(hub, repo: str) -> list[str]:
    """The files of ``repo`` the server handed out (a refused access probe of a gated repo is not one)."""
    return [r.path for r in list(hub.log) if f"/{repo}/resolve/" in r.path and r.status is not None and r.status < 400]


def repo_commits(hub) -> dict[str, list[str]]:
    return {rid: [c.sha for c in hub.commits(rid)] for (kind, rid) in list(hub.repos) if kind == "model"}


@pytest.fixture(scope="module")
def world(hub_server_session, tmp_path_factory, calibration_text, eval_text, toolchain):
    hub = hub_server_session
    hub.reset(valid_tokens=default_tokens())
    tmp = tmp_path_factory.mktemp("hostile")
    canary = tmp / "canary"
    canary.mkdir()
    tiny = tiny_random_checkpoint("llama")
    corpus = populate_hostile(hub, AUTHOR, tiny, canary, tmp / "models", namespace=TEST_USER)
    good = scripted_model(tiny, tmp / "models" / "good", chat_template=(tiny / "chat_template.jinja").read_text())
    hub.add_model(GOOD, checkpoint_files(good), card_data={"license": "apache-2.0"},
                  config=json.loads((good / "config.json").read_text()), safetensors_params=13_500_000,
                  pipeline_tag="text-generation", library_name="transformers")
    config = bot_config(tmp / "ggufbot.toml", data_dir=tmp / "data", author=AUTHOR, calibration=calibration_text,
                        evaluation=eval_text, ladder="Q8_0", limits="concurrency = 2\nmax_attempts = 2",
                        schedule="stale_after_seconds = 30", more='[target]\non_collision = "fail"')
    w = World(hub, tmp, config, corpus, canary)
    w.before = repo_commits(hub)
    yield w
    w.store.close()


def test_the_poll_refuses_what_the_listing_shows_before_any_download(world: World) -> None:
    assert len(world.corpus) >= 12
    r = world.cli("watch", "--once", "--json")
    assert r.returncode == 0, r.stderr
    decided = world.store.decided([*world.corpus, GOOD])
    for repo, h in world.by_stop("decision").items():
        row = decided[repo]
        assert (row.decision, row.code) == ("skipped", h.code), (repo, row.code, row.reason)
        assert h.reason in row.reason, (repo, row.reason)
        assert served(world.hub, repo) == [], f"{repo}: a file was downloaded"
    queued = {j.repo for j in world.store.jobs()}
    assert queued == {GOOD, *world.by_stop("job"), *world.by_stop("contained")}


def test_every_job_ends_refused_or_published_and_the_bot_exits_cleanly(world: World) -> None:
    t0 = time.monotonic()
    code = world.run_until_idle(timeout=900)
    assert code == 0, f"ggufbot run exited with {code}\n{world.log_tail()}"  # not killed, not crashed
    log = world.log.read_text()
    assert "Traceback" not in log and "stopped cleanly" in log, world.log_tail()
    jobs = {j.repo: j for j in world.store.jobs()}
    assert all(j.status.finished for j in jobs.values()), {r: j.status.value for r, j in jobs.items()}
    for repo, h in world.by_stop("job").items():
        j = jobs[repo]
        assert (j.status, j.stage) == (J.Status.FAILED, h.stage), (repo, j.status, j.stage, j.error_message)
        assert h.reason in (j.error_message or "") and j.target_repo is None, (repo, j.error_type, j.error_message)
    for repo in (GOOD, *world.by_stop("contained")):
        assert jobs[repo].status == J.Status.PUBLISHED, (repo, jobs[repo].error_message, world.log_tail())
    assert jobs[GOOD].target_repo == f"{TEST_USER}/Tiny-Good-GGUF"
    print(f"hostile corpus: {len(jobs)} jobs in {time.monotonic() - t0:.0f} s")


def test_nothing_is_published_for_a_refused_repo_and_no_other_repo_is_touched(world: World) -> None:
    jobs = {j.repo: j for j in world.store.jobs()}
    good, fence = jobs[GOOD], jobs[f"{AUTHOR}/Fence-Template"]
    after = repo_commits(world.hub)
    assert sorted(set(after) - set(world.before)) == sorted([good.target_repo, fence.target_repo])
    # the name collision's repo (another source's) included: not one commit more
    assert {rid: shas for rid, shas in after.items() if rid in world.before} == world.before
    assert "Tiny-Good-Q8_0.gguf" in world.hub.files(good.target_repo)
    assert_card_inert(world.hub.files(fence.target_repo)["README.md"].decode())


def test_no_code_of_any_hostile_repo_ran(world: World) -> None:
    assert sorted(p.name for p in world.canary.iterdir()) == []


def test_status_shows_every_reason(world: World) -> None:
    st = json.loads(world.cli("status", "--json", "--limit", "50").stdout)
    skipped = {s["repo"]: s for s in st["skipped"]}
    failed = {f["repo"]: f for f in st["failed"]}
    published = {p["repo"]: p for p in st["published"]}
    for repo, h in world.by_stop("decision").items():
        assert skipped[repo]["code"] == h.code and h.reason in skipped[repo]["reason"], skipped.get(repo)
    for repo, h in world.by_stop("job").items():
        assert failed[repo]["stage"] == h.stage and h.reason in failed[repo]["error_message"], failed.get(repo)
    assert set(published) == {GOOD, *world.by_stop("contained")}
    text = world.cli("status", "--limit", "50").stdout
    for repo, h in world.corpus.items():
        line = next((ln for ln in text.splitlines() if f" {repo}" in ln), "")
        shown = published[repo]["target_repo"] if h.stopped_by == "contained" else h.reason
        assert shown in line, (repo, text)


def assert_card_inert(card: str) -> None:
    """The chat example of a template that emits a code fence, a link and HTML stays inside its code block."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").parse(card)
    assert any(t.type == "fence" and FENCE_LINK in t.content for t in tokens), "the example is not in a code block"
    for t in tokens:
        for child in [t, *(t.children or [])]:
            assert not (child.type == "link_open" and FENCE_LINK in str(child.attrGet("href"))), child
            assert not (child.type in ("html_block", "html_inline") and "onerror" in child.content), child
