"""Micro-benchmark: the freezer's rank assignment at 10^3, 10^4 and 10^5 members.

``rdzv._state.assign_ranks`` decodes every member's descriptor, builds its
placement key (topology label, host in natural order, address, pid, node id)
and ranks the world, with no previous world (a fresh run) and with a previous
world holding half of the members (survivors keep their ranks, the others fill
the holes). Members are made in join order, as the freezer decodes them from
its range read; hosts join in a random order.

Beside it, in the same run:

- **torch c10d**: what torch's ``DynamicRendezvousHandler`` does when a round
  completes, ``sorted()`` of its participants' ``_NodeDesc`` (addr, pid,
  local id: Python comparisons of dataclasses), the descriptors built outside
  the clock;
- **floor**: ``list()`` of the members, one pass over them that any
  assignment must make.

Times are CPU seconds of this process (``time.process_time``), median and
range over the repeats, so that other processes on a shared machine inflate
them less than wall time would.

    python benchmarks/assign_ranks.py                # prints the table
    python benchmarks/assign_ranks.py --append       # also appends it to RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from join_latency import append_section

from rdzv import _state

SIZES = (1_000, 10_000, 100_000)
HOSTS_PER_RACK = 32
RACKS_PER_POD = 16


def members_in_join_order(n: int, rng: random.Random) -> list[tuple[str, bytes]]:
    """``n`` members as the freezer reads them: ``(node_id, descriptor)`` in join order."""
    order = list(range(n))
    rng.shuffle(order)
    joined = []
    for i in order:
        rack, slot = divmod(i, HOSTS_PER_RACK)
        host = f"gpu-r{rack}-n{slot}"
        addr = f"10.{rack // 256}.{rack % 256}.{slot + 1}"
        label = f"pod{rack // RACKS_PER_POD}/rack{rack}"
        node_id = f"{rng.getrandbits(63):016x}"
        joined.append((node_id, _state.encode_member(host, addr, 1000 + i, 29500, label)))
    return joined


def cpu_times(call: Callable[[], Any], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
    return times


def torch_descriptors(joined: Sequence[tuple[str, bytes]]) -> list[Any]:
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import _NodeDesc

    return [_NodeDesc(_state.decode_member(data)[0], 1, i) for i, (_, data) in enumerate(joined)]


def ms(times: Sequence[float]) -> str:
    return f"{statistics.median(times) * 1e3:.2f} ({min(times) * 1e3:.2f}-{max(times) * 1e3:.2f})"


def run(repeats: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    rows = []
    for n in SIZES:
        joined = members_in_join_order(n, rng)
        half = [node for node, _ in rng.sample(joined, n // 2)]
        fresh = cpu_times(lambda joined=joined, n=n: _state.assign_ranks(joined, [], n), repeats)
        kept = cpu_times(lambda joined=joined, n=n, half=half: _state.assign_ranks(
            joined, half, n), repeats)
        descriptors = torch_descriptors(joined)
        torch_sort = cpu_times(lambda d=descriptors: sorted(d), repeats)
        floor = cpu_times(lambda joined=joined: list(joined), repeats)
        rows.append(
            f"| {n:,} | {ms(fresh)} | {ms(kept)} | {ms(torch_sort)} | {ms(floor)} | "
            f"{statistics.median(torch_sort) / statistics.median(fresh):.1f}x |"
        )
    load = os.getloadavg()
    return [
        "| members | rdzv, fresh world | rdzv, previous world of N/2 | torch c10d `sorted()` "
        "| floor: `list()` | torch / rdzv fresh |",
        "|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"CPU ms per call, median (min-max) of {repeats}; load average after the run "
        f"{load[0]:.2f} (1 min), {load[1]:.2f} (5 min).",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="calls per case (default 15)")
    parser.add_argument("--seed", type=int, default=1, help="join order and ids (default 1)")
    parser.add_argument("--append", action="store_true",
                        help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    lines = run(args.repeats, args.seed)
    print("\n".join(lines))
    if args.append:
        append_section("`assign_ranks.py`: rank assignment", [
            f"{HOSTS_PER_RACK} hosts per rack, {RACKS_PER_POD} racks per pod, labels "
            "`pod<p>/rack<r>`, hosts `gpu-r<r>-n<i>`, joined in random order",
        ], lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
