"""Every configuration rule of rdzv, once: where etcd is, the options, durations,
credentials from the environment and the bounds of a round.

The handler (``create_rdzv_handler``), the store and the CLI read their settings
through this module, so that a value is accepted or refused, and explained, the
same way wherever a user gives it:

* ``parse_endpoints``: ``host[:port][,host[:port]...]``;
* ``EtcdConfig``: how to reach etcd (endpoints, TLS, credentials, connect timeout);
* ``parse_seconds``: every duration, as int, float, numeric text or ``timedelta``,
  positive and at most a year (``MAX_SECONDS``) unless a rule says otherwise;
* ``environment_credentials``: ``RDZV_ETCD_USERNAME``/``RDZV_ETCD_PASSWORD``;
* ``check_node_bounds``: ``1 <= min_nodes <= max_nodes <= MAX_NODES``;
* ``RENDEZVOUS_OPTIONS`` and ``RendezvousOptions.from_params``: the options of
  ``--rdzv-conf``, their defaults, meanings and rules.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rdzv.keys import DEFAULT_PREFIX, RunKeys, normalize_prefix

if TYPE_CHECKING:
    from rdzv.api import RendezvousParameters

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_PORT",
    "FOREIGN_OPTIONS",
    "LEASE_SCOPES",
    "MAX_LEASE_TTL",
    "MAX_NODES",
    "MAX_SECONDS",
    "RENDEZVOUS_OPTIONS",
    "EtcdConfig",
    "RendezvousOptions",
    "check_lease_scope",
    "check_node_bounds",
    "check_rank_order",
    "default_keepalive_interval",
    "environment_credentials",
    "node_topology",
    "parse_endpoints",
    "parse_seconds",
    "seconds_option",
    "slurm_topology",
]

DEFAULT_PORT = 2379
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_TIMEOUT = 600.0
DEFAULT_LAST_CALL_TIMEOUT = 30.0
DEFAULT_LEASE_TTL = 10
DEFAULT_STORE_TIMEOUT = 300.0
#: As torch's etcd backend, whose runs expire two hours after their last write.
DEFAULT_RUN_IDLE_TIMEOUT = 7200.0
DEFAULT_CLOSED_RUN_GRACE = 600.0
#: The longest duration any option may have: a year, well inside what
#: threading and gRPC deadlines can represent.
MAX_SECONDS = 365 * 24 * 3600.0
#: etcd's own limit on a lease's time-to-live (about 285 years).
MAX_LEASE_TTL = 9_000_000_000
MIN_LEASE_TTL = 2
MIN_KEEPALIVE_INTERVAL = 0.05
#: The longest pause between two keep-alives of a lease, unless set.
MAX_DEFAULT_KEEPALIVE = 60.0
#: The most nodes a round may admit.
MAX_NODES = 1_000_000
#: The environment variables that give etcd credentials the options leave out.
CREDENTIAL_VARIABLES = {"username": "RDZV_ETCD_USERNAME", "password": "RDZV_ETCD_PASSWORD"}
_PROTOCOLS = ("http", "https")
_LIMIT_NOTES = {MAX_SECONDS: "a year", MAX_LEASE_TTL: "about 285 years, etcd's limit"}

#: Options read from ``RendezvousParameters`` (``--rdzv-conf`` keys), with what they mean.
RENDEZVOUS_OPTIONS: dict[str, str] = {
    "timeout": f"seconds a node waits for a round before RendezvousTimeoutError "
    f"(default {DEFAULT_TIMEOUT:g})",
    "last_call_timeout": "seconds between the min_nodes-th join and the round's completion "
    f"when fewer than max_nodes joined (default {DEFAULT_LAST_CALL_TIMEOUT:g})",
    "etcd_prefix": f"key prefix shared by all runs (default {DEFAULT_PREFIX!r})",
    "protocol": "'http' or 'https' (default 'http')",
    "cacert": "CA bundle that signs etcd's certificate (https)",
    "cert": "client certificate for mutual TLS",
    "key": "private key of 'cert'",
    "username": f"etcd user (or env {CREDENTIAL_VARIABLES['username']})",
    "password": f"etcd password (or env {CREDENTIAL_VARIABLES['password']}); never logged",
    "lease_ttl": f"seconds after which a dead node's keys vanish (default {DEFAULT_LEASE_TTL})",
    "keepalive_interval": "seconds between lease keep-alives (default lease_ttl / 4, "
    f"at most {MAX_DEFAULT_KEEPALIVE:g})",
    "connect_timeout": "seconds a request retries an unreachable etcd before "
    f"RendezvousConnectionError (default {DEFAULT_CONNECT_TIMEOUT:g})",
    "store_timeout": f"default timeout of the round's store (default {DEFAULT_STORE_TIMEOUT:g})",
    "closed_run_grace": "seconds a closed run's keys stay in etcd after its last node is gone, "
    "for late nodes to learn it is closed (whole seconds, rounded up; default "
    f"{DEFAULT_CLOSED_RUN_GRACE:g}; at most run_idle_timeout)",
    "run_idle_timeout": "seconds after its last node is gone that a run that was never closed "
    "(its job killed) is removed from etcd (whole seconds, rounded up; default "
    f"{DEFAULT_RUN_IDLE_TIMEOUT:g})",
    "topology": "this node's place in the cluster, a path from coarse to fine such as "
    "'pod1/rack07' (or env RDZV_TOPOLOGY, else taken from SLURM_TOPOLOGY_ADDR); "
    "a group's nodes get contiguous ranks",
    "rank_order": "'stable' (default: survivors keep their ranks, newcomers fill the free "
    "ranks in topology order) or 'topology' (every round ranked in topology order)",
    "lease_scope": "'node' (default: each node keeps a lease of its own alive) or 'process' "
    "(the nodes of a process share one lease and one keep-alive, and are lost together; "
    "for processes that host many nodes)",
}

#: Keys that torch's launcher or other backends put in the configuration; they
#: mean nothing to this backend and are accepted silently.
FOREIGN_OPTIONS = frozenset(
    {
        "is_host",
        "rank",
        "join_timeout",
        "read_timeout",
        "close_timeout",
        "heartbeat",
        "keep_alive_interval",
        "keep_alive_max_attempt",
        "store_type",
        "use_libuv",
    }
)


# ------------------------------------------------------------------ durations
def parse_seconds(
    value: object,
    what: str,
    *,
    least: float = 0.0,
    most: float = MAX_SECONDS,
    whole: bool = False,
) -> float:
    """The one rule for durations: read ``value`` as a number of seconds.

    A duration is an ``int``, a ``float``, numeric text or a
    ``datetime.timedelta`` (never a ``bool``), finite, positive and at most
    ``most`` seconds (a year unless a rule says otherwise).

    Args:
        value: what the user gave.
        what: the name of the setting, for the message (``"The rendezvous
            option 'timeout'"``, ``"The store timeout"``).
        least: the smallest value allowed (0: any positive value).
        most: the largest value allowed.
        whole: only whole seconds, as an ``int`` or ASCII digits.

    Returns:
        The seconds (a whole number of them with ``whole``).

    Raises:
        ValueError: the value is of another type, is not a number, or is out of
            range; the message says what was expected.
    """
    seconds = _whole_seconds(value) if whole else _seconds(value)
    if seconds is None or not (least <= seconds <= most and seconds > 0):
        note = f" ({_LIMIT_NOTES[most]})" if most in _LIMIT_NOTES else ""
        if whole:
            expected = f"a whole number of seconds from {least:g} to {most:.0f}{note}"
        elif least > 0:
            expected = f"a number of seconds of at least {least:g}, at most {most:.0f}{note}"
        else:
            expected = f"a positive number of seconds, at most {most:.0f}{note}"
        raise ValueError(f"{what} must be {expected}, got {value!r}.")
    return seconds


def _seconds(value: object) -> float | None:
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        return None
    return None if math.isnan(seconds) else seconds


def _whole_seconds(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    text = str(value).strip()
    # Ten digits hold etcd's largest TTL; more would only cost a long int().
    if not (text.isascii() and text.isdigit() and len(text) <= 10):
        return None
    return int(text)


def seconds_option(params: RendezvousParameters, name: str, default: float) -> float:
    """Read option ``name`` of ``params`` as a duration (see ``parse_seconds``).

    Raises:
        ValueError: the value is not a positive number of seconds of at most a year.
    """
    return parse_seconds(params.get(name, default), f"The rendezvous option '{name}'")


def default_keepalive_interval(ttl: float) -> float:
    """Seconds between the keep-alives of a lease of ``ttl`` seconds, unless set:
    a quarter of the TTL, at most ``MAX_DEFAULT_KEEPALIVE``."""
    return min(ttl / 4, MAX_DEFAULT_KEEPALIVE)


# ------------------------------------------------------------------ endpoints
def parse_endpoints(endpoint: str) -> list[tuple[str, int]]:
    """Parse ``host[:port][,host[:port]...]`` into ``[(host, port), ...]``.

    A leading ``http://`` or ``https://`` on an entry is accepted and ignored (the
    ``protocol`` parameter decides). IPv6 hosts go in brackets: ``[::1]:2379``.

    Raises:
        ValueError: the string is empty, or an entry has a bad host or port.
    """
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ValueError(
            "The rendezvous endpoint must be 'host[:port]' or a comma-separated list "
            f"of them (default port {DEFAULT_PORT}), got {endpoint!r}."
        )
    result = []
    for raw in endpoint.split(","):
        entry = raw.strip()
        for scheme in ("http://", "https://"):
            entry = entry.removeprefix(scheme)
        entry = entry.rstrip("/")
        host, port_text = entry, ""
        if entry.startswith("["):
            close = entry.find("]")
            if close < 0:
                raise ValueError(f"Endpoint {raw.strip()!r} opens '[' without closing it.")
            host, rest = entry[1:close], entry[close + 1:]
            if rest and not rest.startswith(":"):
                raise ValueError(f"Endpoint {raw.strip()!r}: expected ':port' after ']'.")
            port_text = rest[1:]
        elif entry.count(":") == 1:
            host, port_text = entry.split(":")
        elif entry.count(":") > 1:
            raise ValueError(
                f"Endpoint {raw.strip()!r}: write IPv6 addresses in brackets, "
                f"e.g. '[::1]:{DEFAULT_PORT}'."
            )
        if not host or not _printable_ascii_or_idna(host) or any(c in "/@?#" for c in host):
            raise ValueError(
                f"Endpoint {raw.strip()!r} has no valid host; expected 'host[:port]'."
            )
        port = DEFAULT_PORT
        if port_text:
            if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
                raise ValueError(
                    f"Endpoint {raw.strip()!r} has port {port_text!r}; "
                    "expected a number from 1 to 65535."
                )
            port = int(port_text)
        result.append((host, port))
    return result


def host_text(host: str) -> str:
    """``host`` as it goes before ``:port`` (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host else host


def _printable_ascii_or_idna(host: str) -> bool:
    """A host name gRPC can resolve: printable, no spaces, encodable as IDNA/ASCII."""
    if any(not c.isprintable() or c.isspace() for c in host):
        return False
    try:
        host.encode("idna" if not host.isascii() else "ascii")
    except UnicodeError:
        return False
    return True


# ------------------------------------------------------------ how to reach etcd
@dataclass(frozen=True)
class EtcdConfig:
    """How to reach etcd: endpoints, transport security and credentials.

    Attributes:
        endpoints: ``[(host, port), ...]``; the client fails over between them.
        protocol: ``"http"`` or ``"https"``.
        cacert: CA bundle that signs the server certificate (https).
        cert: client certificate for mutual TLS.
        key: private key of ``cert``.
        username: etcd user, if etcd authentication is on.
        password: that user's password; never logged or shown in errors.
        connect_timeout: seconds a request keeps retrying an unreachable etcd.

    Raises:
        ValueError: a setting breaks its rule (the message names it).
    """

    endpoints: tuple[tuple[str, int], ...]
    protocol: str = "http"
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT

    def __post_init__(self) -> None:
        if self.protocol not in _PROTOCOLS:
            raise ValueError(
                f"The rendezvous protocol must be one of {', '.join(_PROTOCOLS)}, "
                f"got {self.protocol!r}."
            )
        if (self.cert is None) != (self.key is None):
            raise ValueError("Give both 'cert' and 'key' for mutual TLS, or neither.")
        if self.protocol == "http" and (self.cacert or self.cert):
            raise ValueError(
                "'cacert', 'cert' and 'key' need protocol=https; got protocol=http."
            )
        if (self.username is None) != (self.password is None):
            raise ValueError("Give both 'username' and 'password' for etcd auth, or neither.")
        object.__setattr__(
            self, "connect_timeout", parse_seconds(self.connect_timeout, "'connect_timeout'")
        )
        for name in ("cacert", "cert", "key"):
            _check_readable_file(name, getattr(self, name))
        for name in ("username", "password"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                shown = "a value" if name == "password" else repr(value)
                raise ValueError(f"'{name}' must be a non-empty string, got {shown}.")

    @classmethod
    def from_params(cls, params: RendezvousParameters) -> EtcdConfig:
        """Build the configuration from rendezvous parameters.

        Raises:
            ValueError: the endpoint or an option is malformed.
        """
        return cls.from_options(params.endpoint, params.config)

    @classmethod
    def from_options(cls, endpoint: str, options: Mapping[str, Any]) -> EtcdConfig:
        """Build the configuration from an endpoint and options (``RENDEZVOUS_OPTIONS``).

        Raises:
            ValueError: the endpoint or an option is malformed.
        """
        protocol = options.get("protocol", "http")
        if not isinstance(protocol, str):
            raise ValueError(f"The rendezvous protocol must be a string, got {protocol!r}.")
        return cls(
            endpoints=tuple(parse_endpoints(endpoint)),
            protocol=protocol.lower(),
            cacert=options.get("cacert"),
            cert=options.get("cert"),
            key=options.get("key"),
            username=options.get("username"),
            password=options.get("password"),
            connect_timeout=parse_seconds(
                options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT),
                "The rendezvous option 'connect_timeout'",
            ),
        )

    def describe(self) -> str:
        """The endpoints as the user wrote them, for messages (no credentials)."""
        return ",".join(
            f"{self.protocol}://{host_text(host)}:{port}" for host, port in self.endpoints
        )


def _check_readable_file(name: str, path: object) -> None:
    """Refuse a TLS file option that is not the path of a readable file."""
    if path is None:
        return
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise ValueError(f"'{name}' must be the path of a PEM file, got {path!r}.")
    text = os.fspath(path)
    if not text or "\0" in text or not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise ValueError(f"'{name}' must be the path of a readable PEM file, got {text!r}.")


def environment_credentials(
    options: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The etcd credentials the environment gives for those ``options`` leave out.

    ``RDZV_ETCD_USERNAME`` and ``RDZV_ETCD_PASSWORD`` stand for the ``username``
    and ``password`` options where those are absent or None; an empty variable
    counts as not set.

    Args:
        options: the options as given.
        environ: the environment to read (``os.environ`` if None).

    Returns:
        ``{"username": ..., "password": ...}``, holding only what the
        environment adds.
    """
    env = os.environ if environ is None else environ
    return {
        name: env[variable]
        for name, variable in CREDENTIAL_VARIABLES.items()
        if options.get(name) is None and env.get(variable)
    }


# ------------------------------------------------------------ a round's bounds
def check_node_bounds(min_nodes: int, max_nodes: int) -> None:
    """The rule for a round's bounds: whole numbers, ``1 <= min <= max <= MAX_NODES``.

    Raises:
        ValueError: a bound is not an integer, or the bounds break the rule.
    """
    for name, value in (("min_nodes", min_nodes), ("max_nodes", max_nodes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}.")
    if min_nodes < 1:
        raise ValueError(
            f"The minimum number of rendezvous nodes ({min_nodes}) must be greater than zero."
        )
    if max_nodes < min_nodes:
        raise ValueError(
            f"The maximum number of rendezvous nodes ({max_nodes}) must be greater "
            f"than or equal to the minimum number of rendezvous nodes ({min_nodes})."
        )
    if max_nodes > MAX_NODES:
        raise ValueError(f"max_nodes={max_nodes} is more than {MAX_NODES} nodes.")


# ------------------------------------------------------------------- placement
def check_rank_order(value: Any) -> str:
    """The ``rank_order`` option, checked.

    Raises:
        ValueError: it is not one of ``stable``, ``topology``.
    """
    _state = _core()
    if value not in _state.RANK_ORDERS:
        raise ValueError(
            f"The rendezvous option 'rank_order' must be one of "
            f"{', '.join(_state.RANK_ORDERS)}, got {value!r}."
        )
    return value


#: What a node's lease belongs to: the node itself, or its whole process.
LEASE_SCOPES = ("node", "process")


def check_lease_scope(value: Any) -> str:
    """The ``lease_scope`` option, checked.

    Raises:
        ValueError: it is not one of ``node``, ``process``.
    """
    if value not in LEASE_SCOPES:
        raise ValueError(
            f"The rendezvous option 'lease_scope' must be one of "
            f"{', '.join(LEASE_SCOPES)}, got {value!r}."
        )
    return value


def slurm_topology(addr: str, pattern: str | None = None) -> str | None:
    """The topology label that Slurm's topology address gives, or None.

    Slurm's topology/tree plugin sets ``SLURM_TOPOLOGY_ADDR`` to the switches
    above a node and the node itself (``s0.s3.node17``) and
    ``SLURM_TOPOLOGY_ADDR_PATTERN`` to what each part is
    (``switch.switch.node``). The label is the switch parts, top first
    (``s0/s3``); without a pattern every part but the last is taken as a switch.

    Args:
        addr: the value of ``SLURM_TOPOLOGY_ADDR``.
        pattern: the value of ``SLURM_TOPOLOGY_ADDR_PATTERN``, if set.

    Returns:
        The label, or None when the address names no switch.
    """
    parts = addr.split(".")
    if pattern:
        kinds = pattern.split(".")
        switches = next((i for i, kind in enumerate(kinds) if kind != "switch"), len(kinds))
    else:
        switches = len(parts) - 1
    return "/".join(parts[:switches]) or None


def node_topology(option: Any = None, environ: Mapping[str, str] | None = None) -> str | None:
    """This node's topology label: the option, else ``RDZV_TOPOLOGY``, else Slurm's.

    An empty option or variable counts as not given.

    Args:
        option: the ``topology`` rendezvous option, if given.
        environ: the environment to read (``os.environ`` if None).

    Returns:
        The label, or None if no source gives one.

    Raises:
        ValueError: the label is malformed; the message names its source.
    """
    env = os.environ if environ is None else environ
    _state = _core()
    if option not in (None, ""):
        return _state.check_topology(option, "topology")
    if env.get("RDZV_TOPOLOGY"):
        return _state.check_topology(env["RDZV_TOPOLOGY"], "RDZV_TOPOLOGY")
    addr = env.get("SLURM_TOPOLOGY_ADDR")
    if addr:
        label = slurm_topology(addr, env.get("SLURM_TOPOLOGY_ADDR_PATTERN"))
        if label is not None:
            return _state.check_topology(label, "SLURM_TOPOLOGY_ADDR")
    return None


# ------------------------------------------------------------- all the options
@dataclass(frozen=True)
class RendezvousOptions:
    """A handler's settings, read and checked from ``RendezvousParameters``.

    Attributes:
        etcd: how to reach etcd.
        etcd_prefix: key prefix shared by all runs, normalized.
        timeout: seconds ``next_rendezvous()`` waits for its round.
        last_call_timeout: seconds from the min-th join to completion.
        lease_ttl: whole seconds after which a dead node's keys vanish.
        keepalive_interval: seconds between lease keep-alives.
        store_timeout: default timeout of the round's store.
        closed_run_grace: whole seconds a closed run stays after its last node.
        run_idle_timeout: whole seconds an abandoned run stays after its last node.
        local_addr: the address this node advertises, or None.
        topology: this node's topology label, or None.
        rank_order: ``stable`` or ``topology``.
        lease_scope: ``node`` or ``process``.
    """

    etcd: EtcdConfig
    etcd_prefix: str
    timeout: float
    last_call_timeout: float
    lease_ttl: int
    keepalive_interval: float
    store_timeout: float
    closed_run_grace: int
    run_idle_timeout: int
    local_addr: str | None
    topology: str | None
    rank_order: str
    lease_scope: str = LEASE_SCOPES[0]

    @classmethod
    def from_params(
        cls, params: RendezvousParameters, environ: Mapping[str, str] | None = None
    ) -> RendezvousOptions:
        """Read every option of ``params``, refusing what breaks a rule, before any I/O.

        Credentials the options leave out come from the environment
        (``environment_credentials``); ``params`` is not changed.

        Args:
            params: the parameters; ``params.config`` holds the options.
            environ: the environment to read (``os.environ`` if None).

        Raises:
            ValueError: an option is unknown or malformed, the run id or node
                bounds are invalid (the message says which and what to give).
        """
        unknown = set(params.config) - set(RENDEZVOUS_OPTIONS) - FOREIGN_OPTIONS
        if unknown:
            raise ValueError(
                f"Unknown rendezvous option(s) {', '.join(sorted(unknown))}; "
                f"the etcd rendezvous accepts {', '.join(sorted(RENDEZVOUS_OPTIONS))}."
            )
        if not isinstance(params.run_id, str) or not params.run_id:
            raise ValueError(f"The run id must be a non-empty string, got {params.run_id!r}.")
        check_node_bounds(params.min_nodes, params.max_nodes)
        given = {**params.config, **environment_credentials(params.config, environ)}
        etcd = EtcdConfig.from_options(params.endpoint, given)
        prefix = normalize_prefix(params.get("etcd_prefix", DEFAULT_PREFIX))
        RunKeys(prefix, params.run_id)  # validates the run id
        lease_ttl = int(parse_seconds(
            params.get("lease_ttl", DEFAULT_LEASE_TTL), "The rendezvous option 'lease_ttl'",
            least=MIN_LEASE_TTL, most=MAX_LEASE_TTL, whole=True,
        ))
        keepalive = parse_seconds(
            params.get("keepalive_interval", default_keepalive_interval(lease_ttl)),
            "The rendezvous option 'keepalive_interval'", least=MIN_KEEPALIVE_INTERVAL,
        )
        if keepalive >= lease_ttl:
            raise ValueError(
                f"keepalive_interval ({keepalive:g} s) must be shorter than lease_ttl "
                f"({lease_ttl} s), or the lease expires between keep-alives."
            )
        timeout = seconds_option(params, "timeout", DEFAULT_TIMEOUT)
        last_call = seconds_option(params, "last_call_timeout", DEFAULT_LAST_CALL_TIMEOUT)
        store_timeout = seconds_option(params, "store_timeout", DEFAULT_STORE_TIMEOUT)
        grace = math.ceil(seconds_option(params, "closed_run_grace", DEFAULT_CLOSED_RUN_GRACE))
        idle = math.ceil(seconds_option(params, "run_idle_timeout", DEFAULT_RUN_IDLE_TIMEOUT))
        if grace > idle:
            raise ValueError(
                f"closed_run_grace ({grace} s) must not be longer than run_idle_timeout "
                f"({idle} s): an abandoned run's state record would go before its rounds."
            )
        local_addr = params.local_addr
        if local_addr is not None and (
            not isinstance(local_addr, str)
            or not local_addr
            or any(not c.isprintable() or c.isspace() or c == "," for c in local_addr)
            or not _encodable(local_addr)
        ):
            raise ValueError(f"local_addr must be a host name or address, got {local_addr!r}.")
        return cls(
            etcd=etcd,
            etcd_prefix=prefix,
            timeout=timeout,
            last_call_timeout=last_call,
            lease_ttl=lease_ttl,
            keepalive_interval=keepalive,
            store_timeout=store_timeout,
            closed_run_grace=grace,
            run_idle_timeout=idle,
            local_addr=local_addr,
            topology=node_topology(params.get("topology"), environ),
            rank_order=check_rank_order(params.get("rank_order", _core().RANK_ORDERS[0])),
            lease_scope=check_lease_scope(params.get("lease_scope", LEASE_SCOPES[0])),
        )


def _core() -> Any:
    """The compiled core, imported when first needed: it imports ``rdzv.api``,
    which checks a round's bounds with this module."""
    from rdzv import _state

    return _state


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
