"""The Python-visible API of the compiled core (``_state.pyx``; ``_state.pxd``
declares its fields). Two machines: the run's (``Status`` x ``Event``, one CAS
per transition on the state record) and a node's (``Phase`` x ``Move``), driven
through ``Node.next_action``: the node returns what to do, its driver does it
and feeds back the answer.
"""

import enum
import random
from collections.abc import Iterable, Sequence
from typing import Any

from rdzv.api import RendezvousError
from rdzv.keys import RunKeys

# A key-value as reads return it: (value, mod_revision, create_revision).
_Got = tuple[bytes, int, int]
# A transaction's answer: (succeeded, revision, results).
_TxnAnswer = tuple[bool, int, list[Any]]
# A watch event: (is_put, key, value, mod_revision).
_WatchEvent = tuple[bool, bytes, bytes, int]

FORMAT_VERSION: int
SHARD_MEMBERS: int
CAS_SHARDS: int
PAGE_TXN_SHARDS: int
MAX_TOPOLOGY_BYTES: int
RANK_ORDERS: tuple[str, ...]
VIEW_LIST_LIMIT: int

class Status(enum.IntEnum):
    NONE = 0
    JOINABLE = 1
    FROZEN = 2
    FINAL = 3
    CLOSED = 4

class Event(enum.IntEnum):
    OPEN = 0
    FREEZE = 1
    FINALIZE = 2
    RESTART = 3
    CLOSE = 4

class Phase(enum.IntEnum):
    IDLE = 0
    JOINED = 1
    CONFIRMED = 2
    WAITING = 3
    DONE = 4

class Move(enum.IntEnum):
    BEGIN = 0
    JOIN = 1
    CONFIRM = 2
    SURPLUS = 3
    REGISTER = 4
    COMPLETE = 5
    LEAVE = 6

class Step(enum.IntEnum):
    STEP_WAIT = 0
    STEP_DONE = 1
    STEP_TXN = 2
    STEP_GET = 3

class TransitionError(RendezvousError): ...

def status_name(status: int) -> str: ...
def phase_after(phase: int, move: int) -> Phase: ...

class StateRecord:
    round: int
    status: int
    min_nodes: int
    max_nodes: int
    cutoff: int
    world_size: int
    last_final: int
    def __init__(self, round: int, status: int, min_nodes: int, max_nodes: int,
                 cutoff: int = 0, world_size: int = 0, last_final: int = -1) -> None: ...
    def encode(self) -> bytes: ...
    def transition(self, event: int, **changes: int) -> StateRecord: ...

def transition(s: StateRecord | None, event: int, **changes: int) -> StateRecord: ...
def decode_state(data: bytes, key: bytes | str = b"state") -> StateRecord: ...

def world_shards(world_size: int) -> int: ...
def shard_of(node_id: str, shards: int) -> int: ...
def encode_world(round: int, cutoff: int, size: int, master_addr: str = "",
                 master_port: int = 0) -> bytes: ...
def decode_world(data: bytes, key: bytes = b"world") -> tuple[int, int, int, str, int]: ...
def encode_rank_shard(round: int, entries: list[tuple[str, int]], master_addr: str = "",
                      master_port: int = 0) -> bytes: ...
def decode_rank_shard(data: bytes,
                      key: bytes = b"ranks") -> tuple[int, dict[str, int], str, int]: ...
def plan_world(keys: RunKeys, round: int, cutoff: int, world: list[str],
               master_addr: str = "", master_port: int = 0,
               lease: int = 0) -> tuple[list[tuple[list[Any], list[Any]]], list[Any]]: ...
def world_from(header: bytes, shards: Iterable[Sequence[Any]], keys: RunKeys,
               round: int) -> tuple[list[str], str, int]: ...

def topology_problem(label: Any) -> str | None: ...
def check_topology(label: Any, source: str = "topology") -> str: ...
def encode_member(host: str, addr: str, pid: int, port: int = 0, topology: str = "",
                  rank_order: str = "stable") -> bytes: ...
def decode_member(data: bytes) -> tuple[str, str, int, int, str, str] | None: ...
def placement_order(members: Iterable[tuple[str, bytes]]) -> list[str]: ...
def assign_ranks(members: Sequence[tuple[str, bytes]], previous: Sequence[str],
                 max_nodes: int) -> list[str]: ...

class Backoff:
    def __init__(self, initial: float = 50e-6, cap: float = 0.05,
                 rng: random.Random | None = None) -> None: ...
    def next_delay(self) -> float: ...
    def reset(self) -> None: ...

class WatchSpec:
    """A watch a node wants held: ``tag`` is "state", "round" or "waiting"."""
    tag: str
    key: bytes
    prefix: bool
    start: int  # 0: from when it starts
    no_put: bool
    def __init__(self, tag: str, key: bytes, prefix: bool, start: int, no_put: bool) -> None: ...

class Action:
    """What a node asks its driver to do; the fields of its ``step`` are set."""
    step: Step
    compares: list[tuple[Any, ...]] | None  # STEP_TXN
    success: list[tuple[Any, ...]] | None
    failure: list[tuple[Any, ...]] | None
    once: bool
    join: bool
    key: bytes | None  # STEP_GET
    wake_at: float  # STEP_WAIT
    result: Any  # STEP_DONE
    def __init__(self, step: int, compares: list[Any] | None = None,
                 success: list[Any] | None = None, failure: list[Any] | None = None,
                 once: bool = False, key: bytes | None = None, wake_at: float = ...,
                 result: Any = None, join: bool = False) -> None: ...

def merge_joins(actions: list[Action], max_ops: int) -> list[tuple[Action, list[int]]]: ...
def split_joins(actions: list[Action], answer: tuple[bool, int, list[Any]]) -> list[Any]: ...

class Node:
    """One node's side of the rendezvous: a sans-I/O machine.

    Drive it: ``begin(descriptor, wall_offset)`` (or ``begin_close()``), then
    ``action = next_action(now)`` until ``STEP_DONE``: run a ``STEP_TXN`` or
    ``STEP_GET`` and ``feed`` the answer (or ``fail`` the error); on
    ``STEP_WAIT`` hold ``watches`` and feed what they deliver (``observe_*``)
    until ``wake_at``.
    """
    node_id: str
    run_prefix: bytes
    min_nodes: int
    max_nodes: int
    lease: int
    data_lease: int
    state_lease: int
    descriptor: bytes
    last_call_timeout: float
    keys: RunKeys
    liveness_interval: float
    state: StateRecord | None
    state_mod: int
    phase: Phase
    joined_round: int
    join_revision: int
    completed_round: int
    completed: StateRecord | None
    completed_mod: int
    rank: int
    world: list[str]
    waiting_round: int
    wake_at: float
    open_at: float
    retry_at: float
    check_at: float
    state_watch_start: int
    freeze_pending: bool
    counter: bool
    poll_at: float
    counter_watch_at: float
    freezer: bool
    confirmed: set[str]
    check_liveness: bool
    watch_revision: int
    freeze_round: int
    master: tuple[str, int]
    def __init__(self, node_id: str, keys: RunKeys, min_nodes: int, max_nodes: int,
                 lease: int, descriptor: bytes, last_call_timeout: float,
                 liveness_interval: float, rng: random.Random | None = None) -> None: ...
    def use_run_leases(self, data_lease: int, state_lease: int) -> None: ...
    @property
    def next_wake(self) -> float: ...
    @property
    def watches(self) -> list[WatchSpec]: ...
    def watch_started(self, tag: str) -> None: ...
    def watch_failed(self, tag: str, error: BaseException, compacted: bool) -> None: ...
    def begin(self, descriptor: bytes | None = None, wall_offset: float = 0.0) -> None: ...
    def begin_close(self) -> None: ...
    def next_action(self, now: float) -> Action: ...
    def feed(self, result: _TxnAnswer | _Got | None) -> None: ...
    def fail(self, error: BaseException) -> None: ...
    def observe_state(self, value: bytes | None, mod_revision: int) -> None: ...
    def observe_state_read(self, revision: int, got: _Got | None) -> None: ...
    def observe_round_events(self, events: Iterable[_WatchEvent]) -> None: ...
    def observe_round_snapshot(self, round: int, confirmed_ids: Iterable[str],
                               member_ids: Iterable[str]) -> None: ...
    def observe_member_deleted(self) -> None: ...
    def observe_counter_deleted(self) -> None: ...
    def forget_state(self) -> None: ...
    def forget_state_watch(self) -> None: ...
    def cleanup_ops(self) -> list[tuple[str, bytes]]: ...
    def left(self) -> None: ...

class RunView:
    """A member's view of the run between rounds (see ``_state.pyx``)."""
    keys: RunKeys
    round: int
    cutoff: int
    world: frozenset[str]
    world_size: int
    state: StateRecord
    state_mod: int
    state_unreadable: bool
    revision: int
    read_revision: int
    read_counted: bool
    watched_revision: int
    verified_at: float
    check_interval: float
    def __init__(self, keys: RunKeys, state: StateRecord, state_mod: int,
                 world: Iterable[str], check_interval: float) -> None: ...
    @property
    def unread(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def moved_on(self) -> bool: ...
    def num_waiting(self) -> int: ...
    def waiting_nodes(self) -> list[str]: ...
    def lost_members(self) -> list[str]: ...
    def watch_spec(self) -> tuple[bytes, bytes] | None: ...
    def read_ops(self, count: bool = True) -> list[tuple[Any, ...]]: ...
    def check_due(self, now: float) -> bool: ...
    def confirm(self, at: float) -> None: ...
    def observe_read(self, revision: int, results: list[Any], now: float,
                     force: bool = False) -> bool: ...
    @property
    def watch_start(self) -> int: ...
    def observe_watch_start(self, start: int) -> None: ...
    def observe_events(self, events: Iterable[_WatchEvent]) -> None: ...
