"""A lease-backed session: one node's liveness in etcd.

Every key a node writes is attached to its lease. A background thread keeps the
lease alive; if the node dies, the lease expires after its TTL and etcd deletes
the node's keys by itself, which is how the others learn of the death.
"""

from __future__ import annotations

import logging
import threading
import time

from rdzv.api import RendezvousConnectionError
from rdzv.client import EtcdClient

logger = logging.getLogger(__name__)


class Session:
    """Grant a lease and keep it alive until ``close()``.

    Args:
        client: the etcd connection.
        ttl: lease time-to-live in seconds (a dead node is gone after this).
        keepalive_interval: seconds between keep-alives (well under ``ttl``).

    Raises:
        RendezvousConnectionError: etcd cannot be reached to grant the lease.
    """

    def __init__(self, client: EtcdClient, ttl: int, keepalive_interval: float) -> None:
        self._client = client
        self.ttl = ttl
        self.keepalive_interval = keepalive_interval
        self.lease_id = client.lease_grant(ttl)
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(
            target=self._keepalive_loop, name=f"rdzv-lease-{self.lease_id:x}", daemon=True
        )
        self._thread.start()

    @property
    def node_id(self) -> str:
        """The lease id in hex: a cluster-wide unique id for this node."""
        return f"{self.lease_id:016x}"

    @property
    def lost(self) -> bool:
        """True once etcd has expired the lease (keep-alives stalled past the TTL)."""
        return self._lost.is_set()

    def _keepalive_loop(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.keepalive_interval):
            try:
                ttl = self._client.lease_keepalive(self.lease_id)
            except RendezvousConnectionError as err:
                if time.monotonic() - last_ok > self.ttl:
                    logger.warning("lease %x presumed expired: %s", self.lease_id, err)
                    self._lost.set()
                    return
                continue
            except Exception:  # the channel was closed under us by close()
                if self._stop.is_set():
                    return
                raise
            if ttl <= 0:
                logger.warning(
                    "lease %x expired (keep-alives stalled past its %d s TTL); this "
                    "node's keys are gone", self.lease_id, self.ttl
                )
                self._lost.set()
                return
            last_ok = time.monotonic()

    def close(self, revoke: bool = True) -> None:
        """Stop the keep-alives and (by default) revoke the lease; idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=self.keepalive_interval + 1)
        if revoke and not self.lost:
            try:
                self._client.lease_revoke(self.lease_id)
            except RendezvousConnectionError as err:
                logger.warning("could not revoke lease %x: %s", self.lease_id, err)
