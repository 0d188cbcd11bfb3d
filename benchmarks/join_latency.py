"""Join latency of one full rendezvous round: rdzv against torch's backends, on one etcd.

One round = N nodes call ``next_rendezvous()`` at once with ``min_nodes = max_nodes
= N``; the clock runs from their release to the last node's return. Every backend
runs in the same process tree, on the same machine and the same etcd (one
``EtcdServer(enable_v2=True)`` started here), one after the other:

``raw``
    the anchor: N nodes each put one key (one etcd client each), nothing else.
``rdzv``
    ``rdzv.create_rdzv_handler`` (etcd v3).
``etcd``
    torch's ``etcd`` backend (one JSON blob under CAS, etcd v2 API, python-etcd).
``etcd-v2``
    torch's ``DynamicRendezvousHandler`` on ``EtcdRendezvousBackend`` (etcd v2 API).
``c10d``
    torch's ``DynamicRendezvousHandler`` on a ``TCPStore`` (not etcd), started
    here for each repeat.

Handlers (and the raw clients) are created and their threads started before the
clock; creation time is reported apart. Ranks are checked after every round: a
backend that hands out anything but ``0..N-1`` with one world size is reported
as wrong, never timed. What each round costs etcd comes from the deltas of
etcd's ``/metrics`` around the round (see ``benchmarks/README.md`` for the exact
formulas), plus a few client-side counts where etcd has no metric.

Every run is appended to ``benchmarks/RESULTS.md`` (its date, machine and
versions first) and plotted to a file of its own beside it; earlier runs are
never replaced. ``--plot-runs`` draws one plot from runs already recorded there.

Usage::

    python benchmarks/join_latency.py                       # N = 8, 64, 256
    python benchmarks/join_latency.py --backends rdzv,raw --nodes 1024
    python benchmarks/join_latency.py --procs 4             # nodes in 4 processes
    python benchmarks/join_latency.py --plot-runs "2026-11-25 07:20" "2026-11-25 07:29"
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import importlib.metadata
import logging
import multiprocessing
import os
import platform
import queue
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

logger = logging.getLogger("join_latency")

BACKENDS = ("raw", "rdzv", "etcd", "etcd-v2", "c10d")
DEFAULT_NODES = (8, 64, 256)
DEFAULT_LIMIT_S = 120.0
# Extra seconds a host waits for its nodes past the limit (every backend is given
# the limit as its own timeout, so a node that does not finish raises by itself).
_GRACE_S = 10.0
# Handlers are created and shut down this many at a time.
_SETUP_WIDTH = 32
_PHASES = ("created", "go", "finished", "close")
_LAST_CALL_S = 30


# ------------------------------------------------------------------ client-side counts
_COUNTS: collections.Counter[str] = collections.Counter()
_COUNTS_LOCK = threading.Lock()


def _count(kind: str) -> None:
    with _COUNTS_LOCK:
        _COUNTS[kind] += 1


def _counts() -> collections.Counter[str]:
    with _COUNTS_LOCK:
        return collections.Counter(_COUNTS)


def _counting(kind_of: Callable[..., str], method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _count(kind_of(*args, **kwargs))
        return method(*args, **kwargs)

    return wrapper


def _v2_request_kind(_client: Any, _path: str, method: str, params: Any = None, **_: Any) -> str:
    if method != "GET":
        return "v2_write"
    wait = (params or {}).get("wait")
    return "v2_watch" if wait in (True, "true") else "v2_read"


@functools.cache
def _prepare_process(verbose: bool) -> None:
    """Import every backend and count what etcd's metrics cannot (once per process).

    Unless ``verbose``, torch's ``etcd`` backend logs warnings only: it sets its
    logger to INFO with its own handler, and N nodes in one process would write
    O(N^2) "CAS unsuccessful, retrying" lines to one stderr during the round.

    Imports happen here, before nodes are created from many threads at once:
    ``rdzv._etcd3_compat.load_etcd3()`` can hand a thread a partially imported
    ``etcd3`` while another thread is still importing it (seen as
    ``AttributeError: partially initialized module 'etcd3' has no attribute
    'etcdrpc'`` from ``create_rdzv_handler``), so it is called once up front.

    Counted client-side: python-etcd's HTTP requests (the v2 API), because etcd's
    v2 read counter also counts its own internal reads; and the dynamic handler's
    ``get_state``/``set_state`` calls on the c10d backend, whose TCPStore exports
    no metrics.
    """
    import torch.distributed.elastic.rendezvous.registry  # noqa: F401
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend,
    )

    import rdzv  # noqa: F401
    from rdzv._etcd3_compat import load_etcd3

    load_etcd3()
    threading.excepthook = _thread_excepthook
    if not verbose:
        logging.getLogger("torch.distributed.elastic.rendezvous.etcd_rendezvous").setLevel(
            logging.WARNING
        )
    try:
        import etcd
    except ImportError:
        pass
    else:
        etcd.Client.api_execute = _counting(_v2_request_kind, etcd.Client.api_execute)
    backend = C10dRendezvousBackend
    backend.get_state = _counting(lambda *_a, **_k: "state_get", backend.get_state)
    backend.set_state = _counting(lambda *_a, **_k: "state_set", backend.set_state)


_DEAD_LEASE_THREADS = 0


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    """One line, not N tracebacks, for torch's ``etcd`` backend's lease threads.

    That backend refreshes its run directory's TTL from a thread whose first
    refresh fails on etcd 3.5's v2 API ("Raft Internal Error ... Not a file"), so
    the thread ends; the directory's 2-hour TTL outlives any round here.
    """
    global _DEAD_LEASE_THREADS
    if args.thread is not None and "lease_worker" in args.thread.name:
        _DEAD_LEASE_THREADS += 1
        if _DEAD_LEASE_THREADS == 1:
            logger.warning(
                "torch etcd backend: a lease-renewal thread died (%s: %s); not shown again",
                args.exc_type.__name__,
                str(args.exc_value).strip()[:120],
            )
        return
    threading.__excepthook__(args)


# ------------------------------------------------------------------------- nodes
@dataclasses.dataclass(frozen=True)
class RoundSpec:
    """One round: which backend, where, how many nodes, and how long it may take."""

    backend: str
    endpoint: str
    run_id: str
    nodes: int
    limit_s: float
    verbose: bool = False
    rdzv_options: tuple[tuple[str, str], ...] = ()
    #: The interpreter's switch interval in the processes that host nodes
    #: (``sys.setswitchinterval``); None keeps the interpreter's (5 ms).
    switch_interval: float | None = None


class Node(Protocol):
    """One rendezvous participant; ``join`` returns ``(rank, world_size)``."""

    def join(self) -> tuple[int, int]: ...

    def close(self) -> None: ...


class RawPutNode:
    """The anchor: one etcd client that puts one key."""

    def __init__(self, spec: RoundSpec, index: int) -> None:
        from rdzv.client import EtcdClient, EtcdConfig, parse_endpoints

        self._client = EtcdClient(EtcdConfig(endpoints=tuple(parse_endpoints(spec.endpoint))))
        self._key = f"/bench/raw/{spec.run_id}/{index:06d}".encode()
        self._index = index
        self._nodes = spec.nodes

    def join(self) -> tuple[int, int]:
        self._client.put(self._key, b"x")
        return self._index, self._nodes

    def close(self) -> None:
        self._client.close()


class HandlerNode:
    """A rendezvous handler of any backend, rdzv's or torch's."""

    def __init__(self, handler: Any) -> None:
        self._handler = handler

    def join(self) -> tuple[int, int]:
        info = self._handler.next_rendezvous()
        return info.rank, info.world_size

    def close(self) -> None:
        try:
            self._handler.shutdown()
        finally:
            # torch's etcd backend renews its TTL keys from threads that stop only
            # when the handler is garbage collected; stop them now so that they
            # write nothing during the next round.
            impl = getattr(self._handler, "_rdzv_impl", None)
            for name in ("_lease_run_id_stop", "_lease_this_rank_stop"):
                stop = getattr(impl, name, None)
                if stop is not None:
                    stop.set()


def _make_node(spec: RoundSpec, index: int) -> Node:
    if spec.backend == "raw":
        return RawPutNode(spec, index)
    if spec.backend == "rdzv":
        import rdzv

        params = rdzv.RendezvousParameters(
            "etcd", spec.endpoint, spec.run_id, spec.nodes, spec.nodes,
            timeout=spec.limit_s, last_call_timeout=_LAST_CALL_S, **dict(spec.rdzv_options),
        )  # fmt: skip
        return HandlerNode(rdzv.create_rdzv_handler(params))
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    limit = int(spec.limit_s)
    options: dict[str, Any] = {
        "etcd": {"timeout": limit, "last_call_timeout": _LAST_CALL_S},
        "etcd-v2": {"join_timeout": limit, "last_call_timeout": _LAST_CALL_S},
        "c10d": {
            "join_timeout": limit,
            "last_call_timeout": _LAST_CALL_S,
            "read_timeout": limit,
            "is_host": False,  # the store was started by the harness
        },
    }[spec.backend]
    params = RendezvousParameters(
        spec.backend, spec.endpoint, spec.run_id, spec.nodes, spec.nodes, **options
    )
    return HandlerNode(get_rendezvous_handler(params))


def _parallel(calls: Sequence[Callable[[], Any]], timeout: float) -> list[Any]:
    """Run ``calls`` ``_SETUP_WIDTH`` at a time; each result, or the exception it raised.

    Daemon threads: a call stuck past ``timeout`` (e.g. ``shutdown()`` of a hung
    handler) is reported as ``TimeoutError`` and left behind.
    """
    results: list[Any] = [TimeoutError(f"did not return within {timeout:g} s")] * len(calls)
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(calls)):
        todo.put(i)

    def work() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = calls[i]()
            except BaseException as err:
                results[i] = err

    threads = [
        threading.Thread(target=work, daemon=True) for _ in range(min(_SETUP_WIDTH, len(calls)))
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return results


# ------------------------------------------------------------------ hosting nodes
@dataclasses.dataclass
class HostReport:
    """What one host (the process itself, or one worker process) saw of a round."""

    nodes: int = 0
    create_s: float = 0.0
    release: float = 0.0
    ends: list[float] = dataclasses.field(default_factory=list)
    answers: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    hung: int = 0
    stuck_in: dict[str, int] = dataclasses.field(default_factory=dict)
    cpu_s: float = 0.0
    counts: dict[str, int] = dataclasses.field(default_factory=dict)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _host_nodes(spec: RoundSpec, indices: Sequence[int], sync: Callable[[str], None]) -> HostReport:
    """Create this host's nodes, run them through one round, and close them,
    under ``spec.switch_interval`` if given (the process's own after).

    ``sync(phase)`` is called at each of ``_PHASES``; it returns when the round
    may go on (every host reached the phase, and the harness read etcd's metrics).
    """
    _prepare_process(spec.verbose)
    interval = sys.getswitchinterval()
    if spec.switch_interval is not None:
        sys.setswitchinterval(spec.switch_interval)
    try:
        return _run_nodes(spec, indices, sync)
    finally:
        sys.setswitchinterval(interval)


def _run_nodes(spec: RoundSpec, indices: Sequence[int], sync: Callable[[str], None]) -> HostReport:
    """``_host_nodes``' round, once the process is prepared."""
    report = HostReport()
    start = time.monotonic()
    made = _parallel([functools.partial(_make_node, spec, i) for i in indices], spec.limit_s)
    report.create_s = time.monotonic() - start
    nodes = [node for node in made if not isinstance(node, BaseException)]
    report.errors += [f"create: {err!r}" for err in made if isinstance(err, BaseException)]
    report.nodes = len(nodes)
    outcomes: list[Any] = [None] * len(nodes)
    gate = threading.Barrier(len(nodes) + 1)

    def run(i: int) -> None:
        gate.wait()
        try:
            rank, world_size = nodes[i].join()
            outcomes[i] = (time.monotonic(), rank, world_size)
        except BaseException as err:
            outcomes[i] = err

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(nodes))]
    for thread in threads:
        thread.start()
    counts_before = _counts()
    sync("created")
    sync("go")
    cpu_before = _cpu_seconds()
    report.release = time.monotonic()
    gate.wait()
    deadline = report.release + spec.limit_s + _GRACE_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    report.cpu_s = _cpu_seconds() - cpu_before
    report.counts = dict(_counts() - counts_before)
    # One snapshot: a node still running now counts as hung even if it ends later.
    alive = [thread.is_alive() for thread in threads]
    report.stuck_in = _where_stuck(
        [t for t, running in zip(threads, alive, strict=True) if running]
    )
    for outcome, running in zip(list(outcomes), alive, strict=True):
        if running or outcome is None:
            report.hung += 1
        elif isinstance(outcome, BaseException):
            report.errors.append(f"{type(outcome).__name__}: {outcome}")
        else:
            report.ends.append(outcome[0])
            report.answers.append((outcome[1], outcome[2]))
    sync("finished")
    sync("close")
    closed = _parallel([node.close for node in nodes], 60.0)
    failed = [err for err in closed if isinstance(err, BaseException)]
    if failed:
        logger.warning(
            "%d of %d nodes failed to close, e.g. %r", len(failed), len(nodes), failed[0]
        )
    return report


def _where_stuck(threads: Sequence[threading.Thread]) -> dict[str, int]:
    """Where hung node threads are: outermost > innermost frame in the backends' code."""
    frames = sys._current_frames()
    places: collections.Counter[str] = collections.Counter()
    for thread in threads:
        frame = frames.get(thread.ident or -1)
        chain = []  # innermost first
        while frame is not None:
            path = frame.f_code.co_filename.replace(os.sep, "/")
            package = next((p for p in ("/rdzv/", "/torch/", "/etcd/") if p in path), None)
            if package:
                short = path[path.rindex(package) + 1 :]
                chain.append(f"{short}:{frame.f_lineno} {frame.f_code.co_name}")
            frame = frame.f_back
        places[" > ".join(dict.fromkeys([chain[-1], chain[0]])) if chain else "unknown"] += 1
    return dict(places)


def _worker_main(spec: RoundSpec, indices: Sequence[int], barrier: Any, out: Any) -> None:
    """Entry point of a worker process in ``--procs`` mode."""
    logging.basicConfig(level=logging.WARNING, format="%(processName)s %(message)s")
    wait = functools.partial(barrier.wait, spec.limit_s + 120.0)
    report = _host_nodes(spec, indices, lambda _phase: wait())
    out.put(report)
    out.close()
    out.join_thread()
    # Nodes that hung still hold threads and gRPC channels; do not wait for them.
    os._exit(0)


# --------------------------------------------------------------------- etcd metrics
_SERIES = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Metrics:
    """One scrape of etcd's Prometheus metrics: ``(name, labels) -> value``."""

    def __init__(self, series: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> None:
        self.series = series

    @classmethod
    def scrape(cls, url: str, timeout: float = 30.0) -> Metrics:
        with urllib.request.urlopen(url + "/metrics", timeout=timeout) as response:
            text = response.read().decode()
        series = {}
        for line in text.splitlines():
            match = _SERIES.match(line)
            if match and not line.startswith("#"):
                labels = frozenset(_LABEL.findall(match.group(2) or ""))
                series[(match.group(1), labels)] = float(match.group(3))
        return cls(series)

    def __sub__(self, before: Metrics) -> Metrics:
        return Metrics(
            {key: value - before.series.get(key, 0.0) for key, value in self.series.items()}
        )

    def sum(
        self, name: str, exclude: dict[str, Sequence[str]] | None = None, **labels: str
    ) -> float:
        """Sum the series ``name`` whose labels match ``labels`` and avoid ``exclude``."""
        total = 0.0
        for (series_name, series_labels), value in self.series.items():
            if series_name != name:
                continue
            found = dict(series_labels)
            if all(found.get(k) == v for k, v in labels.items()) and not any(
                found.get(k) in values for k, values in (exclude or {}).items()
            ):
                total += value
        return total


@dataclasses.dataclass
class Costs:
    """What one round cost, in requests, summed over its nodes (None: not measured)."""

    writes: float | None = None
    reads: float | None = None
    range_ops: float | None = None
    watch: float | None = None
    proposals: float | None = None
    etcd_cpu_s: float | None = None
    sent_bytes: float | None = None


def _costs(backend: str, delta: Metrics, counts: collections.Counter[str]) -> Costs:
    """Turn metric deltas and client-side counts into the table's columns.

    v3 (raw, rdzv): writes = keys put + deleted; reads = Range RPCs + read-only Txn
    RPCs (Txn RPCs that were not applied through raft); range ops = etcd's range
    counter (every Txn compare counts as one); watch = events sent to watchers.
    v2 (etcd, etcd-v2): writes = v2 writes applied with success; reads = GETs the
    clients sent (client-side); watch = v2 watch requests (a long poll returns one
    event and is sent again). c10d: writes and reads = the dynamic handler's
    ``set_state`` (a TCPStore compare_set) and ``get_state`` calls, client-side.
    """
    if backend == "c10d":
        return Costs(writes=counts["state_set"], reads=counts["state_get"])
    costs = Costs(
        proposals=delta.sum("etcd_server_proposals_committed_total"),
        etcd_cpu_s=delta.sum("process_cpu_seconds_total"),
    )
    if backend in ("raw", "rdzv"):
        applied_txns = delta.sum("etcd_server_apply_duration_seconds_count", op="Txn", version="v3")
        costs.writes = delta.sum("etcd_mvcc_put_total") + delta.sum("etcd_mvcc_delete_total")
        costs.reads = (
            delta.sum("grpc_server_handled_total", grpc_method="Range")
            + delta.sum("grpc_server_handled_total", grpc_method="Txn")
            - applied_txns
        )
        costs.range_ops = delta.sum("etcd_mvcc_range_total")
        costs.watch = delta.sum("etcd_debugging_mvcc_events_total")
        costs.sent_bytes = delta.sum("etcd_network_client_grpc_sent_bytes_total")
    else:
        costs.writes = delta.sum(
            "etcd_server_apply_duration_seconds_count",
            exclude={"op": ("GET", "QGET", "HEAD")},
            version="v2",
            success="true",
        )
        costs.reads = counts["v2_read"]
        costs.watch = delta.sum("etcd_debugging_store_watch_requests_total")
    return costs


# -------------------------------------------------------------------------- rounds
@dataclasses.dataclass
class RoundResult:
    """One round of one backend at one N."""

    backend: str
    nodes: int
    seconds: float | None = None
    create_s: float = 0.0
    harness_cpu_s: float = 0.0
    load: float = 0.0  # the machine's 1-minute load average when the round started
    costs: Costs = dataclasses.field(default_factory=Costs)
    problem: str | None = None  # why the round has no time: timeout, wrong answer, error
    timed_out: bool = False
    hung: int = 0  # nodes still running at the end (their threads are abandoned)


def _check(reports: Sequence[HostReport], spec: RoundSpec) -> tuple[str | None, bool]:
    """Return (what went wrong, whether it is a timeout), or (None, False)."""
    errors = [e for r in reports for e in r.errors]
    hung = sum(r.hung for r in reports)
    answers = [a for r in reports for a in r.answers]
    if errors or hung:
        timeouts = [e for e in errors if "TimeoutError" in e]
        others = collections.Counter(e for e in errors if e not in timeouts)
        parts = [f"{len(answers)} of {spec.nodes} returned"]
        if timeouts:
            # What the backend said it was waiting for, without run ids and node ids.
            said = collections.Counter(
                re.sub(r"'bench-[0-9a-f]+'|\b[0-9a-f]{12,16}\b", "…", e) for e in timeouts
            ).most_common(1)[0][0]
            parts.append(f"{len(timeouts)} raised a timeout (e.g. {said})")
        if others:
            # The most common error that is not a timeout is the likely cause of the rest.
            cause, count = others.most_common(1)[0]
            parts.append(f"{sum(others.values())} raised other errors ({count}x {cause})")
        if hung:
            stuck: collections.Counter[str] = collections.Counter()
            for report in reports:
                stuck.update(report.stuck_in)
            where = ", ".join(f"{count} in {place}" for place, count in stuck.most_common(2))
            parts.append(f"{hung} still running after {spec.limit_s + _GRACE_S:g} s ({where})")
        timed_out = not others
        head = f"timeout >{spec.limit_s:g} s" if timed_out else "FAILED"
        return f"{head}: {'; '.join(parts)}", timed_out
    ranks = sorted(rank for rank, _ in answers)
    sizes = sorted({size for _, size in answers})
    if ranks != list(range(spec.nodes)) or sizes != [spec.nodes]:
        dupes = len(ranks) - len(set(ranks))
        return (
            f"WRONG ANSWER: {len(answers)} nodes returned, world sizes {sizes}, "
            f"{dupes} duplicate ranks, ranks {ranks[:5]}..{ranks[-5:]}"
        ), False
    return None, False


class Harness:
    """Runs rounds on one etcd; hosts nodes as threads here or in worker processes."""

    def __init__(
        self,
        server: Any,
        procs: int,
        limit_s: float,
        verbose: bool = False,
        rdzv_options: Sequence[tuple[str, str]] = (),
        other_members: Sequence[str] = (),
        switch_interval: float | None = None,
    ) -> None:
        self.server = server
        self.procs = procs
        self.limit_s = limit_s
        self.verbose = verbose
        self.rdzv_options = tuple(rdzv_options)
        self.switch_interval = switch_interval
        self._metrics_url = server.get_metrics_url()
        # Metrics URLs of a cluster's other members: their CPU counts as etcd's too
        # (requests and events are counted on the member the clients talk to).
        self._other_members = tuple(other_members)

    def run_round(self, backend: str, nodes: int) -> RoundResult:
        store = None
        endpoint = self.server.get_endpoint()
        if backend == "c10d":
            from torch.distributed import TCPStore

            store = TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True,
                             wait_for_workers=False)  # fmt: skip
            endpoint = f"127.0.0.1:{store.port}"
        load = os.getloadavg()[0]
        run_id = f"bench-{uuid.uuid4().hex[:12]}"
        spec = RoundSpec(
            backend, endpoint, run_id, nodes, self.limit_s, self.verbose, self.rdzv_options,
            self.switch_interval,
        )
        snapshots: dict[str, Metrics] = {}
        unreachable: list[str] = []

        def snapshot(name: str) -> None:
            try:
                snapshots[name] = Metrics.scrape(self._metrics_url)
                for i, url in enumerate(self._other_members):
                    snapshots[f"{name}-{i}"] = Metrics.scrape(url)
            except OSError as err:
                unreachable.append(f"etcd's /metrics did not answer ({err}); did etcd exit?")

        hooks = {
            "created": functools.partial(snapshot, "before"),
            "finished": functools.partial(snapshot, "after"),
        }
        try:
            if self.procs <= 1:
                reports = [_host_nodes(spec, range(nodes), lambda p: hooks.get(p, _noop)())]
            else:
                reports = self._run_in_processes(spec, hooks)
        finally:
            del store
        result = RoundResult(backend, nodes, load=load)
        result.create_s = max((r.create_s for r in reports), default=0.0)
        result.harness_cpu_s = sum(r.cpu_s for r in reports)
        result.problem, result.timed_out = _check(reports, spec)
        result.hung = sum(r.hung for r in reports)
        if unreachable:
            result.problem = "; ".join(filter(None, (result.problem, f"FAILED: {unreachable[0]}")))
            result.timed_out = False
        if reports and not result.problem:
            result.seconds = max(e for r in reports for e in r.ends) - min(
                r.release for r in reports
            )
        if "before" in snapshots and "after" in snapshots:
            counts: collections.Counter[str] = collections.Counter()
            for report in reports:
                counts.update(report.counts)
            result.costs = _costs(backend, snapshots["after"] - snapshots["before"], counts)
            for i in range(len(self._other_members)):
                if f"after-{i}" in snapshots and backend in ("raw", "rdzv"):
                    # Requests, events and bytes are counted by the member that
                    # served them; writes and applied Txns by every member alike.
                    delta = snapshots[f"after-{i}"] - snapshots[f"before-{i}"]
                    member = _costs(backend, delta, counts)
                    member_applied = delta.sum(
                        "etcd_server_apply_duration_seconds_count", op="Txn", version="v3")
                    costs = result.costs
                    costs.etcd_cpu_s = (costs.etcd_cpu_s or 0.0) + (member.etcd_cpu_s or 0.0)
                    costs.reads = (costs.reads or 0.0) + (member.reads or 0.0) + member_applied
                    costs.watch = (costs.watch or 0.0) + (member.watch or 0.0)
                    costs.sent_bytes = (costs.sent_bytes or 0.0) + (member.sent_bytes or 0.0)
        return result

    def _run_in_processes(
        self, spec: RoundSpec, hooks: dict[str, Callable[[], None]]
    ) -> list[HostReport]:
        context = multiprocessing.get_context("spawn")
        barrier = context.Barrier(self.procs + 1)
        out = context.Queue()
        workers = [
            context.Process(
                target=_worker_main,
                args=(spec, range(i, spec.nodes, self.procs), barrier, out),
                name=f"nodes-{i}",
                daemon=True,
            )
            for i in range(self.procs)
        ]
        for worker in workers:
            worker.start()
        reports: list[HostReport] = []
        try:
            for phase in _PHASES:
                barrier.wait(self.limit_s + 180.0)
                hooks.get(phase, _noop)()
            for _ in workers:
                reports.append(out.get(timeout=120.0))
        except (threading.BrokenBarrierError, queue.Empty) as err:
            reports.append(HostReport(errors=[f"a worker process failed: {err!r}"]))
        finally:
            for worker in workers:
                worker.join(30.0)
                if worker.is_alive():
                    worker.kill()
        return reports


def _noop() -> None:
    pass


# -------------------------------------------------------------------------- summary
@dataclasses.dataclass
class Summary:
    """All repeats of one backend at one N."""

    backend: str
    nodes: int
    rounds: list[RoundResult]

    @property
    def times(self) -> list[float]:
        return [r.seconds for r in self.rounds if r.seconds is not None]

    @property
    def problem(self) -> str | None:
        return next((r.problem for r in self.rounds if r.problem), None)

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times and not self.problem else None

    def per_node(self, field: str) -> float | None:
        values = [getattr(r.costs, field) for r in self.rounds if r.seconds is not None]
        values = [v for v in values if v is not None]
        return statistics.median(values) / self.nodes if values else None

    def median_of(self, field: str) -> float:
        return statistics.median(getattr(r, field) for r in self.rounds)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def table(summaries: Sequence[Summary]) -> str:
    """The results as a Markdown table."""
    head = (
        "| backend | N | s to last return, median | min-max | repeats | create s "
        "| writes/node | reads/node | range ops/node | watch/node | raft proposals/node "
        "| CPU s harness / etcd | load |\n"
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|\n"
    )
    rows = []
    for s in summaries:
        times = s.times
        if s.problem:
            median = f"**{s.problem.split(':')[0]}** (see below)"
            spread = "-"
        else:
            median = _fmt_s(s.median)
            spread = f"{_fmt_s(min(times))}-{_fmt_s(max(times))}" if times else "-"
        etcd_cpu = [r.costs.etcd_cpu_s for r in s.rounds if r.costs.etcd_cpu_s is not None]
        cpu = f"{_fmt(s.median_of('harness_cpu_s'), 1)} / " + (
            _fmt(statistics.median(etcd_cpu), 1) if etcd_cpu else "-"
        )
        rows.append(
            f"| {s.backend} | {s.nodes} | {median} | {spread} | {len(s.rounds)} "
            f"| {_fmt(s.median_of('create_s'))} | {_fmt(s.per_node('writes'))} "
            f"| {_fmt(s.per_node('reads'))} | {_fmt(s.per_node('range_ops'))} "
            f"| {_fmt(s.per_node('watch'))} | {_fmt(s.per_node('proposals'))} | {cpu} "
            f"| {_fmt(s.median_of('load'), 1)} |"
        )
    problems = [
        f"- {s.backend} at N={s.nodes}: {r.problem}"
        for s in summaries
        for r in s.rounds
        if r.problem
    ]
    if problems:
        rows += ["", "Rounds that did not complete:", "", *problems]
    return head + "\n".join(rows) + "\n"


def _find(summaries: Sequence[Summary], backend: str, nodes: int) -> Summary | None:
    return next((s for s in summaries if s.backend == backend and s.nodes == nodes), None)


def targets(summaries: Sequence[Summary], limit_s: float) -> list[str]:
    """The ratios the project targets, for whatever this run measured."""
    lines = []
    for nodes, goal in ((64, 20), (256, 100)):
        ours, theirs = _find(summaries, "rdzv", nodes), _find(summaries, "etcd", nodes)
        if not ours or not theirs or ours.median is None:
            continue
        if theirs.median is not None:
            ratio = theirs.median / ours.median
            verdict = "met" if ratio >= goal else "NOT met"
            lines.append(
                f"- rdzv vs torch `etcd` at N={nodes}: {ratio:,.0f}x faster "
                f"({_fmt_s(theirs.median)} s vs {_fmt_s(ours.median)} s; "
                f"target >= {goal}x: {verdict})"
            )
        elif theirs.rounds and theirs.rounds[-1].timed_out:
            ratio = limit_s / ours.median
            lines.append(
                f"- rdzv vs torch `etcd` at N={nodes}: more than {ratio:,.0f}x faster "
                f"(torch `etcd` did not finish within {limit_s:g} s; rdzv {_fmt_s(ours.median)} s; "
                f"target >= {goal}x: {'met' if ratio >= goal else 'not shown'})"
            )
        else:
            lines.append(
                f"- rdzv vs torch `etcd` at N={nodes}: torch `etcd` failed: {theirs.problem}"
            )
    for s in summaries:
        if s.backend != "rdzv" or s.median is None:
            continue
        raw = _find(summaries, "raw", s.nodes)
        if raw and raw.median is not None:
            ratio = s.median / raw.median
            goal = (
                f"; target within 10x at N=1024: {'met' if ratio <= 10 else 'NOT met'}"
                if s.nodes == 1024
                else ""
            )
            lines.append(
                f"- rdzv at N={s.nodes} vs {s.nodes} raw concurrent puts: {ratio:.1f}x "
                f"({_fmt_s(s.median)} s vs {_fmt_s(raw.median)} s{goal})"
            )
    for s in summaries:
        if s.backend == "rdzv" and s.median is not None:
            writes, reads = s.per_node("writes"), s.per_node("reads")
            ok = writes is not None and reads is not None and writes <= 3 and reads <= 3
            lines.append(
                f"- rdzv at N={s.nodes}: {_fmt(writes)} writes and {_fmt(reads)} reads per node "
                f"(target <= 3 each: {'met' if ok else 'NOT met'})"
            )
    for s in summaries:
        if s.problem and s.backend == "rdzv":
            lines.append(f"- **rdzv at N={s.nodes} did not complete** (see above)")
    return lines


# -------------------------------------------------------------------------- report
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> str:
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        return f"{kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        return "unknown"


def append_section(title: str, notes: Sequence[str], lines: Sequence[str]) -> None:
    """Append a dated section to ``benchmarks/RESULTS.md``: ``## title, <date>``,
    the machine and commit, ``notes`` as list items, then ``lines``."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        "", f"## {title}, {now}", "",
        f"- Machine: {_cpu_model()}, {os.cpu_count()} cores; rdzv at commit {_git_commit()}",
        *(f"- {note}" for note in notes), "",
    ]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
    with open(path, "a") as f:
        f.write("\n".join([*head, *lines]) + "\n")


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        )  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(server: Any, load_before: tuple[float, float, float]) -> list[str]:
    """Machine and software versions, as Markdown list items."""
    etcd_version = next(
        (dict(labels).get("server_version") for (name, labels) in
         Metrics.scrape(server.get_metrics_url()).series if name == "etcd_server_version"),
        "unknown",
    )  # fmt: skip
    return [
        f"- Machine: {_cpu_model()}, {os.cpu_count()} cores, {_ram_gib()} RAM, "
        f"{platform.system()} {platform.release()}; load average at start "
        f"{load_before[0]:.2f} (1 min), {load_before[1]:.2f} (5 min)",
        f"- Python {platform.python_version()}, torch {_version('torch')}, etcd {etcd_version}, "
        f"protobuf {_version('protobuf')}, grpcio {_version('grpcio')}, etcd3 {_version('etcd3')}, "
        f"python-etcd {_version('python-etcd')}; rdzv at commit {_git_commit()}",
    ]


def run_name(started: datetime.datetime) -> str:
    """How RESULTS.md names a run: its start, ``YYYY-MM-DD HH:MM`` UTC."""
    return f"{started:%Y-%m-%d %H:%M}"


def plot_path(directory: str, names: Sequence[str], unique: bool = True) -> str:
    """The plot file of the runs ``names``, beside RESULTS.md; with ``unique``, never
    an existing file's name (two runs can start within one minute)."""
    stamps = "_".join(name.replace("-", "").replace(":", "").replace(" ", "-") for name in names)
    path = os.path.join(directory, f"join_latency-{stamps}.png")
    again = 1
    while unique and os.path.exists(path):
        again += 1
        path = os.path.join(directory, f"join_latency-{stamps}-{again}.png")
    return path


def render(
    summaries: Sequence[Summary],
    args: argparse.Namespace,
    env: list[str],
    started: datetime.datetime,
    wall_s: float,
) -> str:
    """One run's section of RESULTS.md."""
    hosts = (
        "threads in one process"
        if args.procs <= 1
        else f"threads in {args.procs} worker processes (N/{args.procs} each)"
    )
    lines = [
        f"## Run of {run_name(started)} UTC",
        "",
        f"`{' '.join(['python benchmarks/join_latency.py', *sys.argv[1:]])}`",
        "",
        *env,
        f"- Nodes: {hosts}; time limit {args.limit:g} s per backend and N; "
        f"up to {args.repeats} repeats (fewer once a backend's repeats at one N passed "
        f"{args.limit:g} s in total); whole run {wall_s / 60:.1f} min",
        f"- rdzv options: {', '.join(f'{k}={v}' for k, v in args.rdzv_conf) or 'defaults'}",
        *([f"- Plot: `{os.path.basename(args.plot)}`"] if args.plot else []),
        "",
        table(summaries),
    ]
    goals = targets(summaries, args.limit)
    if goals:
        lines += ["Against the targets:", "", *goals, ""]
    return "\n".join(lines)


def write_results(path: str, section: str) -> None:
    """Add one run's section to the results file; earlier runs stay as they are.

    A missing file is created with the header that explains the columns.
    """
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    with open(path, "a") as f:
        f.write(("\n" if exists else HEADER) + section)


HEADER = """# Join latency: one full rendezvous round

Written by `benchmarks/join_latency.py` (see `benchmarks/README.md` for what each
column measures and how). N nodes, `min_nodes = max_nodes = N`; seconds from their
release to the last node's return; costs are per node, medians over the repeats.
Every backend ran on the same machine, against the same single etcd (v2 API on for
torch's `etcd` and `etcd-v2` backends); `c10d` uses a TCPStore instead.

Each run is appended by the script (`make bench`), oldest first, with its date,
machine and versions; notes written by hand name the runs they refer to. On a
shared machine absolute times are noisy: compare backends within a run, and read
the spread (min-max over the repeats) next to each median.

"""


@dataclasses.dataclass(frozen=True)
class Point:
    """One backend at one N, as plotted: the median and spread, or why there is none."""

    backend: str
    nodes: int
    median: float | None
    low: float | None
    high: float | None
    problem: str | None

    @classmethod
    def of(cls, summary: Summary) -> Point:
        times = summary.times
        return cls(
            summary.backend, summary.nodes, summary.median,
            min(times) if times else None, max(times) if times else None, summary.problem,
        )  # fmt: skip


_SECTION = re.compile(r"^## Run of (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", re.MULTILINE)
_LIMIT = re.compile(r"time limit ([\d.]+) s per backend")


def recorded_runs(text: str) -> dict[str, str]:
    """The sections of RESULTS.md by run name (``YYYY-MM-DD HH:MM``), each up to
    the next heading (notes written by hand are not part of a run)."""
    headings = [m.start() for m in re.finditer(r"^## ", text, re.MULTILINE)] + [len(text)]
    runs = {}
    for m in _SECTION.finditer(text):
        end = next(h for h in headings if h > m.start())
        runs[m[1]] = text[m.start() : end]
    return runs


def points_of(section: str) -> tuple[list[Point], float]:
    """The table rows of one recorded run as points, and the run's time limit."""
    limit = _LIMIT.search(section)
    points = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 4 or cells[0] not in BACKENDS or not cells[1].isdigit():
            continue
        backend, nodes, median, spread = cells[0], int(cells[1]), cells[2], cells[3]
        if median.startswith("**"):
            points.append(Point(backend, nodes, None, None, None, median.split("**")[1]))
            continue
        low, high = (float(part) for part in spread.split("-"))
        points.append(Point(backend, nodes, float(median), low, high, None))
    return points, float(limit[1]) if limit else DEFAULT_LIMIT_S


def previous_duration(text: str, command: str) -> tuple[str, float] | None:
    """The latest recorded run of ``command``: its name and minutes, if any."""
    found = None
    for name, section in recorded_runs(text).items():
        took = re.search(r"whole run ([\d.]+) min", section)
        if f"`{command}`" in section and took:
            found = (name, float(took[1]))
    return found


#: Legend labels: which backends are torch's, which is the floor.
LABELS = {
    "raw": "N raw etcd puts (the floor)",
    "rdzv": "rdzv",
    "etcd": "torch's etcd backend",
    "etcd-v2": "torch's etcd-v2 backend",
    "c10d": "torch's c10d backend",
}


def plot(points: Sequence[Point], path: str, limit_s: float, runs: Sequence[str]) -> None:
    """Log-log seconds vs N per backend; skipped when matplotlib is missing.

    A point that did not complete is an x on the limit line, nudged sideways per
    backend so that two backends' timeouts at one N stay apart.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.lines
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        logger.warning("matplotlib is not installed; no plot written")
        return
    fig, ax = plt.subplots(figsize=(10, 5))
    backends = [b for b in BACKENDS if any(p.backend == b for p in points)]
    for index, backend in enumerate(backends):
        mine = sorted((p for p in points if p.backend == backend), key=lambda p: p.nodes)
        done = [p for p in mine if p.median is not None]
        style = "--" if LABELS[backend].startswith("torch") else "-"
        line = ax.errorbar(
            [p.nodes for p in done], [p.median for p in done],
            yerr=[[p.median - p.low for p in done], [p.high - p.median for p in done]],
            marker="o", capsize=3, linestyle=style, label=LABELS[backend],
        )  # fmt: skip
        failed = [p.nodes for p in mine if p.problem]
        if failed:
            nudge = 2 ** (0.12 * (index - (len(backends) - 1) / 2))
            ax.plot(
                [n * nudge for n in failed], [limit_s] * len(failed), "x", markersize=10,
                markeredgewidth=2, color=line.lines[0].get_color(),
            )  # fmt: skip
    ax.axhline(limit_s, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({p.nodes for p in points}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yscale("log")
    ax.set_xlabel("nodes N (min_nodes = max_nodes = N)")
    ax.set_ylabel("seconds to the last node's return")
    ax.set_title(f"One rendezvous round; run{'s' if len(runs) > 1 else ''} of "
                 f"{' and '.join(runs)} UTC", fontsize=10)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    marker = matplotlib.lines.Line2D
    handles += [
        marker([], [], color="black", marker="o", linestyle="", label="median of the repeats; "
               "bar: min-max"),
        marker([], [], color="black", marker="x", linestyle="", markeredgewidth=2,
               label=f"no round within {limit_s:g} s (on the limit line)"),
        marker([], [], color="grey", linestyle=":", label=f"time limit {limit_s:g} s"),
    ]  # fmt: skip
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("plot written to %s", path)


def plot_recorded(results: str, names: Sequence[str]) -> str:
    """Plot runs already in the results file into one PNG beside it; return its path.

    Raises:
        SystemExit: a run is not in the file.
    """
    with open(results) as f:
        runs = recorded_runs(f.read())
    missing = [name for name in names if name not in runs]
    if missing:
        raise SystemExit(f"no run {', '.join(missing)} in {results}; runs: {', '.join(runs)}")
    merged: dict[tuple[str, int], Point] = {}
    limits = []
    for name in names:
        points, limit = points_of(runs[name])
        limits.append(limit)
        merged.update({(p.backend, p.nodes): p for p in points})  # a later run wins
    # The same recorded runs give the same plot: drawn again, it replaces itself.
    path = plot_path(os.path.dirname(os.path.abspath(results)), names, unique=False)
    plot(list(merged.values()), path, max(limits), names)
    return path


# ---------------------------------------------------------------------------- main
def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(part) for part in text.split(",") if part.strip()]


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value.strip()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nodes",
        type=_csv(int),
        default=list(DEFAULT_NODES),
        help="comma-separated N (default 8,64,256)",
    )
    parser.add_argument(
        "--backends",
        type=_csv(str),
        default=list(BACKENDS),
        help=f"comma-separated, from {','.join(BACKENDS)} (default: all)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds per backend and N")
    parser.add_argument(
        "--limit",
        type=float,
        default=DEFAULT_LIMIT_S,
        help="seconds a round may take; a backend that does not finish in "
        "time is reported as a timeout and its larger N are skipped",
    )
    parser.add_argument(
        "--procs",
        type=int,
        default=1,
        help="host the nodes in this many worker processes (default 1: threads in this process)",
    )
    parser.add_argument(
        "--out",
        default=os.path.join(here, "RESULTS.md"),
        help="Markdown file this run is appended to ('' for none); earlier runs stay",
    )
    parser.add_argument(
        "--plot",
        default=None,
        help="PNG plot of seconds vs N ('' for none; default: a file of this run's own "
        "beside --out, benchmarks/join_latency-YYYYMMDD-HHMM.png)",
    )
    parser.add_argument(
        "--plot-runs",
        nargs="+",
        metavar="'YYYY-MM-DD HH:MM'",
        help="run nothing: plot these runs of --out into one PNG beside it",
    )
    parser.add_argument(
        "--rdzv-conf",
        type=_csv(_option),
        default=[],
        help="options for rdzv's handlers, key=value[,key=value] as torchrun's --rdzv-conf, "
        "e.g. lease_ttl=60 (default: none)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the backends' own INFO logs (slows torch's etcd backend)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backend(s) {sorted(unknown)}; choose from {','.join(BACKENDS)}")
    if args.repeats < 1 or args.procs < 1 or args.limit <= 0 or not args.nodes:
        parser.error("--repeats and --procs must be >= 1, --limit > 0, --nodes not empty")
    if min(args.nodes) < 1:
        parser.error("every N must be >= 1")
    return args


def announce(args: argparse.Namespace, command: str) -> int:
    """Say up front how long the run takes; return how many rounds it runs at most."""
    steps = len(args.backends) * len(args.nodes) * args.repeats
    bound_min = len(args.backends) * len(args.nodes) * (args.limit + _GRACE_S) / 60
    previous = None
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            previous = previous_duration(f.read(), command)
    if previous:
        took = f"the last recorded run of this command ({previous[0]} UTC) took {previous[1]} min"
    else:
        took = "no run of this command is recorded"
    logger.info(
        "%d backend(s) x %d N x up to %d repeats = at most %d rounds; %s; a backend that "
        "takes over %g s at one N stops there, so at most about %.0f min",
        len(args.backends), len(args.nodes), args.repeats, steps, took, args.limit, bound_min,
    )  # fmt: skip
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,  # other libraries' logs
        format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
    )  # fmt: skip
    logger.setLevel(logging.INFO)
    if args.plot_runs:
        print(plot_recorded(args.out, args.plot_runs))
        return 0
    command = " ".join(["python benchmarks/join_latency.py", *sys.argv[1:]])
    steps = announce(args, command)
    if {"etcd", "etcd-v2"} & set(args.backends):
        try:
            import etcd  # noqa: F401
        except ImportError:
            logger.error(
                "torch's 'etcd' and 'etcd-v2' backends need python-etcd: pip install -e '.[bench]'"
            )
            return 2

    from rdzv.etcd_server import EtcdServer

    started = datetime.datetime.now(datetime.timezone.utc)
    if args.plot is None:
        args.plot = plot_path(os.path.dirname(os.path.abspath(args.out or __file__)),
                              [run_name(started)])  # fmt: skip
    load = os.getloadavg()
    begin = time.monotonic()
    summaries: list[Summary] = []
    notes: list[str] = []
    anything_hung = False
    done = 0
    with EtcdServer(enable_v2=True) as server:
        env = environment(server, load)
        harness = Harness(server, args.procs, args.limit, args.verbose, args.rdzv_conf)
        for backend in args.backends:
            for nodes in sorted(args.nodes):
                summary = Summary(backend, nodes, [])
                summaries.append(summary)
                spent = 0.0
                for repeat in range(args.repeats):
                    result = harness.run_round(backend, nodes)
                    summary.rounds.append(result)
                    anything_hung |= result.hung > 0
                    done += 1
                    logger.info(
                        "[%d/%d, %.1f min] %-7s N=%-5d repeat %d/%d: %s (create %.2f s)",
                        done, steps, (time.monotonic() - begin) / 60, backend, nodes,
                        repeat + 1, args.repeats,
                        result.problem or f"{result.seconds:.3f} s, ranks 0..{nodes - 1} ok",
                        result.create_s,
                    )  # fmt: skip
                    spent += result.seconds or args.limit
                    if result.problem or spent > args.limit:
                        break
                if summary.problem:
                    logger.info("%s: skipping N > %d after: %s", backend, nodes, summary.problem)
                    break
            if server.pid is None:
                logger.error("etcd exited during the run; the remaining backends were not run")
                notes.append("- **etcd exited during this run; later backends were not run.**")
                break
        wall_s = time.monotonic() - begin
        section = render(summaries, args, env + notes, started, wall_s)
    print(section)
    if args.out:
        write_results(args.out, section)
        logger.info("results appended to %s", args.out)
    if args.plot:
        plot([Point.of(s) for s in summaries], args.plot, args.limit, [run_name(started)])
    if anything_hung:
        # Hung nodes keep non-daemon gRPC threads alive; do not wait for them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
