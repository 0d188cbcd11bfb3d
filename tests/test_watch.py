"""A watch resumes after a broken stream from the revision after the last event
it delivered: from its start if it delivered none, even though etcd created it
at a later revision, and after etcd's created revision if it started "now"."""

from __future__ import annotations

import threading
from typing import Any

from rdzv.watch import Inbox, Watch


class _Handle:
    def __init__(self, created_revision: int) -> None:
        self.created_revision = created_revision

    def cancel(self) -> None:
        pass


class _Client:
    """Records each watch's start revision; etcd is at revision 50."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.callbacks: list[Any] = []
        self.resumed = threading.Event()

    def watch(self, key: bytes, callback: Any, start_revision: int, **_options: Any) -> _Handle:
        self.starts.append(start_revision)
        self.callbacks.append(callback)
        if len(self.starts) > 1:
            self.resumed.set()
        return _Handle(50)

    def cancel_watch(self, handle: _Handle) -> None:
        handle.cancel()


def _resumed_from(start: int, delivered: list[int]) -> int:
    client = _Client()
    watch = Watch(client, b"/k", start, Inbox(), "k")
    if delivered:
        client.callbacks[-1]([(True, b"/k", b"v", revision) for revision in delivered])
    client.callbacks[-1](RuntimeError("the watch stream was closed"))
    assert client.resumed.wait(10), "the watch did not resume"
    watch.cancel()
    return client.starts[1]


def test_a_watch_from_the_past_resumes_from_its_start_not_from_etcds_revision():
    # Created at revision 50 from revision 10: nothing from 10 to 50 came yet.
    assert _resumed_from(10, []) == 10
    assert _resumed_from(10, [12, 20]) == 21


def test_a_watch_from_now_resumes_after_etcds_revision():
    assert _resumed_from(0, []) == 51
    assert _resumed_from(0, [55]) == 56


def test_an_inbox_gives_up_the_items_asked_for_and_keeps_the_others_in_order():
    inbox = Inbox()
    for item in [("state", 1), ("error", "state"), ("round", 2), ("error", "round"), ("state", 3)]:
        inbox.put(item)
    assert inbox.take(lambda item: item[0] == "error") == [("error", "state"), ("error", "round")]
    assert inbox.take(lambda item: item[0] == "error") == []
    assert inbox.drain(0) == [("state", 1), ("round", 2), ("state", 3)]
