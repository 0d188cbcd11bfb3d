"""The cost bounds of PROTOCOL.md, counted by etcd itself (not timed).

One round of N nodes must cost O(1) writes and reads per node and O(N) watch
events in total. The counters come from the server's /metrics.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest

from helpers import ThreadNode, assert_one_world, make_handler, run_round, wait_for
from rdzv.keys import RunKeys

COUNTERS = (
    "etcd_mvcc_put_total",
    "etcd_mvcc_delete_total",
    "etcd_mvcc_txn_total",
    "etcd_debugging_mvcc_events_total",
    'grpc_server_handled_total{grpc_code="OK",grpc_method="Range"',
    'grpc_server_handled_total{grpc_code="OK",grpc_method="Txn"',
    "etcd_network_client_grpc_sent_bytes_total",
)


def read_counters(metrics_url: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url + "/metrics", timeout=10).read().decode()
    values = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        for name in COUNTERS:
            if line.startswith(name):
                values[name] += float(line.rsplit(" ", 1)[1])
    return values


def round_counters(etcd_server, run_id: str, n: int) -> dict[str, float]:
    """What one round of ``n`` nodes in threads cost etcd, counter by counter."""
    endpoint = etcd_server.get_endpoint()
    # Counted from before the handlers exist: creating one reads the state record
    # and starts its watch.
    before = read_counters(etcd_server.get_metrics_url())
    handlers = [make_handler(endpoint, run_id, n, n) for _ in range(n)]
    try:
        infos = run_round([ThreadNode(h) for h in handlers])
        after = read_counters(etcd_server.get_metrics_url())
    finally:
        for handler in handlers:
            handler.shutdown()
    assert_one_world(infos, n)
    return {name: after[name] - before[name] for name in COUNTERS}


@pytest.mark.parametrize("n", [8, 32])
def test_round_costs_are_constant_per_node(etcd_server, run_id, n):
    delta = round_counters(etcd_server, run_id, n)
    writes = delta["etcd_mvcc_put_total"] + delta["etcd_mvcc_delete_total"]
    read_only_txns = delta[COUNTERS[5]] - delta["etcd_mvcc_txn_total"]
    reads = delta[COUNTERS[4]] + read_only_txns
    events = delta["etcd_debugging_mvcc_events_total"]
    sent = delta["etcd_network_client_grpc_sent_bytes_total"]
    print(n, writes, reads, events, sent / n)
    # Per node: join, confirm. Per round: state created or opened, frozen, final,
    # the world record, MASTER_ADDR/PORT.
    assert writes <= 2 * n + 8, (writes, delta)
    # Per node: the state record, when the handler is created (its rank shard
    # comes back from the confirmation). Per round: the freezer's read of the members.
    assert reads <= n + 8, (reads, delta)
    # Per node: the round opening, frozen and final on its state watch (the
    # freezer counts the confirmations, and watches only deletions).
    assert events <= 3 * n + 8, (events, delta)
    # Per node, whatever N: the answers to its own requests, its state watch's
    # events and its rank shard (a few KB), never the whole world; the freezer's
    # read of the members (about 110 bytes each) spread over the round.
    assert sent <= 4096 * n, (sent / n, delta)


def test_bytes_per_node_stay_a_few_kb(etcd_server, run_id):
    """At 256 nodes the whole world is 4.3 KB (17 bytes a member): a node that
    read it would be over the bound; one that reads its rank shard is not."""
    n = 256
    sent = round_counters(etcd_server, run_id, n)["etcd_network_client_grpc_sent_bytes_total"]
    assert sent <= 4096 * n, sent / n


def test_the_nodes_of_one_process_join_and_confirm_in_merged_requests(etcd_server, run_id):
    """The nodes of a process that begin together join the round with the
    state record they read together; every one sees the round frozen by the
    same event of their shared watch. Their joins, and their confirmations,
    go out merged (up to 128 operations a request), not one request each."""
    n = 64
    endpoint = etcd_server.get_endpoint()
    handlers = [make_handler(endpoint, run_id, n, n) for _ in range(n)]
    start = threading.Barrier(n)
    infos: list = [None] * n

    def node(i: int) -> None:
        start.wait()
        infos[i] = handlers[i].next_rendezvous()

    threads = [threading.Thread(target=node, args=(i,)) for i in range(n)]
    before = read_counters(etcd_server.get_metrics_url())
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        after = read_counters(etcd_server.get_metrics_url())
    finally:
        for handler in handlers:
            handler.shutdown()
    assert_one_world(infos, n)
    txns = after[COUNTERS[5]] - before[COUNTERS[5]]
    # Per round: the opening, the freeze, the final, a few merged joins and
    # confirmations, and the joins of nodes that came after the others had
    # read. One request per join and per confirmation would be 2n.
    assert txns <= n / 4 + 8, txns


def test_waiting_nodes_of_one_process_share_the_reads_that_check_their_watches(
        etcd_server, observer, run_id):
    """While a round waits, every node re-reads the state record once per
    ``lease_ttl`` to check that its watch has not stalled (a joined node the
    counter key too). The nodes of a process ask at the same moments: they
    share those reads instead of making one each."""
    n, ttl = 32, 2
    endpoint = etcd_server.get_endpoint()
    handlers = [make_handler(endpoint, run_id, n + 1, n + 1, lease_ttl=ttl)
                for _ in range(n + 1)]
    nodes = [ThreadNode(h) for h in handlers]
    try:
        for node in nodes[:n]:
            node.start()
        members = RunKeys("/rdzv", run_id).members(0)
        wait_for(lambda: observer.count(members) == n, 30, f"{n} members joined")
        before = read_counters(etcd_server.get_metrics_url())
        # The window's length is the measure: two of the nodes' checks.
        time.sleep(2 * ttl + 0.5)
        after = read_counters(etcd_server.get_metrics_url())
        nodes[n].start()
        infos = [node.join(60) for node in nodes]
    finally:
        for handler in handlers:
            handler.shutdown()
    assert_one_world(infos, n + 1)
    reads = after[COUNTERS[4]] - before[COUNTERS[4]]
    # One read each per check would be 2n or more.
    assert reads <= n, reads
