"""Lease-backed liveness in etcd: one node's session, and the run's own leases.

Every key a node writes is attached to its lease. The connection's keep-alive
stream keeps the lease alive; if the node dies, the lease expires after its TTL
and etcd deletes the node's keys by itself, which is how the others learn of
the death. A lease is a node's own, or one that all the nodes of a process
share (``lease_scope=process``): one keep-alive for all of them, and the
process is what dies. The keys that outlive a round (the state record, the rounds' worlds
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


class _NodeLease:
    """A granted lease kept alive on the connection's keep-alive stream, for one
    node or for every node of a process that shares it (``Session``).

    It knows when it is lost (etcd expired it, or no keep-alive was answered
    for a whole TTL) and tells each session on it. Keys that a node on a
    shared lease could not delete when it left (``orphan``) are deleted in the
    background until that succeeds or the lease is gone.
    """

    def __init__(
        self, client: EtcdClient, ttl: int, keepalive_interval: float,
        grant_client: EtcdClient | None = None,
    ) -> None:
        self._client = client
        self.ttl = ttl
        self.keepalive_interval = keepalive_interval
        self.lease_id = (grant_client or client).lease_grant(ttl)
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._lock = threading.Lock()
        self._listeners: dict[int, Callable[[], None]] = {}
        self._orphans: list[tuple[bytes, ...]] = []
        self._orphan_thread: threading.Thread | None = None
        self._revoked = False
        # Sessions attached and node ids handed out (a shared lease's registry
        # lock guards both).
        self.users = 0
        self.issued = 0
        # (since, last) of answered_span, replaced whole so that a reader in
        # another thread never pairs a span's start with another span's end.
        started = time.monotonic()
        self._span = (started, started)
        self._kept = client.keep_alive(
            self.lease_id, ttl, keepalive_interval, self._stop, self._answered, self._silent
        )

    @property
    def lost(self) -> bool:
        """As ``Session.lost``."""
        return self._lost.is_set()

    @property
    def expiry(self) -> float:
        """As ``Session.expiry``."""
        if self._lost.is_set():
            return -math.inf
        return self._kept.last_answer + self.ttl

    @property
    def answered_span(self) -> tuple[float, float]:
        """As ``Session.answered_span``."""
        return self._span

    def listen(self, token: int, on_lost: Callable[[], None] | None) -> None:
        """Call ``on_lost`` (if any) when the lease is lost, until ``unlisten(token)``."""
        if on_lost is not None:
            with self._lock:
                self._listeners[token] = on_lost

    def unlisten(self, token: int) -> None:
        """Forget the ``on_lost`` given with ``token``."""
        with self._lock:
            self._listeners.pop(token, None)

    def mark_lost(self, why: str) -> None:
        """As ``Session.mark_lost``: every listener is called, once."""
        with self._lock:
            if self._lost.is_set():
                return
            self._lost.set()
            listeners = list(self._listeners.values())
        logger.warning("%s", why)
        for on_lost in listeners:
            on_lost()

    def _answered(self, ttl: int) -> None:
        now = time.monotonic()
        since, last = self._span
        self._span = (now if now - last > 2 * self.keepalive_interval else since, now)
        if ttl <= 0:
            self.mark_lost(
                f"lease {self.lease_id:x} expired (keep-alives stalled past its "
                f"{self.ttl} s TTL); the keys on it are gone"
            )

    def confirm_if_lapsed(self, client: EtcdClient | None = None) -> None:
        """If no keep-alive was answered for a TTL by this process's clock (and
        the keep-alives have not said the lease is lost), ask etcd whether it
        still holds the lease (one attempt, on ``client`` if given): late
        answers (a process too busy to read them) or a lost lease (a process
        resumed after a stop) look the same here. If etcd holds it, it counts
        as renewed when etcd last renewed it; if it does not, or cannot say,
        the lease is lost."""
        if self.lost or time.monotonic() <= self.expiry:
            return
        asked = time.monotonic()
        try:
            left = (client or self._client).lease_time_to_live(self.lease_id, once=True)
        except RendezvousError as err:
            self.mark_lost(f"lease {self.lease_id:x} presumed expired: no keep-alive was "
                           f"answered for {self.ttl} s, and etcd did not say ({err})")
            return
        if left > 0:
            self._kept.renewed(asked, left)
        else:
            self.mark_lost(f"lease {self.lease_id:x} expired (keep-alives went unanswered "
                           f"past its {self.ttl} s TTL); the keys on it are gone")

    def revoke_if_lost(self, client: EtcdClient) -> None:
        """As ``Session.revoke_if_lost``: once per lease, one attempt."""
        with self._lock:
            if not self._lost.is_set() or self._revoked:
                return
            self._revoked = True
        try:
            client.lease_revoke(self.lease_id, once=True)
        except RendezvousError as err:  # the lease expires within its TTL anyway
            logger.debug("lease %x, given up as lost, could not be revoked: %s",
                         self.lease_id, err)

    def _silent(self) -> None:
        self.mark_lost(
            f"lease {self.lease_id:x} presumed expired: no keep-alive succeeded for "
            f"{self.ttl} s"
        )

    def orphan(self, ops: list[tuple[bytes, ...]]) -> None:
        """Delete ``ops``' keys in the background: retried every keep-alive
        interval (at most a second) until etcd takes them, or until the lease
        is gone and took them with it."""
        with self._lock:
            self._orphans.extend(ops)
            if self._orphan_thread is not None:
                return
            self._orphan_thread = threading.Thread(
                target=self._delete_orphans, name=f"rdzv-orphans-{self.lease_id:x}",
                daemon=True,
            )
            self._orphan_thread.start()

    def _delete_orphans(self) -> None:
        pause = min(self.keepalive_interval, 1.0)
        while not self._stop.wait(pause) and not self._lost.is_set():
            with self._lock:
                batch = self._orphans[:_DELETES_PER_TXN]
            try:
                self._client.txn([], batch, [], once=True)
            except RendezvousError as err:
                logger.debug("lease %x: deleting the keys of nodes that left failed "
                             "again (%s); retrying", self.lease_id, err)
                continue
            with self._lock:
                del self._orphans[:len(batch)]
                if not self._orphans:
                    self._orphan_thread = None
                    return
        with self._lock:
            self._orphan_thread = None

    def stop(self, revoke: bool) -> None:
        """Stop the keep-alives and (if ``revoke``) revoke the lease; idempotent.

        A lease etcd no longer has needs no revoke; a revoke etcd could not take
        is logged, and the lease then expires within its TTL.
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


#: The most deletes in one transaction of a shared lease's orphaned keys
#: (etcd allows 128 operations per transaction by default).
_DELETES_PER_TXN = 120


def _attach(
    client: EtcdClient, ttl: int, keepalive_interval: float, grant_client: EtcdClient | None,
) -> tuple[_NodeLease, int]:
    """The process's shared lease of ``ttl`` on ``client``'s connection, granted
    (on ``grant_client`` if given) if there is none or it is gone, and the
    number of the node it is handed to (0 for its first)."""
    leases, lock = client.shared_leases()
    with lock:
        lease = leases.get((ttl, keepalive_interval))
        if lease is not None:
            # On a lease etcd no longer holds, the node's join would fail.
            lease.confirm_if_lapsed(grant_client)
        if lease is None or lease.lost:
            lease = _NodeLease(client, ttl, keepalive_interval, grant_client)
            leases[(ttl, keepalive_interval)] = lease
            logger.debug("granted lease %x, shared by this process's nodes", lease.lease_id)
        number = lease.issued
        lease.issued += 1
        lease.users += 1
    return lease, number


def _detach(client: EtcdClient, lease: _NodeLease, revoke: bool) -> None:
    """Let go of a shared lease; the last session stops it (and revokes it if
    ``revoke``)."""
    leases, lock = client.shared_leases()
    with lock:
        lease.users -= 1
        if lease.users > 0:
            return
        if leases.get((lease.ttl, lease.keepalive_interval)) is lease:
            del leases[(lease.ttl, lease.keepalive_interval)]
    lease.stop(revoke)


class Session:
    """A node's lease-backed liveness: a lease kept alive until ``close()``.

    With ``shared`` the node uses the lease that the process's other shared
    sessions on the same connection, TTL and keep-alive interval use (granted
    by the first): their keep-alives are one, whatever the number of nodes. A
    node then leaves by deleting its keys (``abandon`` when etcd does not take
    the deletes), and a lost lease is lost for all of them at once, as when
    the process dies.

    Args:
        client: the etcd connection.
        ttl: lease time-to-live in seconds (a dead node is gone after this).
        keepalive_interval: seconds between keep-alives (well under ``ttl``).
        on_lost: called once when the lease is lost (from a background thread).
        shared: use the process's shared lease instead of a lease of its own.
        grant_client: the connection to grant the lease on (and, for a shared
            lease, to ask whether etcd still holds it), when its requests must
            give up sooner than ``client``'s (a ``next_rendezvous()`` call's
            deadline); the lease is kept alive on ``client``.

    Raises:
        RendezvousConnectionError: etcd cannot be reached to grant the lease.
    """

    def __init__(
        self,
        client: EtcdClient,
        ttl: int,
        keepalive_interval: float,
        on_lost: Callable[[], None] | None = None,
        shared: bool = False,
        grant_client: EtcdClient | None = None,
    ) -> None:
        self._client = client
        self.ttl = ttl
        self.keepalive_interval = keepalive_interval
        self.shared = shared
        if shared:
            self._lease, number = _attach(client, ttl, keepalive_interval, grant_client)
        else:
            self._lease, number = _NodeLease(client, ttl, keepalive_interval, grant_client), 0
        self.lease_id = self._lease.lease_id
        self.node_id = f"{self.lease_id:016x}" + (f"-{number}" if number else "")
        self._closed = False
        self._lease.listen(id(self), on_lost)

    @property
    def lost(self) -> bool:
        """True once the lease is gone: etcd expired it, or it could not be kept
        alive for a whole TTL (etcd unreachable or not answering)."""
        return self._lease.lost

    @property
    def expiry(self) -> float:
        """The ``time.monotonic()`` time by which the lease has surely expired
        unless a keep-alive is answered meanwhile (-inf once it is lost)."""
        return self._lease.expiry

    def mark_lost(self, why: str) -> None:
        """Record that the lease is gone (``why`` is logged); idempotent.

        The keep-alives call it when etcd reports the lease expired or when no
        keep-alive succeeded for a whole TTL; the handler calls it when a
        request learns the same. Every session on the lease learns it.
        """
        self._lease.mark_lost(why)

    def confirm_if_lapsed(self, client: EtcdClient | None = None) -> None:
        """Past its ``expiry`` by this process's clock, ask etcd whether it
        still holds the lease (one attempt, on ``client`` if given): renewed as
        etcd says if it holds it; lost if it no longer does, or cannot say."""
        self._lease.confirm_if_lapsed(client)

    def revoke_if_lost(self, client: EtcdClient) -> None:
        """If the lease is lost, revoke it (one attempt on ``client``, once per
        lease, whatever the sessions on it): a lease given up by this process
        may still be held by etcd (a restarted etcd gives every lease a fresh
        TTL; keep-alive answers can be lost on the way), and the keys on it
        would outlive the nodes that gave it up by a TTL."""
        self._lease.revoke_if_lost(client)

    @property
    def answered_span(self) -> tuple[float, float]:
        """``(since, last)``: the ``time.monotonic()`` times since which etcd
        answered every keep-alive, no two answers further apart than two
        keep-alive intervals, and of the last answer. A gap (etcd or the
        connection down, this process stopped) starts a new span."""
        return self._lease.answered_span

    def abandon(self, ops: list[tuple[bytes, ...]]) -> None:
        """Leave without deleting this node's keys now (etcd did not take
        ``ops``, their deletes): a lease of its own is no longer kept alive, so
        they expire with it; on a shared lease they are deleted in the
        background. Closes the session."""
        if self._closed:
            return
        if self.shared and ops:
            self._lease.orphan(ops)
        self.close(revoke=False)

    def close(self, revoke: bool = True) -> None:
        """Stop the keep-alives and (by default) revoke the lease; idempotent.

        A shared lease is stopped (and revoked) by its last session only: a
        node on it deletes its own keys before it closes.

        Clean-up never fails: it runs on the way out, often after another error,
        which must stay the one reported. A lease etcd no longer has needs no
        revoke; a revoke etcd could not take is logged, and the lease then
        expires within its TTL.
        """
        if self._closed:
            return
        self._closed = True
        self._lease.unlisten(id(self))
        if self.shared:
            _detach(self._client, self._lease, revoke)
        else:
            self._lease.stop(revoke)


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

    def grant(self, client: EtcdClient | None = None) -> None:
        """Grant both leases where etcd does not have them (a new run), on
        ``client`` if given.

        Raises:
            RendezvousConnectionError: etcd cannot be reached.
        """
        for lease_id, ttl in self._ttls.items():
            if (client or self._client).lease_ensure(lease_id, ttl):
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

    def restore(self, client: EtcdClient | None = None) -> None:
        """Grant (on ``client`` if given) and hold again whatever lease was lost.

        Raises:
            RendezvousConnectionError: etcd cannot be reached.
        """
        self.grant(client)
        self.hold()

    def release(self) -> None:
        """Stop keeping the leases alive (they expire unless other nodes hold them)."""
        held, self._held = self._held, {}
        for lease in held.values():
            self._client.release_lease(lease)
