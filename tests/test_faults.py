"""Faults during a rendezvous: etcd leader killed, etcd restarted, a join's answer
lost, etcd gone or hung, nodes SIGKILLed at each phase of a round, a node's
keep-alives stalled past its lease.

After each fault the guarantees of PROTOCOL.md are checked against etcd itself:
every node that returned from round r holds the rank that round r's world record
gives it (so there is one world per round, ranks 0..n-1), the world is within
bounds and holds no dead node, and the survivors finish within the documented
window (docs/RELIABILITY.md).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from helpers import (
    ProcessNode,
    ThreadNode,
    assert_one_world,
    check_worlds,
    handler_on,
    make_handler,
    run_round,
    wait_for,
)
from rdzv import _state
from rdzv.api import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousTimeoutError,
)
from rdzv.client import DEFAULT_CONNECT_TIMEOUT, EtcdClient, EtcdConfig, parse_endpoints
from rdzv.etcd_rendezvous import EtcdRendezvousHandler
from rdzv.etcd_server import EtcdCluster, EtcdServer
from rdzv.inspect import read_world
from rdzv.keys import RunKeys

# Short enough that a dead node is gone in seconds, long enough for 2 busy cores.
LEASE_TTL = 2
LAST_CALL = 0.5
FAST = {"lease_ttl": LEASE_TTL, "last_call_timeout": LAST_CALL, "timeout": 30}
# What a loaded 2-core machine adds to a window on top of its nominal length:
# etcd checks leases for expiry every 500 ms, then a restart, re-joins and confirms.
SLACK = 2.5


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def cluster() -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster of this test's own (half a second to start)."""
    with EtcdCluster(size=3) as etcd_cluster:
        yield etcd_cluster


@pytest.fixture
def server() -> Iterator[EtcdServer]:
    """A single etcd of this test's own, free to be killed and restarted."""
    with EtcdServer() as etcd_server:
        yield etcd_server


def _client(group: EtcdServer | EtcdCluster) -> EtcdClient:
    return group.get_rdzv_client()


# ------------------------------------------------------------------- checks
def thread_results(nodes: list[ThreadNode]) -> list[tuple[str, int, int, int]]:
    """``(node_id, round, rank, world_size)`` of nodes whose round completed."""
    return [
        (node.handler.node_id, node.handler.round, node.result.rank, node.result.world_size)
        for node in nodes
        if not isinstance(node.result, BaseException)
    ]


def member_ids(client: EtcdClient, run_id: str, round_number: int) -> set[str]:
    prefix = RunKeys("/rdzv", run_id).members(round_number)
    return {key[len(prefix):].decode() for key, _, _ in client.range(prefix)}


def state_of(client: EtcdClient, run_id: str) -> Any:
    got = client.get(RunKeys("/rdzv", run_id).state)
    return None if got is None else _state.decode_state(got[0])


def signal_node(node: ProcessNode, sig: int) -> None:
    os.killpg(node.proc.pid, sig)


class Faults(grpc.UnaryUnaryClientInterceptor):
    """Fault injection below a client's retries, as one of its interceptors
    (``EtcdClient(..., interceptors=[faults])``); see ``intercept_txn``."""

    def __init__(self) -> None:
        self._rules: list[tuple[str, Any, Any]] = []

    def add(self, method: str, match: Any, action: Any) -> None:
        self._rules.append((f"/etcdserverpb.KV/{method}", match, action))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        for method, match, action in self._rules:
            if details.method == method and match(request):
                def send() -> Any:
                    return continuation(details, request).result()

                send.request = request  # type: ignore[attr-defined]
                return _Answer(action(send))
        return continuation(details, request)


class _Answer:
    """An answer ``Faults`` gives instead of gRPC's outcome of a call."""

    def __init__(self, response: Any) -> None:
        self._response = response

    def result(self) -> Any:
        return self._response


def faulty_handler(endpoint: str, run_id: str, min_nodes: int, max_nodes: int,
                   connect_timeout: float = DEFAULT_CONNECT_TIMEOUT, **options: Any
                   ) -> tuple[EtcdRendezvousHandler, Faults]:
    """A handler on a client of its own whose requests pass through ``Faults``."""
    faults = Faults()
    config = EtcdConfig(endpoints=tuple(parse_endpoints(endpoint)),
                        connect_timeout=connect_timeout)
    client = EtcdClient(config, interceptors=[faults])
    return handler_on(client, run_id, min_nodes, max_nodes, **options), faults


def intercept_txn(faults: Faults, match: Any, action: Any, method: str = "Txn") -> None:
    """Fault injection below the client's retries: a transaction of the handler
    of ``faults`` (or a request of another KV ``method``, like the ``Range``
    requests that read-only transactions are sent as) whose request
    ``match(request)`` runs ``action(send)`` instead, where ``send()`` sends it
    to etcd. Every other request goes through as it is."""
    faults.add(method, match, action)


def puts_key(key: bytes) -> Any:
    """A ``match`` for ``intercept_txn``: the transaction puts ``key``."""
    return lambda request: any(op.request_put.key == key for op in request.success)


# ------------------------------------------------- 1. etcd leader killed
def test_leader_killed_while_sixteen_nodes_join(cluster, run_id, handlers):
    """Guarantee 8: a leader change mid-join yields one world of all 16 nodes."""
    endpoint = cluster.get_endpoint()
    handlers.extend(make_handler(endpoint, run_id, 16, 16) for _ in range(16))
    client = _client(cluster)
    leader = None
    try:
        nodes = [ThreadNode(h) for h in handlers]
        for node in nodes[:8]:
            node.start()
        wait_for(lambda: len(member_ids(client, run_id, 0)) == 8, what="8 of 16 nodes joined")
        leader = cluster.leader()
        cluster.members[leader].kill()
        for node in nodes[8:]:
            node.start()
        infos = [node.join(60) for node in nodes]
        assert_one_world(infos, 16)
        assert {h.round for h in handlers} == {0}
        check_worlds(client, run_id, thread_results(nodes), 16, 16)
    finally:
        client.close()
        if leader is not None:
            cluster.members[leader].restart()


# ------------------------------------------- 2. single etcd restarted mid-join
@pytest.mark.parametrize("rest_join", ["after_restart", "during_outage"])
def test_etcd_restarted_on_its_data_mid_join(server, run_id, handlers, rest_join):
    """Guarantee 8: every join completes or fails clearly; never two worlds."""
    endpoint = server.get_endpoint()
    handlers.extend(make_handler(endpoint, run_id, 4, 4) for _ in range(4))
    nodes = [ThreadNode(h) for h in handlers]
    client = _client(server)
    try:
        for node in nodes[:2]:
            node.start()
        wait_for(lambda: len(member_ids(client, run_id, 0)) == 2, what="2 of 4 nodes joined")
        server.kill()
        killed_at = time.monotonic()
        if rest_join == "during_outage":
            for node in nodes[2:]:
                node.start()
            server.restart()
        else:
            server.restart()
            for node in nodes[2:]:
                node.start()
        outage = time.monotonic() - killed_at
        results = [node.join(60) for node in nodes]
        failures = [r for r in results if isinstance(r, BaseException)]
        assert all(
            isinstance(r, (RendezvousConnectionError, RendezvousTimeoutError)) for r in failures
        ), failures
        check_worlds(client, run_id, thread_results(nodes), 4, 4)
        if outage < DEFAULT_CONNECT_TIMEOUT - 1:
            # etcd was back well within connect_timeout: nobody had a reason to fail.
            assert_one_world(results, 4)
    finally:
        client.close()


# ------------------------------------------ 2b. a join's answer lost in transit
class _AnswerLost(grpc.RpcError):
    """What a request gets when etcd committed it but the answer never came back
    (its deadline passed while the leader changed): the client retries it."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "injected: the transaction committed but its answer was lost"


def test_join_whose_answer_was_lost_still_counts(etcd_server, run_id, handlers):
    """Guarantee 8: a dropped answer during a join must not leave a round frozen with
    a member that does not know it is one. Seen in the soak after leader kills."""
    endpoint = etcd_server.get_endpoint()
    handlers.append(make_handler(endpoint, run_id, 3, 3, timeout=6))
    victim_handler, victim_faults = faulty_handler(endpoint, run_id, 3, 3, timeout=6)
    handlers.extend([victim_handler, make_handler(endpoint, run_id, 3, 3, timeout=6)])
    first, victim, last = (ThreadNode(h) for h in handlers)
    keys = RunKeys("/rdzv", run_id)
    client = _client(etcd_server)
    lost: list[bool] = []

    def commit_then_lose_the_answer(send: Any) -> Any:
        send()
        if not lost:
            lost.append(True)
            # Before the victim hears of its join, the last node joins and
            # (max_nodes reached) freezes the round with the victim in its world.
            last.start()
            wait_for(lambda: client.get(keys.world(0)), what="round 0 frozen")
            raise _AnswerLost()
        return send()

    intercept_txn(victim_faults, puts_key(keys.members(0) + victim.handler.node_id.encode()),
                  commit_then_lose_the_answer)
    try:
        first.start()
        wait_for(lambda: client.get(keys.state) and client.count(keys.members(0)) == 1,
                 what="round 0 open with one member")
        victim.start()
        infos = [node.join(30) for node in (first, victim, last)]
        assert lost
        assert victim.handler.node_id in read_world(client, keys, 0)[0]
        assert_one_world(infos, 3)
    finally:
        client.close()


# ------------------------------------------- 2b'. two freezers, one decision
def test_second_freezer_with_the_same_decision_still_confirms(etcd_server, run_id, handlers):
    """Another node froze the round on the same read, a moment earlier: this
    freezer's CAS finds exactly the bytes it meant to write. The round's state is
    as it wanted, but its confirmation, which its own CAS carried, is not in
    etcd: it must confirm like any member."""
    endpoint = etcd_server.get_endpoint()
    options = {"timeout": 15, "last_call_timeout": 1}
    freezer_handler, freezer_faults = faulty_handler(endpoint, run_id, 2, 2, **options)
    handlers.extend([freezer_handler, make_handler(endpoint, run_id, 2, 2, **options)])
    freezer, other = (ThreadNode(h) for h in handlers)
    keys = RunKeys("/rdzv", run_id)
    client = _client(etcd_server)
    sent: list[bytes] = []
    committed: list[bytes] = []

    def another_freezer_first(send: Any) -> Any:
        # The other freezer's transaction: the same decision, without this
        # node's confirmation.
        theirs = type(send.request)()
        theirs.CopyFrom(send.request)
        del theirs.success[:]
        theirs.success.extend(op for op in send.request.success
                              if not op.request_put.key.startswith(keys.confirmed(0)))
        assert len(theirs.success) == len(send.request.success) - 1
        assert client.etcd3.kvstub.Txn(theirs).succeeded
        committed.append(client.get(keys.state)[0])
        sent.extend(op.request_put.value for op in send.request.success
                    if op.request_put.key == keys.state)
        return send()

    intercept_txn(freezer_faults, puts_key(keys.world(0)), another_freezer_first)
    try:
        freezer.start()  # the first joiner: it counts the members, and freezes
        wait_for(lambda: client.count(keys.members(0)) == 1, what="the freezer joined")
        other.start()
        infos = [node.join(30) for node in (freezer, other)]
        assert sent == committed and sent[0].startswith(b"rdzv1 round=0 status=frozen"), (
            sent, committed)
        assert_one_world(infos, 2)
        assert client.get(keys.confirmed(0) + freezer.handler.node_id.encode()) is not None
    finally:
        client.close()


# ---------------------------------------- 2c. a surplus node's confirmation
def test_round_is_final_only_when_its_world_confirmed(etcd_server, run_id, handlers):
    """Guarantee 5: a round never becomes final with a world member that did not
    confirm, even while a surplus node's confirmation is still in etcd."""
    endpoint = etcd_server.get_endpoint()
    built = [faulty_handler(endpoint, run_id, 2, 2, **FAST) for _ in range(3)]
    handlers.extend(handler for handler, _ in built)
    member_faults, slow_faults, surplus_faults = (faults for _, faults in built)
    member, slow, surplus = (ThreadNode(h) for h in handlers)
    keys = RunKeys("/rdzv", run_id)
    client = _client(etcd_server)
    slow_may_confirm, surplus_may_wait = threading.Event(), threading.Event()
    checked = threading.Event()
    confirmed_at: list[float] = []
    surplus_started: list[bool] = []

    def join_then_let_the_surplus_node_in(send: Any) -> Any:
        answer = send()
        if not surplus_started:
            surplus_started.append(True)
            surplus.start()  # joins third; the member's count waits for it
        return answer

    def confirm_late(send: Any) -> Any:
        slow_may_confirm.wait(30)
        confirmed_at.append(time.monotonic())
        return send()

    def wait_to_withdraw(send: Any) -> Any:
        surplus_may_wait.wait(30)
        return send()

    def liveness_check(send: Any) -> Any:
        answer = send()
        checked.set()
        return answer

    slow_id = slow.handler.node_id.encode()
    intercept_txn(slow_faults, puts_key(keys.members(0) + slow_id),
                  join_then_let_the_surplus_node_in)
    intercept_txn(slow_faults, puts_key(keys.confirmed(0) + slow_id), confirm_late)
    intercept_txn(surplus_faults, puts_key(keys.waiting(0) + surplus.handler.node_id.encode()),
                  wait_to_withdraw)
    # The liveness check counts the world's member keys up to the cutoff (the
    # freezer's other reads of the round count nothing).
    intercept_txn(member_faults, lambda request: (request.key == keys.members(0)
                                                  and request.count_only
                                                  and request.max_create_revision),
                  liveness_check, method="Range")

    def count_once_the_surplus_node_joined(send: Any) -> Any:
        wait_for(lambda: client.count(keys.members(0)) == 3, what="the third node joined")
        return send()

    # The member joined first and counts the members: it freezes on a count
    # that includes the surplus node.
    intercept_txn(member_faults, lambda request: (request.key == keys.members(0)
                                                  and request.count_only
                                                  and not request.max_create_revision),
                  count_once_the_surplus_node_joined, method="Range")
    try:
        member.start()
        wait_for(lambda: client.get(keys.state) and client.count(keys.members(0)) == 1,
                 what="round 0 open with one member")
        slow.start()
        wait_for(lambda: checked.is_set(), timeout=LEASE_TTL + 10,
                 what="the member's liveness check, lease_ttl after its confirmation")
        world = read_world(client, keys, 0)[0]
        assert sorted(world) == sorted([member.handler.node_id, slow.handler.node_id])
        assert state_of(client, run_id).status == _state.Status.FROZEN
    finally:
        slow_may_confirm.set()
        surplus_may_wait.set()
        client.close()
    assert_one_world([member.join(30), slow.join(30)], 2)
    assert member.finished_at > confirmed_at[0]


# ----------------------------------------------- 3. etcd unreachable or hung
CONNECT_TIMEOUT = 2.0


def _nodes_waiting(server: EtcdServer, run_id: str, handlers: list, **config: Any
                   ) -> tuple[list[ThreadNode], Faults]:
    """Two nodes of three (min_nodes=max_nodes=3) waiting, with nothing to do
    until the third comes: the first opens round 0 before the second joins, so
    that neither has a timer to open it. The third's requests pass through the
    ``Faults`` returned."""
    endpoint = server.get_endpoint()
    handlers.extend(
        make_handler(endpoint, run_id, 3, 3, connect_timeout=CONNECT_TIMEOUT, **config)
        for _ in range(2)
    )
    third, faults = faulty_handler(endpoint, run_id, 3, 3, connect_timeout=CONNECT_TIMEOUT,
                                   **config)
    handlers.append(third)
    keys = RunKeys("/rdzv", run_id)
    client = _client(server)
    try:
        first = ThreadNode(handlers[0]).start()
        wait_for(lambda: client.get(keys.state) and client.count(keys.members(0)) == 1,
                 what="round 0 open with one member")
        second = ThreadNode(handlers[1]).start()
        wait_for(lambda: client.count(keys.members(0)) == 2, what="2 nodes waiting")
    finally:
        client.close()
    return [first, second], faults


def test_unreachable_etcd_fails_waiting_nodes_within_connect_timeout(
        server, run_id, handlers):
    """Nodes blocked in next_rendezvous() get RendezvousConnectionError about
    connect_timeout after etcd went away (RENDEZVOUS_OPTIONS['connect_timeout']),
    not a hang: the broken watch is retried for connect_timeout, and withdrawing
    from the round is a single attempt."""
    nodes, _ = _nodes_waiting(server, run_id, handlers, lease_ttl=10)
    server.kill()
    killed_at = time.monotonic()
    results = [node.join(60) for node in nodes]
    server.restart()  # so that the handlers' shutdown does not wait for it too
    for node, result in zip(nodes, results, strict=True):
        assert isinstance(result, RendezvousConnectionError), result
        assert server.get_endpoint() in str(result), result
        # A retry loop gives up between connect_timeout - 0.5 s (its largest
        # backoff step) and connect_timeout: one loop ends before this bound,
        # two never do.
        assert node.finished_at - killed_at < CONNECT_TIMEOUT + 1.0, result


def test_hung_etcd_fails_waiting_nodes_within_lease_ttl(server, run_id, handlers):
    """A hung etcd (SIGSTOP: connections stay open, nothing answers) is noticed by
    the keep-alives within lease_ttl; waiting nodes fail then, not at timeout."""
    timeout = 10
    nodes, _ = _nodes_waiting(server, run_id, handlers, lease_ttl=LEASE_TTL, timeout=timeout)
    os.kill(server.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        results = [node.join(60) for node in nodes]
    finally:
        os.kill(server.pid, signal.SIGCONT)
    for node, result in zip(nodes, results, strict=True):
        assert isinstance(result, RendezvousError), result
        elapsed = node.finished_at - stopped_at
        assert elapsed < LEASE_TTL + CONNECT_TIMEOUT + SLACK < timeout, (elapsed, result)


def _third_joins_as_etcd_hangs(server: EtcdServer, run_id: str, handlers: list,
                               **config: Any) -> tuple[ThreadNode, Any, float, float]:
    """Two nodes waiting (``_nodes_waiting``); etcd hangs (SIGSTOP) just as the
    third sends its join. Returns the third, its call's outcome, when its call
    began and when etcd stopped."""
    _, third_faults = _nodes_waiting(server, run_id, handlers, **config)
    third = ThreadNode(handlers[2])
    members = RunKeys("/rdzv", run_id).members(0)
    stopped_at: list[float] = []

    def hang_etcd_then_send(send: Any) -> Any:
        if not stopped_at:
            os.kill(server.pid, signal.SIGSTOP)
            stopped_at.append(time.monotonic())
        return send()

    intercept_txn(third_faults, puts_key(members + third.handler.node_id.encode()),
                  hang_etcd_then_send)
    started_at = time.monotonic()
    try:
        third.start()
        result = third.join(90)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert stopped_at, "the third node's join was not sent"
    return third, result, started_at, stopped_at[0]


def test_request_in_flight_when_etcd_hangs_fails_within_lease_ttl(
        server, run_id, handlers):
    """The third node's join is in flight when etcd hangs; it must fail about
    lease_ttl later like the waiting ones, not after the slow-request budget."""
    third, result, _, stopped_at = _third_joins_as_etcd_hangs(
        server, run_id, handlers, lease_ttl=LEASE_TTL, timeout=60)
    assert isinstance(result, RendezvousError), result
    elapsed = third.finished_at - stopped_at
    assert elapsed < LEASE_TTL + CONNECT_TIMEOUT + SLACK, (elapsed, result)


def test_request_in_flight_when_etcd_hangs_ends_at_the_calls_timeout(
        server, run_id, handlers):
    """A call whose timeout comes before its lease could expire, its join in
    flight when etcd hangs: it times out at its timeout (then its withdrawal
    gets one attempt), not after the 30 s a slow etcd's requests are retried."""
    timeout = 4.0
    third, result, started_at, _ = _third_joins_as_etcd_hangs(
        server, run_id, handlers, lease_ttl=60, timeout=timeout)
    assert isinstance(result, RendezvousTimeoutError), result
    withdrawal = min(CONNECT_TIMEOUT, 2.0)  # one attempt
    assert third.finished_at - started_at < timeout + withdrawal + SLACK, result


@pytest.mark.parametrize("lease_scope", ["node", "process"])
def test_call_begun_while_etcd_hangs_ends_at_its_timeout(
        server, run_id, handlers, caplog, lease_scope):
    """A node whose lease lapsed while etcd hangs begins a call (an agent
    restarting its workers): the new lease it asks for gives up at the call's
    timeout, not after the 30 s a slow etcd's requests are retried, and the
    call times out. Once etcd answers again, the node completes a round."""
    caplog.set_level(logging.WARNING, logger="rdzv.session")
    timeout = 3.0
    endpoint = server.get_endpoint()
    options = {**FAST, "timeout": timeout, "lease_scope": lease_scope}
    node = make_handler(endpoint, run_id, 2, 2, **options)
    handlers.append(node)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: any("presumed expired" in r.message for r in caplog.records),
                 timeout=LEASE_TTL + 10, what="the node's keep-alives went unanswered")
        started_at = time.monotonic()
        with pytest.raises(RendezvousTimeoutError, match="lease grant"):
            node.next_rendezvous()
        elapsed = time.monotonic() - started_at
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert elapsed < timeout + SLACK, elapsed
    handlers.append(make_handler(endpoint, run_id, 2, 2, **FAST))
    assert_one_world(run_round([ThreadNode(h) for h in handlers]), 2)


# --------------------------------------------- 4. a node killed at each phase
PHASES = ["before_join", "joined", "frozen_unconfirmed", "after_completion"]


@pytest.mark.parametrize("phase", PHASES)
def test_node_killed_at_each_phase(etcd_server, run_id, handlers, processes, phase):
    """Guarantee 5: the survivors complete a round without the dead node within
    lease_ttl + last_call_timeout (+ SLACK)."""
    endpoint = etcd_server.get_endpoint()
    client = _client(etcd_server)
    # A stopped node that never confirms must be in the world: a member that
    # does not count the round. The first joiner counts; the doomed node joins
    # second, and the last call leaves time for the third to join.
    last_call = 3.0 if phase == "frozen_unconfirmed" else LAST_CALL
    options = {**FAST, "last_call_timeout": last_call}
    doomed = ProcessNode(endpoint, run_id, 2, 3, **options)
    processes.append(doomed)
    handlers.extend(make_handler(endpoint, run_id, 2, 3, **options) for _ in range(2))
    survivors = [ThreadNode(h) for h in handlers]
    try:
        if phase == "after_completion":
            doomed.send("join")
            first = [node.start() for node in survivors]
            assert_one_world([*(node.join(30) for node in first), _Info(doomed.result())], 3)
        elif phase == "frozen_unconfirmed":
            survivors[0].start()
            wait_for(lambda: survivors[0].handler.node_id in member_ids(client, run_id, 0),
                     what="the first survivor joined")
            doomed.send("join")
            wait_for(lambda: doomed.node_id in member_ids(client, run_id, 0),
                     what="the doomed node joined")
        elif phase == "joined":
            doomed.send("join")
            wait_for(lambda: doomed.node_id in member_ids(client, run_id, 0),
                     what="the doomed node joined")
        if phase == "frozen_unconfirmed":
            # Stopped, it cannot confirm: the round freezes with it in the world
            # and waits for a confirmation that never comes.
            signal_node(doomed, signal.SIGSTOP)
            survivors[1].start()
            keys = RunKeys("/rdzv", run_id)
            wait_for(lambda: client.count(keys.confirmed(0)) == 2, what="survivors confirmed")
            assert state_of(client, run_id).status == _state.Status.FROZEN
            assert doomed.node_id in read_world(client, keys, 0)[0]
        killed_at = time.monotonic()
        doomed.kill()
        if phase != "frozen_unconfirmed":
            for node in survivors:
                node.start()
        infos = [node.join(30) for node in survivors]
        elapsed = max(node.finished_at for node in survivors) - killed_at
        assert_one_world(infos, 2)
        check_worlds(client, run_id, thread_results(survivors), 2, 3,
                     dead=frozenset({doomed.node_id}))
        assert elapsed < LEASE_TTL + last_call + SLACK, (phase, elapsed)
    finally:
        client.close()


class _Info:
    """A ProcessNode result shaped like RendezvousInfo, for assert_one_world."""

    def __init__(self, result: dict[str, Any]) -> None:
        assert "error" not in result, result
        self.rank = result["rank"]
        self.world_size = result["world_size"]


# ----------------------------------------- 5. keep-alives stalled past the TTL
def _stall_past_lease(client, run_id, doomed, handlers) -> None:
    """Stop ``doomed`` (joined in round 0) until its lease is gone; the others
    complete round 0 without it; then let it run again."""
    member_key = RunKeys("/rdzv", run_id).members(0) + doomed.node_id.encode()
    doomed.send("join")
    wait_for(lambda: client.get(member_key), what="the stalled node joined")
    signal_node(doomed, signal.SIGSTOP)
    try:
        wait_for(lambda: client.get(member_key) is None, timeout=LEASE_TTL + 5,
                 what="the stalled node's lease expired")
        survivors = [ThreadNode(h).start() for h in handlers]
        infos = [node.join(30) for node in survivors]
        assert_one_world(infos, 2)
        check_worlds(client, run_id, thread_results(survivors), 2, 3,
                     dead=frozenset({doomed.node_id}))
    finally:
        signal_node(doomed, signal.SIGCONT)


def test_stalled_node_is_dropped_and_rejoins_as_a_new_node(
        etcd_server, run_id, handlers, processes):
    """Guarantee 5 for a node that is alive but was silent past its TTL: the round
    completes without it; its pending join fails naming the lease; its next join
    is a new node's and completes in a later round with the others."""
    endpoint = etcd_server.get_endpoint()
    client = _client(etcd_server)
    doomed = ProcessNode(endpoint, run_id, 2, 3, **FAST)
    processes.append(doomed)
    handlers.extend(make_handler(endpoint, run_id, 2, 3, **FAST) for _ in range(2))
    try:
        _stall_past_lease(client, run_id, doomed, handlers)
        told = doomed.result()
        assert "error" in told and "lease" in told["message"], told
        doomed.send("join")
        again = [ThreadNode(h).start() for h in handlers]
        rejoined = doomed.result()
        infos = [node.join(30) for node in again]
        assert_one_world([*infos, _Info(rejoined)], 3)
        assert rejoined["round"] == 1 and {h.round for h in handlers} == {1}
        world = member_ids(client, run_id, 1)
        assert doomed.node_id not in world and len(world) == 3, world
        check_worlds(client, run_id, thread_results(again), 3, 3)
    finally:
        client.close()


def test_node_whose_lease_expired_is_told_so(etcd_server, run_id, handlers):
    """Its pending join reports the lost lease as such, not as etcd being down.

    Only the keep-alives stop here, so the handler cannot learn of the loss from
    them: it must understand etcd's answer to its next write.
    """
    endpoint = etcd_server.get_endpoint()
    victim_client = _client(etcd_server)
    handlers.append(handler_on(victim_client, run_id, 2, 3, **FAST))
    handlers.extend(make_handler(endpoint, run_id, 2, 3, **FAST) for _ in range(2))
    victim, *others = (ThreadNode(h) for h in handlers)
    client = _client(etcd_server)
    member_key = RunKeys("/rdzv", run_id).members(0) + victim.handler.node_id.encode()
    try:
        victim.start()
        wait_for(lambda: client.get(member_key), what="the victim joined")
        # Its keep-alives stop as if starved; nothing marks the lease lost.
        victim_client.stop_keep_alive(int(victim.handler.node_id, 16))
        wait_for(lambda: client.get(member_key) is None, timeout=LEASE_TTL + 5,
                 what="the victim's lease expired")
        assert_one_world(run_round(others, timeout=30), 2)
        told = victim.join(30)
        assert isinstance(told, RendezvousError), told
        assert not isinstance(told, RendezvousConnectionError), told
        assert "lost its lease" in str(told) and victim.handler.node_id in str(told), told
    finally:
        client.close()


# ------------------------------------------------ 6. a state watch gone quiet
class _FirstWatchGoesQuiet(EtcdClient):
    """A client whose first watch of ``key`` stays open but delivers no events."""

    def __init__(self, config: EtcdConfig, key: bytes) -> None:
        super().__init__(config)
        self._quiet_key = key
        self._quiet: Any = None

    def watch(self, key: bytes, callback: Any, start_revision: int, **kwargs: Any) -> Any:
        if key == self._quiet_key and self._quiet in (None, callback):
            self._quiet = callback  # a resumed watch of the same watcher stays quiet

            def deliver(events: Any) -> None:
                if isinstance(events, Exception):
                    callback(events)

            return super().watch(key, deliver, start_revision, **kwargs)
        return super().watch(key, callback, start_revision, **kwargs)


def test_state_watch_that_stalls_costs_at_most_lease_ttl(etcd_server, run_id, handlers):
    """A state watch that stops delivering without breaking (seen once in the soak:
    27 nodes slept through their round's freeze until their timeout) is caught by
    the re-read of the state record every lease_ttl, which watches it again."""
    endpoint = etcd_server.get_endpoint()
    options = {**FAST, "timeout": 15}
    # Its state watch stays open, but what it delivers goes nowhere.
    quiet = _FirstWatchGoesQuiet(EtcdConfig(endpoints=tuple(parse_endpoints(endpoint))),
                                 RunKeys("/rdzv", run_id).state)
    handlers.extend([handler_on(quiet, run_id, 2, 2, **options),
                     make_handler(endpoint, run_id, 2, 2, **options)])
    deaf, other = (ThreadNode(h) for h in handlers)
    client = _client(etcd_server)
    try:
        started = time.monotonic()
        deaf.start()  # opens round 0 itself, so it needs the watch only from here
        wait_for(lambda: client.count(RunKeys("/rdzv", run_id).members(0)) == 1,
                 what="the deaf node joined")
        other.start()
        infos = [deaf.join(30), other.join(30)]
        assert_one_world(infos, 2)
        assert deaf.finished_at - started < LEASE_TTL + SLACK, deaf.finished_at - started
    finally:
        client.close()
