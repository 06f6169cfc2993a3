"""Job states: every legal move is allowed, every other one refused; error fields; retry decisions."""

from __future__ import annotations

import itertools

import pytest

from bot.model import jobstate as J
from bot.service.runner import retry_policy
from bot.model.settings import from_mapping
from converters.core.errors import DiskSpaceError, HubError, HubNotFound, StateError, ToolError, UnsupportedModel

S = J.Status
LEGAL = {
    (S.QUEUED, S.RUNNING), (S.QUEUED, S.CANCELLED),
    (S.RETRYING, S.RUNNING), (S.RETRYING, S.QUEUED), (S.RETRYING, S.CANCELLED),
    (S.RUNNING, S.PUBLISHED), (S.RUNNING, S.CONVERTED), (S.RUNNING, S.FAILED), (S.RUNNING, S.RETRYING),
    (S.RUNNING, S.CANCELLED), (S.RUNNING, S.QUEUED),
    (S.FAILED, S.QUEUED), (S.CANCELLED, S.QUEUED),
}


@pytest.mark.parametrize("src,dst", list(itertools.product(list(S), list(S))))
def test_transition_table(src: J.Status, dst: J.Status) -> None:
    if (src, dst) in LEGAL:
        J.check(src, dst)
        assert src in J.sources_of(dst)
    else:
        with pytest.raises(StateError, match=f"{src.value} -> {dst.value}"):
            J.check(src, dst)
        assert src not in J.sources_of(dst)


def test_finished_states_are_final_except_for_retry() -> None:
    assert {s for s in S if s.finished} == {S.PUBLISHED, S.CONVERTED, S.FAILED, S.CANCELLED}
    assert not J.TRANSITIONS[S.PUBLISHED] and not J.TRANSITIONS[S.CONVERTED]
    assert {s for s in S if s.claimable} == {S.QUEUED, S.RETRYING}
    assert J.check("queued", "running") is None  # strings are accepted too


@pytest.mark.parametrize("err,etype,msg", [
    (HubError("model_info x: the Hub answered 503", status=503), "HubError", "model_info x: the Hub answered 503"),
    (UnsupportedModel("needs trust_remote_code", repo="a/b"), "UnsupportedModel", "a/b: needs trust_remote_code"),
    (ValueError("bad\nsecond line"), "ValueError", "bad"),
])
def test_error_fields(err: BaseException, etype: str, msg: str) -> None:
    assert J.error_fields(err) == (etype, msg)


@pytest.mark.parametrize("err,attempt,expect", [
    (HubError("x", status=503), 1, 10.0),
    (HubError("x", status=503), 2, 20.0),
    (HubError("x", status=503), 3, 40.0),
    (HubError("x", status=503), 4, None),  # max_attempts reached
    (HubError("x", status=None), 1, 10.0),  # network error
    (HubError("x", status=429, retry_after=30), 1, 30.0),
    (HubNotFound("x", status=404), 1, None),
    (UnsupportedModel("auto_map"), 1, None),
    (DiskSpaceError("/d", 10, 1), 1, 10.0),
    (ToolError(["llama-quantize"], -9, "killed"), 1, 10.0),  # killed by a signal: may heal
    (ToolError(["llama-quantize"], 1, "bad"), 1, None),  # a clean failure does not
])
def test_retry_policy_for_jobs(err: BaseException, attempt: int, expect: float | None) -> None:
    s = from_mapping({"schedule": {"retry_base_seconds": 10, "retry_max_seconds": 40}, "limits": {"max_attempts": 4}},
                     env={}, free_disk=10**12)
    assert retry_policy(s).decide(err, attempt) == expect
