"""``rdzv close``: close a run, so that every current and future join fails."""

from __future__ import annotations

import argparse

from rdzv.cli._common import (
    _RAW,
    ExitCode,
    _example,
    _log_options,
    _run_options,
    _run_params,
    _usage_errors,
    _wrap,
)
from rdzv.etcd_rendezvous import create_rdzv_handler


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


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``rdzv close`` to ``commands``."""
    close = commands.add_parser(
        "close", parents=[_log_options(), _run_options()], formatter_class=_RAW,
        help="close a run: every current and future join fails",
        description=_wrap(
            "Close a run (set_closed): waiting nodes and later joins fail with "
            "RendezvousClosedError. Closing is terminal; a closed run stays closed."
        ),
        epilog=_example("rdzv close --endpoint 127.0.0.1:2379 --run-id job1"),
    )
    close.set_defaults(func=_cmd_close)
