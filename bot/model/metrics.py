"""The bot's Prometheus metrics (``prometheus_client``), served at ``/metrics`` by :mod:`bot.web.site`.

Two kinds:

- counted in this process, on a registry of its own (:data:`REGISTRY`), by one-line calls from the modules
  that see the thing happen: stage durations (the runner's hooks), bytes fetched and published and Hub errors
  by status code (the Hub adapter), poll duration, models seen and webhook calls (the watcher and
  :mod:`bot.web.webhooks`);
- read from the state store when scraped (:class:`bot.web.gauges.StoreCollector`, made with :func:`gauge` and
  given to :func:`exposition`): jobs by state and the time of the last successful poll, so that
  ``ggufbot serve`` alone shows every worker's jobs.

The calls below never raise: a metric must not fail a job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

STAGE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
POLL_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)

STAGE_SECONDS = Histogram("ggufbot_stage_duration_seconds", "Wall time of a finished job stage",
                          ["stage"], buckets=STAGE_BUCKETS, registry=REGISTRY)
FETCHED_BYTES = Counter("ggufbot_fetched_bytes", "Bytes of model files downloaded from the Hub", registry=REGISTRY)
PUBLISHED_BYTES = Counter("ggufbot_published_bytes", "Bytes of files committed to the Hub", registry=REGISTRY)
POLL_SECONDS = Histogram("ggufbot_poll_duration_seconds", "Wall time of one poll of all sources",
                         buckets=POLL_BUCKETS, registry=REGISTRY)
MODELS_SEEN = Counter("ggufbot_models_seen", "Models listed by polls (newer than each source's mark)",
                      registry=REGISTRY)
HUB_ERRORS = Counter("ggufbot_hub_errors", "Failed Hub requests by HTTP status ('none': network or timeout)",
                     ["status"], registry=REGISTRY)
WEBHOOKS = Counter("ggufbot_webhooks", "Hub webhook calls received, by outcome", ["outcome"], registry=REGISTRY)
JOBS_FINISHED = Counter("ggufbot_jobs_finished", "Jobs this process ran to an end, by final state", ["state"],
                        registry=REGISTRY)


def _safely(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - metrics never fail the caller
        log.debug("metric update failed: %s", e)


_started: dict[Hashable, float] = {}
_started_lock = threading.Lock()


def stage_started(key: Hashable) -> None:
    """A stage began (``key``: e.g. (job id, stage)); :func:`stage_finished` times it when it reports no time."""
    with _started_lock:
        _started[key] = time.monotonic()


def stage_finished(stage: str, seconds: Any, key: Hashable = None) -> None:
    with _started_lock:
        began = _started.pop(key, None)
    if not isinstance(seconds, (int, float)) and began is not None:
        seconds = time.monotonic() - began
    if isinstance(seconds, (int, float)) and seconds >= 0:
        _safely(STAGE_SECONDS.labels(stage=stage).observe, float(seconds))


def fetched(n_bytes: int) -> None:
    if n_bytes > 0:
        _safely(FETCHED_BYTES.inc, n_bytes)


def published(n_bytes: int) -> None:
    if n_bytes > 0:
        _safely(PUBLISHED_BYTES.inc, n_bytes)


def polled(seconds: float, models_seen: int) -> None:
    _safely(POLL_SECONDS.observe, seconds)
    if models_seen > 0:
        _safely(MODELS_SEEN.inc, models_seen)


def hub_error(status: int | None) -> None:
    _safely(HUB_ERRORS.labels(status=str(status) if status else "none").inc)


def webhook(outcome: str) -> None:
    _safely(WEBHOOKS.labels(outcome=outcome).inc)


def job_finished(state: str) -> None:
    _safely(JOBS_FINISHED.labels(state=state).inc)


def gauge(name: str, documentation: str, labels: Sequence[str] | None = None) -> GaugeMetricFamily:
    """A gauge read at scrape time (a collector given to :func:`exposition` yields these; :mod:`bot.web.gauges`)."""
    return GaugeMetricFamily(name, documentation, labels=labels)


class Collector(Protocol):
    """What :func:`exposition` reads besides this process's metrics: metrics made at scrape time."""

    def collect(self) -> Iterator[Metric]: ...


class _ProcessMetrics:
    """Re-exports :data:`REGISTRY`'s metrics inside another registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def exposition(*collectors: Collector) -> bytes:
    """The text format of this process's metrics and of the ``collectors``' (e.g. the store's gauges)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_ProcessMetrics())  # type: ignore[arg-type]
    for c in collectors:
        reg.register(c)  # type: ignore[arg-type]
    return generate_latest(reg)
