"""Retry as a small value object: given an error and the attempt number, "retry in N s" or "give up".

Only what can heal is retried: timeouts and dropped connections (``HubError`` without a status), 408,
429 and 5xx, and a state-store connection lost under a query. A ``Retry-After`` the server sent is honoured (capped by ``max_retry_after``: a server asking
for an hour is better answered by failing the job and letting the scheduler come back later).

``attempt`` counts the attempts already made (1 after the first failure). The delay is
``min(cap, base * 2 ** (attempt - 1))`` with optional jitter; ``decide`` is pure unless ``jitter`` is set,
in which case the random source is injectable for tests.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from converters.core.errors import GgufbotError, HubError

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def _state_store_lost(error: BaseException) -> bool:
    """A database error that heals: the state store's connection broke under a query (a PostgreSQL restart or
    network cut) or SQLite's lock was held too long. Checked by name: this module does not import the drivers."""
    if getattr(error, "connection_invalidated", False):
        return True
    top = type(error).__module__.split(".", 1)[0]
    return type(error).__name__ == "OperationalError" and top in ("sqlalchemy", "psycopg", "sqlite3")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # total attempts, including the first
    base: float = 1.0  # seconds before the 1st retry
    cap: float = 30.0  # longest backoff delay
    max_retry_after: float = 120.0  # longest Retry-After honoured; beyond it, give up
    jitter: float = 0.0  # fraction of the delay added at random (0: deterministic)
    rand: Callable[[], float] = dataclasses.field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base < 0 or self.cap < 0 or self.jitter < 0:
            raise ValueError(f"invalid retry policy {self}")

    @classmethod
    def never(cls) -> "RetryPolicy":
        return cls(max_attempts=1)

    @staticmethod
    def retryable(error: BaseException) -> bool:
        if isinstance(error, HubError):
            return error.status is None or error.status in RETRY_STATUSES or error.status >= 500
        if isinstance(error, GgufbotError):
            return bool(error.transient)
        if _state_store_lost(error):
            return True
        return isinstance(error, (TimeoutError, ConnectionError))

    def decide(self, error: BaseException, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None to give up."""
        if attempt >= self.max_attempts or not self.retryable(error):
            return None
        retry_after = getattr(error, "retry_after", None)
        if retry_after is not None:
            if retry_after > self.max_retry_after:
                return None
            return max(0.0, float(retry_after))
        delay = min(self.cap, self.base * 2 ** (attempt - 1))
        if self.jitter:
            delay += delay * self.jitter * self.rand()
        return delay
