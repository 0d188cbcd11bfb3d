"""What rdzv sends stays within etcd's default limit on operations per
transaction, checked against a real etcd: the rule ``rdzv.txn.txn_ops``
counts by, and the joins of one process merged as many as fit."""

from __future__ import annotations

import random

import pytest

import rdzv._state as core
from rdzv.api import RendezvousError
from rdzv.client import EtcdClient, EtcdConfig, parse_endpoints
from rdzv.keys import RunKeys
from rdzv.txn import txn_ops

MAX_TXN_OPS = 128  # etcd's --max-txn-ops default


@pytest.fixture
def client(etcd_server):
    client = EtcdClient(EtcdConfig(endpoints=tuple(parse_endpoints(etcd_server.get_endpoint()))))
    yield client
    client.close()


def _nested(outer: int, inner: int, prefix: bytes) -> tuple[list, list, list]:
    """A transaction of ``outer`` puts and one transaction of ``inner`` puts."""
    puts = [("put", prefix + b"o%d" % i, b"", 0) for i in range(outer - 1)]
    inner_puts = [("put", prefix + b"i%d" % i, b"", 0) for i in range(inner)]
    return [], [*puts, ("txn", [], inner_puts, [])], []


def test_an_inner_transaction_gets_what_the_outer_one_leaves(client, run_id):
    prefix = f"/limits/{run_id}/".encode()
    fits = _nested(100, 28, prefix)
    assert txn_ops(*fits) == MAX_TXN_OPS
    assert client.txn(*fits)[0]
    over = _nested(100, 29, prefix + b"x/")
    assert txn_ops(*over) == MAX_TXN_OPS + 1
    with pytest.raises(RendezvousError, match="too many operations"):
        client.txn(*over)
    # The longest of the three lists counts, at every level.
    assert txn_ops([("create", b"k", 0)] * 3, [("get", b"k")], [("get", b"k")] * 5) == 5
    assert txn_ops([], [("txn", [], [], [("txn", [("mod", b"k", 0)], [], [])] * 2)], []) == 4


@pytest.mark.parametrize("joins", [126, 127, 300])
def test_the_joins_of_one_process_merge_into_transactions_etcd_takes(client, run_id, joins):
    """However many joins of one round a process sends at once, each merged
    transaction is one etcd takes: the counter's transaction inside it
    counts against the limit too."""
    keys = RunKeys("/limits", run_id)
    lease = client.lease_grant(60)
    actions = []
    for i in range(joins):
        node = core.Node(f"n{i:04d}", keys, 1, joins, lease, b"d", 30.0, 5.0, random.Random(0))
        node.begin()
        node.next_action(0.0)
        node.feed((True, 1, [None]))  # no state record: the run's first round
        while not (action := node.next_action(0.0)).join:
            node.feed(client.txn(action.compares, action.success, action.failure))
        actions.append(action)
    groups = core.merge_joins(actions, MAX_TXN_OPS)
    assert sum(len(indices) for _, indices in groups) == joins
    # As full as etcd takes them: 125 joins and the counter's transaction.
    assert len(groups) == -(-joins // 125)
    counted = []
    for action, indices in groups:
        assert txn_ops(action.compares, action.success, action.failure) <= MAX_TXN_OPS
        answer = client.txn(action.compares, action.success, action.failure)
        assert answer[0]
        counted.extend(share[2][1] for share in core.split_joins(
            [actions[i] for i in indices], answer))
    # The first join took the counter key and counted the members so far.
    assert counted[0][0] and counted[0][1][1] == len(groups[0][1])
    assert client.count(keys.members(0)) == joins
    client.lease_revoke(lease)
