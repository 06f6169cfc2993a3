"""Gauges read from the state store at scrape time, served with this process's metrics at ``/metrics``
(:func:`bot.model.metrics.exposition`; the metric objects come from :func:`bot.model.metrics.gauge`, so that
``prometheus_client`` stays imported by :mod:`bot.model.metrics` alone)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from bot.model import metrics
from bot.model.metrics import Metric, gauge
from bot.service.status import hub_state

if TYPE_CHECKING:
    from bot.state.store import StateStore  # bot.state.base.StateStore once the state package has it


class StoreCollector:
    """Gauges read from the state store at scrape time: ``ggufbot_jobs{state}``,
    ``ggufbot_last_successful_poll_timestamp_seconds`` (the newest good poll of any source) and
    ``ggufbot_hub_reachable`` (0 while the last poll could not reach the Hub)."""

    STATES = ("queued", "running", "retrying", "published", "converted", "failed", "cancelled")

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        counts = self.store.counts()
        jobs = gauge("ggufbot_jobs", "Jobs in the state store by state", labels=["state"])
        for state in sorted(set(self.STATES) | set(counts)):
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        oks = [s.last_ok_at for s in self.store.sources() if s.last_ok_at]
        last = gauge("ggufbot_last_successful_poll_timestamp_seconds",
                     "Unix time of the last successful poll of any source (0: never)")
        last.add_metric([], max(oks) if oks else 0.0)
        yield last
        up = gauge("ggufbot_hub_reachable", "1 when the last poll reached the Hub, 0 during an outage")
        up.add_metric([], 1.0 if hub_state(self.store)["reachable"] else 0.0)
        yield up


def exposition(store: StateStore) -> bytes:
    """The text format of this process's metrics and the store's gauges."""
    return metrics.exposition(StoreCollector(store))
