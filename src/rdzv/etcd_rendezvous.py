"""The etcd v3 rendezvous handler: torch's ``RendezvousHandler`` on rdzv's core.

The decisions are made by the compiled node machine (``rdzv._state.Node``);
this module only drives it: it owns the etcd connection, the lease, the watches
and the deadlines, and turns a completed round into a ``RendezvousInfo``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import threading
import time
from typing import Any

from rdzv import _futex, _state
from rdzv._mux import WatchRefused
from rdzv.api import (
    RendezvousConnectionError,
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStateError,
    RendezvousStoreInfo,
    RendezvousTimeoutError,
    free_port,
)
from rdzv.client import DEAD_CONNECTION_WITHIN, EtcdClient, LeaseLostError
from rdzv.config import (
    DEFAULT_CLOSED_RUN_GRACE,
    DEFAULT_LAST_CALL_TIMEOUT,
    DEFAULT_LEASE_TTL,
    DEFAULT_RUN_IDLE_TIMEOUT,
    DEFAULT_STORE_TIMEOUT,
    DEFAULT_TIMEOUT,
    RENDEZVOUS_OPTIONS,
    RendezvousOptions,
    check_lease_scope,
    check_rank_order,
    default_keepalive_interval,
    node_topology,
    slurm_topology,
)
from rdzv.etcd_store import EtcdStore
from rdzv.keys import DEFAULT_PREFIX, RunKeys
from rdzv.session import RunLeases, Session
from rdzv.watch import Inbox, Watch

__all__ = [
    "BACKEND_NAMES",
    "DEFAULT_LEASE_TTL",
    "DEFAULT_TIMEOUT",
    "RENDEZVOUS_OPTIONS",
    "EtcdRendezvousHandler",
    "create_rdzv_handler",
    "node_topology",
    "slurm_topology",
]

logger = logging.getLogger(__name__)

#: The backend names rdzv answers to: ``etcd3`` is torchrun's ``--rdzv-backend``;
#: ``etcd`` lets code written for torch's etcd handler port unchanged.
BACKEND_NAMES = ("etcd3", "etcd-v3", "etcd")
# How long the first num_nodes_waiting() after a round (or after a silence)
# waits for the view's read (one attempt's deadline); past it, it answers from
# the view.
_FIRST_READ_WAIT = 2.0
# The port that the calls of a run in this process advertise while they begin
# together, by run: (port, when it was chosen); see _descriptor. The lock is
# held while one is chosen.
_shared_ports: dict[Any, tuple[int, float]] = {}
_shared_ports_lock = threading.Lock()
# How long a port chosen for one call serves the others of its run.
_PORT_SHARED_FOR = 1.0
# Past this many runs, the ports no longer shared are forgotten.
_SHARED_PORTS_KEPT = 64


def _shared_port(run: Any) -> int:
    """A free port for a call of ``run``: the one chosen for another call of
    it less than ``_PORT_SHARED_FOR`` seconds ago, or a new one."""
    shared = _shared_ports.get(run)
    if shared is not None and time.monotonic() - shared[1] < _PORT_SHARED_FOR:
        return shared[0]
    with _shared_ports_lock:
        # Calls that came while another chose one take that.
        now = time.monotonic()
        shared = _shared_ports.get(run)
        if shared is not None and now - shared[1] < _PORT_SHARED_FOR:
            return shared[0]
        port = free_port()
        if len(_shared_ports) >= _SHARED_PORTS_KEPT:
            for key, (_, chosen) in list(_shared_ports.items()):
                if now - chosen >= _PORT_SHARED_FOR:
                    del _shared_ports[key]
        _shared_ports[run] = (port, now)
        return port


def _forget_shared_ports() -> None:
    # A forked child's calls are its own (and a thread of the parent may have
    # held the lock at the fork).
    global _shared_ports_lock
    _shared_ports_lock = threading.Lock()
    _shared_ports.clear()


os.register_at_fork(after_in_child=_forget_shared_ports)


class EtcdRendezvousHandler(RendezvousHandler):
    """A rendezvous over etcd v3 whose join costs O(1) writes per node.

    Create it with ``create_rdzv_handler(params)``, or directly with a client
    of the caller's (one whose requests pass through gRPC interceptors, see
    ``EtcdClient``). The connection to etcd is checked and this node's lease
    granted at creation, so an unreachable etcd fails there, within
    ``connect_timeout`` seconds.

    Args:
        client: connection to etcd (owned by the handler from now on).
        run_id: the run's id.
        backend: backend name reported by ``get_backend()``.
        min_nodes, max_nodes: bounds of a round's world.
        timeout: seconds ``next_rendezvous()`` waits for its round.
        last_call_timeout: seconds from the min-th join to completion.
        etcd_prefix: key prefix shared by all runs.
        lease_ttl: seconds after which a dead node's keys vanish.
        keepalive_interval: seconds between lease keep-alives (None: a quarter
            of lease_ttl, at most 60 s).
        local_addr: address this node advertises if it becomes rank 0.
        store_timeout: default timeout of the round's store.
        closed_run_grace: seconds a closed run stays after its last node.
        run_idle_timeout: seconds an abandoned run stays after its last node.
        topology: this node's topology label (``pod1/rack07``), or None.
        rank_order: ``stable`` or ``topology`` (see ``RENDEZVOUS_OPTIONS``).
        lease_scope: ``node`` (a lease of the node's own) or ``process`` (one
            lease for every handler of this process on the same connection
            with the same ``lease_ttl`` and ``keepalive_interval``: one
            keep-alive for all of them; a node that leaves deletes its keys,
            and a lost lease is lost for all of them, as when the process dies).

    Raises:
        ValueError: ``topology``, ``rank_order`` or ``lease_scope`` is
            malformed (before any request to etcd).
    """

    def __init__(
        self,
        client: EtcdClient,
        run_id: str,
        backend: str,
        min_nodes: int,
        max_nodes: int,
        timeout: float = DEFAULT_TIMEOUT,
        last_call_timeout: float = DEFAULT_LAST_CALL_TIMEOUT,
        etcd_prefix: str = DEFAULT_PREFIX,
        lease_ttl: int = DEFAULT_LEASE_TTL,
        keepalive_interval: float | None = None,
        local_addr: str | None = None,
        store_timeout: float = DEFAULT_STORE_TIMEOUT,
        closed_run_grace: int = int(DEFAULT_CLOSED_RUN_GRACE),
        run_idle_timeout: int = int(DEFAULT_RUN_IDLE_TIMEOUT),
        topology: str | None = None,
        rank_order: str = _state.RANK_ORDERS[0],
        lease_scope: str = "node",
    ) -> None:
        if topology is not None:
            _state.check_topology(topology)
        check_rank_order(rank_order)
        self._shared_lease = check_lease_scope(lease_scope) == "process"
        self._topology = topology or ""
        self._rank_order = rank_order
        self._client = client
        # A call's requests give up when it times out: those before its round
        # (a new lease for this node, the run's leases) and the round's, which
        # are also retried only while this node's lease may be alive (past
        # that, they could not count).
        self._call_deadline = math.inf
        self._call_client = client.with_retry(client.retry.until(lambda: self._call_deadline))
        self._round_client = client.with_retry(
            client.retry.bounded(lambda: self._session.expiry).until(lambda: self._call_deadline)
        )
        self._run_id = run_id
        self._backend = backend
        self._keys = RunKeys(etcd_prefix, run_id)
        self._port_key = (client.config.endpoints, self._keys.state)
        self._min_nodes = min_nodes
        self._max_nodes = max_nodes
        self._timeout = timeout
        self._last_call_timeout = last_call_timeout
        self._lease_ttl = lease_ttl
        self._keepalive_interval = keepalive_interval or default_keepalive_interval(lease_ttl)
        self._local_addr = local_addr
        self._store_timeout = store_timeout
        self._host = local_addr or socket.getfqdn()
        self._lock = threading.RLock()
        self._shutdown_lock = threading.Lock()
        self._inbox = Inbox()
        # The watches the node machine asked for, by tag: (its WatchSpec, the Watch).
        self._watches: dict[str, tuple[Any, Watch]] = {}
        self._shutdown = False
        self._session_abandoned = False
        self._run_leases = RunLeases(client, self._keys, closed_run_grace, run_idle_timeout)
        # Between rounds: the view of the run (see _current_view), its watch
        # with the inbox that watch feeds, and background reads' results.
        self._view_lock = threading.Lock()
        self._view: Any = None
        self._view_watch: tuple[Any, Watch, Inbox] | None = None
        self._view_rewatch = False
        self._view_jobs = Inbox()
        self._view_job_running = False
        self._view_outage: float | None = None
        self._view_retry_at = 0.0
        self._view_last_call = 0.0
        self._session = self._open_session()
        try:
            self._node = self._new_node()
            self._read_state()
            if self._node.state is None:
                # A new run (or one that expired): its leases may not exist yet.
                self._run_leases.grant()
            self._run_leases.hold()
        except BaseException:
            self._run_leases.release()
            self._session.close()
            raise
        # Before its calls begin: the threads of many nodes begin together.
        _futex.nodes.add()

    # ------------------------------------------------------------ the machine
    def _new_node(self, descriptor: bytes | None = None) -> Any:
        node = _state.Node(
            self._session.node_id,
            self._keys,
            self._min_nodes,
            self._max_nodes,
            self._session.lease_id,
            self._descriptor() if descriptor is None else descriptor,
            self._last_call_timeout,
            float(self._lease_ttl),
            random.Random(int.from_bytes(os.urandom(8), "big")),
        )
        node.use_run_leases(self._keys.data_lease, self._keys.state_lease)
        return node

    def _descriptor(self) -> bytes:
        """This node as a member key holds it, with a free port for ``MASTER_PORT``.

        The port is chosen before each rendezvous, as torch's backends do: the
        node that gets rank 0 advertises it, and its workers bind it. The
        calls of one run in a process that begin within ``_PORT_SHARED_FOR``
        seconds of each other, and before any of them completes, advertise
        the same port: only one of their nodes gets rank 0 in a round, and
        choosing a port takes system calls (a socket bound and closed) that
        each give up the interpreter's lock, which the threads of thousands
        of nodes that begin together all queue for.
        """
        port = _shared_port(self._port_key)
        host = self._host.replace(" ", "_").replace(",", "_")
        return _state.encode_member(
            host, self._host, os.getpid(), port, self._topology, self._rank_order
        )

    def _open_session(self, grant_client: EtcdClient | None = None) -> Session:
        # A lost lease wakes a waiting next_rendezvous(), which then fails.
        return Session(
            self._client, self._lease_ttl, self._keepalive_interval,
            on_lost=lambda: self._inbox.put(("lost",)), shared=self._shared_lease,
            grant_client=grant_client,
        )

    def _renew_session_if_lost(self) -> None:
        """At a call's start: a new session (and node) if this one's lease was
        lost or abandoned. Its requests end by the call's deadline."""
        if not self._session_abandoned:
            self._session.confirm_if_lapsed(self._call_client)
        if self._session_abandoned:
            logger.info("node %s of run %r joins again as a new node",
                        self._session.node_id, self._run_id)
        elif self._session.lost:
            logger.warning(
                "node %s of run %r lost its lease (keep-alives stalled past %d s) and was "
                "dropped from the rendezvous; joining again as a new node",
                self._session.node_id, self._run_id, self._lease_ttl,
            )
            # Its keys must not hold the next round up if etcd still has it.
            self._session.revoke_if_lost(self._call_client)
        else:
            return
        self._session.close(revoke=False)
        self._session = self._open_session(self._call_client)
        self._session_abandoned = False
        self._node = self._new_node()

    def _restart_state_watch_if_broken(self) -> None:
        """At a call's start: if the state record's watch could not resume
        between calls (etcd was away for longer than its retries), that says
        nothing of etcd now. The node reads the record again and watches it
        from there; if etcd is still away, that read fails as the call's
        requests do. (In a call, the watch's failure ends the call.) A watch
        whose start was compacted is left to the call, which resumes it from
        the record as it does in a round."""
        broken = self._inbox.take(lambda item: item[0] == "error" and item[1] == "state"
                                  and not _compacted(item[2]))
        if broken:
            logger.info("run %r: the state record's watch broke between calls (%s); "
                        "reading the record again", self._run_id, broken[-1][2])
            self._drop_watches(["state"])
            self._node.forget_state_watch()

    def _absorb(self) -> bool:
        """Feed the node machine what its watches and session sent; return
        whether they sent anything.

        Raises:
            RendezvousError: the handler was shut down.
            LeaseLostError: this node's lease was lost.
        """
        node = self._node
        items = self._inbox.drain(0)
        for item in items:
            tag = item[0]
            if tag == "state":
                for is_put, _key, value, revision in item[1]:
                    node.observe_state(value if is_put else None, revision)
            elif tag == "round":
                node.observe_round_events(item[1])
            elif tag == "waiting":
                node.observe_member_deleted()
            elif tag == "counter":
                node.observe_counter_deleted()
            elif tag == "error":
                # A watch could not be resumed: etcd unreachable (the node raises
                # the error), or the history it was to resume from compacted (it
                # goes on from now; see Node.watch_failed).
                self._watch_failed(item[1], item[2])
            # "shutdown" and "lost" only wake the driver: what they mean is
            # checked below, after the items behind them (a lost lease's item
            # can precede events that the next session's node needs).
        self._check_not_shut_down()
        if self._session.lost:
            raise LeaseLostError("its keep-alives went unanswered")
        return bool(items)

    def _watches_stale(self) -> bool:
        """Whether ``_sync_watches`` has anything to start or stop."""
        held = {tag: watch[0] for tag, watch in self._watches.items()}
        return held != {spec.tag: spec for spec in self._node.watches}

    def _sync_watches(self) -> bool:
        """Start and stop watches to match the node machine's; True if one started
        or was refused (the node may then have a request to make first)."""
        node = self._node
        wanted = {spec.tag: spec for spec in node.watches}
        self._drop_watches(tag for tag, held in self._watches.items() if held[0] != wanted.get(tag))
        changed = False
        for tag, spec in wanted.items():
            if tag in self._watches:
                continue
            changed = True
            # A watch starts as the round's requests go: retried only while this
            # node's lease may be alive and until the call times out. The state
            # record's watch outlives the call: its resumes are not the call's.
            client = self._client if tag == "state" else self._round_client
            try:
                # Every node of the run watches the state record: the nodes of
                # a process share one etcd watch of it (their round driver,
                # not a thread per node, takes each change).
                watch = Watch(client, spec.key, spec.start, self._inbox, tag,
                              prefix=spec.prefix, no_put=spec.no_put, share=tag == "state",
                              start_client=self._round_client)
            except WatchRefused as err:
                self._watch_failed(tag, err)
                return True
            self._watches[tag] = (spec, watch)
            node.watch_started(tag)
        return changed

    def _drop_watches(self, tags: Any) -> None:
        for tag in list(tags):
            held = self._watches.pop(tag, None)
            if held is not None:
                held[1].cancel()

    def _watch_failed(self, tag: str, err: BaseException) -> None:
        self._drop_watches([tag])
        if _compacted(err):
            logger.info("run %r: a %s watch resumes past compacted history (%s)",
                        self._run_id, tag, err)
        self._node.watch_failed(tag, err, _compacted(err))

    def _read_state(self) -> None:
        """Read the state record and watch it from there.

        Done when the handler is created, so that a round's clock does not pay
        for setting up the watch.
        """
        _, revision, (got,) = self._client.txn([], [("get", self._keys.state)], [])
        try:
            self._node.observe_state_read(revision, got)
        except RendezvousStateError:
            # Reported by next_rendezvous(), which re-reads it; creating a
            # handler does not fail on it.
            self._node.forget_state()
        self._sync_watches()

    # --------------------------------------------------------- the interface
    def get_backend(self) -> str:
        """Return the backend name the parameters gave (``"etcd"``, ``"etcd3"``)."""
        return self._backend

    def get_run_id(self) -> str:
        """Return the run id."""
        return self._run_id

    def next_rendezvous(self) -> RendezvousInfo:
        """Block until this node is a member of a completed round.

        Calling it again after a completed round starts the next round; the other
        members see it through ``num_nodes_waiting()`` and join it too.

        Returns:
            The round's store, this node's rank, the world size, and rank 0's
            bootstrap address.

        Raises:
            RendezvousClosedError: the run is closed.
            RendezvousTimeoutError: no round completed within ``timeout`` s.
            RendezvousConnectionError: etcd could not be reached.
            RendezvousStateError: a record in etcd cannot be decoded.
            RendezvousError: this node's lease expired during the call (its
                keep-alives went unanswered for ``lease_ttl`` seconds); the next
                call joins as a new node.
            ForkedProcessError: the handler was created before this process was
                forked from its creator (create a new one here).
        """
        # Before the lock: a thread of the parent may have held it at a fork.
        self._check_not_shut_down()
        with self._lock:
            self._check_not_shut_down()
            self._stop_view()
            start = time.monotonic()
            deadline = self._call_deadline = start + self._timeout
            try:
                self._renew_session_if_lost()
                if self._run_leases.lost:
                    logger.warning(
                        "run %r: its leases were lost (etcd dropped them or did not answer "
                        "their keep-alives); granting them again", self._run_id)
                    self._run_leases.restore(self._call_client)
            except RendezvousConnectionError as err:
                if time.monotonic() < deadline:
                    raise
                raise self._out_of_time(err) from err
            self._restart_state_watch_if_broken()
            node = self._node
            node.begin(self._descriptor(), time.time() - start)
            try:
                if not self._client.round_driver().drive(_Round(self, deadline)):
                    raise RendezvousTimeoutError(
                        f"run {self._run_id!r}: no round completed within "
                        f"{self._timeout:g} s: {self._describe_wait(time.monotonic() - start)}"
                    )
            except LeaseLostError as err:
                self._session.mark_lost(f"node {node.node_id} of run {self._run_id!r}: {err}")
                self._withdraw()
                raise RendezvousError(
                    f"node {node.node_id} lost its lease during the rendezvous of run "
                    f"{self._run_id!r} ({err}); call next_rendezvous() again to rejoin"
                ) from None
            except RendezvousConnectionError as err:
                self._withdraw()
                if time.monotonic() < deadline:
                    raise
                raise self._out_of_time(err) from err
            except BaseException:
                # Timeouts, closes, lost connections, and anything unexpected
                # (even KeyboardInterrupt): leave no key behind in the round.
                self._withdraw()
                raise
            # The next round's calls choose their port afresh: this one's may
            # be bound by now, by the workers of the round's rank 0.
            _shared_ports.pop(self._port_key, None)
            self._sync_watches()
            self._start_view()
            world_size = node.completed.world_size
            rank = node.rank
            logger.info(
                "run %r round %d complete in %.3f s: rank %d of %d",
                self._run_id, node.completed_round, time.monotonic() - start, rank, world_size,
            )
            master_addr, master_port = node.master
        store = EtcdStore(
            self._client, self._keys.kv(node.completed_round), timeout=self._store_timeout,
            lease=self._keys.data_lease,
        )
        # Rank 0's address and port came with the world record; the freezer also
        # put them in the round's store as MASTER_ADDR/MASTER_PORT.
        store_info = RendezvousStoreInfo(master_addr, master_port)
        return RendezvousInfo(store, rank, world_size, store_info)

    def _out_of_time(self, err: RendezvousConnectionError) -> RendezvousTimeoutError:
        """What a call raises for ``err`` past its deadline: a request was still
        failing when the call's time ran out (its retries end then), and what
        the caller asked for is a timeout."""
        return RendezvousTimeoutError(
            f"run {self._run_id!r}: no round completed within {self._timeout:g} s; "
            f"the last request to etcd had not succeeded by then: {err}"
        )

    def _describe_wait(self, waited: float) -> str:
        """What this node waited for, for a timeout: the round, who joined it, since when."""
        since = time.strftime("%H:%M:%S UTC", time.gmtime(time.time() - waited))
        state = self._node.state
        if state is None:
            return f"no node has opened the run (no state record); waiting since {since}"
        r = state.round
        try:
            # One read, on the way out: the count as it is now, not at this node's join.
            joined = self._client.count(self._keys.members(r), once=True)
        except RendezvousConnectionError:
            joined = None
        status = state.status
        if status == _state.Status.FROZEN:
            what = f"round {r} froze with {state.world_size} members and waits for them to confirm"
        elif status == _state.Status.FINAL:
            what = (
                f"round {r} completed with {state.world_size} members; round {r + 1} opens "
                "when one of them calls next_rendezvous() again"
            )
        elif joined is None:
            what = (
                f"round {r} is {_state.status_name(status)} and needs min_nodes="
                f"{state.min_nodes} (how many joined is unknown: etcd did not answer)"
            )
        else:
            what = (
                f"{joined} of the min_nodes={state.min_nodes} nodes needed joined round {r} "
                f"(max_nodes={state.max_nodes})"
            )
        return f"{what}; waiting since {since}"

    def _withdraw(self) -> None:
        """Remove this node's keys from the round it is leaving.

        One attempt, no retries: this runs on the way out of a failed call,
        often because etcd is unreachable. If it fails, the node's session is
        abandoned instead (``Session.abandon``: a lease of its own is no longer
        kept alive, so the keys vanish within ``lease_ttl``; on a shared lease
        they are deleted in the background), and the next call joins as a new
        node.
        """
        if not self._delete_own_keys():
            self._session_abandoned = True
        self._node.left()
        self._drop_watches(["round", "waiting"])

    def _delete_own_keys(self) -> bool:
        """Delete the keys this node holds in its round (one attempt); False
        if etcd did not take the deletes and the session was abandoned."""
        ops = self._node.cleanup_ops()
        if not ops or self._session.lost:
            return True
        try:
            self._client.txn([], ops, [], once=True)
        except RendezvousError as err:  # never in place of the error being reported
            logger.warning(
                "could not withdraw node %s from run %r (%s); %s",
                self._session.node_id, self._run_id, err,
                "its keys are deleted in the background" if self._session.shared else
                f"its lease is abandoned and its keys expire within {self._lease_ttl} s",
            )
            self._session.abandon(ops)
            return False
        return True

    def is_closed(self) -> bool:
        """Return whether the run is closed.

        After a completed round this comes from the node's view of the run (no
        request to etcd, and no error while etcd is unreachable); before the
        first round it reads the state record once.
        """
        self._check_not_shut_down()
        view = self._current_view()
        if view is not None:
            return bool(view.closed)
        got = self._client.get(self._keys.state)
        if got is None:
            return False
        return _state.decode_state(got[0], self._keys.state).status == _state.Status.CLOSED

    def set_closed(self) -> None:
        """Close the run for every node, now and later; works before any round.

        Safe to call from another thread while this handler waits in
        ``next_rendezvous()``, which then raises ``RendezvousClosedError``.
        """
        self._check_not_shut_down()
        # A machine of its own, so as not to race the one next_rendezvous() drives.
        node = self._new_node(b"")
        node.begin_close()
        while True:
            action = node.next_action(time.monotonic())
            if action.step == _state.Step.STEP_DONE:
                return
            if action.step == _state.Step.STEP_WAIT:
                # Only a backoff after a lost compare-and-swap: at most 50 ms.
                time.sleep(max(0.0, action.wake_at - time.monotonic()))
            else:
                _carry_out(node, action, self._client)

    def num_nodes_waiting(self) -> int:
        """Return how many nodes wait for a round after the one this node completed.

        These are late nodes, surplus nodes beyond ``max_nodes``, members that
        already started the next round, and members of the completed round that
        were lost (their lease expired: dead, hung or cut off; or they shut down).
        Lost members are counted on purpose: torch's agent re-rendezvous when
        this is > 0, which re-forms the job without them. The answer is at least
        1 once the run moved on to a round this node is not in.

        It comes from a view of the run that one watch keeps current: no
        request to etcd per call. This node's lease keep-alives show the watch's
        connection alive; when they stop being answered, a read checks the view
        once ``lease_ttl`` has passed since the last answer. While etcd is
        unreachable it answers from that view (a warning is logged once) and
        never raises; the view catches up when etcd is back.

        Returns:
            The count; 0 before this node completed a round.
        """
        self._check_not_shut_down()
        view = self._current_view()
        return 0 if view is None else int(view.num_waiting())

    def waiting_nodes(self) -> list[str]:
        """Return the ids of the nodes waiting for the next round or already in it.

        Part of what ``num_nodes_waiting()`` counts (from the same view, without
        a request to etcd); a launcher that wants to know why it should
        re-rendezvous reads this and ``lost_members()``.

        Returns:
            Node ids, sorted; empty before this node completed a round.
        """
        self._check_not_shut_down()
        view = self._current_view()
        return [] if view is None else list(view.waiting_nodes())

    def lost_members(self) -> list[str]:
        """Return the ids of the completed round's members that were lost.

        A member is lost when its keys vanished: its lease expired (the node
        died, hung or was cut off from etcd for ``lease_ttl``) or it shut down.
        This node's own id is there if its own lease expired.

        Returns:
            Node ids, sorted; empty before this node completed a round.
        """
        self._check_not_shut_down()
        view = self._current_view()
        return [] if view is None else list(view.lost_members())

    # ------------------------------------------------------- between rounds
    def _start_view(self) -> None:
        """Start the view of the run after completing a round (watched lazily)."""
        node = self._node
        with self._view_lock:
            self._view = _state.RunView(
                self._keys, node.completed, node.completed_mod, node.world,
                float(self._lease_ttl),
            )
            self._view_rewatch = False

    def _stop_view(self) -> None:
        """Forget the view and stop its watch (a new round, or shutdown)."""
        with self._view_lock:
            self._view = None
            self._cancel_view_watch()

    def _cancel_view_watch(self) -> None:
        if self._view_watch is not None:
            self._view_watch[1].cancel()
            self._view_watch = None

    def _current_view(self) -> Any:
        """The view of the run, with what its watch and reads delivered applied.

        Starts, in the background, what the view needs: its first read and its
        watch, a new watch when its range changes, a read and a new watch when
        the watch broke or missed changes, and a read when nothing confirmed
        the watch for ``lease_ttl`` (see ``_confirm_view``). Only the first
        call after a round waits for etcd (its read, at most
        ``_FIRST_READ_WAIT`` s); the others never do.
        """
        with self._view_lock:
            view = self._view
            if view is None:
                return None
            now = time.monotonic()
            if self._view_watch is not None:
                for item in self._view_watch[2].drain(0):
                    if item[0] == "error":
                        # It could not be resumed (etcd gone for connect_timeout,
                        # or its revision compacted): a read and a new watch.
                        logger.debug("run %r: the view's watch ended: %s", self._run_id, item[2])
                        self._cancel_view_watch()
                        self._view_rewatch = True
                        break
                    view.observe_events(item[1])
            # After the events that arrived before them: a read is then less
            # often ahead of the watch only because its events are in flight.
            for item in self._view_jobs.drain(0):
                self._view_job_done(view, item, now)
            self._confirm_view(view)
            spec = view.watch_spec()
            if spec is None:
                self._cancel_view_watch()
            need_watch = spec is not None and (
                self._view_watch is None or self._view_watch[0] != spec or self._view_rewatch
            )
            # A watch that broke is re-created from a read, as is one that missed
            # changes (a stream gone quiet); a mere change of range is not.
            need_read = view.check_due(now) or (need_watch and self._view_rewatch)
            if (need_watch or need_read) and not self._view_job_running \
                    and now >= self._view_retry_at:
                self._view_job_running = True
                threading.Thread(
                    target=self._view_job,
                    # A read with a new watch leaves out the count of the round's
                    # members (a walk of all N in etcd, by every node): the
                    # watch names those lost since the last one's events.
                    args=(view, view.read_ops(count=not need_watch) if need_read else None,
                          spec if need_watch else None, view.watch_start),
                    name="rdzv-view", daemon=True,
                ).start()
                # The first call after a round, and one after a silence longer
                # than lease_ttl (this process was stopped, or nobody asked), wait
                # for the read rather than answer from what may be long stale.
                if view.unread or now - self._view_last_call > self._lease_ttl:
                    for item in self._view_jobs.drain(_FIRST_READ_WAIT):
                        self._view_job_done(view, item, time.monotonic())
            self._view_last_call = now
            return view

    def _confirm_view(self, view: Any) -> None:
        """Confirm the view's watch by the node's lease keep-alives, which cost
        nothing more: answered without a gap since the view was last checked,
        on the connection that carries the watch, they show that the watch's
        stream is alive (a connection that died or hung would have stopped
        answering them, and a stream that broke would have said so). Then no
        read is needed. With several endpoints (or a name that may resolve to
        several members) the keep-alives and the watch may go to different
        members, and only gRPC's pings find a dead one: they confirm the watch
        only if they do so within ``lease_ttl``.
        """
        if self._view_watch is None or self._view_rewatch:
            return
        if not self._client.one_connection and self._lease_ttl < DEAD_CONNECTION_WITHIN:
            return
        since, last = self._session.answered_span
        if since <= view.verified_at:
            view.confirm(last)

    def _view_job(self, view: Any, read_ops: list | None, spec: Any, start: int) -> None:
        """In the background: read what the view holds, and/or watch its range.

        The watch starts at ``start``, right after what the last one delivered,
        even after a read: it then also names the members lost in between. If
        that revision was compacted, it starts after a read instead.
        """
        try:
            read = None
            if read_ops is not None:
                # One attempt: a failed check is retried by a later call, which
                # meanwhile answers from the view.
                _, revision, results = self._client.txn([], read_ops, [], once=True)
                read = (revision, results)
            watch = None
            if spec is not None:
                try:
                    watch = self._new_view_watch(spec, start)
                except WatchRefused:
                    # Its start was compacted: a read counts the members lost
                    # before it, which that watch would have named.
                    _, revision, results = self._client.txn([], view.read_ops(), [])
                    read = (revision, results)
                    watch = self._new_view_watch(spec, read[0] + 1)
            self._view_jobs.put(("done", view, read, watch))
        except RendezvousError as err:
            self._view_jobs.put(("failed", view, err))
        except Exception as err:  # the handler was shut down meanwhile (channel closed)
            if not self._shutdown:
                raise
            logger.debug("run %r: view read after shutdown: %s", self._run_id, err)

    def _new_view_watch(self, spec: Any, start: int) -> tuple[Any, Watch, Inbox, int]:
        inbox = Inbox()
        key, range_end = spec
        # The view's inbox wakes nobody (it is read when asked): the process's
        # nodes share one etcd watch of the range.
        watch = Watch(self._client, key, start, inbox, "view", range_end=range_end,
                      share=start > 0)
        return spec, watch, inbox, start

    def _view_job_done(self, view: Any, item: tuple[Any, ...], now: float) -> None:
        self._view_job_running = False
        kind, job_view = item[0], item[1]
        if kind == "failed":
            self._view_retry_at = now + min(1.0, self._lease_ttl / 4)
            if self._view_outage is None:
                self._view_outage = now
                logger.warning(
                    "run %r: cannot check the view of the run (%s); num_nodes_waiting() and "
                    "is_closed() answer from what it knew at revision %d until etcd answers",
                    self._run_id, item[2], view.revision,
                )
            return
        read, watch = item[2], item[3]
        if job_view is not view or self._shutdown:
            if watch is not None:
                watch[1].cancel()
            return
        if watch is not None:
            self._cancel_view_watch()
            self._view_watch = watch[:3]
            self._view_rewatch = False
            view.observe_watch_start(watch[3])
        if read is not None:
            corrected = view.observe_read(read[0], read[1], now, watch is not None)
            if corrected and watch is None:
                # Events in flight when the read ran look the same: no warning.
                logger.info(
                    "run %r: the view's watch missed changes up to revision %d; watching again",
                    self._run_id, read[0],
                )
                self._view_rewatch = True
        if self._view_outage is not None:
            logger.info("run %r: etcd answers again after %.1f s; the view of the run is "
                        "current (revision %d)", self._run_id, now - self._view_outage,
                        view.revision)
            self._view_outage = None

    def shutdown(self) -> bool:
        """Release this node's lease, watches and connection; idempotent.

        A ``next_rendezvous()`` waiting in another thread wakes up and raises
        ``RendezvousError``.

        Returns:
            True.

        Raises:
            ForkedProcessError: the handler was created before this process was
                forked from its creator; the lease and connection are the
                parent's, which keeps using them.
        """
        self._check_process()
        with self._shutdown_lock:
            if self._shutdown:
                return True
            self._shutdown = True
        _futex.nodes.remove()
        self._inbox.put(("shutdown",))
        self._stop_view()
        with self._lock:
            self._drop_watches(list(self._watches))
            try:
                self._run_leases.release()
                # A shared lease stays with the process's other nodes: this
                # node's keys go one by one instead.
                if self._session.shared:
                    self._delete_own_keys()
                self._session.close()
            finally:
                self._client.close()
        return True

    def _check_process(self) -> None:
        self._client.check_process(f"the rendezvous handler of run {self._run_id!r}")

    def _check_not_shut_down(self) -> None:
        self._check_process()
        if self._shutdown:
            raise RendezvousError(
                f"the rendezvous handler of run {self._run_id!r} was shut down; create a new one"
            )

    @property
    def round(self) -> int:
        """The round this node last completed (-1 before its first)."""
        return self._node.completed_round

    @property
    def node_id(self) -> str:
        """This node's id in etcd: its lease id in hex (on a shared lease, the
        second and later nodes add ``-<n>``)."""
        return self._node.node_id

    @property
    def lease_id(self) -> int:
        """This node's lease id (with ``lease_scope=process``, its process's)."""
        return self._session.lease_id


class _Round:
    """A ``next_rendezvous()`` call as its connection's round driver steps it
    (``rdzv.driver.Round``)."""

    __slots__ = ("_handler", "client", "deadline", "inbox", "node")

    def __init__(self, handler: EtcdRendezvousHandler, deadline: float) -> None:
        self._handler = handler
        self.node = handler._node
        self.client = handler._round_client
        self.inbox = handler._inbox
        self.deadline = deadline

    def absorb(self) -> bool:
        return self._handler._absorb()

    def watches_stale(self) -> bool:
        return self._handler._watches_stale()

    def run(self, job: tuple[Any, ...]) -> None:
        if job[0] == "request":
            _carry_out(self.node, job[1], self.client)
        else:
            self._handler._sync_watches()

    def read(self, action: Any) -> Any:
        return _request(action, self.client)


def _request(action: Any, client: EtcdClient) -> Any:
    """Run the request a node machine asked for; return its answer."""
    if action.step == _state.Step.STEP_TXN:
        return client.txn(action.compares, action.success, action.failure, once=action.once)
    return client.get(action.key)


def _carry_out(node: Any, action: Any, client: EtcdClient) -> None:
    """Run the request a node machine asked for; hand it the answer or the error."""
    try:
        answer = _request(action, client)
    except RendezvousError as err:
        node.fail(err)
    else:
        node.feed(answer)


def _compacted(err: BaseException) -> bool:
    """Whether a watch was refused because its start revision was compacted."""
    return isinstance(err, WatchRefused) and "compacted" in str(err)


def create_rdzv_handler(params: RendezvousParameters) -> EtcdRendezvousHandler:
    """Create an etcd v3 rendezvous handler from parameters.

    Options (``params.config``, torchrun's ``--rdzv-conf``) are listed in
    ``RENDEZVOUS_OPTIONS``. etcd is contacted here (a lease is granted), so an
    unreachable endpoint raises ``RendezvousConnectionError`` from this call.

    Raises:
        ValueError: the backend is not one of ``BACKEND_NAMES``, or an option is
            unknown or malformed (the message says which).
        RendezvousConnectionError: etcd cannot be reached within connect_timeout.
    """
    if not isinstance(params, RendezvousParameters):
        raise TypeError(f"expected RendezvousParameters, got {type(params).__name__}")
    if params.backend not in BACKEND_NAMES:
        raise ValueError(
            f"The rendezvous backend {params.backend!r} is not rdzv's; rdzv answers to "
            f"{', '.join(repr(name) for name in BACKEND_NAMES)} (torchrun: "
            "--rdzv-backend=etcd3)."
        )
    options = RendezvousOptions.from_params(params)
    client = EtcdClient(options.etcd)
    try:
        return EtcdRendezvousHandler(
            client,
            run_id=params.run_id,
            backend=params.backend,
            min_nodes=params.min_nodes,
            max_nodes=params.max_nodes,
            timeout=options.timeout,
            last_call_timeout=options.last_call_timeout,
            etcd_prefix=options.etcd_prefix,
            lease_ttl=options.lease_ttl,
            keepalive_interval=options.keepalive_interval,
            local_addr=options.local_addr,
            store_timeout=options.store_timeout,
            closed_run_grace=options.closed_run_grace,
            run_idle_timeout=options.run_idle_timeout,
            topology=options.topology,
            rank_order=options.rank_order,
            lease_scope=options.lease_scope,
        )
    except BaseException:
        client.close()
        raise
