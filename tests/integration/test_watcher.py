"""The watcher against the local Hub-compatible server, with the real client and a real SQLite store."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest

from bot.model import jobstate as J
from bot.hub.client import Hub
from bot.model.settings import Settings, from_mapping
from bot.state.store import Store
from bot.service.watcher import Watcher
from tests.bot_fixtures import SMALL_CONFIG, populate
from tests.hub_fixtures import TEST_TOKEN

AUTHOR = "acme"
RELEASE = "Tiny-Chat-1B"


def make_settings(tmp_path: Path, **extra) -> Settings:
    raw = {"data_dir": str(tmp_path), "sources": [{"author": AUTHOR, "lookback_days": 3}],
           "limits": {"max_model_gb": 1.0}, **extra}
    return from_mapping(raw, env={"HF_TOKEN": TEST_TOKEN}, free_disk=10**13)


@pytest.fixture
def setup(hub_server, tmp_path: Path):
    settings = make_settings(tmp_path)
    store = Store(settings.database_url)
    hub = Hub(token=TEST_TOKEN, endpoint=hub_server.url, sleep=lambda s: None)
    return settings, store, Watcher(settings, store, hub), hub_server


def release_files() -> dict[str, str | bytes]:
    return {"config.json": json.dumps(SMALL_CONFIG), "model.safetensors": b"\x00" * 4096,
            "tokenizer.json": json.dumps({"version": "1.0", "model": {"vocab": {"a": 0}}}),
            "tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}"})}


def test_poll_accepts_only_the_release_with_reasons_for_the_rest(setup) -> None:
    settings, store, watcher, hub = setup
    expected = populate(hub, AUTHOR, RELEASE, release_files())
    hub.add_model("other/Unwatched-1B", release_files(), pipeline_tag="text-generation")
    res = watcher.poll(now=time.time())
    assert res.ok and len(res.queued) == 1
    [job] = store.jobs()
    assert (job.repo, job.revision, job.status) == (f"{AUTHOR}/{RELEASE}", hub.head(f"{AUTHOR}/{RELEASE}"),
                                                    J.Status.QUEUED)
    rows = store.decided(list(expected) + [f"{AUTHOR}/{RELEASE}", "other/Unwatched-1B"])
    assert "other/Unwatched-1B" not in rows
    assert rows[f"{AUTHOR}/{RELEASE}"].code == "queued"
    for repo, code in expected.items():
        assert rows[repo].decision == "skipped" and rows[repo].code == code, (repo, rows[repo])
    reasons = {r: rows[r].reason for r in expected}
    assert "no access" in reasons[f"{AUTHOR}/Gated-1B"]
    assert "auto_map" in reasons[f"{AUTHOR}/Remote-1B"]
    assert "pytorch_model.bin" in reasons[f"{AUTHOR}/Pickle-1B"]
    assert "GGUF" in reasons[f"{AUTHOR}/Packed-1B"]
    assert "size limit" in reasons[f"{AUTHOR}/Huge-70B"]
    assert "../../escape.sh" in reasons[f"{AUTHOR}/Escape-1B"]
    # nothing was downloaded from a skipped repo
    assert not any("/resolve/" in p and "Gated" not in p and RELEASE not in p for _, p in hub.requests)

    # a second poll: everything is decided at the same commit, so no per-model request and nothing queued
    hub.clear_log()
    res2 = watcher.poll(now=time.time())
    assert res2.ok and res2.queued == [] and res2.decided == 0
    assert [p for _, p in hub.requests] == ["/api/models"]
    assert len(store.jobs()) == 1


def test_failed_poll_is_logged_and_the_next_succeeds(setup) -> None:
    settings, store, watcher, hub = setup
    hub.add_model(f"{AUTHOR}/{RELEASE}", release_files(), pipeline_tag="text-generation", config=SMALL_CONFIG,
                  safetensors_params=1_000_000)
    hub.fail_next(6, status=500, path_prefix="/api/models")  # the client itself retries a listing 5 times
    res = watcher.poll(now=time.time())
    assert not res.ok and res.queued == []
    assert "500" in res.sources[0].error
    ev = store.events(kind="poll.*")
    assert ev[0]["kind"] == "poll.failed" and "500" in ev[0]["message"]
    src = store.source(settings.sources[0].key)
    assert src.failures == 1 and src.mark is None
    res2 = watcher.poll(now=time.time())
    assert res2.ok and len(res2.queued) == 1
    assert store.events(kind="poll.*")[0]["kind"] == "poll.ok"
    assert store.source(settings.sources[0].key).mark is not None


def test_revision_changes_requeue_only_when_the_result_changes(setup) -> None:
    settings, store, watcher, hub = setup
    repo = f"{AUTHOR}/{RELEASE}"
    hub.add_model(repo, release_files(), pipeline_tag="text-generation", config=SMALL_CONFIG,
                  safetensors_params=1_000_000, card_data={"license": "mit"})
    first = watcher.poll(now=time.time()).queued
    assert len(first) == 1
    first_sha = store.job(first[0]).revision
    sha_readme = hub.add_commit(repo, card_data={"license": "mit"}, card_body="# Better docs\n", message="docs")
    res = watcher.poll(now=time.time())
    assert res.ok and res.queued == []
    row = store.model(repo)
    assert row.sha == sha_readme and row.decision == "unchanged" and "changes no weights" in row.reason
    sha_tok = hub.add_commit(repo, {"tokenizer.json": json.dumps({"version": "1.0", "model": {"vocab": {"b": 0}}})},
                             message="fix tokenizer")
    res = watcher.poll(now=time.time())
    assert len(res.queued) == 1
    job = store.job(res.queued[0])
    assert job.revision == sha_tok and "tokenizer.json" in job.reason
    # and polling again queues nothing more
    assert watcher.poll(now=time.time()).queued == []
    assert [j.revision for j in store.jobs()] == [first_sha, sha_tok]


def test_listing_stops_at_the_mark_and_the_lookback(hub_server, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, sources=[{"author": AUTHOR, "lookback_days": 3, "pipeline_tag": ""}])
    store = Store(settings.database_url)
    watcher = Watcher(settings, store, Hub(token=TEST_TOKEN, endpoint=hub_server.url, sleep=lambda s: None))
    now = dt.datetime.now(dt.timezone.utc)
    hub_server.add_model(f"{AUTHOR}/Old-1B", {"x.txt": "x"}, date=now - dt.timedelta(days=10))
    for i in range(120):  # three pages of 50
        hub_server.add_model(f"{AUTHOR}/M{i:03d}", {"x.txt": "x"}, date=now - dt.timedelta(hours=1, minutes=i))
    res = watcher.poll(now=time.time())
    assert res.sources[0].listed == 120  # the 10-day-old model is behind the 3-day lookback
    assert store.model(f"{AUTHOR}/Old-1B") is None
    assert all(store.model(f"{AUTHOR}/M{i:03d}").code == "no_safetensors" for i in (0, 119))
    hub_server.add_model(f"{AUTHOR}/New-1B", {"x.txt": "x"}, date=now)
    hub_server.clear_log()
    res = watcher.poll(now=time.time())
    assert res.sources[0].listed <= 2 and res.decided == 1  # stops at the last-seen mark: one page, no more
    assert [p for _, p in hub_server.requests] == ["/api/models"]


def test_a_squashed_repo_counts_as_changed_and_the_rest_of_the_poll_goes_on(setup) -> None:
    """``super_squash_history`` (or a force-push) removes the revision last queued: the new one counts as changed,
    the decision says why, and the other releases of the same author are still decided in the same poll."""
    settings, store, watcher, hub = setup
    repo, other = f"{AUTHOR}/{RELEASE}", f"{AUTHOR}/Other-Chat-1B"
    hub.add_model(repo, release_files(), pipeline_tag="text-generation", config=SMALL_CONFIG,
                  safetensors_params=1_000_000, card_data={"license": "mit"})
    [first] = watcher.poll(now=time.time()).queued
    old_sha = store.job(first).revision
    new_sha = hub.squash(repo)
    assert [c.sha for c in hub.commits(repo)] == [new_sha]
    hub.add_model(other, release_files(), pipeline_tag="text-generation", config=SMALL_CONFIG,
                  safetensors_params=1_000_000, card_data={"license": "mit"})
    res = watcher.poll(now=time.time())
    assert res.ok, res.to_json()
    jobs = {store.job(j).repo: store.job(j) for j in res.queued}
    assert set(jobs) == {repo, other}
    assert jobs[repo].revision == new_sha
    row = store.model(repo)
    assert row.decision == "accepted" and row.sha == new_sha
    assert f"earlier revision {old_sha[:12]} can no longer be read" in row.reason
    assert "config.json" in row.reason and "model.safetensors" not in row.reason  # LFS hashes still compare
    assert store.model(other).decision == "accepted"
    assert watcher.poll(now=time.time()).queued == []
