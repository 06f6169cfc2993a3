"""bot.state.engine: the one place that decides the delivery path, and the one outage wait (store and queue)."""

from __future__ import annotations

import pytest

from bot.state import engine as E


def test_the_delivery_path_is_decided_by_the_url() -> None:
    assert E.delivered_by_queue("postgresql+psycopg://u@h/db")
    assert not E.delivered_by_queue("sqlite:////tmp/x/ggufbot.db")
    assert E.conninfo("postgresql+psycopg://u:p@h:5433/db?options=-csearch_path%3Dt_1") == \
        "postgresql://u:p@h:5433/db?options=-csearch_path%3Dt_1"
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        E.conninfo("sqlite:///x.db")


def test_an_outage_wait_backs_off_warns_once_and_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(E.time, "monotonic", lambda: clock[0])
    stop = [False]
    wait = E.OutageWait(lambda: stop[0])
    warned: list[int] = []
    delays = [wait.retry_in(lambda: warned.append(1)) for _ in range(6)]
    assert delays == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0] and warned == [1]
    stop[0] = True  # a stop request: no more waiting
    assert wait.retry_in(lambda: warned.append(1)) is None
    wait = E.OutageWait(lambda: False)
    clock[0] += E.OUTAGE_SECONDS + 1  # past the deadline
    assert wait.retry_in(lambda: None) is None
