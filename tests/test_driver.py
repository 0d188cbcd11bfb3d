"""The round driver (``rdzv.driver``): scripted machines, no etcd.

The rounds it drives against etcd are the rest of the suite's; here each rule
of the hand-off between the driver and the calling thread is checked on its
own: what goes out without a job, what comes back to the calling thread,
what wakes a waiting machine, deadlines, errors and closing.
"""

from __future__ import annotations

import gc
import math
import threading
import time
import weakref
from collections import Counter
from typing import Any

import grpc
import pytest

from helpers import wait_for
from rdzv import _state
from rdzv.api import RendezvousConnectionError
from rdzv.driver import RoundDriver, _Call
from rdzv.watch import Inbox

TXN = _state.Step.STEP_TXN
GET = _state.Step.STEP_GET
WAIT = _state.Step.STEP_WAIT
DONE = _state.Step.STEP_DONE
ANSWER = (True, 7, [])


class Machine:
    """A node machine that plays a script of actions: ``("txn"[, key])``,
    ``("join", node_id)``, ``("get",)``, ``("wait", until)`` (until a new inbox
    item, or ``until`` on the clock), ``("done",)``. It fails the test if two
    threads step it at once."""

    def __init__(self, *script: tuple[Any, ...]) -> None:
        self.script = list(script)
        self.fed: list[Any] = []
        self.items: list[Any] = []
        self.seen = 0  # items that ended a wait already
        self.steps = 0
        self.last_step: Any = None
        self._inside = threading.Lock()

    def next_action(self, now: float) -> Any:
        assert self._inside.acquire(blocking=False), "two threads step the machine"
        try:
            self.steps += 1
            kind = self.script[0]
            if kind[0] == "wait" and (len(self.items) > self.seen or now >= kind[1]):
                self.script.pop(0)
                self.seen = len(self.items)
                kind = self.script[0]
            if kind[0] == "txn" and len(kind) > 1:
                # A confirmation's shape: a shared read and a put of its own.
                action = _state.Action(TXN, [], [("get", b"shard"), ("put", kind[1], b"", 0)], [])
            elif kind[0] == "txn":
                action = _state.Action(TXN, [], [("put", b"k", b"v", 0)], [])
            elif kind[0] == "join":
                # A join's shape (the core's _join_txn).
                me = kind[1]
                action = _state.Action(
                    TXN, [("create", b"world", 0)],
                    [("put", b"members/" + me, b"", 0),
                     ("txn", [("create", b"counter", 0)],
                      [("put", b"counter", me, 0), ("count", b"members/")],
                      [("get", b"counter")])],
                    [("get", b"state"), ("get", b"members/" + me)], join=True)
            elif kind[0] == "get":
                action = _state.Action(GET, key=b"k")
            elif kind[0] == "wait":
                action = _state.Action(WAIT, wake_at=kind[1])
            else:
                action = _state.Action(DONE, result=None)
            self.last_step = action.step
            return action
        finally:
            self._inside.release()

    def feed(self, answer: Any) -> None:
        self.fed.append(answer)
        self.script.pop(0)

    def fail(self, error: BaseException) -> None:
        self.feed(("failed", str(error)))


class Client:
    """``txn_nowait`` as ``EtcdClient`` has it: answers from another thread."""

    def __init__(self, answer: Any = ANSWER, sends: bool = True) -> None:
        self.answer = answer
        self.sends = sends
        self.sent = 0
        self.requests: list[Any] = []

    def txn_nowait(self, compares: Any, success: Any, failure: Any, done: Any) -> bool:
        if not self.sends:
            return False
        self.sent += 1
        self.requests.append(success)
        threading.Thread(target=done, args=(self.answer,)).start()
        return True


class Echo(Client):
    """Answers each operation with what it names: ``("read", key)`` for a get."""

    def __init__(self, error: BaseException | None = None) -> None:
        super().__init__()
        self.error = error

    def txn_nowait(self, compares: Any, success: Any, failure: Any, done: Any) -> bool:
        self.answer = self.error or (True, 7, [
            ("read", op[1]) if op[0] == "get" else None for op in success])
        self.error = None  # only the first request fails
        return super().txn_nowait(compares, success, failure, done)


class Round:
    def __init__(self, node: Machine, client: Client | None = None,
                 deadline: float = math.inf) -> None:
        self.node = node
        self.client = client or Client()
        self.inbox = Inbox()
        self.deadline = deadline
        self.stale = False
        self.absorb_error: BaseException | None = None
        self.job_error: BaseException | None = None
        self.read_error: BaseException | None = None
        self.jobs: list[tuple[Any, int]] = []

    def absorb(self) -> bool:
        # Events go only to a machine that waits (see Node.next_action).
        assert self.node.last_step == WAIT, self.node.last_step
        if self.absorb_error is not None:
            raise self.absorb_error
        items = self.inbox.drain(0)
        self.node.items.extend(items)
        return bool(items)

    def watches_stale(self) -> bool:
        return self.stale

    def run(self, job: tuple[Any, ...]) -> None:
        self.jobs.append((job[0], threading.get_ident()))
        if self.job_error is not None:
            raise self.job_error
        if job[0] == "request":
            self.node.feed(("from the calling thread", job[1].step))
        else:
            self.stale = False

    def read(self, action: Any) -> Any:
        self.jobs.append(("read", threading.get_ident()))
        if self.read_error is not None:
            raise self.read_error
        return ("read by one calling thread", action.step)


@pytest.fixture
def driver() -> Any:
    driver = RoundDriver()
    yield driver
    driver.close()


def test_a_transaction_goes_out_and_its_answer_comes_back_without_the_calling_thread(driver):
    round = Round(Machine(("txn",), ("txn",), ("done",)))
    assert driver.drive(round) is True
    assert round.node.fed == [ANSWER, ANSWER]
    assert round.client.sent == 2
    assert round.jobs == []


def test_what_blocks_is_a_job_for_the_calling_thread(driver):
    me = threading.get_ident()
    # A failed first attempt, a read, a client that sends nothing itself
    # (interceptors), watches to start.
    failing = Round(Machine(("txn",), ("done",)), Client(answer=TimeoutError("deadline")))
    assert driver.drive(failing) is True
    assert failing.jobs == [("request", me)]
    assert failing.node.fed == [("from the calling thread", TXN)]

    reading = Round(Machine(("get",), ("txn",), ("done",)), Client(sends=False))
    assert driver.drive(reading) is True
    assert reading.jobs == [("request", me), ("request", me)]
    assert reading.node.fed == [("from the calling thread", GET), ("from the calling thread", TXN)]

    watching = Round(Machine(("wait", math.inf)))
    watching.stale = True

    def wake() -> None:
        try:
            wait_for(lambda: watching.jobs, timeout=10, what="the machine's watches")
        finally:
            watching.inbox.put(("state",))

    threading.Thread(target=wake).start()
    watching.node.script.append(("done",))
    assert driver.drive(watching) is True
    assert watching.jobs == [("watches", me)]


def test_an_item_in_the_inbox_wakes_a_waiting_machine(driver):
    round = Round(Machine(("wait", math.inf), ("done",)))
    waker = threading.Thread(target=lambda: _put_when_waiting(round))
    waker.start()
    assert driver.drive(round) is True
    waker.join()
    assert round.node.items == [("state",)]


def _put_when_waiting(round: Round) -> None:
    wait_for(lambda: round.node.steps, timeout=10, what="the machine's first step")
    round.inbox.put(("state",))


def test_events_wait_for_the_answer_of_a_request_in_flight(driver):
    # Round.absorb fails the call if events reach a machine that does not wait.
    round = Round(Machine(("wait", math.inf), ("txn",), ("wait", math.inf), ("done",)),
                  deadline=time.monotonic() + 10)

    class EventFirst(Client):
        def txn_nowait(self, compares: Any, success: Any, failure: Any, done: Any) -> bool:
            round.inbox.put(("record",))  # while the transaction is in flight
            return super().txn_nowait(compares, success, failure, done)

    round.client = EventFirst()
    round.inbox.put(("opened",))  # wakes the first wait
    assert driver.drive(round) is True
    assert round.node.fed == [ANSWER]
    assert round.node.items == [("opened",), ("record",)]


def test_the_clock_wakes_a_machine_at_the_time_it_asked_for(driver):
    at = time.monotonic() + 0.2
    round = Round(Machine(("wait", at), ("done",)))
    assert driver.drive(round) is True
    assert time.monotonic() >= at


def test_the_deadline_ends_a_waiting_call(driver):
    start = time.monotonic()
    round = Round(Machine(("wait", math.inf)), deadline=start + 0.2)
    assert driver.drive(round) is False
    assert 0.2 <= time.monotonic() - start < 5


def test_finished_calls_are_not_held_until_their_deadline(driver):
    """A waiting call's wake-up is set at its round's deadline, here an hour
    away: once done, the calls (and their rounds) must not stay with the
    driver that long."""
    deadline = time.monotonic() + 3600
    rounds = [Round(Machine(("wait", math.inf), ("done",)), deadline=deadline)
              for _ in range(100)]
    wakers = [threading.Thread(target=_put_when_waiting, args=(r,)) for r in rounds]
    threads = [threading.Thread(target=driver.drive, args=(r,)) for r in rounds]
    for thread in (*wakers, *threads):
        thread.start()
    for thread in (*wakers, *threads):
        thread.join()
    assert all(r.node.items == [("state",)] and r.node.script == [("done",)] for r in rounds)
    held = [weakref.ref(r) for r in rounds]
    del rounds, wakers, threads
    # One more call, whose wait comes after them all.
    last = Round(Machine(("wait", math.inf), ("done",)), deadline=deadline)
    waker = threading.Thread(target=_put_when_waiting, args=(last,))
    waker.start()
    assert driver.drive(last) is True
    waker.join()
    gc.collect()
    # Stale wake-ups are dropped once they outnumber the live ones by 64.
    assert sum(ref() is not None for ref in held) <= 64


def test_errors_reach_the_caller_and_the_machine_is_left_alone(driver):
    broken = Round(Machine(("wait", math.inf)))
    broken.absorb_error = ValueError("bad record")
    with pytest.raises(ValueError, match="bad record"):
        driver.drive(broken)

    failing_job = Round(Machine(("get",), ("done",)))
    failing_job.job_error = KeyError("job")
    with pytest.raises(KeyError):
        driver.drive(failing_job)
    steps = failing_job.node.steps
    # Items for a finished call wake nothing: the driver goes on with others.
    failing_job.inbox.put(("state",))
    assert driver.drive(Round(Machine(("txn",), ("done",)))) is True
    assert failing_job.node.steps == steps


def test_many_calls_at_once_each_stepped_by_one_thread_at_a_time(driver):
    rounds = [Round(Machine(("txn",), ("get",), ("txn",), ("done",))) for _ in range(200)]
    results: list[bool] = []
    threads = [threading.Thread(target=lambda r=r: results.append(driver.drive(r)))
               for r in rounds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 200
    assert all(len(r.node.fed) == 3 for r in rounds)


def _read_together(driver: RoundDriver, rounds: list[Round],
                   drive: Any = None) -> list[threading.Thread]:
    """Wake every waiting call in one pass of the driver; each then asks for
    the same read. Each call runs ``drive(round)`` (default: the driver's) in
    a thread of its own; the threads are returned once joined (or given up on)."""
    threads = [threading.Thread(target=drive or driver.drive, args=(r,)) for r in rounds]
    for thread in threads:
        thread.start()
    wait_for(lambda: all(r.node.last_step == WAIT for r in rounds), 10, "every call waits")
    with driver._cond:  # the driver takes every wake-up in its next pass
        for r in rounds:
            r.inbox.put(("changed",))
    for thread in threads:
        thread.join(10)
    return threads


def test_identical_reads_of_one_pass_are_one_read_that_every_call_gets(driver):
    rounds = [Round(Machine(("wait", math.inf), ("get",), ("done",))) for _ in range(50)]
    _read_together(driver, rounds)
    readers = [r for r in rounds if r.jobs]
    assert len(readers) == 1, [r.jobs for r in rounds]
    assert [kind for kind, _ in readers[0].jobs] == ["read"]
    assert all(r.node.fed == [("read by one calling thread", GET)] for r in rounds)


def test_a_shared_read_that_fails_is_run_again_by_each_call(driver):
    rounds = [Round(Machine(("wait", math.inf), ("get",), ("done",))) for _ in range(5)]
    for r in rounds:
        r.read_error = RendezvousConnectionError("etcd went away")
    _read_together(driver, rounds)
    readers = [r for r in rounds if r.jobs and r.jobs[0][0] == "read"]
    assert len(readers) == 1, [r.jobs for r in rounds]
    # The call that read is told it failed; each other one runs the read itself.
    assert readers[0].node.fed == [("failed", "etcd went away")]
    for r in rounds:
        if r is not readers[0]:
            assert [kind for kind, _ in r.jobs] == ["request"]
            assert r.node.fed == [("from the calling thread", GET)]


def test_a_read_asked_for_before_the_same_read_went_out_waits_for_its_answer(
        driver, monkeypatch):
    # The thread that runs the first read is slow to send it; calls that ask
    # for the same read in later passes meanwhile get its answer.
    sending = threading.Event()
    go = threading.Event()
    run = RoundDriver._read_for_all

    def slow(self: RoundDriver, *args: Any) -> None:
        sending.set()
        assert go.wait(10)
        run(self, *args)

    monkeypatch.setattr(RoundDriver, "_read_for_all", slow)
    first = Round(Machine(("get",), ("done",)))
    threads = [threading.Thread(target=driver.drive, args=(first,))]
    threads[0].start()
    assert sending.wait(10)
    later = [Round(Machine(("get",), ("done",))) for _ in range(20)]
    for r in later:
        threads.append(threading.Thread(target=driver.drive, args=(r,)))
        threads[-1].start()
    wait_for(lambda: all(r.node.steps for r in later), 10, "every later call asks")
    go.set()
    for thread in threads:
        thread.join(10)
    assert [kind for kind, _ in first.jobs] == ["read"]
    assert all(r.jobs == [] for r in later)
    assert all(r.node.fed == [("read by one calling thread", GET)] for r in [first, *later])


class _Interrupted(Exception):
    pass


def test_calls_waiting_for_a_read_whose_caller_gave_up_read_on_their_own(driver, monkeypatch):
    # The calling thread that was to run the read is interrupted (a signal
    # handler raised in it) before it took the job.
    rounds = [Round(Machine(("wait", math.inf), ("get",), ("done",))) for _ in range(5)]
    take = _Call.take
    interrupted: list[Round] = []

    def interruptible(self: _Call) -> tuple[Any, ...]:
        job = take(self)
        if job[0] == "read" and not interrupted:
            interrupted.append(self.round)
            with self._cond:
                self._jobs.appendleft(job)
            raise _Interrupted
        return job

    monkeypatch.setattr(_Call, "take", interruptible)
    errors: list[BaseException] = []

    def drive(r: Round) -> None:
        try:
            driver.drive(r)
        except _Interrupted as err:
            errors.append(err)

    threads = _read_together(driver, rounds, drive)
    assert not any(thread.is_alive() for thread in threads), "a call waits for a read forever"
    assert len(errors) == 1 and interrupted[0].jobs == []
    for r in rounds:
        if r is not interrupted[0]:
            assert [kind for kind, _ in r.jobs] == ["request"]
            assert r.node.fed == [("from the calling thread", GET)]


def test_closing_ends_a_call_in_progress_and_the_thread():
    before = set(threading.enumerate())
    driver = RoundDriver()
    round = Round(Machine(("wait", math.inf)))
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            driver.drive(round)
        except RendezvousConnectionError as err:
            errors.append(err)

    caller = threading.Thread(target=drive)
    caller.start()
    wait_for(lambda: round.node.steps, timeout=10, what="the machine's first step")
    driver.close()
    caller.join(10)
    assert not caller.is_alive()
    assert errors and "closed" in str(errors[0])
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()
                and t.name == "rdzv-round-driver"]
    with pytest.raises(RendezvousConnectionError):
        driver.drive(Round(Machine(("done",))))


def _confirm_together(driver: RoundDriver, client: Client, count: int,
                      step: Any = lambda i: ("txn", b"confirmed/%d" % i)) -> list[Round]:
    """``count`` calls that wait, then confirm (or take the ``step(i)`` of
    their choice) in one pass of the driver: their wake-ups are queued while
    the driver is held inside a request."""
    rounds = [Round(Machine(("wait", math.inf), step(i), ("done",)), client)
              for i in range(count)]
    results: list[bool] = []
    callers = [threading.Thread(target=lambda r=r: results.append(driver.drive(r)))
               for r in rounds]
    for caller in callers:
        caller.start()
    wait_for(lambda: all(r.node.steps for r in rounds), 10, "every call stepped")
    entered, go = threading.Event(), threading.Event()

    class Held(Client):
        def txn_nowait(self, compares: Any, success: Any, failure: Any, done: Any) -> bool:
            entered.set()
            go.wait(10)
            return super().txn_nowait(compares, success, failure, done)

    holder = threading.Thread(target=driver.drive, args=(Round(Machine(("txn",), ("done",)),
                                                               Held()),))
    holder.start()
    assert entered.wait(10)
    for r in rounds:
        r.inbox.put(("frozen",))
    go.set()
    for caller in [holder, *callers]:
        caller.join(10)
    assert results == [True] * count
    return rounds


def test_unconditional_transactions_of_one_pass_go_out_as_one(driver):
    client = Echo()
    rounds = _confirm_together(driver, client, 200)
    # 200 confirmations, one read between them: 2 requests of at most 128 operations.
    assert client.sent == 2
    assert sorted(len(ops) for ops in client.requests) == [74, 128]
    for r in rounds:
        assert r.node.fed == [(True, 7, [("read", b"shard"), None])]
        assert r.jobs == []
    assert sorted(op[1] for ops in client.requests for op in ops if op[0] == "put") == \
        sorted(b"confirmed/%d" % i for i in range(200))


def test_a_merged_transaction_that_fails_is_retried_call_by_call(driver):
    me = threading.get_ident()
    rounds = _confirm_together(driver, Echo(error=TimeoutError("deadline")), 3)
    for r in rounds:
        # Retried by its calling thread, as a failed first attempt is.
        assert [kind for kind, _ in r.jobs] == ["request"]
        assert r.jobs[0][1] != me
        assert r.node.fed == [("from the calling thread", TXN)]


class _Refused(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INVALID_ARGUMENT

    def details(self) -> str:
        return "etcdserver: too many operations in txn request"


def test_an_etcd_that_refuses_merged_transactions_gets_them_one_by_one(driver):
    client = Echo(error=_Refused())
    _confirm_together(driver, client, 3)
    sent = client.sent
    rounds = _confirm_together(driver, client, 3)
    assert client.sent == sent + 3
    assert all(r.node.fed == [(True, 7, [("read", b"shard"), None])] for r in rounds)


class Joins(Client):
    """Answers a join as etcd would while the round has no world and the
    counter key is free: puts, then the counter's transaction, which counts
    the members put so far."""

    def txn_nowait(self, compares: Any, success: Any, failure: Any, done: Any) -> bool:
        puts = sum(1 for op in success if op[0] == "put")
        self.answer = (True, 7, [None] * puts + [(True, [None, puts])])
        return super().txn_nowait(compares, success, failure, done)


def _join(i: int) -> tuple[str, bytes]:
    return ("join", b"node-%d" % i)


def test_the_joins_of_one_pass_go_out_as_one(driver):
    client = Joins()
    rounds = _confirm_together(driver, client, 200, _join)
    # 200 member keys and one counter transaction per request: 125 + 75 (the
    # counter's transaction, of 2 operations, gets what the merged one's 126
    # leave of etcd's 128).
    assert client.sent == 2
    assert sorted(len(ops) for ops in client.requests) == [76, 126]
    assert sorted(op[1] for ops in client.requests for op in ops if op[0] == "put") == \
        sorted(b"members/node-%d" % i for i in range(200))
    holders: Counter[bytes | None] = Counter()
    for r in rounds:
        assert r.jobs == []
        [(ok, revision, (put, (took, counted)))] = r.node.fed
        assert (ok, revision, put) == (True, 7, None)
        holders[None if took else counted[0][0]] += 1
    # The first of each request took the counter key (and counted its
    # request's members); the others of that request read it held by the first.
    expected: Counter[bytes | None] = Counter()
    for ops in client.requests:
        expected[None] += 1
        expected[ops[-1][2][0][2]] += len(ops) - 2
    assert holders == expected


def test_a_merged_join_that_fails_is_retried_call_by_call(driver):
    me = threading.get_ident()
    rounds = _confirm_together(driver, Echo(error=TimeoutError("deadline")), 3, _join)
    for r in rounds:
        assert [kind for kind, _ in r.jobs] == ["request"]
        assert r.jobs[0][1] != me
        assert r.node.fed == [("from the calling thread", TXN)]


def test_joins_asked_for_while_one_is_in_flight_go_out_together_after_it(driver):
    """The nodes of a process wake one by one: the joins that come while the
    process's join of the round is in flight wait for its answer, then go
    out as one transaction."""
    release = threading.Event()

    class Slow(Joins):
        def txn_nowait(self, compares: Any, success: Any, failure: Any, done: Any) -> bool:
            if self.sent == 0:
                def answer_later() -> None:
                    release.wait(10)
                    done((True, 7, [None, (True, [None, 1])]))
                self.sent += 1
                self.requests.append(success)
                threading.Thread(target=answer_later).start()
                return True
            return super().txn_nowait(compares, success, failure, done)

    client = Slow()
    rounds = [Round(Machine(_join(i), ("done",)), client) for i in range(4)]
    callers = [threading.Thread(target=driver.drive, args=(r,)) for r in rounds]
    callers[0].start()
    wait_for(lambda: client.sent == 1, 10, "the first join went out")
    for caller in callers[1:]:
        caller.start()
    wait_for(lambda: all(r.node.steps for r in rounds[1:]), 10, "the others asked to join")
    assert client.sent == 1
    release.set()
    for caller in callers:
        caller.join(10)
    assert client.sent == 2
    assert sorted(op[1] for op in client.requests[1] if op[0] == "put") == \
        sorted(b"members/node-%d" % i for i in (1, 2, 3))
    assert all(len(r.node.fed) == 1 and r.node.fed[0][0] for r in rounds)
