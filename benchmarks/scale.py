"""Rounds of thousands of nodes, against one etcd and a 3-member cluster, beside the floor.

N nodes spread over P node processes (each hosts N/P handlers on its one shared
connection; P fixed by ``--procs``, or growing with N by ``--per-proc``) are
released together into one round (``min_nodes = max_nodes = N``); the clock
runs from the release to the last node's return. Each N runs
against one etcd and against a local 3-member ``EtcdCluster`` (endpoint = the
member list), both started here, one after the other.

Per N and backend it reports the round time (median and min-max over the
repeats), the handler creation time, the client CPU (the node processes'
``getrusage``) and etcd's CPU (``process_cpu_seconds_total``, which etcd reads
from ``/proc``; a cluster's three members summed) per node-round, and from the
``/metrics`` of the member the clients talk to: writes (keys put + deleted),
range requests (Range RPCs + read-only Txns), watch events and bytes etcd sent,
per node.

The floor is the least any client can spend on N writes to the same etcd: N
concurrent puts and one watch that sees them all, over one asynchronous gRPC
channel (``grpc.aio``, which grpcio ships), timed from the first put to the
watch's N-th event. It runs just before and just after the rdzv rounds of each
N, on the same etcd; the ratio is rdzv's median over the faster floor.

The rounds reuse ``join_latency.py``'s harness (node hosting, release barrier,
metrics deltas, answer checks). Results go to ``benchmarks/RESULTS.md`` with
``--append`` (never overwritten), with the machine's load before and after.

Usage::

    python benchmarks/scale.py --nodes 1024,2048,4096 --procs 4 --append
    python benchmarks/scale.py --nodes 8192 --procs 8 --backends single --repeats 1
    python benchmarks/scale.py --nodes 1024,4096,16384 --per-proc 128 --backends single
    python benchmarks/scale.py --nodes 4096,16384 --backends single --switch-interval 0.05

``--switch-interval`` sets the interpreter's switch interval in the node
processes: thousands of node threads released together queue for the
interpreter's lock, each asking again every interval (``docs/SCALE.md``,
"Nodes that begin together: the herd").
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import itertools
import math
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
import join_latency as jl

from rdzv._etcd3_compat import load_etcd3
from rdzv.config import parse_endpoints
from rdzv.etcd_server import EtcdCluster, EtcdServer
from rdzv.txn import prefix_end

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
DEFAULT_NODES = (1024, 2048, 4096)
BACKENDS = ("single", "cluster")


# ----------------------------------------------------------------------------- floor
async def _floor_once(endpoint: str, nodes: int) -> float:
    """N concurrent puts and one watch of them, on one grpc.aio channel: seconds
    from the first put to the watch's N-th event."""
    rpc = load_etcd3().etcdrpc
    host, port = parse_endpoints(endpoint)[0]
    prefix = f"/bench/floor/{uuid.uuid4().hex[:12]}/".encode()
    async with grpc.aio.insecure_channel(
        f"{host}:{port}", options=[("grpc.max_receive_message_length", 64 * 2**20)]
    ) as channel:
        kv, watch = rpc.KVStub(channel), rpc.WatchStub(channel)
        done = asyncio.Event()

        async def watch_requests() -> Any:
            yield rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                key=prefix, range_end=prefix_end(prefix)))  # fmt: skip
            await done.wait()

        stream = watch.Watch(watch_requests())
        async for response in stream:
            if response.created:
                break
        seen = 0

        async def count() -> None:
            nonlocal seen
            async for response in stream:
                seen += len(response.events)
                if seen >= nodes:
                    return

        start = time.monotonic()
        puts = [kv.Put(rpc.PutRequest(key=prefix + b"%08d" % i, value=b"x"))
                for i in range(nodes)]  # fmt: skip
        await asyncio.gather(asyncio.gather(*puts), count())
        elapsed = time.monotonic() - start
        done.set()
        stream.cancel()
        await kv.DeleteRange(rpc.DeleteRangeRequest(key=prefix, range_end=prefix_end(prefix)))
    return elapsed


# A floor run that etcd turns away ("too many requests": its apply loop fell
# too far behind its log) is run again, at most this many times.
_FLOOR_REFUSALS = 3


def floor(endpoint: str, nodes: int, repeats: int = 3) -> list[float]:
    """The floor's time at N, ``repeats`` times (a run that etcd refuses as
    too many requests is run again: the floor is what etcd accepts)."""
    times = []
    refused = 0
    while len(times) < repeats:
        try:
            times.append(asyncio.run(_floor_once(endpoint, nodes)))
        except grpc.aio.AioRpcError as err:
            if "too many requests" not in (err.details() or "") or refused == _FLOOR_REFUSALS:
                raise
            refused += 1
            print(f"  floor N={nodes}: etcd refused a run ({err.details()}); again",
                  file=sys.stderr)
    return times


# ---------------------------------------------------------------------------- rounds
class _ClusterView:
    """What the harness needs of a cluster: its endpoint (every member) and the
    metrics of the member the clients talk to (gRPC picks the first address)."""

    def __init__(self, cluster: EtcdCluster) -> None:
        self.cluster = cluster

    def get_endpoint(self) -> str:
        return self.cluster.get_endpoint()

    def get_metrics_url(self) -> str:
        return self.cluster.members[0].get_metrics_url()


@dataclasses.dataclass
class Point(jl.Summary):
    """All rounds of one backend at one N, and the floor around them."""

    procs: int = 1
    floors: list[float] = dataclasses.field(default_factory=list)

    def per_node(self, field: str, cost: bool = True) -> float | None:
        values = [getattr(r.costs if cost else r, field) for r in self.rounds
                  if r.seconds is not None]  # fmt: skip
        values = [v for v in values if v is not None]
        return statistics.median(values) / self.nodes if values else None


def run_point(server: Any, backend: str, nodes: int, procs: int, repeats: int, limit: float,
              other_members: Sequence[str] = (),
              options: Sequence[tuple[str, str]] = (),
              switch_interval: float | None = None) -> Point:
    """Floor, ``repeats`` rdzv rounds of N nodes in ``procs`` processes, floor."""
    endpoint = server.get_endpoint()
    floors = floor(endpoint, nodes)
    harness = jl.Harness(server, procs, limit, rdzv_options=options,
                         other_members=other_members, switch_interval=switch_interval)
    rounds = []
    for _ in range(repeats):
        result = harness.run_round("rdzv", nodes)
        rounds.append(result)
        print(f"  {backend} N={nodes}: {result.seconds if result.seconds else result.problem}",
              file=sys.stderr, flush=True)
        if result.problem:
            break
    floors += floor(endpoint, nodes)
    return Point(backend, nodes, rounds, procs=procs, floors=floors)


# ----------------------------------------------------------------------------- table
def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(points: Sequence[Point]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| etcd | N | procs | round s, median | min-max | rounds | floor s (min) | ratio "
        "| create s | client CPU ms/node | etcd CPU ms/node | writes/node | range req/node "
        "| watch events/node | etcd bytes sent/node | load |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        times = p.times
        best_floor = min(p.floors) if p.floors else None
        if p.problem or not times:
            median, spread, ratio = f"**{(p.problem or 'no round').split(':')[0]}**", "-", "-"
        else:
            med = statistics.median(times)
            median = f"{med:.3f}"
            spread = f"{min(times):.3f}-{max(times):.3f}"
            ratio = f"{med / best_floor:.1f}x" if best_floor else "-"
        cpu = p.per_node("harness_cpu_s", cost=False)
        etcd_cpu = p.per_node("etcd_cpu_s")
        lines.append(
            f"| {p.backend} | {p.nodes} | {p.procs} | {median} | {spread} | {len(p.rounds)} "
            f"| {_fmt(best_floor, 3)} | {ratio} "
            f"| {_fmt(statistics.median(r.create_s for r in p.rounds))} "
            f"| {_fmt(None if cpu is None else cpu * 1e3)} "
            f"| {_fmt(None if etcd_cpu is None else etcd_cpu * 1e3)} "
            f"| {_fmt(p.per_node('writes'))} | {_fmt(p.per_node('reads'))} "
            f"| {_fmt(p.per_node('watch'))} | {_fmt(p.per_node('sent_bytes'), 0)} "
            f"| {statistics.median(r.load for r in p.rounds):.1f} |"
        )
    problems = [f"- {p.backend} at N={p.nodes}: {r.problem}" for p in points for r in p.rounds
                if r.problem]  # fmt: skip
    if problems:
        lines += ["", "Rounds that did not complete:", "", *problems]
    return "\n".join(lines) + "\n"


def fitted_slope(points: Sequence[tuple[int, float]]) -> float:
    """The least-squares slope of log(time) against log(N) over ``(N, time)``
    points (at least two, of two different N)."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread


def slopes(points: Sequence[Point]) -> list[str]:
    """Log-log slope of the median round time against N, per backend: between
    each N and the next, then fitted over every N (least squares) beside the
    floor's, fitted the same way over its fastest runs."""
    out = []
    for backend in dict.fromkeys(p.backend for p in points):
        done = sorted((p.nodes, statistics.median(p.times), min(p.floors, default=0.0))
                      for p in points
                      if p.backend == backend and p.times and not p.problem)  # fmt: skip
        for (n0, t0, _), (n1, t1, _) in itertools.pairwise(done):
            out.append(f"- {backend}: slope {math.log(t1 / t0) / math.log(n1 / n0):.2f} "
                       f"from N={n0} to N={n1}")  # fmt: skip
        if len(done) > 2:
            floors = [(n, f) for n, _, f in done if f > 0]
            floor_fit = (f"; the floor's {fitted_slope(floors):.2f}"
                         if len(floors) == len(done) else "")
            out.append(f"- {backend}: slope {fitted_slope([(n, t) for n, t, _ in done]):.2f} "
                       f"fitted over N={done[0][0]}..{done[-1][0]}{floor_fit}")
    return out


def _uptime() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=lambda t: [int(x) for x in t.split(",")],
                        default=list(DEFAULT_NODES), help="comma-separated N values")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--procs", type=int, default=4, help="node processes, at every N")
    group.add_argument("--per-proc", type=int, default=None, metavar="K",
                       help="handlers per node process: ceil(N/K) processes at each N "
                            "(instead of --procs)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per N and backend")
    parser.add_argument("--backends", type=lambda t: t.split(","), default=list(BACKENDS),
                        help="single, cluster or both")
    parser.add_argument("--limit", type=float, default=240.0,
                        help="seconds a round may take before it counts as timed out")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        type=lambda t: tuple(t.split("=", 1)),
                        help="a rendezvous option for every handler, e.g. lease_ttl=30")
    parser.add_argument("--switch-interval", type=float, default=None, metavar="S",
                        help="the interpreter's switch interval in the node processes "
                             "(sys.setswitchinterval; default: the interpreter's, 5 ms)")
    parser.add_argument("--append", action="store_true", help=f"append to {RESULTS}")
    args = parser.parse_args(argv)
    if args.switch_interval is not None and not args.switch_interval > 0:
        parser.error(f"--switch-interval must be a positive number of seconds, "
                     f"got {args.switch_interval}")
    for name in ("procs", "per_proc"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for backend in args.backends:
        if backend not in BACKENDS:
            parser.error(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = _uptime()
    wall = time.monotonic()
    points: list[Point] = []
    versions: list[str] = []
    for backend in args.backends:
        group = EtcdServer() if backend == "single" else EtcdCluster(size=3)
        with group:
            view = group if backend == "single" else _ClusterView(group)
            others = [] if backend == "single" else [
                m.get_metrics_url() for m in group.members[1:]]
            if not versions:
                versions = jl.environment(view, os.getloadavg())
            for nodes in args.nodes:
                procs = args.procs if args.per_proc is None else -(-nodes // args.per_proc)
                point = run_point(view, backend, nodes, procs, args.repeats, args.limit,
                                  others, args.option, args.switch_interval)
                points.append(point)
                print(table([point]), file=sys.stderr, flush=True)
    hosting = (f"N/{args.procs} handlers in each of {args.procs} processes"
               if args.per_proc is None else
               f"{args.per_proc} handlers per process (N/{args.per_proc} processes)")
    switching = ("the interpreter's (5 ms)" if args.switch_interval is None
                 else f"{args.switch_interval * 1000:g} ms")
    section = "\n".join([
        f"## Scale run of {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"`{' '.join(['python benchmarks/scale.py', *sys.argv[1:]])}`",
        "",
        *versions,
        f"- Load average (1, 5, 15 min) before: {load_before}; after: {_uptime()}; "
        f"whole run {(time.monotonic() - wall) / 60:.1f} min",
        f"- Nodes: {hosting}; single = one "
        "etcd, cluster = 3 members on this machine; floor = N concurrent puts and one "
        "watch on one grpc.aio channel, 3 runs before and 3 after the rounds (fastest shown)",
        f"- rdzv options: {', '.join(f'{k}={v}' for k, v in args.option) or 'defaults'}",
        f"- Switch interval of the node processes: {switching}",
        "",
        table(points),
        *slopes(points),
        "",
    ])
    print(section)
    if args.append:
        with open(RESULTS, "a") as f:
            f.write("\n" + section)
    return 0 if not any(p.problem for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
