"""The bot against a corpus of hostile releases, end to end: ``ggufbot watch --once`` and ``ggufbot run
--exit-when-idle`` as real processes, the real Hub client against the local Hub-compatible server, a real SQLite
state file and the real llama.cpp pipeline on the tiny random llama fixture.

Next to one good release, each hostile repo of :func:`tests.bot_fixtures.populate_hostile` (remote code, pickle,
shard-index escape, crafted header, declared size, absurd config, looping and sandbox-escaping templates, a template
that emits a code fence and a link, a gated repo, NaN tensors, ``..`` file names, a name collision; templates hidden
beside a harmless one, safetensors size lies and gaps, nested and zero config sizes, card metadata with script links)
must be refused (before any download, or by its job) or contained, with the reason stored and shown by ``ggufbot
status``; nothing is published for a refused one and no repo of another source is touched; no code of any of them runs
(a canary folder stays empty) and no payload file is downloaded; no llama.cpp program or converter starts for a repo
refused at inspect; the good release is published; the bot exits cleanly having brought every job to an end.

The llama.cpp programs and the converter run through a spying copy of the toolchain (``LLAMA_CPP_DIR``): each records
the environment it was given, and one leaves a grandchild behind. No child may see the bot's secrets (the Hub token, a
database password or URL, other services' keys), every converter runs with the Hub offline, and no grandchild outlives
its program. Last, a new revision of the published good model that only adds ``auto_map`` to
``tokenizer_config.json`` (a metadata patch) is refused by the same rules as a full job.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.model import jobstate as J
from bot.service.runner import slug
from bot.state.store import Store
from converters.llama import toolchain as tc_mod
from tests.bot_fixtures import (
    FENCE_LINK,
    HOSTILE_LICENSE_LINK,
    canary_code,
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


# secrets of other services in the bot's environment: no child may see them (nor the Hub token)
SENTINEL = f"sentinel-{secrets.token_hex(8)}"
OTHER_SECRETS = {"PGPASSWORD": SENTINEL, "DATABASE_URL": f"postgresql://bot:{SENTINEL}@127.0.0.1:1/ggufbot",
                 "GITHUB_PAT": SENTINEL, "OPENAI_APIKEY": SENTINEL, "SENTRY_DSN": f"https://{SENTINEL}@127.0.0.1:1/1"}
GRANDCHILD = ("sleep", "31415")  # what the spying llama-perplexity leaves behind, detached from its output


def spying_toolchain(real, dest: Path, dumps: Path) -> Path:
    """A llama.cpp directory for ``LLAMA_CPP_DIR`` whose programs and converter are the real ones, except that each
    first writes its environment and arguments to ``dumps``; ``llama-perplexity`` also starts a grandchild in a
    session of its own (a ``sleep``) and leaves it behind."""
    dest.mkdir(parents=True)
    for entry in real.root.iterdir():
        if entry.name not in ("gguf-py", "build"):
            (dest / entry.name).symlink_to(entry)
    gguf_py = dest / "gguf-py"  # the converter's PYTHONPATH: its sitecustomize records the converter's environment
    gguf_py.mkdir()
    for entry in real.gguf_py.iterdir():
        (gguf_py / entry.name).symlink_to(entry)
    (gguf_py / "sitecustomize.py").write_text(
        "import json, os, sys\n"
        f"_p = os.path.join({str(dumps)!r}, 'converter.%d.json' % os.getpid())\n"
        "with open(_p, 'w') as f:\n"
        "    json.dump({'env': dict(os.environ), 'argv': sys.argv}, f)\n")
    bin_dir = dest / "build" / "bin"
    bin_dir.mkdir(parents=True)
    for prog in tc_mod.PROGRAMS:  # every program the product looks for, each recording how it was started
        leave = (f"setsid {' '.join(GRANDCHILD)} </dev/null >/dev/null 2>&1 &\n" if prog == "llama-perplexity" else "")
        script = bin_dir / prog
        script.write_text(f"#!/bin/sh\nenv > {dumps}/{prog}.$$.env\nprintf '%s\\n' \"$@\" > {dumps}/{prog}.$$.argv\n"
                          f"{leave}exec {real.program(prog)} \"$@\"\n")
        script.chmod(0o755)
    return dest


def grandchildren_left() -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if [a.decode(errors="replace") for a in argv[:2]] == list(GRANDCHILD):
                out.append(int(d.name))
    return out


class World:
    def __init__(self, hub, tmp: Path, config: Path, corpus: dict, canary: Path, spy: Path, dumps: Path):
        self.hub, self.tmp, self.config, self.corpus, self.canary = hub, tmp, config, corpus, canary
        self.spy, self.dumps = spy, dumps
        self.store = Store(f"sqlite:///{tmp / 'data' / 'ggufbot.db'}")
        self.log = tmp / "run.log"

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "LLAMA_CPP_DIR": str(self.spy), **OTHER_SECRETS}

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
    dumps = tmp / "children"
    dumps.mkdir()
    spy = spying_toolchain(toolchain, tmp / "llama.cpp", dumps)
    tiny = tiny_random_checkpoint("llama")
    corpus = populate_hostile(hub, AUTHOR, tiny, canary, tmp / "models", namespace=TEST_USER)
    good = scripted_model(tiny, tmp / "models" / "good", chat_template=(tiny / "chat_template.jinja").read_text())
    hub.add_model(GOOD, checkpoint_files(good), card_data={"license": "apache-2.0"},
                  config=json.loads((good / "config.json").read_text()), safetensors_params=13_500_000,
                  pipeline_tag="text-generation", library_name="transformers")
    config = bot_config(tmp / "ggufbot.toml", data_dir=tmp / "data", author=AUTHOR, calibration=calibration_text,
                        evaluation=eval_text, ladder="Q8_0", limits="concurrency = 2\nmax_attempts = 2",
                        schedule="stale_after_seconds = 30", more='[target]\non_collision = "fail"')
    w = World(hub, tmp, config, corpus, canary, spy, dumps)
    w.before = repo_commits(hub)
    yield w
    w.store.close()
    for pid in grandchildren_left():  # tidy up after a failure of the grandchild test
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


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
    made = [jobs[r].target_repo for r in (GOOD, *world.by_stop("contained"))]
    assert sorted(set(after) - set(world.before)) == sorted(made)
    # the name collision's repo (another source's) included: not one commit more
    assert {rid: shas for rid, shas in after.items() if rid in world.before} == world.before
    assert "Tiny-Good-Q8_0.gguf" in world.hub.files(good.target_repo)
    assert_card_inert(world.hub.files(fence.target_repo)["README.md"].decode())


def test_card_metadata_from_the_source_is_reduced_to_plain_strings(world: World) -> None:
    import yaml

    job = {j.repo: j for j in world.store.jobs()}[f"{AUTHOR}/Card-Metadata"]
    card = world.hub.files(job.target_repo)["README.md"].decode()
    meta = yaml.safe_load(card.split("---", 2)[1])
    for bad in (HOSTILE_LICENSE_LINK, "javascript:", "onerror"):
        assert bad not in card, [ln for ln in card.splitlines() if bad in ln]
    assert "license_link" not in meta and "license_name" not in meta, meta
    assert meta.get("language") in ("fr", ["fr"]), meta  # the object in the list is dropped, the string kept


def test_no_code_of_any_hostile_repo_ran(world: World) -> None:
    assert sorted(p.name for p in world.canary.iterdir()) == []


def test_no_payload_file_was_downloaded(world: World) -> None:
    cases = {repo: h for repo, h in world.corpus.items() if h.never_served}
    assert len(cases) >= 4
    for repo, h in cases.items():
        got = served(world.hub, repo)
        assert not [f for f in h.never_served if any(p.endswith("/" + f) for p in got)], (repo, got)


def test_no_program_started_for_a_repo_refused_at_inspect(world: World) -> None:
    argv = "\n".join(p.read_text() for p in world.dumps.glob("*.argv"))
    argv += "\n".join(json.dumps(json.loads(p.read_text())["argv"]) for p in world.dumps.glob("converter.*.json"))
    assert "Tiny-Good" in argv, "the spying toolchain saw no program of the good release"
    refused = [repo for repo, h in world.by_stop("job").items() if h.stage == "inspect"]
    assert len(refused) >= 12
    for repo in refused:
        assert slug(repo) not in argv, f"a llama.cpp program or the converter ran for {repo}"


def test_children_saw_no_secret_and_the_hub_offline(world: World) -> None:
    envs = {p.name: dict(ln.split("=", 1) for ln in p.read_text().splitlines() if "=" in ln)
            for p in world.dumps.glob("*.env")}
    envs |= {p.name: json.loads(p.read_text())["env"] for p in world.dumps.glob("converter.*.json")}
    progs = {n.split(".")[0] for n in envs}
    assert {"converter", "llama-imatrix", "llama-quantize", "llama-perplexity", "llama-completion"} <= progs, progs
    secret_values = {SENTINEL, *default_tokens()}  # the Hub tokens the server accepts
    for name, env in envs.items():
        leaked = sorted(k for k, v in env.items() if any(x in v for x in secret_values))
        assert leaked == [], f"{name} saw {leaked}"
        assert not set(OTHER_SECRETS) & set(env), f"{name} saw {sorted(set(OTHER_SECRETS) & set(env))}"
    for name, env in envs.items():
        if name.startswith("converter."):
            assert env.get("HF_HUB_OFFLINE") == "1" and env.get("TRANSFORMERS_OFFLINE") == "1", (name, env)


def test_no_grandchild_outlives_its_program(world: World) -> None:
    assert any(world.dumps.glob("llama-perplexity.*.env")), "the program that leaves a grandchild never ran"
    assert grandchildren_left() == []


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


def test_a_patch_revision_that_adds_remote_code_is_refused_like_a_full_job(world: World) -> None:
    target = {j.repo: j for j in world.store.jobs()}[GOOD].target_repo
    published = [c.sha for c in world.hub.commits(target)]
    tok_cfg = json.loads(world.hub.files(GOOD)["tokenizer_config.json"])
    world.hub.add_commit(GOOD, {"tokenizer_config.json": json.dumps({**tok_cfg, "auto_map": {
        "AutoTokenizer": ["tokenization_evil.TokenizerEvil", None]}}),
        "tokenization_evil.py": canary_code(world.canary, "patch")}, message="Update tokenizer_config.json")
    r = world.cli("watch", "--once", "--json")
    assert r.returncode == 0, r.stderr
    assert world.run_until_idle(timeout=300) == 0, world.log_tail()
    jobs = [j for j in world.store.jobs() if j.repo == GOOD]
    newest = max(jobs, key=lambda j: j.id)
    assert len(jobs) == 2 and newest.status == J.Status.FAILED, [(j.id, j.status, j.error_message) for j in jobs]
    assert "auto_map" in (newest.error_message or ""), newest.error_message
    assert [c.sha for c in world.hub.commits(target)] == published  # the published ladder is not touched
    assert not [p for p in served(world.hub, GOOD) if p.endswith("/tokenization_evil.py")]
    assert sorted(p.name for p in world.canary.iterdir()) == []
