"""One watch stream and one keep-alive stream per connection, shared by every
watch and every lease of the process that uses it.

gRPC's synchronous API reads a stream with a thread that wakes ten times a
second while it waits. One stream per watch and per lease meant a few such
threads per node: a thousand nodes in one process (a benchmark, a simulator)
spent most of a core on them and let their leases lapse. etcd multiplexes
watches on one stream (by watch id) and keep-alives on one stream (by lease
id), so a connection needs only one of each, whatever the number of nodes.
Watches of the same range may also share one etcd watch (``_SharedWatch``),
so that etcd sends each event to the process once.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds a closing connection waits for its streams' threads, which end
#: within one gRPC poll.
_THREAD_EXIT_TIMEOUT = 2.0

#: How early, as a share of its interval, a lease's keep-alive may go out
#: with others that are due.
_EARLY = 0.25

#: Events a shared watch keeps for subscribers that start from a revision it
#: has already delivered (see ``_SharedWatch``).
_SHARED_HISTORY = 256

#: What a watch's callback gets: a list of ``(is_put, key, value, mod_revision)``
#: or the exception that ended the watch.
WatchCallback = Callable[[Any], None]


class _Requests:
    """What a stream sends, in order, until ``end()``.

    gRPC sends a stream's requests from a thread of its own, which takes the
    call's lock around each one. A process that exits, or forks, while that
    thread is still on its way out can be left with the lock held for good,
    and gRPC's clean-up of the call then waits on it forever; ``sender()`` is
    that thread, for the stream's owner to wait for (``_join``).
    """

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._sender: threading.Thread | None = None
        self._started = threading.Event()

    def put(self, request: Any) -> None:
        self._queue.put(request)

    def end(self) -> None:
        self._queue.put(None)

    def sender(self, deadline: float) -> threading.Thread | None:
        """gRPC's sending thread. gRPC starts it with the call and it asks for
        a request first thing, even from a call cancelled at once; one that has
        not asked yet is waited for up to ``deadline``."""
        self._started.wait(max(0.0, deadline - time.monotonic()))
        return self._sender

    def drain(self) -> Iterator[Any]:
        """The request iterator to give gRPC (run by its sending thread)."""
        self._sender = threading.current_thread()
        self._started.set()
        while True:
            item = self._queue.get()
            if item is None:
                return
            yield item


def _join(threads: Iterable[threading.Thread | _Requests | None], deadline: float) -> bool:
    """Wait until ``threads`` ended, up to ``deadline``; whether they did.

    A stream's ``_Requests`` stands for its sending thread. None and the
    calling thread are skipped."""
    for thread in threads:
        if isinstance(thread, _Requests):
            thread = thread.sender(deadline)
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return False
    return True


# ========================================================================= forks
class ForkGate:
    """Keeps a process's etcd requests and stream openings out of gRPC while it forks.

    gRPC's poller keeps process-wide state (which thread polls, who waits). A
    child forked while a thread of its parent polls inherits that state half
    way, and gRPC may abort in the child the first time it polls
    (``ev_epoll1_linux.cc ... g_active_poller``). Every request and every stream
    opening passes the gate; before a fork, ``close()`` stops new ones and
    waits for those inside to finish, and the connections then close their
    streams (see ``rdzv.client``); ``open()`` lets everything go on afterwards.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._inside = 0
        self._closed = False

    def __enter__(self) -> None:
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._inside += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._inside -= 1
            self._cond.notify_all()

    def close(self, wait: float) -> bool:
        """Let nothing new in; wait up to ``wait`` s for what is inside.

        Returns:
            Whether everything inside finished in time.
        """
        deadline = time.monotonic() + wait
        with self._cond:
            self._closed = True
            while self._inside:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def open(self) -> None:
        """Let requests in again."""
        with self._cond:
            self._closed = False
            self._cond.notify_all()


#: The process's gate (a forked child gets a fresh one).
fork_gate = ForkGate()


def _reset_fork_gate() -> None:
    global fork_gate
    fork_gate = ForkGate()


os.register_at_fork(after_in_child=_reset_fork_gate)


# ====================================================================== watches
class WatchRefused(RuntimeError):
    """etcd refused a watch: no permission, or its start revision was compacted
    (when it was created, or right after)."""


class WatchHandle:
    """One watch on a shared stream; ``cancel()`` ends it."""

    def __init__(self, stream: _WatchStream, callback: WatchCallback) -> None:
        self._stream = stream
        self.callback = callback
        self.watch_id: int | None = None
        #: etcd's revision when it created the watch (a watch from revision 0
        #: starts right after it).
        self.created_revision = 0
        self.created = threading.Event()
        self.error: BaseException | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Stop the watch; idempotent. A callback already under way may finish."""
        self._stream.cancel(self)


class _WatchStream:
    """One etcd Watch stream carrying many watches, read by one thread."""

    def __init__(self, stub: Any, rpc: Any, metadata: Any) -> None:
        self._rpc = rpc
        self._lock = threading.Lock()
        self._requests = _Requests()
        self._pending: deque[WatchHandle] = deque()  # creates not yet answered, in order
        self._active: dict[int, WatchHandle] = {}
        self.broken = False
        self.metadata = metadata
        self._retiring = False
        #: What ended the stream.
        self.error: BaseException | None = None
        self._call = stub.Watch(self._requests.drain(), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="rdzv-watches", daemon=True)
        self._reader.start()

    def create(self, request: Any, callback: WatchCallback) -> WatchHandle:
        """Send a create request; its handle's ``created`` is set on the answer.

        Raises:
            Exception: what ended the stream (RuntimeError if it ended cleanly).
        """
        handle = WatchHandle(self, callback)
        with self._lock:
            if self.broken:  # its reader is gone: nobody would answer
                raise self.error or RuntimeError("the watch stream ended")
            # etcd answers the creates of a stream in the order it got them.
            self._pending.append(handle)
            self._requests.put(self._rpc.WatchRequest(create_request=request))
        return handle

    def cancel(self, handle: WatchHandle) -> None:
        with self._lock:
            if handle.cancelled:
                return
            handle.cancelled = True
            if handle.watch_id is not None and self._active.pop(handle.watch_id, None):
                self._send_cancel(handle.watch_id)
            # A create still pending is cancelled when its answer comes.
            idle = self._retiring and not self._active and not self._pending
        if idle:
            self.close()

    def retire(self) -> None:
        """Take no new watches; close once the last one is cancelled."""
        with self._lock:
            self._retiring = True
            idle = not self._active and not self._pending
        if idle:
            self.close()

    def _send_cancel(self, watch_id: int) -> None:
        if not self.broken:
            request = self._rpc.WatchCancelRequest(watch_id=watch_id)
            self._requests.put(self._rpc.WatchRequest(cancel_request=request))

    def close(self) -> None:
        with self._lock:
            self.broken = True
        self._requests.end()
        self._call.cancel()

    def join(self, deadline: float) -> bool:
        """Wait for the closed stream's threads to end, up to ``deadline``."""
        return _join((self._reader, self._requests), deadline)

    def _read(self) -> None:
        try:
            for response in self._call:
                self._dispatch(response)
            error: BaseException = RuntimeError("etcd ended the watch stream")
        except Exception as err:  # grpc.RpcError, or a closed channel
            # Closed here (a fork, a new auth token, the connection's end): the
            # watches on it start again on another stream.
            error = RuntimeError("the watch stream was closed") if self.broken else err
        with self._lock:
            self.broken = True
            self.error = error
            pending, self._pending = list(self._pending), deque()
            active, self._active = list(self._active.values()), {}
        self._requests.end()
        for handle in pending:
            handle.error = error
            handle.created.set()
        for handle in active:
            if not handle.cancelled:
                handle.callback(error)

    def _dispatch(self, response: Any) -> None:
        if response.created:
            with self._lock:
                handle = self._pending.popleft() if self._pending else None
                if handle is None:
                    return
                if response.canceled or response.compact_revision:
                    handle.error = WatchRefused(
                        f"etcd refused the watch: {response.cancel_reason or 'canceled'}"
                        + (f" (compacted at revision {response.compact_revision})"
                           if response.compact_revision else "")
                    )
                else:
                    handle.watch_id = response.watch_id
                    handle.created_revision = response.header.revision
                    if handle.cancelled:
                        self._send_cancel(response.watch_id)
                    else:
                        self._active[response.watch_id] = handle
            handle.created.set()
            return
        if response.canceled:
            with self._lock:
                handle = self._active.pop(response.watch_id, None)
            if handle is not None:
                # Compacted history cannot be watched again from the same revision.
                error = WatchRefused if response.compact_revision else RuntimeError
                handle.callback(error(
                    f"watch canceled by etcd: {response.cancel_reason or 'no reason given'}"
                    + (f" (start revision compacted, now {response.compact_revision})"
                       if response.compact_revision else "")
                ))
            return
        if response.events:
            with self._lock:
                handle = self._active.get(response.watch_id)
            if handle is not None and not handle.cancelled:
                handle.callback([
                    (e.type == 0, e.kv.key, e.kv.value, e.kv.mod_revision)
                    for e in response.events
                ])


class _SharedWatch:
    """One etcd watch whose events go to every subscriber that asked for the
    same range from a revision it still holds.

    It keeps the last ``_SHARED_HISTORY`` events it delivered, so that a
    subscriber starting from revision S gets every event from S once: those
    already delivered from the history, the rest as they come. Events reach
    subscribers under the watch's lock, in order, history before live, all
    of them at once: callbacks that wake a thread each would wake them all
    together, which a process of thousands of waiting threads cannot afford.
    """

    def __init__(self, mux: WatchMux, key: tuple[Any, ...], start: int) -> None:
        self._mux = mux
        self._key = key
        self._lock = threading.Lock()
        self._subscribers: dict[_Subscriber, None] = {}
        self._history: deque[tuple[Any, ...]] = deque()
        #: The first revision the history holds every event from.
        self._covered_from = start
        self.ended = False
        self.handle: WatchHandle | None = None

    def subscribe(self, callback: WatchCallback, start: int) -> _Subscriber | None:
        """Add a subscriber from revision ``start``; None if the watch cannot
        serve it (it ended, or no longer holds what came from ``start``)."""
        with self._lock:
            refused = self.handle is not None and self.handle.error is not None
            if self.ended or refused or start < self._covered_from:
                return None
            subscriber = _Subscriber(self, callback, start)
            missed = [event for event in self._history if event[3] >= start]
            if missed:
                callback(missed)
            self._subscribers[subscriber] = None
        return subscriber

    def unsubscribe(self, subscriber: _Subscriber) -> None:
        with self._lock:
            self._subscribers.pop(subscriber, None)
            if self._subscribers or self.ended:
                return
            self.ended = True
        self._mux._forget(self)
        if self.handle is not None:
            self.handle.cancel()

    def end(self) -> None:
        """Take no more subscribers (its etcd watch failed or was refused)."""
        with self._lock:
            self.ended = True
        self._mux._forget(self)

    def on_events(self, events: Any) -> None:
        """The etcd watch's callback: hand the events (or its end) to all."""
        if isinstance(events, Exception):
            with self._lock:
                self.ended = True
                subscribers, self._subscribers = list(self._subscribers), {}
            self._mux._forget(self)
            for subscriber in subscribers:
                subscriber.callback(events)
            return
        with self._lock:
            history = self._history
            history.extend(events)
            while len(history) > _SHARED_HISTORY:
                self._covered_from = history.popleft()[3] + 1
            first = events[0][3]
            for subscriber in self._subscribers:
                if first >= subscriber.start:
                    subscriber.callback(events)
                else:
                    # It started after what the watch is delivering now.
                    wanted = [event for event in events if event[3] >= subscriber.start]
                    if wanted:
                        subscriber.callback(wanted)


class _Subscriber:
    """A watch served by a ``_SharedWatch``; ``cancel()`` ends it."""

    def __init__(self, shared: _SharedWatch, callback: WatchCallback, start: int) -> None:
        self._shared = shared
        self.callback = callback
        #: The first revision it wants.
        self.start = start

    @property
    def created_revision(self) -> int:
        handle = self._shared.handle
        return 0 if handle is None else handle.created_revision

    def cancel(self) -> None:
        """Stop the watch; idempotent."""
        self._shared.unsubscribe(self)


class WatchMux:
    """The watches of one connection, on one stream (a new one after a break)."""

    def __init__(self, stub: Any, rpc: Any) -> None:
        self._stub = stub
        self._rpc = rpc
        self._lock = threading.Lock()
        self._stream: _WatchStream | None = None
        self._shared: dict[tuple[Any, ...], list[_SharedWatch]] = {}

    def _current_stream(self, metadata: Any) -> _WatchStream:
        old = self._stream
        if old is None or old.broken or old.metadata != metadata:
            # etcd checks a watch's auth token when it is created, with the
            # one its stream was opened with: a renewed token needs a new
            # stream. The old one serves its watches until they end.
            self._stream = _WatchStream(self._stub, self._rpc, metadata)
            if old is not None and not old.broken:
                old.retire()
            self._shared.clear()
        return self._stream

    def watch(self, request: Any, callback: WatchCallback, wait: float,
              metadata: Any, share: bool = False) -> WatchHandle | _Subscriber:
        """Create a watch; wait up to ``wait`` s for etcd to confirm it.

        With ``share``, a watch of the same range with the same filters that
        started at or before ``request.start_revision`` (which must then be
        over 0) serves this one too, so that etcd sends each event to this
        connection once, however many of its watches want it.

        Raises:
            TimeoutError: etcd did not confirm it in time (the watch is dropped).
            WatchRefused: etcd refused it.
            Exception: what broke the stream (grpc.RpcError).
        """
        if share and request.start_revision <= 0:
            raise ValueError("a shared watch needs a start revision over 0")
        with fork_gate, self._lock:
            stream = self._current_stream(metadata)
            if not share:
                handle = stream.create(request, callback)
                waited: Any = handle
            else:
                key = (request.key, request.range_end, tuple(request.filters))
                handle = None
                for shared in self._shared.get(key, ()):
                    handle = shared.subscribe(callback, request.start_revision)
                    if handle is not None:
                        break
                else:
                    shared = _SharedWatch(self, key, request.start_revision)
                    shared.handle = stream.create(request, shared.on_events)
                    handle = shared.subscribe(callback, request.start_revision)
                    self._shared.setdefault(key, []).append(shared)
                waited = shared.handle
        if not waited.created.wait(wait):
            handle.cancel()
            raise TimeoutError(f"etcd did not confirm the watch within {wait:g} s")
        if waited.error is not None:
            if share:
                shared.end()
            raise waited.error
        return handle

    def _forget(self, shared: _SharedWatch) -> None:
        with self._lock:
            group = self._shared.get(shared._key)
            if group is not None and shared in group:
                group.remove(shared)
                if not group:
                    del self._shared[shared._key]

    def close(self, deadline: float | None = None) -> bool:
        """Close the stream (the next watch opens another); wait for its
        threads up to ``deadline`` (``time.monotonic()``; default: a moment).

        Returns:
            Whether its threads ended in time.
        """
        if deadline is None:
            deadline = time.monotonic() + _THREAD_EXIT_TIMEOUT
        with self._lock:
            stream, self._stream = self._stream, None
            self._shared.clear()
        if stream is None:
            return True
        stream.close()
        return stream.join(deadline)


# =================================================================== keep-alives
class KeptLease:
    """One lease kept alive by the hub; ``last_answer`` is the ``time.monotonic()``
    time of its last answer with a positive TTL (or of its registration, or
    the time etcd last renewed it, by its answer to a TTL request), and
    ``pending`` whether a keep-alive of it awaits its answer on the stream."""

    def __init__(self, lease_id: int, ttl: float, interval: float, stop: threading.Event,
                 answered: Callable[[int], None], silent: Callable[[], None]) -> None:
        self.lease_id = lease_id
        self.ttl = ttl
        self.interval = interval
        self.stop = stop
        self.answered = answered
        self.silent = silent
        self.last_answer = time.monotonic()
        self.pending = False
        self.asking = False  # whether etcd was asked for its TTL and has not answered

    def renewed(self, asked: float, left: int) -> None:
        """Etcd, asked at ``asked``, said the lease has ``left`` seconds (> 0):
        it was renewed when it had its whole TTL left, and no later than when
        etcd was asked (etcd may have granted more than was asked for)."""
        self.last_answer = max(self.last_answer, asked - max(0.0, self.ttl - left))


def _ttl_left(lease: KeptLease, future: Any) -> int | None:
    """The seconds etcd's answer to a TTL request says ``lease`` has left
    (-1: gone), or None if etcd did not answer."""
    try:
        return future.result().TTL
    except Exception as err:  # unreachable, timed out
        logger.debug("lease %x: etcd did not tell its TTL: %s", lease.lease_id, err)
        return None


class KeepAliveHub:
    """Keep-alives of every lease of one connection, on one LeaseKeepAlive stream.

    A scheduler thread sends each lease's keep-alive every ``interval``
    seconds; a reader thread hands each answer to its lease. A stream that
    breaks, or that answers nothing for half the shortest TTL while keep-alives
    are due, is replaced.

    A lease with no answer for its whole TTL is not given up at once: etcd is
    asked how long it has left (one LeaseTimeToLive request). Answers that
    were late, not lost (a stream that stalled one way, or this process's
    threads starved of CPU while etcd renewed the lease), would otherwise end
    every node on a lease etcd still holds. If etcd still has it, it counts as
    renewed when etcd last renewed it; if etcd no longer has it, its
    ``answered`` gets the TTL etcd gave (-1); if etcd cannot say within one
    keep-alive interval, the lease is reported silent (and dropped).

    A lease whose last keep-alive is still unanswered gets no other on the same
    stream: the stream is answered in order, so a second could only renew the
    lease after the first, and a process too loaded to keep up would queue
    keep-alives faster than it sends them, each behind the rest, until its
    leases lapsed. Then each lease waits in the queue at most once.
    """

    def __init__(self, stub: Any, rpc: Any, metadata: Callable[[], Any]) -> None:
        self._stub = stub
        self._rpc = rpc
        self._metadata = metadata
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, KeptLease]] = []
        self._leases: dict[int, KeptLease] = {}
        self._order = itertools.count()
        self._closed = False
        self._call: Any = None
        self._requests: _Requests | None = None
        # Since when the stream owes an answer: its last answer, or the first
        # keep-alive sent after it had answered them all (an idle stream is
        # not a hung one); and how many answers it owes.
        self._stream_answered = 0.0
        self._unanswered = 0
        self._stream_lock = threading.Lock()
        self._stream_metadata: Any = None
        self._thread: threading.Thread | None = None
        self._reader: threading.Thread | None = None

    def add(self, lease_id: int, ttl: float, interval: float, stop: threading.Event,
            answered: Callable[[int], None], silent: Callable[[], None]) -> KeptLease:
        """Keep ``lease_id`` alive until ``stop`` is set; the first keep-alive
        goes at once. ``answered(ttl)`` gets every answer (0 or less: etcd no
        longer has the lease); ``silent()`` is called once if none came for
        ``ttl`` seconds and etcd could not say it still has the lease, and
        the lease is dropped."""
        lease = KeptLease(lease_id, ttl, interval, stop, answered, silent)
        with self._cond:
            if self._closed:
                raise RuntimeError("connection closed")
            self._leases[lease_id] = lease
            heapq.heappush(self._heap, (0.0, next(self._order), lease))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._schedule, name="rdzv-keepalives", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return lease

    def remove(self, lease_id: int) -> None:
        """Stop keeping ``lease_id`` alive (its ``stop`` event does the same)."""
        with self._cond:
            self._leases.pop(lease_id, None)
            self._cond.notify_all()

    def close(self) -> bool:
        """Stop keeping every lease alive; the hub's threads, and the stream's,
        have ended on return (unless one of them is the caller, or they took
        longer than a moment).

        Returns:
            Whether the threads ended in time.
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = time.monotonic() + _THREAD_EXIT_TIMEOUT
        return _join((self._thread, *self._close_stream()), deadline)

    def close_stream(self, deadline: float) -> bool:
        """Close the keep-alive stream (the next keep-alive opens another);
        wait for its threads up to ``deadline``; whether they ended."""
        return _join(self._close_stream(), deadline)

    # ---------------------------------------------------------------- threads
    def _schedule(self) -> None:
        while True:
            due: list[KeptLease] = []
            lapsed: list[KeptLease] = []
            with self._cond:
                while not self._closed:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
                if self._closed:
                    return
                now = time.monotonic()
                # The leases due now, and with them those due within a
                # quarter of their interval: sent a little early, they keep
                # the same beat from then on, so a process of many leases
                # wakes this thread, and gRPC's, a few times per interval
                # rather than once per lease.
                waiting: list[KeptLease] = []  # due, their last keep-alive unanswered
                while self._heap and (self._heap[0][0] <= now or (
                        (due or lapsed or waiting) and self._heap[0][0] - now
                        <= self._heap[0][2].interval * _EARLY)):
                    _, _, lease = heapq.heappop(self._heap)
                    if lease.stop.is_set() or self._leases.get(lease.lease_id) is not lease:
                        continue
                    if now - lease.last_answer > lease.ttl and not lease.asking:
                        lease.asking = True
                        lapsed.append(lease)
                    (waiting if lease.pending else due).append(lease)
                    heapq.heappush(self._heap, (now + lease.interval, next(self._order), lease))
                # A stream that owes answers for half a TTL is replaced: that
                # leaves time to reopen it (on another member, round robin)
                # before the lease is lost.
                owed = due + waiting
                stalled = (self._call is not None and owed and self._unanswered > 0
                           and now - self._stream_answered > min(x.ttl for x in owed) / 2)
            for lease in lapsed:
                self._ask_ttl(lease)
            if stalled:
                logger.debug("keep-alive stream answered nothing for a TTL; opening another")
                self._close_stream()
                # The new stream owes nothing: their keep-alives go on it now.
                due += waiting
            if due:
                self._send([lease.lease_id for lease in due])

    def _ask_ttl(self, lease: KeptLease) -> None:
        """Ask etcd how long ``lease``, unanswered for its TTL, has left."""
        request = self._rpc.LeaseTimeToLiveRequest(ID=lease.lease_id)
        asked = time.monotonic()
        with fork_gate:
            try:
                future = self._stub.LeaseTimeToLive.future(
                    request, lease.interval, metadata=self._metadata())
            except ValueError:  # the channel is closed
                future = None
        if future is None:
            self._lapse(lease, None, asked)
        else:
            future.add_done_callback(
                lambda done: self._lapse(lease, _ttl_left(lease, done), asked))

    def _lapse(self, lease: KeptLease, left: int | None, asked: float) -> None:
        """Act on what etcd, asked at ``asked``, said ``lease`` has left
        (None: it did not say)."""
        with self._cond:
            lease.asking = False
            if lease.stop.is_set() or self._leases.get(lease.lease_id) is not lease:
                return
            if left is not None and left > 0:
                lease.renewed(asked, left)
                return
            del self._leases[lease.lease_id]
        if left is None:
            lease.silent()
        else:
            lease.answered(left)

    def _send(self, lease_ids: list[int]) -> None:
        metadata = self._metadata()
        if self._call is not None and metadata != self._stream_metadata:
            # A renewed auth token: etcd checks the one the stream was opened with.
            self._close_stream(self._call)
        with fork_gate, self._stream_lock:
            if self._closed:
                # close() has run, or is closing the stream: opening one now
                # would leave it open after close() returned.
                return
            if self._call is None:
                requests = _Requests()
                self._unanswered = 0
                try:
                    call = self._stub.LeaseKeepAlive(requests.drain(), metadata=metadata)
                except ValueError:  # the channel is closed
                    return
                self._requests, self._call = requests, call
                self._stream_metadata = metadata
                self._reader = threading.Thread(target=self._read, args=(call,),
                                                name="rdzv-keepalive-answers", daemon=True)
                self._reader.start()
            assert self._requests is not None
            if self._unanswered == 0:
                self._stream_answered = time.monotonic()
            self._unanswered += len(lease_ids)
            for lease_id in lease_ids:
                # Before the request goes: its answer clears it.
                lease = self._leases.get(lease_id)
                if lease is not None:
                    lease.pending = True
                self._requests.put(self._rpc.LeaseKeepAliveRequest(ID=lease_id))

    def _read(self, call: Any) -> None:
        try:
            for response in call:
                with self._stream_lock:
                    if call is self._call:
                        self._stream_answered = time.monotonic()
                        self._unanswered = max(0, self._unanswered - 1)
                lease = self._leases.get(response.ID)
                if lease is None or lease.stop.is_set():
                    continue
                lease.pending = False
                if response.TTL > 0:
                    lease.last_answer = time.monotonic()
                else:
                    self.remove(response.ID)
                lease.answered(response.TTL)
        except Exception as err:  # the stream broke (etcd gone, channel closed)
            logger.debug("keep-alive stream broke: %s", err)
        self._close_stream(call)

    def _close_stream(self, only: Any = None) -> tuple[threading.Thread | _Requests | None, ...]:
        """Close the stream (only if it is still ``only``, when given); return
        its threads (its reader, and its requests for gRPC's sender), which
        end soon after."""
        with self._stream_lock:
            if only is not None and self._call is not only:
                return ()
            call, requests, reader = self._call, self._requests, self._reader
            self._call = self._requests = None
        if requests is None:
            return ()
        # What the old stream owed, the next one sends again.
        for lease in list(self._leases.values()):
            lease.pending = False
        requests.end()
        call.cancel()
        return (reader, requests)
