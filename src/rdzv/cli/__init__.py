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

Each command is a module of this package (``server``, ``join``, ``status``,
``close``, ``runs``, ``purge``, ``demo``, ``bench``) with its ``add_parser``
and the function it runs; ``_common`` holds what they share: exit codes,
argument types, the options naming a run, connections and output.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rdzv.cli import bench, close, demo, join, purge, runs, server, status
from rdzv.cli._common import (
    _RAW,
    ExitCode,
    UsageError,
    _example,
    _exit_code,
    _log_options,
    _Parser,
    _wrap,
)
from rdzv.cli.status import render_run_status

__all__ = [
    "ExitCode",
    "UsageError",
    "build_parser",
    "main",
    "render_run_status",
]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``rdzv`` command and its subcommands."""
    parser = _Parser(
        prog="rdzv",
        description=_wrap("Fast etcd-v3 rendezvous for distributed training launchers."),
        formatter_class=_RAW,
        parents=[_log_options()],
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
    for command in (server, join, status, close, runs, purge, demo, bench):
        command.add_parser(commands)
    return parser


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
