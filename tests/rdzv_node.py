"""A rendezvous node in its own process, for tests that kill nodes for real.

Usage: python rdzv_node.py ENDPOINT RUN_ID MIN MAX [key=value ...]

Each line read from stdin is a command: ``join`` runs ``next_rendezvous()`` and
prints one JSON line (``{"rank", "world_size", "node_id"}`` or ``{"error"}``);
``waiting`` prints ``num_nodes_waiting()``; ``exit`` shuts down. The node id is
printed first, as ``{"node_id": ...}``.
"""

import json
import sys

from rdzv.api import RendezvousError, RendezvousParameters
from rdzv.etcd_rendezvous import create_rdzv_handler


def main() -> None:
    endpoint, run_id, min_nodes, max_nodes, *options = sys.argv[1:]
    config = dict(option.split("=", 1) for option in options)
    handler = create_rdzv_handler(
        RendezvousParameters("etcd", endpoint, run_id, int(min_nodes), int(max_nodes), **config)
    )
    print(json.dumps({"node_id": handler.node_id}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "join":
            try:
                info = handler.next_rendezvous()
                result = {
                    "rank": info.rank,
                    "world_size": info.world_size,
                    "round": handler.round,
                }
            except RendezvousError as err:
                result = {"error": type(err).__name__, "message": str(err)}
            print(json.dumps(result), flush=True)
        elif command == "waiting":
            print(json.dumps({"waiting": handler.num_nodes_waiting()}), flush=True)
        elif command == "exit":
            break
    handler.shutdown()


if __name__ == "__main__":
    main()
