"""A failure is reported as itself: clean-up that fails after it is logged, never
raised in its place, and releasing a lease etcd already dropped is no error.

Faults come through the handler's client (a subclass of ``EtcdClient`` given to
``EtcdRendezvousHandler``), against the session's real etcd.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from rdzv import RendezvousConnectionError, RendezvousTimeoutError
from rdzv.client import EtcdClient, EtcdConfig, LeaseLostError, parse_endpoints
from rdzv.etcd_rendezvous import EtcdRendezvousHandler
from rdzv.keys import DEFAULT_PREFIX, RunKeys


class _WatchNeverConfirmed(EtcdClient):
    """A watch that etcd does not confirm, for longer than the node's lease lives:
    the lease is gone by the time creation gives up and cleans up."""

    def __init__(self, config: EtcdConfig) -> None:
        super().__init__(config)
        # The leases granted, in a list that the clients with_retry() derives
        # from this one (the handler's for its calls) share.
        self.granted: list[int] = []

    def lease_grant(self, ttl: int) -> int:
        lease = super().lease_grant(ttl)
        self.granted.append(lease)
        return lease

    def watch(self, *args: Any, **kwargs: Any) -> Any:
        # The node does not hear of it: no keep-alive answer says the lease is gone.
        self.stop_keep_alive(self.granted[-1])
        self.lease_revoke(self.granted[-1])
        raise RendezvousConnectionError(
            "cannot reach etcd (watch): etcd did not confirm the watch within 30 s"
        )


class _LeaseGoneOnWithdraw(EtcdClient):
    """Clean-up requests (one attempt, ``once``) find the node's lease gone."""

    def txn(self, compares: Any, success: Any, failure: Any = (), once: bool = False) -> Any:
        if once:
            raise LeaseLostError("etcd no longer has the lease (transaction): lease not found")
        return super().txn(compares, success, failure, once)


def _config(endpoint: str) -> EtcdConfig:
    return EtcdConfig(endpoints=tuple(parse_endpoints(endpoint)))


def test_failed_creation_reports_its_cause_not_the_revoke(
    etcd_endpoint: str, run_id: str, observer: EtcdClient, caplog: Any
) -> None:
    client = _WatchNeverConfirmed(_config(etcd_endpoint))
    try:
        with caplog.at_level(logging.DEBUG, logger="rdzv"):
            with pytest.raises(RendezvousConnectionError, match="did not confirm the watch"):
                EtcdRendezvousHandler(client, run_id, "etcd3", 1, 1)
    finally:
        client.close()
    assert "already expired" in caplog.text
    assert observer.lease_time_to_live(client.granted[-1]) == -1
    assert observer.count(RunKeys(DEFAULT_PREFIX, run_id).round(0)) == 0


def test_failed_round_reports_its_cause_not_the_withdraw(
    etcd_endpoint: str, run_id: str, caplog: Any
) -> None:
    handler = EtcdRendezvousHandler(
        _LeaseGoneOnWithdraw(_config(etcd_endpoint)), run_id, "etcd3", 2, 2, timeout=0.5
    )
    try:
        with caplog.at_level(logging.WARNING, logger="rdzv"):
            with pytest.raises(RendezvousTimeoutError, match="no round completed"):
                handler.next_rendezvous()
        assert "could not withdraw" in caplog.text
    finally:
        handler.shutdown()


def test_shutdown_after_the_lease_expired_is_quiet(
    etcd_endpoint: str, run_id: str, observer: EtcdClient, caplog: Any
) -> None:
    handler = EtcdRendezvousHandler(EtcdClient(_config(etcd_endpoint)), run_id, "etcd3", 1, 1)
    handler.next_rendezvous()
    # etcd drops the lease, as when it expires (keep-alives every lease_ttl / 4
    # have not told the handler yet).
    observer.lease_revoke(handler.lease_id)
    with caplog.at_level(logging.WARNING, logger="rdzv"):
        assert handler.shutdown() is True
    assert "could not revoke" not in caplog.text
    assert handler.shutdown() is True
