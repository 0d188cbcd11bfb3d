"""The compiled node machines through thousands of seeded runs on a model of etcd.

See ``tests/simulation.py`` for the model, the faults and the checker. A
failure names its seed and the command that replays it with a trace.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest

from simulation import Outcome, ScaleRound, Simulation, SimulationFailure, run_seed

#: Seeds per ``make test`` (about 18 s on 2 cores); ``RDZV_SIM_SEEDS`` runs
#: more (CI runs 10,000) or fewer.
SEEDS = int(os.environ.get("RDZV_SIM_SEEDS", "1000"))


def _sweep(first: int, count: int) -> tuple[list[str], int, int]:
    failures, steps, rounds = [], 0, 0
    for seed in range(first, first + count):
        try:
            sim = run_seed(seed)
        except SimulationFailure as err:
            failures.append(str(err).split("\nlast events:")[0])
            continue
        steps += sim.steps
        rounds += len(sim.finals)
    return failures, steps, rounds


@pytest.mark.timeout(600)
def test_seeded_runs_keep_every_guarantee():
    workers = max(1, min(4, os.cpu_count() or 1))
    # Chunks of at most 50 seeds: a worker that other processes slow down (or
    # that draws the longer runs) takes fewer of them, and the others finish the rest.
    chunk = min(50, -(-SEEDS // workers))
    # Spawned, not forked: this process may hold gRPC threads of other tests.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_sweep, range(0, SEEDS, chunk),
                                [min(chunk, SEEDS - first) for first in range(0, SEEDS, chunk)]))
    failures = [f for part, _, _ in results for f in part]
    rounds = sum(r for _, _, r in results)
    assert not failures, f"{len(failures)} of {SEEDS} seeds failed:\n" + "\n".join(failures[:5])
    assert rounds > SEEDS, f"only {rounds} rounds completed in {SEEDS} runs"


def test_a_seed_replays_exactly():
    first, second = Simulation(12345).run(), Simulation(12345).run()
    assert list(first.log) == list(second.log)
    assert (first.steps, first.etcd.revision) == (second.steps, second.etcd.revision)


def test_faults_are_drawn_and_survived():
    sims = [run_seed(seed) for seed in range(40)]
    kinds = {kind for sim in sims for kind in sim.faults}
    assert kinds == {"kill", "stop", "join"}, kinds
    assert sum(sim.client.requests for sim in sims) > 0


@pytest.mark.parametrize("bad", ["other world", "rank", "bounds", "stranger"])
def test_the_checker_catches_a_broken_guarantee(bad):
    sim = Simulation(3)
    sim.min_nodes, sim.max_nodes = 1, 2
    sim.finals[0] = 10
    sim.joiners[0] = {"a", "b"}
    sim.record(sim.add_node(), Outcome("a", 0, 0, ["a", "b"], 2, 0.0))
    outcome = {
        "other world": Outcome("b", 0, 1, ["b", "a"], 2, 0.0),
        "rank": Outcome("b", 0, 0, ["a", "b"], 2, 0.0),
        "bounds": Outcome("c", 0, 2, ["a", "b", "c"], 3, 0.0),
        "stranger": Outcome("b", 0, 1, ["a", "b"], 2, 0.0),
    }[bad]
    if bad == "stranger":
        sim.worlds.clear()
        sim.joiners[0] = {"b"}
    with pytest.raises(SimulationFailure, match=r"replay: python tests/simulation\.py --seed 3"):
        sim.record(sim.add_node(), outcome)


def test_a_round_of_ten_thousand_nodes_keeps_the_cost_bounds():
    """docs/PROTOCOL.md's cost bounds, counted on the model in one round of 10^4
    nodes (10^5: ``python tests/simulation.py --scale 100000``): a node writes
    its member key and its confirmation (and one of them opens the round), wakes
    for the state record's transitions only, and reads its rank shard, not the
    world; the freezer alone reads the members and watches the confirmations."""
    costs = ScaleRound(10_000).run().costs
    others = costs.others
    assert max(others(costs.writes)) <= 3, costs.table()
    assert max(others(costs.events)) <= 3, costs.table()
    assert sum(costs.events) <= 5 * costs.nodes, costs.table()
    assert max(others(costs.bytes_read)) <= 4096, costs.table()
    assert max(others(costs.requests)) <= 3, costs.table()

