"""Rendezvous across test hosts: nodes and etcd on hosts of their own, partitions.

Every node and every etcd member here runs on a host of its own (a network
namespace with its own address and host name, see ``hosts.py``), so nodes
advertise different addresses and packets between them can be dropped while
the processes keep running. After each scenario the guarantees are checked
against etcd itself (``check_worlds``): one world per round, ranks 0..n-1,
bounds, and no cut-off node in a world.

One network, one etcd and (for the leader test) one 3-member cluster serve the
whole module; every test uses a run of its own, and heals the network at its end.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import hosts

_MISSING = hosts.unavailable()
if _MISSING:
    pytest.skip(_MISSING, allow_module_level=True)

from helpers import ProcessNode, check_worlds, wait_for  # noqa: E402
from rdzv.client import EtcdClient  # noqa: E402
from rdzv.etcd_rendezvous import DEFAULT_LEASE_TTL  # noqa: E402
from rdzv.etcd_server import EtcdCluster, EtcdServer  # noqa: E402
from rdzv.keys import RunKeys  # noqa: E402
from test_torch_integration import Job, _assert_world, needs_torch  # noqa: E402

LEASE_TTL = 2
LAST_CALL = 0.5
TIMEOUT = 10
FAST = {"lease_ttl": LEASE_TTL, "last_call_timeout": LAST_CALL, "timeout": TIMEOUT}
# What a loaded 2-core machine adds to a window on top of its nominal length:
# etcd checks leases for expiry every 500 ms, then re-joins and confirms.
SLACK = 2.5
# The errors a node cut off from etcd may end with (guarantee 8), besides being
# told that it lost its lease.
CLEAR_ERRORS = ("RendezvousConnectionError", "RendezvousTimeoutError")
NODE_HOSTS = 16


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def net() -> Iterator[hosts.Network]:
    """16 node hosts h00..h15, an etcd host, and three hosts e0..e2 for a cluster."""
    with hosts.Network() as network:
        network.add_hosts(NODE_HOSTS)
        network.add_host("etcd")
        for i in range(3):
            network.add_host(f"e{i}")
        yield network


def _host(net: hosts.Network, name: str) -> hosts.Host:
    return next(h for h in net.hosts if h.name == name)


@pytest.fixture(scope="module")
def etcd(net: hosts.Network) -> Iterator[EtcdServer]:
    """One etcd on its own host."""
    with net.etcd_server(_host(net, "etcd")) as server:
        yield server


@pytest.fixture(scope="module")
def cluster(net: hosts.Network) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster, one member per host e0..e2."""
    with net.etcd_cluster([_host(net, f"e{i}") for i in range(3)]) as etcd_cluster:
        yield etcd_cluster


@pytest.fixture
def observer(etcd: EtcdServer) -> Iterator[EtcdClient]:
    """The test's own client of the etcd host (never cut off)."""
    client = etcd.get_rdzv_client()
    yield client
    client.close()


@pytest.fixture
def start(net: hosts.Network) -> Iterator[Callable[..., list[ProcessNode]]]:
    """Starts one node process on each given host; heals the network and ends them after."""
    started: list[ProcessNode] = []

    def start_nodes(
        on: list[hosts.Host], endpoint: str, run_id: str, min_nodes: int, max_nodes: int,
        advertise: bool = False, **config: Any,
    ) -> list[ProcessNode]:
        """``advertise``: each node's ``local_addr`` is its host's address."""

        def one(host: hosts.Host) -> ProcessNode:
            own = {"local_addr": host.address} if advertise else {}
            return ProcessNode(
                endpoint, run_id, min_nodes, max_nodes, launcher=host.launcher(),
                **config, **own,
            )

        with ThreadPoolExecutor(len(on)) as pool:
            nodes = list(pool.map(one, on))
        started.extend(nodes)
        return nodes

    yield start_nodes
    net.heal()
    for node in started:  # all at once: each shutdown takes a while
        if node.proc.poll() is None:
            os.killpg(node.proc.pid, signal.SIGCONT)
            try:
                node.send("exit")
            except BrokenPipeError:
                pass
    for node in started:
        node.close()


def _results(answers: list[dict[str, Any]]) -> list[tuple[str, int, int, int]]:
    return [
        (a["node_id"], a["round"], a["rank"], a["world_size"]) for a in answers if "rank" in a
    ]


def _join_all(nodes: list[ProcessNode], timeout: float = 60.0) -> list[dict[str, Any]]:
    for node in nodes:
        node.send("join")
    return [node.result(timeout) for node in nodes]


def _assert_clear_error(answer: dict[str, Any]) -> None:
    """A cut-off node's call ended with an error it can act on, never a world."""
    assert "rank" not in answer, f"a cut-off node returned a world: {answer}"
    if answer.get("error") == "RendezvousError":
        assert "lost its lease" in answer["message"], answer
    else:
        assert answer.get("error") in CLEAR_ERRORS, answer
        assert "etcd" in answer["message"], answer


def _survivors_go_on_and_the_cut_node_fails(
    observer: EtcdClient, run_id: str, survivors: list[ProcessNode], cut: ProcessNode,
    cut_at: float,
) -> list[dict[str, Any]]:
    """The survivors, all asked to join, form a world of three without ``cut``
    within lease_ttl + last call + slack of ``cut_at`` (a node cut off before
    it joined costs the last call only; one that joined, its lease too); ``cut``
    ends with a clear error within its timeout. Returns the survivors' answers."""
    answers = [node.result(60) for node in survivors]
    survivors_took = time.monotonic() - cut_at
    failed = cut.result(TIMEOUT + SLACK)
    cut_took = time.monotonic() - cut_at
    assert all("rank" in a for a in answers), answers
    check_worlds(observer, run_id, _results(answers), 3, 3, dead=frozenset({cut.node_id}))
    assert survivors_took < LEASE_TTL + LAST_CALL + SLACK, survivors_took
    _assert_clear_error(failed)
    assert cut_took < TIMEOUT + SLACK, cut_took
    return answers


def _rejoin_later(
    healed: ProcessNode, survivors: list[ProcessNode], after_round: int
) -> list[dict[str, Any]]:
    """The healed node joins again; the survivors see it waiting and re-form with it."""
    healed.send("join")
    wait_for(
        lambda: survivors[0].ask("waiting")["waiting"] > 0,
        timeout=TIMEOUT,
        what="the survivors to see the healed node waiting",
    )
    answers = [*_join_all(survivors), healed.result(TIMEOUT)]
    assert all("rank" in a for a in answers), answers
    assert {a["round"] for a in answers} == {answers[0]["round"]}, answers
    assert answers[0]["round"] > after_round, answers
    assert answers[0]["world_size"] == len(answers), answers
    return answers


# ----------------------------------------------------- 16 hosts, 16 addresses
def test_sixteen_hosts_each_advertise_their_own_address(net, etcd, observer, start):
    """Rank 0's MASTER_ADDR is its own host's address, and every other host can
    connect to its MASTER_PORT there."""
    run_id = str(uuid.uuid4())
    on = net.hosts[:NODE_HOSTS]
    nodes = start(
        on, etcd.get_endpoint(), run_id, NODE_HOSTS, NODE_HOSTS, advertise=True, **FAST
    )
    answers = _join_all(nodes)
    check_worlds(observer, run_id, _results(answers), NODE_HOSTS, NODE_HOSTS)
    assert {(a["master_addr"], a["master_port"]) for a in answers} == {
        (answers[0]["master_addr"], answers[0]["master_port"])
    }
    rank0 = next(i for i, a in enumerate(answers) if a["rank"] == 0)
    assert answers[rank0]["master_addr"] == on[rank0].address
    assert nodes[rank0].ask("listen") == {"listening": answers[rank0]["master_port"]}
    for i, node in enumerate(nodes):
        if i != rank0:
            reply = node.ask(f"connect {answers[i]['master_addr']} {answers[i]['master_port']}")
            assert reply == {"connected": True}, (on[i], reply)



# ----------------------------------------------------- torchrun across hosts
@needs_torch
@pytest.mark.timeout(240)
def test_torchrun_job_across_three_hosts(net, etcd, tmp_path):
    """Three torchrun agents, one per host, with torchrun's defaults: rank 0
    advertises its host name, and the workers on the other hosts reach it there."""
    run_id = str(uuid.uuid4())
    job = Job(str(tmp_path), etcd.get_endpoint(), run_id, "3", ["allreduce"],
              rdzv_conf=f"lease_ttl={LEASE_TTL}")
    three = net.hosts[:3]
    try:
        for host in three:
            job.start_agent(launcher=host.launcher())
        job.wait_all()
    finally:
        job.stop()
    results = job.results()
    _assert_world(results, 3)
    assert {r["host"] for r in results} == {h.name for h in three}, results
    rank0_host = next(r["host"] for r in results if r["rank"] == 0)
    assert {r["master_addr"] for r in results} == {rank0_host}, results

# ------------------------------------------------ a host cut off during a round
def _recv_queue_from(host: hosts.Host, address: str) -> int:
    """Bytes waiting in ``host``'s sockets from ``address``, unread by its process."""
    lines = host.run(["ss", "-tnH", "state", "established", "dst", address]).splitlines()
    return sum(int(line.split()[0]) for line in lines if line.split())


@pytest.mark.parametrize("phase", ["before_join", "after_join", "after_freeze"])
def test_host_cut_off_during_a_round(net, etcd, observer, start, phase):
    """The others complete without the cut-off node within lease_ttl + last_call
    + slack; its call ends with a clear error by its timeout and never returns a
    world; after the heal its next call joins a later round."""
    run_id = str(uuid.uuid4())
    etcd_host = _host(net, "etcd")
    *survivors, cut = start(net.hosts[:4], etcd.get_endpoint(), run_id, 3, 4, **FAST)
    cut_host = net.hosts[3]
    members = RunKeys("/rdzv", run_id).members(0)

    def cut_off() -> None:
        net.isolate(cut_host)

    if phase == "before_join":
        cut_off()
        cut.send("join")
    else:
        cut.send("join")
        wait_for(lambda: observer.count(members) == 1, what="the node's join")
        if phase == "after_freeze":
            # Stopped, it cannot confirm; the freeze still reaches its socket.
            os.killpg(cut.proc.pid, signal.SIGSTOP)
        else:
            cut_off()
    cut_at = time.monotonic()
    for node in survivors:
        node.send("join")
    if phase == "after_freeze":
        wait_for(lambda: _recv_queue_from(cut_host, etcd_host.address) > 0,
                 what="the freeze to reach the stopped node's socket")
        cut_off()
        os.killpg(cut.proc.pid, signal.SIGCONT)
    answers = _survivors_go_on_and_the_cut_node_fails(observer, run_id, survivors, cut, cut_at)
    net.heal(cut_host)
    again = _rejoin_later(cut, survivors, answers[0]["round"])
    check_worlds(observer, run_id, _results(again), 4, 4)



# ------------------------------------------------- a host cut off between rounds
def test_host_cut_off_between_rounds(net, etcd, observer, start):
    """Survivors polling num_nodes_waiting() are told within about lease_ttl that
    a member of their completed round is cut off, and re-form without it."""
    run_id = str(uuid.uuid4())
    *survivors, cut = start(net.hosts[:4], etcd.get_endpoint(), run_id, 3, 4, **FAST)
    first = _join_all([*survivors, cut])
    check_worlds(observer, run_id, _results(first), 4, 4)
    net.isolate(net.hosts[3])
    cut_at = time.monotonic()
    for node in survivors:
        wait_for(lambda node=node: node.ask("waiting")["waiting"] > 0,
                 timeout=LEASE_TTL + SLACK + 1, what="the survivors to count the lost member")
    told = time.monotonic() - cut_at
    answers = _join_all(survivors)
    reformed = time.monotonic() - cut_at
    assert all("rank" in a for a in answers), answers
    assert {a["round"] for a in answers} == {first[0]["round"] + 1}, answers
    check_worlds(observer, run_id, _results(answers), 3, 3, dead=frozenset({cut.node_id}))
    assert told < LEASE_TTL + SLACK, told
    assert reformed < LEASE_TTL + LAST_CALL + SLACK, reformed
    net.heal(net.hosts[3])
    again = _rejoin_later(cut, survivors, answers[0]["round"])
    check_worlds(observer, run_id, _results(again), 4, 4)

# --------------------------------------------------------- one-way partition
def test_host_that_gets_no_answers_from_etcd(net, etcd, observer, start):
    """etcd's answers to one host are dropped (its requests still arrive): it
    fails clearly within its timeout; the others are not held up past its lease."""
    run_id = str(uuid.uuid4())
    *survivors, deaf = start(net.hosts[:4], etcd.get_endpoint(), run_id, 3, 4, **FAST)
    members = RunKeys("/rdzv", run_id).members(0)
    net.cut(net.hosts[3], [_host(net, "etcd")], direction="in")
    cut_at = time.monotonic()
    deaf.send("join")
    # Its join arrives and counts; only the answer is lost.
    wait_for(lambda: observer.count(members) == 1, what="the deaf node's join")
    for node in survivors:
        node.send("join")
    _survivors_go_on_and_the_cut_node_fails(observer, run_id, survivors, deaf, cut_at)



# ------------------------------------------------------ delay and packet loss
def test_round_across_a_slow_lossy_network(net, etcd, observer, start):
    """With 20 ms delay and 2% loss on every node host, a round still completes."""
    reason = net.netem_unavailable()
    if reason:
        pytest.skip(f"delay and loss need tc's netem: {reason}")
    run_id = str(uuid.uuid4())
    four = net.hosts[:4]
    nodes = start(four, etcd.get_endpoint(), run_id, 4, 4, **FAST)
    try:
        for host in four:
            net.netem(host, delay_ms=20, loss_percent=2)
        answers = _join_all(nodes)
    finally:
        for host in four:
            net.clear_netem(host)
    check_worlds(observer, run_id, _results(answers), 4, 4)


# ------------------------------------------------ etcd leader cut off its peers
def test_leader_cut_off_from_its_peers_and_half_the_hosts(net, cluster, start):
    """Clients fail over to the majority, rounds complete, never two worlds.

    The nodes have the default lease_ttl: half of them lose the member they were
    talking to without a word (dropped packets), the other half keep reaching a
    member that has no leader any more."""
    run_id = str(uuid.uuid4())
    six = net.hosts[:6]
    nodes = start(six, cluster.get_endpoint(), run_id, 6, 6, last_call_timeout=LAST_CALL,
                  timeout=30)
    observer = cluster.get_rdzv_client(connect_timeout=30)
    try:
        first = _join_all(nodes)
        check_worlds(observer, run_id, _results(first), 6, 6)
        leader = cluster.leader()
        leader_host = _host(net, f"e{leader}")
        peers = [_host(net, f"e{i}") for i in range(3) if i != leader]
        net.cut(leader_host, [*peers, *six[:3]])
        cut_at = time.monotonic()
        # The majority elects a new leader, and every node gets there.
        wait_for(lambda: cluster.leader() != leader, what="a new leader")
        answers = _join_all(nodes)
        took = time.monotonic() - cut_at
        assert all("rank" in a for a in answers), answers
        check_worlds(observer, run_id, _results(answers), 6, 6)
        again = _join_all(nodes)
        assert all("rank" in a for a in again), again
        check_worlds(observer, run_id, _results(again), 6, 6)
        assert len({a["round"] for a in answers}) == 1 and len({a["round"] for a in again}) == 1
        # Well before a lease could lapse: nobody was dropped on the way.
        assert took < DEFAULT_LEASE_TTL, took
    finally:
        net.heal()
        observer.close()
