"""Watches that feed one inbox, resuming after a broken stream without a gap."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from rdzv._mux import WatchRefused
from rdzv.client import EtcdClient

logger = logging.getLogger(__name__)


class Inbox:
    """A queue of watch events that one driver thread waits on.

    Attributes:
        listener: None, or a function called after each ``put`` (it must
            not block), for a driver that does not wait on the inbox itself.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: deque[tuple[Any, ...]] = deque()
        self.listener: Callable[[], None] | None = None

    def put(self, item: tuple[Any, ...]) -> None:
        """Add an item and wake the waiter (and call the listener)."""
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
        listener = self.listener
        if listener is not None:
            listener()

    def take(self, wanted: Callable[[tuple[Any, ...]], bool]) -> list[tuple[Any, ...]]:
        """Remove and return the queued items that ``wanted`` picks; the others
        stay queued, in order."""
        with self._cond:
            taken = [item for item in self._items if wanted(item)]
            if taken:
                self._items = deque(item for item in self._items if not wanted(item))
            return taken

    def drain(self, timeout: float | None) -> list[tuple[Any, ...]]:
        """Return every queued item, waiting up to ``timeout`` s for the first."""
        with self._cond:
            if not self._items and (timeout is None or timeout > 0):
                self._cond.wait(timeout)
            items = list(self._items)
            self._items.clear()
            return items


class Watch:
    """Watch a key or prefix from a revision and push events into an inbox.

    If the stream breaks (etcd restarted, leader changed), the watch is created
    again from the revision after the last event delivered, so nothing is lost
    and nothing is delivered twice. If etcd compacted that revision meanwhile,
    an ``("error", tag, WatchRefused)`` item goes to the inbox instead.

    Args:
        client: the etcd connection.
        key: the key, or the prefix if ``prefix``.
        start_revision: first revision to deliver (0: the next one).
        inbox: where ``(tag, events)`` items go.
        tag: first element of every item, so the driver knows the source.
        prefix: watch every key under ``key``.
        no_put: deliver deletions only.
        range_end: watch every key from ``key`` up to this one (not included).
        share: let one etcd watch serve the connection's watches of the same
            range (``EtcdClient.watch``); needs a ``start_revision`` over 0.
        start_client: the connection to create the watch on the first time,
            when that must give up sooner than ``client``'s requests (a
            ``next_rendezvous()`` call's deadline); resumes use ``client``.
    """

    def __init__(
        self,
        client: EtcdClient,
        key: bytes,
        start_revision: int,
        inbox: Inbox,
        tag: str,
        prefix: bool = False,
        no_put: bool = False,
        range_end: bytes | None = None,
        share: bool = False,
        start_client: EtcdClient | None = None,
    ) -> None:
        self._client = client
        self._key = key
        self._next_revision = start_revision
        self._inbox = inbox
        self._tag = tag
        self._prefix = prefix
        self._no_put = no_put
        self._range_end = range_end
        self._share = share
        self._lock = threading.Lock()
        self._cancelled = False
        self._watch_id: int | None = None
        self._start(start_client or client)

    def _start(self, client: EtcdClient) -> None:
        watch_id = client.watch(
            self._key,
            self._on_events,
            start_revision=self._next_revision,
            prefix=self._prefix,
            no_put=self._no_put,
            range_end=self._range_end,
            share=self._share,
        )
        with self._lock:
            if self._next_revision <= 0:
                # Started "now": a resume must go on from there, not from "now"
                # again. A watch from a revision in the past keeps it: etcd's
                # created revision is the current one, and the events between
                # the two may not have come yet.
                self._next_revision = watch_id.created_revision + 1
            cancelled = self._cancelled
            if not cancelled:
                self._watch_id = watch_id
        if cancelled:
            # Outside the lock: a shared watch hands out events under its own
            # lock, and its callback (``_on_events``) takes this one.
            self._client.cancel_watch(watch_id)

    def _on_events(self, events: Any) -> None:
        if isinstance(events, Exception):
            with self._lock:
                if self._cancelled:
                    return
                self._watch_id = None
            if isinstance(events, WatchRefused):
                # The history to resume from is compacted: resuming cannot work,
                # and would only try again and again. The driver decides.
                self._inbox.put(("error", self._tag, events))
                return
            logger.debug("watch on %r broke (%s); resuming", self._key, events)
            threading.Thread(target=self._resume, daemon=True).start()
            return
        if events:
            with self._lock:
                self._next_revision = max(self._next_revision, events[-1][3] + 1)
            self._inbox.put((self._tag, events))

    def _resume(self) -> None:
        try:
            self._start(self._client)
        except Exception as err:  # reported to the driver, which decides
            self._inbox.put(("error", self._tag, err))

    def cancel(self) -> None:
        """Stop delivering events; idempotent."""
        with self._lock:
            self._cancelled = True
            watch_id, self._watch_id = self._watch_id, None
        if watch_id is not None:
            try:
                self._client.cancel_watch(watch_id)
            except Exception as err:  # best effort: the stream may be gone
                logger.debug("cancel of watch on %r failed: %s", self._key, err)

