"""A shared etcd stays healthy: runs clean up after themselves.

Old rounds are deleted inside the transitions that retire them, so a run's
footprint stays bounded however many rounds it goes through; a closed run goes
``closed_run_grace`` after its last node, an abandoned one ``run_idle_timeout``
after, and a run with live nodes stays, however idle.
"""

from __future__ import annotations

import logging
import time
import urllib.request
import uuid
from collections.abc import Iterator

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
from rdzv import _state
from rdzv.client import EtcdClient
from rdzv.etcd_server import QUOTA_BACKEND_BYTES, EtcdServer
from rdzv.keys import DEFAULT_PREFIX, RunKeys


@pytest.fixture
def client(etcd_server: EtcdServer) -> Iterator[EtcdClient]:
    c = etcd_server.get_rdzv_client()
    yield c
    c.close()


def footprint(client: EtcdClient, keys: RunKeys) -> tuple[int, int]:
    """``(keys, bytes of keys and values)`` of one run."""
    kvs = client.range(keys.run)
    return len(kvs), sum(len(k) + len(v) for k, v, _ in kvs)


def test_a_run_keeps_a_bounded_footprint_over_100_rounds(client, etcd_endpoint, run_id, handlers):
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 2) for _ in range(2))
    keys = RunKeys(DEFAULT_PREFIX, run_id)
    nodes = [ThreadNode(h) for h in handlers]
    sizes = []
    for r in range(100):
        infos = run_round(nodes)
        assert_one_world(infos, 2)
        assert {h.round for h in handlers} == {r}
        infos[0].store.set(f"payload-{r}", b"x" * 1024)
        sizes.append(footprint(client, keys))
    # The state record and at most three rounds: the one before the last
    # (retired when the next one opens), the last and its store.
    most_keys = max(n for n, _ in sizes[5:])
    most_bytes = max(b for _, b in sizes[5:])
    assert most_keys <= 16, sizes
    assert most_bytes <= 4 * 1024, sizes
    assert sizes[-1][0] <= sizes[5][0] + 2, sizes
    rounds = {k[len(keys.run):].split(b"/")[1] for k, _, _ in client.range(keys.run + b"rounds/")}
    assert len(rounds) <= 3, rounds


# Short lifetimes, so that a run nobody is left in goes within seconds.
GRACE, IDLE = 2, 4
SHORT = {"closed_run_grace": GRACE, "run_idle_timeout": IDLE, "lease_ttl": 2}


def test_closed_and_abandoned_runs_go_and_a_live_idle_run_stays(
        client, etcd_endpoint, handlers):
    live, abandoned, closed = (RunKeys(DEFAULT_PREFIX, str(uuid.uuid4())) for _ in range(3))
    # A live run: its nodes stay, and do nothing after their round.
    live_handlers = [make_handler(etcd_endpoint, live.run_id, 2, 2, **SHORT) for _ in range(2)]
    handlers.extend(live_handlers)
    assert_one_world(run_round([ThreadNode(h) for h in live_handlers]), 2)
    live_keys = {k for k, _, _ in client.range(live.run)}
    live_since = time.monotonic()
    # An abandoned run: its node processes are killed after their round.
    processes = [ProcessNode(etcd_endpoint, abandoned.run_id, 2, 2, **SHORT) for _ in range(2)]
    try:
        for p in processes:
            p.send("join")
        assert [p.result()["world_size"] for p in processes] == [2, 2]
    finally:
        for p in processes:
            p.kill()
    killed_at = time.monotonic()
    # A closed run: closed and shut down, as torch's launcher does when a job ends.
    closing = [make_handler(etcd_endpoint, closed.run_id, 2, 2, **SHORT) for _ in range(2)]
    handlers.extend(closing)
    assert_one_world(run_round([ThreadNode(h) for h in closing]), 2)
    closing[0].set_closed()
    for h in closing:
        h.shutdown()
    # Late nodes learn that the run is closed during the grace period.
    assert state_of(client, closed).status == _state.Status.CLOSED

    wait_for(lambda: not client.range(closed.run), timeout=GRACE + 15, what="closed run gone")
    wait_for(lambda: not client.range(abandoned.run + b"rounds/"), timeout=GRACE + 15,
             what="abandoned run's rounds gone")
    wait_for(lambda: not client.range(abandoned.run), timeout=IDLE + 15,
             what="abandoned run's state gone")
    # The state record lasts run_idle_timeout after the last keep-alive, which went
    # at most a quarter of it before the kill.
    assert time.monotonic() - killed_at >= IDLE * 3 / 4 - 0.5

    # Nothing of the live run went, though it was idle for longer than both times.
    wait_for(lambda: time.monotonic() - live_since > IDLE + 1, what="the live run idle long")
    assert {k for k, _, _ in client.range(live.run)} >= live_keys
    assert_one_world(run_round([ThreadNode(h) for h in live_handlers]), 2)
    assert {h.round for h in live_handlers} == {1}

    # The closed run's id starts a new run, from round 0.
    again = [make_handler(etcd_endpoint, closed.run_id, 2, 2, **SHORT) for _ in range(2)]
    handlers.extend(again)
    assert_one_world(run_round([ThreadNode(h) for h in again]), 2)
    assert {h.round for h in again} == {0}


def state_of(client: EtcdClient, keys: RunKeys):
    got = client.get(keys.state)
    assert got is not None, "no state record"
    return _state.decode_state(got[0], keys.state)


def gauge(server: EtcdServer, name: str) -> float:
    """One unlabelled value of etcd's /metrics."""
    text = urllib.request.urlopen(server.get_metrics_url() + "/metrics", timeout=10).read()
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"etcd reports no {name}")


def test_the_embedded_etcd_compacts_its_history_and_has_a_quota(run_id):
    with EtcdServer(compaction_retention=1) as server:
        assert gauge(server, "etcd_server_quota_backend_bytes") == QUOTA_BACKEND_BYTES
        endpoint = server.get_endpoint()
        nodes = [ThreadNode(make_handler(endpoint, run_id, 2, 2)) for _ in range(2)]
        try:
            for _ in range(30):
                assert_one_world(run_round(nodes), 2)
            client = server.get_rdzv_client()
            try:
                revision = client.txn([], [("get", b"/")], [])[1]
            finally:
                client.close()
            # Every write of the 30 rounds is history once a compaction passed it.
            wait_for(lambda: gauge(server, "etcd_debugging_mvcc_compact_revision") >= revision,
                     timeout=20, what="a compaction past the rounds")
            assert gauge(server, "etcd_debugging_mvcc_db_compaction_keys_total") > 0
            # Watches and reads after a compaction work as before.
            assert_one_world(run_round(nodes), 2)
        finally:
            for node in nodes:
                node.handler.shutdown()


@pytest.mark.parametrize("refused", ["between_calls", "any_time"])
def test_watches_resume_past_compacted_history(run_id, caplog, refused):
    """A stream that breaks after etcd compacted the history a watch was to
    resume from: the state record is read and watched again at once (not after
    the lease_ttl re-read that catches a quiet watch), and the round completes,
    whether etcd refused the resumed watch before the next call began or
    (``any_time``) while it runs."""
    with EtcdServer() as server:
        nodes = [ThreadNode(make_handler(server.get_endpoint(), run_id, 2, 2)) for _ in range(2)]
        try:
            assert_one_world(run_round(nodes), 2)
            raw = server.get_client()
            try:
                for i in range(5):
                    raw.put("/elsewhere", str(i))
                raw.compact(raw.get("/elsewhere")[1].mod_revision, physical=True)
            finally:
                raw.close()
            # The state watches started before the compaction and resume from there.
            server.kill()
            server.restart()
            if refused == "between_calls":
                wait_for(lambda: all(queued(node.handler, "error", "state") for node in nodes),
                         timeout=20, what="etcd refused the resumed state watches")
            with caplog.at_level(logging.INFO, logger="rdzv.etcd_rendezvous"):
                assert_one_world(run_round(nodes), 2)
            assert {node.handler.round for node in nodes} == {1}
        finally:
            for node in nodes:
                node.handler.shutdown()
    messages = [r.getMessage() for r in caplog.records]
    assert any("resumes past compacted history" in m for m in messages), messages
    assert not any("watching it again" in m for m in messages), messages
