"""Early publishing (issue 20, part 2) against the local Hub server and the real huggingface_hub client: files are
pre-uploaded as their verdicts arrive, the ladder is published in groups along the publish order, every commit's
card and report.json describe exactly the files in the repo then, and an interrupted publication resumes without
sending the uploaded bytes again. The pipeline is played by announcing :class:`FileReady` values of a finished work
dir (:func:`bot.publish.early.finished_files`), in the order a test chooses."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from bot.hub.client import Hub
from bot.model.retry import RetryPolicy
from bot.publish.commit import PublishOptions, publish
from bot.publish.early import EarlyOptions, EarlyPublisher, file_states, finished_files, publish_groups, read_state
from converters.core.errors import CheckFailed
from tests.hub_fixtures import TEST_ORG
from tests.hubserver import HubServer
from tests.workdirs import make_workdir

MODEL = "Tiny-Instruct"
SOURCE = f"acme/{MODEL}"
TARGET = f"{TEST_ORG}/{MODEL}-GGUF"
OPTS = PublishOptions(namespace=TEST_ORG)
TYPES = ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K")


def _hub() -> Hub:
    return Hub(retry=RetryPolicy(max_attempts=3, base=0.01, cap=0.01), sleep=lambda s: None)


def _release(server: HubServer) -> str:
    return server.add_model(SOURCE, {"config.json": b'{"model_type": "llama"}'}, card_data={"license": "mit"},
                            pipeline_tag="text-generation")


def _ggufs(files: dict[str, bytes]) -> set[str]:
    return {p for p in files if p.endswith(".gguf") and "imatrix" not in p}


def _card_files(readme: str) -> set[str]:
    """The quant files the card's file table lists."""
    table = readme.split("## Files", 1)[1].split("\n\n", 2)[1]
    return set(re.findall(r"^\| \[(" + MODEL + r"-[A-Z0-9_]+\.gguf)\]", table, re.M))


def test_groups_follow_the_publish_order() -> None:
    assert publish_groups(TYPES, ("Q4_K_M", "Q8_0", "Q6_K", "Q5_K_M"), (1, 3)) == [
        ("Q4_K_M",), ("Q8_0", "Q6_K"), ("Q3_K_M", "Q2_K")]
    assert publish_groups(("Q8_0",), ("Q4_K_M",), (1, 3)) == [("Q8_0",)]
    assert publish_groups(("Q8_0", "Q4_K_M"), ("Q4_K_M", "Q8_0"), (1, 1, 1)) == [("Q4_K_M",), ("Q8_0",)]


def test_early_commits_describe_exactly_the_files_in_the_repo(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _release(hub_server)
    wd = make_workdir(tmp_path, revision=rev, types=TYPES, failed=("Q2_K",))
    pub = EarlyPublisher(wd, _hub(), OPTS, EarlyOptions())
    for item in finished_files(wd):  # in ladder order: Q8_0 is announced before Q4_K_M
        pub.ready(item)
    res = pub.finish()
    assert res.repo_id == TARGET
    commits = [c for c in hub_server.commits(TARGET) if c.parent is not None]
    assert len(commits) == 3  # Q4_K_M; then Q8_0 + Q6_K; then the rest (Q3_K_M; Q2_K withheld) with the chart
    seen = []
    for c in commits:
        files = hub_server.files(TARGET, revision=c.sha)
        report = json.loads(files["report.json"])
        readme = files["README.md"].decode()
        in_repo = _ggufs(files)
        assert {f["path"] for f in report["files"] if f["status"] == "passed"} == in_repo
        assert set(report["publication"]["files"]) == {p for p in files if p not in (".gitattributes", "README.md",
                                                                                        "report.json")}
        assert _card_files(readme) == in_repo
        pending = report.get("pending") or []
        assert pending == (report["publication"].get("pending") or [])
        for t in pending:
            assert f"{MODEL}-{t}.gguf" not in files and t in readme.split("Still coming:")[1].split("\n")[0]
        assert "Still coming" not in readme if not pending else True
        assert f"{MODEL}-imatrix.gguf" in files  # the imatrix comes with the first commit
        seen.append((sorted(t for t in TYPES if f"{MODEL}-{t}.gguf" in files), pending, "size-vs-kld.png" in files))
    assert seen == [(["Q4_K_M"], ["Q8_0", "Q6_K", "Q3_K_M"], False),
                    (["Q4_K_M", "Q6_K", "Q8_0"], ["Q3_K_M"], False),
                    (["Q3_K_M", "Q4_K_M", "Q6_K", "Q8_0"], [], True)]
    assert "Q2_K" in readme and "Withheld" in readme
    assert commits[0].summary.startswith(f"Add {MODEL} GGUF (Q4_K_M; ")
    # the last commit is the publication a single commit makes: publishing again changes nothing
    plan, again = publish(wd, _hub(), OPTS)
    assert again is not None and again.action == "none"
    assert file_states(wd) == {"Q4_K_M": "published", "Q8_0": "published", "Q6_K": "published",
                               "Q3_K_M": "published"}
    assert read_state(wd)["done"] is True


def test_the_first_group_does_not_wait_for_the_others(hub_server: HubServer, tmp_path: Path) -> None:
    """Q4_K_M is committed while the next files are still being made: the pipeline announces them later."""
    rev = _release(hub_server)
    wd = make_workdir(tmp_path, revision=rev, types=TYPES)
    items = {i.type: i for i in finished_files(wd)}
    pub = EarlyPublisher(wd, _hub(), OPTS, EarlyOptions())
    pub.ready(items["Q4_K_M"])
    deadline = time.monotonic() + 20
    while hub_server.head(TARGET) is None or len(hub_server.commits(TARGET)) < 2:
        assert time.monotonic() < deadline, "no early commit of Q4_K_M"
        time.sleep(0.05)
    files = hub_server.files(TARGET)
    assert _ggufs(files) == {f"{MODEL}-Q4_K_M.gguf"}
    for t in ("Q8_0", "Q6_K", "Q3_K_M", "Q2_K"):
        pub.ready(items[t])
    pub.finish()
    assert _ggufs(hub_server.files(TARGET)) == {f"{MODEL}-{t}.gguf" for t in TYPES}


def test_an_interrupted_publication_resumes_without_sending_bytes_again(hub_server: HubServer,
                                                                          tmp_path: Path) -> None:
    rev = _release(hub_server)
    wd = make_workdir(tmp_path, revision=rev, types=TYPES)
    items = {i.type: i for i in finished_files(wd)}
    sizes = {t: sum((wd / p).stat().st_size for p in items[t].paths) for t in TYPES}
    hub_server.upload_bytes_per_second = 50_000_000  # counts each LFS upload's bytes (upload_spans)
    first = EarlyPublisher(wd, _hub(), OPTS, EarlyOptions(groups=(1, 3)))
    for t in ("Q8_0", "Q6_K"):  # group 2 uploaded, group 1 (Q4_K_M) not announced: nothing committed
        first.ready(items[t])
    deadline = time.monotonic() + 20
    while file_states(wd) != {"Q8_0": "uploaded", "Q6_K": "uploaded"}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [c for c in hub_server.commits(TARGET) if c.parent is not None] == []  # the run "dies" here
    sent_before = sum(b for _, _, b in hub_server.upload_spans)
    hub_server.upload_spans.clear()
    second = EarlyPublisher(wd, _hub(), OPTS, EarlyOptions(groups=(1, 3)))
    for item in finished_files(wd):
        second.ready(item)
    second.finish()
    sent_after = sum(b for _, _, b in hub_server.upload_spans)
    assert sent_before >= sizes["Q8_0"] + sizes["Q6_K"]
    # Q8_0 and Q6_K were not sent again: the client asked the server which objects it had
    assert sent_after == sizes["Q4_K_M"] + sizes["Q3_K_M"] + sizes["Q2_K"] + (wd / f"{MODEL}-imatrix.gguf").stat().st_size \
        + (wd / f"{MODEL}-imatrix.dat").stat().st_size + (wd / "size-vs-kld.png").stat().st_size
    assert _ggufs(hub_server.files(TARGET)) == {f"{MODEL}-{t}.gguf" for t in TYPES}


def test_a_file_changed_after_its_measurement_is_never_uploaded(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _release(hub_server)
    wd = make_workdir(tmp_path, revision=rev, types=TYPES)
    items = {i.type: i for i in finished_files(wd)}
    q4 = wd / f"{MODEL}-Q4_K_M.gguf"
    q4.write_bytes(q4.read_bytes() + b"changed")
    pub = EarlyPublisher(wd, _hub(), OPTS, EarlyOptions())
    pub.ready(items["Q4_K_M"])
    with pytest.raises(CheckFailed, match="not the one the evaluation measured"):
        pub.finish()
    assert hub_server.head(TARGET) is None or _ggufs(hub_server.files(TARGET)) == set()
    assert hub_server.upload_spans == [] and hub_server.count("PUT", "/_lfs/upload/") == 0


def test_not_publishable_uploads_nothing_and_commits_nothing(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _release(hub_server)
    wd = make_workdir(tmp_path, revision=rev, types=TYPES, publishable=False)
    pub = EarlyPublisher(wd, _hub(), OPTS, EarlyOptions())
    for item in finished_files(wd):
        pub.ready(item)
    with pytest.raises(CheckFailed, match="not publishable"):
        pub.finish()
    assert hub_server.repo(TARGET) is None
    assert hub_server.count("PUT", "/_lfs/upload/") == 0


def test_a_failed_job_removes_the_empty_repo_it_created(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _release(hub_server)
    wd = make_workdir(tmp_path, revision=rev, types=TYPES)
    items = {i.type: i for i in finished_files(wd)}
    pub = EarlyPublisher(wd, _hub(), OPTS, EarlyOptions(groups=(2,)))
    pub.ready(items["Q4_K_M"])  # uploaded; its group (Q4_K_M, Q8_0) never completes
    deadline = time.monotonic() + 20
    while file_states(wd).get("Q4_K_M") != "uploaded":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert hub_server.repo(TARGET) is not None
    pub.abort()
    assert hub_server.repo(TARGET) is None


def test_an_upload_error_surfaces_in_the_job(hub_server: HubServer, tmp_path: Path) -> None:
    rev = _release(hub_server)
    wd = make_workdir(tmp_path, revision=rev, types=TYPES)
    items = {i.type: i for i in finished_files(wd)}
    hub_server.fail_next(None, status=403, path_prefix="/_lfs/upload/")
    pub = EarlyPublisher(wd, _hub(), OPTS, EarlyOptions())
    pub.ready(items["Q4_K_M"])
    done = threading.Event()
    deadline = time.monotonic() + 30
    while not done.is_set():
        try:
            pub.ready(items["Q8_0"])
        except Exception as e:  # noqa: BLE001 - the network thread's error, raised on the pipeline's thread
            assert "upload" in str(e).lower() or "403" in str(e)
            done.set()
        assert time.monotonic() < deadline
        time.sleep(0.05)
