"""Read a run's status from etcd: its round, bounds, members, deadlines and world.

What ``rdzv status`` shows, for Python callers too. Reading changes nothing in
etcd and needs no node of the run: only a connection.

Example::

    from rdzv.client import EtcdClient, EtcdConfig, parse_endpoints
    from rdzv.inspect import NodeState, read_run_status

    client = EtcdClient(EtcdConfig(endpoints=tuple(parse_endpoints("127.0.0.1:2379"))))
    try:
        status = read_run_status(client, "job42")
    finally:
        client.close()
    print(status.state, status.round, status.world_size)
    alive = [m.node for m in status.members if m.state is NodeState.CONFIRMED]

``read_run_status`` reads everything ``rdzv status`` shows (a handful of
requests plus one lease query per live node); ``read_round_progress`` reads
only how far the current round is (two requests), for a display that refreshes
often; ``read_world`` reads a frozen round's world. ``rdzv.runs.list_runs``
lists the runs under a prefix.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Any

from rdzv import _state
from rdzv.client import EtcdClient
from rdzv.keys import DEFAULT_PREFIX, RunKeys, normalize_prefix
from rdzv.runs import run_footprint

__all__ = [
    "NodeState",
    "NodeStatus",
    "RoundProgress",
    "RunState",
    "RunStatus",
    "World",
    "read_round_progress",
    "read_run_status",
    "read_world",
]

logger = logging.getLogger(__name__)


class RunState(str, enum.Enum):
    """Where a run stands, as its state record says (see ``docs/PROTOCOL.md``).

    Its value is the name ``rdzv status`` and ``rdzv runs`` print.
    """

    NONE = "none"
    """No state record: no node has joined the run, nor has anyone closed it."""
    JOINABLE = "joinable"
    """The round accepts members; it freezes at ``max_nodes``, or when the last
    call ends with at least ``min_nodes``."""
    FROZEN = "frozen"
    """The round's world is fixed; its members confirm that they are alive."""
    FINAL = "final"
    """The round is complete; nodes that come now wait for the next one."""
    CLOSED = "closed"
    """The run is over: every current and future join fails."""


class NodeState(str, enum.Enum):
    """Where one node of a run stands in the run's current round.

    Its value is the name ``rdzv status`` prints.
    """

    JOINED = "joined"
    """Its member key is live in the round, and it has not confirmed: the
    round is joinable, or frozen and it has yet to confirm, or it came after
    the world was fixed without being in it."""
    CONFIRMED = "confirmed"
    """Its member key and its confirmation are live: it is alive in the
    round's frozen or final world."""
    LEFT = "left"
    """It is in the round's world, but its member key is gone: it left
    (``shutdown``) or its lease expired."""
    WAITING = "waiting"
    """It came after the round was frozen or complete, and waits for the next
    round to open."""


@dataclass(frozen=True)
class NodeStatus:
    """One node of a run.

    Attributes:
        node: the node's id (from its lease id in hex).
        state: where it stands in the round (see ``NodeState``).
        host: its host name or address; None once its member key is gone
            (and for waiting nodes, whose keys carry no descriptor).
        addr: the address it advertises as master address.
        pid: its process id.
        rank: its rank in the round's world; None before the freeze, or if it
            is not in the world.
        lease_ttl: seconds left on its lease; None without a live key.
        topology: its topology label, such as ``pod1/rack07``; None without one.
    """

    node: str
    state: NodeState
    host: str | None = None
    addr: str | None = None
    pid: int | None = None
    rank: int | None = None
    lease_ttl: int | None = None
    topology: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the node as ``rdzv status --json`` prints it (``state`` by name)."""
        return {
            "node": self.node, "host": self.host, "addr": self.addr, "pid": self.pid,
            "rank": self.rank, "state": self.state.value, "lease_ttl": self.lease_ttl,
            "topology": self.topology,
        }


@dataclass(frozen=True)
class World:
    """A frozen round's world: its nodes in rank order and where rank 0 listens.

    Attributes:
        nodes: node ids; the node at index ``i`` has rank ``i``.
        master_addr: the address rank 0 advertised ("" if none).
        master_port: the port of the round's store on rank 0 (0 if none).
    """

    nodes: tuple[str, ...]
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class RunStatus:
    """What ``read_run_status`` reads of one run.

    Attributes:
        run_id: the run's id.
        prefix: the key prefix shared by the runs, normalized (``/`` for none).
        state: the run's state; ``RunState.NONE`` leaves the fields of the
            state record (``round`` to ``last_final``) None.
        round: the current round.
        min_nodes: the round's lower bound on its world.
        max_nodes: the round's upper bound on its world.
        world_size: how many nodes the round's world has, once frozen.
        last_final: the latest round that completed before this one.
        joined: how many member keys of the round are live.
        last_call_ends: when a joinable round that has ``min_nodes`` members
            completes without more joins, in seconds since the epoch; None
            before that, and once frozen.
        members: the round's members in placement order (topology group,
            then host in natural order: the order in which a fresh world is
            ranked), then the world's nodes whose member keys are gone.
        waiting: the nodes waiting for the next round, in the order they came.
        world: the round's world once frozen; None before (or if its keys
            are gone).
        keys: how many keys the run takes in etcd.
        bytes: how many bytes (keys and values) the run takes in etcd.
    """

    run_id: str
    prefix: str
    state: RunState
    round: int | None = None
    min_nodes: int | None = None
    max_nodes: int | None = None
    world_size: int | None = None
    last_final: int | None = None
    joined: int = 0
    last_call_ends: float | None = None
    members: tuple[NodeStatus, ...] = ()
    waiting: tuple[NodeStatus, ...] = ()
    world: World | None = None
    keys: int = 0
    bytes: int = 0

    @property
    def closed(self) -> bool:
        """Whether the run is closed (no further rounds)."""
        return self.state is RunState.CLOSED

    def to_dict(self) -> dict[str, Any]:
        """Return the status as ``rdzv status --json`` prints it.

        Returns:
            A JSON-ready dict: ``run_id``, ``prefix``, ``status`` (the state's
            name), ``round``, ``min_nodes``, ``max_nodes``, ``world_size``,
            ``last_final``, ``closed``, ``joined``, ``last_call_ends``,
            ``members`` and ``waiting`` (lists of ``NodeStatus.to_dict()``) and
            ``footprint`` (``keys`` and ``bytes``).
        """
        return {
            "run_id": self.run_id, "prefix": self.prefix, "status": self.state.value,
            "round": self.round, "min_nodes": self.min_nodes, "max_nodes": self.max_nodes,
            "world_size": self.world_size, "last_final": self.last_final,
            "closed": self.closed, "joined": self.joined,
            "last_call_ends": self.last_call_ends,
            "members": [m.to_dict() for m in self.members],
            "waiting": [w.to_dict() for w in self.waiting],
            "footprint": {"keys": self.keys, "bytes": self.bytes},
        }


@dataclass(frozen=True)
class RoundProgress:
    """How far a run's current round is, from its state record and one count.

    Attributes:
        state: the run's state.
        round: the current round; None for ``RunState.NONE``.
        min_nodes: the round's lower bound on its world.
        max_nodes: the round's upper bound on its world.
        world_size: the frozen world's size (frozen and final rounds).
        count: joinable: member keys; frozen: confirmations; final: nodes
            waiting for the next round; None otherwise.
    """

    state: RunState
    round: int | None = None
    min_nodes: int | None = None
    max_nodes: int | None = None
    world_size: int | None = None
    count: int | None = None


def read_world(client: EtcdClient, keys: RunKeys,
               round: int) -> tuple[list[str], str, int] | None:
    """Read round ``round``'s world: its record and every rank shard, in one
    read-only transaction.

    Args:
        client: a connection to etcd.
        keys: the run's keys.
        round: the round.

    Returns:
        ``(node ids in rank order, master_addr, master_port)``, or None if the
        round was never frozen (or its keys are gone).

    Raises:
        RendezvousStateError: the world's records cannot be decoded.
        RendezvousConnectionError: etcd could not be reached.
    """
    _ok, _revision, (header, shards) = client.txn(
        [], [("get", keys.world(round)), ("range", keys.ranks(round), 0)], [])
    if header is None:
        return None
    return _state.world_from(header[0], shards, keys, round)


def read_run_status(client: EtcdClient, run_id: str, prefix: str = DEFAULT_PREFIX) -> RunStatus:
    """Read one run's status.

    Args:
        client: a connection to etcd.
        run_id: the run's id.
        prefix: the key prefix shared by all runs (``etcd_prefix``).

    Returns:
        The run's status; a run that does not exist has ``RunState.NONE``.

    Raises:
        RendezvousConnectionError: etcd cannot be reached.
        RendezvousStateError: the state or world record cannot be decoded.
        ValueError: the run id or the prefix is malformed.
    """
    keys = RunKeys(prefix, run_id)
    footprint = run_footprint(client, keys)
    base = {"run_id": run_id, "prefix": normalize_prefix(prefix) or "/",
            "keys": footprint["keys"], "bytes": footprint["bytes"]}
    got = client.get(keys.state)
    if got is None:
        return RunStatus(state=RunState.NONE, **base)
    s = _state.decode_state(got[0], keys.state)
    world = None
    if s.status != _state.Status.JOINABLE:
        got_world = read_world(client, keys, s.round)
        if got_world is not None:
            world = World(tuple(got_world[0]), got_world[1], got_world[2])
    leases: dict[int, int] = {}
    members = _leased_keys(client, keys.members(s.round))
    confirmed = {node for node, _, _ in _leased_keys(client, keys.confirmed(s.round))}
    ttls = {node: _lease_ttl(client, lease, leases) for node, _, lease in members}
    ranks = {node: rank for rank, node in enumerate(world.nodes if world else ())}
    descriptors = {node: value for node, value, _ in members}
    rows = []
    for node in _state.placement_order(descriptors.items()):
        described = _state.decode_member(descriptors[node])
        host, addr, pid, _port, topology, _order = (
            described if described is not None else (None,) * 6
        )
        state = NodeState.CONFIRMED if node in confirmed else NodeState.JOINED
        rows.append(NodeStatus(node, state, host, addr, pid, ranks.get(node), ttls[node],
                               topology or None))
    rows += [NodeStatus(node, NodeState.LEFT, rank=rank)
             for node, rank in ranks.items() if node not in descriptors]
    waiting = tuple(
        NodeStatus(node, NodeState.WAITING, lease_ttl=_lease_ttl(client, lease, leases))
        for node, _, lease in _leased_keys(client, keys.waiting(s.round))
    )
    last_call_ends = None
    if s.status == _state.Status.JOINABLE:
        last_call = client.get(keys.last_call(s.round))
        if last_call is not None:
            try:
                last_call_ends = float(last_call[0])
            except ValueError:
                logger.warning("ignoring a malformed last-call record %r", last_call[0])
    return RunStatus(
        state=RunState(_state.status_name(s.status)), round=s.round, min_nodes=s.min_nodes,
        max_nodes=s.max_nodes, world_size=s.world_size or None,
        last_final=None if s.last_final < 0 else s.last_final, joined=len(members),
        last_call_ends=last_call_ends, members=tuple(rows), waiting=waiting, world=world,
        **base,
    )


def read_round_progress(client: EtcdClient, run_id: str,
                        prefix: str = DEFAULT_PREFIX) -> RoundProgress:
    """Read how far a run's current round is: its state record and one count.

    Args:
        client: a connection to etcd.
        run_id: the run's id.
        prefix: the key prefix shared by all runs (``etcd_prefix``).

    Returns:
        The round's progress; a run that does not exist has ``RunState.NONE``.

    Raises:
        RendezvousConnectionError: etcd cannot be reached.
        RendezvousStateError: the state record cannot be decoded.
        ValueError: the run id or the prefix is malformed.
    """
    keys = RunKeys(prefix, run_id)
    got = client.get(keys.state)
    if got is None:
        return RoundProgress(RunState.NONE)
    s = _state.decode_state(got[0], keys.state)
    counted = {
        _state.Status.JOINABLE: keys.members, _state.Status.FROZEN: keys.confirmed,
        _state.Status.FINAL: keys.waiting,
    }.get(s.status)
    return RoundProgress(
        RunState(_state.status_name(s.status)), s.round, s.min_nodes, s.max_nodes,
        s.world_size or None, None if counted is None else client.count(counted(s.round)),
    )


def _leased_keys(client: EtcdClient, prefix: bytes) -> list[tuple[str, bytes, int]]:
    """``[(name below prefix, value, lease id), ...]`` in creation order."""
    return [
        (key[len(prefix):].decode("utf-8", "replace"), value, lease)
        for key, value, lease in client.range_leases(prefix)
    ]


def _lease_ttl(client: EtcdClient, lease: int, cache: dict[int, int]) -> int | None:
    """Seconds left on ``lease`` (None for no lease), asked once per lease."""
    if not lease:
        return None
    if lease not in cache:
        cache[lease] = client.lease_time_to_live(lease)
    return cache[lease]
