"""``lease_scope=process``: the nodes of a process share one lease.

One keep-alive for all of them; a node that leaves deletes its own keys and
the lease stays with the others; a lost lease is lost for all of them, and
each rejoins as a new node on a new shared lease. Against the session's real
etcd; faults come through a client subclass given to the handler.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from helpers import (
    ThreadNode,
    assert_one_world,
    clock_ahead,
    handler_on,
    make_handler,
    run_round,
    wait_for,
)
from rdzv import RendezvousConnectionError, RendezvousError, session
from rdzv.client import EtcdClient, EtcdConfig, parse_endpoints
from rdzv.keys import DEFAULT_PREFIX, RunKeys


class _DeletesRefused(EtcdClient):
    """etcd does not take this client's one-attempt clean-up transactions
    while ``refuse`` is set."""

    refuse = threading.Event()

    def txn(self, compares: Any, success: Any, failure: Any = (), once: bool = False) -> Any:
        if once and self.refuse.is_set():
            raise RendezvousConnectionError("cannot reach etcd (transaction): unavailable")
        return super().txn(compares, success, failure, once)


def _members(observer: EtcdClient, run_id: str, round: int) -> dict[str, int]:
    """The member keys of ``round``: node id -> the lease the key is on."""
    prefix = RunKeys(DEFAULT_PREFIX, run_id).members(round)
    return {key[len(prefix):].decode(): lease
            for key, _value, lease in observer.range_leases(prefix)}


def test_the_nodes_of_a_process_share_one_lease_and_leave_one_by_one(
    etcd_endpoint: str, run_id: str, observer: EtcdClient, handlers: list[Any]
) -> None:
    handlers.extend(make_handler(etcd_endpoint, run_id, 3, 3, lease_scope="process")
                    for _ in range(3))
    lease = handlers[0].lease_id
    assert [h.lease_id for h in handlers] == [lease] * 3
    ids = [h.node_id for h in handlers]
    assert len(set(ids)) == 3 and ids[0] == f"{lease:016x}"
    assert_one_world(run_round([ThreadNode(h) for h in handlers]), 3)
    assert _members(observer, run_id, 0) == dict.fromkeys(ids, lease)

    # One node leaves: its key goes, the lease stays with the two others, and
    # they learn that a member was lost.
    handlers[2].shutdown()
    assert _members(observer, run_id, 0) == dict.fromkeys(ids[:2], lease)
    assert observer.lease_time_to_live(lease) > 0
    wait_for(lambda: handlers[0].num_nodes_waiting() >= 1, what="the lost member counted")

    # The last to leave revokes the lease.
    handlers[0].shutdown()
    handlers[1].shutdown()
    assert observer.lease_time_to_live(lease) == -1
    assert _members(observer, run_id, 0) == {}


def test_a_lost_shared_lease_is_lost_for_all_its_nodes(
    etcd_endpoint: str, run_id: str, observer: EtcdClient, handlers: list[Any]
) -> None:
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 2, lease_scope="process",
                                 lease_ttl=2) for _ in range(2))
    assert_one_world(run_round([ThreadNode(h) for h in handlers]), 2)
    old = handlers[0].lease_id
    old_ids = {h.node_id for h in handlers}
    observer.lease_revoke(old)  # as when etcd expires it

    def rejoin(handler: Any) -> Any:
        # The call either learns first that the lease is gone and rejoins, or
        # its join finds it gone and fails, and the next call rejoins.
        try:
            return handler.next_rendezvous()
        except RendezvousError as err:
            assert "lost its lease" in str(err)
            return handler.next_rendezvous()

    results: list[Any] = [None, None]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, rejoin(handlers[i])))
               for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert_one_world(results, 2)
    new = handlers[0].lease_id
    assert new != old and handlers[1].lease_id == new
    assert not old_ids & {h.node_id for h in handlers}
    assert set(_members(observer, run_id, handlers[0].round).values()) == {new}


def test_a_node_created_when_answers_are_late_keeps_the_lease_etcd_still_holds(
    etcd_endpoint: str, run_id: str, monkeypatch: pytest.MonkeyPatch, handlers: list[Any]
) -> None:
    """A process too busy to read its keep-alives' answers for a TTL: a node
    created then asks etcd, which still holds the lease, rather than declaring
    it lost for every node on it."""
    handlers.append(make_handler(etcd_endpoint, run_id, 2, 2, lease_scope="process",
                                 lease_ttl=30))
    lease = handlers[0].lease_id
    monkeypatch.setattr(session, "time", clock_ahead(31))  # no answer for 31 s
    handlers.append(make_handler(etcd_endpoint, run_id, 2, 2, lease_scope="process",
                                 lease_ttl=30))
    monkeypatch.undo()
    assert handlers[1].lease_id == lease
    assert_one_world(run_round([ThreadNode(h) for h in handlers]), 2)
    assert handlers[0].lease_id == lease


@pytest.mark.parametrize("shared", [False, True])
def test_a_lease_unanswered_for_a_ttl_by_the_clock_is_etcds_to_judge(
    etcd_endpoint: str, observer: EtcdClient, shared: bool
) -> None:
    """``Session.confirm_if_lapsed``: while etcd holds the lease it counts as renewed when
    etcd last renewed it; once etcd no longer does, it is lost."""
    client = EtcdClient(EtcdConfig(endpoints=tuple(parse_endpoints(etcd_endpoint))))
    node = session.Session(client, 30, 7.5, shared=shared)
    try:
        node._lease._kept.last_answer -= 40  # its answers read late
        assert time.monotonic() > node.expiry
        node.confirm_if_lapsed()
        assert not node.lost
        assert node.expiry > time.monotonic() + 20
        observer.lease_revoke(node.lease_id)  # as when etcd expires it
        node._lease._kept.last_answer -= 40
        node.confirm_if_lapsed()
        assert node.lost
    finally:
        node.close(revoke=False)
        client.close()


def test_keys_etcd_did_not_let_a_leaving_node_delete_are_deleted_later(
    etcd_endpoint: str, run_id: str, observer: EtcdClient, handlers: list[Any], caplog: Any
) -> None:
    config = EtcdConfig(endpoints=tuple(parse_endpoints(etcd_endpoint)))
    _DeletesRefused.refuse.clear()
    # The first handler grants the process's lease, on the client that fails.
    leaving = handler_on(_DeletesRefused(config), run_id, 2, 2, lease_scope="process",
                         timeout=0.5, lease_ttl=4)
    handlers.append(leaving)
    staying = make_handler(etcd_endpoint, str(run_id) + "-other", 1, 1,
                           lease_scope="process", lease_ttl=4)
    handlers.append(staying)
    lease = leaving.lease_id
    assert staying.lease_id == lease
    first_id = leaving.node_id

    _DeletesRefused.refuse.set()
    try:
        with caplog.at_level(logging.WARNING, logger="rdzv"):
            with pytest.raises(RendezvousError, match="no round completed"):
                leaving.next_rendezvous()
        assert "its keys are deleted in the background" in caplog.text
        assert list(_members(observer, run_id, 0)) == [first_id]
    finally:
        _DeletesRefused.refuse.clear()
    wait_for(lambda: not _members(observer, run_id, 0), timeout=10,
             what="the leaving node's member key deleted")
    # The lease stays: the other node uses it.
    assert observer.lease_time_to_live(lease) > 0
    staying.next_rendezvous()

    # The next call joins as a new node, on the same lease.
    with pytest.raises(RendezvousError, match="no round completed"):
        leaving.next_rendezvous()
    assert leaving.node_id != first_id and leaving.lease_id == lease
