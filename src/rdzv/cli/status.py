"""``rdzv status``: a run's round, members, leases and waiting nodes."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from rdzv import _state
from rdzv.api import RendezvousConnectionError
from rdzv.cli._common import (
    _RAW,
    ExitCode,
    _connect,
    _example,
    _log_options,
    _params_prefix,
    _positive_seconds,
    _run_options,
    _run_params,
    _size,
    _table,
    _wrap,
)
from rdzv.client import EtcdClient
from rdzv.keys import DEFAULT_PREFIX, RunKeys, normalize_prefix
from rdzv.runs import run_footprint

logger = logging.getLogger(__name__)


@dataclass
class NodeStatus:
    """One node of a run as ``rdzv status`` shows it.

    Attributes:
        node: the node's id (its lease id in hex).
        host, addr, pid: from its member key; None once the key is gone.
        rank: its rank in the round's world, None before the freeze or if surplus.
        state: ``joined``, ``confirmed`` (alive in a frozen or final world),
            ``left`` (in the world, but its key is gone) or ``waiting``.
        lease_ttl: seconds left on its lease; None without a live key.
        topology: its topology label (``pod1/rack07``); None without one.
    """

    node: str
    host: str | None = None
    addr: str | None = None
    pid: int | None = None
    rank: int | None = None
    state: str = "joined"
    lease_ttl: int | None = None
    topology: str | None = None


def read_run_status(
    client: EtcdClient, run_id: str, prefix: str = DEFAULT_PREFIX
) -> dict[str, Any]:
    """Read what ``rdzv status`` shows of one run.

    Args:
        client: a connection to etcd.
        run_id: the run's id.
        prefix: the key prefix shared by all runs (``etcd_prefix``).

    Returns:
        A JSON-ready dict: ``run_id``, ``prefix``, ``status`` (``none`` when the
        run has no state record), ``round``, ``min_nodes``, ``max_nodes``,
        ``world_size``, ``last_final``, ``closed``, ``joined`` (how many nodes
        joined the round), ``last_call_ends`` (when a joinable round that has
        ``min_nodes`` completes without more joins: seconds since the epoch;
        None before that or once frozen), ``footprint`` (``keys`` and ``bytes``
        the run takes in etcd, see ``rdzv.runs``), ``members`` (in placement
        order, see ``rdzv._state.placement_order``; members whose keys are gone
        last) and ``waiting`` (lists of ``NodeStatus`` fields).

    Raises:
        RendezvousConnectionError: etcd cannot be reached.
        RendezvousStateError: the state or world record cannot be decoded.
        ValueError: the run id or the prefix is malformed.
    """
    keys = RunKeys(prefix, run_id)
    result: dict[str, Any] = {
        "run_id": run_id, "prefix": normalize_prefix(prefix) or "/", "status": "none",
        "round": None, "min_nodes": None, "max_nodes": None, "world_size": None,
        "last_final": None, "closed": False, "joined": 0, "last_call_ends": None,
        "members": [], "waiting": [], "footprint": run_footprint(client, keys),
    }
    got = client.get(keys.state)
    if got is None:
        return result
    s = _state.decode_state(got[0], keys.state)
    result.update(
        status=_state.status_name(s.status), round=s.round, min_nodes=s.min_nodes,
        max_nodes=s.max_nodes, world_size=s.world_size or None,
        last_final=None if s.last_final < 0 else s.last_final,
        closed=s.status == _state.Status.CLOSED,
    )
    world: list[str] = []
    if s.status != _state.Status.JOINABLE:
        got_world = _state.read_world(client, keys, s.round)
        if got_world is not None:
            world = got_world[0]
    leases: dict[int, int] = {}
    members = _leased_keys(client, keys.members(s.round))
    confirmed = {node for node, _, _ in _leased_keys(client, keys.confirmed(s.round))}
    waiting = _leased_keys(client, keys.waiting(s.round))
    # Rows in placement order (topology group, host in natural order, ...), the
    # order in which a fresh world gets its ranks; members whose keys are gone last.
    rows: dict[str, NodeStatus] = {}
    descriptors = {node: value for node, value, _ in members}
    for node in _state.placement_order(descriptors.items()):
        described = _state.decode_member(descriptors[node])
        host, addr, pid, _port, topology, _order = (
            described if described is not None else (None,) * 6
        )
        rows[node] = NodeStatus(node, host, addr, pid, topology=topology or None)
    for node, _, lease in members:
        rows[node].state = "confirmed" if node in confirmed else "joined"
        rows[node].lease_ttl = _lease_ttl(client, lease, leases)
    for rank, node in enumerate(world):
        rows.setdefault(node, NodeStatus(node, state="left")).rank = rank
    waiting_rows = [
        NodeStatus(node, state="waiting", lease_ttl=_lease_ttl(client, lease, leases))
        for node, _, lease in waiting
    ]
    result["members"] = [vars(row) for row in rows.values()]
    result["waiting"] = [vars(row) for row in waiting_rows]
    result["joined"] = len(members)
    if s.status == _state.Status.JOINABLE:
        last_call = client.get(keys.last_call(s.round))
        if last_call is not None:
            try:
                result["last_call_ends"] = float(last_call[0])
            except ValueError:
                logger.warning("ignoring a malformed last-call record %r", last_call[0])
    return result


def _leased_keys(client: EtcdClient, prefix: bytes) -> list[tuple[str, bytes, int]]:
    """``[(name below prefix, value, lease id), ...]`` in creation order."""
    return [
        (key[len(prefix):].decode("utf-8", "replace"), value, lease)
        for key, value, lease in client.range_leases(prefix)
    ]


def _lease_ttl(client: EtcdClient, lease: int, cache: dict[int, int]) -> int | None:
    if not lease:
        return None
    if lease not in cache:
        cache[lease] = client.lease_time_to_live(lease)
    return cache[lease]


def render_run_status(status: dict[str, Any]) -> list[str]:
    """The human-readable lines of ``read_run_status``'s result."""
    head = f"run {status['run_id']!r} under {status['prefix']!r}: "
    if status["status"] == "none":
        return [head + "status none (no state record: no node has joined or closed it)"]
    bounds = f"min {status['min_nodes']}, max {status['max_nodes']}"
    world = "" if status["world_size"] is None else f", world of {status['world_size']}"
    last = "" if status["last_final"] is None else f", last complete round {status['last_final']}"
    lines = [head + f"round {status['round']} {status['status']} ({bounds}{world}{last})"]
    if status["closed"]:
        lines[0] += "; closed: no further rounds"
    footprint = status["footprint"]
    lines.append(f"in etcd: {footprint['keys']} keys, {_size(footprint['bytes'])}")
    members = status["members"]
    lines.append(f"members of round {status['round']}: {len(members)}")
    if status["status"] == "joinable":
        lines[-1] += _describe_joinable(status, time.time())
    if members:
        lines += ["  " + line for line in _table(
            ("rank", "node", "host", "topology", "addr", "pid", "state", "lease left"),
            [(m["rank"], m["node"], m["host"], m["topology"], m["addr"], m["pid"], m["state"],
              None if m["lease_ttl"] is None else f"{m['lease_ttl']} s") for m in members],
            right=("rank", "pid", "lease left"),
        )]
    waiting = status["waiting"]
    lines.append(f"waiting for round {status['round'] + 1}: {len(waiting)}")
    if waiting:
        lines += ["  " + line for line in _table(
            ("node", "lease left"),
            [(w["node"], None if w["lease_ttl"] is None else f"{w['lease_ttl']} s")
             for w in waiting],
            right=("lease left",),
        )]
    return lines


def _describe_joinable(status: dict[str, Any], now: float) -> str:
    """How far a joinable round is from completing: of how many, when the last call ends."""
    joined, low, high = status["joined"], status["min_nodes"], status["max_nodes"]
    text = f" of min {low}, max {high}"
    ends = status["last_call_ends"]
    if ends is not None:
        when = time.strftime("%H:%M:%S UTC", time.gmtime(ends))
        left = f"in {ends - now:.0f} s" if ends > now else "due now"
        text += f"; last call ends at {when} ({left}) unless {high} join first"
    elif joined < low:
        text += f"; waiting for {low - joined} more before the last call starts"
    return text


def _cmd_status(args: argparse.Namespace) -> int:
    """Print a run's status once, or refresh it until Ctrl-C with ``--watch``."""
    params = _run_params(args, 1, 1)
    prefix = _params_prefix(params)
    client = _connect(params)
    clear_screen = args.watch and not args.json and sys.stdout.isatty()
    # A live view ends on Ctrl-C between refreshes, not inside a request to etcd
    # (an interrupt inside gRPC's blocking call can leave the channel hanging).
    stop = threading.Event()
    restore = None
    if args.watch and threading.current_thread() is threading.main_thread():
        restore = signal.signal(signal.SIGINT, lambda _signum, _frame: stop.set())
    try:
        first = True
        while not stop.is_set():
            try:
                status = read_run_status(client, params.run_id, prefix)
            except RendezvousConnectionError as err:
                if first or not args.watch:
                    raise
                # A live view rides out an etcd restart; Ctrl-C ends it.
                print(f"rdzv status: {err}", file=sys.stderr, flush=True)
                status = None
            if status is not None:
                if args.json:
                    text = json.dumps(status)
                else:
                    lines = render_run_status(status)
                    if args.watch:
                        lines.insert(0, time.strftime("%H:%M:%S"))
                    text = "\n".join(lines) + ("\n" if args.watch and not clear_screen else "")
                if clear_screen:
                    sys.stdout.write("\x1b[H\x1b[2J")
                print(text, flush=True)
            first = False
            if not args.watch:
                return ExitCode.OK
            stop.wait(args.interval)  # the refresh period of a live view
        return ExitCode.OK
    except KeyboardInterrupt:
        return ExitCode.OK
    finally:
        if restore is not None:
            signal.signal(signal.SIGINT, restore)
        client.close()


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``rdzv status`` to ``commands``."""
    status = commands.add_parser(
        "status", parents=[_log_options(), _run_options()], formatter_class=_RAW,
        help="show a run's round, members and waiting nodes",
        description=_wrap(
            "Show a run's current round and status, its bounds, its members (node id, "
            "host, topology label, rank once assigned, seconds left on their lease; in "
            "placement order: topology group, then host in natural order) and the nodes "
            "waiting for the next round. A run with no state record yet is reported with status "
            "'none' (exit 0)."
        ),
        epilog=_example(
            "rdzv status --endpoint 127.0.0.1:2379 --run-id job1",
            "rdzv status --endpoint 127.0.0.1:2379 --run-id job1 --json --watch",
        ),
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument("--watch", action="store_true",
                        help="refresh until Ctrl-C (with --json: one object per line)")
    status.add_argument("--interval", type=_positive_seconds, default=1.0,
                        help="seconds between refreshes with --watch (default 1)")
    status.set_defaults(func=_cmd_status)
