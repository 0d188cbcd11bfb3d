"""No request of rdzv's can crash the etcd it ships.

etcd 3.5.0 to 3.5.4 (the embedded etcd is 3.5.1) panic with "unexpected error
during txn" when a read-only transaction's request is cancelled while etcd is
reading: the client's deadline passed, or its process died (etcd bug 14110).
rdzv sends its read-only transactions as range requests, where a cancelled read
is only an error. These tests drive exactly that condition: large reads under
deadlines shorter than the read takes.
"""

from __future__ import annotations

import pytest

from rdzv.api import RendezvousConnectionError
from rdzv.client import EtcdClient
from rdzv.etcd_server import EtcdCluster

PREFIX = b"/bulk/"
KEYS = 20_000
_BATCH = 128  # etcd's default limit on operations per transaction


@pytest.fixture(scope="module")
def bulky_etcd():
    """An etcd of its own (a crash must not take the session's down) with
    ``KEYS`` keys of 100 bytes under ``PREFIX``: reading them takes etcd long
    enough for a short deadline to cancel the read half-way."""
    with EtcdCluster(size=1) as server:
        client = server.get_rdzv_client()
        try:
            value = b"v" * 100
            for start in range(0, KEYS, _BATCH):
                client.txn([], [("put", PREFIX + b"%08d" % i, value, 0)
                                for i in range(start, min(start + _BATCH, KEYS))])
        finally:
            client.close()
        yield server


def _cancelled_reads(server, reads):
    """Run ``reads(client)`` once per deadline, from 1 ms to 100 ms; return how
    many of them etcd answered in time."""
    answered = 0
    for timeout in (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1) * 3:
        # connect_timeout bounds every attempt's deadline; `once` stops retries.
        client = server.get_rdzv_client(connect_timeout=timeout)
        try:
            reads(client)
            answered += 1
        except RendezvousConnectionError:
            pass
        finally:
            client.close()
    return answered


def _assert_etcd_serves(server):
    (member,) = server.members
    assert member.is_running(), "etcd died:\n" + "\n".join(member.log_tail())
    client = server.get_rdzv_client()
    try:
        _, _, (count,) = client.txn([], [("count", PREFIX)])
        assert count == KEYS
        client.put(b"/after", b"still here")
        assert client.get(b"/after")[0] == b"still here"
    finally:
        client.close()
    assert "panic" not in "\n".join(member.log_tail(200))


@pytest.mark.parametrize("shape", ["range", "compare-then-range", "several-reads"])
def test_read_only_transactions_cancelled_by_deadline_leave_etcd_running(bulky_etcd, shape):
    """The reads the core and the store make as read-only transactions (with
    and without a compare, one or several ranges), each cut off by its deadline
    while etcd reads 2 MB: etcd keeps serving."""

    def reads(client: EtcdClient):
        if shape == "range":
            client.txn([], [("range", PREFIX, 0)], once=True)
        elif shape == "compare-then-range":
            client.txn([("mod", b"/absent", 0)], [("range", PREFIX, 0)],
                       [("get", b"/absent")], once=True)
        else:
            client.txn([], [("count", PREFIX), ("range", PREFIX, 0), ("get", PREFIX)],
                       once=True)

    answered = _cancelled_reads(bulky_etcd, reads)
    _assert_etcd_serves(bulky_etcd)
    # The deadlines did cut reads short: not every read was answered.
    assert answered < 21


def test_read_only_transaction_reads_one_snapshot(bulky_etcd):
    """Sent as several ranges, a read-only transaction answers as one would:
    the compare decides the branch as etcd would, and the revision is the read's."""
    client = bulky_etcd.get_rdzv_client()
    try:
        revision = client.put(b"/snap/a", b"1")
        ok, at, (a, count) = client.txn(
            [("mod", b"/snap/a", revision)], [("get", b"/snap/a"), ("count", b"/snap/")],
            [("get", b"/snap/a")])
        assert ok and at >= revision and a[0] == b"1" and count == 1
        ok, _, (a,) = client.txn([("mod", b"/snap/a", revision - 1)], [("count", PREFIX)],
                                 [("get", b"/snap/a")])
        assert not ok and a[:2] == (b"1", revision)
        ok, _, _ = client.txn([("value", b"/snap/missing", b"")], [], [])
        assert not ok  # as in etcd: a value compare on an absent key fails
    finally:
        client.close()
