"""A lease-backed session: one node's liveness in etcd.

Every key a node writes is attached to its lease. The connection's keep-alive
stream keeps the lease alive; if the node dies, the lease expires after its TTL
and etcd deletes the node's keys by itself, which is how the others learn of
the death.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

from rdzv.api import RendezvousConnectionError
from rdzv.client import EtcdClient

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

    def _answered(self, ttl: int) -> None:
        # A renewal is recorded by the hub (``last_answer``); only a refusal matters.
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
        """Stop the keep-alives and (by default) revoke the lease; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._client.stop_keep_alive(self.lease_id)
        if revoke and not self.lost:
            try:
                self._client.lease_revoke(self.lease_id)
            except RendezvousConnectionError as err:
                logger.warning("could not revoke lease %x: %s", self.lease_id, err)
