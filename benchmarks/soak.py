"""Soak: hundreds of rendezvous rounds under random faults, checked after every round.

A fleet of node processes (one rdzv node each) runs round after round against a
3-member etcd cluster started here, while the driver injects faults at random:

``node_kill_idle``      SIGKILL a node between rounds (its lease then expires)
``node_kill_waiting``   SIGKILL a late or surplus node while it waits
``node_kill_mid_join``  SIGKILL a node a few ms into a round (any phase)
``node_restart``        SIGKILL a node and start a fresh process in its place
``node_stall``          SIGSTOP a joining node until its lease expired, then SIGCONT
``node_start``          start extra nodes (the fleet grows back)
``leader_kill``         SIGKILL the etcd leader mid-round; restart it after the round
``member_restart``      SIGKILL an etcd follower mid-round and restart it at once
``close``               a node closes the run; every node must see it closed; a new
                        run (new run id) starts on the same processes

With ``--hosts`` (root, iproute2 and iptables: see ``tests/hosts.py``) every node
and every etcd member runs on a test host of its own (a network namespace on a
bridge), and partitions join the faults:

``host_cut``            cut a joining node's host off from etcd and every host
                        until its lease expired, then heal
``host_cut_etcd``       the same, from the etcd members only (hosts still reach it)
``host_deaf``           drop etcd's answers to a joining node's host (its requests
                        still arrive) until its lease expired, then heal
``member_cut``          cut an etcd member (the leader half the time) off from the
                        other members and from half the hosts mid-round; heal it
                        after the round

After every round the driver checks, against the records etcd holds:

1. agreement: every node that returned from round r has the rank that round r's
   world record gives its node id, the world size is the record's, and all got
   the same ``MASTER_ADDR``/``MASTER_PORT``; the record never changes;
2. bounds: ``min_nodes <= world_size <= max_nodes``;
3. validity: a world holds only nodes that were asked to join, and never a node
   killed while idle (it cannot have confirmed);
4. progress: a round completes within the step deadline (30 s), and every live
   world member returns from it (a stalled one may instead be told it lost its
   lease); round numbers only grow per node;
6. closed: after a close, every live node gets ``RendezvousClosedError``;
8. faults: errors are ``RendezvousConnectionError``/``RendezvousTimeoutError``
   only within 30 s of an etcd fault, or name a lost lease. A lease lost with no
   stall or etcd fault to explain it (keep-alives starved on a busy machine) is
   counted apart: it is the designed outcome for a node silent past its TTL. A
   node that got an error joins again at once, as an agent would.

A round that does not complete is reported, then the run is closed and a new one
started, so that one violation does not end the soak.

Anything else is printed as a violation, with the seed and the step, and counted.

After every step, and before a violation is reported, the driver checks that
etcd's members that applied the same raft entries hold the same revision. etcd
3.5.0-3.5.2 (the embedded 3.5.1 among them) can break that after a member was
killed under writes (etcd bug 13766); the soak then stops and says so, since
the records it would check next are ones etcd no longer agrees on.

Usage::

    python benchmarks/soak.py                          # 500 rounds, 32 nodes
    python benchmarks/soak.py --rounds 100 --nodes 16 --seed 7
    python benchmarks/soak.py --minutes 10 --rounds 100000
    python benchmarks/soak.py --hosts --rounds 200      # nodes on test hosts, as root
"""

from __future__ import annotations

import argparse
import collections
import datetime
import faulthandler
import importlib.metadata
import json
import os
import platform
import queue
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

from join_latency import Metrics

from rdzv import _state
from rdzv.api import RendezvousConnectionError, RendezvousError, RendezvousParameters
from rdzv.etcd_rendezvous import create_rdzv_handler
from rdzv.etcd_server import EtcdCluster
from rdzv.inspect import read_world
from rdzv.keys import RunKeys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import hosts  # the test-host harness, tests/hosts.py

FAULTS = (
    "node_kill_idle",
    "node_kill_waiting",
    "node_kill_mid_join",
    "node_restart",
    "node_stall",
    "node_start",
    "leader_kill",
    "member_restart",
    "close",
)
HOST_FAULTS = ("host_cut", "host_cut_etcd", "host_deaf", "member_cut")
# Chance per step of each fault (several may hit one step).
FAULT_ODDS = {
    "node_kill_idle": 0.12,
    "node_kill_waiting": 0.05,
    "node_kill_mid_join": 0.10,
    "node_restart": 0.08,
    "node_stall": 0.04,
    "node_start": 0.3,
    "leader_kill": 0.04,
    "member_restart": 0.03,
    "close": 0.02,
    "host_cut": 0.08,
    "host_cut_etcd": 0.06,
    "host_deaf": 0.06,
    "member_cut": 0.08,
}
DEFAULT_LEASE_TTL = 3
LAST_CALL = 0.5
NODE_TIMEOUT = 90
STEP_DEADLINE = 30.0
PREFIX = "/rdzv"


# ====================================================================== worker
def worker_main(endpoint: str, min_nodes: int, max_nodes: int, lease_ttl: int) -> None:
    """One rdzv node; commands on stdin, one JSON line per answer on stdout.

    ``run ID``: (re)create the handler for run ID, answer ``{"node_id"}``;
    ``join``: ``next_rendezvous()``, answer the result or the error;
    ``close``: ``set_closed()``; ``exit``: shut down.
    """
    handler = None
    # The driver asks a node stuck in a round for its threads' stacks (to stderr,
    # the worker log) with SIGUSR1.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    def answer(payload: dict[str, Any]) -> None:
        print(json.dumps(payload), flush=True)

    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "run":
            if handler is not None:
                handler.shutdown()
            params = RendezvousParameters(
                "etcd", endpoint, argument, min_nodes, max_nodes,
                lease_ttl=lease_ttl, last_call_timeout=LAST_CALL, timeout=NODE_TIMEOUT,
            )
            handler = create_rdzv_handler(params)
            answer({"node_id": handler.node_id})
        elif command == "join":
            try:
                info = handler.next_rendezvous()
                store = info.bootstrap_store_info
                answer({
                    "node_id": handler.node_id, "round": handler.round, "rank": info.rank,
                    "world_size": info.world_size,
                    "master": f"{store.master_addr}:{store.master_port}",
                })
            except RendezvousError as err:
                answer({"node_id": handler.node_id, "error": type(err).__name__,
                        "message": str(err)})
        elif command == "close":
            try:
                handler.set_closed()
                answer({"closed": True})
            except RendezvousError as err:
                answer({"error": type(err).__name__, "message": str(err)})
        elif command == "exit":
            break
    if handler is not None:
        handler.shutdown()


# ====================================================================== driver
@dataclass
class Worker:
    """The driver's view of one node process."""

    index: int
    proc: subprocess.Popen
    host: hosts.Host | None = None
    node_id: str = ""
    pending: bool = False
    stalled: bool = False
    renewing: bool = False
    last_round: int = -1
    last_answer: str = ""

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)


class Violation(Exception):
    """A guarantee did not hold."""


class EtcdDiverged(Exception):
    """etcd's members no longer agree on their data (etcd's fault)."""


class Soak:
    """The fleet, the etcd cluster, the faults and the checks."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.nodes = args.nodes
        self.min_nodes = max(2, args.nodes // 4)
        self.max_nodes = max(self.min_nodes, args.nodes - args.nodes // 8)
        self.net: hosts.Network | None = None
        self.free_hosts: list[hosts.Host] = []
        self.cut_member: hosts.Host | None = None
        if args.hosts:
            self.net = hosts.Network()
            etcd_hosts = [self.net.add_host(f"e{i}") for i in range(3)]
            self.etcd_hosts = etcd_hosts
            self.cluster = self.net.etcd_cluster(etcd_hosts)
        else:
            self.cluster = EtcdCluster(size=3)
        try:
            self.cluster.start()
        except BaseException:
            if self.net is not None:
                self.net.close()
            raise
        self.endpoint = self.cluster.get_endpoint()
        self.client = self.cluster.get_rdzv_client(connect_timeout=30)
        self.etcd_version = self.client.status().version
        if _loses_writes_when_killed(self.etcd_version):
            print(f"soak: etcd {self.etcd_version} can lose writes on a member killed under "
                  "load (etcd bug 13766, 3.5.0-3.5.2): the soak stops if its members "
                  "diverge. RDZV_ETCD_BINARY can name an etcd 3.4, or 3.5.3 and later.",
                  flush=True)
        self.results: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        self.workers: dict[int, Worker] = {}
        self.next_index = 0
        self.run_id = ""
        self.faults: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.violations: list[str] = []
        self.etcd_checked_at = -1  # the step whose violations checked etcd's members
        self.rounds_checked = 0
        self.runs = 0
        self.world_sizes: list[int] = []
        self.step_seconds: dict[str, list[float]] = collections.defaultdict(list)
        self.worlds: dict[int, list[str]] = {}
        self.reported: dict[int, dict[str, dict[str, Any]]] = {}
        self.dead_idle: set[str] = set()
        self.lapsed: set[str] = set()
        self.asked: set[str] = set()
        self.known: set[str] = set()
        self.step = 0
        self.down_member: int | None = None
        self.etcd_fault_at = -1e9
        self.started = time.monotonic()
        self.retries = 0
        self.unexplained_lapses = 0
        self.etcd_slow = 0
        self.checked: set[int] = set()
        self.worker_log = open(args.worker_log, "a") if args.worker_log else subprocess.DEVNULL

    # ------------------------------------------------------------ processes
    def start_worker(self) -> Worker:
        host = None
        launcher: list[str] = []
        if self.net is not None:
            host = self.free_hosts.pop() if self.free_hosts else self.net.add_host()
            launcher = host.launcher()
        proc = subprocess.Popen(
            [*launcher, sys.executable, os.path.abspath(__file__), "--worker", self.endpoint,
             str(self.min_nodes), str(self.max_nodes), str(self.args.lease_ttl)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.worker_log,
            text=True, start_new_session=True,
        )
        worker = Worker(self.next_index, proc, host)
        self.next_index += 1
        self.workers[worker.index] = worker
        threading.Thread(target=self._read, args=(worker,), daemon=True).start()
        if self.run_id:
            self._enter_run(worker)
        return worker

    def _read(self, worker: Worker) -> None:
        assert worker.proc.stdout is not None
        for line in worker.proc.stdout:
            self.results.put((worker.index, json.loads(line)))

    def _enter_run(self, worker: Worker) -> None:
        worker.send(f"run {self.run_id}")
        worker.node_id = self._answer_of(worker)["node_id"]
        worker.last_round = -1
        worker.renewing = False
        self.known.add(worker.node_id)

    def _answer_of(self, worker: Worker, timeout: float = 60.0) -> dict[str, Any]:
        """The next answer of ``worker``; others' answers are handled meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                index, answer = self.results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise Violation(f"node {worker.index} did not answer in {timeout} s") from None
            if index == worker.index:
                return answer
            self._handle(index, answer)

    def kill(self, worker: Worker) -> None:
        if not worker.pending:
            # Not in next_rendezvous(): it cannot be in any later round's world.
            self.dead_idle.add(worker.node_id)
        worker.signal(signal.SIGKILL)
        worker.proc.wait()
        del self.workers[worker.index]
        if worker.host is not None:
            self.free_hosts.append(worker.host)

    def alive(self) -> list[Worker]:
        return list(self.workers.values())

    def idle(self) -> list[Worker]:
        return [w for w in self.workers.values() if not w.pending]

    def pending(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.pending]

    # ------------------------------------------------------------------ runs
    def new_run(self) -> None:
        self.run_id = f"soak-{uuid.UUID(int=self.rng.getrandbits(128))}"
        self.runs += 1
        self.worlds.clear()
        self.reported.clear()
        self.checked.clear()
        self.dead_idle.clear()
        self.lapsed.clear()
        self.asked.clear()
        self.known.clear()
        self.keys = RunKeys(PREFIX, self.run_id)
        for worker in self.alive():
            self._enter_run(worker)

    # --------------------------------------------------------------- results
    def _handle(self, index: int, answer: dict[str, Any]) -> None:
        worker = self.workers.get(index)
        if worker is None:
            return  # a node killed after it printed
        worker.pending = False
        worker.last_answer = f"step {self.step}: {answer}"
        if "error" in answer:
            self._on_error(worker, answer)
            return
        if "round" not in answer:
            return
        round_number = answer["round"]
        worker.node_id = answer["node_id"]
        worker.renewing = False
        self.known.add(worker.node_id)
        if round_number <= worker.last_round:
            self.violation(f"node {index} went from round {worker.last_round} to "
                           f"{round_number}")
        worker.last_round = round_number
        # A node that lost its lease re-joins under a new id: its answer shows it.
        self.asked.add(answer["node_id"])
        self.reported.setdefault(round_number, {})[answer["node_id"]] = answer

    def _on_error(self, worker: Worker, answer: dict[str, Any]) -> None:
        kind = answer["error"]
        lost_lease = "lease" in answer["message"]
        self.errors[kind + (" (lost lease)" if lost_lease else "")] += 1
        worker.node_id = answer.get("node_id", worker.node_id)
        self.known.add(worker.node_id)
        # It asked under this id: a node that renewed its lease at the start of
        # the call can be in a world under it, then be cut off before answering.
        self.asked.add(worker.node_id)
        if kind == "RendezvousClosedError":
            return
        since_etcd_fault = time.monotonic() - self.etcd_fault_at
        worker.renewing = lost_lease
        if lost_lease:
            # Dropped like a dead node: it may be missing from a round it confirmed.
            # Its next join is a new node's, under an id we learn from its answer.
            self.lapsed.add(worker.node_id)
            if not worker.stalled and since_etcd_fault >= 30:
                # Keep-alives starved past the TTL with no fault injected: the
                # machine was too busy. Designed behaviour, counted, not a violation.
                self.unexplained_lapses += 1
        elif kind == "RendezvousConnectionError" and "deadline exceeded" in answer["message"] \
                and since_etcd_fault >= 30:
            # etcd itself answered "too slow" (overloaded machine): guarantee 8
            # allows the error; counted apart from the faults injected.
            self.etcd_slow += 1
        elif not (
            # A node stalled or cut off past its lease may also fail reaching etcd.
            (kind in ("RendezvousConnectionError", "RendezvousTimeoutError") and worker.stalled)
            or (kind == "RendezvousConnectionError" and since_etcd_fault < 30)
            or (kind == "RendezvousTimeoutError" and since_etcd_fault < NODE_TIMEOUT + 30)
        ):
            self.violation(f"node {worker.index}: unexpected {kind}: {answer['message']}")
        # An agent retries a failed rendezvous; so does this one, at once.
        self.retries += 1
        worker.send("join")
        worker.pending = True

    def violation(self, message: str) -> None:
        if self.etcd_checked_at != self.step:  # once a step: a check can take 2 s
            self.etcd_checked_at = self.step
            self._stop_if_etcd_diverged()
        text = f"seed={self.args.seed} step={self.step} run={self.run_id}: {message}"
        self.violations.append(text)
        print("VIOLATION", text, flush=True)

    # ----------------------------------------------------------------- etcd
    def _state(self) -> Any:
        got = self.client.get(self.keys.state)
        return None if got is None else _state.decode_state(got[0], self.keys.state)

    def _world(self, round_number: int) -> list[str] | None:
        got = read_world(self.client, self.keys, round_number)
        return None if got is None else got[0]

    def _wait_for_etcd(self) -> None:
        """Wait until etcd answers the driver again (three connect_timeouts)."""
        for attempt in range(3):
            try:
                self.client.status()
                return
            except RendezvousConnectionError:
                if attempt == 2:
                    raise

    def etcd_divergence(self) -> str:
        """How etcd's members disagree on their data, or "" if they agree.

        Members that applied the same raft entries must hold the same revision.
        etcd 3.5.0-3.5.2 can break that: a member killed while it applies
        writes can come back without some of them (etcd bug 13766, fixed in
        3.5.3). Reads then depend on the member that answers, and the
        soak's checks would blame rdzv for what etcd lost. Only members caught
        up with each other are compared (etcd's metrics give both numbers),
        twice in a row to rule out a write applied between the two."""
        seen = None
        for _ in range(40):
            answered = [(member.name, *got) for member in self.cluster.members
                        if (got := _applied_and_revision(member)) is not None]
            if len(answered) >= 2 and len({applied for _, applied, _ in answered}) == 1:
                if len({revision for _, _, revision in answered}) == 1:
                    return ""
                if answered == seen:
                    return (f"etcd's members applied the same raft entries (index "
                            f"{answered[0][1]}) but hold different revisions: "
                            + ", ".join(f"{name} {revision}" for name, _, revision in answered))
                seen = answered
            time.sleep(0.05)
        return ""

    def _lease_alive(self, node_id: str) -> bool:
        # TTL is whole seconds left, 0 in the last one; -1 once the lease is gone.
        return self.client.lease_time_to_live(int(node_id, 16)) >= 0

    # --------------------------------------------------------------- checks
    def check_round(self, round_number: int) -> None:
        """Guarantees 1-3 for a round whose live members have all returned."""
        world = self.worlds[round_number]
        again = self._world(round_number)
        if again != world:
            self.violation(f"round {round_number}'s world changed: {world} then {again}")
        if not self.min_nodes <= len(world) <= self.max_nodes:
            self.violation(f"round {round_number} has {len(world)} nodes, outside "
                           f"[{self.min_nodes}, {self.max_nodes}]")
        masters = set()
        for node_id, answer in self.reported[round_number].items():
            if node_id not in world:
                self.violation(f"node {node_id} returned from round {round_number} "
                               f"but is not in its world {world}")
                continue
            if answer["rank"] != world.index(node_id) or answer["world_size"] != len(world):
                self.violation(f"node {node_id} got rank {answer['rank']} of "
                               f"{answer['world_size']} in round {round_number}, world {world}")
            masters.add(answer["master"])
        if len(masters) > 1:
            self.violation(f"round {round_number}: several MASTER_ADDR:PORT {masters}")
        if set(world) - self.asked:
            self.violation(f"round {round_number} holds nodes never asked to join: "
                           f"{set(world) - self.asked}")
        if set(world) & self.dead_idle:
            self.violation(f"round {round_number} holds nodes killed while idle: "
                           f"{set(world) & self.dead_idle}")
        self.rounds_checked += 1
        self.world_sizes.append(len(world))

    def _round_complete(self, round_number: int) -> bool:
        """Whether every live member of the round's world has returned from it."""
        if round_number not in self.worlds:
            world = self._world(round_number)
            if world is None:
                self.violation(f"nodes returned from round {round_number}, which has no world")
                world = []
            self.worlds[round_number] = world
        # A node stalled past its lease may have confirmed, then been dropped: it
        # is told it lost its lease instead of the round's result, as if it died.
        live = {w.node_id for w in self.alive()} - self.lapsed
        # An id never seen is a node that renewed its lease inside its join: while
        # such a node is still joining, it may be this member.
        renewing = any(w.renewing for w in self.alive())
        reported = self.reported[round_number]
        return all(
            n in reported or (n not in live and (n in self.known or not renewing))
            for n in self.worlds[round_number]
        )

    def check_complete_rounds(self) -> None:
        for round_number in sorted(self.reported):
            if round_number not in self.checked and self._round_complete(round_number):
                self.check_round(round_number)
                self.checked.add(round_number)

    def collect(self, start_round: int) -> None:
        """Handle answers until a round after ``start_round`` completed and the run
        is quiet: every live member of the newest round returned, and the state is
        that round, final (or the next one, opened by waiting nodes after a death).
        """
        deadline = time.monotonic() + STEP_DEADLINE
        while True:
            try:
                index, answer = self.results.get(timeout=0.05)
                self._handle(index, answer)
                continue
            except queue.Empty:
                pass
            newest = max(self.reported, default=-1)
            if newest > start_round and all(
                    self._round_complete(r) for r in self.reported if r > start_round):
                state = self._state()
                if state is not None and (
                        (state.status == _state.Status.FINAL and state.round == newest)
                        or (state.status == _state.Status.JOINABLE
                            and state.round == newest + 1)):
                    self.check_complete_rounds()
                    return
            if time.monotonic() > deadline:
                if self.worker_log is not subprocess.DEVNULL:
                    for worker in self.pending():
                        print(f"--- node {worker.index} ({worker.node_id}), stuck at step "
                              f"{self.step}:", file=self.worker_log, flush=True)
                        worker.signal(signal.SIGUSR1)
                        time.sleep(0.2)  # one dump at a time in the shared log
                by_id = {w.node_id: w for w in self.alive()}
                missing = {
                    r: [f"{n} (node {by_id[n].index}, pending={by_id[n].pending}, "
                        f"last answer {by_id[n].last_answer[:200]})" if n in by_id else n
                        for n in sorted(set(self.worlds.get(r, [])) - set(self.reported[r]))]
                    for r in self.reported if r > start_round
                }
                raise Violation(
                    f"no round completed within {STEP_DEADLINE:g} s: state {self._state()}, "
                    f"{len(self.pending())} of {len(self.alive())} nodes still joining, "
                    f"faults {self.step_faults}, rounds reported since {start_round}: "
                    f"{sorted(r for r in self.reported if r > start_round)}, "
                    f"world members that did not return: {missing}"
                )

    # --------------------------------------------------------------- faults
    def fault(self, kind: str) -> None:
        self.faults[kind] += 1
        self.step_faults.append(kind)

    def before_joins(self) -> None:
        rng = self.rng
        floor = self.min_nodes + 3
        idle = self.idle()
        if idle and len(self.alive()) > floor and rng.random() < FAULT_ODDS["node_kill_idle"]:
            self.fault("node_kill_idle")
            self.kill(rng.choice(idle))
        waiting = self.pending()
        if waiting and len(self.alive()) > floor \
                and rng.random() < FAULT_ODDS["node_kill_waiting"]:
            self.fault("node_kill_waiting")
            self.kill(rng.choice(waiting))
        idle = self.idle()
        if idle and rng.random() < FAULT_ODDS["node_restart"]:
            self.fault("node_restart")
            self.kill(rng.choice(idle))
            self.start_worker()
        if len(self.alive()) < self.nodes and rng.random() < FAULT_ODDS["node_start"]:
            self.fault("node_start")
            for _ in range(rng.randint(1, self.nodes - len(self.alive()))):
                self.start_worker()
        while len(self.alive()) < floor:
            self.start_worker()

    def during_joins(self) -> None:
        rng = self.rng
        floor = self.min_nodes + 3
        if rng.random() < FAULT_ODDS["leader_kill"] and self.down_member is None:
            self.fault("leader_kill")
            self.etcd_fault_at = time.monotonic()
            time.sleep(rng.uniform(0, 0.2))  # a random moment of the round
            self.down_member = self.cluster.leader()
            self.cluster.members[self.down_member].kill()
        elif rng.random() < FAULT_ODDS["member_restart"] and self.down_member is None:
            self.fault("member_restart")
            self.etcd_fault_at = time.monotonic()
            time.sleep(rng.uniform(0, 0.2))
            leader = self.cluster.leader()
            follower = rng.choice([i for i in range(3) if i != leader])
            self.cluster.members[follower].kill()
            self.cluster.members[follower].restart()
        joining = self.pending()
        odds = FAULT_ODDS["node_kill_mid_join"]
        if joining and len(self.alive()) > floor and rng.random() < odds:
            self.fault("node_kill_mid_join")
            time.sleep(rng.uniform(0, 0.15))  # rounds take 0.1-1 s: any phase
            self.kill(rng.choice(joining))
        joining = [w for w in self.pending() if w.node_id]
        if joining and len(self.alive()) > floor and rng.random() < FAULT_ODDS["node_stall"]:
            self.fault("node_stall")
            victim = rng.choice(joining)
            time.sleep(rng.uniform(0, 0.1))
            stalled_id = victim.node_id
            self.lapsed.add(stalled_id)
            victim.stalled = True
            victim.signal(signal.SIGSTOP)
            deadline = time.monotonic() + self.args.lease_ttl + 10
            while self._lease_alive(stalled_id) and time.monotonic() < deadline:
                time.sleep(0.1)
            victim.signal(signal.SIGCONT)
        if self.net is not None:
            self.partitions()

    def partitions(self) -> None:
        """Faults of the hosts mode: partitions of node hosts and etcd members."""
        assert self.net is not None
        rng = self.rng
        floor = self.min_nodes + 3
        if self.cut_member is None and self.down_member is None \
                and rng.random() < FAULT_ODDS["member_cut"]:
            self.fault("member_cut")
            self.etcd_fault_at = time.monotonic()
            time.sleep(rng.uniform(0, 0.2))
            leader = self.cluster.leader()
            others = [i for i in range(3) if i != leader]
            member = self.etcd_hosts[leader if rng.random() < 0.5 else rng.choice(others)]
            node_hosts = [w.host for w in self.alive() if w.host is not None]
            half = rng.sample(node_hosts, len(node_hosts) // 2)
            self.net.cut(member, [*(h for h in self.etcd_hosts if h is not member), *half])
            self.cut_member = member
        for kind in ("host_cut", "host_cut_etcd", "host_deaf"):
            joining = [w for w in self.pending() if w.node_id and not w.stalled]
            if not joining or len(self.alive()) <= floor or rng.random() >= FAULT_ODDS[kind]:
                continue
            self.fault(kind)
            victim = rng.choice(joining)
            assert victim.host is not None
            time.sleep(rng.uniform(0, 0.1))
            victim_id = victim.node_id
            self.lapsed.add(victim_id)
            victim.stalled = True
            if kind == "host_cut":
                self.net.isolate(victim.host)
            elif kind == "host_cut_etcd":
                self.net.cut(victim.host, self.etcd_hosts)
            else:
                self.net.cut(victim.host, self.etcd_hosts, direction="in")
            deadline = time.monotonic() + self.args.lease_ttl + 10
            while self._lease_alive(victim_id) and time.monotonic() < deadline:
                time.sleep(0.1)
            self.net.heal(victim.host)

    def heal_etcd(self) -> None:
        """Bring back the etcd member killed or cut off during the step."""
        if self.down_member is not None:
            self.cluster.members[self.down_member].restart()
            self.down_member = None
        if self.cut_member is not None:
            assert self.net is not None
            self.net.heal(self.cut_member)
            self.cut_member = None

    def close_run(self, recovery: bool = False) -> None:
        """A node closes the run: every live node must see it closed (guarantee 6).

        With ``recovery``, this ends a run that stopped making progress.
        """
        if not recovery:
            self.fault("close")
        if self.idle():
            closer = self.rng.choice(self.idle())
            closer.send("close")
            answer = self._answer_of(closer)
            if answer.get("closed") is not True:
                self.violation(f"close failed: {answer}")
        else:  # every node is stuck in a join: close from here
            handler = create_rdzv_handler(RendezvousParameters(
                "etcd", self.endpoint, self.run_id, self.min_nodes, self.max_nodes))
            handler.set_closed()
            handler.shutdown()
        for worker in self.idle():
            worker.send("join")
            worker.pending = True
        deadline = time.monotonic() + STEP_DEADLINE
        closed: set[int] = set()
        while len(closed) < len(self.alive()) and time.monotonic() < deadline:
            try:
                index, answer = self.results.get(timeout=1)
            except queue.Empty:
                continue
            if index not in self.workers:
                continue
            worker = self.workers[index]
            worker.pending = False
            if answer.get("error") == "RendezvousClosedError":
                closed.add(index)
            elif "round" in answer:
                # A round that waiting nodes completed just before the close.
                self._handle(index, answer)
                worker.send("join")
                worker.pending = True
            elif "error" in answer:
                self._on_error(worker, answer)  # judged as anywhere; joins again
            else:
                self.violation(f"node {index} answered {answer} after the close")
                closed.add(index)
        self.check_complete_rounds()
        if len(closed) < len(self.alive()):
            self.violation(f"{len(self.alive()) - len(closed)} nodes never saw the close")
        self.new_run()

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        args = self.args
        started = self.started
        self.new_run()
        for _ in range(self.nodes):
            self.start_worker()
        last_round = -1
        while self.rounds_checked < args.rounds and \
                time.monotonic() - started < args.minutes * 60:
            self.step += 1
            self.step_faults: list[str] = []
            if self.idle() and self.rng.random() < FAULT_ODDS["close"]:
                self.close_run()
                last_round = -1
            self.before_joins()
            step_start = time.monotonic()
            for worker in self.idle():
                worker.stalled = False
                worker.send("join")
                worker.pending = True
                self.asked.add(worker.node_id)
            try:
                self.during_joins()
                self.collect(last_round)
            except (Violation, RendezvousConnectionError) as err:
                if isinstance(err, RendezvousConnectionError):
                    self.violation(f"the driver could not reach etcd: {err}")
                    self._wait_for_etcd()
                else:
                    self.violation(str(err))
                self.heal_etcd()
                self.close_run(recovery=True)
                last_round = -1
                continue
            last_round = max(self.reported)
            self.step_seconds[",".join(sorted(set(self.step_faults))) or "none"].append(
                time.monotonic() - step_start)
            self.heal_etcd()
            self._stop_if_etcd_diverged()
            if args.verbose:
                print(f"step {self.step}: round {last_round} of run {self.runs}, "
                      f"{len(self.alive())} nodes, faults {self.step_faults}", flush=True)
            elif self.step % 25 == 0:
                print(f"... {self.rounds_checked} rounds, {sum(self.faults.values())} faults, "
                      f"{len(self.violations)} violations, "
                      f"{time.monotonic() - started:.0f} s", flush=True)

    def _stop_if_etcd_diverged(self) -> None:
        diverged = self.etcd_divergence()
        if diverged:
            raise EtcdDiverged(
                f"step {self.step}: {diverged}. That is etcd's fault, not rdzv's (etcd "
                f"{self.etcd_version}; etcd bug 13766 affects 3.5.0-3.5.2, where a member "
                "killed under writes can come back without some of them): what the "
                "soak would check from here reads data etcd no longer agrees on. Run it "
                "on etcd 3.4 or 3.5.3 and later (RDZV_ETCD_BINARY).")

    def shutdown(self) -> None:
        for worker in self.alive():
            try:
                worker.signal(signal.SIGCONT)
                worker.signal(signal.SIGKILL)
                worker.proc.wait()
            except ProcessLookupError:
                pass
        self.client.close()
        self.cluster.stop()
        if self.net is not None:
            self.net.close()
        if self.worker_log is not subprocess.DEVNULL:
            self.worker_log.close()

    # --------------------------------------------------------------- report
    def report(self) -> None:
        args = self.args
        print()
        print(f"rdzv soak, {datetime.date.today().isoformat()}: seed {args.seed}, "
              f"{self.nodes} node processes (min_nodes={self.min_nodes}, "
              f"max_nodes={self.max_nodes}), lease_ttl={self.args.lease_ttl} s, "
              f"last_call_timeout={LAST_CALL} s"
              + (", every node and etcd member on a test host of its own" if self.net else ""))
        print(f"rdzv {_version('rdzv')}, etcd {self.etcd_version}, grpcio "
              f"{_version('grpcio')}, protobuf {_version('protobuf')}, Python "
              f"{platform.python_version()}, {platform.system()} {platform.machine()}, "
              f"{os.cpu_count()} cores")
        print(f"rounds checked   {self.rounds_checked}  ({self.runs} runs, {self.step} steps, "
              f"{(time.monotonic() - self.started) / 60:.1f} min)")
        if self.world_sizes:
            print(f"world size       min {min(self.world_sizes)}, median "
                  f"{statistics.median(self.world_sizes):g}, max {max(self.world_sizes)}")
        print(f"faults injected  {sum(self.faults.values())}")
        for kind in FAULTS + (HOST_FAULTS if self.net else ()):
            print(f"  {kind:<20} {self.faults[kind]}")
        print(f"errors returned  {sum(self.errors.values())}  (then joined again: "
              f"{self.retries}; with no fault injected, machine too busy: "
              f"{self.unexplained_lapses} leases lapsed, {self.etcd_slow} requests timed "
              f"out in etcd)")
        for kind, count in sorted(self.errors.items()):
            print(f"  {kind:<28} {count}")
        print("step time (s) by faults in the step: n, median, max")
        for kinds, times in sorted(self.step_seconds.items(), key=lambda kv: -len(kv[1])):
            print(f"  {kinds:<44} {len(times):>4} {statistics.median(times):>6.2f} "
                  f"{max(times):>6.2f}")
        print(f"violations       {len(self.violations)}")
        for text in self.violations:
            print(f"  {text}")


def _loses_writes_when_killed(version: str) -> bool:
    """Whether etcd ``version`` has bug 13766 (3.5.0 to 3.5.2)."""
    parts = version.split(".")
    return parts[:2] == ["3", "5"] and len(parts) > 2 and parts[2].isdigit() \
        and int(parts[2]) <= 2


def _applied_and_revision(member: Any) -> tuple[int, int] | None:
    """A running member's raft applied index and revision, from its metrics."""
    if not member.is_running():
        return None
    try:
        metrics = Metrics.scrape(member.get_metrics_url(), timeout=2)
    except OSError:
        return None
    return (int(metrics.sum("etcd_server_proposals_applied_total")),
            int(metrics.sum("etcd_debugging_mvcc_current_revision")))


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        endpoint, min_nodes, max_nodes, lease_ttl = sys.argv[2:6]
        worker_main(endpoint, int(min_nodes), int(max_nodes), int(lease_ttl))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=500, help="rounds to check (500)")
    parser.add_argument("--nodes", type=int, default=32, help="node processes (32)")
    parser.add_argument("--seed", type=int, default=20261125, help="random seed")
    parser.add_argument("--minutes", type=float, default=60.0,
                        help="stop after this many minutes even if --rounds is not reached")
    parser.add_argument("--lease-ttl", type=int, default=DEFAULT_LEASE_TTL,
                        help=f"the nodes' lease_ttl in seconds ({DEFAULT_LEASE_TTL})")
    parser.add_argument("--hosts", action="store_true",
                        help="nodes and etcd members on test hosts, partitions among the "
                        "faults (root, iproute2, iptables)")
    parser.add_argument("-v", "--verbose", action="store_true", help="a line per step")
    parser.add_argument("--worker-log", metavar="FILE",
                        help="append the nodes' stderr (rdzv's warnings) to FILE")
    args = parser.parse_args()
    if args.nodes < 4:
        parser.error("--nodes must be at least 4")
    if args.hosts and hosts.unavailable():
        parser.error(f"--hosts: {hosts.unavailable()}")
    # SIGTERM (and SIGINT, which background jobs ignore) end the soak early, with
    # its report and without leaving node processes or etcd behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    soak = Soak(args)
    stopped = ""
    try:
        soak.run()
    except KeyboardInterrupt:
        stopped = "interrupted before the end"
    except EtcdDiverged as err:
        stopped = f"stopped: {err}"
    except Exception:  # the report of what ran is still worth having
        traceback.print_exc()
        stopped = "aborted by the error above"
    finally:
        soak.shutdown()
    soak.report()
    if stopped:
        print(stopped)
    return 1 if soak.violations or stopped else 0


if __name__ == "__main__":
    sys.exit(main())
