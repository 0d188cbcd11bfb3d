"""``rdzv join``: join a run as one node and print the result as one JSON line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator

from rdzv.api import RendezvousError, RendezvousParameters
from rdzv.cli._common import (
    _PROGRESS_INTERVAL_S,
    _RAW,
    ExitCode,
    _example,
    _log_options,
    _nnodes,
    _params_prefix,
    _positive_seconds,
    _Progress,
    _run_options,
    _run_params,
    _usage_errors,
    _wrap,
)
from rdzv.client import EtcdClient
from rdzv.config import EtcdConfig
from rdzv.etcd_rendezvous import DEFAULT_TIMEOUT, create_rdzv_handler
from rdzv.inspect import RunState, read_round_progress

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _join_progress(params: RendezvousParameters, prefix: str) -> Iterator[None]:
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
                    text = _describe_round(client, params.run_id, prefix)
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


def _describe_round(client: EtcdClient, run_id: str, prefix: str) -> str:
    """One line on the run's current round, from the state record and one count."""
    p = read_round_progress(client, run_id, prefix)
    if p.state is RunState.NONE:
        return "opening the run"
    if p.state is RunState.JOINABLE:
        expected = (str(p.max_nodes) if p.min_nodes == p.max_nodes
                    else f"{p.max_nodes} (min {p.min_nodes})")
        return f"round {p.round}: {p.count}/{expected} nodes joined"
    if p.state is RunState.FROZEN:
        return f"round {p.round}: world fixed, {p.count}/{p.world_size} confirmed"
    if p.state is RunState.FINAL:
        return (f"round {p.round} is complete ({p.world_size} nodes); {p.count} "
                f"waiting for round {p.round + 1}")
    return f"run is {p.state.value}"


def _cmd_join(args: argparse.Namespace) -> int:
    """Join a run as one node and print the round's result as one JSON line."""
    params = _run_params(
        args, *args.nnodes, timeout=args.timeout, last_call_timeout=args.last_call_timeout,
        topology=args.topology,
    )
    prefix = _params_prefix(params)
    with _usage_errors():
        handler = create_rdzv_handler(params)
    try:
        with _join_progress(params, prefix):
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


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``rdzv join`` to ``commands``."""
    join = commands.add_parser(
        "join", parents=[_log_options(), _run_options()], formatter_class=_RAW,
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
