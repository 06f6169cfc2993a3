"""Another model's repo is never overwritten, and what is published is exactly what was measured: the bot's
publish stage and ``bot.publish.commit`` with the real huggingface_hub client against the local Hub server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bot.hub.client import Hub
from bot.jobs.job import PUBLISHED, PublishStage, PublishTarget
from bot.publish.commit import PublishOptions, publish
from bot.publish.target import TargetPolicy, note_created
from bot.jobs.variants import publish_variant
from converters.core.errors import CheckFailed
from converters.core.hooks import NULL_HOOKS
from converters.ladder.job import JobContext
from converters.core.workdir import VariantInfo, WorkDir
from tests.hub_fixtures import TEST_ORG
from tests.hubserver import HubServer
from tests.workdirs import make_workdir

MODEL = "Tiny-Instruct"
A, B = f"acme/{MODEL}", f"other-lab/{MODEL}"
TARGET = f"{TEST_ORG}/{MODEL}-GGUF"
B_TARGET = f"{TEST_ORG}/other-lab_{MODEL}-GGUF"
CARD = {"license": "apache-2.0", "pipeline_tag": "text-generation"}


def _release(server: HubServer, repo: str) -> str:
    return server.add_model(repo, {"config.json": b'{"model_type": "llama"}'}, card_data=CARD,
                            pipeline_tag="text-generation")


def _bot_publish(wd: Path, source: str, policy: TargetPolicy = TargetPolicy()) -> str:
    """The bot's publish stage, as ``JobSpec.from_settings`` configures it (template ``{model}-GGUF``)."""
    target = PublishTarget(namespace=TEST_ORG, template="{model}-GGUF", policy=policy)
    ctx = JobContext(wd, None, NULL_HOOKS, MODEL, source_repo=source)
    PublishStage(target, Hub()).run(ctx)
    return ctx.get(PUBLISHED).repo_id


def _writes(server: HubServer) -> list[tuple[str, str]]:
    return [(m, p) for m, p in server.requests if m in ("POST", "PUT", "DELETE") and p != "/api/validate-yaml"]


def test_two_authors_release_the_same_name_both_are_published(hub_server: HubServer, tmp_path: Path) -> None:
    rev_a, rev_b = _release(hub_server, A), _release(hub_server, B)
    wd_a = make_workdir(tmp_path / "a", source_repo=A, revision=rev_a, seed="a")
    wd_b = make_workdir(tmp_path / "b", source_repo=B, revision=rev_b, seed="b")
    assert _bot_publish(wd_a, A) == TARGET
    a_files = hub_server.files(TARGET)
    assert "ggufbot" in a_files["README.md"].decode().split("---")[1]  # the marker, in the card's metadata

    assert _bot_publish(wd_b, B) == B_TARGET  # a different source: the disambiguated name
    assert hub_server.files(TARGET) == a_files  # untouched
    b_files = hub_server.files(B_TARGET)
    assert b_files[f"{MODEL}-Q4_K_M.gguf"] == (wd_b / f"{MODEL}-Q4_K_M.gguf").read_bytes()
    assert json.loads(b_files["report.json"])["publication"]["source"]["repo"] == B
    assert f"base_model: {B}" in b_files["README.md"].decode()

    # a new revision of each updates its own repo, never the other one
    rev_a2 = hub_server.add_commit(A, {"config.json": b'{"model_type": "llama", "x": 1}'})
    rev_b2 = hub_server.add_commit(B, {"config.json": b'{"model_type": "llama", "x": 2}'})
    assert _bot_publish(make_workdir(tmp_path / "b2", source_repo=B, revision=rev_b2, seed="b2"), B) == B_TARGET
    assert _bot_publish(make_workdir(tmp_path / "a2", source_repo=A, revision=rev_a2, seed="a2"), A) == TARGET
    assert json.loads(hub_server.files(TARGET)["report.json"])["publication"]["source"] == {"repo": A,
                                                                                          "revision": rev_a2}
    assert json.loads(hub_server.files(B_TARGET)["report.json"])["publication"]["source"] == {"repo": B,
                                                                                            "revision": rev_b2}


def test_collision_fails_with_the_reason_when_renaming_is_off(hub_server: HubServer, tmp_path: Path) -> None:
    rev_a, rev_b = _release(hub_server, A), _release(hub_server, B)
    _bot_publish(make_workdir(tmp_path / "a", source_repo=A, revision=rev_a, seed="a"), A)
    before = hub_server.files(TARGET)
    hub_server.clear_log()
    with pytest.raises(CheckFailed) as e:
        _bot_publish(make_workdir(tmp_path / "b", source_repo=B, revision=rev_b, seed="b"), B,
                     TargetPolicy(on_collision="fail"))
    assert f"it holds GGUFs of {A}, not of {B}" in str(e.value) and B_TARGET in str(e.value)
    assert _writes(hub_server) == [] and hub_server.files(TARGET) == before
    assert hub_server.repo(B_TARGET) is None


def test_an_explicit_repo_of_another_source_is_refused(hub_server: HubServer, tmp_path: Path) -> None:
    rev_a, rev_b = _release(hub_server, A), _release(hub_server, B)
    publish(make_workdir(tmp_path / "a", source_repo=A, revision=rev_a, seed="a"), Hub(), PublishOptions(namespace=TEST_ORG))
    hub_server.clear_log()
    with pytest.raises(CheckFailed, match="another model's repo is never written to"):
        publish(make_workdir(tmp_path / "b", source_repo=B, revision=rev_b, seed="b"), Hub(),
                PublishOptions(repo_id=TARGET))
    assert _writes(hub_server) == []


def test_a_repo_without_the_marker_is_written_only_when_adopted(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _release(hub_server, A)
    # made by hand for the same source: no ggufbot tag in its card
    hub_server.add_model(TARGET, {"notes.txt": b"hand-made"}, card_data={"base_model": A, "license": "mit"})
    hand_made = hub_server.files(TARGET)
    wd = make_workdir(tmp_path, source_repo=A, revision=rev)
    with pytest.raises(CheckFailed, match="not made by ggufbot"):
        _bot_publish(wd, A, TargetPolicy(on_collision="fail"))
    assert _bot_publish(wd, A) == f"{TEST_ORG}/acme_{MODEL}-GGUF"  # renamed, the hand-made repo untouched
    assert hub_server.files(TARGET) == hand_made
    assert _bot_publish(wd, A, TargetPolicy(adopt=(TARGET,))) == TARGET  # adopted explicitly
    assert f"{MODEL}-Q4_K_M.gguf" in hub_server.files(TARGET)


def test_adoption_never_waives_the_source(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _release(hub_server, A)
    hub_server.add_model(TARGET, {"x.gguf": b"GGUF other"}, card_data={"base_model": B, "license": "mit"})
    with pytest.raises(CheckFailed, match=f"it holds GGUFs of {B}"):
        _bot_publish(make_workdir(tmp_path, source_repo=A, revision=rev), A,
                     TargetPolicy(on_collision="fail", adopt=(TARGET,)))


def test_an_empty_repo_this_workdir_created_is_resumed(hub_server: HubServer, tmp_path: Path) -> None:
    """A run killed between creating the repo and its commit finds the empty repo its own; another work dir
    does not."""
    rev = _release(hub_server, A)
    wd = make_workdir(tmp_path / "one", source_repo=A, revision=rev)
    note_created(wd, TARGET)
    Hub().create_repo(TARGET, exist_ok=False)
    other = make_workdir(tmp_path / "two", source_repo=A, revision=rev)
    with pytest.raises(CheckFailed, match="not made by ggufbot"):
        _bot_publish(other, A, TargetPolicy(on_collision="fail"))
    assert _bot_publish(wd, A) == TARGET
    assert f"{MODEL}-Q8_0.gguf" in hub_server.files(TARGET)


def _variant_workdir(root: Path, source: str, rev: str) -> Path:
    wd = make_workdir(root, model=f"{MODEL}-prune-1-layer", source_repo=source, revision=rev, seed=source)
    WorkDir(wd).write_variant(VariantInfo.from_json({
        "recipe": {"name": "prune-1-layer", "description": "one layer removed"},
        "teacher": {"model_name": MODEL, "repo": source, "layers": 2, "parameters": 1000},
        "variant": {"layers": 1, "parameters": 600}}))
    return wd


def test_variant_repos_of_two_sources_are_kept_apart(hub_server: HubServer, tmp_path: Path) -> None:
    rev_a, rev_b = _release(hub_server, A), _release(hub_server, B)
    res_a = publish_variant(_variant_workdir(tmp_path / "a", A, rev_a), Hub(), PublishOptions(namespace=TEST_ORG))
    assert res_a.repo_id == f"{TEST_ORG}/{MODEL}-prune-1-layer-GGUF"
    before = hub_server.files(res_a.repo_id)
    res_b = publish_variant(_variant_workdir(tmp_path / "b", B, rev_b), Hub(), PublishOptions(namespace=TEST_ORG))
    assert res_b.repo_id == f"{TEST_ORG}/other-lab_{MODEL}-prune-1-layer-GGUF"
    assert hub_server.files(res_a.repo_id) == before


def test_a_variant_never_lands_in_the_plain_quants_repo(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _release(hub_server, A)
    publish(make_workdir(tmp_path / "plain", source_repo=A, revision=rev), Hub(), PublishOptions(namespace=TEST_ORG))
    with pytest.raises(CheckFailed, match="plain quantizations of that source, this is a pruned variant"):
        publish_variant(_variant_workdir(tmp_path / "v", A, rev), Hub(), PublishOptions(repo_id=TARGET))


# ------------------------------------------------------------------------------ published = measured
def test_a_file_changed_in_place_after_the_evaluation_is_refused(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _release(hub_server, A)
    wd = make_workdir(tmp_path, source_repo=A, revision=rev)
    q4 = wd / f"{MODEL}-Q4_K_M.gguf"
    publish(wd, Hub(), PublishOptions(namespace=TEST_ORG))  # hashes cached from here on
    data = bytearray(q4.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    st = q4.stat()
    q4.write_bytes(bytes(data))
    os.utime(q4, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    hub_server.clear_log()
    with pytest.raises(CheckFailed, match=f"changed since it was measured: {MODEL}-Q4_K_M.gguf"):
        publish(wd, Hub(), PublishOptions(namespace=TEST_ORG))
    assert _writes(hub_server) == []


def test_a_split_part_and_an_imatrix_file_are_checked_too(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _release(hub_server, A)
    wd = make_workdir(tmp_path, source_repo=A, revision=rev, split=("Q8_0",))
    part2 = wd / f"{MODEL}-Q8_0" / f"{MODEL}-Q8_0-00002-of-00002.gguf"
    part2.write_bytes(part2.read_bytes()[::-1])
    (wd / f"{MODEL}-imatrix.dat").write_bytes(b"\0imatrix dat X")
    with pytest.raises(CheckFailed) as e:
        publish(wd, Hub(), PublishOptions(namespace=TEST_ORG))
    assert f"{MODEL}-Q8_0/{MODEL}-Q8_0-00002-of-00002.gguf" in str(e.value)
    assert f"{MODEL}-imatrix.dat" in str(e.value)


def test_a_report_without_measured_hashes_publishes_nothing(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _release(hub_server, A)
    wd = make_workdir(tmp_path, source_repo=A, revision=rev)
    report = WorkDir(wd).report()
    report.file_hashes = {}
    WorkDir(wd).write_report(report)
    with pytest.raises(CheckFailed, match="not measured"):
        publish(wd, Hub(), PublishOptions(namespace=TEST_ORG))
    assert hub_server.repo(TARGET) is None


# ------------------------------------------------------------------------------ fetch: content identities
def _fetch(wd: Path, rev: str) -> dict:
    from bot.jobs.job import FetchPolicy, FetchStage, Source
    from converters.core import records

    ctx = JobContext(wd, None, NULL_HOOKS, MODEL, source_repo=A, source_revision=rev)
    FetchStage(Source(repo=A, revision=rev), FetchPolicy(), Hub()).run(ctx)
    return records.load(wd, "fetch").extra["files"]


def test_fetch_records_the_hubs_lfs_sha256_and_a_same_size_revision_is_new_content(hub_server: HubServer,
                                                                                   tmp_path: Path) -> None:
    from converters.formats import checkpoint
    from converters.core import records

    weights = b"\0" * 4096 + b"A" * 4096
    rev1 = hub_server.add_model(A, {"config.json": b'{"model_type": "llama"}', "model.safetensors": weights},
                                card_data=CARD)
    files = _fetch(tmp_path, rev1)
    lfs = {s.rfilename: s.lfs_sha256 for s in Hub().model_info(A, revision=rev1).siblings}
    assert files["model.safetensors"] == {"size": len(weights), "sha256": lfs["model.safetensors"]}
    first = checkpoint.files_fingerprint(tmp_path / "source", tmp_path)

    hub_server.clear_log()
    _fetch(tmp_path, rev1)  # the same revision, files intact: nothing downloaded
    assert hub_server.count("GET", f"/{A}/resolve") == 0

    rev2 = hub_server.add_commit(A, {"model.safetensors": b"\0" * 4096 + b"B" * 4096})  # same size
    files2 = _fetch(tmp_path, rev2)
    assert files2["model.safetensors"]["size"] == len(weights)
    assert files2["model.safetensors"]["sha256"] != files["model.safetensors"]["sha256"]
    assert checkpoint.files_fingerprint(tmp_path / "source", tmp_path) != first  # convert will not be skipped
    assert records.sha256_file(tmp_path / "source" / "model.safetensors") == files2["model.safetensors"]["sha256"]


def test_cli_publish_adopts_only_what_it_is_told(hub_server: HubServer, tmp_path: Path, capsys) -> None:
    from bot.cli import main

    rev = _release(hub_server, A)
    hub_server.add_model(TARGET, {"notes.txt": b"hand-made"}, card_data={"base_model": A, "license": "mit"})
    wd = make_workdir(tmp_path, source_repo=A, revision=rev)
    assert main(["publish", str(wd), "--repo", TARGET]) == 1
    assert "not made by ggufbot" in capsys.readouterr().err
    assert main(["publish", str(wd), "--repo", TARGET, "--adopt"]) == 0
    assert f"updated {TARGET}" in capsys.readouterr().out
    assert f"{MODEL}-Q4_K_M.gguf" in hub_server.files(TARGET)
