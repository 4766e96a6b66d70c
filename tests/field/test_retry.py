"""The retry policy shared by ``serve_forever`` and ``ReconnectingTunnelChannel``."""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import TypedDict, Unpack

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from tunnel._retry import PERMANENT_STATUSES, Retry, resolve_metadata


class RetrySettings(TypedDict, total=False):
    """``Retry``'s keyword arguments, any of them."""

    min_backoff: float
    max_backoff: float
    jitter: float
    stable_after: float
    permanent_statuses: Collection[Status]
    permanent_attempts: int


def retry(**overrides: Unpack[RetrySettings]) -> Retry:
    return Retry(
        min_backoff=overrides.get("min_backoff", 0.1),
        max_backoff=overrides.get("max_backoff", 1.0),
        jitter=overrides.get("jitter", 0.0),
        stable_after=overrides.get("stable_after", 5.0),
        permanent_statuses=overrides.get("permanent_statuses", PERMANENT_STATUSES),
        permanent_attempts=overrides.get("permanent_attempts", 3),
    )


def test_backoff_doubles_up_to_the_maximum() -> None:
    policy = retry()
    assert [policy.next_delay() for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_a_stable_tunnel_resets_the_backoff_a_short_one_does_not() -> None:
    policy = retry()
    for _ in range(4):
        policy.next_delay()
    policy.closed_after(4.9)  # flapping: keep backing off
    assert policy.next_delay() == pytest.approx(1.0)
    policy.closed_after(5.0)  # it stayed up: the other end is healthy again
    assert policy.next_delay() == pytest.approx(0.1)


def test_jitter_stays_within_its_fraction() -> None:
    random.seed(7)
    policy = retry(jitter=0.2, max_backoff=0.1)
    delays = [policy.next_delay() for _ in range(200)]
    assert all(0.08 <= d <= 0.12 for d in delays)
    assert len({round(d, 6) for d in delays}) > 100  # not in step


def test_permanent_refusals_are_raised_after_the_allowed_attempts() -> None:
    policy = retry()
    refusal = GRPCError(Status.PERMISSION_DENIED, "key not allowed")
    policy.failed(refusal)
    policy.failed(refusal)
    with pytest.raises(GRPCError) as exc_info:
        policy.failed(refusal)
    assert exc_info.value is refusal


def test_other_failures_and_successes_reset_the_count() -> None:
    policy = retry()
    refusal = GRPCError(Status.UNAUTHENTICATED)
    for interruption in (GRPCError(Status.UNAVAILABLE), ConnectionRefusedError(), None):
        policy.failed(refusal)
        policy.failed(refusal)
        if interruption is None:
            policy.opened()
        else:
            policy.failed(interruption)
    policy.failed(refusal)
    policy.failed(refusal)  # still only two in a row


def test_which_statuses_are_permanent_is_configurable() -> None:
    policy = retry(permanent_statuses={Status.NOT_FOUND}, permanent_attempts=1)
    policy.failed(GRPCError(Status.UNAUTHENTICATED))  # no longer permanent
    with pytest.raises(GRPCError):
        policy.failed(GRPCError(Status.NOT_FOUND))


@pytest.mark.parametrize(
    "bad",
    [
        {"min_backoff": 0},
        {"min_backoff": 2.0, "max_backoff": 1.0},
        {"jitter": 1.0},
        {"stable_after": -1},
        {"permanent_attempts": 0},
    ],
)
def test_bad_settings_are_refused(bad: RetrySettings) -> None:
    with pytest.raises(ValueError):
        retry(**bad)


async def test_metadata_sources() -> None:
    assert dict(await resolve_metadata({"a": "1"})) == {"a": "1"}
    assert dict(await resolve_metadata(None)) == {}
    assert dict(await resolve_metadata(lambda: [("b", "2")])) == {"b": "2"}

    async def fetch() -> dict[str, str]:
        return {"c": "3"}

    assert dict(await resolve_metadata(fetch)) == {"c": "3"}
