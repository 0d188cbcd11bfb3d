"""The ``rdzv`` command: a local etcd, joining, inspecting and closing runs, a demo.

Subcommands::

    rdzv server   start a local etcd (one member, or a cluster) until Ctrl-C
    rdzv join     join a run as one node; print the result as one JSON line
    rdzv status   show a run's round, members, leases and waiting nodes
    rdzv close    close a run: every current and future join fails
    rdzv runs     list the runs under a prefix: state, members, idle time, size
    rdzv purge    remove a run, or every run idle for longer than a given time
    rdzv demo     an embedded etcd, N nodes, one round, a kill and a late node
    rdzv bench    run ``benchmarks/join_latency.py`` (arguments pass through)

Results go to stdout; logs, errors and progress (on a terminal only) go to
stderr. Every subcommand takes ``--log-level`` and shows an example in ``--help``.

Exit codes (``ExitCode``): 0 ok, 1 other failure, 2 bad arguments or options,
3 timeout, 4 run closed, 5 etcd unreachable, 6 rendezvous state corrupt. A run
that does not exist is not an error: ``rdzv status`` reports its status as
``none`` and exits 0, so that a script (or ``--watch``) can wait for it to appear.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import logging
import os
import queue
import runpy
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

from rdzv import _state
from rdzv.api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousParameters,
    RendezvousStateError,
    RendezvousTimeoutError,
)
from rdzv.client import EtcdClient, EtcdConfig, parse_endpoints
from rdzv.etcd_rendezvous import (
    DEFAULT_TIMEOUT,
    RENDEZVOUS_OPTIONS,
    EtcdRendezvousHandler,
    create_rdzv_handler,
)
from rdzv.etcd_server import EtcdCluster, EtcdServer
from rdzv.etcd_store import StoreTimeoutError
from rdzv.keys import DEFAULT_PREFIX, RunKeys, normalize_prefix
from rdzv.runs import list_runs, purge_idle_runs, purge_run, run_footprint

__all__ = [
    "ExitCode",
    "NodeStatus",
    "UsageError",
    "build_parser",
    "main",
    "read_run_status",
    "render_run_status",
]

logger = logging.getLogger(__name__)

BACKEND = "etcd3"
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_BENCHMARK = Path("benchmarks") / "join_latency.py"
# How often a terminal's progress line is refreshed during long waits.
_PROGRESS_INTERVAL_S = 0.5
# Demo settings: short leases and last call, so that an elastic change takes
# seconds, and a generous per-phase deadline for slow machines.
_DEMO_LEASE_TTL = 3
_DEMO_LAST_CALL_S = 1.0
_DEMO_PHASE_TIMEOUT_S = 120.0


class ExitCode(enum.IntEnum):
    """What ``rdzv`` exits with; scripts can tell failures apart by it."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    TIMEOUT = 3
    CLOSED = 4
    CONNECTION = 5
    STATE = 6
    INTERRUPTED = 130


class UsageError(Exception):
    """Bad arguments or options: exit 2 with one line on stderr."""


# ------------------------------------------------------------------ parsing
class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # argparse takes a value like "-1:2" for an option, and --nnodes would fail
        # with "expected one argument"; as "--nnodes=-1:2" it gets _nnodes' message.
        given = list(sys.argv[1:] if args is None else args)
        joined: list[str] = []
        while given:
            arg = given.pop(0)
            if arg == "--":
                joined += [arg, *given]
                break
            if arg == "--nnodes" and given and given[0].startswith("-"):
                arg = f"--nnodes={given.pop(0)}"
            joined.append(arg)
        return super().parse_known_args(joined, namespace)


def _nnodes(text: str) -> tuple[int, int]:
    """``N`` or ``MIN:MAX`` -> ``(min, max)``."""
    low_text, sep, high_text = text.partition(":")
    try:
        low = int(low_text)
        high = int(high_text) if sep else low
    except ValueError:
        low = high = 0
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(
            f"expected N or MIN:MAX, whole numbers with 1 <= MIN <= MAX, got {text!r}"
        )
    return low, high


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected at least {low}, got {value}")
        return value

    return parse


def _port(text: str) -> int:
    port = _at_least(1)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {port}")
    return port


def _endpoint(text: str) -> str:
    try:
        parse_endpoints(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _run_id(text: str) -> str:
    try:
        RunKeys(DEFAULT_PREFIX, text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _prefix(text: str) -> str:
    try:
        return normalize_prefix(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _age(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h`` or ``1d`` -> seconds (0 or more)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _AGE_UNITS else (text, "s")
    try:
        seconds = float(number) * _AGE_UNITS[unit]
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected an age of 0 or more, like 90, 90s, 30m, 2h or 1d, got {text!r}")
    return seconds


def _conf_item(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _wrap(text: str) -> str:
    """A description filled to the width of a terminal (the help keeps it as is)."""
    return textwrap.fill(text, width=79)


def _example(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``rdzv`` command and its subcommands."""
    raw = argparse.RawDescriptionHelpFormatter
    logs = argparse.ArgumentParser(add_help=False)
    logs.add_argument(
        "--log-level", choices=_LOG_LEVELS, type=str.lower, default=argparse.SUPPRESS,
        help="what is logged to stderr (default: warning)",
    )
    run = argparse.ArgumentParser(add_help=False)
    where = run.add_argument_group("run")
    where.add_argument("--endpoint", required=True, type=_endpoint,
                       help="etcd as host[:port][,host[:port]...]")
    where.add_argument("--run-id", required=True, type=_run_id, help="the run's id")
    where.add_argument("--etcd-prefix", type=_prefix, default=None,
                       help=f"key prefix shared by all runs (default {DEFAULT_PREFIX})")
    where.add_argument(
        "--conf", type=_conf_item, action="append", default=[], metavar="KEY=VALUE",
        help="a rendezvous option, repeatable: " + ", ".join(sorted(RENDEZVOUS_OPTIONS)),
    )
    # The same, for the commands about every run under a prefix.
    runs_of = argparse.ArgumentParser(add_help=False)
    at = runs_of.add_argument_group("runs")
    at.add_argument("--endpoint", required=True, type=_endpoint,
                    help="etcd as host[:port][,host[:port]...]")
    at.add_argument("--etcd-prefix", type=_prefix, default=None,
                    help=f"key prefix shared by the runs (default {DEFAULT_PREFIX})")
    at.add_argument("--conf", type=_conf_item, action="append", default=[], metavar="KEY=VALUE",
                    help="a connection option, repeatable (protocol, cacert, cert, key, "
                    "username, password, connect_timeout)")
    at.add_argument("--json", action="store_true", help="print one JSON object")

    parser = _Parser(
        prog="rdzv",
        description=_wrap("Fast etcd-v3 rendezvous for distributed training launchers."),
        formatter_class=raw,
        parents=[logs],
        epilog=_example(
            "rdzv server                    # prints 'endpoint: 127.0.0.1:PORT'",
            "rdzv join --endpoint 127.0.0.1:PORT --run-id job1 --nnodes 2",
            "rdzv status --endpoint 127.0.0.1:PORT --run-id job1",
            "rdzv demo --nodes 16",
        ) + "\n\nexit codes: 0 ok, 1 other failure, 2 usage, 3 timeout, 4 closed, "
        "5 connection failure, 6 state error",
    )
    parser.set_defaults(log_level="warning")
    commands = parser.add_subparsers(
        dest="command", required=True,
        metavar="{server,join,status,close,runs,purge,demo,bench}",
        title="commands",
    )

    server = commands.add_parser(
        "server", parents=[logs], formatter_class=raw,
        help="start a local etcd until Ctrl-C or SIGTERM",
        description=_wrap(
            "Start a local etcd on loopback and print its endpoint as the first line of "
            "stdout ('endpoint: host:port[,host:port...]'); stop it on SIGINT or SIGTERM."
        ),
        epilog=_example(
            "rdzv server --data-dir ./etcd-data",
            "rdzv server --cluster 3        # three members, for fault tests",
        ),
    )
    server.add_argument("--data-dir", default=None,
                        help="keep etcd's data and log here (default: a temporary "
                        "directory, removed on exit)")
    server.add_argument("--port", type=_port, default=None,
                        help="client port (with --cluster N: ports PORT..PORT+N-1); "
                        "default: a free port")
    server.add_argument("--cluster", type=_at_least(1), default=None, metavar="N",
                        help="start an N-member cluster instead of a single etcd")
    server.set_defaults(func=_cmd_server)

    join = commands.add_parser(
        "join", parents=[logs, run], formatter_class=raw,
        help="join a run as one node and print the result as JSON",
        description=_wrap(
            "Join a run as one node, wait for its round to complete, print "
            '{"rank", "world_size", "round", "master_addr", "master_port", "run_id"} '
            "as one JSON line, and leave (the node's lease is revoked)."
        ),
        epilog=_example(
            "rdzv join --endpoint 127.0.0.1:2379 --run-id job1 --nnodes 2:4 --timeout 60",
        ) + "\n\nexit codes: 0 ok, 2 usage, 3 timeout, 4 closed, 5 connection failure, "
        "6 state error, 1 other",
    )
    join.add_argument("--nnodes", required=True, type=_nnodes, metavar="MIN:MAX",
                      help="bounds of the round's world; N means N:N")
    join.add_argument("--timeout", type=_positive_seconds, default=None,
                      help="seconds to wait for a round (default 600)")
    join.add_argument("--last-call-timeout", type=_positive_seconds, default=None,
                      help="seconds between the MIN-th join and completion (default 30)")
    join.add_argument("--local-addr", default=None,
                      help="address to advertise as MASTER_ADDR if this node gets rank 0")
    join.add_argument("--topology", default=None, metavar="LABEL",
                      help="this node's place in the cluster, coarse to fine, such as "
                      "pod1/rack07: a group's nodes get contiguous ranks (default: env "
                      "RDZV_TOPOLOGY, else SLURM_TOPOLOGY_ADDR's switches)")
    join.set_defaults(func=_cmd_join)

    status = commands.add_parser(
        "status", parents=[logs, run], formatter_class=raw,
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

    close = commands.add_parser(
        "close", parents=[logs, run], formatter_class=raw,
        help="close a run: every current and future join fails",
        description=_wrap(
            "Close a run (set_closed): waiting nodes and later joins fail with "
            "RendezvousClosedError. Closing is terminal; a closed run stays closed."
        ),
        epilog=_example("rdzv close --endpoint 127.0.0.1:2379 --run-id job1"),
    )
    close.set_defaults(func=_cmd_close)

    runs = commands.add_parser(
        "runs", parents=[logs, runs_of], formatter_class=raw,
        help="list the runs under a prefix: state, members, idle time, size",
        description=_wrap(
            "List every run under the prefix: its status and round, the members of "
            "that round, whether a node is live in it, seconds since a node last kept "
            "it alive, and the keys and bytes it takes in etcd."
        ),
        epilog=_example("rdzv runs --endpoint 127.0.0.1:2379",
                        "rdzv runs --endpoint 127.0.0.1:2379 --etcd-prefix /jobs --json"),
    )
    runs.set_defaults(func=_cmd_runs)

    purge = commands.add_parser(
        "purge", parents=[logs, runs_of], formatter_class=raw,
        help="remove a run, or every run idle for longer than a given time",
        description=_wrap(
            "Remove every key of a run and its leases (--run-id; a live run only with "
            "--force), or of every run that no node kept alive for longer than AGE "
            "(--idle-for; live runs are kept). Runs also go by themselves: see the "
            "closed_run_grace and run_idle_timeout options."
        ),
        epilog=_example("rdzv purge --endpoint 127.0.0.1:2379 --run-id job1",
                        "rdzv purge --endpoint 127.0.0.1:2379 --idle-for 2h --json"),
    )
    which = purge.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", type=_run_id, help="the run to remove")
    which.add_argument("--idle-for", type=_age, metavar="AGE",
                       help="remove every run idle for longer than AGE (90, 30m, 2h, 1d)")
    purge.add_argument("--force", action="store_true",
                       help="with --run-id: remove the run even if nodes are live in it")
    purge.set_defaults(func=_cmd_purge)

    demo = commands.add_parser(
        "demo", parents=[logs], formatter_class=raw,
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

    bench = commands.add_parser(
        "bench", parents=[logs], formatter_class=raw,
        help=f"run {_BENCHMARK.as_posix()} (arguments pass through)",
        description=_wrap(
            f"Run {_BENCHMARK.as_posix()} of a source checkout; every argument after "
            "'bench' that rdzv does not know goes to it (put them after '--' to be sure)."
        ),
        epilog=_example("rdzv bench", "rdzv bench -- --help"),
    )
    bench.set_defaults(func=_cmd_bench)

    # The demo's node processes; not listed in the help.
    node = commands.add_parser("demo-node", parents=[logs])
    node.add_argument("--endpoint", required=True)
    node.add_argument("--run-id", required=True)
    node.add_argument("--nnodes", required=True, type=_nnodes)
    node.set_defaults(func=_cmd_demo_node)
    return parser


# ----------------------------------------------------------------- helpers
def _exit_code(err: BaseException) -> ExitCode:
    if isinstance(err, UsageError):
        return ExitCode.USAGE
    if isinstance(err, (RendezvousTimeoutError, StoreTimeoutError)):
        return ExitCode.TIMEOUT
    if isinstance(err, RendezvousClosedError):
        return ExitCode.CLOSED
    if isinstance(err, RendezvousConnectionError):
        return ExitCode.CONNECTION
    if isinstance(err, RendezvousStateError):
        return ExitCode.STATE
    return ExitCode.FAILURE


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    """Turn the ``ValueError`` of a malformed option into a ``UsageError``."""
    try:
        yield
    except ValueError as err:
        raise UsageError(str(err)) from None


def _run_params(args: argparse.Namespace, min_nodes: int, max_nodes: int,
                **flags: Any) -> RendezvousParameters:
    """Rendezvous parameters from ``--endpoint``, ``--run-id``, ``--conf`` and ``flags``.

    Raises:
        UsageError: an option is given twice or is unknown.
    """
    config: dict[str, Any] = {}
    for key, value in args.conf:
        if key in config:
            raise UsageError(f"--conf {key}=... is given twice")
        config[key] = value
    flags["etcd_prefix"] = args.etcd_prefix
    for key, value in flags.items():
        if value is None:
            continue
        if key in config:
            raise UsageError(
                f"both --{key.replace('_', '-')} and --conf {key}=... are given; give one"
            )
        config[key] = value
    unknown = sorted(set(config) - set(RENDEZVOUS_OPTIONS))
    if unknown:
        raise UsageError(
            f"unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(RENDEZVOUS_OPTIONS))}"
        )
    # As create_rdzv_handler does, so that status reads with the same credentials.
    for env, name in (("RDZV_ETCD_USERNAME", "username"), ("RDZV_ETCD_PASSWORD", "password")):
        if name not in config and os.environ.get(env):
            config[name] = os.environ[env]
    with _usage_errors():
        return RendezvousParameters(
            BACKEND, args.endpoint, args.run_id, min_nodes, max_nodes,
            local_addr=getattr(args, "local_addr", None), **config,
        )


def _params_prefix(params: RendezvousParameters) -> str:
    """The parameters' ``etcd_prefix``, normalized; a malformed one is a usage error."""
    with _usage_errors():
        return normalize_prefix(params.get("etcd_prefix", DEFAULT_PREFIX))


def _connect(params: RendezvousParameters) -> EtcdClient:
    with _usage_errors():
        config = EtcdConfig.from_params(params)
        return EtcdClient(config)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
           right: Sequence[str] = ()) -> list[str]:
    """Lay out ``rows`` under ``headers``; columns named in ``right`` align right."""
    cells = [list(headers)] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            text.rjust(width) if header in right else text.ljust(width)
            for text, width, header in zip(row, widths, headers, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return lines


class _Progress:
    """One self-overwriting line on stderr, shown only when stderr is a terminal."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty()
        self._lock = threading.Lock()
        self._shown = False

    def show(self, text: str) -> None:
        """Replace the line with ``text``."""
        if not self.enabled:
            return
        with self._lock:
            self._stream.write("\r\x1b[K" + text)
            self._stream.flush()
            self._shown = True

    def clear(self) -> None:
        """Erase the line, so that what follows starts on a clean one."""
        with self._lock:
            if self._shown:
                self._stream.write("\r\x1b[K")
                self._stream.flush()
                self._shown = False


@contextlib.contextmanager
def _join_progress(params: RendezvousParameters, keys: RunKeys) -> Iterator[None]:
    """While a join waits, show on a terminal how far its round is.

    A thread with its own connection reads the state record and one count every
    ``_PROGRESS_INTERVAL_S``: nodes joined so far of those expected, and the
    seconds left before the join times out.
    """
    progress = _Progress()
    if not progress.enabled:
        yield
        return
    deadline = time.monotonic() + float(params.get("timeout", DEFAULT_TIMEOUT))
    stop = threading.Event()

    def show() -> None:
        try:
            client = EtcdClient(EtcdConfig.from_params(params))
        except (RendezvousError, ValueError) as err:
            logger.debug("no progress display: %s", err)
            return
        try:
            while not stop.is_set():
                try:
                    text = _describe_round(client, keys)
                except RendezvousError as err:
                    text = f"cannot read the run's state: {err}"
                left = max(0.0, deadline - time.monotonic())
                if not stop.is_set():
                    progress.show(f"{text}; {left:.0f} s left before timeout")
                stop.wait(_PROGRESS_INTERVAL_S)
        finally:
            client.close()

    thread = threading.Thread(target=show, name="rdzv-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        progress.clear()


def _describe_round(client: EtcdClient, keys: RunKeys) -> str:
    """One line on the run's current round, from the state record and one count."""
    got = client.get(keys.state)
    if got is None:
        return "opening the run"
    s = _state.decode_state(got[0], keys.state)
    if s.status == _state.Status.JOINABLE:
        joined = client.count(keys.members(s.round))
        expected = (str(s.max_nodes) if s.min_nodes == s.max_nodes
                    else f"{s.max_nodes} (min {s.min_nodes})")
        return f"round {s.round}: {joined}/{expected} nodes joined"
    if s.status == _state.Status.FROZEN:
        confirmed = client.count(keys.confirmed(s.round))
        return f"round {s.round}: world fixed, {confirmed}/{s.world_size} confirmed"
    if s.status == _state.Status.FINAL:
        waiting = client.count(keys.waiting(s.round))
        return (f"round {s.round} is complete ({s.world_size} nodes); {waiting} "
                f"waiting for round {s.round + 1}")
    return f"run is {_state.status_name(s.status)}"


# ------------------------------------------------------------------ server
def _cmd_server(args: argparse.Namespace) -> int:
    """Run a local etcd until SIGINT or SIGTERM."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        if args.cluster is not None:
            ports = None if args.port is None else [args.port + i for i in range(args.cluster)]
            group: EtcdServer | EtcdCluster = EtcdCluster(
                args.cluster, args.data_dir, client_ports=ports
            )
        else:
            group = EtcdServer(args.data_dir, client_port=args.port)
        group.start()
        try:
            print(f"endpoint: {group.get_endpoint()}", flush=True)
            print(f"etcd: {group.etcd_version} ({group.etcd_binary})", flush=True)
            logger.info("etcd data and log in %s", group.data_dir)
            while not stop.wait(0.5):
                if not _server_alive(group):
                    raise RuntimeError(
                        "etcd exited unexpectedly; run again with --data-dir to keep its log"
                    )
            logger.info("stopping etcd")
        finally:
            group.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return ExitCode.OK


def _server_alive(group: EtcdServer | EtcdCluster) -> bool:
    if isinstance(group, EtcdCluster):
        return any(member.is_running() for member in group.members)
    return group.pid is not None


# -------------------------------------------------------------------- join
def _cmd_join(args: argparse.Namespace) -> int:
    """Join a run as one node and print the round's result as one JSON line."""
    params = _run_params(
        args, *args.nnodes, timeout=args.timeout, last_call_timeout=args.last_call_timeout,
        topology=args.topology,
    )
    keys = RunKeys(_params_prefix(params), params.run_id)
    with _usage_errors():
        handler = create_rdzv_handler(params)
    try:
        with _join_progress(params, keys):
            info = handler.next_rendezvous()
        print(json.dumps({
            "rank": info.rank,
            "world_size": info.world_size,
            "round": handler.round,
            "master_addr": info.bootstrap_store_info.master_addr,
            "master_port": info.bootstrap_store_info.master_port,
            "run_id": handler.get_run_id(),
        }), flush=True)
    finally:
        handler.shutdown()
    return ExitCode.OK


# ------------------------------------------------------------------ status
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


# ------------------------------------------------------------------- close
def _cmd_close(args: argparse.Namespace) -> int:
    """Close a run."""
    params = _run_params(args, 1, 1)
    with _usage_errors():
        handler = create_rdzv_handler(params)
    try:
        was_closed = handler.is_closed()
        handler.set_closed()
    finally:
        handler.shutdown()
    print(f"run {params.run_id!r} {'was already closed' if was_closed else 'closed'}", flush=True)
    return ExitCode.OK


# ------------------------------------------------------------ runs, purge
def _connect_prefix(args: argparse.Namespace) -> tuple[EtcdClient, str]:
    """A client for ``--endpoint``/``--conf``, and the prefix, checked to hold runs.

    Raises:
        UsageError: an option is malformed, or a prefix given explicitly holds no run.
    """
    params = _run_params(argparse.Namespace(**{**vars(args), "run_id": "-"}), 1, 1)
    prefix = _params_prefix(params)
    client = _connect(params)
    if args.etcd_prefix is not None and not client.count(prefix.encode() + b"/"):
        client.close()
        raise UsageError(
            f"no rdzv run under --etcd-prefix {prefix or '/'!r} at {params.endpoint}; "
            f"check the prefix (the default is {DEFAULT_PREFIX})")
    return client, prefix


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KB" if n < 1024**2 else f"{n / 1024**2:.1f} MB"


def _run_rows(runs: list[dict[str, Any]]) -> list[str]:
    return _table(
        ("run", "status", "round", "members", "live", "last seen", "last change", "keys",
         "size"),
        [(r["run_id"], r["status"], r["round"], r["members"], "yes" if r["live"] else "no",
          None if r["idle_s"] is None else f"{r['idle_s']} s ago",
          f"rev {r['last_revision']}", r["keys"], _size(r["bytes"])) for r in runs],
        right=("round", "members", "last seen", "last change", "keys", "size"),
    )


def _cmd_runs(args: argparse.Namespace) -> int:
    """List the runs under a prefix."""
    client, prefix = _connect_prefix(args)
    try:
        runs = list_runs(client, prefix)
    finally:
        client.close()
    if args.json:
        print(json.dumps({"prefix": prefix or "/", "runs": runs}), flush=True)
    elif not runs:
        print(f"no runs under {prefix or '/'!r}", flush=True)
    else:
        print("\n".join(_run_rows(runs)), flush=True)
    return ExitCode.OK


def _cmd_purge(args: argparse.Namespace) -> int:
    """Remove a run, or every run idle for longer than a given time."""
    if args.force and args.run_id is None:
        raise UsageError("--force goes with --run-id; --idle-for never removes a live run")
    client, prefix = _connect_prefix(args)
    try:
        if args.run_id is not None:
            purged = [purge_run(client, args.run_id, prefix, force=args.force)]
        else:
            purged = purge_idle_runs(client, args.idle_for, prefix)
    finally:
        client.close()
    if args.json:
        print(json.dumps({"prefix": prefix or "/", "purged": purged}), flush=True)
    elif not purged:
        print(f"no run under {prefix or '/'!r} idle for longer than {args.idle_for:g} s",
              flush=True)
    else:
        print("purged:\n" + "\n".join(_run_rows(purged)), flush=True)
    return ExitCode.OK


# -------------------------------------------------------------------- demo
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


# ------------------------------------------------------------------- bench
def _find_benchmark() -> Path:
    """``benchmarks/join_latency.py`` of the current directory or of this checkout."""
    candidates = [Path.cwd() / _BENCHMARK, Path(__file__).resolve().parents[3] / _BENCHMARK]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UsageError(
        f"{_BENCHMARK.as_posix()} not found: 'rdzv bench' runs the benchmark of a source "
        "checkout; run it from the repository's root"
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    """Run the join-latency benchmark with the arguments rdzv did not consume."""
    script = _find_benchmark()
    # As `python benchmarks/join_latency.py ARGS` would: its argv, its directory first.
    sys.argv = [str(script), *args.passthrough]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")
    return ExitCode.OK


# -------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rdzv`` command with ``argv`` (default: ``sys.argv[1:]``); return its exit code."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command == "bench":
            args.passthrough = extra[1:] if extra[:1] == ["--"] else extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as done:  # --help, or a usage error already printed
        return done.code if isinstance(done.code, int) else ExitCode.USAGE
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"rdzv {args.command}: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as err:
        code = _exit_code(err)
        message = str(err) or type(err).__name__
        if code == ExitCode.USAGE:
            message = " ".join(message.split())
        elif code == ExitCode.FAILURE:
            logger.debug("rdzv %s failed", args.command, exc_info=True)
            message = f"{type(err).__name__}: {message}"
        print(f"rdzv {args.command}: error: {message}", file=sys.stderr, flush=True)
        return code
