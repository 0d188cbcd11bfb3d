"""``rdzv purge``: remove a run, or every run idle for longer than a given time."""

from __future__ import annotations

import argparse
import json

from rdzv.cli._common import (
    _RAW,
    ExitCode,
    UsageError,
    _age,
    _connect_prefix,
    _example,
    _log_options,
    _run_id,
    _run_rows,
    _runs_options,
    _wrap,
)
from rdzv.runs import purge_idle_runs, purge_run


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


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``rdzv purge`` to ``commands``."""
    purge = commands.add_parser(
        "purge", parents=[_log_options(), _runs_options()], formatter_class=_RAW,
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
