"""``rdzv status``: a run's round, members, leases and waiting nodes."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

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
from rdzv.inspect import RunState, RunStatus, read_run_status


def render_run_status(status: RunStatus) -> list[str]:
    """The human-readable lines of a run's status (``rdzv.inspect.read_run_status``)."""
    head = f"run {status.run_id!r} under {status.prefix!r}: "
    if status.state is RunState.NONE:
        return [head + "status none (no state record: no node has joined or closed it)"]
    bounds = f"min {status.min_nodes}, max {status.max_nodes}"
    world = "" if status.world_size is None else f", world of {status.world_size}"
    last = "" if status.last_final is None else f", last complete round {status.last_final}"
    lines = [head + f"round {status.round} {status.state.value} ({bounds}{world}{last})"]
    if status.closed:
        lines[0] += "; closed: no further rounds"
    lines.append(f"in etcd: {status.keys} keys, {_size(status.bytes)}")
    lines.append(f"members of round {status.round}: {len(status.members)}")
    if status.state is RunState.JOINABLE:
        lines[-1] += _describe_joinable(status, time.time())
    if status.members:
        lines += ["  " + line for line in _table(
            ("rank", "node", "host", "topology", "addr", "pid", "state", "lease left"),
            [(m.rank, m.node, m.host, m.topology, m.addr, m.pid, m.state.value,
              None if m.lease_ttl is None else f"{m.lease_ttl} s") for m in status.members],
            right=("rank", "pid", "lease left"),
        )]
    lines.append(f"waiting for round {status.round + 1}: {len(status.waiting)}")
    if status.waiting:
        lines += ["  " + line for line in _table(
            ("node", "lease left"),
            [(w.node, None if w.lease_ttl is None else f"{w.lease_ttl} s")
             for w in status.waiting],
            right=("lease left",),
        )]
    return lines


def _describe_joinable(status: RunStatus, now: float) -> str:
    """How far a joinable round is from completing: of how many, when the last call ends."""
    joined, low, high = status.joined, status.min_nodes, status.max_nodes
    text = f" of min {low}, max {high}"
    ends = status.last_call_ends
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
                    text = json.dumps(status.to_dict())
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
