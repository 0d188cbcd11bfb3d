"""The one retry policy, without a server: which failures are retried, each
attempt's deadline, when a request gives up, and the compare-and-swap loop."""

from __future__ import annotations

import time

import grpc
import pytest

from rdzv.retry import Failure, OutOfTime, RetryPolicy, classify, contend, explain


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize("error, failure", [
    (_RpcError(grpc.StatusCode.UNAVAILABLE, "connection refused"), Failure.UNREACHABLE),
    (_RpcError(grpc.StatusCode.UNAVAILABLE, "tcp handshaker shutdown"), Failure.UNREACHABLE),
    (_RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), Failure.SLOW),
    (_RpcError(grpc.StatusCode.UNAVAILABLE, "Ssl handshake failed"), Failure.FATAL),
    (_RpcError(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: invalid auth token"),
     Failure.TOKEN_EXPIRED),
    (_RpcError(grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found"),
     Failure.LEASE_LOST),
    (_RpcError(grpc.StatusCode.PERMISSION_DENIED, "permission denied"), Failure.FATAL),
    (ValueError("a bug"), Failure.FATAL),
])
def test_failures_are_sorted_by_what_the_request_does_next(
    error: BaseException, failure: Failure
) -> None:
    assert classify(error) is failure


@pytest.mark.parametrize("details, meaning", [
    ("failed to connect to all addresses; Connection refused", "cannot reach etcd"),
    ("Handshake failed: CERTIFICATE_VERIFY_FAILED", "TLS failure talking to etcd"),
    ("etcdserver: permission denied", "etcd refused access"),
    ("etcdserver: authentication failed, invalid user ID or password",
     "etcd authentication failed"),
])
def test_a_failure_is_explained_with_what_to_check(details: str, meaning: str) -> None:
    assert explain(details).startswith(meaning)


def test_an_unreachable_etcd_is_retried_for_connect_timeout() -> None:
    attempts = RetryPolicy(connect_timeout=1.0).start(now=0.0)
    assert attempts.timeout == 1.0  # the first attempt's 2 s, cut to connect_timeout
    now, waits = 0.0, 0
    with pytest.raises(OutOfTime) as out:
        while True:
            delay = attempts.wait(Failure.UNREACHABLE, now)
            assert 0 <= delay <= 0.5
            assert now + delay + attempts.timeout <= 1.0 + 1e-9  # ends by the deadline
            now, waits = now + delay + 0.01, waits + 1
    assert not out.value.horizon
    assert waits > 3 and now <= 1.0 + 0.01


def test_a_slow_etcd_gets_doubling_deadlines_for_30_seconds() -> None:
    attempts = RetryPolicy(connect_timeout=5.0).start(now=0.0)
    timeouts, now = [attempts.timeout], 0.0
    with pytest.raises(OutOfTime):
        while True:
            now += attempts.wait(Failure.SLOW, now) + attempts.timeout
            timeouts.append(attempts.timeout)
    assert timeouts[:4] == [2.0, 4.0, 8.0, 16.0]
    assert 25 < now <= 30.5


def test_a_bounded_policy_stops_at_its_horizon() -> None:
    horizon = 0.3
    policy = RetryPolicy(connect_timeout=5.0).bounded(lambda: horizon)
    assert policy.until_horizon(0.1) == pytest.approx(0.2)
    attempts = policy.start(now=0.0)
    attempts.wait(Failure.UNREACHABLE, 0.0)
    assert attempts.timeout <= horizon  # an attempt never outlives the lease
    with pytest.raises(OutOfTime) as out:
        attempts.wait(Failure.UNREACHABLE, horizon)
    assert out.value.horizon
    assert RetryPolicy(connect_timeout=5.0).until_horizon(0.0) == float("inf")


def test_a_policy_with_a_deadline_ends_every_attempt_by_it() -> None:
    deadline = 3.0
    policy = RetryPolicy(connect_timeout=5.0).until(lambda: deadline)
    assert policy.until_deadline(1.0) == pytest.approx(2.0)
    assert policy.first_timeout(0.0) == 2.0  # the first attempt's own, nearer
    assert policy.first_timeout(2.5) == pytest.approx(0.5)  # cut to the deadline
    assert policy.first_timeout(3.5) > 0  # past it: one short attempt still goes
    attempts = policy.start(now=2.0)
    assert attempts.timeout == pytest.approx(1.0)
    now = 2.0
    with pytest.raises(OutOfTime) as out:
        while True:  # a slow etcd: doubling deadlines, but none past 3 s
            now += attempts.wait(Failure.SLOW, now)
            assert now + attempts.timeout <= deadline + 1e-9
            now += attempts.timeout
    assert not out.value.horizon  # the caller's time ran out, not its lease
    assert now <= deadline + 1e-9


@pytest.mark.parametrize("horizon, deadline, lost", [(1.0, 2.0, True), (2.0, 1.0, False)])
def test_whichever_of_horizon_and_deadline_comes_first_ends_a_request(
        horizon: float, deadline: float, lost: bool) -> None:
    policy = RetryPolicy(connect_timeout=5.0).bounded(lambda: horizon).until(lambda: deadline)
    attempts = policy.start(now=0.0)
    with pytest.raises(OutOfTime) as out:
        attempts.wait(Failure.UNREACHABLE, 3.0)
    assert out.value.horizon is lost


def test_each_request_has_a_schedule_of_its_own() -> None:
    policy = RetryPolicy(connect_timeout=10.0)
    first, second = policy.start(now=0.0), policy.start(now=0.0)
    first.wait(Failure.SLOW, 0.0)
    assert (first.timeout, second.timeout) == (4.0, 2.0)


def test_the_compare_and_swap_loop_retries_lost_races_until_settled() -> None:
    outcomes = iter([(False, None), (False, None), (True, "won")])
    start = time.monotonic()
    assert contend(lambda: next(outcomes), start + 10, 0.0005, 0.02) == (True, "won")
    assert time.monotonic() - start < 1


def test_the_compare_and_swap_loop_gives_up_at_its_deadline() -> None:
    tries = []

    def lose() -> tuple[bool, int]:
        tries.append(time.monotonic())
        return False, len(tries)

    start = time.monotonic()
    settled, last = contend(lose, start + 0.2, 0.0005, 0.02)
    took = time.monotonic() - start
    assert not settled and last == len(tries) > 5
    assert 0.2 <= took < 2
