"""The status page, JSON API, /metrics, /healthz and the Hub webhook over real HTTP (uvicorn), on a real state store
(SQLite, and PostgreSQL when reachable), the real Hub client against the test Hub server. No llama.cpp: the
jobs' states are set through the store the way the runner sets them; the end-to-end run is tests/e2e/test_web.py."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.model import jobstate as J
from bot.model import settings as settings_mod
from bot.hub.client import Hub
from bot.queue.schema import INSTALLED
from bot.state.store import Store
from bot.service.watcher import Watcher
from bot.web.site import StatusSite, WebServer
from tests.bot_fixtures import SMALL_CONFIG, postgres_url
from tests.hub_fixtures import TEST_TOKEN
from tests.workdirs import make_workdir

ADMIN = "admin-token-for-tests"
SECRET = "webhook-secret-for-tests"
T0 = time.time() - 3600


def http(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
         method: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def start(st: Store, job_id: int, worker: str, *, now: float) -> None:
    """Start ``job_id`` as a worker does: claimed from the table (SQLite) or delivered by procrastinate (PostgreSQL)."""
    if st.queued_by_procrastinate:
        assert st.take(job_id, worker, now=now).id == job_id
    else:
        assert st.claim(worker, now=now).id == job_id


def populate(st: Store, tmp: Path) -> dict[str, int]:
    """A queued job (with its size), a running one in quantize, a published one with its report, a failed one,
    decisions, and the stage timings of the published job (for the running job's ETA)."""
    items = [{"repo": "acme/Skip-1B", "sha": "s" * 40, "last_modified": None, "decision": "skipped",
              "code": "remote_code", "reason": "config.json has auto_map (remote code)", "source": "author=acme"},
             {"repo": "acme/Queued-1B", "sha": "q" * 40, "last_modified": None, "decision": "accepted",
              "code": "queued", "reason": "new release", "source": "author=acme"}]
    st.apply_decisions(items, [], now=T0)
    ids = {}
    ids["published"] = st.enqueue("acme/Done-1B", "d" * 40, reason="new release", now=T0)
    start(st, ids["published"], "w1", now=T0)
    at = T0
    for stage, secs in (("convert", 60), ("calibrate", 120), ("quantize", 240), ("evaluate", 300)):
        at += secs
        st.event("stage.end", f"{stage} done", now=at, job_id=ids["published"])
    wd = make_workdir(tmp / "done")
    st.add_artifact(ids["published"], "report", str(wd / "report.json"), now=T0 + 800)
    st.transition(ids["published"], J.Status.PUBLISHED, now=T0 + 800, worker_id="w1", message="published",
                  target_repo="tester/Done-1B-GGUF")
    ids["failed"] = st.enqueue("acme/Broken-1B", "b" * 40, reason="new release", now=T0 + 900)
    start(st, ids["failed"], "w1", now=T0 + 900)
    st.transition(ids["failed"], J.Status.FAILED, now=T0 + 950, worker_id="w1", message="failed",
                  error_type="UnsupportedModel", error_message="model.safetensors is corrupt: bad header")
    ids["running"] = st.enqueue("acme/Run-1B", "r" * 40, reason="new release", now=T0 + 1000)
    start(st, ids["running"], "w2", now=time.time() - 400)
    st.event("job.stages", "stages", now=time.time() - 400, job_id=ids["running"],  # what its runner records
             data={"stages": ["fetch", "inspect", "convert", "calibrate", "quantize", "evaluate", "publish", "cleanup"]})
    st.event("stage.end", "calibrate done", now=time.time() - 100, job_id=ids["running"])
    st.update_running(ids["running"], "w2", now=time.time(), stage="quantize", progress="Q4_K_M 2/4")
    ids["queued"] = st.enqueue("acme/Queued-1B", "q" * 40, reason="new release", now=T0 + 1100)
    st.event("job.size", "2.50 GB to fetch", now=T0 + 1100, job_id=ids["queued"], data={"bytes": 2_500_000_000})
    return ids


def make_settings(tmp: Path, url: str, **web: Any) -> settings_mod.Settings:
    (tmp / "admin").write_text(ADMIN + "\n")
    (tmp / "secret").write_text(SECRET)
    raw = {"data_dir": str(tmp / "data"), "database_url": url, "sources": [{"author": "acme"}],
           "limits": {"max_model_gb": 1.0},
           "web": {"listen": "127.0.0.1:0", "admin_token_file": str(tmp / "admin"),
                   "webhook_secret_file": str(tmp / "secret"), **web}}
    return settings_mod.from_mapping(raw, env={"HF_TOKEN": TEST_TOKEN}, free_disk=10**12)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def site(request, tmp_path, hub_server):
    if request.param == "sqlite":
        url_cm = None
        url = f"sqlite:///{tmp_path / 'ggufbot.db'}"
    else:
        url_cm = postgres_url()
        url = url_cm.__enter__()
    s = make_settings(tmp_path, url)
    st = Store(url, queue_schema=INSTALLED if request.param == "postgres" else None)  # migration 3 creates it
    ids = populate(st, tmp_path)
    hub = Hub(token=TEST_TOKEN, endpoint=hub_server.url)
    healthy = {"ok": True}
    server = WebServer(StatusSite(s, st, watcher=Watcher(s, st, hub), hub_url=hub.endpoint,
                                  health=lambda: healthy["ok"]), s.web.listen).start()
    yield {"url": server.url, "store": st, "ids": ids, "hub": hub_server, "healthy": healthy}
    server.stop()
    st.close()
    if url_cm is not None:
        url_cm.__exit__(None, None, None)


def test_pages_show_queue_running_published_failed_and_decisions(site) -> None:
    url, ids = site["url"], site["ids"]
    code, queue = http(url + "/queue")
    assert code == 200 and "acme/Queued-1B@qqqqqqqqqqqq" in queue and "new release" in queue and "2.5 GB" in queue
    code, running = http(url + "/running")
    assert code == 200 and "acme/Run-1B" in running and "<b class=\"stage\">quantize</b> (5 of 8)" in running
    assert "step 2 of 4" in running and "Q4_K_M 2/4" in running
    assert "width: 56.2%" in running  # (4 stages done + 2/4 of quantize) of 8
    assert "ETA <span class=\"eta\">unknown" not in running  # past stage timings exist
    code, published = http(url + "/published")
    assert code == 200 and "tester/Done-1B-GGUF" in published and f"{site['hub'].url}/tester/Done-1B-GGUF" in published
    for cell in ("Q8_0", "Q4_K_M", "Q2_K", "0.01000 &plusmn; 0.00100", "95.00 &plusmn; 0.20 %", "passed"):
        assert cell in published
    assert f'src="/jobs/{ids["published"]}/chart.png"' in published
    code, png = http(url + f"/jobs/{ids['published']}/chart.png")
    assert code == 200 and png.startswith("\ufffdPNG")  # rendered from the kept report
    code, failed = http(url + "/failed")
    assert code == 200 and "UnsupportedModel" in failed and "model.safetensors is corrupt: bad header" in failed
    code, dec = http(url + "/decisions?q=skip")
    assert code == 200 and "acme/Skip-1B" in dec and "remote code" in dec and "acme/Queued-1B" not in dec


def test_running_eta_comes_from_past_stage_timings(site) -> None:
    code, body = http(site["url"] + f"/api/jobs/{site['ids']['running']}")
    assert code == 200
    run = json.loads(body)["running"]
    assert run["stage_index"] == 5 and run["step"] == [2, 4]
    # quantize: 100 s in at half way -> 100 s left; then evaluate (300 s, the past job's) and nothing known after
    assert 390 <= run["eta_s"] <= 420, run


def test_json_api(site) -> None:
    url, ids = site["url"], site["ids"]
    code, body = http(url + "/api/jobs?status=failed,queued")
    assert code == 200 and {j["id"] for j in json.loads(body)["jobs"]} == {ids["failed"], ids["queued"]}
    code, body = http(url + f"/api/jobs/{ids['published']}")
    d = json.loads(body)
    assert d["job"]["target_repo"] == "tester/Done-1B-GGUF" and [r["type"] for r in d["ladder"]] == ["Q8_0", "Q4_K_M", "Q2_K"]
    code, body = http(url + "/api/models/acme/Skip-1B")
    d = json.loads(body)
    assert code == 200 and d["model"]["code"] == "remote_code" and d["decisions"][0]["reason"].startswith("config.json")


def _snapshot(st: Store) -> tuple:
    return (st.counts(), len(st.events(limit=10_000)), [(j.id, j.status, j.attempts) for j in st.jobs()])


@pytest.mark.parametrize("method,path,body,headers,code", [
    ("GET", "/api/jobs/999999", None, {}, 404),
    ("GET", "/api/jobs/abc", None, {}, 400),
    ("GET", "/api/jobs?status=bogus", None, {}, 400),
    ("GET", "/api/jobs?limit=0", None, {}, 400),
    ("GET", "/api/models/not-a-repo", None, {}, 400),
    ("GET", "/api/models/acme/Never-Seen", None, {}, 404),
    ("GET", "/jobs/999999/chart.png", None, {}, 404),
    ("GET", "/decisions?q=" + "x" * 300, None, {}, 400),
    ("POST", "/jobs/{failed}/retry", b"token=", {}, 401),
    ("POST", "/jobs/{failed}/retry", b"token=wrong", {}, 401),
    ("POST", "/jobs/{failed}/retry", f"token={ADMIN}".encode(), {"Origin": "http://evil.example"}, 403),
    ("POST", "/jobs/{failed}/retry", f"token={ADMIN}".encode(), {"Sec-Fetch-Site": "cross-site"}, 403),
    ("POST", "/jobs/999999/retry", f"token={ADMIN}".encode(), {}, 404),
    ("POST", "/jobs/{published}/retry", f"token={ADMIN}".encode(), {}, 409),
    ("POST", "/jobs/{failed}/explode", f"token={ADMIN}".encode(), {}, 404),
    ("POST", "/jobs/{failed}/retry", b"token=" + b"x" * 70_000, {}, 413),
    ("POST", "/webhooks/hub", b"{}", {"X-Webhook-Secret": "wrong"}, 401),
    ("POST", "/webhooks/hub", b"{}", {}, 401),
    ("POST", "/webhooks/hub", b"{not json", {"X-Webhook-Secret": SECRET}, 400),
    ("POST", "/webhooks/hub", b'{"event": 3}', {"X-Webhook-Secret": SECRET}, 400),
    ("POST", "/webhooks/hub", b"x" * 70_000, {"X-Webhook-Secret": SECRET}, 413),
])
def test_bad_input_gets_a_clear_4xx_and_changes_nothing(site, caplog, method, path, body, headers, code) -> None:
    before = _snapshot(site["store"])
    caplog.set_level(logging.INFO)
    got, text = http(site["url"] + path.format(**site["ids"]), data=body, headers=headers, method=method)
    assert got == code, text
    assert text.strip() and ("error" in text or "refused" in text or code == 404)
    assert _snapshot(site["store"]) == before
    assert SECRET not in caplog.text and ADMIN not in caplog.text  # refusals are logged without the secrets


def test_retry_and_cancel_with_the_admin_token(site) -> None:
    st, ids, url = site["store"], site["ids"], site["url"]
    code, text = http(url + f"/jobs/{ids['failed']}/retry", data=f"token={ADMIN}".encode())
    assert code == 200 and "failed -&gt; queued" in text
    assert st.job(ids["failed"]).status == J.Status.QUEUED and st.job(ids["failed"]).error_type is None
    code, text = http(url + f"/jobs/{ids['queued']}/cancel", data=b"", headers={"Authorization": f"Bearer {ADMIN}",
                                                                               "Accept": "application/json"})
    assert code == 200 and json.loads(text)["ok"] and st.job(ids["queued"]).status == J.Status.CANCELLED


def test_metrics_and_health(site) -> None:
    code, text = http(site["url"] + "/metrics")
    assert code == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    jobs = {s.labels["state"]: s.value for s in fams["ggufbot_jobs"].samples}
    assert jobs["queued"] == 1 and jobs["running"] == 1 and jobs["published"] == 1 and jobs["failed"] == 1
    for name in ("ggufbot_stage_duration_seconds", "ggufbot_fetched_bytes", "ggufbot_published_bytes",
                 "ggufbot_poll_duration_seconds", "ggufbot_models_seen", "ggufbot_hub_errors",
                 "ggufbot_last_successful_poll_timestamp_seconds"):
        assert name in fams, name
    assert http(site["url"] + "/healthz")[0] == 200
    site["healthy"]["ok"] = False
    assert http(site["url"] + "/healthz")[0] == 503


def _payload(repo: str, sha: str | None, scope: str = "repo.content") -> bytes:
    return json.dumps({"event": {"action": "update", "scope": scope},
                       "repo": {"type": "model", "name": repo, "headSha": sha},
                       "updatedRefs": [{"ref": "refs/heads/main", "oldSha": None, "newSha": sha}]}).encode()


def test_webhook_queues_a_watched_repo_once(site) -> None:
    hub, st, url = site["hub"], site["store"], site["url"]
    files = {"config.json": json.dumps(SMALL_CONFIG), "model.safetensors": b"\x08" + b"\0" * 7 + b"{}      ",
             "tokenizer.json": "{}"}
    sha = hub.add_model("acme/Hooked-1B", files, card_data={"license": "mit"}, config=SMALL_CONFIG,
                        safetensors_params=1_000_000, pipeline_tag="text-generation", library_name="transformers")
    hub.add_model("other/Elsewhere-1B", files, config=SMALL_CONFIG, pipeline_tag="text-generation")
    h = {"X-Webhook-Secret": SECRET, "Content-Type": "application/json"}
    code, text = http(url + "/webhooks/hub", data=_payload("acme/Hooked-1B", sha), headers=h)
    assert code == 200 and json.loads(text)["status"] == "queued", text
    [job] = st.jobs(repo="acme/Hooked-1B")
    assert job.revision == sha and job.status == J.Status.QUEUED
    code, text = http(url + "/webhooks/hub", data=_payload("acme/Hooked-1B", sha), headers=h)
    assert code == 200 and json.loads(text)["status"] == "decided" and len(st.jobs(repo="acme/Hooked-1B")) == 1
    for body in (_payload("acme/Hooked-1B", sha, scope="discussion.comment"), _payload("other/Elsewhere-1B", None)):
        code, text = http(url + "/webhooks/hub", data=body, headers=h)
        assert code == 200 and json.loads(text)["status"] == "ignored", text
    assert not st.jobs(repo="other/Elsewhere-1B")


def test_webhook_commands_and_hub_calls(site, tmp_path, capsys, monkeypatch) -> None:
    """``ggufbot webhook create|list|delete`` on the test Hub, and the Hub's call after a commit."""
    from bot.cli import main

    hub = site["hub"]
    cfg = tmp_path / "hook.toml"
    cfg.write_text(f'database_url = "sqlite:///{tmp_path / "other.db"}"\n[[sources]]\nauthor = "acme"\n'
                   f'[hub]\nendpoint = "{hub.url}"\n[web]\nwebhook_secret_file = "{tmp_path / "secret"}"\n')
    assert main(["webhook", "create", "--config", str(cfg), "--url", site["url"] + "/webhooks/hub"]) == 0
    out = capsys.readouterr().out
    assert "watching org:acme" in out and SECRET not in out
    [hook_id] = list(hub.webhooks)
    assert hub.webhooks[hook_id]["secret"] == SECRET
    assert main(["webhook", "list", "--config", str(cfg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["watched"] == [{"type": "org", "name": "acme"}]
    sha0 = hub.add_model("acme/Pushed-1B", {"config.json": json.dumps(SMALL_CONFIG), "tokenizer.json": "{}",
                                            "model.safetensors": b"\x08" + b"\0" * 7 + b"{}      "},
                         config=SMALL_CONFIG, safetensors_params=1_000_000, pipeline_tag="text-generation")
    sha1 = hub.add_commit("acme/Pushed-1B", {"tokenizer.json": '{"v": 2}'})
    deadline = time.monotonic() + 30
    while not hub.deliveries and time.monotonic() < deadline:
        time.sleep(0.05)
    [(hid, repo, status, text)] = hub.deliveries
    assert (hid, repo, status) == (hook_id, "acme/Pushed-1B", 200) and json.loads(text)["status"] == "queued"
    [job] = site["store"].jobs(repo="acme/Pushed-1B")
    assert job.revision == sha1 != sha0
    assert main(["webhook", "delete", "--config", str(cfg), hook_id]) == 0
    assert not hub.webhooks
