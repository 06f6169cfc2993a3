"""Publishing acceptance tests: the real huggingface_hub client against the local Hub server."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from bot.hub.client import Hub
from bot.publish.commit import PublishOptions, publish
from bot.model.retry import RetryPolicy
from converters.core.errors import CheckFailed, HubAuthError, HubError
from tests.hub_fixtures import TEST_ORG, TEST_TOKEN
from tests.hubserver import HubServer, _validate_front_matter
from tests.workdirs import make_workdir

SOURCE = "acme/Tiny-Instruct"
TARGET = f"{TEST_ORG}/Tiny-Instruct-GGUF"
SOURCE_CARD = {"license": "apache-2.0", "language": ["en"], "pipeline_tag": "text-generation"}
OPTS = PublishOptions(namespace=TEST_ORG)


def _hub(sleeps: list[float] | None = None, token: str | None = None) -> Hub:
    return Hub(token=token, retry=RetryPolicy(max_attempts=4, base=0.25, cap=1.0),
               sleep=sleeps.append if sleeps is not None else (lambda s: None))


def _source(server: HubServer, **kw) -> str:
    return server.add_model(SOURCE, {"config.json": b'{"model_type": "llama"}'}, card_data=kw.pop("card", SOURCE_CARD),
                            pipeline_tag="text-generation", **kw)


def _writes(server: HubServer) -> list[tuple[str, str]]:
    return [(m, p) for m, p in server.requests if m in ("POST", "PUT", "DELETE") and p != "/api/validate-yaml"]


def test_create_and_publish(hub_server: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    rev = _source(hub_server)
    wd = make_workdir(tmp_path, revision=rev, types=("Q8_0", "Q4_K_M", "Q2_K"), failed=("Q2_K",), split=("Q8_0",))
    plan, res = publish(wd, _hub(), OPTS)
    assert res is not None and res.action == "create" and res.repo_id == TARGET
    assert res.commit == hub_server.head(TARGET)
    commits = hub_server.commits(TARGET)
    assert len(commits) == 2  # the repo's initial commit, then everything in ONE commit
    files = hub_server.files(TARGET)
    assert set(files) == {
        ".gitattributes", "README.md", "report.json", "size-vs-kld.png",
        "Tiny-Instruct-Q4_K_M.gguf",
        "Tiny-Instruct-Q8_0/Tiny-Instruct-Q8_0-00001-of-00002.gguf",
        "Tiny-Instruct-Q8_0/Tiny-Instruct-Q8_0-00002-of-00002.gguf",
        "Tiny-Instruct-imatrix.gguf", "Tiny-Instruct-imatrix.dat",
    }
    assert "Tiny-Instruct-Q2_K.gguf" not in files  # failed the gate
    assert files["Tiny-Instruct-Q4_K_M.gguf"] == (wd / "Tiny-Instruct-Q4_K_M.gguf").read_bytes()
    pub = json.loads(files["report.json"])["publication"]
    assert pub["source"] == {"repo": SOURCE, "revision": rev}
    assert pub["ladder"] == ["Q8_0", "Q4_K_M", "Q2_K"]

    readme = files["README.md"].decode()
    assert _validate_front_matter(readme) == []
    card = ModelCard(readme)
    assert card.data.base_model == SOURCE
    assert card.data.base_model_relation == "quantized"
    assert card.data.license == "apache-2.0"
    assert card.data.language == ["en"]
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.quantized_by == TEST_ORG
    assert set(card.data.tags) >= {"gguf", "imatrix", "llama.cpp", "quantized"}
    assert f"commit [`{rev[:12]}`]" in card.text
    # the published repo reads back as a model the Hub tags as GGUF with its licence
    info = _hub().model_info(TARGET)
    assert info.license == "apache-2.0" and "gguf" in info.tags


def test_publish_again_makes_no_commit(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _source(hub_server)
    wd = make_workdir(tmp_path, revision=rev)
    publish(wd, _hub(), OPTS)
    head = hub_server.head(TARGET)
    hub_server.clear_log()
    plan, res = publish(wd, _hub(), OPTS)
    assert res is not None and res.action == "none" and res.commit is None
    assert hub_server.head(TARGET) == head
    assert _writes(hub_server) == []  # nothing uploaded, nothing committed


def test_update_after_a_new_source_revision(hub_server: HubServer, tmp_path: Path) -> None:
    rev1 = _source(hub_server)
    publish(make_workdir(tmp_path / "v1", revision=rev1, types=("Q8_0", "Q4_K_M", "Q2_K")), _hub(), OPTS)
    n_commits = len(hub_server.commits(TARGET))
    rev2 = hub_server.add_commit(SOURCE, {"model.safetensors": b"\0new weights"})
    wd2 = make_workdir(tmp_path / "v2", revision=rev2, types=("Q8_0", "Q4_K_M"), seed="v2")
    plan, res = publish(wd2, _hub(), OPTS)
    assert res is not None and res.action == "update"
    assert len(hub_server.commits(TARGET)) == n_commits + 1  # one commit for the whole update
    files = hub_server.files(TARGET)
    assert "Tiny-Instruct-Q2_K.gguf" not in files  # no longer in the ladder: deleted in that commit
    assert files["Tiny-Instruct-Q4_K_M.gguf"] == (wd2 / "Tiny-Instruct-Q4_K_M.gguf").read_bytes()
    readme = files["README.md"].decode()
    assert "What's new" in readme and f"rebuilt from source commit {rev2[:12]} (was {rev1[:12]})" in readme
    assert "removed Tiny-Instruct-Q2_K.gguf" in readme
    assert json.loads(files["report.json"])["publication"]["source"]["revision"] == rev2
    assert "Tiny-Instruct-Q2_K.gguf" in plan.deletions
    # and that update is itself idempotent
    _, again = publish(wd2, _hub(), OPTS)
    assert again is not None and again.action == "none"


def test_update_after_a_new_toolchain_version(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _source(hub_server)
    publish(make_workdir(tmp_path / "v1", revision=rev), _hub(), OPTS)
    wd2 = make_workdir(tmp_path / "v2", revision=rev, toolchain="llama.cpp b10000 (test)", seed="tc")
    _, res = publish(wd2, _hub(), OPTS)
    assert res is not None and res.action == "update"
    assert "requantized with llama.cpp b10000 (test) (was llama.cpp b9999 (test))" in \
        hub_server.files(TARGET)["README.md"].decode()


def test_gated_source_fields_are_passed_through(hub_server: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    gated_card = {**SOURCE_CARD, "license": "other", "license_name": "tiny-community-license",
                  "license_link": "LICENSE", "extra_gated_prompt": "You agree to the Tiny license.",
                  "extra_gated_fields": {"Company": "text", "I agree": "checkbox"}}
    rev = _source(hub_server, card=gated_card, gated="manual")
    _, res = publish(make_workdir(tmp_path, revision=rev, license=None), _hub(), OPTS)
    assert res is not None
    card = ModelCard(hub_server.files(TARGET)["README.md"].decode())
    assert card.data.license == "other"
    assert card.data.license_name == "tiny-community-license"
    # a link relative to the source repo points at the source's file at the converted revision
    assert card.data.license_link.startswith("http") and card.data.license_link.endswith(f"/{SOURCE}/blob/{rev}/LICENSE")
    assert card.data.extra_gated_prompt == "You agree to the Tiny license."
    assert card.data.extra_gated_fields == {"Company": "text", "I agree": "checkbox"}
    assert hub_server.repo(TARGET).gated == "manual"  # gated before any file landed


def test_429_then_success(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _source(hub_server)
    hub_server.fail_next(1, status=429, path_prefix=f"/api/models/{TARGET}/commit", retry_after=2)
    sleeps: list[float] = []
    _, res = publish(make_workdir(tmp_path, revision=rev), _hub(sleeps), OPTS)
    assert res is not None and res.commit == hub_server.head(TARGET)
    assert sleeps == [2.0]  # Retry-After honoured, once
    assert hub_server.count("POST", f"/api/models/{TARGET}/commit") == 2


def test_500_three_times_then_success(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _source(hub_server)
    hub_server.fail_next(3, status=500, path_prefix=f"/api/models/{TARGET}/commit")
    sleeps: list[float] = []
    _, res = publish(make_workdir(tmp_path, revision=rev), _hub(sleeps), OPTS)
    assert res is not None and res.commit == hub_server.head(TARGET)
    assert sleeps == [0.25, 0.5, 1.0]
    assert hub_server.count("POST", f"/api/models/{TARGET}/commit") == 4
    assert len(hub_server.commits(TARGET)) == 2  # exactly one commit landed


def test_500_forever_is_a_clear_error_and_the_repo_is_unchanged(hub_server: HubServer, tmp_path: Path) -> None:
    rev1 = _source(hub_server)
    publish(make_workdir(tmp_path / "v1", revision=rev1), _hub(), OPTS)
    head, before = hub_server.head(TARGET), hub_server.files(TARGET)
    rev2 = hub_server.add_commit(SOURCE, {"model.safetensors": b"\0v2"})
    hub_server.fail_next(None, status=500, path_prefix=f"/api/models/{TARGET}/commit")
    with pytest.raises(HubError) as ei:
        publish(make_workdir(tmp_path / "v2", revision=rev2, seed="v2"), _hub(), OPTS)
    msg = str(ei.value)
    assert "publishing" in msg and TARGET in msg and "unchanged" in msg and "500" in msg
    assert ei.value.transient  # the runner may try the job again later
    assert hub_server.head(TARGET) == head and hub_server.files(TARGET) == before


def test_500_forever_on_a_new_repo_leaves_no_repo(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _source(hub_server)
    hub_server.fail_next(None, status=500, path_prefix=f"/api/models/{TARGET}/commit")
    with pytest.raises(HubError):
        publish(make_workdir(tmp_path, revision=rev), _hub(), OPTS)
    assert hub_server.repo(TARGET) is None  # the empty repo created by this run was removed


def test_bad_token_fails_before_any_upload(hub_server: HubServer, tmp_path: Path, caplog) -> None:
    rev = _source(hub_server)
    bad = "hf_definitelyNotValid0000"
    hub_server.clear_log()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HubAuthError) as ei:
        publish(make_workdir(tmp_path, revision=rev), _hub(token=bad), OPTS)
    assert "token" in str(ei.value) and bad not in str(ei.value)
    assert hub_server.requests == [("GET", "/api/whoami-v2")]
    assert hub_server.repo(TARGET) is None
    assert all(bad not in r.getMessage() for r in caplog.records)


def test_not_publishable_publishes_nothing(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _source(hub_server)
    hub_server.clear_log()
    with pytest.raises(CheckFailed, match="not publishable"):
        publish(make_workdir(tmp_path, revision=rev, publishable=False), _hub(), OPTS)
    assert hub_server.requests == []


def test_all_quants_failed_publishes_nothing(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _source(hub_server)
    with pytest.raises(CheckFailed, match="no quant passed"):
        publish(make_workdir(tmp_path, revision=rev, failed=("Q8_0", "Q4_K_M", "Q2_K")), _hub(), OPTS)
    assert hub_server.repo(TARGET) is None


def test_the_token_is_in_no_published_file_and_no_log_line(hub_server: HubServer, tmp_path: Path, caplog) -> None:
    rev = _source(hub_server)
    caplog.set_level(logging.DEBUG)
    publish(make_workdir(tmp_path, revision=rev), _hub(token=TEST_TOKEN), OPTS)
    for path, data in hub_server.files(TARGET).items():
        assert TEST_TOKEN.encode() not in data, path
    assert all(TEST_TOKEN not in r.getMessage() for r in caplog.records)


def test_cli_dry_run_then_publish(hub_server: HubServer, tmp_path: Path, capsys) -> None:
    from bot.cli import main

    rev = _source(hub_server)
    wd = make_workdir(tmp_path, revision=rev)
    assert main(["publish", str(wd), "--repo", TARGET, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["action"] == "create" and plan["repo_id"] == TARGET and "README.md" in plan["upload"]
    assert hub_server.repo(TARGET) is None  # a dry run writes nothing
    assert main(["publish", str(wd), "--repo", TARGET]) == 0
    assert "created" in capsys.readouterr().out and hub_server.head(TARGET)
    assert main(["publish", str(wd), "--repo", TARGET]) == 0
    assert "up to date" in capsys.readouterr().out


def test_cli_bad_token_exits_with_a_clear_message(hub_server: HubServer, tmp_path: Path, capsys,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.cli import main

    rev = _source(hub_server)
    monkeypatch.setenv("HF_TOKEN", "hf_wrongwrongwrong1234")
    assert main(["publish", str(make_workdir(tmp_path, revision=rev)), "--repo", TARGET]) == 1
    err = capsys.readouterr().err
    assert "token" in err and "hf_wrongwrongwrong1234" not in err


def test_a_failed_lfs_upload_leaves_the_repo_unchanged(hub_server: HubServer, tmp_path: Path) -> None:
    rev1 = _source(hub_server)
    publish(make_workdir(tmp_path / "v1", revision=rev1), _hub(), OPTS)
    head, before = hub_server.head(TARGET), hub_server.files(TARGET)
    rev2 = hub_server.add_commit(SOURCE, {"model.safetensors": b"\0v2"})
    hub_server.fail_next(None, status=503, path_prefix="/_lfs/upload/")
    sleeps: list[float] = []
    with pytest.raises(HubError) as ei:
        publish(make_workdir(tmp_path / "v2", revision=rev2, seed="v2"), _hub(sleeps), OPTS)
    assert "unchanged" in str(ei.value)
    assert sleeps == []  # the client retried the uploads itself (sleeps recorded by the fixture); we did not
    from collections import Counter

    puts = Counter(p for m, p in hub_server.requests if m == "PUT" and p.startswith("/_lfs/upload/"))
    assert puts and max(puts.values()) == 6  # 1 + the client's 5 retries per file, never more
    assert hub_server.head(TARGET) == head and hub_server.files(TARGET) == before


def test_a_dropped_commit_request_is_retried_once(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _source(hub_server)
    hub_server.drop_next(1, path_prefix=f"/api/models/{TARGET}/commit")
    _, res = publish(make_workdir(tmp_path, revision=rev), _hub(), OPTS)
    assert res is not None and res.commit == hub_server.head(TARGET)
    assert len(hub_server.commits(TARGET)) == 2


def test_a_lost_answer_to_a_landed_commit_is_not_committed_twice(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _source(hub_server)
    hub_server.drop_next(1, path_prefix=f"/api/models/{TARGET}/commit", after=True)
    _, res = publish(make_workdir(tmp_path, revision=rev), _hub(), OPTS)
    # the retry is refused (parent moved: 412), and the repo is found to hold this very publication
    assert res is not None and res.commit == hub_server.head(TARGET)
    assert len(hub_server.commits(TARGET)) == 2
    assert hub_server.count("POST", f"/api/models/{TARGET}/commit") == 2
