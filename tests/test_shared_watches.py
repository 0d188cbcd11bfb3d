"""Shared watches: the watches of one range on one connection ride on one etcd
watch, and each still gets every event from its own start revision, once, in
order; with the history the shared watch keeps exhausted, a new etcd watch
serves the late one; when the last goes, the etcd watch goes; when the stream
breaks, each resumes from where it was."""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from typing import Any

import pytest

from rdzv import _mux
from rdzv.client import EtcdClient, EtcdConfig, parse_endpoints
from rdzv.etcd_server import EtcdServer
from rdzv.watch import Inbox, Watch


def _watchers(server: EtcdServer) -> float:
    """How many watches etcd holds (its ``etcd_debugging_mvcc_watcher_total``)."""
    text = urllib.request.urlopen(server.get_metrics_url() + "/metrics", timeout=10).read()
    for line in text.decode().splitlines():
        if line.startswith("etcd_debugging_mvcc_watcher_total "):
            return float(line.split()[1])
    raise AssertionError("etcd reports no etcd_debugging_mvcc_watcher_total")


def _wait_for(condition: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.02)


class _Seen:
    """A watch callback that records the revisions it was given."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.revisions: list[int] = []
        self.errors: list[BaseException] = []

    def __call__(self, events: Any) -> None:
        with self.lock:
            if isinstance(events, Exception):
                self.errors.append(events)
            else:
                self.revisions.extend(event[3] for event in events)

    def got(self, revisions: list[int]) -> bool:
        with self.lock:
            return self.revisions == revisions


@pytest.fixture(scope="module")
def server():
    # Its own etcd: the test counts the watches etcd holds.
    with EtcdServer() as etcd:
        yield etcd


def _client(server: EtcdServer) -> EtcdClient:
    # The endpoint written twice: a connection no other client of the process uses.
    endpoint = server.get_endpoint()
    return EtcdClient(EtcdConfig(endpoints=tuple(parse_endpoints(f"{endpoint},{endpoint}"))))


def test_one_etcd_watch_serves_each_from_its_own_revision(server, monkeypatch):
    monkeypatch.setattr(_mux, "_SHARED_HISTORY", 3)
    client = _client(server)
    key = f"/rdzv-test/{uuid.uuid4()}".encode()
    try:
        base = _watchers(server)
        revs = [client.put(key, b"v%d" % i) for i in range(4)]
        first = _Seen()
        handles = [client.watch(key, first, revs[0], share=True)]
        _wait_for(lambda: first.got(revs), "the first watch got the history from its start")
        # Joins the same etcd watch: what it missed comes from the kept events.
        second = _Seen()
        handles.append(client.watch(key, second, revs[2], share=True))
        assert second.got(revs[2:])
        ahead = _Seen()
        handles.append(client.watch(key, ahead, revs[3] + 1, share=True))
        assert _watchers(server) == base + 1
        # Older than the 3 events kept: a watch of its own.
        late = _Seen()
        handles.append(client.watch(key, late, revs[0], share=True))
        _wait_for(lambda: late.got(revs), "the late watch got the history from its start")
        assert _watchers(server) == base + 2
        # Not shared: a watch of its own too.
        alone = _Seen()
        handles.append(client.watch(key, alone, revs[3]))
        assert _watchers(server) == base + 3
        more = [client.put(key, b"w%d" % i) for i in range(2)]
        for seen, want in ((first, revs + more), (second, revs[2:] + more), (ahead, more),
                           (late, revs + more), (alone, revs[3:] + more)):
            _wait_for(lambda seen=seen, want=want: seen.got(want), "every watch got its events")
        for handle in handles[:2]:
            client.cancel_watch(handle)
        # One of its three watches is left: the shared etcd watch stays.
        assert _watchers(server) == base + 3
        client.cancel_watch(handles[2])
        _wait_for(lambda: _watchers(server) == base + 2, "the shared etcd watch was cancelled")
        for handle in handles[3:]:
            client.cancel_watch(handle)
        _wait_for(lambda: _watchers(server) == base, "every etcd watch was cancelled")
        client.put(key, b"after")
        assert first.got(revs + more) and not first.errors
    finally:
        client.close()


def test_watches_that_share_resume_after_their_stream_breaks(server):
    client = _client(server)
    key = f"/rdzv-test/{uuid.uuid4()}".encode()
    try:
        start = client.put(key, b"v0")
        inboxes = [Inbox() for _ in range(3)]
        watches = [Watch(client, key, start, inbox, "k", share=True) for inbox in inboxes]
        got: list[list[int]] = [[] for _ in inboxes]

        def collect() -> bool:
            for inbox, revisions in zip(inboxes, got, strict=True):
                for item in inbox.drain(0):
                    assert item[0] == "k", item
                    revisions.extend(event[3] for event in item[1])
            return all(revisions == want for revisions in got)

        want = [start]
        _wait_for(collect, "each watch got the first event")
        # The connection's watch stream ends: each watch starts again from the
        # revision after the last it got, and they share again.
        assert client._connection.watches.close()
        want.append(client.put(key, b"v1"))
        _wait_for(collect, "each watch got the event after the break, once")
        want.append(client.put(key, b"v2"))
        _wait_for(collect, "each watch got the next event, once")
        for watch in watches:
            watch.cancel()
    finally:
        client.close()


class _Handle:
    """An etcd watch's handle, for a shared watch driven by hand."""

    created_revision = 7
    error = None

    def __init__(self) -> None:
        self.cancelled = 0

    def cancel(self) -> None:
        self.cancelled += 1


class _Mux:
    def __init__(self) -> None:
        self.forgotten: list[Any] = []

    def _forget(self, shared: Any) -> None:
        self.forgotten.append(shared)


def _event(revision: int) -> tuple[bool, bytes, bytes, int]:
    return (True, b"/k", b"v%d" % revision, revision)


def test_a_shared_watch_hands_each_subscriber_only_what_it_asked_for():
    mux = _Mux()
    shared = _mux._SharedWatch(mux, (b"/k", b"", ()), 10)
    shared.handle = _Handle()
    early, ahead = _Seen(), _Seen()
    first = shared.subscribe(early, 10)
    # A subscriber whose read was newer than what the watch has delivered yet.
    second = shared.subscribe(ahead, 13)
    shared.on_events([_event(10), _event(11)])
    shared.on_events([_event(12), _event(13), _event(14)])
    assert early.revisions == [10, 11, 12, 13, 14]
    assert ahead.revisions == [13, 14]
    assert shared.subscribe(_Seen(), 9) is None  # before the watch's start
    first.cancel()
    first.cancel()
    assert shared.handle.cancelled == 0 and not mux.forgotten
    second.cancel()
    assert shared.handle.cancelled == 1 and mux.forgotten == [shared]
    assert shared.subscribe(_Seen(), 14) is None  # it ended


def test_a_shared_watch_that_ends_tells_every_subscriber_and_takes_no_more():
    mux = _Mux()
    shared = _mux._SharedWatch(mux, (b"/k", b"", ()), 1)
    shared.handle = _Handle()
    seen = [_Seen() for _ in range(3)]
    for callback in seen:
        shared.subscribe(callback, 1)
    shared.on_events(RuntimeError("the watch stream was closed"))
    assert all(len(callback.errors) == 1 for callback in seen)
    assert mux.forgotten == [shared]
    assert shared.subscribe(_Seen(), 1) is None


def test_a_shared_watch_needs_a_start_revision(server):
    client = _client(server)
    try:
        with pytest.raises(ValueError, match="start revision over 0"):
            client.watch(b"/rdzv-test/k", _Seen(), 0, share=True)
    finally:
        client.close()
