"""A Hub outage during a poll: the real huggingface_hub client against the local Hub-compatible server, stopped.

The poll stops at the first connection failure with one warning line ("Hub unreachable: ...; next poll at ..."),
at once (no client-side retries with sleeps: huggingface_hub's backoff is *not* patched out here), no internal
exception text reaches a source's reason or a log line, the outage is recorded for ``ggufbot status``,
``/healthz`` (200 with ``degraded``: a restart cannot bring the Hub back) and ``/metrics``, and it clears when
the Hub answers again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.cli import main
from bot.hub.client import Hub, HubUnreachable
from bot.model.settings import from_mapping
from bot.service.status import status_data
from bot.state.store import Store
from bot.service.watcher import Watcher
from bot.web.site import StatusSite, WebServer
from tests.hub_fixtures import TEST_TOKEN
from tests.hubserver import HubServer, free_port

AUTHORS = [f"org{i:02d}" for i in range(20)]
INTERNAL = ("Error:", "NoneType", "Traceback", "attribute", "Errno")


def settings_for(tmp_path: Path, endpoint: str):
    raw = {"data_dir": str(tmp_path / "data"), "database_url": f"sqlite:///{tmp_path / 'ggufbot.db'}",
           "sources": [{"author": a} for a in AUTHORS], "hub": {"endpoint": endpoint},
           "schedule": {"poll_minutes": 30}}
    return from_mapping(raw, env={"HF_TOKEN": TEST_TOKEN}, free_disk=10**12)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def poll_within(watcher: Watcher, now: float, seconds: float):
    """The poll in a daemon thread: the test fails (instead of hanging minutes) when it does not end in time."""
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("res", watcher.poll(now=now)), daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"the poll of {len(AUTHORS)} authors with the Hub down took over {seconds} s"
    return out["res"], time.monotonic() - t0


def test_a_poll_with_the_hub_down_is_one_line_and_the_outage_shows_until_it_clears(tmp_path, caplog,
                                                                                    capsys) -> None:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"  # nothing listens yet: connection refused
    s = settings_for(tmp_path, endpoint)
    st = Store(s.database_url)
    hub = Hub(token=TEST_TOKEN, endpoint=endpoint)  # the real sleep and retry policy
    listings: list[str] = []
    real_list = hub.list_models

    def counted(**kw):
        listings.append(kw["author"])
        return real_list(**kw)

    hub.list_models = counted  # type: ignore[method-assign]
    watcher = Watcher(s, st, hub)
    web = WebServer(StatusSite(s, st, watcher=watcher, hub_url=endpoint, health=lambda: True), "127.0.0.1:0").start()
    try:
        caplog.set_level(logging.INFO)
        now = time.time()
        res, took = poll_within(watcher, now, 5.0)
        assert took < 5.0 and not res.ok and res.decided == 0
        assert 1 <= len(listings) <= s.hub.poll_workers  # stopped at the first failure (the others in flight)
        loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(loud) == 1, [r.getMessage() for r in loud]
        line = loud[0].getMessage()
        assert line.startswith(f"Hub unreachable: connection refused ({endpoint}); next poll at "), line
        assert not any(w in line for w in INTERNAL)
        # every source is recorded as failed (none is due again before the next poll), with a clean reason
        rows = {r.key: r for r in st.sources()}
        assert len(rows) == len(AUTHORS)
        for r in rows.values():
            assert r.last_poll_at == now and r.failures == 1 and "Hub unreachable (connection refused)" in r.last_error
            assert not any(w in r.last_error for w in INTERNAL), r.last_error
        hub_now = status_data(st, s, now)["hub"]
        assert hub_now["reachable"] is False and hub_now["reason"] == "connection refused"
        assert hub_now["since"] == now and hub_now["next_poll_at"] == now + 30 * 60
        # /healthz: still 200 (a restart cannot fix the Hub), the body says degraded and why
        code, body = get(web.url + "/healthz")
        health = json.loads(body)
        assert code == 200 and health["degraded"] is True and health["hub"]["reason"] == "connection refused"
        fams = {f.name: f for f in text_string_to_metric_families(get(web.url + "/metrics")[1])}
        assert fams["ggufbot_hub_reachable"].samples[0].value == 0.0
        # ggufbot status says so on its first line
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'data_dir = "{tmp_path / "data"}"\ndatabase_url = "{s.database_url}"\n'
                       f'[hub]\nendpoint = "{endpoint}"\n[[sources]]\nauthor = "org00"\n')
        capsys.readouterr()
        assert main(["status", "--config", str(cfg)]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith("Hub unreachable since ") and "connection refused" in first and "next poll at" in first

        # a second poll in the outage: still one line, the outage keeps its start
        caplog.clear()
        res, took = poll_within(watcher, now + 1800, 5.0)
        assert [r.getMessage()[:16] for r in caplog.records if r.levelno >= logging.WARNING] == ["Hub unreachable:"]
        assert status_data(st, s, now + 1800)["hub"]["since"] == now

        # the Hub answers again: the next poll clears the outage
        with HubServer(valid_tokens={TEST_TOKEN: "tester"}, port=port):
            caplog.clear()
            res, _ = poll_within(watcher, now + 3600, 30.0)
            assert res.ok, res.to_json()
        assert status_data(st, s, now + 3600)["hub"] == {"reachable": True}
        assert any(r.getMessage().startswith("Hub reachable again") for r in caplog.records)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        code, body = get(web.url + "/healthz")
        assert code == 200 and json.loads(body)["degraded"] is False
    finally:
        web.stop()
        st.close()


def test_an_unresolvable_hub_host_is_unreachable_at_once() -> None:
    sleeps: list[float] = []
    hub = Hub(endpoint="http://ggufbot-no-such-host.invalid", sleep=sleeps.append)
    t0 = time.monotonic()
    with pytest.raises(HubUnreachable) as info:
        list(hub.list_models(author="acme"))
    with pytest.raises(HubUnreachable):
        hub.model_info("acme/M")  # a request the client does not retry: not retried here either
    assert time.monotonic() - t0 < 5.0 and sleeps == []
    assert info.value.reason == "name not resolved" and info.value.transient
    assert str(info.value) == "list_models: Hub unreachable (name not resolved)"


def test_an_unexpected_client_exception_keeps_its_text_out_of_the_reason() -> None:
    err = Hub(endpoint="http://127.0.0.1:9")._convert(AttributeError("'NoneType' object has no attribute 'request'"),
                                                      "list_models")
    assert str(err) == "list_models: unexpected failure in the Hub client" and err.status is None


def test_concurrent_connection_failures_never_leak_a_client_race(monkeypatch) -> None:
    """Before: every ConnectError made huggingface_hub close the shared client while other poll threads were
    fetching or using it: some got ``None`` as their client ('NoneType' object has no attribute 'request'), others
    a closed one ('Cannot send a request, as the client has been closed'). The client's backoff sleeps are
    skipped here so that the old behaviour fails quickly instead of slowly."""
    import types

    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda s: None, time=time.time,
                                                             monotonic=time.monotonic))
    hub = Hub(endpoint=f"http://127.0.0.1:{free_port()}", sleep=lambda s: None)
    errors: list[BaseException] = []

    def hammer() -> None:
        for _ in range(25):
            try:
                list(hub.list_models(author="acme"))
            except BaseException as e:  # noqa: BLE001 - collected and checked below
                errors.append(e)

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 200
    assert {str(e) for e in errors} == {"list_models: Hub unreachable (connection refused)"}
    assert {type(e) for e in errors} == {HubUnreachable}
