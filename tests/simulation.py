"""A deterministic simulation of whole runs: the real compiled node machines on a
model of etcd, under seeded faults, with the guarantees checked after every step.

The model keeps the etcd semantics the protocol relies on and nothing else:
one revision counter, transactions with compares (all their writes at one
revision, the revision moving only when something changed), ranges in creation
order, leases that expire on a virtual clock and take their keys with them in
one revision, and watches that deliver every event from a start revision, in
order, after a delay. A node machine is driven the way
``EtcdRendezvousHandler`` drives it, through its actions: the model runs the
transactions it returns (each answered after a seeded delay, so that other
nodes' requests run in between), holds the watches it lists and feeds what
they deliver while it waits, and withdraws it when a call times out.

Faults, drawn from the seed: answers lost after the transaction committed (the
client's retry runs it again), watch events delayed, a state watch that goes
quiet, nodes killed (their lease expires), nodes stopped for longer or shorter
than their lease TTL and then resumed, late nodes. After the faults stop, a
quiet period checks progress: every live node completes a round.

Checked after every step (the guarantees of ``docs/PROTOCOL.md``): one world
per round, ranks ``0..n-1``, ``min_nodes <= n <= max_nodes``, only joiners of a
round in its world, no world member's key gone when its round turns final,
closed is terminal, and no ``RendezvousStateError`` ever.

Replay one seed with its trace: ``python tests/simulation.py --seed N -v``.

``ScaleRound`` runs one round of many nodes without faults and counts what each
costs etcd (requests, writes, watch events, bytes read), for the cost bounds:
``python tests/simulation.py --scale 100000`` prints them for 10^5 nodes (about
a minute); the tests run 10^4.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import itertools
import logging
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import rdzv._state as core
from rdzv.api import RendezvousClosedError, RendezvousStateError
from rdzv.client import LeaseLostError
from rdzv.keys import RunKeys
from rdzv.txn import prefix_end

Status = core.Status
Step = core.Step
# The steps as plain ints, for the hot loops (an enum member is looked up on its class).
_WAIT, _DONE, _TXN, _GET = (int(s) for s in (Step.STEP_WAIT, Step.STEP_DONE, Step.STEP_TXN,
                                             Step.STEP_GET))
_INF = float("inf")


#: Rounds after which a run that cannot settle (see ``Simulation._converges``)
#: ends early: its later rounds repeat what the checker has seen.
_ROUNDS_UNCHECKED = 12


class SimulationFailure(AssertionError):
    """A guarantee did not hold; the message names the seed that replays it."""


class _TraceLog(logging.Handler):
    """What the node machines log goes to the running simulation's trace."""

    def __init__(self, sim: Simulation) -> None:
        super().__init__()
        self.sim = sim

    def emit(self, record: logging.LogRecord) -> None:
        self.sim.trace(f"log: {record.getMessage()}")


# ----------------------------------------------------------------- the etcd model
@dataclass(slots=True)
class _Entry:
    value: bytes
    create: int
    mod: int
    lease: int


@dataclass(slots=True)
class _Watch:
    key: bytes
    end: bytes | None  # None: the key alone
    sink: Any  # callable(list of (is_put, key, value, mod_revision))
    no_put: bool = False
    quiet: bool = False  # a stream that stopped delivering without breaking
    cancelled: bool = False
    seq: int = 0  # creation order

    def matches(self, key: bytes) -> bool:
        if self.end is None:
            return key == self.key
        return self.key <= key < self.end


class SimEtcd:
    """etcd as the protocol sees it, on a virtual clock.

    Keys are also kept sorted, so that a range or a count is a bisection
    (O(log N) for a count, O(M) for M keys returned) and a round of 10^5 nodes
    runs in seconds; watches are found by key (or, for the few on a prefix, by
    a scan of those).
    """

    def __init__(self) -> None:
        self.revision = 1
        self.kv: dict[bytes, _Entry] = {}
        self._sorted: list[bytes] = []  # the keys of kv, in order
        self._by_lease: dict[int, set[bytes]] = {}
        self.leases: dict[int, float] = {}  # id -> expiry
        self._ending: dict[int, float] = {}  # the leases whose keep-alives stopped
        self._key_watches: dict[bytes, list[_Watch]] = {}
        self._prefix_watches: list[_Watch] = []
        self.history: list[tuple[int, bool, bytes, bytes]] = []
        self.on_commit: list[Any] = []  # callables(revision, events)
        self._lease_ids = itertools.count(0x1000)
        self._watch_ids = itertools.count()

    # leases
    def grant(self) -> int:
        lease = next(self._lease_ids)
        self.leases[lease] = float("inf")
        return lease

    def keep_alive_until(self, lease: int, expiry: float) -> bool:
        """Keep-alives reach etcd until ``expiry`` (inf: for as long as it runs)."""
        if lease not in self.leases:
            return False
        self.leases[lease] = expiry
        if expiry == float("inf"):
            self._ending.pop(lease, None)
        else:
            self._ending[lease] = expiry
        return True

    def expire(self, now: float) -> None:
        if not self._ending or self.next_expiry > now:
            return
        for lease, expiry in sorted(self._ending.items()):
            if expiry <= now:
                self.revoke(lease)

    @property
    def next_expiry(self) -> float:
        return min(self._ending.values(), default=_INF)

    def revoke(self, lease: int) -> None:
        self.leases.pop(lease, None)
        self._ending.pop(lease, None)
        doomed = sorted(self._by_lease.pop(lease, ()))
        if doomed:
            self._commit([(False, k, b"") for k in doomed])

    # reads and writes of the store
    def _get(self, key: bytes) -> tuple[bytes, int, int] | None:
        entry = self.kv.get(key)
        return None if entry is None else (entry.value, entry.mod, entry.create)

    def _keys(self, start: bytes, end: bytes) -> list[bytes]:
        """The keys in ``[start, end)``, in order."""
        return self._sorted[bisect.bisect_left(self._sorted, start):
                            bisect.bisect_left(self._sorted, end)]

    def _count(self, prefix: bytes, cap: int | None) -> int:
        if cap is None:
            end = prefix_end(prefix)
            return (bisect.bisect_left(self._sorted, end)
                    - bisect.bisect_left(self._sorted, prefix))
        return sum(1 for k in self._keys(prefix, prefix_end(prefix)) if self.kv[k].create <= cap)

    def _put(self, key: bytes, value: bytes, lease: int, revision: int) -> None:
        old = self.kv.get(key)
        if old is None:
            bisect.insort(self._sorted, key)
        elif old.lease:
            self._by_lease.get(old.lease, set()).discard(key)
        self.kv[key] = _Entry(value, old.create if old is not None else revision, revision,
                              lease)
        if lease:
            self._by_lease.setdefault(lease, set()).add(key)

    def _delete(self, key: bytes) -> None:
        entry = self.kv.pop(key)
        del self._sorted[bisect.bisect_left(self._sorted, key)]
        if entry.lease:
            self._by_lease.get(entry.lease, set()).discard(key)

    # transactions
    def txn(self, compares, success, failure) -> tuple[bool, int, list[Any]]:
        # As etcd does: every compare, nested ones included, is decided on what
        # the keys held before any write, and only then do the writes apply.
        ok, ops, inner = self._path(compares, success, failure)
        if any(op[0] == "put" and op[3] and op[3] not in self.leases for op in inner):
            raise LeaseLostError("etcdserver: requested lease not found")
        events: list[tuple[bool, bytes, bytes]] = []
        results = self._apply(ops, self.revision + 1, events)
        if events:
            self._commit(events, applied=True)
        return ok, self.revision, results

    def _path(self, compares, success, failure):
        """``(succeeded, branch, every operation the branch runs, nested ones
        included)``, decided now; a nested transaction's op is replaced by
        ``("txn", succeeded, branch)``."""
        ok = all(self._holds(compare) for compare in compares)
        ops = []
        flat = []
        for op in success if ok else failure:
            if op[0] == "txn":
                inner_ok, inner_ops, inner_flat = self._path(op[1], op[2], op[3])
                ops.append(("txn", inner_ok, inner_ops))
                flat.extend(inner_flat)
            else:
                ops.append(op)
                flat.append(op)
        return ok, ops, flat

    def _apply(self, ops, revision: int, events: list) -> list[Any]:
        """Run a decided branch's operations at ``revision``; nothing here can fail."""
        results: list[Any] = []
        for op in ops:
            kind = op[0]
            if kind == "get":
                results.append(self._get(op[1]))
            elif kind == "count":
                results.append(self._count(op[1], op[2] if len(op) > 2 and op[2] else None))
            elif kind == "range":
                found = sorted((self.kv[k].create, k) for k in
                               self._keys(op[1], prefix_end(op[1])))
                if op[2]:
                    found = found[:op[2]]
                keys_only = len(op) > 3 and bool(op[3])
                results.append([(k, b"" if keys_only else self.kv[k].value, create)
                                for create, k in found])
            elif kind == "put":
                self._put(op[1], op[2], op[3], revision)
                events.append((True, op[1], op[2]))
                results.append(None)
            elif kind == "delete":
                if len(op) > 2:
                    doomed = self._keys(op[1], op[2])
                else:
                    doomed = [op[1]] if op[1] in self.kv else []
                for k in doomed:
                    self._delete(k)
                    events.append((False, k, b""))
                results.append(len(doomed))
            elif kind == "txn":
                results.append((op[1], self._apply(op[2], revision, events)))
            else:
                raise ValueError(f"unknown operation {kind!r}")
        return results

    def _holds(self, compare) -> bool:
        kind, key, expected = compare
        entry = self.kv.get(key)
        if kind == "mod":
            return (entry.mod if entry else 0) == expected
        if kind == "create":
            return (entry.create if entry else 0) == expected
        if kind == "value":
            return entry is not None and entry.value == expected
        raise ValueError(f"unknown compare {kind!r}")

    def _commit(self, events, applied: bool = False) -> None:
        self.revision += 1
        rev = self.revision
        if not applied:
            for is_put, key, _value in events:
                if not is_put and key in self.kv:
                    self._delete(key)
        stamped = [(is_put, key, value, rev) for is_put, key, value in events]
        self.history.extend([(rev, is_put, key, value) for is_put, key, value in events])
        for hook in self.on_commit:
            hook(rev, stamped)
        # Each watch gets its events of this revision in one delivery, in the
        # order the watches were created.
        deliveries: dict[int, tuple[_Watch, list]] | None = None
        key_watches, prefix_watches = self._key_watches, self._prefix_watches
        for event in stamped:
            key = event[1]
            watching = [w for w in prefix_watches if w.key <= key < w.end]
            held = key_watches.get(key)
            if held:
                watching += held
            for watch in watching:
                if not watch.quiet and not (watch.no_put and event[0]):
                    if deliveries is None:
                        deliveries = {}
                    deliveries.setdefault(watch.seq, (watch, []))[1].append(event)
        if deliveries:
            for seq in sorted(deliveries):
                watch, mine = deliveries[seq]
                watch.sink(mine)

    def watch(self, key: bytes, start: int, sink, prefix: bool = False,
              no_put: bool = False) -> _Watch:
        """Watch from revision ``start`` (history first, then live events)."""
        w = _Watch(key, prefix_end(key) if prefix else None, sink, no_put,
                   seq=next(self._watch_ids))
        first = bisect.bisect_left(self.history, (start,))
        past = [(is_put, k, v, rev) for rev, is_put, k, v in self.history[first:]
                if w.matches(k) and not (no_put and is_put)]
        if past:
            sink(past)
        if prefix:
            self._prefix_watches.append(w)
        else:
            self._key_watches.setdefault(key, []).append(w)
        return w

    def cancel(self, w: _Watch | None) -> None:
        if w is not None and not w.cancelled:
            w.cancelled = True
            held = self._prefix_watches if w.end is not None else self._key_watches[w.key]
            held.remove(w)


class SimClient:
    """The client interface the node machine calls, on the model.

    With probability ``lost_answers`` a transaction's answer is lost after it
    committed, and the client's retry runs it again: the caller sees the second
    answer, as with the real client's retry after a deadline.
    """

    def __init__(self, etcd: SimEtcd, rng: random.Random, lost_answers: float) -> None:
        self.etcd = etcd
        self.rng = rng
        self.lost_answers = lost_answers
        self.requests = 0

    def txn(self, compares, success, failure, once: bool = False):
        self.requests += 1
        answer = self.etcd.txn(compares, success, failure)
        if not once and self.rng.random() < self.lost_answers:
            self.requests += 1
            answer = self.etcd.txn(compares, success, failure)
        return answer

    def get(self, key: bytes):
        self.requests += 1
        return self.etcd._get(key)


# ---------------------------------------------------------------- the driver
@dataclass
class Outcome:
    node_id: str
    round: int
    rank: int
    world: list[str]
    world_size: int
    at: float


@dataclass(order=True, slots=True)
class _Delivery:
    at: float
    seq: int
    item: tuple = field(compare=False)
    watch: Any = field(compare=False)


class SimNode:
    """One node process: a session (lease), a node machine, its watches and
    calls, driven like the handler drives them."""

    def __init__(self, sim: Simulation, name: str) -> None:
        self.sim = sim
        self.name = name
        self.alive = True
        self.stopped_until = 0.0
        self.completed = 0
        self.completed_round = -1
        self.world: list[str] = []
        self.training = False
        self.spins = 0
        self.calls = 0
        self.in_call = False
        self.next_call_at = sim.now
        self.deadline = 0.0
        self.inbox: deque[_Delivery] = deque()
        self.watches: dict[str, tuple[Any, _Watch]] = {}
        self.port = 0
        self.until = float("inf")  # the node machine waits until then (or an event)
        self.pending: Any = None  # a request on its way, answered at answer_at
        self.answer_at = 0.0
        self._new_session()

    # sessions and watches
    def _new_session(self) -> None:
        sim = self.sim
        self.lease = sim.etcd.grant()
        self.node_id = f"{self.lease:x}"
        self.port += 1
        self.core = core.Node(
            self.node_id, sim.keys, sim.min_nodes, sim.max_nodes, self.lease,
            self._descriptor(), sim.last_call_timeout, float(sim.lease_ttl),
            random.Random(f"{sim.seed}/{self.lease}"))
        self._drop_watches(list(self.watches))
        try:
            self.core.observe_state_read(sim.etcd.revision, self.client.get(sim.keys.state))
        except RendezvousStateError:
            self.core.forget_state()
        self._sync_watches()

    def _descriptor(self) -> bytes:
        return core.encode_member(f"host{self.name}", f"10.0.0.{self.name}", 1000, self.port)

    def _sink(self, tag: str, watch_box: list):
        sim, inbox = self.sim, self.inbox

        def deliver(events):
            at = sim.now + sim.rng.expovariate(1 / sim.mean_delivery)
            if inbox and inbox[-1].at > at:
                at = inbox[-1].at  # a stream delivers in order
            inbox.append(_Delivery(at, next(sim.seq), (tag, events), watch_box[0]))
            sim.delivered(self, events)
        return deliver

    def _watch(self, tag: str, key: bytes, start: int, **kwargs) -> _Watch:
        box: list = [None]
        box[0] = self.sim.etcd.watch(key, start, self._sink(tag, box), **kwargs)
        if self.sim.rng.random() < self.sim.quiet_watches:
            box[0].quiet = True
            self.sim.trace(f"{self.name}: its {tag} watch goes quiet")
        return box[0]

    @property
    def client(self) -> SimClient:
        return self.sim.client

    def _drop_watches(self, tags) -> None:
        for tag in list(tags):
            held = self.watches.pop(tag, None)
            if held is not None:
                self.sim.etcd.cancel(held[1])

    def _sync_watches(self) -> bool:
        """Hold the watches the node machine asks for, as the handler does; True
        if one started (the node may have a request to make first)."""
        node, etcd = self.core, self.sim.etcd
        specs = node.watches
        if specs == [held[0] for held in self.watches.values()]:
            return False  # (held in the order asked: else the check below says so)
        wanted = {spec.tag: spec for spec in specs}
        self._drop_watches(tag for tag, held in self.watches.items() if held[0] != wanted.get(tag))
        started = False
        for tag, spec in wanted.items():
            if tag not in self.watches:
                self.watches[tag] = (spec, self._watch(
                    tag, spec.key, spec.start or etcd.revision + 1, prefix=spec.prefix,
                    no_put=spec.no_put))
                node.watch_started(tag)
                started = True
        return started

    def _drain(self) -> None:
        node, inbox, now = self.core, self.inbox, self.sim.now
        while inbox and inbox[0].at <= now:
            # As in the handler, events a cancelled watch queued are still read.
            delivery = inbox.popleft()
            tag = delivery.item[0]
            if tag == "state":
                for is_put, _key, value, revision in delivery.item[1]:
                    node.observe_state(value if is_put else None, revision)
            elif tag == "round":
                node.observe_round_events(delivery.item[1])
            elif tag == "waiting":
                node.observe_member_deleted()
            elif tag == "counter":
                node.observe_counter_deleted()

    # calls
    @property
    def wake_at(self) -> float:
        if not self.alive:
            return _INF
        if self.pending is not None:
            at = self.answer_at
        elif self.in_call:
            at = self.deadline
            if self.until < at:
                at = self.until
            if self.inbox and self.inbox[0].at < at:
                at = self.inbox[0].at
        else:
            at = self.next_call_at
        return at if at >= self.stopped_until else self.stopped_until

    def notice(self, events) -> None:
        """The launcher's monitor loop, for a node that trains: re-rendezvous on
        what torch's agent reacts to, seen within one poll interval: late nodes
        or the next round's members (``num_nodes_waiting()`` > 0), a member of
        its world gone (its workers' collectives fail), the run moving on or
        closing. Read from the model's commits: it costs the simulated etcd
        nothing."""
        keys = self.sim.keys
        r = self.completed_round
        waiting, following, members = keys.waiting(r), keys.members(r + 1), keys.members(r)
        for is_put, key, value, _rev in events:
            if is_put and key.startswith((waiting, following)):
                break
            if not is_put and key.startswith(members) and key[len(members):].decode() in self.world:
                break
            if key == keys.state and is_put:
                record = core.decode_state(value, key)
                if record.status == Status.CLOSED or record.round > r + 1:
                    break
        else:
            return
        sim = self.sim
        self.training = False
        self.next_call_at = sim.now + sim.rng.uniform(0.0, sim.poll_interval) \
            + sim.rng.uniform(0.0, sim.call_gap)

    def step(self) -> None:
        sim = self.sim
        if not self.in_call:
            if sim.now < self.next_call_at:
                return
            if self.lease not in sim.etcd.leases:
                sim.trace(f"{self.name}: lease {self.node_id} expired; new session")
                self._new_session()
            self.in_call = True
            self.calls += 1
            self.port += 1
            self.core.begin(self._descriptor())
            self.deadline = sim.now + sim.timeout
        if self.pending is None:
            self._drain()  # as the handler: events are fed only while the node waits
        if self.lease not in sim.etcd.leases:
            # The session sees its lease gone (a keep-alive answered TTL 0).
            sim.trace(f"{self.name}: lost its lease during a call")
            self._end_call(None)
            self._new_session()
            return
        node = self.core
        try:
            while True:
                step = self._advance()
                if step is None:
                    return  # a request is on its way
                if step == _DONE or not self._sync_watches():
                    break
        except RendezvousClosedError:
            sim.closed_seen.add(self.name)
            self._withdraw()
            self._end_call(None, closed=True)
            return
        except LeaseLostError:
            sim.trace(f"{self.name}: lease lost in a request")
            self._end_call(None)
            self._new_session()
            return
        except RendezvousStateError as err:
            raise sim.failure(f"{self.name}: RendezvousStateError: {err}") from None
        if step == _DONE:
            self._sync_watches()
            outcome = Outcome(self.node_id, node.completed_round, node.rank, list(node.world),
                              node.completed.world_size, sim.now)
            sim.record(self, outcome)
            self.completed += 1
            self.completed_round = outcome.round
            self.world = outcome.world
            self._end_call(outcome)
            return
        # (the loop ended on watches in sync with what the node machine asks for)
        if self.until <= sim.now:
            # The handler drains its inbox with a timeout <= 0 and calls
            # next_action() again at once: once is a step, five times is a spin.
            self.spins += 1
            if self.spins >= 5:
                raise sim.failure(
                    f"{self.name}: next_action() asked five times in a row to wait until a "
                    f"time that has passed (t={self.until:.4f}, phase {node.phase}): "
                    "the driver would spin")
        else:
            self.spins = 0
        if sim.now >= self.deadline:
            sim.trace(f"{self.name}: call timed out in round {node.joined_round}")
            sim.timeouts.append((self.name, sim.now))
            self._withdraw()
            self._end_call(None)

    def _advance(self) -> int | None:
        """Carry out the node machine's requests up to its next wait or its end,
        or up to a request that takes time: its answer comes in a later step,
        after what other nodes did meanwhile (None until then)."""
        node, sim = self.core, self.sim
        if self.pending is not None:
            action, self.pending = self.pending, None
            sim.carry_out(node, action)
        now, carry_out = sim.now, sim.carry_out
        while True:
            action = node.next_action(now)
            step = action.step
            if step == _WAIT or step == _DONE:
                self.until = action.wake_at
                return step
            if sim.request_time:
                self.pending = action
                self.answer_at = now + sim.rng.expovariate(1 / sim.request_time)
                return None
            carry_out(node, action)

    def _withdraw(self) -> None:
        ops = self.core.cleanup_ops()
        if ops:
            try:
                self.client.txn([], ops, [], once=True)
            except LeaseLostError:
                pass
        self.core.left()
        self._drop_watches(["round", "waiting"])

    def _end_call(self, outcome: Outcome | None, closed: bool = False) -> None:
        self.in_call = False
        self.pending = None
        if closed:
            self.alive = False  # a closed run: this node's launcher exits
            return
        if outcome is not None and not self.sim.trains:
            self.next_call_at = float("inf")  # one round is all it does
            return
        if outcome is not None:
            # Training until the monitor loop sees a reason to re-rendezvous;
            # its first poll sees what happened before.
            self.training = True
            self.next_call_at = float("inf")
            etcd = self.sim.etcd
            now = [(True, k, e.value, e.mod) for k, e in etcd.kv.items()]
            members = self.sim.keys.members(outcome.round)
            gone = [(False, members + i.encode(), b"", 0) for i in outcome.world
                    if members + i.encode() not in etcd.kv]
            self.notice(now + gone)
            return
        self.next_call_at = self.sim.now + self.sim.rng.uniform(0.0, self.sim.call_gap)

    def resume(self) -> None:
        """Back from a stop: keep-alives flow again if etcd still has the lease."""
        self.sim.etcd.keep_alive_until(self.lease, float("inf"))


# -------------------------------------------------------------- the simulation
class Simulation:
    """One seeded run: nodes, faults, the checker.

    Args:
        seed: everything random is drawn from it.
        verbose: print the trace as it happens.
    """

    #: Whether a node that completed a round trains until it sees a reason to
    #: rendezvous again (else it stops there).
    trains = True

    def __init__(self, seed: int, verbose: bool = False) -> None:
        self.seed = seed
        self.verbose = verbose
        rng = self.rng = random.Random(seed)
        self.now = 0.0
        self.seq = itertools.count()
        self.keys = RunKeys("/sim", f"run{seed}")
        self.lease_ttl = rng.choice((2, 3, 5))
        self.nodes_at_start = rng.randint(1, 6)
        self.max_nodes = rng.randint(1, 6)
        self.min_nodes = rng.randint(1, self.max_nodes)
        self.last_call_timeout = rng.choice((0.0, 0.3, 1.0, 2.0))
        self.timeout = 30.0
        self.call_gap = rng.choice((0.05, 0.3))
        self.poll_interval = rng.choice((0.1, 0.5))
        self.mean_delivery = rng.choice((0.0005, 0.005, 0.05))
        self.quiet_watches = rng.choice((0.0, 0.0, 0.05))
        self.fault_rate = rng.choice((0.0, 0.5, 1.5))  # faults per virtual second
        self.fault_until = rng.uniform(0.5, 6.0)
        self.settle = self.lease_ttl * 2 + self.last_call_timeout + 3.0
        self.end = self.fault_until + self.settle + 4.0
        self.close_at = self.end - self.lease_ttl - 2.0 if rng.random() < 0.2 else None
        self.etcd = SimEtcd()
        self.client = SimClient(self.etcd, rng, rng.choice((0.0, 0.02, 0.1)))
        # How long a request takes (mean, seconds), in one seed of eight; 0: a
        # node's requests up to its next wait run back to back, before any
        # other node's (which keeps the sweep as fast as it was).
        self.request_time = rng.choice((0.0002, 0.002)) if rng.random() < 0.125 else 0.0
        self.etcd.on_commit.append(self._check_commit)
        self.etcd.on_commit.append(self._notify_training)
        self.nodes: list[SimNode] = []
        self.stopped: list[SimNode] = []
        self.outcomes: dict[int, list[tuple[str, Outcome]]] = {}
        self.worlds: dict[int, list[str]] = {}
        self.joiners: dict[int, set[str]] = {}
        self.confirms: dict[int, set[str]] = {}
        self.finals: dict[int, int] = {}
        self.closed_at_revision: int | None = None
        self.closed_seen: set[str] = set()
        self.timeouts: list[tuple[str, float]] = []
        self.log: deque[str] = deque(maxlen=60)
        self.steps = 0
        self.faults: dict[str, int] = {}
        self._names = itertools.count()

    # bookkeeping
    def trace(self, text: str) -> None:
        line = f"t={self.now:9.4f} rev={self.etcd.revision:5d} {text}"
        self.log.append(line)
        if self.verbose:
            print(line)

    def failure(self, what: str) -> SimulationFailure:
        tail = "\n".join(self.log)
        return SimulationFailure(
            f"seed {self.seed}: {what}\nreplay: python tests/simulation.py --seed {self.seed} -v"
            f"\nlast events:\n{tail}")

    def carry_out(self, node: Any, action: Any) -> Any:
        """Run the request ``node`` asked for on the model; feed it the answer
        (and return it; None if the request failed)."""
        try:
            if action.step == _TXN:
                answer = self.client.txn(action.compares, action.success, action.failure,
                                         once=action.once)
            else:
                answer = self.client.get(action.key)
        except LeaseLostError as err:
            node.fail(err)
            return None
        node.feed(answer)
        return answer

    def delivered(self, node: SimNode, events: list) -> None:
        """A watch of ``node`` delivered ``events`` (to arrive after a delay)."""

    def add_node(self) -> SimNode:
        node = SimNode(self, str(next(self._names)))
        self.nodes.append(node)
        self.trace(f"{node.name}: starts as node {node.node_id}")
        return node

    def record(self, node: SimNode, outcome: Outcome) -> None:
        self.trace(f"{node.name}: round {outcome.round} rank {outcome.rank} of "
                   f"{outcome.world_size}")
        r = outcome.round
        if r not in self.finals:
            raise self.failure(f"{node.name} completed round {r}, which never turned final")
        world = self.worlds.setdefault(r, outcome.world)
        if outcome.world != world:
            raise self.failure(f"two worlds for round {r}: {world} and {outcome.world}")
        if outcome.world_size != len(world):
            raise self.failure(f"round {r}: world_size {outcome.world_size} != {len(world)}")
        if not 0 <= outcome.rank < len(world) or world[outcome.rank] != outcome.node_id:
            raise self.failure(f"round {r}: {outcome.node_id} got rank {outcome.rank} "
                               f"in {world}")
        if not self.min_nodes <= len(world) <= self.max_nodes:
            raise self.failure(f"round {r}: world of {len(world)} outside "
                               f"[{self.min_nodes}, {self.max_nodes}]")
        if not set(world) <= self.joiners.get(r, set()):
            raise self.failure(f"round {r}: world {world} has nodes that never joined it "
                               f"(joined: {sorted(self.joiners.get(r, ()))})")
        self.outcomes.setdefault(r, []).append((node.name, outcome))

    def _check_commit(self, revision: int, events) -> None:
        keys = self.keys
        rounds = keys.run + b"rounds/"
        for is_put, key, value, _rev in events:
            if is_put and key.startswith(rounds):
                # rounds/<r>/members/<node> or rounds/<r>/confirmed/<node>
                r, _, rest = key[len(rounds):].partition(b"/")
                kind, _, who = rest.partition(b"/")
                seen = (self.joiners if kind == b"members" else
                        self.confirms if kind == b"confirmed" else None)
                if seen is not None:
                    seen.setdefault(int(r), set()).add(who.decode())
            elif key == keys.state:
                if self.closed_at_revision is not None:
                    raise self.failure(f"the state record changed after the close: {value!r}")
                if not is_put:
                    raise self.failure("the state record was deleted")
                record = core.decode_state(value, key)
                if record.status == Status.CLOSED:
                    self.closed_at_revision = revision
                elif record.status == Status.FINAL:
                    self._check_final(record, revision)

    def _notify_training(self, revision: int, events) -> None:
        for node in self.nodes:
            if node.training and node.alive:
                node.notice(events)

    def _check_final(self, record, revision: int) -> None:
        r = record.round
        header = self.etcd._get(self.keys.world(r))
        if header is None:
            raise self.failure(f"round {r} turned final without a world record")
        prefix = self.keys.ranks(r)
        shards = [(k, e.value) for k, e in self.etcd.kv.items() if k.startswith(prefix)]
        ids = core.world_from(header[0], shards, self.keys, r)[0]
        # A member confirms with a put on its lease, so only a member alive after
        # the freeze can; one that dies later is the next round's business.
        unconfirmed = sorted(set(ids) - self.confirms.get(r, set()))
        if unconfirmed:
            raise self.failure(f"round {r} turned final without confirmations of {unconfirmed}")
        previous = self.worlds.setdefault(r, ids)
        if previous != ids:
            raise self.failure(f"two worlds for round {r}: {previous} and {ids}")
        self.finals[r] = revision

    # faults
    def _fault(self) -> None:
        rng = self.rng
        live = [n for n in self.nodes if n.alive and self.now >= n.stopped_until]
        kind = rng.choice(("kill", "stop", "stop", "join", "join"))
        if kind == "join" or not live:
            self.add_node()
            kind = "join"
        elif kind == "kill":
            victim = rng.choice(live)
            victim.alive = False
            self.etcd.keep_alive_until(victim.lease, self.now + self.lease_ttl)
            self.trace(f"{victim.name}: killed")
        else:
            victim = rng.choice(live)
            victim.stopped_until = self.now + rng.uniform(0.2, 2.0) * self.lease_ttl
            self.etcd.keep_alive_until(victim.lease, self.now + self.lease_ttl)
            self.stopped.append(victim)
            self.trace(f"{victim.name}: stopped until t={victim.stopped_until:.3f}")
        self.faults[kind] = self.faults.get(kind, 0) + 1

    # the loop
    def run(self) -> Simulation:
        log, handler = logging.getLogger(core.__name__), _TraceLog(self)
        log.addHandler(handler)
        try:
            return self._run()
        finally:
            log.removeHandler(handler)

    def _run(self) -> Simulation:
        rng, etcd, nodes, stopped, finals = self.rng, self.etcd, self.nodes, self.stopped, \
            self.finals
        choice, expovariate = rng.choice, rng.expovariate
        churns = not self._converges()
        for _ in range(self.nodes_at_start):
            self.add_node()
        next_fault = rng.expovariate(self.fault_rate) if self.fault_rate else _INF
        closed = False
        while self.now < self.end:
            if churns and len(finals) >= _ROUNDS_UNCHECKED:
                break  # churning by design (see _converges): enough rounds checked
            now = self.now
            if stopped:
                for node in [n for n in stopped if n.stopped_until <= now]:
                    stopped.remove(node)
                    node.resume()
            etcd.expire(now)
            if self.close_at is not None and not closed and now >= self.close_at:
                closed = True
                closer = core.Node("closer", self.keys, self.min_nodes, self.max_nodes, 0,
                                   b"", self.last_call_timeout, float(self.lease_ttl))
                closer.begin_close()
                at = self.now
                while (action := closer.next_action(at)).step != Step.STEP_DONE:
                    if action.step == Step.STEP_WAIT:
                        at = action.wake_at  # a backoff: the closer runs on its own
                    else:
                        self.carry_out(closer, action)
                self.trace("the run is closed")
            if now >= next_fault and now < self.fault_until:
                self._fault()
                next_fault = now + expovariate(self.fault_rate)
            ready, soonest = [], _INF
            for n in nodes:
                at = n.wake_at
                if at <= now:
                    ready.append(n)
                elif at < soonest:
                    soonest = at
            if ready:
                choice(ready).step()
                self.steps += 1
                if self.steps > 200_000:
                    raise self.failure("no end in sight: more than 200,000 steps")
                self.now += expovariate(2000.0)  # a step every 0.5 ms on average
                continue
            upcoming = [soonest, etcd.next_expiry]
            upcoming += [n.stopped_until for n in stopped]
            upcoming.append(next_fault if next_fault < self.fault_until else self.end)
            if self.close_at is not None and not closed:
                upcoming.append(self.close_at)
            self.now = max(self.now + 1e-6, min(t for t in upcoming if t > self.now - 1e-9))
        self._check_progress()
        return self

    def _converges(self) -> bool:
        """Whether the run's settings let it settle in one world: with a last call
        shorter than the spread of the nodes' calls, latecomers miss each round
        and start the next one, by design, for as long as the run lasts."""
        return self.last_call_timeout > self.poll_interval + self.call_gap + 0.2

    def _check_progress(self) -> None:
        """After the faults and a settling time, the run has converged: with at
        least ``min_nodes`` nodes up, every node that stayed up trains in the
        latest completed round's world, unless that world is full (surplus nodes
        wait, by design). After a close, every such node has seen it."""
        steady = [n for n in self.nodes if n.alive or n.name in self.closed_seen]
        steady = [n for n in steady if n.stopped_until < self.fault_until]
        if self.closed_at_revision is not None:
            missed = [n.name for n in steady if n.name not in self.closed_seen]
            if missed:
                raise self.failure(f"nodes {missed} never saw the run closed")
            return
        if len(steady) < self.min_nodes:
            return
        if len(self.finals) >= _ROUNDS_UNCHECKED and not self._converges():
            return
        if not self.finals:
            raise self.failure(
                f"no progress: {len(steady)} nodes up, min_nodes={self.min_nodes}, and no "
                "round completed")
        last = max(self.finals)
        world = self.worlds[last]
        if len(world) == self.max_nodes or not self._converges():
            return
        outside = [n.name for n in steady if n.in_call or n.completed_round != last]
        if outside:
            raise self.failure(
                f"no convergence: round {last} (world of {len(world)}, max_nodes="
                f"{self.max_nodes}) is the latest, but nodes {outside} are not in it")


# ----------------------------------------------------------- one round at scale
@dataclass
class RoundCosts:
    """What one round cost etcd per node (see ``ScaleRound``)."""

    nodes: int
    steps: int
    seconds: float  # of virtual time until the last node returned
    requests: list[int]  # per node
    writes: list[int]  # put and delete operations that ran, per node
    events: list[int]  # watch events delivered, per node
    bytes_read: list[int]  # keys and values in the answers, per node
    freezer: int  # the index of the node that froze the round

    def others(self, per_node: list[int]) -> list[int]:
        """``per_node`` without the freezer, whose reads and writes are the world's."""
        return per_node[:self.freezer] + per_node[self.freezer + 1:]

    def table(self) -> str:
        rows = []
        for name, values in (("requests", self.requests), ("writes", self.writes),
                             ("watch events", self.events), ("bytes read", self.bytes_read)):
            rest = self.others(values)
            rows.append(f"| {name} | {sum(values) / self.nodes:.2f} | {max(rest)} "
                        f"| {values[self.freezer]} |")
        return ("| per node | mean | max (all but the freezer) | the freezer |\n"
                "|---|---|---|---|\n" + "\n".join(rows))


class ScaleRound(Simulation):
    """One round of ``nodes`` nodes, all starting at once, on the model without
    faults, counting what each node costs etcd.

    The cost bounds of docs/PROTOCOL.md at large N: O(1) writes per node, O(N)
    watch events per round, and a few KB read per node (the freezer reads and
    writes the world, O(N), once). Nodes are scheduled from a heap, so a step
    costs O(log N) and a round of 10^5 nodes runs in seconds.
    """

    trains = False

    def __init__(self, nodes: int, seed: int = 0) -> None:
        super().__init__(seed)
        self.nodes_at_start = nodes
        self.max_nodes = nodes
        self.min_nodes = max(1, nodes // 2)
        self.last_call_timeout = 30.0
        self.mean_delivery = 0.005
        self.request_time = 0.0005
        self.quiet_watches = 0.0
        self.client.lost_answers = 0.0
        self.etcd.on_commit.remove(self._notify_training)
        self._queue: list[tuple[float, int, SimNode]] = []
        self._index: dict[int, int] = {}  # id of a node machine -> its node's index
        self.costs = RoundCosts(nodes, 0, 0.0, [0] * nodes, [0] * nodes, [0] * nodes,
                                [0] * nodes, -1)

    def _wake(self, node: SimNode) -> None:
        at = node.wake_at
        if at < float("inf"):
            heapq.heappush(self._queue, (at, next(self.seq), node))

    def delivered(self, node: SimNode, events: list) -> None:
        self.costs.events[int(node.name)] += len(events)
        self._wake(node)

    def carry_out(self, node: Any, action: Any) -> Any:
        answer = super().carry_out(node, action)
        i = self._index[id(node)]
        costs = self.costs
        costs.requests[i] += 1
        if action.step == Step.STEP_GET:
            costs.bytes_read[i] += 0 if answer is None else len(action.key) + len(answer[0])
            return answer
        if answer is None:
            return None
        ok, _revision, results = answer
        ops = action.success if ok else action.failure
        for op, result in zip(ops, results, strict=True):
            if op[0] in ("put", "delete"):
                costs.writes[i] += 1
            elif op[0] == "get" and result is not None:
                costs.bytes_read[i] += len(op[1]) + len(result[0])
            elif op[0] == "range":
                costs.bytes_read[i] += sum(len(k) + len(v) for k, v, _ in result)
        return answer

    def record(self, node: SimNode, outcome: Outcome) -> None:
        r = outcome.round
        world = self.worlds.get(r)
        if r not in self.finals or world is None:
            raise self.failure(f"{node.name} completed round {r}, which never turned final")
        if outcome.world_size != len(world) or world[outcome.rank] != outcome.node_id:
            raise self.failure(f"round {r}: {outcome.node_id} got rank {outcome.rank} of "
                               f"{outcome.world_size}; the world has {len(world)}")
        self.outcomes.setdefault(r, []).append((node.name, outcome))

    def _run(self) -> ScaleRound:
        for _ in range(self.nodes_at_start):
            node = self.add_node()
            self._index[id(node.core)] = int(node.name)
            self._wake(node)
        while self._queue:
            at, _seq, node = heapq.heappop(self._queue)
            if node.wake_at > at:
                continue  # an earlier wake of this node, already served
            self.now = max(self.now, at)
            if node.core.freezer:
                self.costs.freezer = int(node.name)
            node.step()
            self.steps += 1
            self._wake(node)
        done = len(self.outcomes.get(0, ()))
        if done != self.nodes_at_start:
            raise self.failure(f"{done} of {self.nodes_at_start} nodes completed round 0")
        self.costs.steps = self.steps
        self.costs.seconds = self.now
        return self


def run_seed(seed: int, verbose: bool = False) -> Simulation:
    """Run one seed; raise ``SimulationFailure`` if a guarantee broke."""
    return Simulation(seed, verbose).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="replay this seed")
    parser.add_argument("--first", type=int, default=0, help="first seed of a sweep")
    parser.add_argument("--count", type=int, default=1000, help="seeds in a sweep")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the trace")
    parser.add_argument("--scale", type=int, default=None, metavar="NODES",
                        help="run one round of NODES nodes and print what each cost etcd")
    args = parser.parse_args(argv)
    if args.scale is not None:
        started = time.process_time()
        sim = ScaleRound(args.scale).run()
        print(f"one round of {args.scale} nodes: {sim.steps} steps, {sim.now:.3f} s of virtual "
              f"time, {time.process_time() - started:.1f} s of CPU")
        print(sim.costs.table())
        return 0
    seeds = [args.seed] if args.seed is not None else range(args.first, args.first + args.count)
    failures = steps = rounds = 0
    for seed in seeds:
        try:
            sim = run_seed(seed, args.verbose)
        except SimulationFailure as err:
            failures += 1
            print(err)
            continue
        steps += sim.steps
        rounds += len(sim.finals)
    print(f"{len(seeds)} seeds, {failures} failed, {steps} steps, {rounds} rounds completed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
