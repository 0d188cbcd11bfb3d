"""Lease-backed liveness in etcd: one node's session, and the run's own leases.

Every key a node writes is attached to its lease. The connection's keep-alive
stream keeps the lease alive; if the node dies, the lease expires after its TTL
and etcd deletes the node's keys by itself, which is how the others learn of
the death. The keys that outlive a round (the state record, the rounds' worlds
and stores) hang on the run's two leases instead (``RunLeases``), which every
live node keeps alive, so that a run nobody is left in disappears by itself.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

from rdzv.api import RendezvousError
from rdzv.client import EtcdClient, HeldLease, LeaseLostError
from rdzv.config import default_keepalive_interval
from rdzv.keys import RunKeys

logger = logging.getLogger(__name__)


class Session:
    """Grant a lease and keep it alive until ``close()``.

    Args:
        client: the etcd connection.
        ttl: lease time-to-live in seconds (a dead node is gone after this).
        keepalive_interval: seconds between keep-alives (well under ``ttl``).
        on_lost: called once when the lease is lost (from a background thread).

    Raises:
        RendezvousConnectionError: etcd cannot be reached to grant the lease.
    """

    def __init__(
        self,
        client: EtcdClient,
        ttl: int,
        keepalive_interval: float,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self.ttl = ttl
        self.keepalive_interval = keepalive_interval
        self._on_lost = on_lost
        self.lease_id = client.lease_grant(ttl)
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._lost_lock = threading.Lock()
        # (since, last) of answered_span, replaced whole so that a reader in
        # another thread never pairs a span's start with another span's end.
        started = time.monotonic()
        self._span = (started, started)
        self._kept = client.keep_alive(
            self.lease_id, ttl, keepalive_interval, self._stop, self._answered, self._silent
        )

    @property
    def node_id(self) -> str:
        """The lease id in hex: a cluster-wide unique id for this node."""
        return f"{self.lease_id:016x}"

    @property
    def lost(self) -> bool:
        """True once the lease is gone: etcd expired it, or it could not be kept
        alive for a whole TTL (etcd unreachable or not answering)."""
        return self._lost.is_set()

    @property
    def expiry(self) -> float:
        """The ``time.monotonic()`` time by which the lease has surely expired
        unless a keep-alive is answered meanwhile (-inf once it is lost)."""
        if self._lost.is_set():
            return -math.inf
        return self._kept.last_answer + self.ttl

    def mark_lost(self, why: str) -> None:
        """Record that the lease is gone (``why`` is logged); idempotent.

        The keep-alives call it when etcd reports the lease expired or when no
        keep-alive succeeded for a whole TTL; the handler calls it when a
        request learns the same.
        """
        with self._lost_lock:
            if self._lost.is_set():
                return
            self._lost.set()
        logger.warning("%s", why)
        if self._on_lost is not None:
            self._on_lost()

    @property
    def answered_span(self) -> tuple[float, float]:
        """``(since, last)``: the ``time.monotonic()`` times since which etcd
        answered every keep-alive, no two answers further apart than two
        keep-alive intervals, and of the last answer. A gap (etcd or the
        connection down, this process stopped) starts a new span."""
        return self._span

    def _answered(self, ttl: int) -> None:
        now = time.monotonic()
        since, last = self._span
        self._span = (now if now - last > 2 * self.keepalive_interval else since, now)
        if ttl <= 0:
            self.mark_lost(
                f"lease {self.lease_id:x} expired (keep-alives stalled past its "
                f"{self.ttl} s TTL); this node's keys are gone"
            )

    def _silent(self) -> None:
        self.mark_lost(
            f"lease {self.lease_id:x} presumed expired: no keep-alive succeeded for "
            f"{self.ttl} s"
        )

    def close(self, revoke: bool = True) -> None:
        """Stop the keep-alives and (by default) revoke the lease; idempotent.

        Clean-up never fails: it runs on the way out, often after another error,
        which must stay the one reported. A lease etcd no longer has needs no
        revoke; a revoke etcd could not take is logged, and the lease then
        expires within its TTL.
        """
        if self._stop.is_set():
            return
        self._stop.set()
        self._client.stop_keep_alive(self.lease_id)
        if revoke and not self.lost:
            try:
                self._client.lease_revoke(self.lease_id)
            except LeaseLostError:
                logger.debug("lease %x had already expired; nothing to revoke", self.lease_id)
            except RendezvousError as err:
                logger.warning(
                    "could not revoke lease %x (%s); it expires within %d s",
                    self.lease_id, err, self.ttl,
                )


class RunLeases:
    """The two leases that a run's long-lived keys hang on, kept alive by its nodes.

    The data lease (TTL ``grace``) holds the rounds' world and store keys and
    the state record of a closed run; the state lease (TTL ``idle``) holds the
    state record of an open run. Their ids come from the run's key
    (``RunKeys.data_lease``, ``RunKeys.state_lease``), so every node of the run
    keeps the same two alive, and they expire only when no node is left: a
    closed run's keys go ``grace`` seconds after its last node, an abandoned
    run's data after ``grace`` and its state record after ``idle`` seconds.

    Args:
        client: the etcd connection.
        keys: the run's key layout.
        grace: TTL of the data lease, in whole seconds.
        idle: TTL of the state lease, in whole seconds (at least ``grace``, so
            that the state record never goes before the rounds it describes).
    """

    def __init__(self, client: EtcdClient, keys: RunKeys, grace: int, idle: int) -> None:
        self._client = client
        self._ttls = {keys.data_lease: grace, keys.state_lease: idle}
        self._held: dict[int, HeldLease] = {}

    @property
    def lost(self) -> bool:
        """True if a lease is not (or no longer) kept alive: etcd dropped it, or
        its keep-alives went unanswered for its TTL."""
        return len(self._held) < len(self._ttls) or any(
            held.gone.is_set() for held in self._held.values())

    def grant(self) -> None:
        """Grant both leases where etcd does not have them (a new run).

        Raises:
            RendezvousConnectionError: etcd cannot be reached.
        """
        for lease_id, ttl in self._ttls.items():
            if self._client.lease_ensure(lease_id, ttl):
                logger.debug("granted run lease %x (TTL %d s)", lease_id, ttl)

    def hold(self) -> None:
        """Keep both leases alive (again, where they were lost)."""
        for lease_id, ttl in self._ttls.items():
            held = self._held.get(lease_id)
            if held is not None and not held.gone.is_set():
                continue
            if held is not None:
                self._client.release_lease(held)
            interval = default_keepalive_interval(ttl)
            self._held[lease_id] = self._client.hold_lease(lease_id, ttl, interval)

    def restore(self) -> None:
        """Grant and hold again whatever lease was lost.

        Raises:
            RendezvousConnectionError: etcd cannot be reached.
        """
        self.grant()
        self.hold()

    def release(self) -> None:
        """Stop keeping the leases alive (they expire unless other nodes hold them)."""
        held, self._held = self._held, {}
        for lease in held.values():
            self._client.release_lease(lease)
