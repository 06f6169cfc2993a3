"""Published bytes are the measured bytes (issue 19, section 3), against the local Hub server and the real client.

- a file changed after publish's hash check (between planning and the upload) is refused, not uploaded;
- a large file (sent from its path through LFS) changed while the client uploads it is refused before the commit,
  even by a storage that takes the announced sha256 on trust (``verify_lfs_sha256 = False``);
- the chart is in ``file_hashes`` and checked like the quants;
- a repo is noted as created by this work dir only once the Hub created it: a 409 (another party made it first)
  leaves their repo theirs;
- a file fetched from the Hub is hashed here and must have the listing's LFS sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import types
from pathlib import Path

import pytest

from bot.hub import client as hub_mod
from bot.hub.client import Hub
from bot.publish.commit import PublishOptions, execute, plan_publish, publish, staging_dir
from bot.model.retry import RetryPolicy
from bot.publish.target import created_repos
from converters.core import records
from converters.core.errors import CheckFailed, HubError
from converters.core.workdir import WorkDir
from tests.hub_fixtures import TEST_ORG
from tests.hubserver import HubServer
from tests.workdirs import make_workdir

MODEL = "Tiny-Instruct"
SOURCE = f"acme/{MODEL}"
TARGET = f"{TEST_ORG}/{MODEL}-GGUF"
ALT = f"{TEST_ORG}/acme_{MODEL}-GGUF"
OPTS = PublishOptions(namespace=TEST_ORG)
Q4 = f"{MODEL}-Q4_K_M.gguf"
LARGE = 11 << 20  # over the Hub's 10 MiB limit for a regular git file: sent from its path (LFS), not from memory


def _hub() -> Hub:
    return Hub(retry=RetryPolicy(max_attempts=3, base=0.01, cap=0.01), sleep=lambda s: None)


def _release(server: HubServer) -> str:
    return server.add_model(SOURCE, {"config.json": b'{"model_type": "llama"}'}, card_data={"license": "mit"},
                            pipeline_tag="text-generation")


def _rewrite_in_place(path: Path) -> None:
    """Same size, same inode, the mtime set back: only the content (and the ctime) differ."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _measure(wd: Path) -> None:
    """What the evaluation does after the files changed: record their hashes (and the chart's) as measured."""
    w = WorkDir(wd)
    report = w.report()
    report.file_hashes.update(w.content(w.ladder()))
    w.write_report(report)


def test_a_file_changed_between_the_check_and_the_upload_is_refused(hub_server: HubServer, tmp_path: Path) -> None:
    wd = make_workdir(tmp_path, revision=_release(hub_server))
    with staging_dir() as staging:
        plan = plan_publish(wd, _hub(), OPTS, staging=staging)  # the hash check passes here
        assert plan.action == "create"
        _rewrite_in_place(wd / Q4)  # e.g. while the card's Hub calls ran
        with pytest.raises(CheckFailed, match=f"not the ones verified.*{Q4}"):
            execute(plan, _hub())
    assert hub_server.repo(TARGET) is None  # the repo made for it was removed: nothing half-published
    assert not [k for k in hub_server.lfs_store if hub_server.lfs_store[k] == (wd / Q4).read_bytes()]


def test_a_large_file_changed_while_it_is_uploaded_is_refused(hub_server: HubServer, tmp_path: Path) -> None:
    wd = make_workdir(tmp_path, revision=_release(hub_server))
    big = wd / Q4
    assert getattr(hub_mod, "INLINE_MAX", 0) < LARGE
    big.write_bytes(b"GGUF" + bytes(range(256)) * (LARGE // 256))
    _measure(wd)
    measured = hashlib.sha256(big.read_bytes()).hexdigest()
    hub_server.verify_lfs_sha256 = False  # a storage that takes the client's word for the sha256 (a presigned PUT)
    # the client has hashed the file when it asks the LFS batch endpoint where to upload it; it reads it again after
    hub_server.call_next(lambda: _rewrite_in_place(big), path_prefix=f"/{TARGET}.git/info/lfs/objects/batch")
    with pytest.raises(CheckFailed, match=f"changed while it was uploaded: {Q4}"):
        publish(wd, _hub(), OPTS)
    assert hub_server.count("POST", f"/{TARGET}.git/info/lfs/objects/batch") == 1  # the window was hit
    assert hub_server.count("PUT", "/_lfs/upload/") >= 1
    assert hub_server.count("POST", f"/api/models/{TARGET}/commit") == 0 and hub_server.repo(TARGET) is None
    # measured again, the same file publishes, and what lands is what was measured
    _measure(wd)
    _, res = publish(wd, _hub(), OPTS)
    assert res is not None and res.action == "create"
    published = hub_server.files(TARGET)[Q4]
    assert hashlib.sha256(published).hexdigest() == hashlib.sha256(big.read_bytes()).hexdigest() != measured


def test_a_small_file_changed_after_its_upload_is_committed_as_the_bytes_verified(hub_server: HubServer,
                                                                                  tmp_path: Path) -> None:
    """A small file is read once: the commit sends those bytes, whatever happens to the file afterwards."""
    wd = make_workdir(tmp_path, revision=_release(hub_server))
    measured = (wd / Q4).read_bytes()
    hub_server.call_next(lambda: _rewrite_in_place(wd / Q4), path_prefix="/_lfs/verify/")  # after an upload
    _, res = publish(wd, _hub(), OPTS)
    assert res is not None and res.action == "create"
    assert (wd / Q4).read_bytes() != measured and hub_server.files(TARGET)[Q4] == measured


def test_an_unchanged_large_file_is_published_as_measured(hub_server: HubServer, tmp_path: Path) -> None:
    wd = make_workdir(tmp_path, revision=_release(hub_server))
    big = wd / Q4
    big.write_bytes(b"GGUF" + os.urandom(LARGE))
    _measure(wd)
    _, res = publish(wd, _hub(), OPTS)
    assert res is not None and res.action == "create"
    assert hub_server.files(TARGET)[Q4] == big.read_bytes()


# ------------------------------------------------------------------------------ the chart
def test_a_chart_changed_after_the_evaluation_is_refused(hub_server: HubServer, tmp_path: Path) -> None:
    wd = make_workdir(tmp_path, revision=_release(hub_server))
    assert "size-vs-kld.png" in WorkDir(wd).report().file_hashes
    _rewrite_in_place(wd / "size-vs-kld.png")
    with pytest.raises(CheckFailed, match="changed since it was measured: size-vs-kld.png"):
        publish(wd, _hub(), OPTS)
    assert hub_server.repo(TARGET) is None


def test_a_chart_the_report_does_not_name_is_not_published(hub_server: HubServer, tmp_path: Path) -> None:
    """The evaluation's chart failed (report.chart null): an older size-vs-kld.png in the work dir stays home."""
    wd = make_workdir(tmp_path, revision=_release(hub_server))
    report = WorkDir(wd).report()
    report.chart = None
    del report.file_hashes["size-vs-kld.png"]
    WorkDir(wd).write_report(report)
    _, res = publish(wd, _hub(), OPTS)
    assert res is not None and "size-vs-kld.png" not in hub_server.files(TARGET)


def test_a_work_dir_evaluated_before_the_chart_had_its_hash_uses_the_stage_record(hub_server: HubServer,
                                                                                  tmp_path: Path) -> None:
    wd = make_workdir(tmp_path, revision=_release(hub_server))
    report = WorkDir(wd).report()
    del report.file_hashes["size-vs-kld.png"]
    WorkDir(wd).write_report(report)
    with pytest.raises(CheckFailed, match=r"not measured \(no sha256 in report.json\): size-vs-kld.png"):
        publish(wd, _hub(), OPTS)
    # the evaluate stage's record hashed the chart when it wrote it
    records.save(wd, "evaluate", {"x": 1}, [wd / "report.json", wd / "size-vs-kld.png"], 1.0, "v")
    _, res = publish(wd, _hub(), OPTS)
    assert res is not None and hub_server.files(TARGET)["size-vs-kld.png"] == (wd / "size-vs-kld.png").read_bytes()


def test_the_evaluation_records_the_hash_of_the_chart_it_drew(tmp_path: Path) -> None:
    from converters.ladder.evaluate import reporting

    wd = WorkDir(make_workdir(tmp_path, chart=False))
    report = wd.report()
    job = types.SimpleNamespace(wd=wd, tc=types.SimpleNamespace(version="llama.cpp b9999 (test)"))
    reporting.write(job, report, {"x": 1}, 0.0)  # draws the chart (matplotlib), writes report.json and the record
    png = wd.path / "size-vs-kld.png"
    assert png.is_file()
    entry = json.loads((wd.path / "report.json").read_text())["file_hashes"]["size-vs-kld.png"]
    assert entry == {"size": png.stat().st_size, "sha256": hashlib.sha256(png.read_bytes()).hexdigest()}


# ------------------------------------------------------------------------------ note_created
def test_a_repo_another_party_created_first_never_counts_as_ours(hub_server: HubServer, tmp_path: Path) -> None:
    wd = make_workdir(tmp_path, revision=_release(hub_server))
    with staging_dir() as staging:
        plan = plan_publish(wd, _hub(), OPTS, staging=staging)
        assert plan.action == "create" and plan.repo_id == TARGET
        theirs = hub_server.add_model(TARGET)  # created between our read and our create: empty, no marker
        with pytest.raises(HubError) as ei:
            execute(plan, _hub())
    assert ei.value.status == 409
    assert created_repos(wd) == []
    assert hub_server.head(TARGET) == theirs  # not deleted as "our empty repo" either
    _, res = publish(wd, _hub(), OPTS)  # the next attempt leaves their repo alone
    assert res is not None and res.repo_id == ALT and hub_server.head(TARGET) == theirs
    assert created_repos(wd) == [ALT]


# ------------------------------------------------------------------------------ fetched files
def test_a_fetched_file_whose_bytes_are_not_the_listed_ones_is_refused(hub_server: HubServer, tmp_path: Path) -> None:
    from bot.jobs.job import FetchPolicy, FetchStage, Source
    from converters.core.hooks import NULL_HOOKS
    from converters.ladder.job import JobContext

    weights = b"\0" * 4096 + b"A" * 4096
    rev = hub_server.add_model(SOURCE, {"config.json": b'{"model_type": "llama"}', "model.safetensors": weights},
                               card_data={"license": "mit"})
    hub_server.corrupt_next(path_prefix=f"/{SOURCE}/resolve/{rev}/model.safetensors")
    ctx = JobContext(tmp_path, None, NULL_HOOKS, MODEL, source_repo=SOURCE, source_revision=rev)
    with pytest.raises(HubError, match="model.safetensors is not the one the Hub lists") as ei:
        FetchStage(Source(repo=SOURCE, revision=rev), FetchPolicy(), Hub()).run(ctx)
    assert ei.value.transient  # fetched again on the job's retry
    assert not (tmp_path / "source" / "model.safetensors").exists()
    assert records.load(tmp_path, "fetch") is None
    FetchStage(Source(repo=SOURCE, revision=rev), FetchPolicy(), Hub()).run(ctx)  # the retry
    assert (tmp_path / "source" / "model.safetensors").read_bytes() == weights
