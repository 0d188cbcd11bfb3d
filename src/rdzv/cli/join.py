"""``rdzv join``: join a run as one node and print the result as one JSON line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator

from rdzv import _state
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
from rdzv.client import EtcdClient, EtcdConfig
from rdzv.etcd_rendezvous import DEFAULT_TIMEOUT, create_rdzv_handler
from rdzv.keys import RunKeys

logger = logging.getLogger(__name__)


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
