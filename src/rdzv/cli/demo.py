"""``rdzv demo``: an embedded etcd, N nodes, one round, a kill and a late node."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rdzv.api import RendezvousError, RendezvousParameters
from rdzv.cli._common import (
    _PROGRESS_INTERVAL_S,
    _RAW,
    BACKEND,
    ExitCode,
    _at_least,
    _example,
    _log_options,
    _nnodes,
    _Progress,
    _table,
    _wrap,
)
from rdzv.etcd_rendezvous import EtcdRendezvousHandler, create_rdzv_handler
from rdzv.etcd_server import EtcdServer

logger = logging.getLogger(__name__)


# seconds, and a generous per-phase deadline for slow machines.
_DEMO_LEASE_TTL = 3
_DEMO_LAST_CALL_S = 1.0
_DEMO_PHASE_TIMEOUT_S = 120.0


def _serve_node(handler: EtcdRendezvousHandler, commands: Iterable[str],
                emit: Callable[[dict[str, Any]], None]) -> None:
    """Run one demo node: ``join`` -> ``next_rendezvous()``, ``waiting`` ->
    ``num_nodes_waiting()``, anything else -> leave.

    Each round is emitted as ``{"event": "round", ...}`` with the wall time of
    the return, so that the demo measures from the moment it said ``join``.
    """
    try:
        emit({"event": "ready", "node": handler.node_id})
        for command in map(str.strip, commands):
            if command == "join":
                info = handler.next_rendezvous()
                emit({"event": "round", "round": handler.round, "rank": info.rank,
                      "world_size": info.world_size, "node": handler.node_id,
                      "returned": time.time()})
            elif command == "waiting":
                emit({"event": "waiting", "count": handler.num_nodes_waiting()})
            else:
                break
    except RendezvousError as err:
        emit({"event": "error", "message": f"{type(err).__name__}: {err}"})
    finally:
        handler.shutdown()


def _demo_params(endpoint: str, run_id: str, nnodes: tuple[int, int]) -> RendezvousParameters:
    return RendezvousParameters(
        BACKEND, endpoint, run_id, *nnodes, local_addr="127.0.0.1",
        lease_ttl=_DEMO_LEASE_TTL, last_call_timeout=_DEMO_LAST_CALL_S,
        timeout=_DEMO_PHASE_TIMEOUT_S,
    )


def _cmd_demo_node(args: argparse.Namespace) -> int:
    """One demo node in its own process: commands on stdin, JSON events on stdout."""
    handler = create_rdzv_handler(_demo_params(args.endpoint, args.run_id, args.nnodes))

    def emit(event: dict[str, Any]) -> None:
        print(json.dumps(event), flush=True)

    _serve_node(handler, iter(sys.stdin.readline, ""), emit)
    return ExitCode.OK


class _Fleet:
    """The demo's nodes, as processes or threads, driven by commands (see ``_serve_node``).

    Every node's events arrive on one queue as ``(index, event)``; a node that
    ends sends ``{"event": "exit"}`` last.
    """

    def __init__(self, endpoint: str, run_id: str, nnodes: tuple[int, int],
                 threads: bool, log_level: str) -> None:
        self._endpoint = endpoint
        self._run_id = run_id
        self._nnodes = nnodes
        self._threads = threads
        self._log_level = log_level
        self.events: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        self._processes: dict[int, subprocess.Popen[str]] = {}
        self._inboxes: dict[int, queue.Queue[str]] = {}
        self._node_threads: list[threading.Thread] = []

    def spawn(self, index: int) -> None:
        """Start node ``index``; it sends ``ready`` once connected."""
        if self._threads:
            inbox: queue.Queue[str] = queue.Queue()
            self._inboxes[index] = inbox
            thread = threading.Thread(target=self._thread_node, args=(index, inbox),
                                      name=f"rdzv-demo-node-{index}", daemon=True)
            self._node_threads.append(thread)
            thread.start()
            return
        process = subprocess.Popen(
            [sys.executable, "-m", "rdzv", "demo-node", "--log-level", self._log_level,
             "--endpoint", self._endpoint, "--run-id", self._run_id,
             "--nnodes", f"{self._nnodes[0]}:{self._nnodes[1]}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        self._processes[index] = process
        threading.Thread(target=self._read_process, args=(index, process),
                         name=f"rdzv-demo-reader-{index}", daemon=True).start()

    def _thread_node(self, index: int, inbox: queue.Queue[str]) -> None:
        def emit(event: dict[str, Any]) -> None:
            self.events.put((index, event))

        try:
            handler = create_rdzv_handler(
                _demo_params(self._endpoint, self._run_id, self._nnodes))
        except RendezvousError as err:
            emit({"event": "error", "message": f"{type(err).__name__}: {err}"})
        else:
            _serve_node(handler, iter(inbox.get, "exit"), emit)
        finally:
            emit({"event": "exit"})

    def _read_process(self, index: int, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        with process.stdout:
            for line in process.stdout:
                try:
                    self.events.put((index, json.loads(line)))
                except ValueError:
                    logger.warning("node %d printed %r", index, line)
        self.events.put((index, {"event": "exit", "code": process.wait()}))

    def send(self, index: int, command: str) -> None:
        """Give node ``index`` a command (``join``, ``waiting`` or ``exit``)."""
        if self._threads:
            self._inboxes[index].put(command)
            return
        process = self._processes[index]
        assert process.stdin is not None
        try:
            process.stdin.write(command + "\n")
            process.stdin.flush()
        except BrokenPipeError:
            logger.debug("node %d has exited already", index)

    def kill(self, index: int) -> str:
        """End node ``index`` abruptly (SIGKILL); threads leave cleanly instead."""
        if self._threads:
            self.send(index, "exit")
            return "shut down cleanly (a thread cannot be SIGKILLed)"
        self._processes[index].kill()
        return "killed with SIGKILL"

    def close(self) -> None:
        """Tell every node to leave and wait for it; kill processes still there after 10 s."""
        for index in list(self._processes) + list(self._inboxes):
            self.send(index, "exit")
        deadline = time.monotonic() + 10
        for thread in self._node_threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for process in self._processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()


@dataclass
class _Round:
    """What the demo saw of one round."""

    label: str
    started: float
    results: dict[int, dict[str, Any]]

    def seconds(self) -> list[float]:
        return sorted(r["returned"] - self.started for r in self.results.values())


def _collect(fleet: _Fleet, expected: set[int], event: str, what: str,
             progress: _Progress) -> dict[int, dict[str, Any]]:
    """Wait until every node in ``expected`` has sent ``event``; return them by node.

    Raises:
        RuntimeError: a node failed or exited, or the phase took too long.
    """
    deadline = time.monotonic() + _DEMO_PHASE_TIMEOUT_S
    got: dict[int, dict[str, Any]] = {}
    while len(got) < len(expected):
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(
                f"{what}: only {len(got)} of {len(expected)} nodes within "
                f"{_DEMO_PHASE_TIMEOUT_S:g} s"
            )
        progress.show(f"{what}: {len(got)}/{len(expected)} ({left:.0f} s left)")
        try:
            index, message = fleet.events.get(timeout=min(_PROGRESS_INTERVAL_S, left))
        except queue.Empty:
            continue
        if index not in expected:
            continue
        if message["event"] == event:
            got[index] = message
        elif message["event"] in ("error", "exit"):
            raise RuntimeError(f"{what}: node {index} failed: {message}")
    progress.clear()
    return got


def _wait_for_waiting_node(fleet: _Fleet, asked: int, progress: _Progress) -> None:
    """Ask node ``asked`` for ``num_nodes_waiting()`` until it is positive.

    Raises:
        RuntimeError: it stays 0 for ``_DEMO_PHASE_TIMEOUT_S``.
    """
    deadline = time.monotonic() + _DEMO_PHASE_TIMEOUT_S
    while True:
        fleet.send(asked, "waiting")
        answer = _collect(fleet, {asked}, "waiting", "num_nodes_waiting()", progress)
        if answer[asked]["count"] > 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"num_nodes_waiting() stayed 0 for {_DEMO_PHASE_TIMEOUT_S:g} s after the "
                "late node joined"
            )
        time.sleep(0.02)  # a poll interval, as an agent's monitoring loop has


def _check_round(results: dict[int, dict[str, Any]]) -> tuple[int, int]:
    """Return ``(round, world_size)`` if every node agrees and ranks are 0..size-1."""
    rounds = {r["round"] for r in results.values()}
    sizes = {r["world_size"] for r in results.values()}
    ranks = sorted(r["rank"] for r in results.values())
    if len(rounds) != 1 or len(sizes) != 1 or ranks != list(range(len(results))):
        raise RuntimeError(
            f"the nodes disagree: rounds {sorted(rounds)}, sizes {sorted(sizes)}, ranks {ranks}"
        )
    return rounds.pop(), sizes.pop()


def _cmd_demo(args: argparse.Namespace) -> int:
    """Show a rendezvous, an elastic change and the next rendezvous, with timings."""
    n = args.nodes
    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    nnodes = (n - 1, n)
    kind = "threads" if args.threads else "processes"
    progress = _Progress()
    with EtcdServer() as etcd:
        endpoint = etcd.get_endpoint()
        print(f"rdzv demo: {n} nodes as {kind}, etcd {etcd.etcd_version} at {endpoint} "
              f"({etcd.etcd_binary}), run {run_id}, "
              f"nnodes {n - 1}:{n}, lease_ttl {_DEMO_LEASE_TTL} s, "
              f"last_call_timeout {_DEMO_LAST_CALL_S:g} s", flush=True)
        fleet = _Fleet(endpoint, run_id, nnodes, args.threads, args.log_level)
        try:
            started = time.monotonic()
            nodes = set(range(n))
            for index in sorted(nodes):
                fleet.spawn(index)
            _collect(fleet, nodes, "ready", f"starting {kind}", progress)
            print(f"{n} nodes connected in {time.monotonic() - started:.1f} s; "
                  "rounds are timed from the moment they are told to join", flush=True)

            first = _Round(f"{n} nodes start together", time.time(), {})
            for index in sorted(nodes):
                fleet.send(index, "join")
            first.results = _collect(fleet, nodes, "round", "first round: nodes returned",
                                     progress)
            first_round, _ = _check_round(first.results)

            # The elastic change: one node dies, a late one arrives and waits; the
            # survivors re-rendezvous once they see it waiting, as torchrun's agents
            # do when num_nodes_waiting() > 0.
            victim = next(i for i, r in first.results.items() if r["rank"] == n // 2)
            how = fleet.kill(victim)
            late = n
            fleet.spawn(late)
            _collect(fleet, {late}, "ready", "starting the late node", progress)
            fleet.send(late, "join")
            survivors = nodes - {victim}
            _wait_for_waiting_node(fleet, min(survivors), progress)
            second = _Round(f"{n - 1} survivors + 1 late node", time.time(), {})
            for index in sorted(survivors):
                fleet.send(index, "join")
            second.results = _collect(fleet, survivors | {late}, "round",
                                      "second round: nodes returned", progress)
            second_round, _ = _check_round(second.results)
        finally:
            progress.clear()
            fleet.close()

    rows = []
    for number, record in ((first_round, first), (second_round, second)):
        seconds = record.seconds()
        rows.append((number, len(record.results), record.label,
                     f"{seconds[0]:.3f}", f"{seconds[len(seconds) // 2]:.3f}",
                     f"{seconds[-1]:.3f}"))
    print()
    print("\n".join(_table(
        ("round", "world", "who", "first return s", "median s", "last return s"), rows,
        right=("round", "world", "first return s", "median s", "last return s"),
    )))
    before, after = first.results, second.results
    kept = sum(after[i]["node"] == before[i]["node"] and after[i]["rank"] == before[i]["rank"]
               for i in survivors)
    print()
    print(f"node {victim} (rank {before[victim]['rank']}) was {how} after round "
          f"{first_round}; the late node got rank {after[late]['rank']}; "
          f"{kept}/{len(survivors)} survivors kept their rank.")
    rejoined = sum(after[i]["node"] != before[i]["node"] for i in survivors)
    if rejoined:
        print(f"{rejoined} survivors lost their lease between the rounds (stalled for over "
              f"{_DEMO_LEASE_TTL} s: is the machine overloaded?) and rejoined as new nodes.")
    return ExitCode.OK


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``rdzv demo`` and its hidden ``demo-node`` to ``commands``."""
    demo = commands.add_parser(
        "demo", parents=[_log_options()], formatter_class=_RAW,
        help="watch N nodes rendezvous, lose one, gain one, and rendezvous again",
        description=_wrap(
            "Start an embedded etcd and N nodes (processes by default), run one round, "
            "kill one node with SIGKILL, add a late node, run the next round with the "
            "survivors and the late node, and print a table of the rounds."
        ),
        epilog=_example("rdzv demo", "rdzv demo --nodes 8 --threads"),
    )
    demo.add_argument("--nodes", type=_at_least(2), default=64, help="nodes (default 64)")
    demo.add_argument("--threads", action="store_true",
                      help="run the nodes as threads of this process, not as processes "
                      "(the 'killed' node then leaves cleanly instead)")
    demo.set_defaults(func=_cmd_demo)

    # The demo's node processes; not listed in the help.
    node = commands.add_parser("demo-node", parents=[_log_options()])
    node.add_argument("--endpoint", required=True)
    node.add_argument("--run-id", required=True)
    node.add_argument("--nnodes", required=True, type=_nnodes)
    node.set_defaults(func=_cmd_demo_node)
