"""Helpers shared by the rendezvous tests: nodes as threads and as processes."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

from rdzv.api import RendezvousParameters
from rdzv.client import EtcdClient
from rdzv.etcd_rendezvous import EtcdRendezvousHandler, create_rdzv_handler
from rdzv.inspect import read_world
from rdzv.keys import RunKeys

NODE_SCRIPT = os.path.join(os.path.dirname(__file__), "rdzv_node.py")


def make_handler(
    endpoint: str, run_id: str, min_nodes: int, max_nodes: int,
    local_addr: str | None = None, **config: Any
) -> EtcdRendezvousHandler:
    config.setdefault("timeout", 60)
    config.setdefault("last_call_timeout", 30)
    return create_rdzv_handler(
        RendezvousParameters("etcd", endpoint, run_id, min_nodes, max_nodes, local_addr, **config)
    )


def handler_on(client: EtcdClient, run_id: str, min_nodes: int, max_nodes: int,
               **options: Any) -> EtcdRendezvousHandler:
    """A handler of ``run_id`` on ``client``, one the test built (a seam for faults);
    ``options`` are ``EtcdRendezvousHandler``'s, with ``make_handler``'s defaults."""
    options.setdefault("timeout", 60)
    options.setdefault("last_call_timeout", 30)
    return EtcdRendezvousHandler(client, run_id, "etcd3", min_nodes, max_nodes, **options)


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Poll ``condition`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.02)


def clock_ahead(seconds: float) -> types.SimpleNamespace:
    """The ``time`` module with ``monotonic()`` ``seconds`` ahead: patched into
    one module of rdzv, it makes that module see time pass (a process whose
    keep-alives' answers it reads late) while the others do not."""
    clock = types.SimpleNamespace(
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_")})
    clock.monotonic = lambda: time.monotonic() + seconds
    return clock


class ThreadNode:
    """``next_rendezvous()`` of one handler, run in a thread."""

    def __init__(self, handler: EtcdRendezvousHandler) -> None:
        self.handler = handler
        self.result: Any = None
        self.finished_at = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> ThreadNode:
        self.result = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.result = self.handler.next_rendezvous()
        except Exception as err:  # the test inspects it
            self.result = err
        self.finished_at = time.monotonic()

    def join(self, timeout: float = 60.0) -> Any:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "next_rendezvous() did not return in time"
        return self.result

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()


def run_round(nodes: list[ThreadNode], timeout: float = 60.0) -> list[Any]:
    for node in nodes:
        node.start()
    return [node.join(timeout) for node in nodes]


def queued(handler: EtcdRendezvousHandler, *item: str) -> bool:
    """Whether ``handler``'s inbox holds an item that begins with ``item``
    (what its watches and lease sent and no call has taken yet)."""
    return any(held[:len(item)] == item for held in list(handler._inbox._items))


def assert_one_world(infos: list[Any], size: int) -> None:
    """Guarantee 1 and 2: one world size, ranks exactly 0..size-1."""
    errors = [i for i in infos if isinstance(i, BaseException)]
    assert not errors, errors
    assert {i.world_size for i in infos} == {size}
    assert sorted(i.rank for i in infos) == list(range(size))


def check_worlds(client: EtcdClient, run_id: str, results: list[tuple[str, int, int, int]],
                 min_nodes: int, max_nodes: int, dead: frozenset[str] = frozenset()) -> None:
    """Guarantees 1-3 (and 5) for ``[(node_id, round, rank, world_size), ...]``.

    Every result must agree with the world record etcd holds for its round: one
    world per round, whatever each node saw. The world is within bounds, and no
    node in ``dead`` (killed before the round) is in it.
    """
    keys = RunKeys("/rdzv", run_id)
    for node_id, round_number, rank, world_size in results:
        got = read_world(client, keys, round_number)
        assert got is not None, f"round {round_number} returned but has no world record"
        world = got[0]
        assert len(world) == world_size, (round_number, world, world_size)
        assert min_nodes <= world_size <= max_nodes, (round_number, world_size)
        assert world.index(node_id) == rank, (node_id, rank, world)
        assert not set(world) & dead, (round_number, world, dead)
    by_round: dict[int, list[int]] = {}
    for _node_id, round_number, rank, _size in results:
        by_round.setdefault(round_number, []).append(rank)
    for ranks in by_round.values():
        assert len(ranks) == len(set(ranks)), f"two nodes share a rank: {results}"


class ProcessNode:
    """A node in its own process (see rdzv_node.py), for real kills.

    Args:
        endpoint, run_id, min_nodes, max_nodes: the rendezvous parameters.
        launcher: a command prefix the process runs under (a test host's, say).
        config: more rendezvous options, as ``key=value`` strings.
    """

    def __init__(
        self,
        endpoint: str,
        run_id: str,
        min_nodes: int,
        max_nodes: int,
        launcher: Sequence[str] = (),
        **config: Any,
    ) -> None:
        config.setdefault("timeout", 60)
        config.setdefault("last_call_timeout", 30)
        args = [f"{k}={v}" for k, v in config.items()]
        self.proc = subprocess.Popen(
            [*launcher, sys.executable, NODE_SCRIPT, endpoint, run_id, str(min_nodes),
             str(max_nodes), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.node_id = self._read()["node_id"]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put("")

    def _read(self, timeout: float | None = None) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"node process gave no answer within {timeout} s") from None
        if not line:
            self._lines.put("")  # the end stays visible to later reads
            raise AssertionError(f"node process exited with {self.proc.wait()}")
        return json.loads(line)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The next answer; AssertionError if none comes within ``timeout`` seconds."""
        return self._read(timeout)

    def ask(self, command: str, timeout: float | None = 60.0) -> dict[str, Any]:
        """Send ``command`` and return its answer."""
        self.send(command)
        return self._read(timeout)

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(timeout=10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.kill()
