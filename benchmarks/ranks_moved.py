"""Ranks moved and topology groups split over an elastic sequence, per backend.

64 hosts ``127.0.0.1`` ... ``127.0.0.64`` in 8 racks of 8 (``.1``-``.8`` in
``pod1/rack1``, ..., ``.57``-``.64`` in ``pod2/rack8``), each one node whose
``local_addr`` is its address (loopback addresses, because torch's ``c10d``
rank 0 binds the address it advertises). Four rounds:

1. all 64 hosts;
2. 4 hosts lost, one in each of racks 1, 3, 5 and 7 (60 hosts);
3. the same 4 hosts back (64);
4. rack 2 lost (56).

After each change it counts **survivors moved** (hosts in both rounds whose rank
changed) and **racks split** (racks whose hosts do not hold one contiguous range
of ranks). Every backend's ranks are observed through its own handlers:

- ``rdzv`` (``rank_order=stable``, the default) and ``rdzv topology``
  (``rank_order=topology``): one run; the survivors' handlers call
  ``next_rendezvous()`` again, the lost ones shut down, the returning hosts get
  new handlers. Labels are given with the ``topology`` option.
- torch ``c10d`` and torch ``etcd``: torch's handlers keep no memory of earlier
  ranks (``c10d`` sorts its participants by (address, pid, local id) at every
  completion; ``etcd`` numbers nodes in join order), so each of their rounds
  is a fresh run of that round's hosts, with ``min_nodes = max_nodes`` = its size.
  They take no topology labels.

    python benchmarks/ranks_moved.py                 # prints the table
    python benchmarks/ranks_moved.py --append        # also appends it to RESULTS.md
"""

from __future__ import annotations

import argparse
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from join_latency import _prepare_process, append_section

from rdzv import RendezvousParameters, create_rdzv_handler
from rdzv.etcd_server import EtcdServer

HOSTS = [f"127.0.0.{i}" for i in range(1, 65)]
LABELS = {host: f"pod{1 + i // 32}/rack{1 + i // 8}" for i, host in enumerate(HOSTS)}
LOST_FOUR = ["127.0.0.3", "127.0.0.20", "127.0.0.37", "127.0.0.50"]
RACK_TWO = [host for host in HOSTS if LABELS[host].endswith("/rack2")]
ROUNDS = [
    ("64 hosts", HOSTS),
    ("lose 4 (one in racks 1, 3, 5, 7)", [h for h in HOSTS if h not in LOST_FOUR]),
    ("add the 4 back", HOSTS),
    ("lose rack 2", [h for h in HOSTS if h not in RACK_TWO]),
]
BACKENDS = ("rdzv", "rdzv topology", "c10d", "etcd")
LIMIT_S = 120


def ranks_of(handlers: dict[str, Any]) -> dict[str, int]:
    """Call ``next_rendezvous()`` on every handler at once; each host's rank."""
    results: dict[str, Any] = {}

    def call(host: str, handler: Any) -> None:
        try:
            results[host] = handler.next_rendezvous()
        except Exception as err:  # reported below, with the others'
            results[host] = err

    threads = [threading.Thread(target=call, args=item, daemon=True) for item in handlers.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LIMIT_S)
    errors = {h: r for h, r in results.items() if isinstance(r, BaseException)}
    if errors or len(results) != len(handlers):
        first = next(iter(errors.items()), None)
        raise RuntimeError(
            f"round failed: {len(results)}/{len(handlers)} returned, {len(errors)} errors "
            f"(first: {first})")
    sizes = {info.world_size for info in results.values()}
    if sizes != {len(handlers)}:
        raise RuntimeError(f"world sizes {sizes}, expected {len(handlers)}")
    return {host: info.rank for host, info in results.items()}


def rdzv_rounds(endpoint: str, rank_order: str) -> list[dict[str, int]]:
    run_id = f"moved-{uuid.uuid4().hex[:8]}"
    handlers: dict[str, Any] = {}

    def handler(host: str) -> Any:
        return create_rdzv_handler(RendezvousParameters(
            "etcd3", endpoint, run_id, 1, len(HOSTS), host, timeout=LIMIT_S,
            last_call_timeout=3, topology=LABELS[host], rank_order=rank_order))

    worlds = []
    try:
        for _, hosts in ROUNDS:
            for host in [h for h in handlers if h not in hosts]:
                handlers.pop(host).shutdown()
            for host in [h for h in hosts if h not in handlers]:
                handlers[host] = handler(host)
            worlds.append(ranks_of(handlers))
    finally:
        for h in handlers.values():
            h.shutdown()
    return worlds


def torch_rounds(backend: str, endpoint: str) -> list[dict[str, int]]:
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import RendezvousParameters as TorchParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    worlds = []
    for _, hosts in ROUNDS:
        run_id = f"moved-{uuid.uuid4().hex[:8]}"
        store = None
        where = endpoint
        options: dict[str, Any] = {"timeout": LIMIT_S, "last_call_timeout": 3}
        if backend == "c10d":
            store = TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True,
                             wait_for_workers=False)  # fmt: skip
            where = f"127.0.0.1:{store.port}"
            options = {"join_timeout": LIMIT_S, "read_timeout": LIMIT_S, "is_host": False,
                       "last_call_timeout": 3}
        handlers = {
            host: get_rendezvous_handler(TorchParameters(
                backend, where, run_id, len(hosts), len(hosts), local_addr=host, **options))
            for host in hosts
        }
        try:
            worlds.append(ranks_of(handlers))
        finally:
            for h in handlers.values():
                h.shutdown()
        del store
    return worlds


def racks_split(ranks: dict[str, int]) -> int:
    split = 0
    for rack in set(LABELS.values()):
        held = sorted(rank for host, rank in ranks.items() if LABELS[host] == rack)
        if held and held[-1] - held[0] + 1 != len(held):
            split += 1
    return split


def moved(before: dict[str, int], after: dict[str, int]) -> int:
    return sum(1 for host, rank in after.items() if host in before and before[host] != rank)


def table(worlds: dict[str, list[dict[str, int]]]) -> list[str]:
    lines = [
        "| change | " + " | ".join(worlds) + " |",
        "|---|" + "---:|" * len(worlds),
    ]
    for i, (what, hosts) in enumerate(ROUNDS):
        cells = []
        for rounds in worlds.values():
            split = racks_split(rounds[i])
            cells.append(f"{split} split" if i == 0 else
                         f"{moved(rounds[i - 1], rounds[i])} moved, {split} split")
        lines.append(f"| {what} ({len(hosts)}) | " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help=f"comma-separated, of {', '.join(BACKENDS)} (default: all)")
    parser.add_argument("--append", action="store_true",
                        help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(sorted(unknown))}")
    _prepare_process(verbose=False)
    worlds: dict[str, list[dict[str, int]]] = {}
    with EtcdServer(enable_v2=True) as server:
        endpoint = server.get_endpoint()
        runs: dict[str, Callable[[], list[dict[str, int]]]] = {
            "rdzv": lambda: rdzv_rounds(endpoint, "stable"),
            "rdzv topology": lambda: rdzv_rounds(endpoint, "topology"),
            "c10d": lambda: torch_rounds("c10d", endpoint),
            "etcd": lambda: torch_rounds("etcd", endpoint),
        }
        for backend in backends:
            worlds[backend] = runs[backend]()
    lines = table(worlds)
    print("\n".join(lines))
    if args.append:
        append_section("`ranks_moved.py`: ranks moved and racks split", [
            "64 hosts `127.0.0.1`-`127.0.0.64`, racks of 8 (`pod1/rack1` ... `pod2/rack8`); "
            "torch `etcd` numbers nodes in join order, so its figures change from run to run",
        ], lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
