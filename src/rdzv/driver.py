"""One thread per connection steps the rounds of the connection's handlers.

A ``next_rendezvous()`` call runs its node machine (``rdzv._state.Node``) until
the round completes. Run by the calling thread, each of the machine's
requests is a blocking gRPC call and each watch event wakes that thread; in a
process that hosts thousands of nodes (a benchmark, a test, a launcher of many
agents) those hand-offs between threads cost more than the requests do. So
the calls of a connection are stepped by one thread, the driver: a
transaction goes out without waiting (its answer comes back to the driver's
queue), watch events are fed to the machine as they arrive, and a waiting
machine is looked at again when its clock says so. The calling thread sleeps
until its round is over.

The unconditional transactions that calls ask for in one pass of the driver
(a round's confirmations: every node of the process sees the round frozen by
the same event) go out merged, up to etcd's 128 operations per transaction,
each call getting its share of the answer. So do the joins of one round
(``_state.merge_joins``): one transaction puts the member keys of all the
calls that ask to join while the process's last join of that round is in
flight, and goes out when its answer comes. The nodes of a process begin
together but their threads wake one by one; without the wait each pass of
the driver would send the few joins it found.

What blocks is handed back to the calling thread as a *job*: a read (sent as
range requests, see ``EtcdClient.txn``), a request whose first attempt failed
(retried there as the client's policy says), a request of a client whose calls
pass through interceptors (they may block), and starting or stopping watches.
The calling thread runs the job and gives the machine back.

Identical reads are one read while it has not gone out: the calling thread
of the first call that asks for it runs it, and every call that asked for
the same read before that thread sent it gets the same answer. Each asked
before the read went out, so each gets what etcd held after it asked, as
with a read of its own. The nodes of a process ask for the same reads at the
same moments (the state record when their calls begin, and again every
``lease_ttl`` while a long round goes on, to check that its watch has not
stalled): one read instead of thousands, and one thread woken.

The machine is touched by one thread at a time: the driver, or the calling
thread while the call is *busy* with a job or with a request in flight (the
driver then leaves it alone until the answer or the job's end).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
from collections import deque
from time import monotonic as _now
from typing import Any, Protocol

import grpc

from rdzv import _state
from rdzv.api import RendezvousConnectionError, RendezvousError
from rdzv.txn import is_read_only, merge_unconditional

__all__ = ["Round", "RoundDriver"]

logger = logging.getLogger(__name__)

_STEP_TXN = _state.Step.STEP_TXN
_STEP_GET = _state.Step.STEP_GET
_STEP_WAIT = _state.Step.STEP_WAIT
_STEP_DONE = _state.Step.STEP_DONE
# The driver's own end of a call whose deadline passed.
_TIMED_OUT = "timed out"
# How long a closing connection waits for its driver thread.
_THREAD_EXIT_TIMEOUT = 5.0
# The most operations of a merged transaction: etcd's default --max-txn-ops.
_MERGE_OPS = 128
# Stale wake-ups tolerated beyond twice the live calls before they are dropped.
_STALE_TIMERS = 64


def _frozen(value: Any) -> Any:
    """``value`` with its lists made tuples, to tell identical requests apart."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(item) for item in value)
    return value


def _read_key(action: Any) -> Any:
    """What identifies a request that only reads, or None for one that writes
    (or that must go alone: a single attempt)."""
    if action.step == _STEP_GET:
        return ("get", action.key)
    if action.once or not is_read_only(action.success, action.failure):
        return None
    return _frozen((action.compares, action.success, action.failure))


def _copied(answer: Any) -> Any:
    """A transaction's answer with a list of results of its own (the others
    are immutable), so that no two machines hold the same list."""
    if isinstance(answer, tuple) and len(answer) == 3 and isinstance(answer[2], list):
        return (answer[0], answer[1], list(answer[2]))
    return answer


def _unconditional(action: Any) -> bool:
    """Whether a transaction always runs its success branch, of gets and puts
    only: those of several calls can be sent as one (``_send_unconditional``)."""
    return not action.compares and not action.failure and len(action.success) <= _MERGE_OPS \
        and all(op[0] == "get" or op[0] == "put" for op in action.success)


class Round(Protocol):
    """What the driver needs of one ``next_rendezvous()`` call.

    Attributes:
        node: the node machine, begun.
        client: the client of the round's requests (``EtcdClient``).
        inbox: where the node's watches and session put their items (an
            ``rdzv.watch.Inbox``; the driver sets its ``listener``).
        deadline: ``time.monotonic()`` time at which the call times out.
    """

    node: Any
    client: Any
    inbox: Any
    deadline: float

    def absorb(self) -> bool:
        """Feed the machine the inbox's items; return whether there were any.

        Raises:
            Exception: the call must end (the handler shut down, the lease
                was lost, a watch failed for good).
        """

    def watches_stale(self) -> bool:
        """Whether the watches held differ from those the machine wants."""

    def run(self, job: tuple[Any, ...]) -> None:
        """In the calling thread: ``("request", action)``, carry out the
        machine's request and feed it the answer; ``("watches",)``, start and
        stop watches to match the machine's."""

    def read(self, action: Any) -> Any:
        """In the calling thread: carry out a request that only reads and
        return its answer (what ``node.feed`` takes).

        Raises:
            RendezvousError: the read failed (``node.fail`` takes it).
        """


class _Call:
    __slots__ = ("_cond", "_jobs", "action", "busy", "finished", "round", "timer", "waiting")

    def __init__(self, round: Round) -> None:
        self.round = round
        self.busy = False
        self.waiting = False  # its last action was a wait
        self.finished = False
        self.action: Any = None
        self.timer = 0  # the generation of its wake-up; older ones are stale
        # From the driver to the calling thread: jobs, then ("end", outcome).
        self._cond = threading.Condition(threading.Lock())
        self._jobs: deque[tuple[Any, ...]] = deque()

    def hand(self, job: tuple[Any, ...]) -> None:
        """Give the calling thread a job (or the call's end)."""
        with self._cond:
            self._jobs.append(job)
            self._cond.notify()

    def take(self) -> tuple[Any, ...]:
        """In the calling thread: the next job, waiting for it."""
        with self._cond:
            while not self._jobs:
                self._cond.wait()
            return self._jobs.popleft()


class RoundDriver:
    """The thread that steps the ``next_rendezvous()`` calls of one connection.

    It starts with the first call and ends with ``close()``.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[tuple[str, _Call, Any]] = deque()
        self._timers: list[tuple[float, int, _Call, int]] = []
        self._order = itertools.count()
        self._calls: set[_Call] = set()
        self._thread: threading.Thread | None = None
        self._closed = False
        # Calls of this pass with an unconditional transaction, or a join, to
        # send, and whether to merge those (etcd took the merged transactions
        # so far).
        self._unsent: list[_Call] = []
        self._joins: list[_Call] = []
        # Join transactions in flight, by the round's world key (what their
        # compare names), and the joins of those rounds held until they end.
        self._joins_in_flight: dict[bytes, int] = {}
        self._held_joins: dict[bytes, list[_Call]] = {}
        self._merge = True
        # Calls of this pass with a read for their calling thread, each with
        # what it reads (``_read_key``).
        self._reads: list[tuple[_Call, Any]] = []
        # Reads handed to a calling thread and not sent yet, by what they
        # read (``_read_key``): the other calls that wait for their answer.
        self._pending_reads: dict[Any, list[_Call]] = {}

    def drive(self, round: Round) -> bool:
        """Step ``round`` until it ends; run the jobs it hands back meanwhile.

        Returns:
            True when the machine is done (the round completed, or the run
            closed: the machine says which), False when the deadline passed.

        Raises:
            Whatever the machine, the inbox or a job raised.
        """
        call = _Call(round)
        round.inbox.listener = lambda: self._post("wake", call)
        self._post("begin", call)
        try:
            while True:
                job = call.take()
                if job[0] == "end":
                    outcome = job[1]
                    if isinstance(outcome, BaseException):
                        raise outcome
                    return outcome is not _TIMED_OUT
                if job[0] == "read":
                    self._read_for_all(round, job[1], job[2])
                else:
                    round.run(job)
                self._post("resume", call)
        except BaseException:
            if not call.finished:
                # A job failed, or the wait was interrupted: take the machine
                # back before the caller cleans up after it.
                self._post("abandon", call)
                while (job := call.take())[0] != "end":
                    if job[0] == "read":
                        # Not run: the calls waiting for it read on their own.
                        self._answer_others(job[2], RendezvousConnectionError(
                            "the read was abandoned"))
            raise

    def close(self) -> None:
        """End the thread (calls still running end with an error); idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_THREAD_EXIT_TIMEOUT)

    # ------------------------------------------------------------ the thread
    def _post(self, kind: str, call: _Call, payload: Any = None) -> None:
        with self._cond:
            if self._closed:
                if kind in ("begin", "abandon"):
                    call.finished = True
                    call.hand(("end", RendezvousConnectionError(
                        "the connection to etcd was closed")))
                return
            self._queue.append((kind, call, payload))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="rdzv-round-driver", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _post_all(self, items: list[tuple[str, _Call, Any]]) -> None:
        with self._cond:
            if not self._closed:
                self._queue.extend(items)
                self._cond.notify()

    def _run(self) -> None:
        failure: BaseException
        try:
            self._loop()
            failure = RendezvousConnectionError("the connection to etcd was closed")
        except BaseException as err:  # a bug: fail the calls rather than hang them
            logger.exception("the round driver failed")
            failure = err
        with self._cond:
            self._closed = True
            calls = self._calls | {call for _, call, _ in self._queue}
            self._queue.clear()
        for call in calls:
            if not call.finished:
                self._finish(call, failure)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    timeout = None
                    if self._timers:
                        timeout = self._timers[0][0] - _now()
                        if timeout <= 0:
                            break
                    self._cond.wait(timeout)
                if self._closed:
                    return
                items = list(self._queue)
                self._queue.clear()
            ready: dict[_Call, None] = {}
            for kind, call, payload in items:
                if kind == "joined":
                    self._joined(payload)
                    continue
                if call.finished:
                    continue
                if kind == "begin":
                    self._calls.add(call)
                    ready[call] = None
                elif kind == "answer":
                    if self._answered(call, payload):
                        ready[call] = None
                elif kind == "resume":
                    call.busy = False
                    ready[call] = None
                elif kind == "wake":
                    ready[call] = None
                else:  # abandon
                    self._finish(call, None)
            now = _now()
            timers = self._timers
            while timers and timers[0][0] <= now:
                _, _, call, generation = heapq.heappop(timers)
                if call.timer == generation:
                    ready[call] = None
            for call in ready:
                if not call.finished and not call.busy:
                    self._advance(call)
            if self._unsent:
                self._send_unconditional()
            if self._joins:
                self._send_joins()
            if self._reads:
                self._hand_reads()

    def _answered(self, call: _Call, answer: Any) -> bool:
        """Feed a request's answer; True if the machine can go on."""
        if isinstance(answer, BaseException):
            # The first attempt failed: the calling thread retries it (the
            # call stays busy).
            call.hand(("request", call.action))
            return False
        call.busy = False
        try:
            call.round.node.feed(answer)
        except BaseException as err:
            self._finish(call, err)
            return False
        return True

    def _advance(self, call: _Call) -> None:
        """Step the machine until it waits, sends a request or is done."""
        round = call.round
        node = round.node
        try:
            if call.waiting:
                # Watch events are fed only to a machine that waits: a
                # request's answer is decided on the state it was built on.
                round.absorb()
            while True:
                now = _now()
                action = node.next_action(now)
                step = action.step
                call.waiting = step == _STEP_WAIT
                if step == _STEP_DONE:
                    self._finish(call, None)
                    return
                if step == _STEP_WAIT:
                    if round.watches_stale():
                        call.busy = True
                        call.hand(("watches",))
                    elif round.absorb():
                        # Events came while it was busy: decide on them first.
                        continue
                    elif now >= round.deadline:
                        self._finish(call, _TIMED_OUT)
                    else:
                        call.timer += 1
                        at = min(round.deadline, action.wake_at)
                        if at < math.inf:
                            heapq.heappush(self._timers, (at, next(self._order), call, call.timer))
                            if len(self._timers) > 2 * len(self._calls) + _STALE_TIMERS:
                                self._drop_stale_timers()
                    return
                call.action = action
                call.busy = True
                if step == _STEP_TXN and not action.once and self._merge and _unconditional(action):
                    # Sent with the others of this pass (_send_unconditional).
                    self._unsent.append(call)
                elif step == _STEP_TXN and action.join and self._merge:
                    # Likewise (_send_joins).
                    self._joins.append(call)
                else:
                    self._send(call)
                return
        except BaseException as err:
            self._finish(call, err)

    def _drop_stale_timers(self) -> None:
        """Forget the wake-ups of finished calls and those a later wait
        replaced (a call keeps only its newest), in place. They would stay
        until due, holding their calls, and a round's deadline may be many
        minutes away; dropped when they outnumber the live ones, the cost is
        O(1) per wake-up."""
        timers = self._timers
        timers[:] = [timer for timer in timers if timer[2].timer == timer[3]]
        heapq.heapify(timers)

    def _send(self, call: _Call) -> None:
        """Send a call's request without waiting, or hand it to the calling
        thread when it blocks (a read, a client with interceptors)."""
        action = call.action
        if not (action.step == _STEP_TXN and not action.once and call.round.client.txn_nowait(
                action.compares, action.success, action.failure,
                lambda answer: self._post("answer", call, answer))):
            self._hand_request(call)

    def _hand_request(self, call: _Call) -> None:
        """Hand a call's request to its calling thread; a read waits for the
        end of the pass, where it joins an identical one (``_hand_reads``)."""
        key = _read_key(call.action)
        if key is not None:
            self._reads.append((call, key))
        else:
            call.hand(("request", call.action))

    def _hand_reads(self) -> None:
        """Hand this pass's reads to calling threads: a read that another
        call's thread is about to send waits for that one's answer; any other
        goes to its own calling thread, which runs it for every call that
        asks for the same read until it sends it."""
        reads, self._reads = self._reads, []
        with self._cond:
            for call, key in reads:
                waiting = self._pending_reads.get(key)
                if waiting is not None:
                    waiting.append(call)
                else:
                    self._pending_reads[key] = []
                    call.hand(("read", call.action, key))

    def _read_for_all(self, round: Round, action: Any, key: Any) -> None:
        """In the calling thread: run a read for its call and for the calls
        that asked for the same one before it went out.

        Each of them gets the answer (a copy of its list of results), or, if
        the read failed, the error: its calling thread then runs the read
        again on its own, as after a failed first attempt.
        """
        with self._cond:
            others = self._pending_reads.pop(key)
        if not others:
            round.run(("request", action))
            return
        answer: Any = RendezvousConnectionError("the read was abandoned")
        try:
            answer = round.read(action)
        except RendezvousError as err:
            answer = err
        finally:
            self._post_all([("answer", other, _copied(answer)) for other in others])
        if isinstance(answer, BaseException):
            round.node.fail(answer)
        else:
            round.node.feed(answer)

    def _answer_others(self, key: Any, answer: Any) -> None:
        """Give the calls waiting for a pending read ``answer`` instead."""
        with self._cond:
            others = self._pending_reads.pop(key, [])
        self._post_all([("answer", other, answer) for other in others])

    def _send_unconditional(self) -> None:
        """Send the unconditional transactions of this pass's calls, merged.

        A round's confirmations come from every node of the process at once
        (they all see the round frozen by one event of the shared watch):
        merged, they cost one request per ``_MERGE_OPS`` operations instead
        of one each. A merged transaction that fails hands each call its own
        request to retry, as a failed first attempt does.
        """
        calls, self._unsent = self._unsent, []
        groups = merge_unconditional([call.action.success for call in calls], _MERGE_OPS)
        for ops, picks in groups:
            members = [(calls[index], pick) for index, pick in picks]
            if len(members) == 1:
                call = members[0][0]
                self._send_for([call], [], call.action.success, [],
                               lambda answer, call=call: self._post("answer", call, answer))
                continue
            self._send_for([call for call, _ in members], [], ops, [],
                           lambda answer, members=members: self._merged_answer(members, answer))

    def _send_for(self, calls: list[_Call], compares: Any, success: Any, failure: Any,
                  done: Any) -> bool:
        """Send one transaction on behalf of ``calls`` without waiting (``done``
        gets its answer); whether it went out. A client that raised ends the
        calls with its error; one that would block hands each call's own
        request to its calling thread."""
        try:
            sent = calls[0].round.client.txn_nowait(compares, success, failure, done)
        except BaseException as err:
            for call in calls:
                self._finish(call, err)
            return False
        if not sent:
            for call in calls:
                self._hand_request(call)
        return sent

    def _send_joins(self) -> None:
        """Send the joins of this pass's calls, those of a round merged
        (``_state.merge_joins``), or hold them while a join of their round
        is in flight (``_joined`` sends them when it ends). As with
        ``_send_unconditional``, a merged join that fails hands each call
        its own to retry."""
        if not self._merge:
            # Turned off while these were held.
            joins, self._joins = self._joins, []
            for call in joins:
                self._send(call)
            return
        calls: list[_Call] = []
        for call in self._joins:
            world = call.action.compares[0][1]
            if self._joins_in_flight.get(world):
                self._held_joins.setdefault(world, []).append(call)
            else:
                calls.append(call)
        self._joins = []
        actions = [call.action for call in calls]
        for action, indices in _state.merge_joins(actions, _MERGE_OPS):
            members = [calls[index] for index in indices]
            world = action.compares[0][1]
            if self._send_for(members, action.compares, action.success, action.failure,
                              lambda answer, members=members, world=world: self._joins_answer(
                                  members, world, answer)):
                self._joins_in_flight[world] = self._joins_in_flight.get(world, 0) + 1

    def _joins_answer(self, members: list[_Call], world: bytes, answer: Any) -> None:
        """On gRPC's thread: each call's share of a join transaction's answer."""
        ended = ("joined", members[0], world)
        if len(members) > 1 and self._merge_failed(len(members), answer):
            self._post_all([("answer", call, answer) for call in members] + [ended])
            return
        shares = [answer] if len(members) == 1 else \
            _state.split_joins([call.action for call in members], answer)
        self._post_all([("answer", call, share)
                        for call, share in zip(members, shares, strict=True)] + [ended])

    def _joined(self, world: bytes) -> None:
        """A join transaction of the round of ``world`` ended: send the joins
        held behind it once none is in flight."""
        left = self._joins_in_flight.pop(world) - 1
        if left:
            self._joins_in_flight[world] = left
            return
        held = self._held_joins.pop(world, [])
        self._joins.extend(call for call in held if not call.finished)

    def _merge_failed(self, calls: int, answer: Any) -> bool:
        """Whether a merged transaction's answer is an error; an error that
        says etcd refused its size turns merging off."""
        if not isinstance(answer, BaseException):
            return False
        if isinstance(answer, grpc.RpcError) and \
                answer.code() == grpc.StatusCode.INVALID_ARGUMENT:
            # An etcd that takes fewer operations per transaction
            # (--max-txn-ops): send each call's alone from now on.
            if self._merge:
                logger.warning(
                    "etcd refused a merged transaction of %d calls (%s); the nodes "
                    "on this connection send their requests one by one from now on "
                    "(is etcd's --max-txn-ops below %d?)", calls, answer.details(), _MERGE_OPS)
            self._merge = False
        return True

    def _merged_answer(self, members: list[tuple[_Call, list[int]]], answer: Any) -> None:
        """On gRPC's thread: each call's share of a merged transaction's answer."""
        if self._merge_failed(len(members), answer):
            self._post_all([("answer", call, answer) for call, _ in members])
            return
        _ok, revision, results = answer
        self._post_all([("answer", call, (True, revision, [results[i] for i in pick]))
                        for call, pick in members])

    def _finish(self, call: _Call, outcome: Any) -> None:
        call.finished = True
        call.timer += 1
        call.round.inbox.listener = None
        self._calls.discard(call)
        call.hand(("end", outcome))
