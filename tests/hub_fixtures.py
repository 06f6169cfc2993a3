"""pytest plugin: a session-wide local Hub server that the real ``huggingface_hub`` client talks to.

Load it from ``tests/conftest.py`` with ``pytest_plugins = ["tests.hub_fixtures"]``. Importing this module
sets ``HF_ENDPOINT`` (to a port reserved now, served later), ``HF_HOME``, ``HF_TOKEN`` and the switches of
HUB_API.md. The client reads the endpoint when it is imported, so this plugin must be loaded before
anything imports ``huggingface_hub`` (transformers does): keep conftest.py free of such imports at module
level.

Fixtures:
- ``hub_server_session`` (session): the running :class:`tests.hubserver.HubServer`.
- ``hub_server`` (function): the same server, reset (no repos, no faults, empty log, default tokens);
  the client's own backoff sleeps are recorded in ``hub_server.client_sleeps`` and not slept.
- ``hub_token``: the token the server accepts (user ``TEST_USER``, member of ``TEST_ORG``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Iterator

import pytest

from tests.hubserver import HubServer, free_port, point_client_here

TEST_TOKEN = "hf_localtesttoken0123456789"
TEST_USER = "tester"
TEST_ORG = "ggufbot-test"


_PORT = free_port()
_HF_HOME = tempfile.mkdtemp(prefix="ggufbot-hfhome-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)  # the client's cache of this test session

# a client imported before this point kept another endpoint: reported by the fixture, with the fix
_EARLY_IMPORT = "huggingface_hub" in sys.modules and os.environ.get("HF_ENDPOINT") != f"http://127.0.0.1:{_PORT}"
ENDPOINT = point_client_here(_PORT, _HF_HOME, TEST_TOKEN)


def default_tokens() -> dict[str, str]:
    return {TEST_TOKEN: TEST_USER}


@pytest.fixture(scope="session")
def hub_server_session() -> Iterator[HubServer]:
    if _EARLY_IMPORT:
        pytest.fail("huggingface_hub was imported before tests.hub_fixtures set HF_ENDPOINT; load the plugin "
                    "first (pytest_plugins in tests/conftest.py) and keep conftest free of hub imports")
    server = HubServer(valid_tokens=default_tokens(), user_orgs={TEST_USER: [TEST_ORG]}, port=_PORT)
    server.start()
    assert server.url == ENDPOINT
    yield server
    server.stop()


class _NoSleepTime(types.SimpleNamespace):
    """Stands in for the ``time`` module inside huggingface_hub's backoff: records sleeps, does not sleep."""


@pytest.fixture
def hub_server(hub_server_session: HubServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    from huggingface_hub.utils import _http  # imported here: the environment above is set by now

    hub_server_session.reset(valid_tokens=default_tokens())
    hub_server_session.page_size = 50
    hub_server_session.user_orgs = {TEST_USER: [TEST_ORG]}
    sleeps: list[float] = []
    fake = _NoSleepTime(sleep=sleeps.append, time=time.time, monotonic=time.monotonic,
                        perf_counter=time.perf_counter)
    monkeypatch.setattr(_http, "time", fake)
    hub_server_session.client_sleeps = sleeps  # type: ignore[attr-defined]
    monkeypatch.setenv("HF_TOKEN", TEST_TOKEN)
    yield hub_server_session
    if hub_server_session.errors:  # a bug of the test server must not pass for an injected fault
        pytest.fail("hubserver raised:\n" + "\n".join(hub_server_session.errors))


@pytest.fixture
def hub_token() -> str:
    return TEST_TOKEN
