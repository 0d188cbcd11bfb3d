"""``rdzv server``: a local etcd (one member, or a cluster) until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from rdzv.cli._common import _RAW, ExitCode, _at_least, _example, _log_options, _port, _wrap
from rdzv.etcd_server import EtcdCluster, EtcdServer

logger = logging.getLogger(__name__)


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


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``rdzv server`` to ``commands``."""
    server = commands.add_parser(
        "server", parents=[_log_options()], formatter_class=_RAW,
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
