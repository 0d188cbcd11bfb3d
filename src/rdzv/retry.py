"""The one retry policy of rdzv: which failures are retried, each attempt's
deadline, the waits between attempts, and when to give up.

``RetryPolicy`` is a value: a client holds one, and ``EtcdClient.with_retry``
gives the same connection under another (a handler's round requests stop at
its lease's expiry). ``classify`` sorts a failure into a ``Failure`` and
``explain`` says what it means to a user; ``Attempts`` is one request's
schedule under a policy. The client carries out
what they decide; nothing here talks to etcd.

The rules:

- etcd unreachable (connection refused, no route): retried with jittered
  backoff for ``connect_timeout`` seconds;
- etcd reachable but not answering in time (a dead leader's followers waiting
  for an election, an overloaded server or client): each attempt gets a
  deadline that starts at 2 s and doubles, for at most
  ``max(connect_timeout, 30 s)``;
- refused credentials, TLS failures and bad requests fail at once: retrying
  them would only hammer etcd. An expired auth token is renewed once and the
  call retried;
- a lease etcd no longer has fails at once, as does a failed attempt once the
  policy's horizon (when the caller's lease has surely expired) passed;
- with a deadline (when the caller gives up: a ``next_rendezvous()`` call's
  ``timeout``), every attempt is cut to end by then, and a request still
  failing at that time gives up.

The waits come from the core's ``Backoff`` (full jitter, doubling to a cap),
which the store's compare-and-swap loop (``contend``) shares too.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import grpc

from rdzv._etcd3_compat import load_etcd3
from rdzv._state import Backoff

__all__ = [
    "Attempts",
    "Failure",
    "OutOfTime",
    "RetryPolicy",
    "classify",
    "contend",
    "explain",
    "is_tls_failure",
]

_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# The least deadline an attempt gets when the caller's deadline is nearer:
# a request that etcd answers at once still goes through.
_LEAST_ATTEMPT = 0.05


class Failure(enum.Enum):
    """What a failed attempt means for the request."""

    #: etcd did not answer at all: retry within ``connect_timeout``.
    UNREACHABLE = "unreachable"
    #: etcd did not answer in time: retry with a longer deadline.
    SLOW = "slow"
    #: etcd's auth token expired: renew it once and retry.
    TOKEN_EXPIRED = "token expired"
    #: etcd no longer has the lease the request works for: give up.
    LEASE_LOST = "lease lost"
    #: anything else (refused credentials, TLS, a bad request): give up.
    FATAL = "fatal"


def classify(err: BaseException) -> Failure:
    """Sort the error of a failed attempt by what the request should do next."""
    if isinstance(err, grpc.RpcError):
        code = err.code() if hasattr(err, "code") else None
        details = (err.details() if hasattr(err, "details") else "") or ""
        if "invalid auth token" in details:
            return Failure.TOKEN_EXPIRED
        if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
            return Failure.LEASE_LOST
        if code not in _TRANSIENT or is_tls_failure(details):
            return Failure.FATAL
        return Failure.SLOW if code == grpc.StatusCode.DEADLINE_EXCEEDED else Failure.UNREACHABLE
    # etcd3's own errors come from its connect-and-authenticate step.
    if isinstance(err, load_etcd3().exceptions.Etcd3Exception):
        return Failure.UNREACHABLE
    return Failure.FATAL


def explain(detail: str) -> str:
    """What a failure's gRPC details mean to a user, and what to check."""
    lowered = detail.lower()
    if is_tls_failure(detail):
        return "TLS failure talking to etcd (check cacert, cert and key)"
    if "permission denied" in lowered:
        return (
            "etcd refused access (the user lacks read/write permission on the "
            "rendezvous keys; grant it on the etcd_prefix)"
        )
    words = ("authentication", "password", "user name", "auth token", "user is not")
    if any(word in lowered for word in words):
        return "etcd authentication failed (check username and password)"
    return "cannot reach etcd"


def is_tls_failure(detail: str) -> bool:
    """Whether a gRPC error's details speak of transport security."""
    # gRPC names its TCP connect step the "tcp handshaker": "tcp handshaker
    # shutdown" is a connection attempt cut off (seen in a child just after a
    # fork), a transient failure with nothing of TLS in it.
    lowered = detail.lower().replace("tcp handshaker", "")
    # "tsi_": gRPC's transport security layer; etcd 3.4 refusing a client
    # certificate surfaces only as "Unwrap failed (TSI_DATA_CORRUPTED)".
    words = ("ssl", "tls", "tsi_", "handshake", "certificate", "x509")
    return any(word in lowered for word in words)


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often a request to etcd is tried.

    Attributes:
        connect_timeout: seconds an unreachable etcd is retried.
        slow_budget: seconds a reachable but slow etcd is retried, at least
            ``connect_timeout``.
        first_attempt_timeout: the first attempt's deadline (at most
            ``connect_timeout``); it doubles after each attempt etcd was too
            slow for.
        first_backoff: the ceiling of the first wait between attempts.
        max_backoff: the largest ceiling of a wait.
        horizon: None, or a function returning the ``time.monotonic()`` time
            past which the caller's requests are of no use (its lease has
            surely expired): attempts are cut to end by then, and a request
            still failing at that time gives up.
        deadline: None, or a function returning the ``time.monotonic()`` time
            at which the caller gives up (its call times out): every attempt,
            the first too, is cut to end by then (but given at least
            ``_LEAST_ATTEMPT`` s), and a request still failing at that time
            gives up.
    """

    connect_timeout: float
    slow_budget: float = 30.0
    first_attempt_timeout: float = 2.0
    first_backoff: float = 0.005
    max_backoff: float = 0.5
    horizon: Callable[[], float] | None = None
    deadline: Callable[[], float] | None = None

    def bounded(self, horizon: Callable[[], float]) -> RetryPolicy:
        """This policy, giving up at ``horizon()`` (see ``horizon``)."""
        return replace(self, horizon=horizon)

    def until(self, deadline: Callable[[], float]) -> RetryPolicy:
        """This policy, giving up at ``deadline()`` (see ``deadline``)."""
        return replace(self, deadline=deadline)

    @property
    def attempt_timeout(self) -> float:
        """The deadline of a request's first attempt, before the caller's
        deadline cuts it (``first_timeout``)."""
        return min(self.connect_timeout, self.first_attempt_timeout)

    def first_timeout(self, now: float) -> float:
        """The deadline of a request's first attempt made at ``now``."""
        return min(self.attempt_timeout, max(self.until_deadline(now), _LEAST_ATTEMPT))

    def until_horizon(self, now: float) -> float:
        """Seconds left before the horizon (inf without one)."""
        return math.inf if self.horizon is None else self.horizon() - now

    def until_deadline(self, now: float) -> float:
        """Seconds left before the caller's deadline (inf without one)."""
        return math.inf if self.deadline is None else self.deadline() - now

    def start(self, now: float | None = None) -> Attempts:
        """The schedule of one request that starts at ``now`` (monotonic)."""
        return Attempts(self, time.monotonic() if now is None else now)


class OutOfTime(Exception):
    """A request's retries are over.

    Attributes:
        horizon: True if the policy's horizon passed (the caller's lease has
            presumably expired), False if the request's own deadline or the
            caller's did.
    """

    def __init__(self, horizon: bool) -> None:
        super().__init__("past the horizon" if horizon else "past the deadline")
        self.horizon = horizon


class Attempts:
    """One request's attempts under a ``RetryPolicy``.

    ``timeout`` is the deadline to give the next attempt; after a failed one,
    ``wait`` says how long to sleep before the next, or raises ``OutOfTime``.
    """

    def __init__(self, policy: RetryPolicy, start: float) -> None:
        self.policy = policy
        self.timeout = policy.first_timeout(start)
        self._unreachable_deadline = start + policy.connect_timeout
        self._slow_deadline = start + max(policy.connect_timeout, policy.slow_budget)
        # Made at the first failure: most requests succeed at once.
        self._backoff: Backoff | None = None

    def wait(self, failure: Failure, now: float | None = None) -> float:
        """The seconds to wait before the next attempt after ``failure``
        (``UNREACHABLE`` or ``SLOW``); sets the next attempt's ``timeout``.

        Raises:
            OutOfTime: no time is left for another attempt.
        """
        now = time.monotonic() if now is None else now
        if failure is Failure.SLOW:
            deadline = self._slow_deadline
            self.timeout = min(self.timeout * 2, self.policy.slow_budget)
        else:
            deadline = self._unreachable_deadline
        if self._backoff is None:
            self._backoff = Backoff(self.policy.first_backoff, self.policy.max_backoff)
        delay = self._backoff.next_delay()
        until_horizon = self.policy.until_horizon(now)
        until_deadline = self.policy.until_deadline(now)
        # A caller that times out before its lease would expire has not lost
        # the lease.
        if until_horizon <= delay and until_horizon <= until_deadline:
            raise OutOfTime(horizon=True)
        remaining = min(deadline - now, until_deadline)
        if remaining <= delay:
            raise OutOfTime(horizon=False)
        self.timeout = min(self.timeout, remaining - delay, until_horizon - delay)
        return delay


def contend(
    attempt: Callable[[], tuple[bool, Any]],
    deadline: float,
    first_backoff: float,
    max_backoff: float,
) -> tuple[bool, Any]:
    """Repeat a compare-and-swap ``attempt`` until it settles or ``deadline`` passes.

    ``attempt()`` returns ``(settled, result)``; an unsettled attempt lost a
    race to another writer and is tried again after a jittered wait (the core's
    ``Backoff``, from ``first_backoff`` doubling to ``max_backoff``), cut short
    at the deadline.

    Returns:
        ``(True, result)`` of the attempt that settled, or ``(False, result)`` of
        the last one if the deadline passed first.
    """
    backoff = None  # made at the first lost race: most attempts settle at once
    while True:
        settled, result = attempt()
        if settled:
            return True, result
        now = time.monotonic()
        if now >= deadline:
            return False, result
        if backoff is None:
            backoff = Backoff(first_backoff, max_backoff)
        time.sleep(min(backoff.next_delay(), deadline - now))
