"""bot.hub.client against the local Hub server, through the real huggingface_hub client."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest

from bot.hub.client import Hub, client_retried, safe_relative_path
from bot.model.record import ModelRecord
from bot.model.retry import RetryPolicy
from converters.core.errors import HubAuthError, HubError, HubNotFound, UnsupportedModel
from tests.hubserver import HubServer

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)


def make_hub(sleeps: list[float] | None = None, **kw) -> Hub:
    policy = kw.pop("retry", RetryPolicy(max_attempts=4, base=0.5, cap=2.0))
    return Hub(retry=policy, sleep=(sleeps.append if sleeps is not None else (lambda s: None)), **kw)


# ---------------------------------------------------------------------------------------------- records
def test_whoami(hub_server: HubServer) -> None:
    assert make_hub().whoami() == "tester"


def test_model_info_is_a_typed_record(hub_server: HubServer) -> None:
    sha = hub_server.add_model(
        "acme/base", {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 300},
        card_data={"language": ["en"]}, tags=["transformers", "license:mit"], gated="auto",
        pipeline_tag="text-generation", library_name="transformers", config={"model_type": "llama"},
        safetensors_params={"BF16": 1000, "F32": 24}, created_at=T0, downloads=7, likes=3,
        extra={"gguf": {"total": 1}, "trendingScore": 4})
    r = make_hub().model_info("acme/base")
    assert isinstance(r, ModelRecord)
    assert r.id == "acme/base" and r.sha == sha and len(r.sha) == 40
    assert r.created_at == T0
    assert r.gated == "auto" and r.private is False and r.disabled is False
    assert r.license == "mit"  # from the "license:" tag when the card has none
    assert r.pipeline_tag == "text-generation" and r.library_name == "transformers"
    assert r.config == {"model_type": "llama"}
    assert r.safetensors_total == 1024
    assert (r.downloads, r.likes) == (7, 3)
    assert r.card_data == {"language": ["en"]}
    st = r.sibling("model.safetensors")
    assert st is not None and st.size == 300 and st.lfs_sha256 is not None and len(st.lfs_sha256) == 64
    assert r.sibling("config.json").lfs_sha256 is None
    assert r.extra["gguf"] == {"total": 1}  # unknown fields are kept


def test_model_info_at_a_revision_and_missing(hub_server: HubServer) -> None:
    first = hub_server.add_model("acme/m", {"a.txt": b"1"})
    second = hub_server.add_commit("acme/m", {"b.txt": b"2"})
    hub = make_hub()
    assert hub.model_info("acme/m").sha == second
    old = hub.model_info("acme/m", revision=first)
    assert old.sha == first and old.sibling("b.txt") is None
    with pytest.raises(HubNotFound):
        hub.model_info("acme/missing")
    with pytest.raises(HubNotFound):
        hub.model_info("acme/m", revision="f" * 40)
    hub_server.add_model("other/private", {"a.txt": b"x"}, private=True)
    with pytest.raises(HubNotFound):
        hub.model_info("other/private")
    assert hub.repo_exists("acme/m") and not hub.repo_exists("acme/missing")


def test_list_models_paginates_lazily_in_descending_order(hub_server: HubServer) -> None:
    hub_server.page_size = 2
    for i in range(5):
        hub_server.add_model(f"acme/m{i}", {"a.txt": b"x"}, created_at=T0 + dt.timedelta(hours=i),
                             pipeline_tag="text-generation", tags=["llama"] if i % 2 else ["gpt2"])
    hub_server.add_model("zed/other", {"a.txt": b"x"}, created_at=T0, pipeline_tag="text-generation")
    hub = make_hub()
    ids = [m.id for m in hub.list_models(author="acme", sort="createdAt")]
    assert ids == [f"acme/m{i}" for i in (4, 3, 2, 1, 0)]
    assert hub_server.count("GET", "/api/models") == 3  # three pages through absolute Link headers
    hub_server.clear_log()
    it = hub.list_models(author="acme", sort="createdAt")
    assert next(it).id == "acme/m4"
    assert hub_server.count("GET", "/api/models") == 1  # lazily: one page so far
    assert [m.id for m in hub.list_models(filters=["llama"])] == ["acme/m3", "acme/m1"]
    assert len(list(hub.list_models(limit=3))) == 3


# ---------------------------------------------------------------------------------------------- auth
def test_bad_token_is_a_clear_auth_error_without_the_token(hub_server: HubServer, caplog) -> None:
    secret = "hf_thisIsNotAValidToken123"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HubAuthError) as ei:
        make_hub(token=secret).whoami()
    msg = str(ei.value)
    assert "token" in msg and "401" in msg
    assert secret not in msg and secret not in repr(ei.value)
    assert all(secret not in r.getMessage() for r in caplog.records)
    assert ei.value.transient is False


def test_gated_repo_without_access_says_so(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_model("meta/gated", {"config.json": b"{}"}, gated="manual")
    hub = make_hub()
    with pytest.raises(HubAuthError) as ei:
        hub.download_file("meta/gated", "config.json", dest_dir=tmp_path)
    assert "gated" in str(ei.value)
    hub_server.grant_access("meta/gated", "tester")
    assert hub.download_file("meta/gated", "config.json", dest_dir=tmp_path).read_bytes() == b"{}"


def test_writing_to_a_foreign_namespace_is_forbidden(hub_server: HubServer) -> None:
    with pytest.raises(HubAuthError) as ei:
        make_hub().create_repo("someone-else/x")
    assert ei.value.status == 403


# ---------------------------------------------------------------------------------------------- downloads
def test_download_snapshot_with_patterns_pinned_to_the_revision(hub_server: HubServer, tmp_path: Path) -> None:
    sha = hub_server.add_model("acme/ck", {"config.json": b"{}", "model.safetensors": b"\1" * 64,
                                           "extra/notes.md": b"n"})
    hub_server.add_commit("acme/ck", {"config.json": b'{"v": 2}'})
    dest = make_hub().download_snapshot("acme/ck", sha, tmp_path / "ck", allow_patterns=["*.json", "*.safetensors"])
    assert (dest / "config.json").read_bytes() == b"{}"  # the old revision, not main
    assert (dest / "model.safetensors").read_bytes() == b"\1" * 64
    assert not (dest / "extra").exists()


@pytest.mark.parametrize("bad", ["../evil.txt", "a/../../evil.txt", "/etc/passwd", "dir\\evil.txt"])
def test_download_snapshot_rejects_escaping_names_before_downloading(hub_server: HubServer, tmp_path: Path,
                                                                     bad: str) -> None:
    hub_server.add_model("evil/repo", {"config.json": b"{}", bad: b"x"})
    hub_server.clear_log()
    with pytest.raises(UnsupportedModel):
        make_hub().download_snapshot("evil/repo", None, tmp_path / "d")
    assert not any("/resolve/" in p for _, p in hub_server.requests)
    assert not (tmp_path / "evil.txt").exists()


def test_download_snapshot_checks_size_before_downloading(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_model("big/model", {"model.safetensors": b"\0" * 5000, "config.json": b"{}"})
    hub_server.clear_log()
    hub = make_hub()
    with pytest.raises(UnsupportedModel, match="over the limit"):
        hub.download_snapshot("big/model", None, tmp_path / "d", max_bytes=4000)
    assert not any("/resolve/" in p for _, p in hub_server.requests)
    hub.download_snapshot("big/model", None, tmp_path / "d", allow_patterns="*.json", max_bytes=4000)
    assert (tmp_path / "d" / "config.json").exists()


def test_read_text_missing_file_is_none(hub_server: HubServer) -> None:
    hub_server.add_model("acme/r", {"report.json": b'{"a": 1}'})
    hub = make_hub()
    assert hub.read_text("acme/r", "report.json") == '{"a": 1}'
    assert hub.read_text("acme/r", "nope.json") is None
    with pytest.raises(HubNotFound):
        hub.read_text("acme/none", "report.json")


# ---------------------------------------------------------------------------------------------- retries
def test_retries_5xx_on_calls_the_client_does_not_retry(hub_server: HubServer) -> None:
    hub_server.add_model("acme/r", {"a.txt": b"1"})
    hub_server.fail_next(2, status=503, path_prefix="/api/models/acme/r")
    sleeps: list[float] = []
    assert make_hub(sleeps).model_info("acme/r").id == "acme/r"
    assert sleeps == [0.5, 1.0]
    assert hub_server.count("GET", "/api/models/acme/r") == 3


def test_retry_after_is_honoured(hub_server: HubServer) -> None:
    hub_server.add_model("acme/r", {"a.txt": b"1"})
    hub_server.fail_next(1, status=429, path_prefix="/api/whoami-v2", retry_after=3)
    sleeps: list[float] = []
    assert make_hub(sleeps).whoami() == "tester"
    assert sleeps == [3.0]


def test_gives_up_after_max_attempts_with_a_clear_error(hub_server: HubServer) -> None:
    hub_server.add_model("acme/r", {"a.txt": b"1"})
    hub_server.fail_next(None, status=500, path_prefix="/api/models/acme/r")
    sleeps: list[float] = []
    with pytest.raises(HubError) as ei:
        make_hub(sleeps).model_info("acme/r")
    assert ei.value.status == 500 and ei.value.transient
    assert "500" in str(ei.value) and "acme/r" in str(ei.value)
    assert hub_server.count("GET", "/api/models/acme/r") == 4  # max_attempts, no more
    assert len(sleeps) == 3


def test_dropped_connection_is_retried(hub_server: HubServer) -> None:
    hub_server.add_model("acme/r", {"a.txt": b"1"})
    hub_server.drop_next(1, path_prefix="/api/models/acme/r")
    sleeps: list[float] = []
    assert make_hub(sleeps).model_info("acme/r").id == "acme/r"
    assert sleeps == [0.5]


def test_slow_answer_still_arrives(hub_server: HubServer) -> None:
    hub_server.add_model("acme/r", {"a.txt": b"1"})
    hub_server.slow_next(1, seconds=0.3, path_prefix="/api/models/acme/r")
    assert make_hub().model_info("acme/r").id == "acme/r"


def test_too_slow_answer_times_out_and_is_retried(hub_server: HubServer) -> None:
    hub_server.add_model("acme/r", {"a.txt": b"1"})
    hub_server.slow_next(1, seconds=1.5, path_prefix="/api/models/acme/r")
    sleeps: list[float] = []
    try:
        assert make_hub(sleeps, timeout=0.4).model_info("acme/r").id == "acme/r"
    finally:
        make_hub()  # put the default timeout back for the shared session
    assert sleeps == [0.5]  # one timeout, one retry
    assert hub_server.count("GET", "/api/models/acme/r") == 2


def test_requests_the_client_retried_are_not_retried_again(hub_server: HubServer, tmp_path: Path) -> None:
    """preupload fails forever: the client's own 5 retries, and none of ours on top (6 requests, not 24)."""
    hub = make_hub(sleeps := [])
    hub.create_repo("ggufbot-test/x")
    f = tmp_path / "a.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 100)
    hub_server.fail_next(None, status=500, path_prefix="/api/models/ggufbot-test/x/preupload")
    with pytest.raises(HubError) as ei:
        hub.commit("ggufbot-test/x", additions={"a.gguf": f}, deletions=[], message="m")
    assert ei.value.status == 500
    assert hub_server.count("POST", "/api/models/ggufbot-test/x/preupload") == 6
    assert sleeps == []
    assert hub_server.client_sleeps == [1, 2, 4, 8, 8]  # recorded, not slept (tests.hub_fixtures)


# ---------------------------------------------------------------------------------------------- pure rules
@pytest.mark.parametrize("name, ok", [
    ("model.safetensors", True), ("sub/dir/file.json", True), ("../x", False), ("a/../../x", False),
    ("/abs", False), ("a\\b", False), ("", False), ("a//b", True), ("./a", True), ("dir/", False),
    ("C:evil", False),
])
def test_safe_relative_path(name: str, ok: bool) -> None:
    # PurePosixPath normalises "a//b" and "./a" to plain relative names inside the destination
    assert safe_relative_path(name) is ok


@pytest.mark.parametrize("method, url, status, expected", [
    ("POST", "http://h/api/models/a/b/preupload/main", 500, True),
    ("POST", "http://h/a/b.git/info/lfs/objects/batch", 500, True),
    ("PUT", "http://h/_lfs/upload/abc", 500, True),
    ("GET", "http://h/api/models", 500, True),
    ("GET", "http://h/api/models/a/b/tree/main", 500, True),
    ("HEAD", "http://h/a/b/resolve/main/x", 500, True),
    ("GET", "http://h/a/b/resolve/main/x", 500, False),
    ("GET", "http://h/a/b/resolve/main/x", 429, True),
    ("POST", "http://h/api/models/a/b/commit/main", 500, False),
    ("GET", "http://h/api/models/a/b", 500, False),
    ("GET", "http://h/api/whoami-v2", 500, False),
    ("POST", "http://h/api/repos/create", 500, False),
    ("POST", "http://h/api/validate-yaml", 500, False),
    (None, None, None, False),
])
def test_client_retried(method, url, status, expected) -> None:
    assert client_retried(method, url, status) is expected


def test_invalid_card_metadata_is_rejected_without_retries(hub_server: HubServer, tmp_path: Path) -> None:
    hub = make_hub(sleeps := [])
    hub.create_repo("ggufbot-test/card")
    readme = tmp_path / "README.md"
    readme.write_text("---\nlicense: [unclosed\n---\n# x\n")
    with pytest.raises(HubError) as ei:
        hub.commit("ggufbot-test/card", additions={"README.md": readme}, deletions=[], message="m")
    assert ei.value.status == 400 and not ei.value.transient and "metadata" in str(ei.value)
    assert sleeps == [] and hub_server.count("POST", "/api/models/ggufbot-test/card/commit") == 0
    readme.write_text("---\nlicense: not-a-licence\nbase_model_relation: quantized\n---\n# x\n")
    with pytest.raises(HubError):
        hub.commit("ggufbot-test/card", additions={"README.md": readme}, deletions=[], message="m")
    assert set(hub_server.files("ggufbot-test/card")) == {".gitattributes"}


def test_commit_with_a_stale_parent_is_refused(hub_server: HubServer, tmp_path: Path) -> None:
    hub = make_hub(sleeps := [])
    hub.create_repo("ggufbot-test/p")
    parent = hub.model_info("ggufbot-test/p").sha
    f = tmp_path / "a.txt"
    f.write_text("a")
    first = hub.commit("ggufbot-test/p", additions={"a.txt": f}, deletions=[], message="1", parent_commit=parent)
    with pytest.raises(HubError) as ei:  # someone committed meanwhile: never overwrite their change
        hub.commit("ggufbot-test/p", additions={"b.txt": f}, deletions=["a.txt"], message="2", parent_commit=parent)
    assert ei.value.status == 412 and sleeps == []
    assert hub_server.head("ggufbot-test/p") == first


def test_dataset_file_download(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.add_dataset("acme/texts", {"data/calib.txt": b"some calibration text\n"})
    p = make_hub().download_file("acme/texts", "data/calib.txt", repo_type="dataset", dest_dir=tmp_path)
    assert p.read_bytes() == b"some calibration text\n"
    with pytest.raises(HubNotFound):
        make_hub().download_file("acme/texts", "data/missing.txt", repo_type="dataset", dest_dir=tmp_path)


def test_a_commit_without_parent_is_not_resent_after_a_lost_answer(hub_server: HubServer, tmp_path: Path) -> None:
    hub = make_hub(sleeps := [])
    hub.create_repo("ggufbot-test/lost")
    f = tmp_path / "a.txt"
    f.write_text("a")
    hub_server.drop_next(1, path_prefix="/api/models/ggufbot-test/lost/commit", after=True)
    with pytest.raises(HubError) as ei:
        hub.commit("ggufbot-test/lost", additions={"a.txt": f}, deletions=[], message="m")
    assert ei.value.status is None and sleeps == []
    assert len(hub_server.commits("ggufbot-test/lost")) == 2  # it did land, once
