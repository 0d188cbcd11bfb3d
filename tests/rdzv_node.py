"""A rendezvous node in its own process, for tests that kill nodes for real.

Usage: python rdzv_node.py ENDPOINT RUN_ID MIN MAX [key=value ...]

Each line read from stdin is a command: ``join`` runs ``next_rendezvous()`` and
prints one JSON line (``{"node_id", "rank", "world_size", "round",
"master_addr", "master_port"}`` or ``{"error", "message"}``); ``waiting`` prints
``num_nodes_waiting()``; ``news`` prints it with ``waiting_nodes()`` and
``lost_members()``; ``listen`` accepts TCP connections on the latest round's
``MASTER_PORT``, as rank 0's workers would; ``connect HOST PORT`` opens one TCP
connection; ``exit`` shuts down. The node id is printed first, as
``{"node_id": ...}``.
"""

import json
import socket
import sys
import threading

from rdzv.api import RendezvousError, RendezvousParameters
from rdzv.etcd_rendezvous import create_rdzv_handler


def _accept(server: socket.socket) -> None:
    while True:
        connection, _ = server.accept()
        connection.close()


def main() -> None:
    endpoint, run_id, min_nodes, max_nodes, *options = sys.argv[1:]
    config = dict(option.split("=", 1) for option in options)
    handler = create_rdzv_handler(
        RendezvousParameters("etcd", endpoint, run_id, int(min_nodes), int(max_nodes), **config)
    )
    print(json.dumps({"node_id": handler.node_id}), flush=True)
    master_port = 0
    for line in sys.stdin:
        command, *arguments = line.split() or [""]
        if command == "join":
            try:
                info = handler.next_rendezvous()
                master = info.bootstrap_store_info
                master_port = master.master_port
                result = {
                    "node_id": handler.node_id,
                    "rank": info.rank,
                    "world_size": info.world_size,
                    "round": handler.round,
                    "master_addr": master.master_addr,
                    "master_port": master.master_port,
                }
            except RendezvousError as err:
                result = {"error": type(err).__name__, "message": str(err)}
            print(json.dumps(result), flush=True)
        elif command == "listen":
            server = socket.create_server(("", master_port))
            threading.Thread(target=_accept, args=(server,), daemon=True).start()
            print(json.dumps({"listening": master_port}), flush=True)
        elif command == "connect":
            host, port = arguments
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
                result = {"connected": True}
            except OSError as err:
                result = {"error": type(err).__name__, "message": str(err)}
            print(json.dumps(result), flush=True)
        elif command == "waiting":
            print(json.dumps({"waiting": handler.num_nodes_waiting()}), flush=True)
        elif command == "news":
            print(json.dumps({
                "waiting": handler.num_nodes_waiting(),
                "waiting_nodes": handler.waiting_nodes(),
                "lost": handler.lost_members(),
                "node_id": handler.node_id,
            }), flush=True)
        elif command == "exit":
            break
    handler.shutdown()


if __name__ == "__main__":
    main()
