"""Test hosts on one Linux machine: network namespaces on a bridge, partitions between them.

Theory of operation. A ``Network`` is one private IPv4 /24 (picked so that it
overlaps no address or route of the machine) on one Linux bridge. Each ``Host``
is a network namespace joined to the bridge by a veth pair, with an address of
its own (``.10`` upwards) and a host name of its own: processes started with
``Host.popen`` (or under ``Host.launcher()``) run inside its namespace and in a
UTS namespace whose host name is the host's, and the host names of the network
resolve through the namespace's own ``/etc/hosts``. The bridge itself has the
address ``.1`` in the machine's own namespace: the test process (the observer)
reaches every host there and is never cut off, so it can read etcd while hosts
are partitioned.

Partitions are iptables rules inside the hosts' namespaces, never in the
machine's own: ``cut(host, peers)`` drops packets between ``host`` and ``peers``
(both ways, or one way), ``isolate(host)`` cuts it from every other host, and
``heal()`` removes the rules. Packets are dropped, not refused: a cut-off
process sees silence, as across a real partition. Delay and loss use tc's netem
where the kernel has it (``netem_unavailable()`` says why not).

Clean-up. Every name the network creates carries the owning process id and a
random tag (namespaces ``rdzvh-<pid>-<tag>-<host>``, a bridge and veths whose
alias is ``rdzvh-<pid>-<tag>``). ``close()`` (also run by the context manager,
by a finalizer, and at interpreter exit) kills the processes inside the
namespaces and deletes namespaces, bridge and ``/etc/netns`` files; creating a
network first sweeps what a crashed earlier run left behind (names whose owner
process is gone). The iptables rules live inside the namespaces and go with them.

Needs root, ``ip`` (iproute2), ``iptables`` and ``unshare`` (util-linux);
``unavailable()`` says what is missing.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import shutil
import signal
import subprocess
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from rdzv.etcd_server import EtcdCluster, EtcdServer

logger = logging.getLogger(__name__)

PREFIX = "rdzvh"
NETNS_ETC = "/etc/netns"
TOOLS = ("ip", "iptables-restore", "unshare")
HOW_TO_RUN = (
    "run as root with iproute2, iptables and util-linux installed "
    "(apt-get install -y iproute2 iptables)"
)
_FIRST_HOST = 10
_PROBE = (
    "ip link add rzprobe0 type veth peer name rzprobe1 && "
    "printf '*filter\\nCOMMIT\\n' | iptables-restore"
)
_COMMAND_TIMEOUT_S = 20.0
# The /24s tried, in a random order: 10.200.0.0/16 .. 10.254.255.0/24.
_SUBNET_SPACE = [(a, b) for a in range(200, 255) for b in range(256)]


def unavailable() -> str | None:
    """Say what the machine lacks to run test hosts, or None when nothing is missing."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    missing += [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"test hosts need {', '.join(missing)}: {HOW_TO_RUN}"
    # Root in a container may still be refused namespaces, veths or netfilter:
    # try them in a throwaway network namespace, gone when the probe exits.
    probe = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", _PROBE], capture_output=True, text=True,
        timeout=_COMMAND_TIMEOUT_S,
    )
    if probe.returncode != 0:
        return (
            "test hosts need network namespaces, veth pairs and iptables, which this "
            f"machine refused ({probe.stderr.strip() or probe.returncode}): {HOW_TO_RUN}, "
            "on a kernel that allows them"
        )
    return None


def _run(
    args: Sequence[str],
    input: str | None = None,
    check: bool = True,
    timeout: float = _COMMAND_TIMEOUT_S,
) -> str:
    done = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_processes(netns: str) -> None:
    """SIGKILL every process inside the namespace ``netns`` (all of them ours)."""
    for _ in range(5):
        pids = [int(p) for p in _run(["ip", "netns", "pids", netns], check=False).split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:
            try:
                os.waitpid(pid, 0)  # our own children are reaped here; others by init
            except ChildProcessError:
                pass


def _delete_netns(netns: str) -> None:
    _kill_netns_processes(netns)
    _run(["ip", "netns", "delete", netns], check=False)
    shutil.rmtree(os.path.join(NETNS_ETC, netns), ignore_errors=True)


def _owner(name: str) -> int | None:
    """The owner pid in ``rdzvh-<pid>-...``, or None for a name not ours."""
    parts = name.split("-")
    if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
        return None
    return int(parts[1])


def sweep() -> list[str]:
    """Remove namespaces and links left by networks whose owner process is gone.

    Returns:
        The names removed.
    """
    removed = []
    for line in _run(["ip", "netns", "list"], check=False).splitlines():
        netns = line.split()[0] if line.split() else ""
        owner = _owner(netns)
        if owner is not None and not _alive(owner):
            _delete_netns(netns)
            removed.append(netns)
    if os.path.isdir(NETNS_ETC):
        for netns in os.listdir(NETNS_ETC):
            owner = _owner(netns)
            if owner is not None and not _alive(owner):
                shutil.rmtree(os.path.join(NETNS_ETC, netns), ignore_errors=True)
    for line in _run(["ip", "-o", "link", "show"], check=False).splitlines():
        if " alias " not in line:
            continue
        alias = line.split(" alias ", 1)[1].split()[0]
        owner = _owner(alias)
        if owner is not None and not _alive(owner):
            link = line.split(":", 2)[1].strip().split("@")[0]
            _run(["ip", "link", "delete", link], check=False)
            removed.append(link)
    if removed:
        logger.warning("Removed test-host leftovers of earlier runs: %s", removed)
    return removed


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the machine has an address in or a route to."""
    used = []
    for line in _run(["ip", "-4", "-o", "addr", "show"]).splitlines():
        fields = line.split()
        if "inet" in fields:
            used.append(ipaddress.ip_interface(fields[fields.index("inet") + 1]).network)
    for line in _run(["ip", "-4", "route", "show", "table", "all"]).splitlines():
        target = line.split()[0] if line.split() else ""
        if target in ("default", "unreachable", "blackhole", "prohibit", "local", "broadcast"):
            target = line.split()[1] if target != "default" else ""
        if not target:
            continue
        try:
            used.append(ipaddress.ip_network(target, strict=False))
        except ValueError:
            continue
    return used


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    for a, b in random.sample(_SUBNET_SPACE, 64):
        subnet = ipaddress.ip_network(f"10.{a}.{b}.0/24")
        if not any(subnet.overlaps(network) for network in used):
            return subnet
    raise RuntimeError("No free private /24 in 10.200.0.0-10.254.255.0 for test hosts.")


class Host:
    """One test host: a network namespace on the bridge, with its own address and name.

    Created by ``Network.add_host``.

    Attributes:
        name: its host name (also what it is called in ``/etc/hosts``).
        address: its IPv4 address.
        netns: its network namespace's name.
    """

    def __init__(self, network: Network, name: str, address: str, netns: str) -> None:
        self.network = network
        self.name = name
        self.address = address
        self.netns = netns
        self.processes: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address!r})"

    def launcher(self, hostname: bool = True) -> list[str]:
        """Return a command prefix that runs a command on this host.

        Args:
            hostname: also give the command this host's name (a UTS namespace);
                False for a command that needs only the network (etcd).
        """
        prefix = ["ip", "netns", "exec", self.netns]
        if hostname:
            # sh sets the name inside the new UTS namespace, then execs the command.
            prefix += ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"',
                       self.name]
        return prefix

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``args`` on this host; it is killed when the network closes.

        Args:
            args: the command.
            kwargs: passed to ``subprocess.Popen`` (``start_new_session`` is set).

        Returns:
            The process (its pid is the command's: the launcher execs it).
        """
        kwargs.setdefault("start_new_session", True)
        process = subprocess.Popen([*self.launcher(), *args], **kwargs)
        self.processes.append(process)
        return process

    def run(self, args: Sequence[str], timeout: float = _COMMAND_TIMEOUT_S) -> str:
        """Run ``args`` on this host (network only) and return its stdout.

        Raises:
            RuntimeError: the command failed.
        """
        return _run(["ip", "netns", "exec", self.netns, *args], timeout=timeout)


class Network:
    """Test hosts on one bridge, with partitions between them.

    Use it as a context manager, or call ``close()``.

    Raises:
        RuntimeError: the machine cannot run test hosts (see ``unavailable()``).
    """

    def __init__(self) -> None:
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        sweep()
        self.tag = f"{random.getrandbits(24):06x}"
        self.owner = f"{PREFIX}-{os.getpid()}-{self.tag}"
        self.subnet = _free_subnet()
        self.gateway = str(self.subnet.network_address + 1)
        self.bridge = f"rzb{self.tag}"
        self.hosts: list[Host] = []
        self._rules: dict[str, set[tuple[str, str]]] = {}
        self._state = {"netns": [], "links": [self.bridge], "closed": False}
        self._finalizer = weakref.finalize(self, _tear_down, self._state)
        try:
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "link", "set", self.bridge, "alias", self.owner])
            _run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ hosts
    def add_host(self, name: str | None = None) -> Host:
        """Create one more host on the bridge.

        Args:
            name: its host name; ``h<index>`` if None.

        Returns:
            The host, ready: its interfaces are up and its ``/etc/hosts`` names
            every host created so far (later hosts are added as they come).
        """
        index = len(self.hosts)
        if index + _FIRST_HOST >= 255:
            raise RuntimeError("A test network holds at most 245 hosts.")
        name = name or f"h{index:02d}"
        address = str(self.subnet.network_address + _FIRST_HOST + index)
        netns = f"{self.owner}-{name}"
        outside, inside = f"rzv{self.tag}{index:02x}", f"rzi{self.tag}{index:02x}"
        self._state["netns"].append(netns)
        _run(["ip", "netns", "add", netns])
        self._state["links"].append(outside)
        _run(["ip", "link", "add", outside, "type", "veth", "peer", "name", inside])
        _run(["ip", "link", "set", outside, "alias", self.owner])
        _run(["ip", "link", "set", inside, "netns", netns])
        _run(["ip", "link", "set", outside, "master", self.bridge, "up"])
        inns = ["ip", "netns", "exec", netns]
        _run([*inns, "ip", "link", "set", inside, "name", "eth0"])
        _run([*inns, "ip", "addr", "add", f"{address}/24", "dev", "eth0"])
        _run([*inns, "ip", "link", "set", "eth0", "up"])
        _run([*inns, "ip", "link", "set", "lo", "up"])
        host = Host(self, name, address, netns)
        self.hosts.append(host)
        self._write_etc()
        return host

    def add_hosts(self, count: int, prefix: str = "h") -> list[Host]:
        """Create ``count`` hosts named ``<prefix><index>``; see ``add_host``."""
        start = len(self.hosts)
        return [self.add_host(f"{prefix}{start + i:02d}") for i in range(count)]

    def _write_etc(self) -> None:
        """Give every namespace an ``/etc/hosts`` naming all hosts, and no DNS server.

        ``ip netns exec`` mounts ``/etc/netns/<netns>/*`` over ``/etc``'s files.
        An empty resolv.conf sends name lookups to loopback, where nothing answers,
        so a lookup fails at once instead of waiting for an unreachable server.
        """
        lines = ["127.0.0.1 localhost", *(f"{h.address} {h.name}" for h in self.hosts)]
        for host in self.hosts:
            directory = os.path.join(NETNS_ETC, host.netns)
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "hosts"), "w") as f:
                f.write("\n".join(lines) + "\n")
            with open(os.path.join(directory, "resolv.conf"), "w") as f:
                f.write("")

    # ------------------------------------------------------------ etcd on hosts
    def etcd_server(self, host: Host, **kwargs: Any) -> EtcdServer:
        """Return an ``EtcdServer`` (not started) that runs on ``host``.

        Args:
            host: the host etcd runs on and binds the address of.
            kwargs: more ``EtcdServer`` arguments.
        """
        return EtcdServer(host=host.address, launcher=host.launcher(hostname=False), **kwargs)

    def etcd_cluster(self, hosts: Sequence[Host], **kwargs: Any) -> EtcdCluster:
        """Return an ``EtcdCluster`` (not started) with one member on each of ``hosts``."""
        return EtcdCluster(
            size=len(hosts),
            hosts=[h.address for h in hosts],
            launchers=[h.launcher(hostname=False) for h in hosts],
            **kwargs,
        )

    # ------------------------------------------------------------ partitions
    def cut(self, host: Host, peers: Iterable[Host], direction: str = "both") -> None:
        """Drop packets between ``host`` and each of ``peers``.

        Args:
            host: the host whose namespace gets the rules.
            peers: the hosts it loses.
            direction: ``"both"``; ``"in"``: ``host`` receives nothing from the
                peers but they still receive what it sends; ``"out"``: the reverse.
        """
        if direction not in ("both", "in", "out"):
            raise ValueError(f"direction must be 'both', 'in' or 'out', got {direction!r}.")
        rules = self._rules.setdefault(host.netns, set())
        for peer in peers:
            if peer is host:
                continue
            if direction in ("both", "in"):
                rules.add(("INPUT", f"-s {peer.address}"))
            if direction in ("both", "out"):
                rules.add(("OUTPUT", f"-d {peer.address}"))
        self._apply(host)

    def isolate(self, host: Host) -> None:
        """Cut ``host`` from every other host, both ways (the observer still reaches it)."""
        self.cut(host, self.hosts)

    def heal(self, host: Host | None = None) -> None:
        """Remove the partition rules of ``host``, or of every host if None."""
        for healed in self.hosts if host is None else [host]:
            if self._rules.pop(healed.netns, None) is not None:
                self._apply(healed)

    def _apply(self, host: Host) -> None:
        """Replace the namespace's filter table with its current rules, at once."""
        rules = sorted(self._rules.get(host.netns, ()))
        lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]",
                 ":OUTPUT ACCEPT [0:0]"]
        lines += [f"-A {chain} {match} -j DROP" for chain, match in rules]
        lines.append("COMMIT")
        _run(["ip", "netns", "exec", host.netns, "iptables-restore"], "\n".join(lines) + "\n")

    # ------------------------------------------------------------ netem
    def netem_unavailable(self) -> str | None:
        """Say why tc's netem (delay, loss) cannot be used here, or None if it can."""
        if not self.hosts:
            raise RuntimeError("Add a host before probing netem.")
        if shutil.which("tc") is None:
            return "tc (iproute2) is not installed"
        host = self.hosts[0]
        add = ["ip", "netns", "exec", host.netns, "tc", "qdisc", "add", "dev", "eth0", "root",
               "netem", "delay", "0ms"]
        done = subprocess.run(add, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
        if done.returncode != 0:
            return f"the kernel has no tc netem ({done.stderr.strip() or done.returncode})"
        self.clear_netem(host)
        return None

    def netem(self, host: Host, delay_ms: float = 0.0, loss_percent: float = 0.0) -> None:
        """Delay and drop packets leaving ``host`` (tc netem on its interface).

        Raises:
            RuntimeError: netem is not available (see ``netem_unavailable()``).
        """
        host.run(["tc", "qdisc", "replace", "dev", "eth0", "root", "netem",
                  "delay", f"{delay_ms}ms", "loss", f"{loss_percent}%"])

    def clear_netem(self, host: Host) -> None:
        """Remove ``host``'s netem qdisc, if it has one."""
        _run(["ip", "netns", "exec", host.netns, "tc", "qdisc", "del", "dev", "eth0", "root"],
             check=False)

    # ------------------------------------------------------------ clean-up
    def close(self) -> None:
        """Kill every process on the hosts and remove namespaces, links and files."""
        for host in self.hosts:
            for process in host.processes:
                if process.poll() is None:
                    try:
                        os.killpg(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    process.wait()
        self._finalizer()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _tear_down(state: dict[str, Any]) -> None:
    """Delete what a network created; holds no reference to the network itself."""
    if state["closed"]:
        return
    state["closed"] = True
    for netns in state["netns"]:
        _delete_netns(netns)
    for link in state["links"]:
        _run(["ip", "link", "delete", link], check=False)
