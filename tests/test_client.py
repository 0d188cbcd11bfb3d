"""The client's retry policy and its shared connection: a client under another
policy stays one client for closing, a bounded policy gives up at its horizon,
a keep-alive stream with nothing to answer is left open, and a closed
connection leaves no thread behind."""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest

from helpers import wait_for
from rdzv._mux import KeepAliveHub
from rdzv.api import RendezvousConnectionError
from rdzv.client import EtcdClient, EtcdConfig, LeaseLostError, parse_endpoints
from rdzv.retry import RetryPolicy


def _config(endpoint: str, connect_timeout: float = 5.0) -> EtcdConfig:
    return EtcdConfig(endpoints=tuple(parse_endpoints(endpoint)), connect_timeout=connect_timeout)


def test_no_close_releases_a_shared_connection_twice(etcd_endpoint: str) -> None:
    key = f"/rdzv-test/{uuid.uuid4()}".encode()
    # The endpoint written twice: a configuration no other client of this
    # process has, so that these two are the connection's only users.
    endpoint = f"{etcd_endpoint},{etcd_endpoint}"
    first = EtcdClient(_config(endpoint))
    other = EtcdClient(_config(endpoint))  # the same connection, a use of its own
    assert other.etcd3 is first.etcd3
    bounded = first.with_retry(first.retry.bounded(lambda: time.monotonic() + 60))
    assert bounded.etcd3 is first.etcd3 and bounded.retry is not first.retry
    bounded.put(key, b"v")
    for client in (bounded, first, bounded, first):  # each, twice, in any order
        client.close()
    # The other client's use is still there: the connection is open.
    assert other.get(key)[0] == b"v"
    assert other.delete(key) == 1
    last = other.with_retry(RetryPolicy(connect_timeout=1.0))
    other.close()
    # The last use is gone, and with it the connection: neither client can send.
    with pytest.raises(ValueError, match="closed channel"):
        last.etcd3.channel.unary_unary("/etcdserverpb.KV/Range")(b"", timeout=1)


def test_a_bounded_client_gives_up_at_its_horizon() -> None:
    # Nothing listens on port 1: every attempt fails at once and is retried.
    client = EtcdClient(_config("127.0.0.1:1", connect_timeout=30.0))
    try:
        bounded = client.with_retry(client.retry.bounded(lambda: start + 0.3))
        start = time.monotonic()
        with pytest.raises(LeaseLostError, match="presumably expired"):
            bounded.get(b"/k")
        assert time.monotonic() - start < 3  # not connect_timeout's 30 s
        quick = client.with_retry(RetryPolicy(connect_timeout=0.3))
        start = time.monotonic()
        with pytest.raises(RendezvousConnectionError, match="cannot reach etcd"):
            quick.get(b"/k")
        assert time.monotonic() - start < 3
    finally:
        client.close()


def test_the_clients_of_one_connection_look_for_tls_once(monkeypatch) -> None:
    # A plain-http client whose requests fail checks once whether the endpoint
    # serves TLS, to say so. Under load every client of a process may fail at
    # once: they share the connection, and so the check.
    probes = []
    connect = socket.create_connection

    def probe(address, *args, **kwargs):
        probes.append(address)
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", probe)
    clients = [EtcdClient(_config("127.0.0.1:1", connect_timeout=0.3)) for _ in range(4)]
    try:
        clients.append(clients[0].with_retry(RetryPolicy(connect_timeout=0.3)))
        for client in clients:
            with pytest.raises(RendezvousConnectionError, match="cannot reach etcd"):
                client.get(b"/k")
        assert probes == [("127.0.0.1", 1)]
    finally:
        for client in clients:
            client.close()


def test_an_idle_keep_alive_stream_is_not_taken_for_a_hung_one(
    etcd_endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A configuration of its own: this test's connection and keep-alive stream.
    client = EtcdClient(_config(f"{etcd_endpoint},{etcd_endpoint}"))
    answered: list[threading.Event] = []

    def keep(ttl: int) -> int:
        lease_id = client.lease_grant(ttl)
        event = threading.Event()
        answered.append(event)
        client.keep_alive(lease_id, ttl, ttl, threading.Event(),
                          lambda left: left > 0 and event.set(), lambda: None)
        assert event.wait(10), "etcd did not answer the first keep-alive"
        return lease_id

    try:
        with caplog.at_level(logging.DEBUG, logger="rdzv._mux"):
            first = keep(2)
            client.stop_keep_alive(first)
            # The stream now has nothing to answer for longer than half the
            # next lease's TTL: quiet, not hung.
            time.sleep(1.5)
            keep(2)
        assert "answered nothing" not in caplog.text
        assert "keep-alive stream broke" not in caplog.text
    finally:
        client.close()


def test_keep_alives_due_close_together_go_out_together(
    etcd_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process of many leases, kept alive one by one on their own beats,
    # would wake the keep-alive threads once per lease. A lease whose
    # keep-alive is due soon goes with those due now, and keeps their beat.
    sends: list[list[int]] = []
    sent = threading.Condition()
    send = KeepAliveHub._send

    def spy(hub: KeepAliveHub, lease_ids: list[int]) -> None:
        with sent:
            sends.append(list(lease_ids))
            sent.notify_all()
        send(hub, lease_ids)

    def wait_for(predicate: Any) -> None:
        with sent:
            assert sent.wait_for(predicate, timeout=20), sends

    monkeypatch.setattr(KeepAliveHub, "_send", spy)
    client = EtcdClient(_config(f"{etcd_endpoint},{etcd_endpoint}"))
    interval = 1.0
    try:
        first = client.lease_grant(30)
        client.keep_alive(first, 30, interval, threading.Event(), lambda ttl: None, lambda: None)
        wait_for(lambda: any(first in s for s in sends))
        # Registered after the first's keep-alive went out: due a moment after it.
        second = client.lease_grant(30)
        client.keep_alive(second, 30, interval, threading.Event(), lambda ttl: None,
                          lambda: None)
        wait_for(lambda: sum(first in s for s in sends) == 2)
        together = [s for s in sends if first in s][1]
        assert second in together, sends
        wait_for(lambda: sum(first in s for s in sends) == 3)
        # And the beat holds: the next ones go out together again.
        assert sorted([s for s in sends if first in s][2]) == sorted([first, second]), sends
    finally:
        client.close()


# The protobuf messages a KeepAliveHub makes and reads, as plain records.
_RPC = SimpleNamespace(LeaseKeepAliveRequest=lambda ID: SimpleNamespace(ID=ID),
                       LeaseTimeToLiveRequest=lambda ID: SimpleNamespace(ID=ID))


class _KeepAliveStream:
    """A LeaseKeepAlive stream that answers only the leases in ``answered``,
    reading its requests with a thread of its own, as gRPC's does."""

    def __init__(self, requests: Any, answered: set[int], sent: list[int],
                 cond: threading.Condition) -> None:
        self._answers: queue.Queue = queue.Queue()

        def read() -> None:
            for request in requests:
                with cond:
                    sent.append(request.ID)
                    cond.notify_all()
                if request.ID in answered:
                    self._answers.put(SimpleNamespace(ID=request.ID, TTL=30))
            self._answers.put(None)

        threading.Thread(target=read, daemon=True).start()

    def __iter__(self) -> Any:
        while (answer := self._answers.get()) is not None:
            yield answer

    def cancel(self) -> None:
        self._answers.put(None)


def test_a_lease_whose_keep_alive_is_unanswered_gets_no_other() -> None:
    # A process too loaded to send its keep-alives as fast as they fall due
    # must not queue a lease's next one behind the last: the stream is
    # answered in order, so it could only renew the lease later still, and
    # the queue would grow until every lease lapsed.
    sent: list[int] = []
    cond = threading.Condition()

    class Stub:
        def LeaseKeepAlive(self, requests: Any, metadata: Any = None) -> Any:
            return _KeepAliveStream(requests, {2}, sent, cond)

    hub = KeepAliveHub(Stub(), _RPC, lambda: None)
    try:
        for lease_id in (1, 2):
            hub.add(lease_id, 30.0, 0.05, threading.Event(), lambda ttl: None, lambda: None)
        with cond:
            assert cond.wait_for(lambda: sent.count(2) >= 10, timeout=20), sent
        # Ten beats: lease 2, answered each time, went each time; lease 1,
        # whose answer never came, went once.
        assert sent.count(1) == 1, sent
    finally:
        hub.close()


class _TimeToLive:
    """etcd's LeaseTimeToLive as a KeepAliveHub calls it: each request answered
    at once with ``left`` (seconds; -1: no such lease), or failing when
    ``left`` is an exception."""

    def __init__(self, left: Any, cond: threading.Condition) -> None:
        self.left = left
        self.asked: list[int] = []
        self._cond = cond

    def future(self, request: Any, timeout: float, metadata: Any = None) -> Future:
        with self._cond:
            self.asked.append(request.ID)
            self._cond.notify_all()
        answer: Future = Future()
        if isinstance(self.left, BaseException):
            answer.set_exception(self.left)
        else:
            answer.set_result(SimpleNamespace(ID=request.ID, TTL=self.left))
        return answer


def _unanswered_hub(time_to_live: _TimeToLive, sent: list[int],
                    cond: threading.Condition) -> KeepAliveHub:
    """A hub whose keep-alive stream answers nothing, and whose etcd tells a
    lease's TTL as ``time_to_live`` says."""

    class Stub:
        LeaseTimeToLive = time_to_live

        def LeaseKeepAlive(self, requests: Any, metadata: Any = None) -> Any:
            return _KeepAliveStream(requests, set(), sent, cond)

    return KeepAliveHub(Stub(), _RPC, lambda: None)


def test_a_lease_unanswered_for_its_ttl_lives_on_while_etcd_has_it() -> None:
    # Keep-alive answers that are late (a stream stalled one way, a process
    # starved of CPU) must not end the nodes of a lease that etcd still holds:
    # etcd is asked before the lease is given up, and only its word ends it.
    cond = threading.Condition()
    sent: list[int] = []
    time_to_live = _TimeToLive(5, cond)
    answers: list[int] = []
    silent = threading.Event()

    def answered(ttl: int) -> None:
        with cond:
            answers.append(ttl)
            cond.notify_all()

    hub = _unanswered_hub(time_to_live, sent, cond)
    try:
        added = time.monotonic()
        lease = hub.add(7, 0.3, 0.05, threading.Event(), answered, silent.set)
        with cond:
            # Three TTLs without an answer on the stream: etcd was asked each time.
            assert cond.wait_for(lambda: len(time_to_live.asked) >= 3, timeout=20)
        assert not silent.is_set() and answers == []
        # Renewed, as etcd said, past the TTL its registration gave it.
        assert lease.last_answer > added + 0.3
        time_to_live.left = -1
        with cond:
            assert cond.wait_for(lambda: answers == [-1], timeout=20), answers
        assert not silent.is_set()
        # Dropped: etcd is not asked about it again. (Another lease of the
        # same beat, unanswered for its TTL in turn, marks the time: a TTL
        # after which the first would have been asked about again.)
        with cond:
            asked = len(time_to_live.asked)
        hub.add(8, 0.3, 0.05, threading.Event(), lambda ttl: None, lambda: None)
        with cond:
            assert cond.wait_for(lambda: 8 in time_to_live.asked, timeout=20)
            assert 7 not in time_to_live.asked[asked:], time_to_live.asked
    finally:
        hub.close()


def test_a_lease_unanswered_for_its_ttl_is_silent_when_etcd_cannot_say() -> None:
    cond = threading.Condition()
    sent: list[int] = []
    time_to_live = _TimeToLive(RuntimeError("deadline exceeded"), cond)
    silent = threading.Event()
    hub = _unanswered_hub(time_to_live, sent, cond)
    try:
        hub.add(7, 0.3, 0.05, threading.Event(), lambda ttl: None, silent.set)
        assert silent.wait(20), "the lease was never reported silent"
        assert time_to_live.asked == [7]
    finally:
        hub.close()


def test_close_waits_for_a_sending_thread_that_has_not_started_yet() -> None:
    # gRPC starts a stream's sending thread with the call; a stream closed at
    # once may be closed before that thread asked for its first request. It
    # still takes a lock of the call on its way out, so close() must wait for
    # it too, or an exit right after close() can hang in gRPC's clean-up.
    opened = threading.Event()
    senders: list[threading.Thread] = []

    class SlowSender:
        def __init__(self, requests: Any) -> None:
            self._cancelled = threading.Event()

            def send() -> None:
                self._cancelled.wait(10)
                time.sleep(0.2)  # a thread slow to be scheduled, not a wait
                for _request in requests:
                    pass

            senders.append(threading.Thread(target=send, daemon=True))
            senders[-1].start()

        def __iter__(self) -> Any:
            self._cancelled.wait(10)
            return iter(())

        def cancel(self) -> None:
            self._cancelled.set()

    class Stub:
        def LeaseKeepAlive(self, requests: Any, metadata: Any = None) -> Any:
            stream = SlowSender(requests)
            opened.set()
            return stream

    hub = KeepAliveHub(Stub(), _RPC, lambda: None)
    hub.add(1, 30.0, 10.0, threading.Event(), lambda ttl: None, lambda: None)
    assert opened.wait(10), "the hub opened no stream"
    assert hub.close()
    assert not senders[0].is_alive(), "close() returned before the stream's sender ended"


def test_a_closed_connection_leaves_none_of_its_threads_running(
        etcd_endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    # A process that exits (or forks) while a stream's thread is still on its
    # way out may keep that thread's lock of a gRPC call held for good; gRPC's
    # clean-up of the call at exit then waits on it forever. So close() returns
    # only once the streams' threads, gRPC's senders among them, have ended,
    # and gRPC has finished the channel's calls (else it logs a warning). The
    # thread gRPC polls them from ends just after its last call: it is given a
    # moment.
    caplog.set_level(logging.WARNING, logger="rdzv.client")
    config = _config(f"{etcd_endpoint},{etcd_endpoint}")
    for _ in range(5):
        before = set(threading.enumerate())
        client = EtcdClient(config)
        answered = threading.Event()
        watch = client.watch(f"/rdzv-test/{uuid.uuid4()}".encode(), lambda _events: None, 0)
        lease_id = client.lease_grant(5)
        client.keep_alive(lease_id, 5, 1, threading.Event(),
                          lambda ttl, answered=answered: ttl > 0 and answered.set(),
                          lambda: None)
        assert answered.wait(10), "etcd did not answer the first keep-alive"
        assert watch.created.is_set()
        client.lease_revoke(lease_id)
        client.close()
        assert not caplog.records, [r.getMessage() for r in caplog.records]
        left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
        assert not [t.name for t in left if t.name.startswith("rdzv-")]
        wait_for(lambda left=left: not any(t.is_alive() for t in left), timeout=2,
                 what=f"gRPC's threads of the closed channel ended: {[t.name for t in left]}")


def test_a_nested_transaction_decides_on_what_etcd_held_before_it(etcd_endpoint: str) -> None:
    # The first of two identical transactions takes the key; the second finds it
    # taken and reads who holds it. Both put their own key.
    client = EtcdClient(_config(etcd_endpoint))
    prefix = f"/rdzv-test/{uuid.uuid4()}/".encode()
    counter = prefix + b"counter"

    def join(name: bytes) -> tuple[bool, list]:
        ok, _revision, results = client.txn([], [
            ("put", prefix + b"m/" + name, b"", 0),
            ("txn", [("create", counter, 0)], [("put", counter, name, 0),
                                              ("count", prefix + b"m/")], [("get", counter)]),
        ])
        assert ok
        return results[1]

    try:
        assert join(b"a") == (True, [None, 1])
        took, (held,) = join(b"b")
        assert not took and held[0] == b"a"
        assert client.count(prefix + b"m/") == 2
    finally:
        client.delete(prefix, prefix=True)
        client.close()
