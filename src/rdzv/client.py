"""The one way rdzv talks to etcd: connection, retries, errors.

Where etcd is and how to reach it (``EtcdConfig``) is read by ``rdzv.config``.

``EtcdClient`` wraps an ``etcd3`` client (imported through ``_etcd3_compat`` so
that any protobuf works) and speaks raw etcd v3 requests. Transactions are given
as plain tuples, which keeps the compiled core free of protobuf and I/O;
``rdzv.txn`` says what they mean and translates them.

Every gRPC failure that means "etcd is not there" becomes a
``RendezvousConnectionError`` naming the endpoints; transient ones are retried
as the client's ``RetryPolicy`` (``rdzv.retry``) says, with jittered
exponential backoff for at most ``connect_timeout`` seconds. A write under a
lease that etcd no longer has, or a retry past the policy's horizon, raises
``LeaseLostError`` instead.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from rdzv import _mux
from rdzv._etcd3_compat import load_etcd3
from rdzv._mux import KeepAliveHub, KeptLease, WatchHandle, WatchMux, WatchRefused
from rdzv.api import RendezvousConnectionError, RendezvousError
from rdzv.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_PORT,
    MAX_SECONDS,
    EtcdConfig,
    host_text,
    parse_endpoints,
    seconds_option,
)
from rdzv.driver import RoundDriver
from rdzv.retry import Failure, OutOfTime, RetryPolicy, classify, explain
from rdzv.txn import (
    compare_holds,
    is_read_only,
    prefix_end,
    range_request,
    range_result,
    request_op,
    txn_request,
    txn_results,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_PORT",
    "MAX_SECONDS",
    "EtcdClient",
    "EtcdConfig",
    "ForkedProcessError",
    "HeldLease",
    "LeaseLostError",
    "parse_endpoints",
    "seconds_option",
    "txn_request",
]

logger = logging.getLogger(__name__)

# etcd's "require leader" metadata (clientv3.WithRequireLeader): a member cut off
# from its cluster's leader answers "no leader" at once, and cancels such watch
# and keep-alive streams, instead of holding them until a deadline. With a
# round-robin channel the retry then goes to another member.
_REQUIRE_LEADER = ("hasleader", "true")
_WATCH_CREATE_TIMEOUT = 30.0


class LeaseLostError(RendezvousError):
    """The lease a request works for is gone: etcd answered "requested lease not
    found" (it expired), or the horizon of the client's ``RetryPolicy`` passed
    while the request was being retried. Retrying cannot help; the node must start over
    with a new lease."""


# gRPC pings on every connection: etcd refuses them more often than every 5 s
# (--grpc-keepalive-min-time).
_PING_EVERY_MS = 6_000
_PING_TIMEOUT_MS = 2_000
#: Seconds within which the pings find a connection dead that answers nothing.
DEAD_CONNECTION_WITHIN = (_PING_EVERY_MS + _PING_TIMEOUT_MS) / 1000


class HeldLease:
    """A lease kept alive on a connection while any of its clients holds it.

    ``gone`` is set once etcd no longer has the lease, or once no keep-alive
    was answered for its TTL.
    """

    def __init__(self, lease_id: int) -> None:
        self.lease_id = lease_id
        self.users = 0
        self.stop = threading.Event()
        self.gone = threading.Event()

    def _answered(self, ttl: int) -> None:
        if ttl <= 0:
            self.gone.set()


class _Connection:
    """One gRPC channel to etcd with its watch and keep-alive streams, shared by
    the process's clients that have the same configuration."""

    def __init__(self, etcd: Any, rpc: Any) -> None:
        self.etcd = etcd
        self.users = 0
        self.held: dict[int, HeldLease] = {}
        self.pid = os.getpid()
        #: Whether a failure already led to the check for a TLS endpoint.
        self.tls_checked = False
        self.watches = WatchMux(rpc.WatchStub(etcd.channel), rpc)
        self.keepalives = KeepAliveHub(rpc.LeaseStub(etcd.channel), rpc, lambda: etcd.metadata)
        self.driver = RoundDriver()
        #: The nodes' shared leases by (TTL, keep-alive interval), and their lock
        #: (``rdzv.session``).
        self.shared_leases: dict[Any, Any] = {}
        self.shared_leases_lock = threading.Lock()
        with _live_lock:
            _live_connections.add(self)

    def quiesce(self, deadline: float) -> bool:
        """Close the streams (they reopen when next needed: watches resume from
        the revision after their last event, keep-alives go on at their next
        beat) and wait until gRPC has finished them, up to ``deadline``.

        Returns:
            Whether gRPC finished every call of the channel, and their threads
            ended, in time.
        """
        quiet = self.watches.close(deadline)
        quiet = self.keepalives.close_stream(deadline) and quiet
        return self._calls_ended(deadline) and quiet

    def _calls_ended(self, deadline: float) -> bool:
        """Wait until gRPC has finished every call of the channel, up to
        ``deadline``; whether it did."""
        # gRPC polls a channel's calls from a thread of its own until the last
        # one has ended; its count is the only sign that it stopped.
        calls = getattr(self.etcd.channel, "_call_state", None)
        while calls is not None and getattr(calls, "managed_calls", 0):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def close(self) -> None:
        """Close the streams and the channel; their threads, and gRPC's
        polling of the channel's calls, have ended on return, unless they took
        longer than a moment (then it is logged)."""
        self.driver.close()
        ended = self.watches.close()
        ended = self.keepalives.close() and ended
        self.etcd.close()
        ended = self._calls_ended(time.monotonic() + _mux._THREAD_EXIT_TIMEOUT) and ended
        if not ended:
            logger.warning("the connection to etcd closed but some of its stream threads "
                           "had not ended after %g s", _mux._THREAD_EXIT_TIMEOUT)


# Connections by (process id, configuration). A forked child shares its parent's
# sockets but not the threads that serve them: it must never use, nor close, a
# connection its parent opened (closing one could write on the parent's socket).
# The process id in the key keeps a child from finding them; the parent's
# entries stay referenced, so they are never closed in the child.
_connections: dict[tuple[Any, ...], _Connection] = {}
_connections_lock = threading.Lock()
#: Every open connection, shared or not, for the fork handlers.
_live_connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
_live_lock = threading.Lock()  # held for a moment only, never while waiting
#: In a forked child, the parent's connections: kept, never collected, because
#: gRPC closes a collected channel, which would write on the parent's socket.
_inherited: list[_Connection] = []
#: How long a fork waits for the process's requests and streams to finish.
FORK_QUIESCE_TIMEOUT = 2.0


def _before_fork() -> None:
    deadline = time.monotonic() + FORK_QUIESCE_TIMEOUT
    # A request still inside may hold a connection's locks: its streams are then
    # left as they are.
    quiet = _mux.fork_gate.close(FORK_QUIESCE_TIMEOUT)
    with _live_lock:
        connections = list(_live_connections) if quiet else []
    for connection in connections:
        if connection.pid == os.getpid():
            quiet = connection.quiesce(deadline) and quiet
    if not quiet:
        logger.warning(
            "forking while etcd requests are still in flight after %g s: a child that "
            "uses gRPC may abort in it (gRPC does not support fork() during calls)",
            FORK_QUIESCE_TIMEOUT,
        )


def _after_fork_in_parent() -> None:
    _mux.fork_gate.open()


def _after_fork_in_child() -> None:
    # A parent's thread may have held the lock at the fork; it never lets go here.
    global _connections_lock, _live_lock
    _connections_lock = threading.Lock()
    _live_lock = threading.Lock()
    _inherited.extend(_live_connections)


_fork_hooks_registered = False


def _register_fork_hooks() -> None:
    """Register the fork handlers, once, after gRPC registered its own (with the
    first channel): handlers registered later run first before a fork, so the
    process is quiet when gRPC's (``GRPC_ENABLE_FORK_SUPPORT=1``) checks it."""
    global _fork_hooks_registered
    if not _fork_hooks_registered:
        _fork_hooks_registered = True
        os.register_at_fork(
            before=_before_fork, after_in_parent=_after_fork_in_parent,
            after_in_child=_after_fork_in_child,
        )


class ForkedProcessError(RendezvousError):
    """An rdzv object was used in a process forked after it was created.

    A handler, store or client belongs to the process that created it: its
    connection's streams and keep-alives are served by threads that a forked
    child does not have, and its lease is the parent's. In the child, create a
    new handler; the parent's objects keep working in the parent.
    """


class _Use:
    """A client's use of a connection, given back once: ``EtcdClient.close``
    of the client or of any client ``with_retry`` made from it releases it, and
    every later close finds it released."""

    def __init__(self, connection: _Connection, key: tuple[Any, ...]) -> None:
        self.connection = connection
        self.key = key
        self.released = False


class EtcdClient:
    """A connection to etcd with the few raw v3 calls rdzv needs.

    Clients of one process with the same configuration share one gRPC channel,
    one watch stream and one keep-alive stream (each client has its own stubs
    and retry policy): a thousand nodes in one process cost a few threads, not
    a few thousand.

    Args:
        config: where and how to connect.
        shared: share the connection with the process's other clients of the
            same configuration (False: a channel of its own).
        interceptors: gRPC client interceptors (``grpc.UnaryUnaryClientInterceptor``)
            that this client's key-value and lease requests pass through, each
            attempt on its own, beneath the retries: an error one raises is
            handled as etcd's would be. The connection's watch and keep-alive
            streams do not pass through them. For tracing, or to inject faults
            into one handler (``EtcdRendezvousHandler`` takes the client).
        retry: how requests are retried (default: ``RetryPolicy`` with the
            configuration's ``connect_timeout``).

    Attributes:
        config: the configuration it was created with.
        retry: its ``RetryPolicy``; ``with_retry`` gives the client under another.
    """

    def __init__(
        self,
        config: EtcdConfig,
        shared: bool = True,
        interceptors: Sequence[grpc.UnaryUnaryClientInterceptor] = (),
        retry: RetryPolicy | None = None,
    ) -> None:
        self.config = config
        self.retry = retry or RetryPolicy(connect_timeout=config.connect_timeout)
        etcd3 = load_etcd3()
        self._rpc = etcd3.etcdrpc
        host, port = self._target()
        kwargs: dict[str, Any] = {
            "host": host,
            "port": port,
            "grpc_options": [
                # A member behind a partition answers nothing, not even a reset:
                # pings find it out within DEAD_CONNECTION_WITHIN.
                ("grpc.keepalive_time_ms", _PING_EVERY_MS),
                ("grpc.keepalive_timeout_ms", _PING_TIMEOUT_MS),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1_000),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                # Every member gets a connection and requests take turns, so a
                # retry does not go back to a member that cannot serve it.
                ("grpc.lb_policy_name", "round_robin"),
            ],
        }
        if config.protocol == "https":
            kwargs.update(ca_cert=config.cacert, cert_cert=config.cert, cert_key=config.key)
            if config.cacert is None:
                raise ValueError("protocol=https needs 'cacert', the CA that signs etcd's cert.")
        self._pid = os.getpid()
        key = (self._pid, config.endpoints, config.protocol, config.cacert,
               config.cert, config.key, config.username, config.password)
        with _connections_lock:
            connection = _connections.get(key) if shared else None
            if connection is None:
                try:
                    etcd = self._retrying(
                        lambda _timeout: etcd3.client(
                            user=config.username, password=config.password, **kwargs
                        ),
                        "authenticate",
                    )
                except FileNotFoundError as e:
                    raise ValueError(
                        f"Cannot read TLS file {e.filename!r}: {e.strerror}."
                    ) from None
                # The auth token travels as plain metadata on every call. etcd3
                # would also attach it as gRPC call credentials, which gRPC refuses
                # to send over a channel without TLS: auth over http would fail.
                etcd.call_credentials = None
                etcd.metadata = (*(etcd.metadata or ()), _REQUIRE_LEADER)
                _register_fork_hooks()
                connection = _Connection(etcd, self._rpc)
                if shared:
                    _connections[key] = connection
            connection.users += 1
        self._use = _Use(connection, key)
        self._connection = connection
        self._etcd = connection.etcd
        # Stubs of this client's own (on the shared channel).
        channel = self._etcd.channel
        if interceptors:
            channel = grpc.intercept_channel(channel, *interceptors)
        self._kv = self._rpc.KVStub(channel)
        self._leases = self._rpc.LeaseStub(channel)
        self._intercepted = bool(interceptors)

    def check_process(self, what: str = "this etcd client") -> None:
        """Refuse to work in a process forked after this client was created.

        Args:
            what: the object to name in the message.

        Raises:
            ForkedProcessError: the current process is not the one that created
                the client.
        """
        pid = os.getpid()
        if pid != self._pid:
            raise ForkedProcessError(
                f"{what} was created in process {self._pid} and cannot be used in process "
                f"{pid}, forked from it: its connection to etcd and its lease belong to "
                f"the parent. Create a new handler in this process; the parent's keeps "
                f"working there."
            )

    def with_retry(self, retry: RetryPolicy) -> EtcdClient:
        """This client, retrying its requests under ``retry`` instead.

        The two are one client for everything but the retries: the same
        connection, stubs and use of the connection, which the first ``close()``
        of either gives back (once; later closes of either do nothing). A
        handler retries its round's requests only while its lease may be alive
        with ``client.with_retry(client.retry.bounded(expiry))``.

        Args:
            retry: the policy of the returned client's requests.

        Returns:
            A client that shares this one's connection.
        """
        # The same attributes (a subclass's too), the one use of the connection
        # among them; only the policy differs.
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.retry = retry
        return other

    @property
    def one_connection(self) -> bool:
        """True if every stream of this client shares one connection: one etcd
        endpoint given as an address (a name may resolve to several members,
        between which gRPC balances)."""
        endpoints = self.config.endpoints
        return len(endpoints) == 1 and (
            _is_ipv4(endpoints[0][0]) or ":" in endpoints[0][0])

    def _target(self) -> tuple[str, int]:
        endpoints = self.config.endpoints
        if len(endpoints) == 1:
            return host_text(endpoints[0][0]), endpoints[0][1]
        # etcd3 formats "{host}:{port}"; a gRPC "ipv4:"/"ipv6:" target lists every
        # address and lets gRPC fail over between them.
        hosts = [h for h, _ in endpoints]
        if all(_is_ipv4(h) for h in hosts):
            scheme = "ipv4:"
        elif all(":" in h for h in hosts):
            scheme = "ipv6:"
        else:
            raise ValueError(
                "Several etcd endpoints must all be IPv4 or all IPv6 addresses "
                f"(gRPC fails over between addresses, not names); got {self.config.describe()}."
            )
        head = ",".join(f"{host_text(h)}:{p}" for h, p in endpoints[:-1])
        last_host, last_port = endpoints[-1]
        return f"{scheme}{head},{host_text(last_host)}", last_port

    # ---------------------------------------------------------------- errors
    def _connection_error(self, what: str, err: BaseException) -> RendezvousConnectionError:
        detail = err.details() if hasattr(err, "details") else str(err)
        detail = detail or type(err).__name__
        return RendezvousConnectionError(
            f"{explain(detail)} at {self.config.describe()} ({what}): {detail}"
        )

    def _retrying(
        self, fn: Callable[[float], Any], what: str, once: bool = False, gated: bool = True
    ) -> Any:
        """Call ``fn(attempt_timeout)``, retrying failures as ``self.retry`` says.

        The rules are ``rdzv.retry``'s; here they are carried out. An expired
        auth token is renewed once and the call retried. A lease etcd no
        longer has raises ``LeaseLostError``, as does a failed attempt past the
        policy's horizon.

        With ``once``, a single attempt is made (for best-effort clean-up).
        Each attempt passes the fork gate (``rdzv._mux.ForkGate``) unless
        ``gated`` is False (for ``fn`` that pass it themselves).

        Raises:
            ForkedProcessError: this client was created in another process.
        """
        self.check_process()
        attempts = self.retry.start()
        renewed = False
        while True:
            try:
                if not gated:
                    return fn(attempts.timeout)
                with _mux.fork_gate:
                    return fn(attempts.timeout)
            except Exception as err:
                failure = classify(err)
                if not isinstance(err, grpc.RpcError):
                    if failure is Failure.FATAL or once:
                        raise
                else:
                    if failure is Failure.TOKEN_EXPIRED:
                        if (not renewed and self.config.username is not None
                                and hasattr(self, "_etcd")):
                            renewed = True
                            self._authenticate()
                            continue
                        failure = Failure.FATAL
                    if failure is Failure.LEASE_LOST:
                        raise LeaseLostError(
                            f"etcd at {self.config.describe()} no longer has the lease "
                            f"({what}): {err.details() if hasattr(err, 'details') else err}"
                        ) from None
                    if failure is Failure.FATAL or once:
                        raise self._connection_error(what, err) from None
                    if self.config.protocol == "http" and self._serves_tls():
                        raise RendezvousConnectionError(
                            f"TLS failure talking to etcd at {self.config.describe()} ({what}): "
                            "etcd serves https there; use protocol=https with cacert"
                        ) from None
                last_error: BaseException = err
            try:
                delay = attempts.wait(failure)
            except OutOfTime as out:
                if out.horizon:
                    raise LeaseLostError(
                        f"gave up on the {what}: the lease it needs has presumably expired (no "
                        f"keep-alive answered for its TTL) and "
                        f"{self._connection_error(what, last_error)}"
                    ) from None
                raise self._connection_error(what, last_error) from None
            time.sleep(delay)

    def _serves_tls(self) -> bool:
        """Whether an endpoint answers a TLS handshake (a plain-http client then
        only sees its connection closed). Checked once per connection, on its
        first failure: under load, every client of a process failing at once
        must not each open sockets and load certificates."""
        connection = self._connection
        if connection.tls_checked:
            return False
        connection.tls_checked = True
        # A context that verifies nothing, so none of the system's CA
        # certificates are loaded: OpenSSL loading them in this thread while
        # the interpreter exits (a daemon thread whose request failed because
        # etcd went away) crashed the process.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        for host, port in self.config.endpoints:
            try:
                with socket.create_connection((host, port), timeout=0.5) as sock:
                    with context.wrap_socket(sock, server_hostname=host):
                        return True
            except (OSError, ssl.SSLError):
                continue
        return False

    def _authenticate(self) -> None:
        """Get a fresh auth token (etcd expires idle ones, 300 s by default)."""
        etcd = self._etcd
        response = etcd.auth_stub.Authenticate(
            self._rpc.AuthenticateRequest(
                name=self.config.username, password=self.config.password
            ),
            self.retry.attempt_timeout,
        )
        etcd.metadata = (("token", response.token), _REQUIRE_LEADER)

    def _call(
        self, stub_method: Callable[..., Any], request: Any, what: str, once: bool = False
    ) -> Any:
        etcd = self._etcd
        return self._retrying(
            lambda timeout: stub_method(request, timeout, metadata=etcd.metadata),
            what,
            once,
        )

    # ------------------------------------------------------------ key-value
    def get(self, key: bytes) -> tuple[bytes, int, int] | None:
        """Return ``(value, mod_revision, create_revision)`` of ``key``, or None."""
        response = self._call(self._kv.Range, self._rpc.RangeRequest(key=key), "get")
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return kv.value, kv.mod_revision, kv.create_revision

    def range(self, prefix: bytes, limit: int = 0, keys_only: bool = False) -> list[tuple]:
        """Return ``[(key, value, create_revision), ...]`` under ``prefix``, oldest first."""
        response = self._call(
            self._kv.Range, range_request(self._rpc, prefix, limit, keys_only), "range"
        )
        return [(kv.key, kv.value, kv.create_revision) for kv in response.kvs]

    def range_leases(self, prefix: bytes) -> list[tuple[bytes, bytes, int]]:
        """Return ``[(key, value, lease_id), ...]`` under ``prefix``, oldest first
        (lease id 0: the key has no lease)."""
        return [(key, value, lease) for key, value, lease, _ in self.range_records(prefix)]

    def range_records(self, prefix: bytes) -> list[tuple[bytes, bytes, int, int]]:
        """Return ``[(key, value, lease_id, mod_revision), ...]`` under ``prefix``,
        oldest first (lease id 0: the key has no lease)."""
        response = self._call(self._kv.Range, range_request(self._rpc, prefix, 0), "range")
        return [(kv.key, kv.value, kv.lease, kv.mod_revision) for kv in response.kvs]

    def lease_time_to_live(self, lease_id: int, once: bool = False) -> int:
        """Seconds left on a lease (-1: etcd no longer has it); ``once``: a
        single attempt."""
        return self.lease_ttls(lease_id, once)[0]

    def lease_ttls(self, lease_id: int, once: bool = False) -> tuple[int, int]:
        """``(seconds left, TTL it was granted with)`` of a lease (-1 left: etcd
        no longer has it); ``once``: a single attempt."""
        request = self._rpc.LeaseTimeToLiveRequest(ID=lease_id)
        response = self._call(self._leases.LeaseTimeToLive, request, "lease time-to-live",
                              once)
        return response.TTL, response.grantedTTL

    def count(self, prefix: bytes, once: bool = False) -> int:
        """Return how many keys start with ``prefix``; ``once``: a single attempt."""
        request = self._rpc.RangeRequest(
            key=prefix, range_end=prefix_end(prefix), count_only=True
        )
        return self._call(self._kv.Range, request, "count", once).count

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Store ``value`` at ``key``; return the new revision."""
        request = self._rpc.PutRequest(key=key, value=value, lease=lease)
        return self._call(self._kv.Put, request, "put").header.revision

    def delete(self, key: bytes, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it); return how many were deleted."""
        request = self._rpc.DeleteRangeRequest(key=key)
        if prefix:
            request.range_end = prefix_end(key)
        return self._call(self._kv.DeleteRange, request, "delete").deleted

    def txn(
        self,
        compares: Sequence[Sequence[Any]],
        success: Sequence[Sequence[Any]],
        failure: Sequence[Sequence[Any]] = (),
        once: bool = False,
    ) -> tuple[bool, int, list[Any]]:
        """Run one transaction; return ``(succeeded, revision, results)``.

        ``results`` has one entry per operation of the branch that ran, shaped as
        ``rdzv.txn`` says. With ``once``, one attempt and no retries.

        A transaction that only reads is not sent as one: etcd 3.5.0 to 3.5.4
        panic when a read-only transaction's request is cancelled while it runs
        (the client's deadline passed or its process died; etcd bug 14110,
        fixed in 3.5.5), and the etcd that rdzv ships is 3.5.1. It runs as plain
        range requests instead, all at the revision of the first, which is the
        snapshot the transaction would have read; a cancelled range is only an
        error. ``revision`` is that snapshot's.
        """
        if is_read_only(success, failure):
            return self._read_only_txn(compares, success, failure, once)
        request = txn_request(self._rpc, compares, success, failure)
        response = self._call(self._kv.Txn, request, "transaction", once)
        return _txn_answer(response, success, failure)

    def txn_nowait(
        self,
        compares: Sequence[Sequence[Any]],
        success: Sequence[Sequence[Any]],
        failure: Sequence[Sequence[Any]],
        done: Callable[[Any], None],
    ) -> bool:
        """Send a transaction without waiting for its answer: one attempt.

        ``done`` gets what ``txn`` would return, or the exception the attempt
        failed with (retry it with ``txn``), on a thread of gRPC's: it must
        not block. Nothing is sent, and False returned, for a transaction
        ``txn`` would send as range requests (one that only reads), or when
        this client's requests pass through interceptors (they may block, and
        would here block the caller).

        Raises:
            ForkedProcessError: this client was created in another process.
        """
        if self._intercepted or is_read_only(success, failure):
            return False
        self.check_process()
        request = txn_request(self._rpc, compares, success, failure)
        gate = _mux.fork_gate
        gate.__enter__()
        try:
            future = self._kv.Txn.future(
                request, self.retry.first_timeout(time.monotonic()),
                metadata=self._etcd.metadata)
        except BaseException:
            gate.__exit__(None, None, None)
            raise

        def answered(future: Any) -> None:
            gate.__exit__(None, None, None)
            try:
                response = future.result()
            except Exception as err:
                done(err)
                return
            done(_txn_answer(response, success, failure))

        future.add_done_callback(answered)
        return True

    def round_driver(self) -> RoundDriver:
        """The thread that steps the rendezvous calls of this client's connection."""
        return self._connection.driver

    def _read_only_txn(
        self,
        compares: Sequence[Sequence[Any]],
        success: Sequence[Sequence[Any]],
        failure: Sequence[Sequence[Any]],
        once: bool,
    ) -> tuple[bool, int, list[Any]]:
        """A transaction without writes, as range requests at one revision.

        The compared keys are read first (the first read fixes the revision),
        the compares decided here as etcd would, then the branch's reads run at
        that revision. Should etcd compact past it in between, the whole
        transaction is read again from a newer revision.
        """
        attempts = 0
        while True:
            revision = 0

            def read(request: Any) -> Any:
                nonlocal revision
                request.revision = revision
                response = self._call(_PinnedRange(self._kv.Range), request, "range", once)
                revision = revision or response.header.revision
                return response

            try:
                succeeded = True
                for kind, key, expected in compares:
                    kvs = read(self._rpc.RangeRequest(key=key)).kvs
                    succeeded = succeeded and compare_holds(kind, kvs, expected)
                ops = success if succeeded else failure
                results = [
                    range_result(op[0], read(request_op(self._rpc, op).request_range)) for op in ops
                ]
                if revision == 0:  # nothing to read at all: the current revision
                    read(self._rpc.RangeRequest(key=b"\0", count_only=True))
                return succeeded, revision, results
            except _Compacted as err:
                attempts += 1
                if attempts == _COMPACTED_RETRIES:
                    raise RendezvousConnectionError(
                        f"etcd at {self.config.describe()} compacted every revision a "
                        f"read started at, {attempts} times in a row: {err}"
                    ) from None

    # ---------------------------------------------------------------- leases
    def lease_grant(self, ttl: int) -> int:
        """Grant a lease of ``ttl`` seconds; return its id."""
        request = self._rpc.LeaseGrantRequest(TTL=ttl)
        return self._call(self._leases.LeaseGrant, request, "lease grant").ID

    def lease_ensure(self, lease_id: int, ttl: int) -> bool:
        """Grant the lease ``lease_id`` of ``ttl`` seconds unless etcd has it.

        Returns:
            True if this call granted it, False if it existed already.
        """
        request = self._rpc.LeaseGrantRequest(ID=lease_id, TTL=ttl)
        try:
            self._call(self._leases.LeaseGrant, request, "lease grant")
        except RendezvousConnectionError as err:
            if "lease already exists" in str(err):
                return False
            raise
        return True

    def hold_lease(self, lease_id: int, ttl: int, interval: float) -> HeldLease:
        """Keep ``lease_id`` alive for as long as any client of this connection holds it.

        The process's clients share one keep-alive per lease: a thousand
        handlers of one run in a process send one, not a thousand. Once the
        returned record is ``gone``, holding the lease again starts a new
        keep-alive. Give it back with ``release_lease``.
        """
        connection = self._connection
        with _connections_lock:
            held = connection.held.get(lease_id)
            if held is None or held.gone.is_set():
                held = HeldLease(lease_id)
                self.keep_alive(lease_id, ttl, interval, held.stop, held._answered, held.gone.set)
                connection.held[lease_id] = held
            held.users += 1
        return held

    def release_lease(self, held: HeldLease) -> None:
        """Give back a lease from ``hold_lease``; the last holder stops its keep-alive."""
        connection = self._connection
        with _connections_lock:
            held.users -= 1
            if held.users > 0:
                return
            held.stop.set()
            if connection.held.get(held.lease_id) is held:
                del connection.held[held.lease_id]
                connection.keepalives.remove(held.lease_id)

    def keep_alive(
        self,
        lease_id: int,
        ttl: float,
        interval: float,
        stop: threading.Event,
        answered: Callable[[int], None],
        silent: Callable[[], None],
    ) -> KeptLease:
        """Keep a lease alive in the background until ``stop`` is set.

        A keep-alive goes at once and then every ``interval`` seconds, on the
        connection's one keep-alive stream (replaced when it breaks or hangs).
        ``answered(ttl)`` gets each answer (0 or less: etcd no longer has the
        lease); ``silent()`` is called once if no answer came for ``ttl``
        seconds and etcd, then asked for the lease's TTL, did not answer
        within ``interval``; the lease is then no longer kept alive (if etcd
        says it still has the lease, the lease counts as renewed when etcd
        last renewed it). Both run on the stream's threads: they must not
        block. The returned record's ``last_answer`` tells when etcd last
        renewed the lease.
        """
        self.check_process()
        return self._connection.keepalives.add(lease_id, ttl, interval, stop, answered, silent)

    def shared_leases(self) -> tuple[dict[Any, Any], threading.Lock]:
        """The registry of leases that nodes on this connection share
        (``rdzv.session``), and the lock that guards it."""
        self.check_process()
        connection = self._connection
        return connection.shared_leases, connection.shared_leases_lock

    def stop_keep_alive(self, lease_id: int) -> None:
        """Stop keeping ``lease_id`` alive (as its ``stop`` event does)."""
        self.check_process()
        self._connection.keepalives.remove(lease_id)

    def lease_revoke(self, lease_id: int, once: bool = False) -> None:
        """Revoke a lease, deleting every key attached to it; ``once``: a
        single attempt."""
        request = self._rpc.LeaseRevokeRequest(ID=lease_id)
        try:
            self._call(self._leases.LeaseRevoke, request, "lease revoke", once)
        except RendezvousConnectionError as err:
            if "not found" not in str(err):
                raise

    # --------------------------------------------------------------- watches
    def watch(
        self,
        key: bytes,
        callback: Callable[[Any], None],
        start_revision: int,
        prefix: bool = False,
        no_put: bool = False,
        range_end: bytes | None = None,
        share: bool = False,
    ) -> WatchHandle:
        """Call ``callback(events)`` for changes of ``key`` from ``start_revision``.

        ``prefix`` watches every key under ``key``; ``range_end`` every key from
        ``key`` up to (not including) ``range_end``. With ``share`` (and a
        ``start_revision`` over 0), watches of the same range and filters on
        this connection share one etcd watch where they can: etcd then sends
        each event to the process once, and it is handed to each of them at
        once (for callbacks that record, not for ones that each wake a thread).

        ``start_revision`` 0 starts after the current revision, which the
        handle's ``created_revision`` then gives. A watch that starts in the
        past is served by etcd only at its next sync of lagging watchers, up to
        100 ms later; one that starts now gets every change at once.

        ``events`` is a list of ``(is_put, key, value, mod_revision)``, or the
        exception that ended the watch (it is then gone; watch again from the
        revision after the last event seen). The watches of a connection share
        one stream and one thread: callbacks must not block.

        Returns:
            A handle for ``cancel_watch``.

        Raises:
            RendezvousConnectionError: the watch could not be created.
        """
        rpc = self._rpc
        create = rpc.WatchCreateRequest(key=key, start_revision=start_revision)
        if range_end is not None:
            create.range_end = range_end
        elif prefix:
            create.range_end = prefix_end(key)
        if no_put:
            create.filters.append(rpc.WatchCreateRequest.NOPUT)

        renewed = False

        def start(_timeout: float) -> WatchHandle:
            nonlocal renewed
            # An unreachable etcd fails the stream at once (and is retried within
            # connect_timeout); a reachable but busy one may take a while to
            # confirm the watch, which is no reason to give up on it early.
            wait = max(self.config.connect_timeout, _WATCH_CREATE_TIMEOUT)
            now = time.monotonic()
            wait = min(wait, max(min(self.retry.until_horizon(now),
                                     self.retry.until_deadline(now)), 0.1))
            try:
                return self._connection.watches.watch(
                    create, callback, wait, self._etcd.metadata, share=share)
            except TimeoutError as err:
                raise _WatchNotStarted(grpc.StatusCode.DEADLINE_EXCEEDED, str(err)) from None
            except WatchRefused as err:
                if "permission denied" not in str(err):
                    raise
                if self.config.username is not None and not renewed:
                    # An expired token reads as "permission denied" on a watch.
                    renewed = True
                    self._authenticate()
                    return start(_timeout)
                raise self._connection_error("watch", err) from None
            except RuntimeError as err:  # the shared stream ended: a new one next time
                raise _WatchNotStarted(grpc.StatusCode.UNAVAILABLE, str(err)) from None

        # Not gated here: the watch passes the gate to open its stream, not while
        # it waits for etcd's confirmation.
        return self._retrying(start, "watch", gated=False)

    def cancel_watch(self, handle: WatchHandle) -> None:
        """Stop a watch started by ``watch``; idempotent."""
        handle.cancel()

    # ----------------------------------------------------------------- misc
    def status(self) -> Any:
        """Return etcd's status (version, leader, revision)."""
        return self._call(
            self._etcd.maintenancestub.Status, self._rpc.StatusRequest(), "status"
        )

    @property
    def etcd3(self) -> Any:
        """The underlying ``etcd3`` client, for callers that need its full API.

        It belongs to the connection, which other clients may share: use it,
        but close this client rather than it."""
        return self._etcd

    def close(self) -> None:
        """Let go of the connection (closed with its last client); idempotent.

        Raises:
            ForkedProcessError: this client was created in another process (the
                connection is left to it).
        """
        self.check_process()
        connection = self._use.connection
        with _connections_lock:
            if self._use.released:
                return
            self._use.released = True
            connection.users -= 1
            if connection.users > 0:
                return
            if _connections.get(self._use.key) is connection:
                del _connections[self._use.key]
        connection.close()


def _txn_answer(
    response: Any, success: Sequence[Sequence[Any]], failure: Sequence[Sequence[Any]]
) -> tuple[bool, int, list[Any]]:
    """A TxnResponse as ``EtcdClient.txn`` returns it: ``(succeeded, revision,
    results)``, the results shaped by the branch that ran."""
    ops = success if response.succeeded else failure
    return response.succeeded, response.header.revision, txn_results(ops, response.responses)


class _WatchNotStarted(grpc.RpcError):
    """A watch that could not be created, as the gRPC error the retry policy
    judges: DEADLINE_EXCEEDED when etcd took too long to confirm it (hung or
    overloaded), UNAVAILABLE when the shared watch stream ended meanwhile."""

    def __init__(self, status: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status

    def details(self) -> str:
        return str(self)


_COMPACTED_RETRIES = 3


class _Compacted(Exception):
    """A range at a fixed revision that etcd has compacted away meanwhile."""


class _PinnedRange:
    """A Range stub call that reports a compacted revision as ``_Compacted``
    (any other failure goes to the retry policy as it is)."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self._method = method

    def __call__(self, request: Any, timeout: float, metadata: Any = None) -> Any:
        try:
            return self._method(request, timeout, metadata=metadata)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = (err.details() if hasattr(err, "details") else "") or ""
            if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
                raise _Compacted(details) from None
            raise


def _is_ipv4(host: str) -> bool:
    parts = host.split(".")
    return len(parts) == 4 and all(p.isdigit() and 0 <= int(p) <= 255 for p in parts)
