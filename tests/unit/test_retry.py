"""RetryPolicy.decide: what heals is retried with exponential backoff, Retry-After wins, the rest gives up."""

from __future__ import annotations

import pytest

from bot.model.retry import RetryPolicy
from converters.core.errors import CheckFailed, DiskSpaceError, HubAuthError, HubError, HubNotFound, InputError

P = RetryPolicy(max_attempts=5, base=1.0, cap=4.0)


@pytest.mark.parametrize("error, attempt, expected", [
    (HubError("x", status=500), 1, 1.0),
    (HubError("x", status=502), 2, 2.0),
    (HubError("x", status=503), 3, 4.0),
    (HubError("x", status=504), 4, 4.0),  # capped
    (HubError("x", status=500), 5, None),  # attempts used up
    (HubError("x", status=408), 1, 1.0),
    (HubError("x", status=429), 1, 1.0),
    (HubError("x", status=429, retry_after=7), 1, 7.0),  # Retry-After beats the backoff
    (HubError("x", status=503, retry_after=0), 3, 0.0),
    (HubError("x", status=None), 1, 1.0),  # timeout / dropped connection
    (HubError("x", status=400), 1, None),
    (HubError("x", status=412), 1, None),
    (HubAuthError("x", status=401), 1, None),
    (HubAuthError("x", status=403), 1, None),
    (HubNotFound("x", status=404), 1, None),
    (TimeoutError("t"), 1, 1.0),
    (ConnectionResetError("r"), 2, 2.0),
    (DiskSpaceError("/d", 10, 1), 1, 1.0),  # a transient project error
    (CheckFailed("gate", "kld"), 1, None),
    (InputError("bad"), 1, None),
    (ValueError("bug"), 1, None),
])
def test_decide(error: BaseException, attempt: int, expected: float | None) -> None:
    assert P.decide(error, attempt) == expected


def test_retry_after_beyond_limit_gives_up() -> None:
    p = RetryPolicy(max_attempts=3, max_retry_after=60)
    assert p.decide(HubError("x", status=429, retry_after=61), 1) is None
    assert p.decide(HubError("x", status=429, retry_after=60), 1) == 60


def test_never_and_single_attempt() -> None:
    assert RetryPolicy.never().decide(HubError("x", status=503), 1) is None


def test_jitter_uses_injected_random_source() -> None:
    p = RetryPolicy(max_attempts=4, base=2.0, cap=100.0, jitter=0.5, rand=lambda: 1.0)
    assert p.decide(HubError("x", status=500), 2) == pytest.approx(4.0 * 1.5)
    p0 = RetryPolicy(max_attempts=4, base=2.0, cap=100.0, jitter=0.5, rand=lambda: 0.0)
    assert p0.decide(HubError("x", status=500), 2) == pytest.approx(4.0)


def test_total_backoff_is_bounded() -> None:
    p = RetryPolicy(max_attempts=6, base=1.0, cap=8.0)
    delays = [p.decide(HubError("x", status=500), a) for a in range(1, 7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, None]


@pytest.mark.parametrize("kw", [{"max_attempts": 0}, {"base": -1}, {"cap": -0.5}, {"jitter": -0.1}])
def test_invalid_policy_rejected(kw: dict) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kw)


def test_a_state_store_connection_lost_under_a_query_is_retried_other_database_errors_are_not() -> None:
    import psycopg
    import sqlalchemy as sa
    lost = sa.exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("server closed the connection"))
    assert P.decide(lost, 1) == 1.0
    assert P.decide(psycopg.OperationalError("consuming input failed"), 1) == 1.0
    invalidated = sa.exc.DBAPIError("SELECT 1", {}, Exception("x"), connection_invalidated=True)
    assert P.decide(invalidated, 1) == 1.0
    broken_sql = sa.exc.ProgrammingError("SELEC 1", {}, psycopg.ProgrammingError("syntax error"))
    assert P.decide(broken_sql, 1) is None
