"""Many short runs against one etcd: does the etcd stay as it was at the start?

Runs of a few nodes go through tens of rounds each (a 1 KB store key per round,
as a job's agents write), then end as jobs do: most are closed and shut down,
some are abandoned (shut down without closing, as when a job is killed). Runs
go ``--parallel`` at a time against one embedded etcd (``EtcdServer``, with its
periodic auto-compaction). Every so many runs the script records:

- the keys under the runs' prefix and in etcd (``etcd_debugging_mvcc_keys_total``),
- etcd's database size and the part of it in use, and its compact revision,
- etcd's request latency: a probe of ``--probes`` single-key reads and writes,
  and the median round time of the runs finished since the last sample.

At the end, once every run's leases expired (``--grace``, ``--idle``), it compacts
etcd to its current revision, then defragments it, and records the database
after each. Flat means: keys, database in use and latency at the end as at the
start, whatever the number of runs done.

Usage::

    python benchmarks/many_runs.py                       # 1000 runs of 3 nodes, 20 rounds
    python benchmarks/many_runs.py --runs 200 --rounds 10 --append
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from typing import Any

from rdzv import RendezvousParameters
from rdzv.etcd_rendezvous import create_rdzv_handler
from rdzv.etcd_server import EtcdServer

PREFIX = "/many"


def metrics(server: EtcdServer) -> dict[str, float]:
    """The unlabelled gauges and counters of etcd's /metrics."""
    text = urllib.request.urlopen(server.get_metrics_url() + "/metrics", timeout=10).read()
    values = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            values[name] = float(value)
    return values


def probe(client: Any, count: int) -> tuple[float, float]:
    """Median milliseconds of ``count`` single-key reads, and of as many writes."""
    reads, writes = [], []
    for i in range(count):
        start = time.perf_counter()
        client.get(b"/probe/key")
        reads.append(time.perf_counter() - start)
        start = time.perf_counter()
        client.put(b"/probe/key", b"%d" % i)
        writes.append(time.perf_counter() - start)
    return statistics.median(reads) * 1e3, statistics.median(writes) * 1e3


class Runs:
    """Runs one after another on ``parallel`` threads; records their round times."""

    def __init__(self, args: argparse.Namespace, endpoint: str) -> None:
        self.args = args
        self.endpoint = endpoint
        self.lock = threading.Lock()
        self.next_run = 0
        self.done = 0
        self.errors: list[str] = []
        self.round_times: list[tuple[int, float]] = []  # (run index, median round s)
        self.progress = threading.Condition(self.lock)

    def _take(self) -> int | None:
        with self.lock:
            if self.next_run >= self.args.runs:
                return None
            self.next_run += 1
            return self.next_run - 1

    def worker(self) -> None:
        while (index := self._take()) is not None:
            try:
                median = self.one_run(index)
            except Exception as err:  # recorded and shown; the benchmark goes on
                with self.lock:
                    self.errors.append(f"run {index}: {type(err).__name__}: {err}")
                median = None
            with self.progress:
                self.done += 1
                if median is not None:
                    self.round_times.append((index, median))
                self.progress.notify_all()

    def one_run(self, index: int) -> float:
        args = self.args
        run_id = f"run-{index}-{uuid.uuid4().hex[:8]}"
        params = RendezvousParameters(
            "etcd3", self.endpoint, run_id, args.nodes, args.nodes, etcd_prefix=PREFIX,
            timeout=120, last_call_timeout=30, closed_run_grace=args.grace,
            run_idle_timeout=args.idle,
        )
        handlers = [create_rdzv_handler(params) for _ in range(args.nodes)]
        times: list[list[float]] = [[] for _ in handlers]
        failures: list[BaseException] = []

        def node(i: int) -> None:
            try:
                for r in range(args.rounds):
                    start = time.perf_counter()
                    info = handlers[i].next_rendezvous()
                    times[i].append(time.perf_counter() - start)
                    if info.rank == 0:
                        info.store.set(f"payload/{r}", b"x" * 1024)
            except BaseException as err:
                failures.append(err)

        threads = [threading.Thread(target=node, args=(i,)) for i in range(args.nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            if failures:
                raise failures[0]
            # Most jobs end with a close; one in --abandon-every is killed instead.
            if index % args.abandon_every != 0:
                handlers[0].set_closed()
        finally:
            for h in handlers:
                h.shutdown()
        # The slowest node's time is the round's time.
        return statistics.median(max(per_round) for per_round in zip(*times, strict=True))


def sample(server: EtcdServer, client: Any, runs: Runs, since: int, probes: int
           ) -> dict[str, Any]:
    m = metrics(server)
    read_ms, write_ms = probe(client, probes)
    with runs.lock:
        recent = [t for i, t in runs.round_times if i >= since]
        done = runs.done
    return {
        "runs": done,
        "rdzv_keys": client.count(PREFIX.encode() + b"/"),
        "etcd_keys": int(m.get("etcd_debugging_mvcc_keys_total", 0)),
        "db": m.get("etcd_mvcc_db_total_size_in_bytes", 0),
        "in_use": m.get("etcd_mvcc_db_total_size_in_use_in_bytes", 0),
        "compacted": int(m.get("etcd_debugging_mvcc_compact_revision", 0)),
        "revision": int(m.get("etcd_debugging_mvcc_current_revision", 0)),
        "read_ms": read_ms,
        "write_ms": write_ms,
        "round_ms": statistics.median(recent) * 1e3 if recent else float("nan"),
        "round_ms_spread": (
            (min(recent) * 1e3, max(recent) * 1e3) if recent else (float("nan"),) * 2),
        "load": os.getloadavg()[0],
        "t": time.monotonic(),
    }


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def table(rows: list[dict[str, Any]], t0: float) -> list[str]:
    lines = [
        "| runs done | s | keys under prefix | keys in etcd | revision | compacted at | "
        "db MiB | in use MiB | read ms | write ms | round ms, median (min-max) | load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        low, high = r["round_ms_spread"]
        lines.append(
            f"| {r['runs']} | {r['t'] - t0:.0f} | {r['rdzv_keys']} | {r['etcd_keys']} | "
            f"{r['revision']} | {r['compacted']} | {mib(r['db'])} | {mib(r['in_use'])} | "
            f"{r['read_ms']:.2f} | {r['write_ms']:.2f} | "
            f"{r['round_ms']:.1f} ({low:.1f}-{high:.1f}) | {r['load']:.1f} |"
        )
    return lines


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs in all (default 1000)")
    parser.add_argument("--nodes", type=int, default=3, help="nodes per run (default 3)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per run (default 20)")
    parser.add_argument("--parallel", type=int, default=8,
                        help="runs at a time (default 8)")
    parser.add_argument("--samples", type=int, default=10, help="samples taken (default 10)")
    parser.add_argument("--probes", type=int, default=200,
                        help="reads and writes per latency probe (default 200)")
    parser.add_argument("--abandon-every", type=int, default=10,
                        help="one run in this many is abandoned, not closed (default 10)")
    parser.add_argument("--grace", type=int, default=5,
                        help="closed_run_grace of the runs, s (default 5)")
    parser.add_argument("--idle", type=int, default=10,
                        help="run_idle_timeout of the runs, s (default 10)")
    parser.add_argument("--retention", type=float, default=60,
                        help="etcd's compaction_retention, s (default 60)")
    parser.add_argument("--append", action="store_true",
                        help="append the results to benchmarks/RESULTS.md")
    args = parser.parse_args()

    started = datetime.datetime.now(datetime.timezone.utc)
    with EtcdServer(compaction_retention=args.retention) as server:
        client = server.get_rdzv_client()
        runs = Runs(args, server.get_endpoint())
        t0 = time.monotonic()
        rows = [sample(server, client, runs, 0, args.probes)]
        print("start:", table(rows, t0)[-1], flush=True)
        workers = [threading.Thread(target=runs.worker, daemon=True)
                   for _ in range(args.parallel)]
        for w in workers:
            w.start()
        step = max(args.runs // args.samples, 1)
        since = 0
        for target in range(step, args.runs + 1, step):
            with runs.progress:
                runs.progress.wait_for(lambda target=target: runs.done >= target)
            rows.append(sample(server, client, runs, since, args.probes))
            since = target
            print(table(rows, t0)[-1], flush=True)
        for w in workers:
            w.join()
        elapsed = time.monotonic() - t0
        # Every run's keys go with its leases: data after --grace, an abandoned
        # run's state record after --idle.
        deadline = time.monotonic() + args.idle + 60
        while client.count(PREFIX.encode() + b"/") and time.monotonic() < deadline:
            time.sleep(1)
        rows.append(sample(server, client, runs, args.runs, args.probes))
        after_expiry = rows[-1]
        revision = client.txn([], [("get", b"/probe/key")], [])[1]
        etcd3 = server.get_client()
        try:
            etcd3.compact(revision, physical=True)
            compacted = metrics(server)
            etcd3.defragment()
            defragmented = metrics(server)
        finally:
            etcd3.close()
        client.close()

    lines = [
        f"## `many_runs.py`: many short runs on one etcd, "
        f"{started:%Y-%m-%d %H:%M} UTC",
        "",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(shared), Python {platform.python_version()}, etcd {server.etcd_version}; "
        f"rdzv at commit {commit()}",
        f"- {args.runs} runs of {args.nodes} nodes (threads of one process), "
        f"{args.rounds} rounds each with a 1 KB store key per round, {args.parallel} runs at "
        f"a time; 1 in {args.abandon_every} abandoned, the others closed; "
        f"closed_run_grace {args.grace} s, run_idle_timeout {args.idle} s; etcd "
        f"compaction_retention {args.retention:g} s; {elapsed:.0f} s in all "
        f"({args.runs * args.rounds / elapsed:.0f} rounds/s); errors: {len(runs.errors)}",
        "",
        *table(rows, t0),
        "",
        "Last row: after every run's leases expired. Then, compacted to the current "
        f"revision: db {mib(compacted['etcd_mvcc_db_total_size_in_bytes'])} MiB, "
        f"{mib(compacted['etcd_mvcc_db_total_size_in_use_in_bytes'])} MiB in use; "
        f"defragmented: db {mib(defragmented['etcd_mvcc_db_total_size_in_bytes'])} MiB. "
        f"Keys under the prefix at the end: {after_expiry['rdzv_keys']}.",
        "Read/write ms: median of a probe of single-key requests; round ms: median over the "
        "runs finished since the previous row of each run's median round (slowest node).",
    ]
    for error in runs.errors[:5]:
        lines.append(f"- error: {error}")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.append:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        with open(path, "a", encoding="utf-8") as results:
            results.write("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
