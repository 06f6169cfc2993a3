"""SIGKILL during an early publication (issue 20): (a) during a pre-upload, (b) between two commits. Each killed run is
resumed and must end with the same published files (sha256) as one uninterrupted run.

``ggufbot publish DIR --early --repo ...`` as a real process, against the test Hub server with its uplink throttled
(``upload_bytes_per_second``), on a 4-type work dir of incompressible placeholder quants (publishing does not read
GGUF contents; the ladder's own kill tests are tests/e2e/test_kill_resume.py). A finished ladder published early is
also the resume case of a job: every file is announced at once and the groups are committed in publish order
(Q4_K_M; Q8_0 + Q6_K; the rest). One uninterrupted reference run is shared by both cases; each case publishes its
own copy of the work dir to its own repo.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bot.publish.early import file_states
from converters.core.workdir import WorkDir
from tests.hub_fixtures import TEST_ORG, default_tokens
from tests.hubserver import HubServer
from tests.procs import die_with_the_tests
from tests.workdirs import make_workdir

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "Tiny-Instruct"
SOURCE = f"acme/{MODEL}"
TYPES = ("Q8_0", "Q6_K", "Q4_K_M", "Q2_K")
QUANT_BYTES = 600_000  # each quant; over a 1.5 MB/s link: 0.4 s per file
RATE = 1_500_000


def _workdir(root: Path, revision: str) -> Path:
    """make_workdir's ladder with incompressible quants of QUANT_BYTES, measured (report.json file_hashes)."""
    wd = make_workdir(root, revision=revision, types=TYPES)
    w = WorkDir(wd)
    ladder = w.ladder()
    for i, f in enumerate(ladder.files):
        (wd / f.path).write_bytes(hashlib.sha256(f.type.encode()).digest() + os.urandom(QUANT_BYTES - 32 + i))
    report = w.report()
    report.file_hashes.update(w.content(ladder))
    w.write_report(report)
    return wd


def _argv(wd: Path, repo: str) -> list[str]:
    return [sys.executable, "-m", "bot.cli", "publish", str(wd), "--early", "--repo", repo]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def _run(wd: Path, repo: str) -> None:
    r = subprocess.run(_argv(wd, repo), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


def _run_and_kill(wd: Path, repo: str, when: Callable[[], bool]) -> None:
    p = subprocess.Popen(_argv(wd, repo), cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=die_with_the_tests)
    try:
        end = time.monotonic() + 120
        while not when():
            assert p.poll() is None, "the run ended before it could be killed:\n" + (p.stderr.read() if p.stderr else "")
            assert time.monotonic() < end, "the moment to kill never came"
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(60)
    assert p.returncode == -signal.SIGKILL


def _published(hub: HubServer, repo: str) -> dict[str, str]:
    """Path -> sha256 of every published file but the card and the report, checked against the server's bytes."""
    files = hub.files(repo)
    block = json.loads(files["report.json"])["publication"]
    assert "pending" not in block
    for path, meta in block["files"].items():
        assert hashlib.sha256(files[path]).hexdigest() == meta["sha256"], path
    assert set(files) == set(block["files"]) | {".gitattributes", "README.md", "report.json"}
    return {p: m["sha256"] for p, m in block["files"].items()}


def _commits(hub: HubServer, repo: str) -> int:
    return sum(1 for c in hub.commits(repo) if c.parent is not None) if hub.repo(repo) is not None else 0


@pytest.fixture(scope="module")
def world(hub_server_session: HubServer, tmp_path_factory) -> dict:
    hub = hub_server_session
    hub.reset(valid_tokens=default_tokens())
    rev = hub.add_model(SOURCE, {"config.json": b'{"model_type": "llama"}'}, card_data={"license": "mit"},
                        pipeline_tag="text-generation")
    root = tmp_path_factory.mktemp("kill-early")
    wd = _workdir(root / "made", rev)
    hub.upload_bytes_per_second = RATE
    ref = f"{TEST_ORG}/reference-GGUF"
    t0 = time.monotonic()
    _run(wd, ref)
    seconds = time.monotonic() - t0
    yield {"hub": hub, "wd": wd, "root": root, "reference": _published(hub, ref), "seconds": seconds,
           "commits": _commits(hub, ref)}
    hub.upload_bytes_per_second = None


def _copy(world: dict, name: str) -> Path:
    """A copy of the measured work dir, and a server that has none of its objects yet: the test server keeps one LFS
    store for every repo (the Hub's is per repo), and the reference run's objects would make every upload of the
    same bytes to a new repo a no-op. Committed files keep their bytes."""
    world["hub"].lfs_store.clear()
    dest = world["root"] / name
    shutil.copytree(world["wd"], dest, ignore=shutil.ignore_patterns("publish-*.json"))
    return dest


def test_the_reference_run_published_in_three_commits(world) -> None:
    assert world["commits"] == 3  # Q4_K_M; Q8_0 + Q6_K; Q2_K with the chart
    assert {p for p in world["reference"] if p.endswith(".gguf") and "imatrix" not in p} == {
        f"{MODEL}-{t}.gguf" for t in TYPES}


def test_kill_during_a_preupload(world) -> None:
    hub: HubServer = world["hub"]
    wd, repo = _copy(world, "a"), f"{TEST_ORG}/killed-a-GGUF"
    spans_before = len(hub.upload_spans)

    def uploading() -> bool:  # the second quant's upload has started and is half-way over the link
        states = file_states(wd)
        return states.get("Q4_K_M") == "published" and "uploading" in states.values() and \
            time.sleep(0.5 * QUANT_BYTES / RATE) is None

    _run_and_kill(wd, repo, uploading)
    time.sleep(0.5)  # the server sees the connection go
    cut = [b for _, _, b in hub.upload_spans[spans_before:] if 0 < b < QUANT_BYTES - 32]
    assert cut, f"no upload was cut short by the kill: {hub.upload_spans[spans_before:]} {file_states(wd)}"
    held = set(hub.lfs_store)  # what the killed run's uploads left on the server (Q4_K_M's at least)
    assert hashlib.sha256((wd / f"{MODEL}-Q4_K_M.gguf").read_bytes()).hexdigest() in held
    n_log, n_spans = len(hub.requests), len(hub.upload_spans)
    _run(wd, repo)
    again = {p.rsplit("/", 1)[1] for m, p in hub.requests[n_log:] if m == "PUT" and p.startswith("/_lfs/upload/")}
    assert again and again.isdisjoint(held)  # nothing the server had was sent again...
    missing = {sha: (wd / path).stat().st_size for path, sha in world["reference"].items() if sha not in held}
    assert sum(b for _, _, b in hub.upload_spans[n_spans:]) == sum(missing.values())  # ...only the rest, once
    assert _published(hub, repo) == world["reference"]


def test_kill_between_two_commits(world) -> None:
    hub: HubServer = world["hub"]
    wd, repo = _copy(world, "b"), f"{TEST_ORG}/killed-b-GGUF"
    _run_and_kill(wd, repo, lambda: _commits(hub, repo) == 1)
    assert _commits(hub, repo) == 1
    first = json.loads(hub.files(repo)["report.json"])
    assert first["pending"] and {f["type"] for f in first["files"]} == {"Q4_K_M"}
    _run(wd, repo)
    assert _commits(hub, repo) == 3  # the first commit is not made again
    assert _published(hub, repo) == world["reference"]
