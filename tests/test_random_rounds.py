"""A seeded, reproducible run of many rounds with random joins, kills and restarts
of real node processes, checking guarantees 1-7 of PROTOCOL.md after every round.

Set RDZV_RANDOM_SEED to replay a failure; the seed is in every assertion message.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from collections import defaultdict
from typing import Any

from helpers import ProcessNode, make_handler

MIN_NODES, MAX_NODES = 2, 4
# The last call is long enough for every node asked at once to join, even on a
# loaded machine, so that a full world is the expected outcome: a full round's
# four joins take about 30 ms here, and rounds short of MAX_NODES (about half)
# each wait the whole last call.
CONFIG = {"lease_ttl": 2, "last_call_timeout": 1, "timeout": 40}
STEPS = 20
MAX_FLEET = 7


class Fleet:
    """Node processes, their pending joins, and every result they print."""

    def __init__(self, endpoint: str, run_id: str) -> None:
        self.endpoint = endpoint
        self.run_id = run_id
        self.nodes: dict[str, ProcessNode] = {}
        self.pending: set[str] = set()
        self.results: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    def start_node(self) -> str:
        node = ProcessNode(self.endpoint, self.run_id, MIN_NODES, MAX_NODES, **CONFIG)
        self.nodes[node.node_id] = node
        threading.Thread(target=self._read, args=(node,), daemon=True).start()
        return node.node_id

    def _read(self, node: ProcessNode) -> None:
        try:
            while True:
                self.results.put((node.node_id, node.result()))
        except AssertionError:  # the process is gone
            return

    def join_all_idle(self) -> None:
        for node_id, node in self.nodes.items():
            if node_id not in self.pending:
                node.send("join")
                self.pending.add(node_id)

    def kill(self, node_id: str) -> None:
        self.nodes.pop(node_id).kill()
        self.pending.discard(node_id)

    def close(self) -> None:
        for node in self.nodes.values():
            node.kill()


def test_random_rounds_keep_the_guarantees(etcd_endpoint, run_id):
    seed = int(os.environ.get("RDZV_RANDOM_SEED", "20261125"))
    rng = random.Random(seed)
    fleet = Fleet(etcd_endpoint, run_id)
    rounds: dict[int, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    last_round: dict[str, int] = {}
    killed: set[str] = set()
    context = f"seed={seed}"
    try:
        for _ in range(3):
            fleet.start_node()
        for step in range(STEPS):
            context = f"seed={seed} step={step}"
            idle = [n for n in fleet.nodes if n not in fleet.pending]
            if idle and rng.random() < 0.4 and len(fleet.nodes) > MIN_NODES:
                victim = rng.choice(idle)
                fleet.kill(victim)
                killed.add(victim)
            surplus = sorted(fleet.pending)
            if surplus and rng.random() < 0.3:
                # A node waiting beyond max_nodes dies while it waits.
                victim = rng.choice(surplus)
                fleet.kill(victim)
                killed.add(victim)
            for _ in range(rng.choice([0, 0, 1, 2])):
                if len(fleet.nodes) < MAX_FLEET:
                    fleet.start_node()
            while len(fleet.nodes) < MIN_NODES:
                fleet.start_node()
            asked = set(fleet.nodes)
            fleet.join_all_idle()
            expected = min(len(fleet.nodes), MAX_NODES)
            round_number = _collect_round(fleet, rounds, expected, context)
            members = rounds[round_number]
            sizes = {result["world_size"] for _, result in members}
            # 1. Agreement: one world size, ranks exactly 0..size-1.
            assert len(sizes) == 1, (context, members)
            size = sizes.pop()
            assert sorted(r["rank"] for _, r in members) == list(range(size)), (context, members)
            # 2. Bounds.
            assert MIN_NODES <= size <= MAX_NODES, (context, size)
            # 3 and 5. Validity: only live nodes that asked; the dead are never counted.
            ids = {node_id for node_id, _ in members}
            assert ids <= asked and not ids & killed, (context, ids, killed)
            # 4 and 7. Progress: max live joiners means a full world; late and
            # surplus nodes wait (pending) for a later round.
            assert size == expected, (context, size, expected)
            assert len(fleet.pending) == len(fleet.nodes) - size, context
            # Round numbers only grow, per node.
            for node_id, _ in members:
                assert last_round.get(node_id, -1) < round_number, (context, node_id)
                last_round[node_id] = round_number
        # 6. Closed is terminal everywhere, also for nodes blocked in a join.
        closer = make_handler(etcd_endpoint, run_id, MIN_NODES, MAX_NODES)
        closer.set_closed()
        closer.shutdown()
        fleet.join_all_idle()
        deadline = time.monotonic() + 20
        closed = set()
        while closed != set(fleet.nodes) and time.monotonic() < deadline:
            try:
                node_id, result = fleet.results.get(timeout=1)
            except queue.Empty:
                continue
            assert result.get("error") == "RendezvousClosedError", (context, result)
            closed.add(node_id)
        assert closed == set(fleet.nodes), (context, closed)
    finally:
        fleet.close()


def _collect_round(fleet: Fleet, rounds: dict, expected: int, context: str) -> int:
    """Wait for one round's members to return; return its number."""
    deadline = time.monotonic() + 30
    round_number = None
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, (context, "round did not complete", dict(rounds))
        try:
            node_id, result = fleet.results.get(timeout=remaining)
        except queue.Empty:
            continue
        assert "error" not in result, (context, node_id, result)
        fleet.pending.discard(node_id)
        rounds[result["round"]].append((node_id, result))
        if round_number is None:
            round_number = result["round"]
        assert result["round"] == round_number, (context, "two rounds at once", result)
        if len(rounds[round_number]) == result["world_size"]:
            return round_number
