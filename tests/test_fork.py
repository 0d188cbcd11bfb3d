"""Handlers across ``fork()``: a forked child makes and uses its own handlers at
once, the parent's keep working, and a parent's handler used in the child fails
at once with ``ForkedProcessError``.

Children are real forked processes (``multiprocessing``'s fork context, as a
launcher or a test harness on Linux uses); each reports through a pipe and is
given a deadline, so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from helpers import ThreadNode, make_handler, wait_for
from rdzv import ForkedProcessError
from rdzv.client import EtcdClient
from rdzv.keys import DEFAULT_PREFIX, RunKeys

FORK = multiprocessing.get_context("fork")
CHILD_DEADLINE_S = 30.0


def _in_child(target: Callable[[], Any]) -> Any:
    """Run ``target`` in a forked child; return what it returned (or raise what
    it raised, as text), failing if the child does not answer in time."""
    receiver, sender = FORK.Pipe(duplex=False)

    def run() -> None:
        try:
            sender.send(("ok", target()))
        except BaseException as err:  # reported to the parent
            sender.send(("error", f"{type(err).__name__}: {err}"))

    child = FORK.Process(target=run, daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(CHILD_DEADLINE_S):
            raise AssertionError(f"the forked child did not answer within {CHILD_DEADLINE_S} s")
        status, value = receiver.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode == 0, f"the forked child exited with {child.exitcode}"
    if status == "error":
        raise AssertionError(f"the forked child failed: {value}")
    return value


def _own_round(endpoint: str) -> Callable[[], tuple[int, int, float]]:
    """A child's job: a handler of its own, one round of a run of its own."""

    def job() -> tuple[int, int, float]:
        start = time.monotonic()
        handler = make_handler(endpoint, str(uuid.uuid4()), 1, 1, timeout=20)
        try:
            info = handler.next_rendezvous()
            return info.rank, info.world_size, time.monotonic() - start
        finally:
            handler.shutdown()

    return job


def test_twenty_forks_with_an_open_handler(
    etcd_endpoint: str, run_id: str, handlers: list[Any], observer: EtcdClient
) -> None:
    # The parent's handler has completed a round: its lease is kept alive and
    # its state watch is open on the process's shared streams when it forks.
    parent = make_handler(etcd_endpoint, run_id, 1, 1, lease_ttl=2)
    handlers.append(parent)
    assert parent.next_rendezvous().world_size == 1
    took = []
    for _ in range(20):
        rank, world_size, seconds = _in_child(_own_round(etcd_endpoint))
        assert (rank, world_size) == (0, 1)
        took.append(seconds)
    # Forty lease TTLs' worth of children later, the parent's lease is alive
    # (its keep-alives went on) and it completes another round.
    assert observer.lease_time_to_live(parent.lease_id) > 0
    info = parent.next_rendezvous()
    assert (info.rank, info.world_size, parent.round) == (0, 1, 1)
    assert max(took) < 10, took


def test_fork_while_the_parent_waits_in_next_rendezvous(
    etcd_endpoint: str, run_id: str, handlers: list[Any], observer: EtcdClient
) -> None:
    parent = make_handler(etcd_endpoint, run_id, 2, 2)
    handlers.append(parent)
    waiting = ThreadNode(parent).start()
    # Fork while the thread is inside next_rendezvous(): it holds the handler's
    # lock, and the round's watches are open.
    members = RunKeys(DEFAULT_PREFIX, run_id).members(0)
    wait_for(lambda: observer.count(members) == 1, 10, "the parent to join round 0")

    def join_the_parents_round() -> tuple[int, int]:
        # The parent's handler fails at once, although its lock was held at the fork.
        start = time.monotonic()
        with pytest.raises(ForkedProcessError, match="forked from it"):
            parent.next_rendezvous()
        assert time.monotonic() - start < 1
        child = make_handler(etcd_endpoint, run_id, 2, 2, timeout=20)
        try:
            info = child.next_rendezvous()
            return info.rank, info.world_size
        finally:
            child.shutdown()

    child_rank, child_world = _in_child(join_the_parents_round)
    info = waiting.join(30)
    assert not isinstance(info, BaseException), info
    assert (info.world_size, child_world) == (2, 2)
    assert {info.rank, child_rank} == {0, 1}


def test_parents_handler_in_the_child_fails_at_once(
    etcd_endpoint: str, run_id: str, handlers: list[Any], observer: EtcdClient
) -> None:
    parent = make_handler(etcd_endpoint, run_id, 1, 1)
    handlers.append(parent)
    store = parent.next_rendezvous().store
    store.set("before", b"fork")

    def use_the_parents_handler() -> list[str]:
        calls: dict[str, Callable[[], Any]] = {
            "next_rendezvous": parent.next_rendezvous,
            "num_nodes_waiting": parent.num_nodes_waiting,
            "is_closed": parent.is_closed,
            "set_closed": parent.set_closed,
            "store.get": lambda: store.get("before"),
            "shutdown": parent.shutdown,
        }
        refused = []
        for name, call in calls.items():
            start = time.monotonic()
            try:
                call()
            except ForkedProcessError as err:
                assert "create a new handler in this process" in str(err).lower(), err
                assert time.monotonic() - start < 1, name
                refused.append(name)
        return refused

    refused = _in_child(use_the_parents_handler)
    assert refused == [
        "next_rendezvous", "num_nodes_waiting", "is_closed", "set_closed", "store.get", "shutdown",
    ]
    # Nothing the child did reached the parent's run: not closed, the lease alive.
    assert not parent.is_closed()
    assert observer.lease_time_to_live(parent.lease_id) > 0
    assert store.get("before") == b"fork"
    assert parent.next_rendezvous().world_size == 1


def test_torch_handler_of_the_parent_in_the_child_fails_at_once(
    etcd_endpoint: str, run_id: str, observer: EtcdClient
) -> None:
    torch_api = pytest.importorskip(
        "torch.distributed.elastic.rendezvous.api", reason="needs torch: pip install 'rdzv[torch]'"
    )
    from rdzv.torch import create_handler

    parent = create_handler(torch_api.RendezvousParameters(
        "etcd3", etcd_endpoint, run_id, 1, 1, timeout=20
    ))
    try:
        parent.next_rendezvous()

        def shut_down_the_parents_handler() -> str:
            # torch's launcher calls shutdown() on its way out; in a child that
            # must neither close the parent's run nor warn that closing failed.
            warnings: list[logging.LogRecord] = []
            handler = logging.Handler(logging.WARNING)
            handler.emit = warnings.append  # type: ignore[method-assign]
            logging.getLogger("rdzv").addHandler(handler)
            start = time.monotonic()
            with pytest.raises(torch_api.RendezvousError, match="forked from it") as caught:
                parent.shutdown()
            assert time.monotonic() - start < 1
            assert not warnings, [w.getMessage() for w in warnings]
            return type(caught.value.__cause__).__name__

        assert _in_child(shut_down_the_parents_handler) == "ForkedProcessError"
        assert not parent.is_closed()
        assert observer.lease_time_to_live(parent.handler.lease_id) > 0
    finally:
        assert parent.shutdown() is True
