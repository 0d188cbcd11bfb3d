"""``rdzv.inspect``: a run's status as Python callers read it, against a real etcd."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from helpers import ThreadNode, assert_one_world, make_handler, run_round, wait_for
from rdzv.api import RendezvousClosedError, RendezvousStateError
from rdzv.client import EtcdClient
from rdzv.inspect import NodeState, RoundProgress, RunState, read_round_progress, read_run_status
from rdzv.keys import RunKeys


@pytest.fixture
def client(etcd_server) -> Iterator[EtcdClient]:
    c = etcd_server.get_rdzv_client()
    yield c
    c.close()


def test_a_run_that_does_not_exist(client, run_id):
    status = read_run_status(client, run_id)
    assert (status.state, status.round, status.members, status.waiting) == (
        RunState.NONE, None, (), ())
    assert (status.world, status.closed, status.keys, status.prefix) == (None, False, 0, "/rdzv")
    assert read_round_progress(client, run_id) == RoundProgress(RunState.NONE)
    assert json.loads(json.dumps(status.to_dict()))["status"] == "none"


def test_a_joinable_round_in_placement_order_with_its_last_call(
        client, etcd_endpoint, run_id, handlers):
    for host, label in (("node10", "rack2"), ("node9", "rack1"), ("node3", None)):
        config = {} if label is None else {"topology": label}
        handlers.append(make_handler(etcd_endpoint, run_id, 3, 4, local_addr=host, **config))
    nodes = [ThreadNode(handlers[0]).start(), ThreadNode(handlers[1]).start()]
    wait_for(lambda: read_run_status(client, run_id).joined == 2, what="two members")
    # Read again: a status taken while the nodes joined may have read the run's
    # keys (first) before they existed.
    status = read_run_status(client, run_id)
    assert (status.state, status.round, status.min_nodes, status.max_nodes) == (
        RunState.JOINABLE, 0, 3, 4)
    assert (status.world_size, status.world, status.last_call_ends) == (None, None, None)
    # Placement order: topology group first, whatever the order they came in.
    assert [(m.host, m.topology) for m in status.members] == [
        ("node9", "rack1"), ("node10", "rack2")]
    for member in status.members:
        assert (member.state, member.rank, member.pid) == (NodeState.JOINED, None, os.getpid())
        assert 0 < member.lease_ttl <= 10
    assert status.keys > 0 and status.bytes > 0
    assert read_round_progress(client, run_id) == RoundProgress(RunState.JOINABLE, 0, 3, 4,
                                                                None, 2)
    before = time.time()
    nodes.append(ThreadNode(handlers[2]).start())
    ends = wait_for(lambda: read_run_status(client, run_id).last_call_ends,
                    what="the last call's deadline")
    # The third join armed the last call: it ends last_call_timeout (30 s) after it.
    assert before + 30 <= ends <= time.time() + 30
    status = read_run_status(client, run_id)
    assert [m.host for m in status.members] == ["node9", "node10", "node3"]
    assert status.members[2].topology is None
    assert status.to_dict()["members"][2]["state"] == "joined"
    handlers[0].set_closed()
    assert all(isinstance(node.join(), RendezvousClosedError) for node in nodes)
    closed = read_run_status(client, run_id)
    assert (closed.state, closed.closed, closed.to_dict()["status"]) == (
        RunState.CLOSED, True, "closed")


def test_a_final_round_its_world_and_a_waiting_node(client, etcd_endpoint, run_id, handlers):
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 2, local_addr="127.0.0.1")
                    for _ in range(3))
    infos = run_round([ThreadNode(h) for h in handlers[:2]])
    assert_one_world(infos, 2)
    by_rank = sorted(zip(infos, handlers[:2], strict=True), key=lambda pair: pair[0].rank)
    status = read_run_status(client, run_id)
    assert (status.state, status.round, status.world_size) == (RunState.FINAL, 0, 2)
    assert status.world is not None
    assert status.world.nodes == tuple(h.node_id for _, h in by_rank)
    assert (status.world.master_addr, status.world.master_port) == (
        "127.0.0.1", infos[0].bootstrap_store_info.master_port)
    assert [(m.node, m.rank, m.state) for m in status.members] == [
        (h.node_id, rank, NodeState.CONFIRMED) for rank, (_, h) in enumerate(by_rank)]
    assert read_round_progress(client, run_id).count == 0
    late = ThreadNode(handlers[2]).start()
    status = wait_for(lambda: (s := read_run_status(client, run_id)).waiting and s,
                      what="a waiting node")
    (waiting,) = status.waiting
    assert (waiting.node, waiting.state, waiting.rank) == (
        handlers[2].node_id, NodeState.WAITING, None)
    assert 0 < waiting.lease_ttl <= 10
    assert read_round_progress(client, run_id) == RoundProgress(RunState.FINAL, 0, 2, 2, 2, 1)
    handlers[0].set_closed()
    assert isinstance(late.join(), RendezvousClosedError)


def test_a_world_member_that_left(client, etcd_endpoint, run_id, handlers):
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 2) for _ in range(2))
    infos = run_round([ThreadNode(h) for h in handlers])
    assert_one_world(infos, 2)
    gone, stays = handlers
    rank_gone = infos[0].rank
    gone.shutdown()  # revokes its lease: its member key goes
    status = read_run_status(client, run_id)
    assert status.joined == 1
    assert [(m.node, m.state, m.rank) for m in status.members] == [
        (stays.node_id, NodeState.CONFIRMED, 1 - rank_gone),
        (gone.node_id, NodeState.LEFT, rank_gone)]
    left = status.members[1]
    assert (left.host, left.pid, left.lease_ttl) == (None, None, None)


def test_a_corrupt_state_record_is_an_error(client, run_id):
    keys = RunKeys("/rdzv", run_id)
    client.put(keys.state, b"not a state record")
    try:
        with pytest.raises(RendezvousStateError):
            read_run_status(client, run_id)
        with pytest.raises(RendezvousStateError):
            read_round_progress(client, run_id)
    finally:
        client.delete(keys.run, prefix=True)


@pytest.mark.parametrize("run_id_text, prefix", [("a/b", "/rdzv"), ("r", "/a/../b")])
def test_malformed_names_are_refused(client, run_id_text, prefix):
    for read in (read_run_status, read_round_progress):
        with pytest.raises(ValueError):
            read(client, run_id_text, prefix)
