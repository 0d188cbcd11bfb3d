"""Whole rounds against a real etcd: agreement, elasticity, late and surplus nodes,
closing, corrupt state, and nodes killed for real."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from helpers import (
    ProcessNode,
    ThreadNode,
    assert_one_world,
    clock_ahead,
    make_handler,
    run_round,
    wait_for,
)
from rdzv import etcd_rendezvous
from rdzv.api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousParameters,
    RendezvousStateError,
    RendezvousTimeoutError,
    free_port,
)
from rdzv.client import EtcdClient, EtcdConfig, parse_endpoints
from rdzv.etcd_rendezvous import create_rdzv_handler
from rdzv.keys import RunKeys


@pytest.fixture
def etcd(etcd_endpoint):
    client = EtcdClient(EtcdConfig(endpoints=tuple(parse_endpoints(etcd_endpoint))))
    yield client
    client.close()


def test_single_node_round_store_and_shutdown(etcd_endpoint, run_id):
    handler = make_handler(etcd_endpoint, run_id, 1, 1)
    info = handler.next_rendezvous()
    assert (info.rank, info.world_size) == (0, 1)
    info.store.set("greeting", b"hello")
    assert info.store.get("greeting") == b"hello"
    assert info.bootstrap_store_info.master_port > 0
    assert handler.shutdown() is True
    assert handler.shutdown() is True


@pytest.mark.parametrize("n", [1, 2, 8, 32, 64])
def test_full_round_of_n_nodes(etcd_endpoint, run_id, handlers, n):
    handlers.extend(make_handler(etcd_endpoint, run_id, n, n) for _ in range(n))
    infos = run_round([ThreadNode(h) for h in handlers])
    assert_one_world(infos, n)
    # Every member got the same bootstrap address, published by rank 0.
    assert len({(i.bootstrap_store_info.master_addr, i.bootstrap_store_info.master_port)
                for i in infos}) == 1


def test_rounds_repeat_and_survivors_keep_ranks(etcd_endpoint, run_id, handlers):
    handlers.extend(make_handler(etcd_endpoint, run_id, 4, 4) for _ in range(4))
    first = run_round([ThreadNode(h) for h in handlers])
    second = run_round([ThreadNode(h) for h in handlers])
    assert_one_world(second, 4)
    assert [i.rank for i in first] == [i.rank for i in second]


def _timed_round_of_three(etcd_endpoint, run_id, handlers, max_nodes, last_call_timeout):
    """Three nodes (min_nodes 2) join at once; returns the seconds until the last returned."""
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, max_nodes,
                                 last_call_timeout=last_call_timeout) for _ in range(3))
    nodes = [ThreadNode(h) for h in handlers]
    start = time.monotonic()
    assert_one_world(run_round(nodes), 3)
    return max(n.finished_at for n in nodes) - start


def test_last_call_completes_with_fewer_than_max(etcd_endpoint, run_id, handlers):
    elapsed = _timed_round_of_three(etcd_endpoint, run_id, handlers, 4, last_call_timeout=1)
    assert 1.0 <= elapsed < 4.0, elapsed


def test_max_nodes_completes_without_last_call(etcd_endpoint, run_id, handlers):
    elapsed = _timed_round_of_three(etcd_endpoint, run_id, handlers, 3, last_call_timeout=30)
    assert elapsed < 5, elapsed


def test_timeout_with_too_few_nodes_and_withdrawal(etcd_endpoint, run_id, handlers, etcd):
    handlers.append(make_handler(etcd_endpoint, run_id, 2, 2, timeout=1.5))
    start = time.monotonic()
    with pytest.raises(RendezvousTimeoutError, match=r"1\.5 s"):
        handlers[0].next_rendezvous()
    assert 1.5 <= time.monotonic() - start < 3.5
    # The timed-out node withdrew: two fresh nodes form a round without it.
    assert etcd.count(RunKeys("/rdzv", run_id).members(0)) == 0
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 2) for _ in range(2))
    assert_one_world(run_round([ThreadNode(h) for h in handlers[1:]]), 2)


def test_timeout_says_how_many_joined_and_since_when(etcd_endpoint, run_id, handlers, etcd):
    patient = make_handler(etcd_endpoint, run_id, 3, 3, timeout=60)
    handlers.append(patient)
    waiting = ThreadNode(patient).start()
    members = RunKeys("/rdzv", run_id).members(0)
    wait_for(lambda: etcd.count(members) == 1, what="the first node's join")
    handlers.append(make_handler(etcd_endpoint, run_id, 3, 3, timeout=1.5))
    before = time.strftime("%H:%M:%S", time.gmtime())
    with pytest.raises(RendezvousTimeoutError) as raised:
        handlers[-1].next_rendezvous()
    after = time.strftime("%H:%M:%S", time.gmtime())
    message = str(raised.value)
    assert "2 of the min_nodes=3 nodes needed joined round 0 (max_nodes=3)" in message, message
    since = message.split("waiting since ")[1].split()[0]
    assert before <= since <= after, message
    patient.set_closed()
    assert isinstance(waiting.join(), RendezvousClosedError)


@pytest.mark.parametrize("backend", ["etcd3", "etcd-v3", "etcd"])
def test_backend_names_rdzv_answers_to(etcd_endpoint, run_id, handlers, backend):
    handlers.append(create_rdzv_handler(
        RendezvousParameters(backend, etcd_endpoint, run_id, 1, 1, timeout=30)
    ))
    assert handlers[0].get_backend() == backend
    assert handlers[0].next_rendezvous().world_size == 1


@pytest.mark.parametrize("backend", ["etcd-v2", "c10d", "static", "ETCD3", " etcd3"])
def test_other_backend_names_are_refused_before_etcd_is_touched(etcd_endpoint, run_id, etcd,
                                                                backend):
    with pytest.raises(ValueError) as raised:
        create_rdzv_handler(RendezvousParameters(backend, etcd_endpoint, run_id, 1, 1))
    message = str(raised.value)
    assert repr(backend) in message and "'etcd3', 'etcd-v3', 'etcd'" in message, message
    assert etcd.count(RunKeys("/rdzv", run_id).run) == 0


def test_late_node_waits_and_is_admitted_next_round(etcd_endpoint, run_id, handlers):
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 3, last_call_timeout=0.5)
                    for _ in range(3))
    first, second, late = handlers
    assert_one_world(run_round([ThreadNode(first), ThreadNode(second)]), 2)
    assert first.num_nodes_waiting() == 0
    late_node = ThreadNode(late).start()
    wait_for(lambda: first.num_nodes_waiting() == 1, what="late node counted as waiting")
    assert second.num_nodes_waiting() == 1
    assert not late_node.done
    infos = [*run_round([ThreadNode(first), ThreadNode(second)]), late_node.join()]
    assert_one_world(infos, 3)


def test_surplus_node_waits_and_is_admitted(etcd_endpoint, run_id, handlers):
    handlers.extend(make_handler(etcd_endpoint, run_id, 1, 2, last_call_timeout=30)
                    for _ in range(3))
    nodes = [ThreadNode(h).start() for h in handlers]
    wait_for(lambda: sum(n.done for n in nodes) == 2, what="two of three complete")
    done = [n for n in nodes if n.done]
    surplus = next(n for n in nodes if not n.done)
    assert_one_world([n.result for n in done], 2)
    wait_for(lambda: done[0].handler.num_nodes_waiting() == 1, what="surplus counted")
    # A member leaves for good: the surplus node takes its place in the next round.
    done[0].handler.shutdown()
    handlers.remove(done[0].handler)
    survivor = ThreadNode(done[1].handler).start()
    assert_one_world([survivor.join(), surplus.join()], 2)


def test_close_before_any_round(etcd_endpoint, run_id, handlers):
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 2) for _ in range(2))
    assert not handlers[1].is_closed()
    handlers[0].set_closed()
    assert handlers[1].is_closed()
    with pytest.raises(RendezvousClosedError):
        handlers[1].next_rendezvous()
    handlers[0].set_closed()  # closing twice is fine


def test_close_wakes_waiting_nodes_and_is_terminal(etcd_endpoint, run_id, handlers):
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 2) for _ in range(3))
    assert_one_world(run_round([ThreadNode(h) for h in handlers[:2]]), 2)
    blocked = ThreadNode(handlers[2]).start()  # late: waits for a next round
    handlers[0].set_closed()
    assert isinstance(blocked.join(10), RendezvousClosedError)
    for handler in handlers:
        assert handler.is_closed()
        with pytest.raises(RendezvousClosedError):
            handler.next_rendezvous()
    late = make_handler(etcd_endpoint, run_id, 1, 1)
    handlers.append(late)
    with pytest.raises(RendezvousClosedError):
        late.next_rendezvous()


@pytest.mark.parametrize(
    "garbage", [b"", b"rdzv9 round=1", b"\x00\xff" * 10, b"rdzv1 round=3 status=joinable"]
)
def test_corrupt_state_raises_and_is_kept(etcd_endpoint, run_id, handlers, etcd, garbage):
    keys = RunKeys("/rdzv", run_id)
    etcd.put(keys.state, garbage)
    handlers.append(make_handler(etcd_endpoint, run_id, 1, 1))
    with pytest.raises(RendezvousStateError, match=keys.state.decode()):
        handlers[0].next_rendezvous()
    with pytest.raises(RendezvousStateError):
        handlers[0].set_closed()
    assert etcd.get(keys.state)[0] == garbage


def test_unreachable_endpoint_fails_fast_naming_it():
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match=r"127\.0\.0\.1:1"):
        make_handler("127.0.0.1:1", "run", 1, 1, connect_timeout=2)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"protocol": "ftp"}, "http, https"),
        ({"timeout": "soon"}, "'timeout'"),
        ({"timeout": -1}, "'timeout'"),
        ({"last_call_timeout": 0}, "'last_call_timeout'"),
        ({"lease_ttl": 1}, "'lease_ttl'"),
        ({"lease_ttl": 4, "keepalive_interval": 5}, "keepalive_interval"),
        ({"colour": "blue"}, "Unknown rendezvous option"),
        ({"etcd_prefix": "/a/../b"}, "etcd_prefix"),
        ({"cert": "c.pem"}, "cert"),
    ],
)
def test_bad_parameters_are_refused_before_any_io(config, fragment):
    # The endpoint is unreachable: a ValueError proves nothing was attempted.
    with pytest.raises(ValueError, match=fragment):
        make_handler("127.0.0.1:1", "run", 1, 1, **config)


@pytest.mark.parametrize(
    "endpoint", ["", "host:port", "host:0", "host:70000", "::1", "[::1", "a b:1", "h:1,"]
)
def test_bad_endpoints_are_refused(endpoint):
    with pytest.raises(ValueError, match="ndpoint"):
        make_handler(endpoint, "run", 1, 1)


@pytest.mark.parametrize("run_id", ["a/b", "..", "", "x" * 2000, "tab\there"])
def test_bad_run_ids_are_refused(run_id):
    with pytest.raises(ValueError, match="run id"):
        make_handler("127.0.0.1:1", run_id, 1, 1)


# ------------------------------------------------------------ nodes killed for real
def _member_count(etcd, run_id, round):
    return etcd.count(RunKeys("/rdzv", run_id).members(round))


def test_node_killed_before_round_is_never_counted(etcd_endpoint, run_id, handlers, etcd):
    doomed = ProcessNode(etcd_endpoint, run_id, 2, 3, lease_ttl=2, last_call_timeout=0.5)
    try:
        doomed.send("join")
        wait_for(lambda: _member_count(etcd, run_id, 0) == 1, what="doomed node joined")
        doomed.kill()
        wait_for(lambda: _member_count(etcd, run_id, 0) == 0, timeout=10,
                 what="dead node's key expired")
    finally:
        doomed.close()
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 3, last_call_timeout=0.5)
                    for _ in range(2))
    assert_one_world(run_round([ThreadNode(h) for h in handlers]), 2)


def test_node_killed_during_round_is_dropped_within_its_ttl(
        etcd_endpoint, run_id, handlers, etcd):
    """A member dies after joining: the round freezes with it, it never confirms,
    and the round restarts without it once its lease expires."""
    doomed = ProcessNode(etcd_endpoint, run_id, 2, 3, lease_ttl=2)
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 3, lease_ttl=2) for _ in range(3))
    try:
        doomed.send("join")
        wait_for(lambda: _member_count(etcd, run_id, 0) == 1, what="doomed node joined")
        first = ThreadNode(handlers[0]).start()
        wait_for(lambda: _member_count(etcd, run_id, 0) == 2, what="second node joined")
        doomed.kill()
        start = time.monotonic()
        second = ThreadNode(handlers[1]).start()  # the third join reaches max: freeze
        late = ThreadNode(handlers[2]).start()
        infos = [first.join(), second.join(), late.join()]
        assert time.monotonic() - start < 2 + 5
    finally:
        doomed.close()
    assert_one_world(infos, 3)


def test_node_killed_after_round_is_replaced(etcd_endpoint, run_id, handlers):
    doomed = ProcessNode(etcd_endpoint, run_id, 2, 3, lease_ttl=2, last_call_timeout=0.5)
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 3, lease_ttl=2,
                                 last_call_timeout=0.5) for _ in range(3))
    try:
        doomed.send("join")
        infos = run_round([ThreadNode(h) for h in handlers[:2]])
        ranks = [doomed.result()["rank"]] + [i.rank for i in infos]
        assert sorted(ranks) == [0, 1, 2] and {i.world_size for i in infos} == {3}
        doomed.kill()
        # A late node notices the dead member and opens the next round; the
        # survivors see it as waiting and re-join.
        late = ThreadNode(handlers[2]).start()
        wait_for(lambda: handlers[0].num_nodes_waiting() > 0, timeout=10,
                 what="survivors told about the next round")
        survivors = run_round([ThreadNode(h) for h in handlers[:2]])
        assert_one_world([*survivors, late.join()], 3)
    finally:
        doomed.close()


def test_a_call_begun_when_keep_alive_answers_are_late_keeps_its_lease(
        etcd_endpoint, run_id, handlers, monkeypatch):
    """A process too busy to read its keep-alives' answers for a TTL: its next
    calls ask etcd, which still holds the leases, and the nodes go on as the
    members they were instead of joining again as new nodes."""
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 2, lease_ttl=30) for _ in range(2))
    first = run_round([ThreadNode(h) for h in handlers])
    ids = [h.node_id for h in handlers]
    monkeypatch.setattr(etcd_rendezvous, "time", clock_ahead(31))
    second = run_round([ThreadNode(h) for h in handlers])
    monkeypatch.undo()
    assert [h.node_id for h in handlers] == ids
    assert [i.rank for i in second] == [i.rank for i in first]


def test_state_events_behind_a_lost_lease_item_reach_the_node(etcd_endpoint, run_id, handlers):
    """A lost lease's wake-up stays in the handler's inbox until its next call,
    which starts a new session; the state record's events queued behind it
    are that call's to see."""
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 2) for _ in range(2))
    first, second = handlers
    run_round([ThreadNode(h) for h in handlers])
    opener = ThreadNode(second).start()  # opens round 1

    def state_events() -> list:
        return [item for item in list(first._inbox._items) if item[0] == "state"]

    wait_for(lambda: any(b"round=1" in event[2] for item in state_events() for event in item[1]),
             what="round 1's state record in the first node's inbox")
    events = [event for item in first._inbox.drain(0) if item[0] == "state" for event in item[1]]
    first._inbox.put(("lost",))  # from a lease lost and replaced before
    first._inbox.put(("state", events))
    first._absorb()
    assert first._node.state.round == 1
    assert_one_world([ThreadNode(first).start().join(), opener.join()], 2)


def test_subprocess_nodes_agree(etcd_endpoint, run_id):
    nodes = [ProcessNode(etcd_endpoint, run_id, 4, 4) for _ in range(4)]
    try:
        for node in nodes:
            node.send("join")
        results = [node.result() for node in nodes]
    finally:
        for node in nodes:
            node.close()
    assert sorted(r["rank"] for r in results) == [0, 1, 2, 3]
    assert {r["world_size"] for r in results} == {4}


def test_close_and_shutdown_from_another_thread_wake_the_waiter(
        etcd_endpoint, run_id, handlers, etcd):
    handlers.extend(make_handler(etcd_endpoint, run_id, 3, 3) for _ in range(2))
    waiter = ThreadNode(handlers[0]).start()
    wait_for(lambda: _member_count(etcd, run_id, 0) == 1, what="node joined")
    start = time.monotonic()
    handlers[0].set_closed()  # same handler, other thread
    assert isinstance(waiter.join(10), RendezvousClosedError)
    assert time.monotonic() - start < 5

    other = make_handler(etcd_endpoint, run_id + "-2", 2, 2)
    waiter = ThreadNode(other).start()
    wait_for(lambda: _member_count(etcd, run_id + "-2", 0) == 1, what="node joined")
    assert other.shutdown() is True
    assert isinstance(waiter.join(10), RendezvousError)


def test_many_nodes_in_one_process_share_their_streams(etcd_endpoint, run_id, handlers):
    """Nodes of one process share one connection: its watch and keep-alive streams
    carry every node's watches and lease, so the process's threads do not grow
    with the number of nodes (a thousand simulated nodes stay cheap)."""
    baseline = threading.active_count()
    handlers.extend(make_handler(etcd_endpoint, run_id, 64, 64) for _ in range(64))
    infos = run_round([ThreadNode(h) for h in handlers])
    assert_one_world(infos, 64)
    # The round's own threads are gone; what is left is the connection's.
    assert threading.active_count() - baseline <= 8, [t.name for t in threading.enumerate()]


def test_the_nodes_of_a_run_in_one_process_advertise_one_port_until_a_round_completes(
        etcd_endpoint, run_id, handlers, monkeypatch):
    """Choosing a free port for MASTER_PORT is a socket bound and closed: the
    calls of a run in one process that begin together share the port one of
    them chose (only one of their nodes gets rank 0). A completed round ends
    the sharing: its rank 0's workers may have bound the port since, so the
    next round's calls choose again. Another run's calls choose their own."""
    chosen: list[int] = []

    def counted_free_port() -> int:
        chosen.append(free_port())
        return chosen[-1]

    monkeypatch.setattr(etcd_rendezvous, "free_port", counted_free_port)
    # However slowly this machine starts the threads.
    monkeypatch.setattr(etcd_rendezvous, "_PORT_SHARED_FOR", 600.0)
    other_run = f"{run_id}-other"
    handlers.extend(make_handler(etcd_endpoint, run_id, 8, 8) for _ in range(8))
    handlers.extend(make_handler(etcd_endpoint, other_run, 2, 2) for _ in range(2))
    assert len(chosen) == 2  # one for each run's nodes, as they were made
    for round_ in range(2):
        before = len(chosen)
        infos = run_round([ThreadNode(h) for h in handlers])
        assert_one_world(infos[:8], 8)
        assert_one_world(infos[8:], 2)
        # The first round's calls advertise the port chosen as their nodes
        # were made; the second's choose one for each run, once.
        fresh = chosen[before:] if round_ else chosen[:]
        assert len(fresh) == 2, chosen
        ports = {i.bootstrap_store_info.master_port for i in infos[:8]}
        other_ports = {i.bootstrap_store_info.master_port for i in infos[8:]}
        assert len(ports) == len(other_ports) == 1
        assert ports | other_ports <= set(fresh)


def test_back_to_back_rounds_of_many_runs_keep_every_member(etcd_endpoint, handlers):
    """Guarantee 1 when members ask for the next round at once: a member that
    confirmed round r and sees round r+1 open before it saw r final still
    returns round r (the record's last_final says r completed). Before, it
    joined r+1 instead, and the others timed out waiting for it later on."""
    runs, nodes, rounds = 16, 3, 10
    results: dict[tuple[int, int], list] = {}

    def node(run: int, i: int, handler) -> None:
        got = results.setdefault((run, i), [])
        for _ in range(rounds):
            try:
                info = handler.next_rendezvous()
            except Exception as err:  # the assertion below shows it
                got.append(err)
                return
            got.append((handler.round, info.rank, info.world_size))

    threads = []
    for run in range(runs):
        run_id = f"back-to-back-{uuid.uuid4()}"
        run_handlers = [make_handler(etcd_endpoint, run_id, nodes, nodes, timeout=20)
                        for _ in range(nodes)]
        handlers.extend(run_handlers)
        threads += [threading.Thread(target=node, args=(run, i, h))
                    for i, h in enumerate(run_handlers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for run in range(runs):
        sequences = [results[(run, i)] for i in range(nodes)]
        assert all(len(s) == rounds and isinstance(s[0], tuple) for s in sequences), sequences
        for per_round in zip(*sequences, strict=True):
            assert len({r for r, _, _ in per_round}) == 1, sequences
            assert sorted(rank for _, rank, _ in per_round) == list(range(nodes)), sequences
