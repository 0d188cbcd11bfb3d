"""``rdzv runs``: list the runs under a prefix: state, members, idle time, size."""

from __future__ import annotations

import argparse
import json

from rdzv.cli._common import (
    _RAW,
    ExitCode,
    _connect_prefix,
    _example,
    _log_options,
    _run_rows,
    _runs_options,
    _wrap,
)
from rdzv.runs import list_runs


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


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``rdzv runs`` to ``commands``."""
    runs = commands.add_parser(
        "runs", parents=[_log_options(), _runs_options()], formatter_class=_RAW,
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
