# cython: language_level=3
"""The compiled rendezvous core: codecs, transition table, rank assignment, CAS loop.

Theory of operation
-------------------
A run is a sequence of rounds. ``<run>/state`` holds one small record: the
current round, its status (``joinable``, ``frozen``, ``final``, ``closed``), the
node bounds, and once frozen the cutoff revision and world size. The record only
changes through the transitions in ``_TRANSITIONS``, each a single
compare-and-swap on the record's mod_revision. Joining is *not* a transition:
a node joins round r with one transaction that succeeds only while the record is
unchanged, puts its member key (on its lease) and counts the members; etcd's
revision order is the join order. So N joins cost N writes and no CAS retries.

A join counts nothing (etcd counts a range by walking it: a count in every
join would cost a round O(N^2) in etcd's serial apply loop). The first joiner
of a round takes its counter key in the same transaction and counts the
members now and then, more often while they change (``_POLL_MIN``). When the
count reaches ``max_nodes`` it freezes the round; when it reaches ``min_nodes``
it arms the last-call timer and freezes when it fires (the CAS makes racing
freezers safe). The key lives on the counter's lease: if the counter dies or
gives up, a joiner that finds the key gone takes it over. The freezer computes
the rank assignment here, publishes it with the frozen record in one
transaction, and counts the round's confirmations the same way: each world
member confirms it is alive with one put; when all have, the freezer marks the
round final. It watches the round's deletions only: a world member whose key
vanishes (lease expiry) before that makes it restart the round. Everyone else
only watches the state record: O(1) events per node.

Old rounds are deleted by the transitions that make them old, inside the CAS
that the transition is anyway (``_retired_rounds``): opening round r+1 after
round r completed deletes every round below r (round r stays: its world gives
survivors their ranks, its store is still in use, late nodes wait in it), and
restarting round r deletes the restarted rounds between the last completed
one and r. So a run holds at most three rounds' keys, however long it lives.

Two rules, after h11: everything that decides what happens to the rendezvous is
in this file, and nothing in this file does I/O by itself. ``Node`` is driven
through ``next_action(now)``: it returns an ``Action`` (a transaction or a read
for its driver to run, a time to wake at, or the end of its task) and takes the
answers back through ``feed``, and a failed request through ``fail``. It holds
no client, never sleeps, and draws its backoff from a generator it is given, so
a simulation drives it deterministically on a virtual clock.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.math cimport INFINITY
from libc.math cimport floor as c_floor
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

import logging
import random
import zlib

from rdzv.api import (
    RendezvousClosedError,
    RendezvousError,
    RendezvousStateError,
)
from rdzv.txn import txn_ops

FORMAT_VERSION = 1
_STATE_MAGIC = b"rdzv1"
_WORLD_MAGIC = b"rdzv1-world"
_MEMBER_MAGIC = b"rdzv1-node"

_STATUS_NAMES = ("none", "joinable", "frozen", "final", "closed")
_EVENT_NAMES = ("open", "freeze", "finalize", "restart", "close")
_STATUS_BY_NAME = {name: i for i, name in enumerate(_STATUS_NAMES) if i != NONE}

# The run machine: _TRANSITIONS[status][event] is the status after the event, or
# -1 where the event is not allowed. OPEN and RESTART also advance the round.
cdef int _TRANSITIONS[5][5]
_TABLE = [
    #  OPEN       FREEZE   FINALIZE  RESTART   CLOSE
    [JOINABLE,   -1,      -1,       -1,       CLOSED],   # NONE
    [-1,         FROZEN,  -1,       -1,       CLOSED],   # JOINABLE
    [-1,         -1,      FINAL,    JOINABLE, CLOSED],   # FROZEN
    [JOINABLE,   -1,      -1,       -1,       CLOSED],   # FINAL
    [-1,         -1,      -1,       -1,       -1],       # CLOSED
]
for _row, _targets in enumerate(_TABLE):
    for _col, _target in enumerate(_targets):
        _TRANSITIONS[_row][_col] = _target
del _TABLE, _row, _targets, _col, _target

# The node machine: _PHASES[phase][move] is the phase of a node after the move,
# or -1 where the move is not allowed. A call begins in IDLE and ends in DONE
# (or leaves, on an error); within it a node joins a round, confirms in its
# world or finds itself surplus, or registers as waiting for the next round.
cdef int _PHASES[5][7]
_TABLE = [
    # BEGIN  JOIN    CONFIRM    SURPLUS  REGISTER  COMPLETE  LEAVE
    [IDLE,   JOINED, -1,        -1,      WAITING,  -1,       IDLE],   # IDLE
    [IDLE,   JOINED, CONFIRMED, IDLE,    WAITING,  -1,       IDLE],   # JOINED
    [IDLE,   JOINED, -1,        -1,      WAITING,  DONE,     IDLE],   # CONFIRMED
    [IDLE,   JOINED, -1,        -1,      WAITING,  -1,       IDLE],   # WAITING
    [IDLE,   -1,     -1,        -1,      -1,       -1,       IDLE],   # DONE
]
for _row, _targets in enumerate(_TABLE):
    for _col, _target in enumerate(_targets):
        _PHASES[_row][_col] = _target
del _TABLE, _row, _targets, _col, _target

_PHASE_NAMES = ("idle", "joined", "confirmed", "waiting", "done")
_MOVE_NAMES = ("begin", "join", "confirm", "surplus", "register", "complete", "leave")

# Bound on lost compare-and-swaps in one step before giving up. Each lost
# CAS returns the newer record, so a loss means progress by someone else; this
# only stops a pathological livelock.
_MAX_CAS_ATTEMPTS = 1000

# How often the node counting a joinable round's members counts them again
# (and the freezer of a frozen round its confirmations): at least every
# _POLL_MIN seconds, and no more often than _POLL_PER_MEMBER
# seconds per member counted, so that etcd (which walks its index, about 0.1
# us per key) spends at most a few percent of its time on it at any size. A
# count that did not change doubles the delay, up to _POLL_MAX (or the
# per-member bound, if longer): a round that waits for nodes costs little.
cdef double _POLL_MIN = 0.005
cdef double _POLL_PER_MEMBER = 2e-6
cdef double _POLL_MAX = 0.25
# A joiner that waits this long in a round it does not count watches the
# counter key: if the counter dies (or gives up), its key goes with its lease
# and the joiner takes the count over at once. Rounds that freeze sooner
# never set these watches up. In rounds of more than _COUNTER_WATCHERS nodes
# only about that many joiners watch it (chosen by a hash of their id and the
# round): one watch per joiner would cost each node a watch to create and
# cancel (and etcd a watcher to catch up with the joins) in every round that
# lasts a second; the others find the key gone by their periodic check.
cdef double _COUNTER_WATCH_AFTER = 1.0
cdef int _COUNTER_WATCHERS = 8


class TransitionError(RendezvousError):
    """A transition that the run machine does not allow from this status."""


def phase_after(int phase, int move):
    """Return a node's phase after ``move`` (a ``Move``) from ``phase``.

    Raises:
        TransitionError: the node machine's table does not allow ``move`` there.
    """
    if not 0 <= phase < 5 or not 0 <= move < 7:
        raise ValueError(f"no phase {phase} or move {move} in the node machine")
    cdef int target = _PHASES[phase][move]
    if target < 0:
        raise TransitionError(
            f"a node cannot {_MOVE_NAMES[move]} when it is {_PHASE_NAMES[phase]}")
    cdef Phase after = <Phase>target
    return after


def status_name(int status):
    """Return the lowercase name of a status code."""
    return _STATUS_NAMES[status]


# --------------------------------------------------------------- state record
cdef class StateRecord:
    """The record stored at ``<run>/state``.

    Args:
        round: round number, only ever grows.
        status: one of the ``Status`` codes (not NONE).
        min_nodes, max_nodes: bounds of the round's world.
        cutoff: revision at which the world was read (frozen and final).
        world_size: number of members (frozen and final), else 0.
        last_final: the latest round that completed before this one, or -1.
    """

    def __init__(self, long long round, int status, int min_nodes, int max_nodes,
                 long long cutoff=0, int world_size=0, long long last_final=-1):
        self.round = round
        self.status = status
        self.min_nodes = min_nodes
        self.max_nodes = max_nodes
        self.cutoff = cutoff
        self.world_size = world_size
        self.last_final = last_final

    cpdef bytes encode(self):
        """Serialize as one line of ASCII, readable with ``etcdctl get``."""
        return b"%s round=%d status=%s min=%d max=%d cutoff=%d world=%d last_final=%d" % (
            _STATE_MAGIC, self.round, _STATUS_NAMES[self.status].encode(),
            self.min_nodes, self.max_nodes, self.cutoff, self.world_size, self.last_final,
        )

    def __eq__(self, other):
        if not isinstance(other, StateRecord):
            return NotImplemented
        return self.encode() == (<StateRecord>other).encode()

    def __repr__(self):
        return f"StateRecord({self.encode().decode()})"

    def transition(self, int event, **changes):
        """Return the record after ``event``, per the transition table.

        Raises:
            TransitionError: ``event`` is not allowed from this status.
        """
        return _apply(self, event, changes)


def transition(StateRecord s, int event, **changes):
    """Return the record after ``event`` applied to ``s`` (None: no record yet).

    Raises:
        TransitionError: the table does not allow ``event`` from that status.
    """
    return _apply(s, event, changes)


cdef StateRecord _apply(StateRecord s, int event, dict changes):
    cdef int status = s.status if s is not None else NONE
    cdef int target = _TRANSITIONS[status][event]
    if target < 0:
        raise TransitionError(
            f"cannot {_EVENT_NAMES[event]} a rendezvous that is {_STATUS_NAMES[status]}"
        )
    cdef long long round = s.round if s is not None else 0
    cdef long long last_final = s.last_final if s is not None else -1
    if event == OPEN and status == FINAL:
        last_final = round
        round += 1
    elif event == RESTART:
        round += 1
    cdef StateRecord new = StateRecord(
        round, target,
        changes.get("min_nodes", s.min_nodes if s is not None else 1),
        changes.get("max_nodes", s.max_nodes if s is not None else 1),
        changes.get("cutoff", s.cutoff if target in (FROZEN, FINAL) else 0),
        changes.get("world_size", s.world_size if target in (FROZEN, FINAL) else 0),
        last_final,
    )
    if event == CLOSE and s is not None:
        new.cutoff = s.cutoff
        new.world_size = s.world_size
    return new


_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


cdef object _canonical_int(bytes text):
    """The integer ``text`` spells in canonical ASCII decimal, or None."""
    if not text or len(text) > 20:
        return None
    digits = text[1:] if text[:1] == b"-" else text
    if not digits or not digits.isdigit() or (digits[:1] == b"0" and len(digits) > 1):
        return None
    value = int(text)
    return None if text == b"-0" else value


cdef object _parse_int(bytes text, bytes key, bytes field, object low, object high):
    """A field of the state record as a bounded int, or ``RendezvousStateError``."""
    value = _canonical_int(text)
    if value is None:
        raise RendezvousStateError(
            f"state record at {key.decode(errors='replace')!r} has a bad "
            f"{field.decode()}={text[:24].decode(errors='replace')!r}; expected an integer"
        )
    if not low <= value <= high:
        raise RendezvousStateError(
            f"state record at {key.decode(errors='replace')!r} has "
            f"{field.decode()}={value}, outside [{low}, {high}]"
        )
    return value


_STATE_FIELDS = (b"round", b"status", b"min", b"max", b"cutoff", b"world", b"last_final")

# The bytes and the record of the last state record decoded: a node's watch,
# its reads and its view see each record more than once, and the nodes of one
# process (a simulation's) the same ones. A record is immutable once built.
cdef tuple _last_state = (None, None)


def decode_state(data, key=b"state"):
    """Parse a state record; raise ``RendezvousStateError`` naming ``key`` if bad.

    Args:
        data: the bytes stored at the state key.
        key: the key they came from, for the error message.
    """
    global _last_state
    if not isinstance(data, bytes):
        raise TypeError("state record must be bytes")
    cdef tuple last = _last_state
    if data == last[0]:
        return last[1]
    cdef bytes k = key if isinstance(key, bytes) else str(key).encode()
    name = k.decode(errors="replace")
    parts = data.split(b" ")
    if not parts or parts[0] != _STATE_MAGIC:
        head = data[:24]
        raise RendezvousStateError(
            f"state record at {name!r} is not an rdzv version-{FORMAT_VERSION} record "
            f"(starts with {head!r}); it was written by another program or another rdzv "
            "version. Use another etcd_prefix or run id, or delete the run's keys."
        )
    if len(parts) != 1 + len(_STATE_FIELDS):
        raise RendezvousStateError(
            f"state record at {name!r} has {len(parts) - 1} fields, expected "
            f"{len(_STATE_FIELDS)}: {data[:120]!r}"
        )
    values = {}
    for part, field in zip(parts[1:], _STATE_FIELDS):
        field_name, sep, text = part.partition(b"=")
        if field_name != field or not sep:
            raise RendezvousStateError(
                f"state record at {name!r}: expected field {field.decode()!r}, "
                f"found {part[:40]!r}"
            )
        values[field] = text
    status = _STATUS_BY_NAME.get(values[b"status"].decode("ascii", "replace"))
    if status is None:
        raise RendezvousStateError(
            f"state record at {name!r} has unknown status {values[b'status'][:20]!r}"
        )
    cdef StateRecord s = StateRecord(
        _parse_int(values[b"round"], k, b"round", 0, _INT64_MAX - 1),
        status,
        _parse_int(values[b"min"], k, b"min", 1, _INT32_MAX),
        _parse_int(values[b"max"], k, b"max", 1, _INT32_MAX),
        _parse_int(values[b"cutoff"], k, b"cutoff", 0, _INT64_MAX),
        _parse_int(values[b"world"], k, b"world", 0, _INT32_MAX),
        _parse_int(values[b"last_final"], k, b"last_final", -1, _INT64_MAX),
    )
    if s.max_nodes < s.min_nodes:
        raise RendezvousStateError(
            f"state record at {name!r} has min={s.min_nodes} > max={s.max_nodes}"
        )
    if s.status in (FROZEN, FINAL) and not s.min_nodes <= s.world_size <= s.max_nodes:
        raise RendezvousStateError(
            f"state record at {name!r} has world={s.world_size} outside "
            f"[{s.min_nodes}, {s.max_nodes}]"
        )
    if s.last_final >= s.round:
        raise RendezvousStateError(
            f"state record at {name!r} has last_final={s.last_final} >= round={s.round}"
        )
    _last_state = (data, s)
    return s


# --------------------------------------------------------- world and members
# The world of a frozen round is published in two parts, so that a node reads
# a few KB at any world size (see docs/PROTOCOL.md, "The world"):
#
# * the header at rounds/<r>/world: round, cutoff, size and rank 0's address,
#   written by the freeze transaction (its existence is what "frozen" means to
#   a joining node);
# * rank shards at rounds/<r>/ranks/<cutoff>/<k>: ``node_id:rank`` pairs of the
#   members whose id hashes to shard k (SHARD_MEMBERS of them on average), and
#   rank 0's address again. A member reads only its own shard.
#
# A world of up to CAS_SHARDS shards is written by the freeze transaction itself.
# A larger one (about 6,000 members and more) cannot be: etcd takes at most 128
# operations and 1.5 MiB in one request. Its shards are written before the
# freeze, in transactions of at most PAGE_TXN_SHARDS puts, each under the
# condition that none of its shards exists yet. The shards live under the
# revision the freezer read the members at, which the frozen state record
# names as its cutoff: shards that no freeze named (a freezer that lost its
# CAS or died) are never read, and a freezer that finds a shard of its cutoff
# already written leaves that cutoff to the other and freezes later, so the
# shards a frozen record names are all of one freezer's.

#: Mean number of members per rank shard: about 1.5 KB, and the fullest of the
#: 1,563 shards of 10^5 members holds about 95.
SHARD_MEMBERS = 64
#: Shards the freeze transaction carries itself (with its 5 other writes, well
#: under etcd's 128 operations).
CAS_SHARDS = 96
#: Shards per transaction written before the freeze (one compare and one put each).
PAGE_TXN_SHARDS = 120

_RANKS_MAGIC = b"rdzv1-ranks"


cpdef long long world_shards(long long world_size):
    """Number of rank shards of a world of ``world_size`` members."""
    return max(1, (world_size + SHARD_MEMBERS - 1) // SHARD_MEMBERS)


cpdef long long shard_of(str node_id, long long shards):
    """The rank shard that holds ``node_id`` in a world of ``shards`` shards."""
    return zlib.crc32(node_id.encode("ascii")) % shards


def encode_world(long long round, long long cutoff, long long size, str master_addr="",
                 int master_port=0):
    """Serialize a world's header: its round, cutoff, size and rank 0's address.

    Args:
        round: the round it belongs to.
        cutoff: the revision the members were read at (names the rank shards).
        size: the number of members.
        master_addr, master_port: rank 0's bootstrap address, from its descriptor.
    """
    return b"%s round=%d cutoff=%d size=%d master=%s,%d" % (
        _WORLD_MAGIC, round, cutoff, size, master_addr.encode(), master_port)


cdef tuple _split_master(bytes text, str what, str name):
    addr, _, port_text = text.rpartition(b",")
    port = _canonical_int(port_text)
    if port is None or not 0 <= port < 65536:
        raise RendezvousStateError(f"{what} at {name!r} has a bad master port")
    try:
        return addr.decode(), port
    except UnicodeDecodeError:
        raise RendezvousStateError(f"{what} at {name!r} is not valid text") from None


cdef str _key_text(key):
    return key.decode(errors="replace") if isinstance(key, bytes) else str(key)


def decode_world(data, key=b"world"):
    """Parse a world's header into ``(round, cutoff, size, master_addr, master_port)``.

    Raises:
        RendezvousStateError: the bytes are not a world header (names ``key``).
    """
    name = _key_text(key)
    parts = data.split(b" ") if isinstance(data, bytes) else []
    fields = (b"round=", b"cutoff=", b"size=", b"master=")
    if len(parts) != 5 or parts[0] != _WORLD_MAGIC or any(
            not part.startswith(field) for part, field in zip(parts[1:], fields)):
        raise RendezvousStateError(
            f"world record at {name!r} cannot be decoded: {bytes(data)[:60]!r}")
    numbers = []
    for part, field in zip(parts[1:4], fields):
        value = _canonical_int(part[len(field):])
        if value is None or not 0 <= value <= _INT64_MAX:
            raise RendezvousStateError(
                f"world record at {name!r} has a bad {field.rstrip(b"=").decode()}")
        numbers.append(value)
    if numbers[2] > _INT32_MAX:
        raise RendezvousStateError(f"world record at {name!r} has a bad size")
    return (*numbers, *_split_master(parts[4][7:], "world record", name))


def encode_rank_shard(long long round, list entries, str master_addr="", int master_port=0):
    """Serialize one rank shard: ``(node_id, rank)`` pairs and rank 0's address.

    Args:
        round: the round it belongs to.
        entries: the shard's members and their ranks.
        master_addr, master_port: rank 0's bootstrap address.
    """
    return b"%s round=%d master=%s,%d ids=%s" % (
        _RANKS_MAGIC, round, master_addr.encode(), master_port,
        ",".join([f"{node_id}:{rank}" for node_id, rank in entries]).encode("ascii"))


def decode_rank_shard(data, key=b"ranks"):
    """Parse a rank shard into ``(round, {node_id: rank}, master_addr, master_port)``.

    Raises:
        RendezvousStateError: the bytes are not a rank shard (names ``key``).
    """
    name = _key_text(key)
    parts = data.split(b" ") if isinstance(data, bytes) else []
    if len(parts) != 4 or parts[0] != _RANKS_MAGIC or not parts[1].startswith(b"round=") \
            or not parts[2].startswith(b"master=") or not parts[3].startswith(b"ids="):
        raise RendezvousStateError(
            f"rank shard at {name!r} cannot be decoded: {bytes(data)[:60]!r}")
    round_number = _canonical_int(parts[1][6:])
    if round_number is None or round_number < 0:
        raise RendezvousStateError(f"rank shard at {name!r} has a bad round")
    master = _split_master(parts[2][7:], "rank shard", name)
    cdef dict ranks = {}
    text = parts[3][4:]
    for entry in (text.split(b",") if text else ()):
        node_id, sep, rank_text = entry.rpartition(b":")
        rank = _canonical_int(rank_text)
        if not sep or not node_id or rank is None or not 0 <= rank <= _INT32_MAX:
            raise RendezvousStateError(
                f"rank shard at {name!r} has a bad entry {entry[:40]!r}")
        try:
            node = node_id.decode("ascii")
        except UnicodeDecodeError:
            raise RendezvousStateError(f"rank shard at {name!r} is not valid text") from None
        if node in ranks:
            raise RendezvousStateError(f"rank shard at {name!r} repeats {node!r}")
        ranks[node] = rank
    return round_number, ranks, master[0], master[1]


def plan_world(keys, long long round, long long cutoff, list world, str master_addr="",
               int master_port=0, long long lease=0):
    """The writes that publish ``world`` (node ids in rank order) for a freeze.

    Args:
        keys: the run's ``RunKeys``.
        round, cutoff: the round and the revision its members were read at.
        world: node ids in rank order.
        master_addr, master_port: rank 0's bootstrap address.
        lease: the lease the world's keys are put on (0: none).

    Returns:
        ``(page_txns, freeze_ops)``: transactions ``(compares, puts)`` to run, in
        order, before the freeze (empty for a world of at most ``CAS_SHARDS``
        shards), and the operations the freeze transaction itself carries: the
        header, and the shards when they fit.
    """
    cdef long long shards = world_shards(len(world))
    cdef list entries = [[] for _ in range(shards)]
    cdef Py_ssize_t rank
    for rank, node_id in enumerate(world):
        entries[shard_of(node_id, shards)].append((node_id, rank))
    puts = [("put", keys.rank_shard(round, cutoff, k),
             encode_rank_shard(round, entries[k], master_addr, master_port), lease)
            for k in range(shards)]
    cdef list freeze_ops = [
        ("put", keys.world(round),
         encode_world(round, cutoff, len(world), master_addr, master_port), lease)]
    if shards <= CAS_SHARDS:
        return [], freeze_ops + puts
    page_txns = []
    for first in range(0, shards, PAGE_TXN_SHARDS):
        batch = puts[first:first + PAGE_TXN_SHARDS]
        page_txns.append(([("create", put[1], 0) for put in batch], batch))
    return page_txns, freeze_ops


def world_from(header, shards, keys, long long round):
    """A frozen round's world from its header and its rank shards.

    Args:
        header: the bytes at ``keys.world(round)``.
        shards: ``[(key, value, ...), ...]`` read under ``keys.ranks(round)``
            (shards of other cutoffs, left by freezers that lost, are skipped).
        keys: the run's ``RunKeys``.
        round: the round.

    Returns:
        ``(node ids in rank order, master_addr, master_port)``.

    Raises:
        RendezvousStateError: the header or a shard cannot be decoded, or the
            shards do not give every rank exactly once.
    """
    header_key = keys.world(round)
    got_round, cutoff, size, master_addr, master_port = decode_world(header, header_key)
    prefix = keys.ranks(round, cutoff)
    ids = [None] * size
    seen = 0
    for item in shards:
        key, value = item[0], item[1]
        if not key.startswith(prefix):
            continue
        seen += 1
        shard_round, ranks, _addr, _port = decode_rank_shard(value, key)
        for node_id, rank in ranks.items():
            if rank >= size or ids[rank] is not None or shard_round != round:
                raise RendezvousStateError(
                    f"rank shard at {_key_text(key)!r} does not fit the world record "
                    f"{_key_text(header_key)!r} (round {shard_round}, rank {rank} of {size})")
            ids[rank] = node_id
    if got_round != round or seen != world_shards(size) or None in ids:
        raise RendezvousStateError(
            f"the rank shards under {_key_text(prefix)!r} do not give all {size} ranks "
            f"of the world record {_key_text(header_key)!r} ({seen} shards)")
    return ids, master_addr, master_port


cdef enum:
    _MAX_LABEL = 256
    _SMALL_RUN = 24     # runs the placement sort finishes by comparing whole keys

#: Longest topology label, in UTF-8 bytes.
MAX_TOPOLOGY_BYTES = _MAX_LABEL
#: The values of the ``rank_order`` option; the first is the default.
RANK_ORDERS = ("stable", "topology")

cdef bytes _TOPOLOGY_TAG = b"topo="
cdef bytes _ORDER_FIELD = b"order=topology"
cdef bytes _MEMBER_HEAD = _MEMBER_MAGIC + b" "


def topology_problem(label):
    """What is wrong with a topology label, or None if it is a valid one.

    A label is a path from coarse to fine, ``pod1/rack07/leaf2``: elements
    separated by ``/``, none empty, at most ``MAX_TOPOLOGY_BYTES`` bytes of
    UTF-8 in all, without spaces, commas or control characters.
    """
    if not isinstance(label, str):
        return f"expected a string, got {type(label).__name__}"
    if not label:
        return "it is empty"
    try:
        size = len(label.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid text (unpaired surrogate)"
    if size > MAX_TOPOLOGY_BYTES:
        return f"it is {size} bytes long, more than {MAX_TOPOLOGY_BYTES}"
    for c in label:
        if c.isspace() or c == "," or not c.isprintable():
            return f"it contains {c!r} (no spaces, commas or control characters)"
    if "" in label.split("/"):
        return "it has an empty element (a leading, trailing or doubled '/')"
    return None


def check_topology(label, str source="topology"):
    """Return ``label`` if it is a valid topology label.

    Args:
        label: the label, a path like ``pod1/rack07/leaf2``.
        source: where it came from, for the message (an option or a variable).

    Raises:
        ValueError: the label breaks a rule of ``topology_problem``.
    """
    problem = topology_problem(label)
    if problem is not None:
        raise ValueError(
            f"{source}={label!r} is not a topology label: {problem}. Expected a path "
            f"from coarse to fine such as 'pod1/rack07/leaf2' (elements separated by "
            f"'/', at most {MAX_TOPOLOGY_BYTES} bytes, no spaces, commas or control "
            "characters).")
    return label


def encode_member(str host, str addr, long long pid, int port=0, str topology="",
                  str rank_order="stable"):
    """Serialize a node descriptor (what a member key holds).

    Args:
        host: the node's host name (ranks of one host are adjacent).
        addr: the address it advertises as ``MASTER_ADDR`` if it gets rank 0.
        pid: its process id.
        port: the free port it advertises as ``MASTER_PORT`` if it gets rank 0.
        topology: its topology label (``pod1/rack07``), or "" for none.
        rank_order: ``stable`` or ``topology``, the placement it asks for.

    Raises:
        ValueError: a field is empty or malformed (the message says which).
    """
    for value, what in ((host, "host"), (addr, "address")):
        if not value or any(c.isspace() or c == "," for c in value):
            raise ValueError(
                f"node {what} must be non-empty without spaces or commas, got {value!r}")
    if pid < 0 or not 0 <= port < 65536:
        raise ValueError(f"need pid >= 0 and a port in [0, 65535], got {pid} and {port}")
    if rank_order not in RANK_ORDERS:
        raise ValueError(f"rank_order must be one of {', '.join(RANK_ORDERS)}, "
                         f"got {rank_order!r}")
    cdef bytes data = b"%s %s %s %d %d" % (
        _MEMBER_MAGIC, host.encode(), addr.encode(), pid, port)
    if topology:
        data += b" " + _TOPOLOGY_TAG + check_topology(topology).encode()
    if rank_order == "topology":
        data += b" " + _ORDER_FIELD
    return data


# A descriptor as offsets into its bytes: parsed without creating objects, so
# that 10^5 of them decode in milliseconds.
ctypedef struct _Member:
    Py_ssize_t host
    Py_ssize_t host_len
    Py_ssize_t addr
    Py_ssize_t addr_len
    Py_ssize_t topo
    Py_ssize_t topo_len
    long long pid
    int port
    bint topology_first


cdef bint _ascii(const unsigned char* p, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        if p[i] >= 0x80:
            return False
    return True


cdef bint _utf8(const unsigned char* p, Py_ssize_t n):
    if _ascii(p, n):
        return True
    try:
        (<bytes>p[:n]).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


cdef bint _valid_label(const unsigned char* p, Py_ssize_t n):
    """``topology_problem`` on bytes: fast for ASCII, exact for the rest."""
    cdef Py_ssize_t i
    cdef unsigned char c
    if n == 0 or n > _MAX_LABEL:
        return False
    if not _ascii(p, n):
        try:
            return topology_problem((<bytes>p[:n]).decode("utf-8")) is None
        except UnicodeDecodeError:
            return False
    if p[0] == c'/' or p[n - 1] == c'/':
        return False
    for i in range(n):
        c = p[i]
        if c <= 0x20 or c == 0x7f or c == c',':
            return False
        if c == c'/' and p[i + 1] == c'/':
            return False
    return True


cdef bint _canonical_number(const unsigned char* p, Py_ssize_t n, long long* out) noexcept:
    """A non-negative integer in canonical decimal that fits in 63 bits."""
    cdef Py_ssize_t i
    cdef unsigned long long value = 0
    if n == 0 or n > 19 or (p[0] == c'0' and n > 1):
        return False
    for i in range(n):
        if not c'0' <= p[i] <= c'9':
            return False
        value = value * 10 + (p[i] - c'0')
    if value > 0x7fffffffffffffffULL:
        return False
    out[0] = <long long>value
    return True


cdef bint _parse_member(const unsigned char* p, Py_ssize_t n, _Member* m):
    """Fill ``m`` from a descriptor; False if it is not one (never raises)."""
    cdef Py_ssize_t starts[7]
    cdef Py_ssize_t ends[7]
    cdef Py_ssize_t head = len(_MEMBER_HEAD)
    cdef Py_ssize_t i, fields = 0, start = head
    cdef long long port
    if n <= head or memcmp(p, <const char*>_MEMBER_HEAD, head) != 0:
        return False
    cdef unsigned char seen = 0
    for i in range(start, n + 1):
        if i < n:
            seen |= p[i]
        if i == n or p[i] == c' ':
            if i == start or fields == 6:
                return False  # an empty field, or too many
            starts[fields] = start
            ends[fields] = i
            fields += 1
            start = i + 1
    if fields < 4:
        return False
    m.host, m.host_len = starts[0], ends[0] - starts[0]
    m.addr, m.addr_len = starts[1], ends[1] - starts[1]
    if not _canonical_number(p + starts[2], ends[2] - starts[2], &m.pid):
        return False
    if not _canonical_number(p + starts[3], ends[3] - starts[3], &port) or port > 65535:
        return False
    m.port = <int>port
    m.topo = m.topo_len = 0
    m.topology_first = False
    i = 4
    if i < fields and ends[i] - starts[i] > 5 and memcmp(
            p + starts[i], <const char*>_TOPOLOGY_TAG, 5) == 0:
        m.topo, m.topo_len = starts[i] + 5, ends[i] - starts[i] - 5
        if not _valid_label(p + m.topo, m.topo_len):
            return False
        i += 1
    if i < fields and ends[i] - starts[i] == len(_ORDER_FIELD) and memcmp(
            p + starts[i], <const char*>_ORDER_FIELD, len(_ORDER_FIELD)) == 0:
        m.topology_first = True
        i += 1
    if i != fields:
        return False
    return seen < 0x80 or (_utf8(p + m.host, m.host_len) and _utf8(p + m.addr, m.addr_len))


def decode_member(data):
    """Parse a node descriptor; None if it is not one.

    Returns:
        ``(host, addr, pid, port, topology, rank_order)``; ``topology`` is ""
        for a node without a label, ``rank_order`` is ``stable`` or ``topology``.
    """
    if not isinstance(data, bytes):
        return None
    cdef _Member m
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    if not _parse_member(p, len(data), &m):
        return None
    return (p[m.host:m.host + m.host_len].decode(), p[m.addr:m.addr + m.addr_len].decode(),
            m.pid, m.port, p[m.topo:m.topo + m.topo_len].decode(),
            RANK_ORDERS[1] if m.topology_first else RANK_ORDERS[0])


# ------------------------------------------------------------ rank placement
# Placement compares members by a byte string built once per member, whose
# memcmp order is the placement order, so that sorting 10^5 of them is a C
# sort with no Python comparisons. Parts, in order:
#
#   topology  0x01, then per element 0x01 + text, then 0x00   (labelled)
#             0x02                                           (no label: after)
#   host      0x01 + 16 bytes of address + zone text          (IPv4 or IPv6)
#             0x02 + text                                     (a name)
#   addr      the same, for the advertised address
#   pid       8 bytes, big-endian
#   node id   its bytes (ids are unique: the order is total)
#
# A descriptor that does not decode is 0x03 + node id: after every valid one.
# "text" is in natural order: ASCII letters folded to lower case, each run of
# digits as 0x30 (where a digit sorts), its count of significant digits and
# those digits, so that node2 < node10; it ends with 0x00 (bytes 0x00 in the
# text become 0x01), which makes a name sort before its extensions.
# IPv4 is mapped into IPv6 (::ffff:a.b.c.d): one address space.

cdef extern from "arpa/inet.h" nogil:
    int inet_pton(int af, const char* src, void* dst)

cdef extern from "sys/socket.h" nogil:
    int AF_INET6

ctypedef struct _Entry:
    # A member's key: where it is in the buffer, and 8 of its bytes inline
    # (those the sort is looking at), so that comparisons touch entries only.
    unsigned long long head
    Py_ssize_t offset
    int key_len
    int index       # the member's position in its list

cdef Py_ssize_t _natural(const unsigned char* s, Py_ssize_t n, unsigned char* out) noexcept:
    cdef Py_ssize_t i = 0, o = 0, j, k
    cdef unsigned char c
    while i < n:
        c = s[i]
        if c'0' <= c <= c'9':
            j = i
            while j < n and s[j] == c'0':
                j += 1
            k = j
            while k < n and c'0' <= s[k] <= c'9':
                k += 1
            out[o] = c'0'
            if k == j:  # all zeros: the number 0
                out[o + 1] = 1
                out[o + 2] = c'0'
                o += 3
            else:
                out[o + 1] = <unsigned char>(k - j if k - j < 255 else 255)
                memcpy(out + o + 2, s + j, k - j)
                o += 2 + k - j
            i = k
        else:
            if c'A' <= c <= c'Z':
                c += 32
            elif c == 0:
                c = 1
            out[o] = c
            o += 1
            i += 1
    out[o] = 0
    return o + 1


cdef bint _ipv4(const unsigned char* s, Py_ssize_t n, unsigned char* out) noexcept:
    """A dotted quad (``10.0.0.9``, no leading zeros) into 4 bytes; False if not one."""
    cdef Py_ssize_t i, part = 0, digits = 0
    cdef int value = 0
    for i in range(n + 1):
        if i == n or s[i] == c'.':
            if digits == 0 or part == 4:
                return False
            out[part] = <unsigned char>value
            part += 1
            value = digits = 0
        elif c'0' <= s[i] <= c'9' and digits < 3 and not (digits == 1 and value == 0):
            value = value * 10 + (s[i] - c'0')
            digits += 1
            if value > 255:
                return False
        else:
            return False
    return part == 4


cdef Py_ssize_t _address_key(const unsigned char* s, Py_ssize_t n,
                             unsigned char* out) noexcept:
    """An IPv4 or IPv6 literal (``[...]`` and ``%zone`` allowed), else a name."""
    cdef char text[64]
    cdef unsigned char raw[16]
    cdef Py_ssize_t i, begin = 0, end = n, pct = n
    cdef bint colon = False
    if 0 < n < 64:
        if n >= 2 and s[0] == c'[' and s[n - 1] == c']':
            begin, end = 1, n - 1
        pct = end
        for i in range(begin, end):
            if s[i] == c':':
                colon = True
            elif s[i] == c'%':
                pct = i
                break
        memcpy(text, s + begin, pct - begin)
        text[pct - begin] = 0
        if colon and inet_pton(AF_INET6, text, raw) == 1:
            out[0] = 0x01
            memcpy(out + 1, raw, 16)
            i = pct + 1 if pct < end else end
            return 17 + _natural(s + i, end - i, out + 17)
        if not colon and pct == n and _ipv4(s, n, raw):
            out[0] = 0x01
            memset(out + 1, 0, 10)
            out[11] = 0xff
            out[12] = 0xff
            memcpy(out + 13, raw, 4)
            out[17] = 0
            return 18
    out[0] = 0x02
    return 1 + _natural(s, n, out + 1)


cdef inline unsigned long long _head(const unsigned char* keys, const _Entry* e,
                                    Py_ssize_t depth) noexcept nogil:
    """Bytes ``depth`` to ``depth + 8`` of an entry's key, big-endian, 0 past its end."""
    cdef unsigned long long head = 0
    cdef const unsigned char* key = keys + e.offset
    cdef Py_ssize_t j
    for j in range(depth, depth + 8):
        head = (head << 8) | (key[j] if j < e.key_len else 0)
    return head


cdef void _sort_heads(_Entry* a, _Entry* spare, Py_ssize_t n) noexcept nogil:
    """Stable merge sort by ``head``: insertion-sorted runs of 16, then merges."""
    cdef Py_ssize_t lo = 0, hi, mid, i, j, k, width = 16
    cdef _Entry item
    cdef _Entry* src = a
    cdef _Entry* dst = spare
    cdef _Entry* t
    while lo < n:
        hi = lo + width if lo + width < n else n
        for i in range(lo + 1, hi):
            item = a[i]
            j = i
            while j > lo and item.head < a[j - 1].head:
                a[j] = a[j - 1]
                j -= 1
            a[j] = item
        lo = hi
    while width < n:
        lo = 0
        while lo < n:
            mid = lo + width if lo + width < n else n
            hi = lo + 2 * width if lo + 2 * width < n else n
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if src[j].head < src[i].head:
                    dst[k] = src[j]
                    j += 1
                else:
                    dst[k] = src[i]
                    i += 1
                k += 1
            if i < mid:
                memcpy(&dst[k], &src[i], (mid - i) * sizeof(_Entry))
            elif j < hi:
                memcpy(&dst[k], &src[j], (hi - j) * sizeof(_Entry))
            lo = hi
        t = src
        src = dst
        dst = t
        width *= 2
    if src != a:
        memcpy(a, src, n * sizeof(_Entry))


cdef inline int _compare_keys(const _Entry* x, const _Entry* y, const unsigned char* keys,
                              Py_ssize_t depth) noexcept nogil:
    """memcmp order of two keys that agree before ``depth``; the shorter first on a tie."""
    cdef Py_ssize_t n = (x.key_len if x.key_len < y.key_len else y.key_len) - depth
    cdef int c = memcmp(keys + x.offset + depth, keys + y.offset + depth, n) if n > 0 else 0
    if c != 0:
        return c
    return (x.key_len > y.key_len) - (x.key_len < y.key_len)


cdef void _insertion_sort(_Entry* a, Py_ssize_t n, const unsigned char* keys,
                          Py_ssize_t depth) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef _Entry item
    for i in range(1, n):
        item = a[i]
        j = i
        while j > 0 and _compare_keys(&item, &a[j - 1], keys, depth) < 0:
            a[j] = a[j - 1]
            j -= 1
        a[j] = item


cdef void _sort_entries(_Entry* a, _Entry* spare, Py_ssize_t n, const unsigned char* keys,
                        Py_ssize_t depth) noexcept nogil:
    """Sort entries by their keys' bytes from ``depth`` on (all agree before it).

    Eight bytes at a time, most significant first: sort by those, then each
    run that ties on them by the next eight. Each level reads each key of a
    tied run once, in order, and compares integers only: cheap on keys that
    share long prefixes (a rack's hosts), where memcmp would re-read them.
    """
    cdef Py_ssize_t i, j, k
    cdef bint deeper
    cdef _Entry item
    if n <= _SMALL_RUN:
        # A few keys, read once into the cache: whole-key comparisons are cheaper
        # than more passes.
        _insertion_sort(a, n, keys, depth)
        return
    for i in range(n):
        a[i].head = _head(keys, &a[i], depth)
    _sort_heads(a, spare, n)
    i = 0
    while i < n:
        j = i + 1
        deeper = a[i].key_len > depth + 8
        while j < n and a[j].head == a[i].head:
            deeper = deeper or a[j].key_len > depth + 8
            j += 1
        if j - i > 1:
            if deeper:
                _sort_entries(a + i, spare, j - i, keys, depth + 8)
            else:
                # Equal up to their ends (padding aside): the shorter first.
                for k in range(i + 1, j):
                    item = a[k]
                    while k > i and item.key_len < a[k - 1].key_len:
                        a[k] = a[k - 1]
                        k -= 1
                    a[k] = item
        i = j


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL


@cython.final
cdef class _PlacementKeys:
    """The placement keys of a list of members, in one buffer, and their sort.

    ``ids`` holds the members' node ids (borrowed: the list they came from
    outlives this object) in list order.
    """
    cdef unsigned char* buffer
    cdef Py_ssize_t used
    cdef Py_ssize_t capacity
    cdef _Entry* entries
    cdef PyObject** ids
    cdef Py_ssize_t count
    cdef bint topology_first

    def __cinit__(self, Py_ssize_t members):
        cdef Py_ssize_t slots = members if members > 0 else 1
        self.entries = <_Entry*>malloc(2 * slots * sizeof(_Entry))
        self.ids = <PyObject**>malloc(slots * sizeof(PyObject*))
        self.capacity = 96 * members + 4096
        self.buffer = <unsigned char*>malloc(self.capacity)
        if self.entries is NULL or self.ids is NULL or self.buffer is NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.entries)
        free(self.ids)
        free(self.buffer)

    cdef int add(self, str node_id, descriptor) except -1:
        """Build the key of the next member."""
        cdef Py_ssize_t id_len, n = 0, o = 0, start, i
        cdef const char* id_bytes = PyUnicode_AsUTF8AndSize(node_id, &id_len)
        cdef const unsigned char* p = NULL
        cdef _Member m
        cdef bint valid = False
        cdef unsigned char* out
        cdef unsigned long long pid
        if type(descriptor) is bytes:
            p = <const unsigned char*>PyBytes_AS_STRING(descriptor)
            n = PyBytes_GET_SIZE(descriptor)
            valid = _parse_member(p, n, &m)
        # Text at most triples (each "0" of "0a0a" becomes 3 bytes); markers
        # take at most one byte per byte of label, plus a constant.
        cdef Py_ssize_t bound = 4 * n + id_len + 64
        if self.used + bound > self.capacity:
            self.capacity = 2 * self.capacity + bound
            out = <unsigned char*>realloc(self.buffer, self.capacity)
            if out is NULL:
                raise MemoryError()
            self.buffer = out
        out = self.buffer + self.used
        if valid:
            if m.topo_len:
                out[0] = 0x01
                o = 1
                start = m.topo
                for i in range(m.topo, m.topo + m.topo_len + 1):
                    if i == m.topo + m.topo_len or p[i] == c'/':
                        out[o] = 0x01
                        o += 1 + _natural(p + start, i - start, out + o + 1)
                        start = i + 1
                out[o] = 0x00
                o += 1
            else:
                out[0] = 0x02
                o = 1
            start = o
            o += _address_key(p + m.host, m.host_len, out + o)
            if m.addr_len == m.host_len and memcmp(p + m.addr, p + m.host, m.host_len) == 0:
                # The usual case, local_addr as both: the same key again.
                memcpy(out + o, out + start, o - start)
                o += o - start
            else:
                o += _address_key(p + m.addr, m.addr_len, out + o)
            pid = <unsigned long long>m.pid
            for i in range(8):
                out[o + i] = <unsigned char>(pid >> (56 - 8 * i))
            o += 8
            if m.topology_first:
                self.topology_first = True
        else:
            out[0] = 0x03
            o = 1
        memcpy(out + o, id_bytes, id_len)
        o += id_len
        if o > 0x7fffffff:
            raise ValueError("a member descriptor of more than 2 GB")
        self.entries[self.count].offset = self.used
        self.entries[self.count].key_len = <int>o
        self.entries[self.count].index = <int>self.count
        self.ids[self.count] = <PyObject*>node_id
        self.count += 1
        self.used += o
        return 0

    cdef int note(self, descriptor) except -1:
        """Look at a member that needs no key: only whether it asks for topology order."""
        cdef _Member m
        cdef const unsigned char* p
        cdef Py_ssize_t n, tail = len(_ORDER_FIELD)
        if type(descriptor) is not bytes:
            return 0
        p = <const unsigned char*>PyBytes_AS_STRING(descriptor)
        n = PyBytes_GET_SIZE(descriptor)
        # The order field comes last: only a descriptor ending with it is parsed.
        if n > tail and memcmp(p + n - tail, <const char*>_ORDER_FIELD, tail) == 0 and \
                _parse_member(p, n, &m) and m.topology_first:
            self.topology_first = True
        return 0

    cdef Py_ssize_t _shared_prefix(self, Py_ssize_t count) noexcept:
        """How many leading bytes the keys of the first ``count`` entries share."""
        cdef Py_ssize_t i, j, shared
        cdef const unsigned char* first
        cdef const unsigned char* key
        if count == 0:
            return 0
        first = self.buffer + self.entries[0].offset
        shared = self.entries[0].key_len
        for i in range(1, count):
            key = self.buffer + self.entries[i].offset
            j = 0
            while j < shared and j < self.entries[i].key_len and key[j] == first[j]:
                j += 1
            shared = j
        return shared

    cdef int sort(self, Py_ssize_t count) except -1:
        """Sort the first ``count`` entries by key."""
        if count > 1:
            _sort_entries(self.entries, self.entries + self.count, count, self.buffer,
                          self._shared_prefix(count))
        return 0

    cdef list sorted_ids(self, Py_ssize_t count):
        """The node ids of the first ``count`` entries, in entry order."""
        cdef list result = [None] * count
        cdef Py_ssize_t i
        for i in range(count):
            result[i] = <object>self.ids[self.entries[i].index]
        return result


cdef _PlacementKeys _placement_keys(list members):
    cdef _PlacementKeys keys = _PlacementKeys(len(members))
    cdef Py_ssize_t i
    for item in members:
        if type(item) is tuple and PyTuple_GET_SIZE(item) == 2:
            keys.add(<object>PyTuple_GET_ITEM(item, 0), <object>PyTuple_GET_ITEM(item, 1))
        else:
            node_id, descriptor = item
            keys.add(node_id, descriptor)
    return keys


# The previous world's ranks by node id: open addressing on the ids' own
# (cached) hashes, borrowed from the caller's list for the call.
ctypedef struct _Slot:
    PyObject* node_id
    unsigned int tag    # the low bits of the id's hash
    int rank

cdef extern from *:
    void __builtin_prefetch(const void* address) nogil


@cython.final
cdef class _RankTable:
    cdef _Slot* slots
    cdef Py_ssize_t mask

    def __cinit__(self, list previous):
        cdef Py_ssize_t size = 8, rank = 0, i
        cdef Py_hash_t h
        while size < 2 * len(previous):
            size *= 2
        self.mask = size - 1
        self.slots = <_Slot*>calloc(size, sizeof(_Slot))
        if self.slots is NULL:
            raise MemoryError()
        for node_id in previous:
            if type(node_id) is not str:
                raise TypeError(f"previous world holds {node_id!r}, not a node id")
            h = hash(node_id)
            i = h & self.mask
            while self.slots[i].node_id is not NULL:
                i = (i + 1) & self.mask
            self.slots[i].node_id = <PyObject*>node_id
            self.slots[i].tag = <unsigned int>h
            self.slots[i].rank = <int>rank
            rank += 1

    def __dealloc__(self):
        free(self.slots)

    cdef inline void prefetch(self, Py_hash_t h) noexcept:
        """Start loading the slot where ``h``'s search begins (looked up later)."""
        __builtin_prefetch(&self.slots[h & self.mask])

    cdef Py_ssize_t rank(self, str node_id, Py_hash_t h) except -2:
        """``node_id``'s rank in the previous world, or -1; ``h`` is its hash."""
        cdef Py_ssize_t i = h & self.mask
        while self.slots[i].node_id is not NULL:
            if self.slots[i].tag == <unsigned int>h and (
                    self.slots[i].node_id == <PyObject*>node_id
                    or <str>self.slots[i].node_id == node_id):
                return self.slots[i].rank
            i = (i + 1) & self.mask
        return -1


def placement_order(members):
    """Node ids in placement order: topology groups, hosts in natural order.

    Args:
        members: ``[(node_id, descriptor_bytes), ...]``, in any order.

    Returns:
        The node ids sorted as a fresh world would be ranked with
        ``rank_order=topology``: by topology label (element by element, in
        natural order; nodes without a label after those with one), then host
        (IP literals by address value before names in natural order), address,
        pid and node id. Descriptors that do not decode come last.
    """
    cdef list listed = list(members)
    cdef _PlacementKeys keys = _placement_keys(listed)
    keys.sort(keys.count)
    return keys.sorted_ids(keys.count)


# -------------------------------------------------------------- clean-up
cdef list _retired_rounds(keys, int event, StateRecord s):
    """Range deletes of the rounds that ``event`` on ``s`` leaves no one needing.

    Opening round r+1 after round r completed: every round below r. Restarting
    frozen round r: the rounds after the last completed one and before r (all
    restarted; their members rejoined and took their own keys with them). The
    last completed round stays, as do r and r+1.
    """
    if s is None:
        return []
    cdef long long first = -1
    if event == OPEN and s.status == FINAL:
        first = 0
    elif event == RESTART:
        first = s.last_final + 1
    if first < 0 or first >= s.round:
        return []
    start, end = keys.rounds_between(first, s.round)
    return [("delete", start, end)]


# ------------------------------------------------------------ rank assignment
def assign_ranks(members, previous, int max_nodes):
    """Choose the world and give each member a rank.

    Args:
        members: ``[(node_id, descriptor_bytes), ...]`` in join order.
        previous: node ids in rank order of the last completed round (or empty).
        max_nodes: at most this many of the earliest joiners form the world.

    Returns:
        The node ids of the world in rank order. By default (``stable``) a
        member of the previous round keeps its rank where it still exists, and
        the free ranks go, in ascending order, to the other members in
        placement order (see ``placement_order``). If any member's descriptor
        asks for ``rank_order=topology``, the whole world is in placement
        order: every topology group gets contiguous ranks, and survivors may
        move.
    """
    cdef list world = members[:max_nodes] if type(members) is list else list(members)[:max_nodes]
    cdef Py_ssize_t size = len(world)
    cdef _RankTable old = _RankTable(previous if type(previous) is list else list(previous))
    cdef _PlacementKeys keys = _PlacementKeys(size)
    cdef list ranks = [None] * size
    cdef Py_ssize_t i, rank
    cdef Py_hash_t* hashes = <Py_hash_t*>malloc((size if size > 0 else 1) * sizeof(Py_hash_t))
    if hashes is NULL:
        raise MemoryError()
    try:
        # Hashes first, each slot's load started: the lookups then mostly hit
        # the cache instead of waiting on memory one by one.
        for i in range(size):
            item = world[i]
            node_id = <object>PyTuple_GET_ITEM(item, 0) if type(item) is tuple and \
                PyTuple_GET_SIZE(item) == 2 else item[0]
            hashes[i] = hash(node_id)
            old.prefetch(hashes[i])
        for i in range(size):
            item = world[i]
            if type(item) is tuple and PyTuple_GET_SIZE(item) == 2:
                node_id = <object>PyTuple_GET_ITEM(item, 0)
                descriptor = <object>PyTuple_GET_ITEM(item, 1)
            else:
                node_id, descriptor = item
            rank = old.rank(node_id, hashes[i])
            if 0 <= rank < size:
                ranks[rank] = node_id
                keys.note(descriptor)
            else:
                keys.add(node_id, descriptor)
    finally:
        free(hashes)
    if keys.topology_first:
        keys = _placement_keys(world)
        keys.sort(size)
        return keys.sorted_ids(size)
    keys.sort(keys.count)
    i = 0
    for rank in range(size):
        if ranks[rank] is None:
            ranks[rank] = <object>keys.ids[keys.entries[i].index]
            i += 1
    return ranks


# ------------------------------------------------------------------- backoff
cdef class Backoff:
    """Jittered exponential backoff that starts in microseconds.

    Args:
        initial: first delay in seconds.
        cap: largest delay in seconds.
        rng: the ``random.Random`` the jitter is drawn from (a simulation
            passes a seeded one); None: a generator of its own, seeded by the OS.
    """

    def __init__(self, double initial=50e-6, double cap=0.05, rng=None):
        self.initial = initial
        self.cap = cap
        self.current = initial
        self.rng = random.Random() if rng is None else rng

    def next_delay(self):
        """Return the next delay (full jitter) and grow the ceiling."""
        cdef double delay = self.rng.uniform(0.0, self.current)
        self.current = min(self.current * 2.0, self.cap)
        return delay

    def reset(self):
        """Forget earlier conflicts."""
        self.current = self.initial


logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- actions
cdef class WatchSpec:
    """A watch the node machine wants its driver to hold (see ``Node.watches``).

    The driver starts one for each spec it does not hold, cancels those it
    holds that are no longer wanted (specs compare equal field by field), tells
    the node ``watch_started(tag)``, feeds what they deliver (``observe_*``) and
    hands a broken one back with ``watch_failed``.

    Args:
        tag: ``"state"`` (the state record; feed ``observe_state``),
            ``"round"`` (the freezer's round; ``observe_round_events``),
            ``"waiting"`` (a late node's world; ``observe_member_deleted``) or
            ``"counter"`` (the counter key of a joiner's round;
            ``observe_counter_deleted``).
        key: the key, or the prefix if ``prefix``.
        prefix: watch every key under ``key``.
        start: the first revision to deliver; 0: from when it starts.
        no_put: deliver deletions only.
    """

    def __cinit__(self, str tag, bytes key, bint prefix, long long start, bint no_put):
        self.tag = tag
        self.key = key
        self.prefix = prefix
        self.start = start
        self.no_put = no_put

    def __eq__(self, other):
        if not isinstance(other, WatchSpec):
            return NotImplemented
        cdef WatchSpec o = other
        return (self.tag == o.tag and self.key == o.key and self.prefix == o.prefix
                and self.start == o.start and self.no_put == o.no_put)

    def __hash__(self):
        return hash((self.tag, self.key, self.prefix, self.start, self.no_put))

    def __repr__(self):
        return (f"WatchSpec({self.tag!r}, {self.key!r}, prefix={self.prefix}, "
                f"start={self.start}, no_put={self.no_put})")


cdef inline double _next_tick(double now, double interval):
    """The first multiple of ``interval`` after ``now``: when a node checks its
    watches next. The nodes of a process share one clock, so their checks come
    due together and their driver makes each read once for all of them
    (``rdzv.driver``)."""
    return (c_floor(now / interval) + 1.0) * interval


cdef class Action:
    """What the node machine asks its driver to do next.

    ``step`` (a ``Step``) says what; the fields that step uses are set:

    * ``STEP_TXN``: run the transaction ``compares``/``success``/``failure``
      (the tuples of ``rdzv.client.EtcdClient.txn``), retried by the client
      unless ``once`` (one attempt), and ``feed`` its
      ``(succeeded, revision, results)``; ``join`` marks a node's join of a
      round, which may go out with other nodes' joins (``merge_joins``);
    * ``STEP_GET``: read ``key`` and ``feed`` its
      ``(value, mod_revision, create_revision)``, or None if it is absent;
    * ``STEP_WAIT``: wait until a watch delivers an event (``observe_*``) or
      the driver's clock reaches ``wake_at``, then ask again;
    * ``STEP_DONE``: the task is over; ``result`` is what it returns.

    A request that fails is handed back with ``fail(error)`` instead.
    """

    def __cinit__(self, int step, list compares=None, list success=None,
                  list failure=None, bint once=False, bytes key=None,
                  double wake_at=INFINITY, result=None, bint join=False):
        self.step = step
        self.compares = compares
        self.success = success
        self.failure = failure
        self.once = once
        self.join = join
        self.key = key
        self.wake_at = wake_at
        self.result = result

    def __repr__(self):
        if self.step == STEP_TXN:
            return (f"Action(STEP_TXN, compares={self.compares!r}, success={self.success!r}, "
                    f"failure={self.failure!r}, once={self.once}, join={self.join})")
        if self.step == STEP_GET:
            return f"Action(STEP_GET, key={self.key!r})"
        if self.step == STEP_WAIT:
            return f"Action(STEP_WAIT, wake_at={self.wake_at!r})"
        return f"Action(STEP_DONE, result={self.result!r})"


cdef inline Action _txn(list compares, list success, list failure):
    return Action(STEP_TXN, compares, success, failure)


cdef inline Action _get(bytes key):
    return Action(STEP_GET, key=key)


def merge_joins(list actions, int max_ops):
    """Group the joins of several nodes (``Action.join``) into as few
    transactions as possible.

    A join puts the node's member key, deletes the node's keys of older
    rounds, and takes the round's counter key if nobody has, all while the
    round has no world record; else it reads the state record and its own
    member key. The joins of one round in a group run as one transaction that
    puts and deletes all their keys and takes the counter key for the first
    of them, after the others' member keys are in (its count includes them).
    Each node gets the answer its own join would have had right after the
    first's: the first holds the counter key (``split_joins``).

    Args:
        actions: join actions.
        max_ops: etcd's ``--max-txn-ops`` (128 by default): each merged
            transaction passes it as ``rdzv.txn.txn_ops`` counts.

    Returns:
        ``[(action, indices), ...]``: per transaction to send, its action
        (the join itself when alone) and the indices in ``actions`` of the
        joins it carries, in order.
    """
    cdef Action action, first
    cdef Py_ssize_t index, size
    groups = []
    open_groups = {}
    for index, action in enumerate(actions):
        if not action.join:
            raise ValueError(f"not a join: {action!r}")
        world = action.compares[0][1]
        size = len(action.success) - 1
        group = open_groups.get(world)
        # [world, operations of the success branch but the counter's,
        #  indices, what the first's counter transaction needs]: the failure
        # branch is one get per join and one more; the counter's transaction
        # goes inside the merged one, and etcd gives it only what the merged
        # one's longest list leaves of max_ops.
        if group is not None and \
                max(group[1] + size + 1, len(group[2]) + 2) + group[3] > max_ops:
            group = None
        if group is None:
            _, compares, success, failure = action.success[1]
            group = [world, 0, [], txn_ops(compares, success, failure)]
            open_groups[world] = group
            groups.append(group)
        group[1] += size
        group[2].append(index)
    merged = []
    for _world, _size, indices, _inner in groups:
        if len(indices) == 1:
            merged.append((actions[indices[0]], indices))
            continue
        first = actions[indices[0]]
        success = [(<Action>actions[i]).success[0] for i in indices]
        for i in indices:
            success.extend((<Action>actions[i]).success[2:])
        success.append(first.success[1])
        failure = [first.failure[0]] + [(<Action>actions[i]).failure[1] for i in indices]
        merged.append((Action(STEP_TXN, first.compares, success, failure), indices))
    return merged


def split_joins(list actions, answer):
    """Each join's share of the answer to the transaction ``merge_joins``
    made of ``actions`` (one of its groups, in order): what ``feed`` takes."""
    cdef Action action
    cdef Action first = actions[0]
    cdef Py_ssize_t at = len(actions), deletes
    ok, revision, results = answer
    if not ok:
        return [(False, revision, [results[0], results[1 + i]]) for i in range(len(actions))]
    took, counted = results[len(results) - 1]
    # The others see the counter key as it stood after the first took it
    # (``(value, mod_revision, create_revision)``), or as it stood already.
    holder = (first.success[1][2][0][2], revision, revision) if took else counted[0]
    shares = []
    for index, action in enumerate(actions):
        deletes = len(action.success) - 2
        nested = (took, counted) if index == 0 else (False, [holder])
        shares.append((True, revision, [None, nested] + list(results[at:at + deletes])))
        at += deletes
    return shares


# What a step of the node machine returns besides STEP_WAIT and STEP_DONE: decide
# again, on what its requests brought.
cdef int _AGAIN = -1


# ----------------------------------------------------------------- node machine
cdef class Node:
    """One node's side of the rendezvous, as a sans-I/O state machine.

    Args:
        node_id: unique id (from the lease id in hex); key names use it.
        keys: the run's ``RunKeys``.
        min_nodes, max_nodes: bounds this node asks for (the state record's
            win once a round exists).
        lease: the lease every key this node writes is attached to.
        descriptor: ``encode_member(host, addr, pid, port, topology, rank_order)``
            of this node.
        last_call_timeout: seconds between the min-th join and the freeze.
        liveness_interval: how long a confirmed member waits for ``final``
            before it checks the world's liveness itself.
        rng: the ``random.Random`` its backoff draws from (the handler's is
            seeded by the OS, a simulation's by its seed); None: its own.
    """

    def __init__(self, str node_id, keys, int min_nodes, int max_nodes, long long lease,
                 bytes descriptor, double last_call_timeout, double liveness_interval,
                 rng=None):
        if not 1 <= min_nodes <= max_nodes:
            raise ValueError(
                f"need 1 <= min_nodes <= max_nodes, got {min_nodes} and {max_nodes}")
        self.node_id = node_id
        self.keys = keys
        self.run_prefix = keys.run
        self.min_nodes = min_nodes
        self.max_nodes = max_nodes
        self.lease = lease
        self.data_lease = 0
        self.state_lease = 0
        self.descriptor = descriptor
        self.last_call_timeout = last_call_timeout
        self.liveness_interval = liveness_interval
        self.state = None
        self.state_mod = -1
        self.completed_round = -1
        self.completed = None
        self.completed_mod = 0
        self.confirmed_state = None
        self.confirmed_mod = 0
        self.stale_keys = []
        self.backoff = Backoff(rng=rng)
        self.wall_offset = 0.0
        self.state_watch_start = 0
        self.round_snapshot_due = False
        self.freezer = False
        self.freeze_round = -1
        self.confirmed = set()
        self.world_ids = set()
        self.world = []
        self.master = ("", 0)
        self.begin()

    def use_run_leases(self, long long data_lease, long long state_lease):
        """Attach the keys that outlive a round to the run's leases.

        Args:
            data_lease: for the rounds' world and store keys, and for the state
                record once the run is closed.
            state_lease: for the state record of an open run.
        """
        self.data_lease = data_lease
        self.state_lease = state_lease

    # ------------------------------------------------------------ observing
    @property
    def next_wake(self):
        """The earliest time at which the node has something to do unprompted."""
        return min(self.wake_at, self.open_at, self.retry_at, self.check_at,
                   self.poll_at if self._counting() or self.freezer else INFINITY,
                   self.counter_watch_at
                   if self.phase == JOINED and self.now < self.counter_watch_at else INFINITY)

    cdef bint _counting(self):
        """Whether this node counts the members of the open round it joined."""
        cdef StateRecord s = self.state
        return (self.counter and self.phase == JOINED and s is not None
                and s.status == JOINABLE and s.round == self.joined_round)

    @property
    def watches(self):
        """The watches the driver should hold now: a list of ``WatchSpec``.

        The state record's, from right after the read that it follows; the
        freezer's of its round's deletions (deaths), from when it starts
        (what happened before is read once it has: see ``watch_started``); a
        late node's of the deletions among the members it waits on, from its
        registration; a joiner's of the deletion of its round's counter key,
        from its join, once it has waited ``_COUNTER_WATCH_AFTER`` seconds (in
        a large round, only about ``_COUNTER_WATCHERS`` of its joiners do).
        """
        specs = []
        if self.state_watch_start > 0:
            specs.append(WatchSpec("state", self.keys.state, False, self.state_watch_start, False))
        if self.freezer:
            specs.append(WatchSpec("round", self.keys.round(self.freeze_round), True, 0, True))
        if self.phase == WAITING:
            specs.append(WatchSpec("waiting", self.keys.members(self.waiting_round), True,
                                   self.watch_revision + 1, True))
        if (self.phase == JOINED and not self.counter and self.now >= self.counter_watch_at
                and (self.state is None or self.state.status != FROZEN)):
            specs.append(WatchSpec("counter", self.keys.counter(self.joined_round), False,
                                   self.join_revision + 1, True))
        return specs

    def watch_started(self, str tag):
        """A watch of ``watches`` started (a started round watch is read up to now next)."""
        if tag == "round" and self.freezer:
            self.round_snapshot_due = True

    def watch_failed(self, str tag, error, bint compacted):
        """A watch of ``watches`` broke or was refused; the driver dropped it.

        A state watch is replaced after the record is read again. A watch whose
        start revision etcd compacted away (a stream broke after a long quiet
        spell) goes on from now: the freezer's reads its round again when it
        starts, a late node's counts its world once for what it missed.

        Raises:
            error: unless ``compacted``: the driver cannot keep the watch up.
        """
        if tag == "state":
            self.forget_state_watch()
        elif tag == "waiting" and compacted:
            self.watch_revision = -1
            self.check_liveness = True
        if not compacted:
            raise error

    def begin(self, descriptor=None, double wall_offset=0.0):
        """Start a new ``next_rendezvous()`` call, driven by ``next_action``.

        Its ``STEP_DONE`` action's ``result`` is the completed round's final
        record; ``rank``, ``world`` and ``master`` hold this node's share.

        Args:
            descriptor: this node's descriptor for the rounds of this call
                (``encode_member``; it carries the port the node would serve as
                rank 0, so a fresh one each call); None keeps the last one.
            wall_offset: wall-clock time minus the driver's clock (``now``), for
                the one time the node publishes: when a last call ends.
        """
        if descriptor is not None:
            self.descriptor = descriptor
        self.wall_offset = wall_offset
        self._move(BEGIN)
        self.joined_round = -1
        self.join_revision = 0
        self.rank = -1
        self.waiting_round = -1
        self.wake_at = INFINITY
        self.open_at = INFINITY
        self.retry_at = INFINITY
        self.check_at = INFINITY
        self.freeze_pending = False
        self.counter = False
        self.poll_at = INFINITY
        self.counter_watch_at = INFINITY
        self.counter_gone = False
        self.check_liveness = False
        self.watch_revision = 0
        self._start(self._rendezvous())

    cdef int _move(self, int move) except -1:
        """Change phase by ``move``, as the table allows (TransitionError if not)."""
        cdef int target = _PHASES[<int>self.phase][move]
        if target < 0:
            raise TransitionError(
                f"node {self.node_id}: cannot {_MOVE_NAMES[move]} when it is "
                f"{_PHASE_NAMES[<int>self.phase]}")
        self.phase = <Phase>target
        return 0

    cdef int _start(self, task) except -1:
        self.task = task
        self.reply = None
        self.error = None
        self.awaiting = False
        return 0

    def observe_state(self, value, long long mod_revision):
        """Feed the state record as read or watched (None: the key is absent).

        Older revisions than the one already seen are ignored.
        """
        if mod_revision < self.state_mod and value is not None:
            return
        if value is None:
            self.state = None
            self.state_mod = 0
        elif mod_revision != self.state_mod or self.state is None:
            # (else it is the record already held, as its own write's echo: one
            # revision of a key has one value)
            self.state = decode_state(value, self.keys.state)
            self.state_mod = mod_revision
        if self.freezer and (self.state is None or self.state.round != self.freeze_round
                             or self.state.status != FROZEN):
            self._stop_freezing()

    def observe_state_read(self, long long revision, got):
        """Feed a read of the state record, made at ``revision``, that its watch follows.

        Args:
            revision: the revision of the read.
            got: ``(value, mod_revision, ...)``, or None if the key is absent.

        Raises:
            RendezvousStateError: the record cannot be decoded (the watch is
                wanted from there all the same).
        """
        self.state_watch_start = revision + 1
        self.observe_state(None if got is None else got[0], 0 if got is None else got[1])

    def observe_round_events(self, events):
        """Feed the freezer's watch of its round's deletions:
        ``[(is_put, key, value, rev)]`` (puts are ignored: it counts the
        confirmations by polling)."""
        if not self.freezer:
            return
        world = self.world_ids
        for prefix in (self.keys.confirmed(self.freeze_round),
                       self.keys.members(self.freeze_round)):
            for is_put, key, _value, _rev in events:
                if not is_put and key.startswith(prefix) and key[len(prefix):].decode() in world:
                    self.world_member_lost = True

    def observe_round_snapshot(self, long long round, confirmed_ids, member_ids):
        """Feed the freezer what its round holds, read after its watch started.

        ``confirmed_ids`` and ``member_ids`` are the node ids under the round's
        ``confirmed/`` and ``members/`` prefixes. The watch then carries every
        later change; this read covers those between the freeze and the watch.
        """
        if not self.freezer or round != self.freeze_round:
            return
        world = self.world_ids
        self.confirmed.update(world.intersection(confirmed_ids))
        if not world.issubset(member_ids):
            self.world_member_lost = True

    def observe_member_deleted(self):
        """A member key of the round this late node waits on was deleted."""
        self.check_liveness = True

    def observe_counter_deleted(self):
        """The counter key of the round this node joined was deleted."""
        self.counter_gone = True

    def forget_state(self):
        """Drop the cached state record so that the next step re-reads it."""
        self.state = None
        self.state_mod = -1

    def forget_state_watch(self):
        """Drop the cached state record and the state watch (``watches`` holds
        none until then): the next step re-reads the record, and the watch
        starts again from that read."""
        self.state_watch_start = 0
        self.forget_state()

    cdef int _stop_freezing(self) except -1:
        self.freezer = False
        self.freeze_round = -1
        self.world_ids = set()
        self.confirmed = set()
        self.world_member_lost = False
        return 0

    # ------------------------------------------------------------- stepping
    def next_action(self, double now):
        """Return what to do next, as an ``Action``, at the driver's clock ``now``.

        Call ``begin`` (a rendezvous) or ``begin_close`` (closing the run)
        first. After a ``STEP_TXN`` or ``STEP_GET`` action, hand its answer to
        ``feed`` (or its error to ``fail``) before asking again. Events that
        watches deliver (``observe_*``) are fed only while the last action was
        ``STEP_WAIT``: a request's decision is made on the state it was built on.

        Raises:
            RendezvousClosedError: the run is closed.
            RendezvousStateError: a record in etcd cannot be decoded.
            RendezvousError: the error given to ``fail``, when the node cannot
                go on without the answer it stands for.
            RuntimeError: no task was begun, or the last request is unanswered.
        """
        if self.task is None:
            raise RuntimeError("the node has no task: call begin() or begin_close() first")
        if self.awaiting:
            raise RuntimeError("the last request is unanswered: feed() or fail() it first")
        self.now = now
        reply, error = self.reply, self.error
        self.reply = None
        self.error = None
        cdef Action action
        try:
            action = self.task.throw(error) if error is not None else self.task.send(reply)
        except BaseException:
            self.task = None
            raise
        if action.step == STEP_TXN or action.step == STEP_GET:
            self.awaiting = True
        elif action.step == STEP_DONE:
            self.task = None
        return action

    def feed(self, result):
        """Hand over the answer to the last ``STEP_TXN`` or ``STEP_GET`` action.

        Args:
            result: ``(succeeded, revision, results)`` for a transaction, the
                ``(value, mod_revision, create_revision)`` of the key or None
                for a read.
        """
        if not self.awaiting:
            raise RuntimeError("feed() without a request: the last action asked for none")
        self.awaiting = False
        self.reply = result

    def fail(self, error):
        """Hand over the error that the last request ended with, instead of an answer.

        The node decides what it means at the next ``next_action``.
        """
        if not self.awaiting:
            raise RuntimeError("fail() without a request: the last action asked for none")
        self.awaiting = False
        self.error = error

    def _rendezvous(self):
        """One ``next_rendezvous()`` call: a generator of actions (see ``next_action``)."""
        cdef int attempts = 0
        cdef long long r
        # The first check falls half to one and a half intervals after the
        # call begins, never moments after it: a watch that is still resuming
        # (etcd restarted, history compacted) gets the time to catch up.
        self.check_at = _next_tick(self.now + 0.5 * self.liveness_interval,
                                   self.liveness_interval)
        while True:
            if self.retry_at != INFINITY:
                if self.now < self.retry_at:
                    # A compare-and-swap lost to an identical record: back off.
                    attempts = 0
                    yield Action(STEP_WAIT, wake_at=self.next_wake)
                    continue
                self.retry_at = INFINITY
            attempts += 1
            if attempts > _MAX_CAS_ATTEMPTS:
                raise RendezvousStateError(
                    f"gave up after {_MAX_CAS_ATTEMPTS} lost compare-and-swaps on "
                    f"{self.keys.state.decode()!r}")
            if self.now >= self.check_at:
                self.check_at = _next_tick(self.now, self.liveness_interval)
                if self.phase == WAITING:
                    # Its watch of the world's departures may have stalled like
                    # the state record's: count the world once.
                    self.check_liveness = True
                yield from self._check_state_watch()
                if (self.phase == JOINED and not self.counter and self.state is not None
                        and self.state.status == JOINABLE
                        and self.state.round == self.joined_round):
                    yield from self._check_counter()
            if self.round_snapshot_due:
                # The freezer's round watch started: what the members did since
                # the freeze, read once (with the watch's events, in either
                # order, it adds up to the same).
                self.round_snapshot_due = False
                r = self.freeze_round
                confirmed, members = self.keys.confirmed(r), self.keys.members(r)
                _ok, _revision, (got_confirmed, got_members) = yield _txn(
                    [], [("range", confirmed, 0, True), ("range", members, 0, True)], [])
                self.observe_round_snapshot(
                    r, [key[len(confirmed):].decode() for key, _, _ in got_confirmed],
                    [key[len(members):].decode() for key, _, _ in got_members])
                continue
            if self.state_mod < 0:
                _ok, revision, (got,) = yield _txn([], [("get", self.keys.state)], [])
                if self.state_watch_start == 0:
                    self.observe_state_read(revision, got)
                else:
                    self.observe_state(None if got is None else got[0],
                                       0 if got is None else got[1])
                continue
            outcome = yield from self._step(self.now)
            if outcome == STEP_DONE:
                yield Action(STEP_DONE, result=self.completed)
                return
            if outcome == STEP_WAIT:
                attempts = 0
                yield Action(STEP_WAIT, wake_at=self.next_wake)

    def _check_state_watch(self):
        """Re-read the state record; if its watch missed a change, watch it again.

        Done every ``liveness_interval`` while a call waits (the first time
        half to one and a half intervals after the call began), so that a watch
        stream that stalled without breaking costs a round about that long,
        not the call's whole timeout.
        """
        cdef long long seen = self.state_mod
        if seen < 0 or self.state_watch_start == 0:
            return
        _ok, revision, (got,) = yield _txn([], [("get", self.keys.state)], [])
        if (got[1] if got is not None else 0) <= seen:
            return
        # The change may be on its way from the watch: let the driver feed
        # what has arrived, then look again.
        yield Action(STEP_WAIT, wake_at=self.now)
        if got[1] <= self.state_mod:
            return
        logger.warning(
            "run %r: the state record changed at revision %d but its watch delivered "
            "nothing after revision %d; watching it again", self.keys.run_id, got[1], seen)
        self.observe_state_read(revision, got)

    def _step(self, double now):
        """Do what the last observed state calls for, up to a wait: a generator
        of requests that returns ``STEP_WAIT``, ``STEP_DONE``, or ``_AGAIN``
        (decide again on what the requests brought)."""
        cdef StateRecord s
        s = self.state
        if s is not None and s.round >= self.joined_round:
            # The opening timer lives only while the round this node joined
            # early is not open; however the node learns that it opened (a
            # freeze, a confirmation, a re-read), the timer is done.
            self.open_at = INFINITY
        if s is not None and s.status == CLOSED:
            raise RendezvousClosedError(
                f"the rendezvous of run {self.keys.run_id!r} is closed")
        if self.freezer and s is not None:
            if (yield from self._freezer_duties(s, now)) is not None:
                return _AGAIN
        if (s is not None and self.phase == CONFIRMED and s.round > self.joined_round
                and s.last_final == self.joined_round):
            # The round this node confirmed in completed, and the next one
            # opened before this node saw it final (a fast member asked for
            # the next round at once): the record's last_final says so.
            c = self.confirmed_state
            self._done(StateRecord(c.round, FINAL, c.min_nodes, c.max_nodes, c.cutoff,
                                   c.world_size, c.last_final), self.confirmed_mod)
            return STEP_DONE
        if s is None or s.status == FINAL:
            if s is not None and self.phase == CONFIRMED and self.joined_round == s.round:
                self._done(s, self.state_mod)
                return STEP_DONE
            if s is None or self.completed_round == s.round:
                # A new run, or a member of the last round asking for the next.
                if (yield from self._prejoin(s, now)):
                    return _AGAIN
                return STEP_WAIT
            if (yield from self._wait_for_next(s, now)):
                return _AGAIN
            return STEP_WAIT
        if s.status == JOINABLE:
            if self.phase == JOINED and self.joined_round == s.round:
                self.open_at = INFINITY
                if self.counter_gone and not self.counter:
                    self.counter_gone = False
                    yield from self._check_counter()
                if self._counting() and now >= self.poll_at:
                    yield from self._count_members(s, now)
                if self.freeze_pending or now >= self.wake_at:
                    self.freeze_pending = False
                    self.wake_at = INFINITY
                    if (yield from self._freeze(s, now)):
                        return _AGAIN
                return STEP_WAIT
            yield from self._join(s, now)
            return _AGAIN
        if s.status == FROZEN:
            if self.phase == JOINED and self.joined_round == s.round:
                yield from self._confirm_or_leave(s, now)
                return _AGAIN
            if self.phase == CONFIRMED and self.joined_round == s.round:
                if now >= self.wake_at or self.check_liveness:
                    yield from self._check_world(s, now)
                    if self.state is not s:
                        return _AGAIN
                return STEP_WAIT
            if (yield from self._wait_for_next(s, now)):
                return _AGAIN
            return STEP_WAIT
        raise RendezvousStateError(f"unexpected status {s.status}")

    def _done(self, StateRecord final, long long mod_revision):
        """Record that this node's round is complete; ``final`` is its final record."""
        self._move(COMPLETE)
        self.completed_round = final.round
        self.completed = final
        self.completed_mod = mod_revision
        self.wake_at = INFINITY

    # ----------------------------------------------------------- operations
    def _cas(self, int event, StateRecord s, dict changes=None, list extra=None):
        """Apply one run transition with a CAS (a generator of its one request).

        Returns 0 if it was lost, 1 if this node's transaction committed, 2 if
        the record already holds exactly what this node meant to write: that is
        its own earlier attempt whose answer was lost, or another node's same
        transition from the same read. Either way the run is where this node
        wanted it, but with 2 the ``extra`` writes may not be this node's.

        On a lost CAS the newer record (returned by the same transaction) is
        observed, so the caller's next decision is made on fresh state.
        """
        cdef int won = 1
        if changes is None:
            changes = {}
        if s is None or event == OPEN:
            changes.setdefault("min_nodes", self.min_nodes)
            changes.setdefault("max_nodes", self.max_nodes)
        cdef StateRecord new = _apply(s, event, changes)
        # A closed run's record goes with its data, an open run's outlasts it.
        success = [("put", self.keys.state, new.encode(),
                    self.data_lease if event == CLOSE else self.state_lease)]
        success.extend(_retired_rounds(self.keys, event, s))
        if extra:
            success.extend(extra)
        ok, revision, results = yield _txn(
            [("mod", self.keys.state, self.state_mod)],
            success,
            [("get", self.keys.state)],
        )
        got = None if ok else results[0]
        if got is not None and got[0] == success[0][2]:
            # Identical bytes come from the same transition on the same read: our
            # own earlier attempt (the client retries after a timeout) or a node
            # that raced us to the same decision. The state is what we wanted.
            ok = True
            won = 2
            revision = got[1]
        if ok:
            self.state = new
            self.state_mod = revision
            self.backoff.reset()
            if self.freezer and (new.status != FROZEN or new.round != self.freeze_round):
                self._stop_freezing()
            return won
        same = got is not None and s is not None and got[0] == s.encode()
        if got is None:
            self.observe_state(None, 0)
        else:
            self.observe_state(got[0], got[1])
        if same:
            self.retry_at = self.now + self.backoff.next_delay()
        return 0

    def _join_txn(self, long long round):
        """Put this node's member key of ``round``; the first joiner also takes
        the round's counter key and counts the members.

        The transaction succeeds while ``round`` has no world record, that is
        until it is frozen; it does not depend on the state record, so joins
        never conflict with each other nor with the round being opened. It
        counts nothing for the other joiners: etcd counts a range by walking
        it, and a count in every join would cost the round O(N^2).

        Returns ``(revision, count)``: ``count`` > 0 if this node holds the
        counter key (the members it counted; 1 if an earlier attempt took the
        key and only its answer was lost), 0 if another node does, -1 if the
        round was frozen but this node's member key is there with this call's
        descriptor (an earlier attempt committed and only its answer was lost:
        the node is a member all the same). None if the round froze before it
        joined; the newer state record is observed.
        """
        cdef bytes members = self.keys.members(round)
        cdef bytes me = self.node_id.encode()
        cdef bytes own = members + me
        cdef bytes counter = self.keys.counter(round)
        success = [("put", own, self.descriptor, self.lease),
                   ("txn", [("create", counter, 0)],
                    [("put", counter, me, self.lease), ("count", members)],
                    [("get", counter)])]
        for key in self.stale_keys:
            success.append(("delete", key))
        ok, revision, results = yield Action(
            STEP_TXN, [("create", self.keys.world(round), 0)], success,
            [("get", self.keys.state), ("get", own)], join=True)
        if not ok:
            got = results[0]
            self.observe_state(None if got is None else got[0], 0 if got is None else got[1])
            mine = results[1]
            if mine is not None and mine[0] == self.descriptor:
                return mine[1], -1
            return None
        took, counted = results[1]
        if took:
            return revision, counted[1]
        holder = counted[0]
        return revision, 1 if holder is not None and holder[0] == me else 0

    def _join(self, StateRecord s, double now):
        """Join the open round ``s.round``; False if it froze first."""
        joined = yield from self._join_txn(s.round)
        if joined is None:
            return False
        self._joined(s.round, joined[0], joined[1], s.min_nodes, s.max_nodes, now)
        yield from self._announce_last_call(s.round)
        if self.freeze_pending:
            self.freeze_pending = False
            yield from self._freeze(s, now)
        return True

    cdef int _joined(self, long long round, long long revision, long long count,
                     int min_nodes, int max_nodes, double now) except -1:
        """Record a join of ``round``; ``count`` as ``_join_txn`` returns it."""
        cdef bytes me = self.node_id.encode()
        self.stale_keys = [self.keys.members(round) + me]
        self._move(JOIN)
        self.joined_round = round
        self.join_revision = revision
        self.waiting_round = -1
        self.counter = False
        self.poll_at = INFINITY
        self.announce_due = False
        self.counter_gone = False
        self.counter_watch_at = INFINITY
        if (min_nodes <= _COUNTER_WATCHERS
                or zlib.crc32(b"%d/%s" % (round, me)) % min_nodes < _COUNTER_WATCHERS):
            self.counter_watch_at = now + _COUNTER_WATCH_AFTER
        if count > 0:
            self._start_counting(round, count, min_nodes, max_nodes, now)
        return 0

    cdef int _start_counting(self, long long round, long long count, int min_nodes,
                             int max_nodes, double now) except -1:
        """Become the counter of ``round``, whose members number ``count``."""
        self.counter = True
        self.counter_watch_at = INFINITY
        self.stale_keys.append(self.keys.counter(round))
        self.last_call_armed = False
        self.last_count = -1
        self._counted(count, min_nodes, max_nodes, now)
        return 0

    cdef int _poll_after(self, long long count, double now) except -1:
        """Time the next count after one that found ``count`` keys."""
        cdef double floor = count * _POLL_PER_MEMBER
        if count != self.last_count:
            self.poll_delay = max(_POLL_MIN, floor)
        else:
            self.poll_delay = min(max(self.poll_delay * 2, _POLL_MIN), max(_POLL_MAX, floor))
        self.last_count = count
        self.poll_at = now + self.poll_delay
        return 0

    cdef int _counted(self, long long count, int min_nodes, int max_nodes,
                      double now) except -1:
        """As the counter: act on a count of the members, and time the next one."""
        self._poll_after(count, now)
        if count >= max_nodes:
            self.freeze_pending = True
        elif count >= min_nodes and not self.last_call_armed:
            self.last_call_armed = True
            self.announce_due = True
            self.wake_at = now + self.last_call_timeout
        return 0

    def _count_members(self, StateRecord s, double now):
        """As the counter: count the members of the open round ``s.round``."""
        _ok, _revision, (count,) = yield _txn([], [("count", self.keys.members(s.round))], [])
        self._counted(count, s.min_nodes, s.max_nodes, now)
        yield from self._announce_last_call(s.round)
        return 0

    def _check_counter(self):
        """Take over counting the open round this node joined if its counter
        left: the counter key went with its node's lease or its withdrawal.

        Checked every ``liveness_interval`` while the node waits in the round;
        the key is read first, so that a live counter costs one read.
        """
        cdef long long r = self.joined_round
        cdef bytes counter = self.keys.counter(r)
        got = yield _get(counter)
        if got is not None:
            return 0
        cdef bytes me = self.node_id.encode()
        ok, _revision, results = yield _txn(
            [("create", counter, 0), ("create", self.keys.world(r), 0)],
            [("put", counter, me, self.lease), ("count", self.keys.members(r))],
            [("get", counter)])
        if not ok:
            held = results[0]
            if held is None or held[0] != me:
                return 0
            # An earlier attempt took the key and only its answer was lost.
            results = [None, 1]
        logger.info("run %r round %d: its counter left; node %s counts its members",
                    self.keys.run_id, r, self.node_id)
        self._start_counting(r, results[1], self.state.min_nodes, self.state.max_nodes,
                             self.now)
        yield from self._announce_last_call(r)
        return 0

    def _announce_last_call(self, long long round):
        """Publish when round ``round``'s last call ends, for ``rdzv status``.

        The counter does it when its count first reaches ``min_nodes`` (below
        ``max_nodes``) and arms the round's last call. One put, on this
        node's lease, and only while the round has no world record; the value
        is the wall-clock deadline in seconds.
        """
        if not self.announce_due:
            return 0
        self.announce_due = False
        deadline = self.wall_offset + self.wake_at
        yield _txn([("create", self.keys.world(round), 0)],
                   [("put", self.keys.last_call(round), b"%.3f" % deadline, self.lease)], [])
        return 0

    def _prejoin(self, StateRecord s, double now):
        """Join the round after ``s`` before it is open; True if the state moved.

        Every member of a final round asks for the next one at about the same
        time. Rather than all racing to open it (one lost CAS each), they join
        it while the record still says final, and only the first of them (the
        one that took the counter key) opens it. The others wait for the record
        to change; if the opener dies first, the next one to wake opens it after
        ``liveness_interval``.
        """
        cdef long long target = 0 if s is None else s.round + 1
        if self.phase == JOINED and self.joined_round == target:
            if now >= self.wake_at:
                # The last call ran out before the round opened: freeze on opening.
                self.wake_at = INFINITY
                self.freeze_pending = True
            if now < self.open_at:
                return False
            self.open_at = now + self.liveness_interval
            yield from self._cas(OPEN, s)
            return True
        joined = yield from self._join_txn(target)
        if joined is None:
            return True
        self._joined(target, joined[0], joined[1],
                     self.min_nodes if s is None else s.min_nodes,
                     self.max_nodes if s is None else s.max_nodes, now)
        yield from self._announce_last_call(target)
        if joined[1] < 0:
            return True  # a lost answer: the round is frozen already
        if self.counter:
            self.open_at = INFINITY
            yield from self._cas(OPEN, s)
            return True
        self.open_at = now + self.liveness_interval
        return False

    def _freeze(self, StateRecord s, double now):
        """Fix round ``s.round``'s world and publish it; True if this node did.

        A freezer in the world confirms in the same transaction: it knows the
        world already, and its round watch then starts at the current revision
        (etcd delivers a watch that starts in the past only on its next sync,
        up to 100 ms later). A world of one is final right away.
        """
        cdef bytes members = self.keys.members(s.round)
        reads = [("range", members, s.max_nodes)]
        if s.last_final >= 0:
            reads.append(("get", self.keys.world(s.last_final)))
            reads.append(("range", self.keys.ranks(s.last_final), 0))
        ok, revision, results = yield _txn(
            [("mod", self.keys.state, self.state_mod)], reads, [("get", self.keys.state)])
        if not ok:
            got = results[0]
            if got is None:
                self.observe_state(None, 0)
            else:
                self.observe_state(got[0], got[1])
            return False
        listed = [(key[len(members):].decode(), value) for key, value, _ in results[0]]
        if len(listed) < s.min_nodes:
            # Members died since the count reached min: wait for more joins,
            # and arm the last call again when the count is back at min.
            self.last_call_armed = False
            return False
        previous = []
        if len(results) > 1 and results[1] is not None:
            previous = world_from(results[1][0], results[2], self.keys, s.last_final)[0]
        world = assign_ranks(listed, previous, s.max_nodes)
        # Rank 0's bootstrap address comes from its own descriptor; it also goes
        # into the round's store, where torch's code looks for it.
        rank0 = decode_member(dict(listed)[world[0]])
        master_addr, master_port = ("", 0) if rank0 is None else (rank0[1], rank0[3])
        page_txns, extra = plan_world(
            self.keys, s.round, revision, world, master_addr, master_port, self.data_lease)
        if not (yield from self._write_pages(page_txns, s.round, revision)):
            # Another freezer read the members at the same revision and is
            # writing its shards there: it freezes, or this node does later.
            self.wake_at = now + self.liveness_interval
            return False
        cdef bytes kv = self.keys.kv(s.round)
        cdef bytes confirm_key = self.keys.confirmed(s.round) + self.node_id.encode()
        extra.append(("put", kv + b"MASTER_ADDR", master_addr.encode(), self.data_lease))
        extra.append(("put", kv + b"MASTER_PORT", str(master_port).encode(), self.data_lease))
        cdef bint in_world = self.node_id in world
        if in_world:
            extra.append(("put", confirm_key, b"", self.lease))
        cdef int won = (yield from self._cas(
            FREEZE, s, {"cutoff": revision, "world_size": len(world)}, extra))
        if not won:
            if page_txns:
                # Shards no frozen record will name: this freezer wrote them all.
                yield _txn([], [("delete", *self.keys.ranks_between(s.round, revision))], [])
            return False
        self.freezer = True
        self.freeze_round = s.round
        self.world = world
        self.world_ids = set(world)
        self.master = (master_addr, master_port)
        self.confirmed = set()
        self.world_member_lost = False
        self.last_count = -1
        self.verified_count = -1
        self._poll_after(0, now)
        if in_world and won == 1:
            # (With won == 2 the confirmation may be another freezer's; this node
            # confirms the usual way.)
            self.stale_keys.append(confirm_key)
            self.confirmed.add(self.node_id)
            self.rank = world.index(self.node_id)
            self._move(CONFIRM)
            self.confirmed_state = self.state
            self.confirmed_mod = self.state_mod
            self.wake_at = now + self.liveness_interval
        return True

    def _write_pages(self, list page_txns, long long round, long long cutoff):
        """Write a large world's rank shards before the freeze; False if another
        freezer of the same cutoff got to one of them first.

        Each transaction creates its shards only if none of them exists, so
        when this returns True every shard under the cutoff is this node's. On
        False, the shards this node did create are deleted: the other freezer
        cannot have written all of them, so no freeze will name that cutoff.
        """
        cdef bint wrote = False
        for compares, puts in page_txns:
            ok, _revision, _results = yield _txn(compares, puts, [])
            if not ok:
                if wrote:
                    yield _txn([], [("delete", *self.keys.ranks_between(round, cutoff))], [])
                return False
            wrote = True
        return True

    def _freezer_duties(self, StateRecord s, double now):
        """As the freezer: count the confirmations when due, finalize when the
        whole world confirmed, restart if one of it is lost."""
        if s.status != FROZEN or s.round != self.freeze_round:
            self._stop_freezing()
            return None
        if not self.world_member_lost and len(self.confirmed) < s.world_size:
            if now < self.poll_at:
                return None
            yield from self._count_confirmations(s, now)
        if self.world_member_lost:
            yield from self._cas(RESTART, s)
            return True
        if len(self.confirmed) >= s.world_size:
            yield from self._cas(FINALIZE, s)
            return True
        return None

    def _count_confirmations(self, StateRecord s, double now):
        """As the freezer: count round ``s.round``'s confirmations.

        Surplus nodes confirm too, before they learn they are surplus, so a
        count that reaches the world's size is checked by name, once per count.
        """
        cdef bytes confirmed = self.keys.confirmed(s.round)
        _ok, _revision, (count,) = yield _txn([], [("count", confirmed)], [])
        if count >= s.world_size and count != self.verified_count:
            self.verified_count = count
            _ok, _revision, (got,) = yield _txn([], [("range", confirmed, 0, True)], [])
            self.confirmed.update(self.world_ids.intersection(
                [key[len(confirmed):].decode() for key, _value, _rev in got]))
        self._poll_after(count, now)
        return 0

    def _confirm_or_leave(self, StateRecord s, double now):
        """In a frozen round: read this node's rank shard and confirm, in one
        transaction.

        The shard holds this node's rank if it is in the world, and rank 0's
        address: a few KB whatever the world's size. The confirmation goes in
        before the node knows whether it is in the world: surplus nodes are
        rare, and they withdraw it with their member key when they register as
        waiting.
        """
        cdef bytes shard_key = self.keys.rank_shard(
            s.round, s.cutoff, shard_of(self.node_id, world_shards(s.world_size)))
        cdef bytes me = self.node_id.encode()
        cdef bytes confirm_key = self.keys.confirmed(s.round) + me
        ok, revision, results = yield _txn(
            [], [("get", shard_key), ("put", confirm_key, b"", self.lease)], [])
        self.stale_keys.append(confirm_key)
        got = results[0]
        if got is None:
            # The round was retired (deleted) because the run moved on while this
            # node's view lagged behind; only a record that did not move is bad.
            current = yield _get(self.keys.state)
            if current is not None and current[1] > self.state_mod:
                self.observe_state(current[0], current[1])
                return 0
            raise RendezvousStateError(
                f"round {s.round} is frozen but its rank shard {shard_key.decode()!r} "
                "is missing")
        round, ranks, master_addr, master_port = decode_rank_shard(got[0], shard_key)
        self.rank = ranks.get(self.node_id, -1)
        if round != s.round or self.rank >= s.world_size:
            raise RendezvousStateError(
                f"rank shard at {shard_key.decode()!r} does not match the state record "
                f"(round {round} vs {s.round}, rank {self.rank} of {s.world_size})")
        self.master = (master_addr, master_port)
        # The world's ids this node knows: those of its shard (the freezer
        # knows them all), which is what the view after the round names.
        self.world = list(ranks)
        if self.rank < 0:
            # Surplus: joined after the cutoff or beyond max_nodes. Its keys are
            # in stale_keys, so registering as waiting withdraws them.
            self._move(SURPLUS)
            return 0
        self._move(CONFIRM)
        self.confirmed_state = s
        self.confirmed_mod = self.state_mod
        self.wake_at = now + self.liveness_interval
        return 0

    def _check_world(self, StateRecord s, double now):
        """Fallback liveness check of a frozen round's world, by any member.

        It reads the whole world (O(N) bytes): it runs only when the freezer
        has not finalized the round within ``liveness_interval``.
        """
        self.check_liveness = False
        cdef bytes confirmed = self.keys.confirmed(s.round)
        ok, revision, results = yield _txn([], [
            ("count", self.keys.members(s.round), s.cutoff),
            ("range", confirmed, 0, True),
            ("get", self.keys.world(s.round)),
            ("range", self.keys.ranks(s.round, s.cutoff), 0),
        ], [])
        if results[2] is None:
            # Retired, as in _confirm_or_leave: the run moved on while this
            # node's view lagged behind.
            current = yield _get(self.keys.state)
            if current is not None and current[1] > self.state_mod:
                self.observe_state(current[0], current[1])
                return 0
            raise RendezvousStateError(
                f"round {s.round} is frozen but {self.keys.world(s.round).decode()!r} "
                "is missing")
        # Surplus nodes confirm before they learn they are surplus: count only the
        # world's confirmations.
        world = set(world_from(results[2][0], results[3], self.keys, s.round)[0])
        confirmed_world = sum(
            1 for key, _value, _rev in results[1] if key[len(confirmed):].decode() in world)
        if results[0] < s.world_size:
            yield from self._cas(RESTART, s)
        elif confirmed_world >= s.world_size:
            yield from self._cas(FINALIZE, s)
        else:
            self.wake_at = now + self.liveness_interval
        return 0

    def _register_waiting(self, StateRecord s):
        """Put this node's waiting key for round ``s.round``; count its world."""
        cdef bytes me = self.node_id.encode()
        ops = [("put", self.keys.waiting(s.round) + me, b"", self.lease),
               ("count", self.keys.members(s.round), s.cutoff)]
        for key in self.stale_keys:
            if key != self.keys.waiting(s.round) + me:
                ops.append(("delete", key))
        ok, revision, results = yield _txn([], ops, [])
        self._move(REGISTER)
        # A waiting node has no timer of its own: it wakes for the state record
        # and its world's departures. A last call it armed as a joiner is not
        # its business any more (left set, its driver would spin).
        self.wake_at = INFINITY
        self.freeze_pending = False
        self.waiting_round = s.round
        self.watch_revision = revision
        self.stale_keys = [self.keys.waiting(s.round) + me]
        return results[1] < s.world_size

    def _wait_for_next(self, StateRecord s, double now):
        """Late or surplus node: register, and open the next round if the world
        of round ``s.round`` lost a member. True if the state moved."""
        cdef bint lost
        if self.phase != WAITING or self.waiting_round != s.round:
            lost = yield from self._register_waiting(s)
        elif self.check_liveness:
            self.check_liveness = False
            ok, revision, results = yield _txn(
                [], [("count", self.keys.members(s.round), s.cutoff)], [])
            lost = results[0] < s.world_size
        else:
            return False
        if not lost:
            return False
        yield from self._cas(RESTART if s.status == FROZEN else OPEN, s)
        return True

    def begin_close(self):
        """Start closing the run (CLOSE from any status), driven by ``next_action``.

        Its ``STEP_DONE`` action's ``result`` is True if this node closed the
        run, False if it was closed already.
        """
        self._start(self._close())

    def _close(self):
        cdef int attempts = 0
        while attempts < _MAX_CAS_ATTEMPTS:
            if self.retry_at != INFINITY:
                if self.now < self.retry_at:
                    yield Action(STEP_WAIT, wake_at=self.retry_at)
                    continue
                self.retry_at = INFINITY
            attempts += 1
            if self.state_mod < 0:
                got = yield _get(self.keys.state)
                self.observe_state(None if got is None else got[0], 0 if got is None else got[1])
            if self.state is not None and self.state.status == CLOSED:
                yield Action(STEP_DONE, result=False)
                return
            if (yield from self._cas(CLOSE, self.state)):
                yield Action(STEP_DONE, result=True)
                return
        raise RendezvousStateError(
            f"could not close {self.keys.state.decode()!r}: too many concurrent changes")

    # -------------------------------------------------------------- leaving
    def cleanup_ops(self):
        """Deletes that withdraw this node from the current round (on timeout)."""
        return [("delete", key) for key in self.stale_keys]

    def left(self):
        """Record that ``cleanup_ops`` ran."""
        self.stale_keys = []
        self._move(LEAVE)


# ------------------------------------------------------------ between rounds
# How many waiting and next-round node ids a read of the view lists; beyond
# that it only counts them, so a read stays a few KB however many there are.
VIEW_LIST_LIMIT = 64


cdef class RunView:
    """What a member knows of the run after it completed a round, kept current.

    A node spends hours between rounds, and torch's agent asks it every
    ``--monitor-interval`` whether to re-rendezvous. The view answers without
    asking etcd: one read (``read_ops``) when it is first asked, then one watch
    (``watch_spec``) from that read on. The watch is trusted for as long as
    etcd keeps answering on its connection (``confirm``: the driver knows when);
    when nothing confirmed it for ``check_interval`` seconds, a read checks that
    the watch missed nothing (``check_due``). A node that is never asked (no
    launcher polling) pays nothing. It counts:

    * late and surplus nodes waiting for the next round (``waiting/`` keys of
      the completed round),
    * nodes that joined the next round already (its ``members/`` keys),
    * members of the completed round whose key vanished: their lease expired
      (the node died, hung or was cut off) or they shut down. They are counted
      on purpose: torch's agent re-rendezvous when the count is > 0, and a lost
      member is exactly when the job must re-form without it;
    * and whether the state record moved on to a later round that this node
      is not part of yet (the count is then at least 1).

    A closed run counts 0 (see ``num_waiting``).

    Once the record moved past the completed round the count cannot fall back
    to 0, so the view narrows its watch to the state record alone (it still
    learns of a close): a node that lags behind gets O(1) events, not one per
    joiner of the next round.

    Args:
        keys: the run's ``RunKeys``.
        state: the ``final`` record of the completed round.
        state_mod: its mod_revision.
        world: the completed round's member node ids that this node knows:
            all of them (the freezer), or those of its own rank shard.
        check_interval: the longest a view goes unconfirmed before a read checks
            it (lease_ttl).
    """

    def __init__(self, keys, StateRecord state, long long state_mod, world,
                 double check_interval):
        if state is None or state.status != FINAL:
            raise ValueError("a run view starts from the final record of a round")
        self.keys = keys
        self.round = state.round
        self.cutoff = state.cutoff
        self.world = frozenset(world)
        self.world_size = state.world_size
        self.state = state
        self.state_mod = state_mod
        self.state_unreadable = False
        # Until its first read the view knows the record and nothing more.
        self.revision = state_mod
        self.read_revision = 0
        self.read_counted = False
        self.watched_revision = state_mod
        self.verified_at = -INFINITY
        self.check_interval = check_interval
        self.waiting = set()
        self.next_members = set()
        self.lost = set()
        self.unlisted = 0
        self.unnamed_lost = 0
        self.members_prefix = keys.members(self.round)
        self.waiting_prefix = keys.waiting(self.round)
        self.next_prefix = keys.members(self.round + 1)

    # ------------------------------------------------------------- answers
    @property
    def unread(self):
        """True until the first read: the view knows only the final record."""
        return self.read_revision == 0

    @property
    def closed(self):
        """True once the state record says closed (terminal)."""
        return not self.state_unreadable and self.state.status == CLOSED

    @property
    def moved_on(self):
        """True once the record left this round's ``final`` other than by closing."""
        if self.state_unreadable:
            return True
        return self.state.status != CLOSED and (
            self.state.round != self.round or self.state.status != FINAL)

    cpdef long long num_waiting(self):
        """How many nodes wait for this node to re-rendezvous (see the class doc).

        None once the run is closed: it has no next round, so a re-rendezvous
        could only fail, and members that finished early and shut down (closing
        the run, as torch's launcher does) must not stop those still working.
        """
        if self.closed:
            return 0
        cdef long long count = (len(self.waiting) + len(self.next_members) + len(self.lost)
                                + self.unlisted + self.unnamed_lost)
        if self.moved_on and count < 1:
            count = 1
        return count

    def waiting_nodes(self):
        """Ids of the nodes waiting for the next round and of those in it, sorted.

        Nodes a read counted beyond ``VIEW_LIST_LIMIT`` are counted by
        ``num_waiting`` but not listed.
        """
        return sorted(self.waiting | self.next_members)

    def lost_members(self):
        """Ids of the completed round's members whose keys vanished, sorted.

        A member found missing by a read (not by the watch) is counted by
        ``num_waiting`` but not named.
        """
        return sorted(self.lost)

    # ------------------------------------------------------------- feeding
    def watch_spec(self):
        """``(key, range_end)`` of the one watch that keeps the view current.

        One contiguous range from the completed round's ``members/`` through the
        state record: that round's member and waiting keys (and its world record,
        which never changes), the next round's keys, and the record. Rounds
        before it (whose keys are being deleted) and its store are outside.
        ``range_end`` None means the state record alone (the run moved on);
        None means nothing more to watch (the run is closed).
        """
        cdef bytes state_key = self.keys.state
        if self.closed:
            return None
        if self.moved_on:
            return (state_key, None)
        return (self.members_prefix, state_key + b"\x00")

    def read_ops(self, bint count=True):
        """Operations of one read-only transaction that re-reads what the view holds.

        ``count=False`` leaves out the count of the round's member keys, which
        costs etcd a walk of all N of them: a read that a new watch goes with,
        started at ``watch_start``, needs none, since that watch names every
        member lost since the last one's events (``observe_events``).
        """
        cdef list ops = [("get", self.keys.state)]
        if self.moved_on or self.closed:
            return ops
        ops.extend([
            ("list", self.waiting_prefix, VIEW_LIST_LIMIT),
            ("list", self.next_prefix, VIEW_LIST_LIMIT),
        ])
        if count:
            ops.append(("count", self.members_prefix, self.cutoff))
        return ops

    def check_due(self, double now):
        """True when a read should check the view: nothing confirmed it for
        ``check_interval`` seconds, or a change only a read can judge came."""
        return now - self.verified_at >= self.check_interval

    def confirm(self, double at):
        """etcd answered at ``at`` on the connection that carries the watch, and
        had answered there without a gap since the view was last checked: the
        watch is alive, so it delivered (or has in flight) every change until
        then, and no read is needed. Never earlier than the last check."""
        if self.read_revision and at > self.verified_at:
            self.verified_at = at

    def observe_read(self, long long revision, results, double now, bint force=False):
        """Feed the results of ``read_ops`` at ``revision``; True if they corrected it.

        A view already ahead of the read (its watch delivered later changes) only
        counts as confirmed, unless ``force`` (a new watch starts after the read)
        or it is the first read.
        A correction means the watch missed changes: watch again after ``revision``.
        """
        self.verified_at = now
        if self.revision > revision and not force and self.read_revision:
            return False
        cdef tuple before = (self.state_mod, self.state_unreadable, frozenset(self.waiting),
                             frozenset(self.next_members), self.unlisted, self.unnamed_lost)
        got = results[0]
        if got is None:
            self._observe_state(None, revision)
        elif got[1] != self.state_mod:
            self._observe_state(got[0], got[1])
        if len(results) > 1:
            waiting_count, waiting_keys = results[1]
            next_count, next_keys = results[2]
            self.waiting = {key[len(self.waiting_prefix):].decode() for key in waiting_keys}
            self.next_members = {key[len(self.next_prefix):].decode() for key in next_keys}
            self.unlisted = (waiting_count - len(self.waiting)) + (next_count - len(self.next_members))
            if len(results) > 3:
                # A lost member never comes back (its lease is gone): the named
                # ones stay, and what else is missing is counted without a name.
                self.unnamed_lost = max(0, self.world_size - results[3] - len(self.lost))
        self.read_counted = len(results) > 3
        self.revision = revision
        self.read_revision = revision
        return before != (self.state_mod, self.state_unreadable, frozenset(self.waiting),
                          frozenset(self.next_members), self.unlisted, self.unnamed_lost)

    @property
    def watch_start(self):
        """The revision a new watch starts at: right after the last one the
        watches delivered, so that nothing between them is lost (a read since
        counted it, but only a watch names the members lost meanwhile)."""
        return self.watched_revision + 1

    def observe_watch_start(self, long long start):
        """A new watch started at ``start`` (later than ``watch_start`` when its
        revision was compacted and it starts after a read instead)."""
        if start - 1 > self.watched_revision:
            self.watched_revision = start - 1

    def observe_events(self, events):
        """Feed the view's watch: ``[(is_put, key, value, mod_revision), ...]``."""
        for is_put, key, value, revision in events:
            if revision > self.watched_revision:
                self.watched_revision = revision
            if revision <= self.read_revision:
                # Already in the last read, which counted a lost member without
                # its name (the deletion gives the name), or did not count the
                # members at all (the deletion is the news).
                if not is_put and (self.unnamed_lost > 0 or not self.read_counted) \
                        and key.startswith(self.members_prefix):
                    self._member_deleted(key)
                continue
            self._apply(is_put, key, value, revision)
            if revision > self.revision:
                self.revision = revision

    cdef int _observe_state(self, value, long long mod_revision) except -1:
        if value is None:
            # The record was deleted (the run was removed): this round is over.
            self.state_unreadable = True
            self.state_mod = mod_revision
            return 0
        try:
            self.state = decode_state(value, self.keys.state)
            self.state_unreadable = False
        except RendezvousStateError:
            # next_rendezvous() reports it; here it only means "re-rendezvous".
            self.state_unreadable = True
        self.state_mod = mod_revision
        return 0

    cdef int _apply(self, bint is_put, bytes key, value, long long revision) except -1:
        cdef str node_id
        if key == self.keys.state:
            if revision > self.state_mod:
                self._observe_state(value if is_put else None, revision)
        elif key.startswith(self.waiting_prefix):
            node_id = key[len(self.waiting_prefix):].decode()
            if is_put:
                self.waiting.add(node_id)
            elif node_id in self.waiting:
                self.waiting.discard(node_id)
            elif self.unlisted > 0:
                self.unlisted -= 1
        elif key.startswith(self.next_prefix):
            node_id = key[len(self.next_prefix):].decode()
            if is_put:
                self.next_members.add(node_id)
            elif node_id in self.next_members:
                self.next_members.discard(node_id)
            elif self.unlisted > 0:
                self.unlisted -= 1
        elif key.startswith(self.members_prefix) and not is_put:
            self._member_deleted(key)
        return 0

    cdef int _member_deleted(self, bytes key) except -1:
        cdef str node_id = key[len(self.members_prefix):].decode()
        if node_id in self.world and node_id not in self.lost:
            self.lost.add(node_id)
            if self.unnamed_lost > 0:
                self.unnamed_lost -= 1
        elif node_id not in self.world and len(self.world) < self.world_size:
            # A member knows only the ids of its rank shard: whether the node
            # was in the world (or a surplus node withdrawing) is for a read of
            # the world's member count to say, at the next poll.
            self.verified_at = -INFINITY
        return 0
