"""Between rounds: the view of the run that answers num_nodes_waiting() and is_closed().

A completed round can last hours. torch's agent polls ``num_nodes_waiting()``
every ``--monitor-interval`` on every node and re-rendezvous when it is > 0.
These tests check, with real etcd and real node processes, that the polling
costs etcd (almost) nothing (counted by etcd's /metrics), that a member lost to
a crash, a hang or a shutdown is reported by every survivor within
``lease_ttl`` + 1 s, and that an etcd outage never raises into the caller.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import urllib.request

import pytest

from helpers import (
    ProcessNode,
    ThreadNode,
    assert_one_world,
    make_handler,
    queued,
    run_round,
    wait_for,
)
from rdzv.etcd_server import EtcdServer
from rdzv.keys import RunKeys

LEASE_TTL = 2
FAST = {"lease_ttl": LEASE_TTL, "last_call_timeout": 0.5, "timeout": 30}
# The bound the issue of a lost member must meet: its lease runs out, etcd's
# lessor notices (it checks every 500 ms), the watch delivers the deletion.
NEWS_WITHIN = LEASE_TTL + 1.0


def etcd_requests(metrics_url: str) -> dict[str, float]:
    """Messages etcd received per gRPC method (a unary request is one message)."""
    text = urllib.request.urlopen(metrics_url + "/metrics", timeout=10).read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("grpc_server_msg_received_total{") and "etcdserverpb" in line:
            method = line.split('grpc_method="', 1)[1].split('"', 1)[0]
            counts[method] = counts.get(method, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def _round_with_a_process(endpoint, run_id, handlers, processes):
    """Round 0 of two in-process nodes and one node process (min 2, max 3)."""
    victim = ProcessNode(endpoint, run_id, 2, 3, **FAST)
    processes.append(victim)
    handlers.extend(make_handler(endpoint, run_id, 2, 3, **FAST) for _ in range(2))
    victim.send("join")
    infos = run_round([ThreadNode(h) for h in handlers])
    joined = victim.result()
    assert joined["world_size"] == 3 and {i.world_size for i in infos} == {3}, joined
    assert sorted([joined["rank"], *(i.rank for i in infos)]) == [0, 1, 2]
    for handler in handlers:
        assert handler.num_nodes_waiting() == 0
    victim.send("news")
    assert victim.result()["waiting"] == 0
    return victim


def _told_within(handlers, since: float) -> float:
    """Seconds from ``since`` until every handler's num_nodes_waiting() is > 0."""
    wait_for(lambda: all(h.num_nodes_waiting() > 0 for h in handlers),
             timeout=NEWS_WITHIN + 5, what="survivors told of the lost member")
    return time.monotonic() - since


def _poll(handlers, seconds: float, metrics_url: str):
    """Call num_nodes_waiting() and is_closed() on every handler every 0.1 s for
    ``seconds``; returns (calls, answers seen, requests per gRPC method etcd got)."""
    before = etcd_requests(metrics_url)
    started = time.monotonic()
    calls = 0
    answers = set()
    while time.monotonic() - started < seconds:
        for handler in handlers:
            answers.add((handler.num_nodes_waiting(), handler.is_closed()))
            calls += 2
        time.sleep(0.1)
    after = etcd_requests(metrics_url)
    return calls, answers, {k: after[k] - before.get(k, 0.0)
                            for k in after if after[k] != before.get(k, 0.0)}


def test_polling_costs_etcd_nothing_and_a_quiet_round_reports_nothing(etcd_server, run_id,
                                                                     handlers):
    """Four nodes poll every 0.1 s for 10 s (two lease_ttl) after a round: every
    answer is 0 and etcd sees the keep-alives, per node the first call's
    read, and one watch for them all: no request per call, and no check read
    while the keep-alives show the watch's connection alive."""
    n, lease_ttl, seconds = 4, 5, 10.0
    endpoint = etcd_server.get_endpoint()
    handlers.extend(make_handler(endpoint, run_id, n, n, lease_ttl=lease_ttl)
                    for _ in range(n))
    assert_one_world(run_round([ThreadNode(h) for h in handlers]), n)
    calls, answers, delta = _poll(handlers, seconds, etcd_server.get_metrics_url())
    keepalives = delta.pop("LeaseKeepAlive", 0.0)
    others = sum(delta.values())
    print(f"{calls} calls in {seconds:.0f} s: {keepalives / n / seconds:.2f} keep-alives and "
          f"{others / n / seconds:.3f} other requests per node per second ({delta})")
    assert answers == {(0, False)}
    assert calls >= 300
    # Per node: the first read, 3 range requests (the state record, the waiting
    # and next-round node lists; no count of the round's member keys, which
    # the watch makes needless). The process's nodes share one etcd watch of
    # the view's range (two, should one node's watch start from before another's).
    assert delta.get("Range", 0.0) <= 3 * n and delta.get("Watch", 0.0) <= 2, delta
    assert set(delta) <= {"Range", "Watch"}, delta


def test_member_lost_before_the_first_poll_is_news(etcd_server, run_id, handlers):
    """The first read after a round does not count the round's member keys
    (every node walking all N of them would cost etcd O(N^2) a round): a
    member lost before the survivors first ask is named by the view's watch,
    which starts where the round ended."""
    endpoint = etcd_server.get_endpoint()
    handlers.extend(make_handler(endpoint, run_id, 2, 3, **FAST) for _ in range(3))
    first, second, leaving = handlers
    assert_one_world(run_round([ThreadNode(h) for h in handlers]), 3)
    leaving_id = leaving.node_id
    leaving.shutdown()  # its keys are gone on return
    handlers.remove(leaving)
    wait_for(lambda: first.num_nodes_waiting() == 1 and second.num_nodes_waiting() == 1,
             timeout=5, what="the member that left before the first poll counted")
    assert first.lost_members() == [leaving_id] == second.lost_members()


@pytest.mark.parametrize("endpoints", ["127.0.0.1:{port},127.0.0.1:{port}", "localhost:{port}"],
                         ids=["two addresses", "a name"])
def test_with_several_endpoints_a_short_lease_ttl_checks_the_view_by_reads(
        etcd_server, run_id, handlers, endpoints):
    """With several endpoints, or a name that may resolve to several members,
    the keep-alives may reach another member than the watch, and gRPC's pings
    find a dead member only after 8 s: with a shorter lease_ttl a read checks
    the view every lease_ttl."""
    lease_ttl, seconds = 2, 5.0
    endpoints = endpoints.format(port=etcd_server.get_endpoint().rsplit(":", 1)[1])
    handlers.extend(make_handler(endpoints, run_id, 2, 2, lease_ttl=lease_ttl)
                    for _ in range(2))
    assert_one_world(run_round([ThreadNode(h) for h in handlers]), 2)
    _, answers, delta = _poll(handlers, seconds, etcd_server.get_metrics_url())
    assert answers == {(0, False)}
    # The first read and at least one check, per node.
    assert delta.get("Range", 0.0) >= 2 * 4 * 2, delta


def test_killed_member_is_news_and_the_next_round_forms_without_it(etcd_server, run_id,
                                                                   handlers, processes):
    endpoint = etcd_server.get_endpoint()
    victim = _round_with_a_process(endpoint, run_id, handlers, processes)
    killed_at = time.monotonic()
    victim.kill()
    assert _told_within(handlers, killed_at) < NEWS_WITHIN
    for handler in handlers:
        assert handler.lost_members() == [victim.node_id]
        assert handler.waiting_nodes() == []
    assert_one_world(run_round([ThreadNode(h) for h in handlers]), 2)
    keys = RunKeys("/rdzv", run_id)
    client = etcd_server.get_rdzv_client()
    try:
        assert victim.node_id.encode() not in client.get(keys.world(1))[0]
    finally:
        client.close()
    for handler in handlers:
        assert handler.num_nodes_waiting() == 0 and handler.lost_members() == []


def test_stopped_member_is_news_and_rejoins_later_as_a_new_node(etcd_server, run_id,
                                                                handlers, processes):
    """A hung host (SIGSTOP): the survivors are told within lease_ttl + 1 s and
    re-form without it. Resumed, the node learns from its own pending call that
    it was lost, and its next join is a new node's, admitted in a later round."""
    endpoint = etcd_server.get_endpoint()
    victim = _round_with_a_process(endpoint, run_id, handlers, processes)
    old_id = victim.node_id
    os.killpg(victim.proc.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    victim.send("news")  # pending while it is stopped
    try:
        assert _told_within(handlers, stopped_at) < NEWS_WITHIN
        assert all(h.lost_members() == [old_id] for h in handlers)
        assert_one_world(run_round([ThreadNode(h) for h in handlers]), 2)
    finally:
        os.killpg(victim.proc.pid, signal.SIGCONT)
    told = victim.result()
    assert told["waiting"] > 0, told
    victim.send("join")
    wait_for(lambda: handlers[0].num_nodes_waiting() == 1, timeout=10,
             what="the resumed node counted as waiting")
    new_ids = handlers[0].waiting_nodes()
    assert len(new_ids) == 1 and new_ids[0] != old_id
    infos = run_round([ThreadNode(h) for h in handlers])
    rejoined = victim.result()
    assert rejoined["world_size"] == 3 and rejoined["round"] == 2, rejoined
    assert sorted([rejoined["rank"], *(i.rank for i in infos)]) == [0, 1, 2]


def test_shutdown_member_and_late_node_are_news(etcd_server, run_id, handlers):
    endpoint = etcd_server.get_endpoint()
    handlers.extend(make_handler(endpoint, run_id, 2, 3, **FAST) for _ in range(4))
    first, second, leaving, late = handlers
    assert_one_world(run_round([ThreadNode(h) for h in (first, second, leaving)]), 3)
    assert first.num_nodes_waiting() == 0
    late_node = ThreadNode(late).start()
    wait_for(lambda: first.num_nodes_waiting() == 1 and second.num_nodes_waiting() == 1,
             what="the late node counted")
    assert first.waiting_nodes() == [late.node_id] and first.lost_members() == []
    leaving_id = leaving.node_id
    shut_at = time.monotonic()
    leaving.shutdown()
    handlers.remove(leaving)
    wait_for(lambda: first.num_nodes_waiting() == 2 and second.num_nodes_waiting() == 2,
             timeout=5, what="the shut-down member counted")
    # Its lease is revoked: no lease_ttl to wait for.
    assert time.monotonic() - shut_at < 1.0
    assert first.lost_members() == [leaving_id] == second.lost_members()
    assert_one_world([*run_round([ThreadNode(first), ThreadNode(second)]), late_node.join()], 3)


def test_etcd_stopped_for_a_minute_never_raises_and_the_view_catches_up(run_id, caplog):
    """etcd hangs (SIGSTOP) for just over a minute while a round is complete and
    the nodes poll: no call raises or blocks, one warning per node; after SIGCONT
    each node's view is etcd's truth again (the members' leases expired meanwhile,
    so all of them are lost)."""
    caplog.set_level(logging.WARNING, logger="rdzv.etcd_rendezvous")
    with EtcdServer() as server:
        endpoint = server.get_endpoint()
        nodes = [make_handler(endpoint, run_id, 2, 2, **FAST) for _ in range(2)]
        try:
            assert_one_world(run_round([ThreadNode(h) for h in nodes]), 2)
            ids = sorted(h.node_id for h in nodes)
            assert [h.num_nodes_waiting() for h in nodes] == [0, 0]
            os.kill(server.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            slowest = 0.0
            try:
                while time.monotonic() - stopped_at < 61:
                    for handler in nodes:
                        call = time.monotonic()
                        assert handler.num_nodes_waiting() == 0
                        assert handler.is_closed() is False
                        slowest = max(slowest, time.monotonic() - call)
                    time.sleep(0.1)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert slowest < 0.5, slowest
            warnings = [r for r in caplog.records if "answer from what it knew" in r.message]
            assert len(warnings) == len(nodes), [r.message for r in warnings]
            client = server.get_rdzv_client()
            try:
                members = RunKeys("/rdzv", run_id).members(0)

                # etcd revokes the leases that expired while it was stopped
                # once it runs again, not at once: wait for that first.
                wait_for(lambda: not client.range(members), timeout=LEASE_TTL + 10,
                         what="etcd revoked the expired leases")
            finally:
                client.close()
            wait_for(lambda: all(h.lost_members() == ids and h.num_nodes_waiting() == len(ids)
                                 for h in nodes),
                     timeout=LEASE_TTL + 10, what="views caught up")
        finally:
            for handler in nodes:
                handler.shutdown()


def _shut_down(handlers) -> None:
    """Shut the handlers down (while their etcd still runs) and forget them."""
    for handler in handlers:
        handler.shutdown()
    handlers.clear()


def _etcd_away_after_a_round(server, run_id, handlers, until, **options) -> list[str]:
    """Two nodes complete a round; etcd is killed until ``until(handler)`` holds
    for both, then restarted on its data. Returns the nodes' ids of that round.
    (The caller shuts the nodes down while etcd runs: a shutdown after it
    waits for etcd.)"""
    endpoint = server.get_endpoint()
    handlers.extend(make_handler(endpoint, run_id, 2, 2, **options) for _ in range(2))
    assert_one_world(run_round([ThreadNode(h) for h in handlers]), 2)
    ids = [h.node_id for h in handlers]
    server.kill()
    wait_for(lambda: all(until(h) for h in handlers), timeout=60, what="etcd away long enough")
    server.restart()
    return ids


def test_etcd_away_past_the_watch_retries_then_back_the_next_round_forms(run_id, handlers):
    """etcd is killed after a round and comes back once the state record's
    watch gave up resuming (connect_timeout, 2 s here): the next round forms
    with the same nodes, as a relaunch after a failure would call it. (It
    failed at once with the watch's old "cannot reach etcd".)"""
    with EtcdServer() as server:
        ids = _etcd_away_after_a_round(
            server, run_id, handlers, lambda h: queued(h, "error", "state"),
            **{**FAST, "lease_ttl": 30, "connect_timeout": 2})
        assert_one_world(run_round([ThreadNode(h) for h in handlers]), 2)
        assert [h.node_id for h in handlers] == ids
        _shut_down(handlers)


@pytest.mark.parametrize("lease_scope", ["node", "process"])
def test_etcd_away_past_the_lease_ttl_then_back_the_next_round_forms_at_once(
        run_id, handlers, lease_scope):
    """etcd is away for longer than the nodes' lease_ttl: they give their
    leases up, and etcd, restarted, gives every lease a fresh TTL. The next
    round forms at once with new nodes: the old leases are revoked, not left
    to hold the old members' keys (and the round) for another lease_ttl."""
    lease_ttl = 4
    with EtcdServer() as server:
        ids = _etcd_away_after_a_round(
            server, run_id, handlers, lambda h: queued(h, "lost"),
            **{**FAST, "lease_ttl": lease_ttl, "connect_timeout": 2, "lease_scope": lease_scope})
        started = time.monotonic()
        assert_one_world(run_round([ThreadNode(h) for h in handlers]), 2)
        assert time.monotonic() - started < lease_ttl / 2
        assert not set(ids) & {h.node_id for h in handlers}
        _shut_down(handlers)
