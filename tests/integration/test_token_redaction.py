"""The token goes nowhere, even when the Hub repeats it: the test Hub server echoes the request's token in its
error bodies (``tests.hubserver``), and the logs, the database, report.json, the published card and every
published file are searched for it after a publish that met errors and a job that failed on them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from bot.hub.client import Hub
from bot.publish.commit import PublishOptions, publish
from bot.model.retry import RetryPolicy
from bot.service.runner import Runner
from bot.model.settings import from_mapping
from bot.state.store import Store
from converters.core.errors import HubError
from tests.hub_fixtures import TEST_ORG, TEST_TOKEN
from tests.hubserver import HubServer
from tests.workdirs import make_workdir

SOURCE = "acme/Tiny-Instruct"
TARGET = f"{TEST_ORG}/Tiny-Instruct-GGUF"


def hub() -> Hub:
    return Hub(token=TEST_TOKEN, retry=RetryPolicy(max_attempts=4, base=0.01, cap=0.01), sleep=lambda s: None)


def test_the_server_does_echo_the_token(hub_server: HubServer) -> None:
    """Without this the searches below could not fail."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{hub_server.url}/api/models/acme/none",
                                 headers={"Authorization": f"Bearer {TEST_TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(req)
    assert http.value.code == 404 and TEST_TOKEN in http.value.read().decode()
    with pytest.raises(HubError) as ei:
        hub().model_info("acme/none")
    assert TEST_TOKEN not in str(ei.value)  # (a 404's message never carries the body: see the next test)


@pytest.mark.parametrize("status", [403, 500])
def test_an_error_message_that_repeats_the_server_body_is_redacted(hub_server: HubServer, status: int) -> None:
    """403 and 5xx messages carry the server's own words (``detail``): here they repeat the token."""
    hub_server.add_model(SOURCE, {"config.json": b"{}"})
    hub_server.fail_next(None, status=status, path_prefix=f"/api/models/{SOURCE}")
    with pytest.raises(HubError) as ei:
        hub().model_info(SOURCE)
    hub_server.clear_faults()
    assert ei.value.status == status
    assert f"injected fault {status} (request made with ***)" in str(ei.value)  # the body did reach the message
    assert TEST_TOKEN not in str(ei.value)


def test_a_token_other_than_the_configured_one_is_redacted(hub_server: HubServer, monkeypatch) -> None:
    """The token is rotated under a running bot (HF_TOKEN changed; the client reads it per request): the Hub echoes
    a token the adapter was not built with, and only the ``hf_...`` pattern can catch it."""
    rotated = "hf_rotatedtoken9876543210zyx"
    hub_server.valid_tokens[rotated] = hub_server.valid_tokens[TEST_TOKEN]
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    h = Hub(token=None, retry=RetryPolicy(max_attempts=1), sleep=lambda s: None)
    monkeypatch.setenv("HF_TOKEN", rotated)
    hub_server.add_model(SOURCE, {"config.json": b"{}"})
    hub_server.fail_next(1, status=403, path_prefix=f"/api/models/{SOURCE}")
    with pytest.raises(HubError) as ei:
        h.model_info(SOURCE)
    assert "(request made with hf_***)" in str(ei.value)  # the rotated token was sent and echoed...
    assert rotated not in str(ei.value) and TEST_TOKEN not in str(ei.value)  # ...and is not in the message


def test_no_token_in_logs_database_report_or_card(hub_server: HubServer, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    rev = hub_server.add_model(SOURCE, {"config.json": b'{"model_type": "llama"}'}, card_data={"license": "mit"},
                               pipeline_tag="text-generation")
    # a publish that meets errors on the way (each answer repeats the token), then succeeds
    wd = make_workdir(tmp_path / "wd", revision=rev)
    hub_server.fail_next(2, status=500, path_prefix=f"/api/models/{TARGET}")
    publish(wd, hub(), PublishOptions(namespace=TEST_ORG))
    # a bot job that meets a 503 (retried) and then fails on a 403, both echoing the token: the reason is stored
    settings = from_mapping({"data_dir": str(tmp_path / "data"), "sources": [{"author": "acme"}],
                             "limits": {"max_model_gb": 1.0, "min_free_disk_gb": 0.0}},
                            env={"HF_TOKEN": TEST_TOKEN}, free_disk=10**13)
    store = Store(settings.database_url)
    jid = store.enqueue("acme/Gone-1B", "a" * 40, reason="test", now=1)
    runner = Runner(settings, store, hub(), worker_id="w1")
    hub_server.fail_next(1, status=503, path_prefix="/api/models/acme/Gone-1B")
    hub_server.fail_next(1, status=403, path_prefix="/api/models/acme/Gone-1B")
    runner.run_one(now=2)
    job = store.job(jid)
    assert job is not None and job.status.value == "failed" and "request made with ***" in (job.error_message or "")
    store.close()

    assert hub_server.count(contains="") > 0
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "request made with" in logged  # the echoed errors were logged...
    assert TEST_TOKEN not in logged  # ...without the token
    db = Path(settings.database_url.removeprefix("sqlite:///"))
    for f in [db, *db.parent.glob(db.name + "-*")]:
        assert TEST_TOKEN.encode() not in f.read_bytes(), f
    assert TEST_TOKEN not in (wd / "report.json").read_text()
    published = hub_server.files(TARGET)
    assert "README.md" in published and json.loads(published["report.json"])
    for name, data in published.items():
        assert TEST_TOKEN.encode() not in data, name
