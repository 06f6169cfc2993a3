"""The maintainer's view end to end: ``ggufbot run`` (a real process, ``[web] listen`` set, never polling) on the
test Hub, a Hub webhook created with ``ggufbot webhook create``, new commits that the test Hub announces through
it, the real SmolLM2 job, and a real headless Chromium looking at the pages.

One scenario in order: a commit to a watched repo -> webhook -> job -> publish, with no poll at all; the running
job's stage and progress, the published ladder's table and chart and a failed job's reason as a person sees them
(screenshots under the test's temp dir); retry refused without the admin token and done with it; ``/metrics``
parses and its counters moved.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.model import jobstate as J
from bot.state.store import Store
from tests.bot_fixtures import checkpoint_files
from tests.browser import Browser, chromium_path
from tests.hub_fixtures import default_tokens
from tests.hubserver import free_port
from tests.procs import die_with_the_tests, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.llama]

REPO_ROOT = Path(__file__).resolve().parents[2]
AUTHOR = "hook-labs"
MODEL = "SmolLM2-135M-Instruct"
SOURCE = f"{AUTHOR}/{MODEL}"
BROKEN = f"{AUTHOR}/Broken-135M"
ADMIN = "e2e-admin-token"
SECRET = "e2e-webhook-secret"


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture(scope="module")
def bot(hub_server_session, tmp_path_factory, smollm2, calibration_text, eval_text, toolchain):
    if chromium_path() is None:
        pytest.fail("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    hub = hub_server_session
    hub.reset(valid_tokens=default_tokens())
    tmp = tmp_path_factory.mktemp("web-e2e")
    (tmp / "admin").write_text(ADMIN)
    (tmp / "secret").write_text(SECRET)
    port = free_port()
    config = tmp / "ggufbot.toml"
    config.write_text(f"""
data_dir = "{tmp / 'data'}"
[[sources]]
author = "{AUTHOR}"
[limits]
max_model_gb = 1.0
min_free_disk_gb = 0.1
[quantize]
ladder = "Q8_0,Q4_K_M"
calibration_text = "{calibration_text}"
evaluation_text = "{eval_text}"
calibration_chunks = 2
evaluation_chunks = 2
ctx = 256
tune = []
[schedule]
dispatch_seconds = 0.5
heartbeat_seconds = 1
stale_after_seconds = 30
[web]
listen = "127.0.0.1:{port}"
admin_token_file = "{tmp / 'admin'}"
webhook_secret_file = "{tmp / 'secret'}"
""")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    log = tmp / "run.log"
    proc = subprocess.Popen([sys.executable, "-m", "bot.cli", "-v", "run", "--no-poll", "--config", str(config)],
                            cwd=REPO_ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=die_with_the_tests)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return urllib.request.urlopen(url + "/healthz", timeout=5).status == 200
        except OSError:
            return False

    wait_for(up, 120, "the status page", log)
    store = Store(f"sqlite:///{tmp / 'data' / 'ggufbot.db'}")
    shots = tmp / "screenshots"
    shots.mkdir()
    with Browser(tmp) as browser:
        yield {"url": url, "hub": hub, "store": store, "config": config, "env": env, "log": log, "tmp": tmp,
               "browser": browser, "shots": shots, "smollm2": smollm2}
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(120) == 0, log.read_text()[-4000:]
    store.close()


def test_commit_webhook_job_publish_with_pages(bot) -> None:
    hub, store, url, browser, log = bot["hub"], bot["store"], bot["url"], bot["browser"], bot["log"]
    before = scrape(url)
    r = subprocess.run([sys.executable, "-m", "bot.cli", "webhook", "create", "--config", str(bot["config"]),
                        "--url", f"{url}/webhooks/hub"], cwd=REPO_ROOT, env=bot["env"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and f"org:{AUTHOR}" in r.stdout, r.stderr
    ckpt = bot["smollm2"]
    cfg = json.loads((ckpt / "config.json").read_text())
    tg = {"pipeline_tag": "text-generation", "library_name": "transformers", "config": cfg,
          "card_data": {"license": "apache-2.0"}}
    hub.add_model(SOURCE, checkpoint_files(ckpt), safetensors_params=134_515_008, **tg)
    hub.clear_log()
    tok = json.loads((ckpt / "tokenizer_config.json").read_text())
    sha = hub.add_commit(SOURCE, {"tokenizer_config.json": json.dumps({**tok, "model_max_length": 4096})})
    job = wait_for(lambda: next(iter(store.jobs(repo=SOURCE)), None), 60, "the job queued by the webhook", log)
    assert job.revision == sha

    # the running job, as a person sees it
    wait_for(lambda: (j := store.job(job.id)) and j.stage in ("calibrate", "ladder") and j.progress,
             600, "a running stage with progress", log)
    browser.open(url + "/running")
    text = browser.text()
    browser.screenshot(bot["shots"] / "running.png")
    assert f"{SOURCE}@{sha[:12]}" in text and "of 8" in text and "ETA" in text, text
    assert any(f"stage {s} (" in text for s in ("calibrate", "ladder", "publish")), text
    assert browser.js("parseFloat(document.querySelector('.bar > div').style.width)") > 0

    # a second push: a repo whose weights are corrupt fails with its reason
    broken = {**checkpoint_files(ckpt), "model.safetensors": b"\x10\0\0\0\0\0\0\0{not json}      " * 4}
    hub.add_model(BROKEN, broken, safetensors_params=1_000_000, **tg)
    hub.add_commit(BROKEN, {"README.md": "---\nlicense: apache-2.0\n---\nbroken\n"})
    done = wait_for(lambda: (j := store.job(job.id)) and j.status.finished and j, 900, "the job to finish", log)
    assert done.status == J.Status.PUBLISHED, log.read_text()[-4000:]
    bad = wait_for(lambda: [j for j in store.jobs(repo=BROKEN) if j.status == J.Status.FAILED], 300,
                   "the broken job to fail", log)[0]
    assert not [p for m, p in hub.requests if m == "GET" and p == "/api/models"]  # no poll: no listing at all

    browser.open(url + "/published")
    browser.screenshot(bot["shots"] / "published.png")
    table = browser.text(f"#job-{job.id} table.ladder")
    assert "Q8_0" in table and "Q4_K_M" in table and "mean KLD" in table and "passed" in table, table
    assert browser.js(f"document.querySelector('#job-{job.id} img.chart').naturalWidth") > 100  # the chart loaded
    assert done.target_repo in browser.text()

    browser.open(url + "/failed")
    browser.screenshot(bot["shots"] / "failed.png")
    row = browser.text(f"#job-{bad.id}")
    assert bad.error_type in row and bad.error_message[:40] in row, row
    browser.click(f"#retry-{bad.id}", navigates=True)  # no token typed
    assert "refused" in browser.text() and store.job(bad.id).status == J.Status.FAILED
    browser.screenshot(bot["shots"] / "retry-refused.png")
    browser.open(url + "/failed")
    browser.type(f"#job-{bad.id} input[name=token]", ADMIN)
    browser.click(f"#retry-{bad.id}", navigates=True)
    assert "failed -> queued" in browser.text()
    browser.screenshot(bot["shots"] / "retry-done.png")
    assert any("retry (operator (web)) after failed" in e["message"] for e in store.events(job_id=bad.id))

    browser.open(url + f"/decisions?q={BROKEN.split('/')[1]}")
    assert BROKEN in browser.text()

    after = scrape(url)
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert moved[("ggufbot_stage_duration_seconds_count", (("stage", "convert"),))] >= 1
    assert moved[("ggufbot_stage_duration_seconds_count", (("stage", "ladder"),))] >= 1
    assert moved[("ggufbot_fetched_bytes_total", ())] > 100_000_000  # the SmolLM2 weights
    assert moved[("ggufbot_published_bytes_total", ())] > 100_000_000
    assert moved[("ggufbot_webhooks_total", (("outcome", "queued"),))] == 2
    assert after[("ggufbot_jobs", (("state", "published"),))] == 1
