"""The cost bounds of PROTOCOL.md, counted by etcd itself (not timed).

One round of N nodes must cost O(1) writes and reads per node and O(N) watch
events in total. The counters come from the server's /metrics.
"""

from __future__ import annotations

import urllib.request

import pytest

from helpers import ThreadNode, assert_one_world, make_handler, run_round

COUNTERS = (
    "etcd_mvcc_put_total",
    "etcd_mvcc_delete_total",
    "etcd_mvcc_txn_total",
    "etcd_debugging_mvcc_events_total",
    'grpc_server_handled_total{grpc_code="OK",grpc_method="Range"',
    'grpc_server_handled_total{grpc_code="OK",grpc_method="Txn"',
)


def read_counters(metrics_url: str) -> dict[str, float]:
    text = urllib.request.urlopen(metrics_url + "/metrics", timeout=10).read().decode()
    values = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        for name in COUNTERS:
            if line.startswith(name):
                values[name] += float(line.rsplit(" ", 1)[1])
    return values


@pytest.mark.parametrize("n", [8, 32])
def test_round_costs_are_constant_per_node(etcd_server, run_id, n):
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
    delta = {name: after[name] - before[name] for name in COUNTERS}
    writes = delta["etcd_mvcc_put_total"] + delta["etcd_mvcc_delete_total"]
    read_only_txns = delta[COUNTERS[5]] - delta["etcd_mvcc_txn_total"]
    reads = delta[COUNTERS[4]] + read_only_txns
    events = delta["etcd_debugging_mvcc_events_total"]
    # Per node: join, confirm; the round itself: freeze, final, world, MASTER_ADDR/PORT.
    print(n, writes, reads, events)
    # Per node: join, confirm. Per round: state created or opened, frozen, final,
    # the world record, MASTER_ADDR/PORT.
    assert writes <= 2 * n + 8, (writes, delta)
    # Per node: the state record, when the handler is created (the world record
    # comes back from the confirmation). Per round: the freezer's read of the members.
    assert reads <= n + 8, (reads, delta)
    # Per node: the round opening, frozen and final on its state watch, and its
    # confirmation to the freezer.
    assert events <= 4 * n + 8, (events, delta)
