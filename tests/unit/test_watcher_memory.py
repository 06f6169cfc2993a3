"""The watcher on the in-memory store and an in-memory Hub: decisions, requeue rules, skips, manual enqueue.

No database file and no server: ``MemoryStore`` keeps the store's rules (checked against SQLite and PostgreSQL by
``tests/integration/test_store_contract.py``) and ``FakeHub`` answers the few calls the watcher makes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bot.model import jobstate as J
from bot.state.memstore import MemoryStore
from bot.model.settings import Settings, from_mapping
from bot.service.watcher import Watcher
from converters.core.errors import HubError
from tests.bot_fixtures import T0, FakeHub

NOW = T0.timestamp()
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
RELEASE = "acme/Tiny-Chat-1B"


def files(**extra: Any) -> dict[str, Any]:
    return {"config.json": json.dumps(CONFIG), "model.safetensors": b"\0" * 64, "tokenizer.json": '{"v": 1}',
            "README.md": "# Tiny\n", **extra}


def make(tmp_path: Path, token: str | None = "hf_x", **sections: Any) -> tuple[Settings, MemoryStore, FakeHub,
                                                                               Watcher]:
    settings = from_mapping({"data_dir": str(tmp_path), "sources": [{"author": "acme", "lookback_days": 3}],
                             "limits": {"max_model_gb": 1.0}, **sections},
                            env={"HF_TOKEN": token} if token else {}, free_disk=10**13)
    store, hub = MemoryStore(), FakeHub()
    return settings, store, hub, Watcher(settings, store, hub, toolchain_version="v2")


def test_a_poll_queues_the_release_and_records_a_reason_for_each_skip(tmp_path: Path) -> None:
    settings, store, hub, watcher = make(tmp_path)
    sha = hub.commit(RELEASE, files(), config=CONFIG)
    skips = {
        "acme/Remote-1B": (dict(config={**CONFIG, "auto_map": {"AutoModel": "m.M"}}), files(), "remote_code"),
        "acme/Pickle-1B": ({}, {"config.json": "{}", "pytorch_model.bin": b"\x80"}, "pickle_only"),
        "acme/Packed-1B": ({}, files(**{"m-Q4_K_M.gguf": b"GGUF"}), "quantized"),
        "acme/Huge-70B": (dict(safetensors_total=70_000_000_000), files(), "too_large"),
        "acme/Escape-1B": ({}, files(**{"../x.sh": "#!"}), "unsafe_filename"),
        "acme/Image-1B": (dict(pipeline_tag="text-to-image"), files(), "pipeline_tag"),
    }
    for repo, (fields, content, _) in skips.items():
        hub.commit(repo, content, **fields)
    hub.commit("other/Unwatched-1B", files())
    res = watcher.poll(now=NOW)
    assert res.ok and res.decided == len(skips) + 1 and len(res.queued) == 1
    [job] = store.jobs()
    assert (job.repo, job.revision, job.status, job.priority, job.max_attempts) == (
        RELEASE, sha, J.Status.QUEUED, 0, settings.limits.max_attempts)
    rows = store.decided([*skips, RELEASE, "other/Unwatched-1B"])
    assert "other/Unwatched-1B" not in rows
    assert (rows[RELEASE].code, rows[RELEASE].reason, rows[RELEASE].queued_sha) == ("queued", "new release", sha)
    assert set(rows[RELEASE].fingerprint) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert {r: rows[r].code for r in skips} == {r: code for r, (_, _, code) in skips.items()}
    assert hub.requests("model_info") == [RELEASE]  # skipped on the listing: no request for them
    assert store.source(settings.sources[0].key).mark is not None
    assert store.events(kind="poll.*")[0]["kind"] == "poll.ok"
    # decided at the same commit: no request and nothing queued the next time
    hub.calls.clear()
    res = watcher.poll(now=NOW + 60)
    assert res.decided == 0 and res.queued == [] and hub.calls == [("list_models", "acme")]


def test_a_gated_model_without_access_is_skipped(tmp_path: Path) -> None:
    settings, store, hub, watcher = make(tmp_path, token=None)
    hub.commit("acme/Gated-1B", files(), gated="manual")
    watcher.poll(now=NOW)
    row = store.model("acme/Gated-1B")
    assert (row.code, row.reason) == ("gated", "gated (manual) and the token has no access")
    assert store.jobs() == []


def test_a_failed_listing_keeps_the_mark_and_the_next_poll_catches_up(tmp_path: Path) -> None:
    settings, store, hub, watcher = make(tmp_path)
    hub.commit(RELEASE, files())
    hub.errors["list_models"] = HubError("list_models: the Hub answered 500", status=500)
    res = watcher.poll(now=NOW)
    assert not res.ok and res.queued == [] and "500" in res.sources[0].error
    src = store.source(settings.sources[0].key)
    assert (src.failures, src.mark) == (1, None)
    assert store.events(kind="poll.*")[0]["kind"] == "poll.failed"
    del hub.errors["list_models"]
    assert len(watcher.poll(now=NOW).queued) == 1


REQUEUE = [
    # (name, the new commit's files, requeue.on_revision_change, decision, code, words in the reason)
    ("docs only", {"README.md": "# Better docs\n"}, True, "unchanged", "no_result_change", "changes no weights"),
    ("same-size config edit", {"config.json": json.dumps({**CONFIG, "model_type": "llamb"})}, True, "accepted",
     "queued", "revision change: config.json"),
    ("new weights", {"model.safetensors": b"\1" * 64}, True, "accepted", "queued", "model.safetensors"),
    ("new weights, requeue off", {"model.safetensors": b"\1" * 64}, False, "skipped", "requeue_off",
     "requeue.on_revision_change is off"),
]


@pytest.mark.parametrize("name,change,requeue,decision,code,words", REQUEUE, ids=[c[0] for c in REQUEUE])
def test_a_new_revision_is_requeued_only_when_the_result_changes(tmp_path: Path, name: str, change: dict,
                                                                  requeue: bool, decision: str, code: str,
                                                                  words: str) -> None:
    settings, store, hub, watcher = make(tmp_path, requeue={"on_revision_change": requeue})
    first = hub.commit(RELEASE, files())
    assert len(watcher.poll(now=NOW).queued) == 1
    second = hub.commit(RELEASE, change)
    res = watcher.poll(now=NOW + 60)
    row = store.model(RELEASE)
    assert (row.sha, row.decision, row.code) == (second, decision, code) and words in row.reason
    assert len(res.queued) == (1 if code == "queued" else 0)
    assert [j.revision for j in store.jobs()] == [first] + ([second] if code == "queued" else [])
    assert watcher.poll(now=NOW + 120).queued == []  # and never twice


def test_operator_skip_and_unskip(tmp_path: Path) -> None:
    settings, store, hub, watcher = make(tmp_path)
    hub.commit("acme/Remote-1B", files(), config={**CONFIG, "auto_map": {"AutoModel": "m.M"}})
    hub.commit(RELEASE, files())
    store.set_manual_skip(RELEASE, True, now=NOW)
    res = watcher.poll(now=NOW)
    assert res.queued == [] and store.model(RELEASE).code == "manual"
    assert hub.requests("model_info") == []
    store.set_manual_skip(RELEASE, False, now=NOW)
    store.set_manual_skip("acme/Remote-1B", False, now=NOW)
    hub.commit(RELEASE, {"README.md": "touched\n"})  # newer than the mark: listed again
    hub.commit("acme/Remote-1B", {"README.md": "touched\n"})
    res = watcher.poll(now=NOW + 60)
    assert len(res.queued) == 1 and store.job(res.queued[0]).repo == RELEASE
    assert store.model("acme/Remote-1B").code == "remote_code"  # decided afresh, with the same rules


def test_manual_enqueue_applies_the_same_rules_and_never_queues_twice(tmp_path: Path) -> None:
    settings, store, hub, watcher = make(tmp_path)
    sha = hub.commit(RELEASE, files())
    hub.commit("acme/Pickle-1B", {"config.json": "{}", "pytorch_model.bin": b"\x80"})
    d, jid = watcher.enqueue_manual(RELEASE, None, now=NOW)
    job = store.job(jid)
    assert d.accept and (job.revision, job.priority, job.reason) == (sha, 1, "enqueued by the operator")
    d, again = watcher.enqueue_manual(RELEASE, sha, now=NOW + 1)
    assert again is None and d.code == "duplicate" and "already has a job" in d.reason
    d, none = watcher.enqueue_manual("acme/Pickle-1B", None, now=NOW + 2)
    assert none is None and d.code == "pickle_only" and "pytorch_model.bin" in d.reason
    assert [j.id for j in store.jobs()] == [jid]


def test_published_models_are_requeued_when_the_toolchain_changes(tmp_path: Path) -> None:
    settings, store, hub, watcher = make(tmp_path, requeue={"on_toolchain_change": True})
    jid = store.enqueue(RELEASE, "a" * 40, reason="new release", now=1)
    store.claim("w", now=2)
    store.transition(jid, J.Status.PUBLISHED, now=3, worker_id="w", toolchain_version="v1")
    [new] = watcher.requeue_for_toolchain(now=4)
    job = store.job(new)
    assert job.dedup_key == f"{RELEASE}@{'a' * 40}#toolchain=v2" and job.reason == "toolchain changed: v1 -> v2"
    assert watcher.requeue_for_toolchain(now=5) == []  # once per toolchain version
