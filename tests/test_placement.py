"""Rank placement: natural host order, topology groups, stable or topology-first ranks.

The core's ``assign_ranks`` is checked directly on descriptors; the options
(``topology``, ``RDZV_TOPOLOGY``, ``SLURM_TOPOLOGY_ADDR``, ``rank_order``) through
real rounds on a real etcd.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
import re
import urllib.request

import pytest

from helpers import ThreadNode, assert_one_world, make_handler, run_round
from rdzv import _state as core
from rdzv.client import EtcdClient, EtcdConfig, parse_endpoints
from rdzv.etcd_rendezvous import node_topology, slurm_topology
from rdzv.keys import RunKeys


def members(*nodes: tuple) -> list[tuple[str, bytes]]:
    """``(node_id, descriptor)`` pairs from ``(host, label)`` or fuller tuples."""
    out = []
    for i, node in enumerate(nodes):
        host, label, *rest = node
        addr, pid = rest if rest else (host, 1)
        out.append((f"id{i:02d}", core.encode_member(host, addr, pid, 0, label)))
    return out


def hosts_in_rank_order(joined: list[tuple[str, bytes]], previous=(), max_nodes=None):
    by_id = dict(joined)
    world = core.assign_ranks(joined, list(previous), max_nodes or len(joined))
    return [core.decode_member(by_id[node])[0] for node in world]


def assert_same_order_whatever_the_join_order(hosts: list[str]) -> None:
    """``hosts`` is the expected rank order; any join order must give it."""
    rng = random.Random(7)
    for _ in range(10):
        shuffled = hosts[:]
        rng.shuffle(shuffled)
        assert hosts_in_rank_order(members(*[(h, "") for h in shuffled])) == hosts


# ---------------------------------------------------------------- natural order
def test_host_names_in_natural_order():
    assert_same_order_whatever_the_join_order([f"node{i}" for i in range(1, 13)])
    assert_same_order_whatever_the_join_order(
        ["gpu-r2-n1", "gpu-r2-n10", "gpu-r10-n1", "gpu-r10-n2", "gpu-r10-n10"])
    # Case folded, leading zeros are the same number, a name before its extensions.
    assert_same_order_whatever_the_join_order(
        ["a", "a-1", "a1", "A2.example", "a10", "b", "node007x", "node8"])


def test_ipv4_and_ipv6_by_address_value():
    assert_same_order_whatever_the_join_order(
        ["10.0.0.2", "10.0.0.9", "10.0.0.10", "10.0.0.100", "10.0.1.1", "10.0.10.1",
         "192.168.1.1"])
    assert_same_order_whatever_the_join_order(
        ["::1", "[::2]", "2001:db8::9", "2001:db8::a", "2001:db8::10", "fe80::1%eth0",
         "fe80::1%eth1"])


def test_mixtures_addresses_before_names():
    # IPv4 as IPv4-mapped IPv6 (::ffff:a.b.c.d): one address space, then names.
    assert_same_order_whatever_the_join_order(
        ["::1", "10.0.0.9", "10.0.0.10", "2001:db8::1", "host2", "host10", "node1"])


def test_ties_broken_by_address_pid_then_node_id():
    joined = members(("h", "", "10.0.0.10", 5), ("h", "", "10.0.0.9", 7),
                     ("h", "", "10.0.0.9", 3), ("h", "", "10.0.0.9", 3))
    world = core.assign_ranks(joined, [], 4)
    assert world == ["id02", "id03", "id01", "id00"]
    assert core.assign_ranks(list(reversed(joined)), [], 4) == world


# --------------------------------------------------------------------- topology
def test_topology_groups_get_contiguous_ranks_at_every_level():
    layout = [("pod1/rack2/leaf1", 4), ("pod1/rack2/leaf2", 3), ("pod1/rack10", 3),
              ("pod2/rack1", 5), ("pod10/rack1", 2)]
    expected = [(label, f"n{label.replace('/', '-')}-{i}")
                for label, count in layout for i in range(1, count + 1)]
    rng = random.Random(3)
    joined_order = expected[:]
    rng.shuffle(joined_order)
    joined = members(*[(host, label) for label, host in joined_order])
    world_hosts = hosts_in_rank_order(joined)
    assert world_hosts == [host for _, host in expected]
    labels = {host: label for label, host in expected}
    for depth in (1, 2, 3):
        groups = ["/".join(labels[h].split("/")[:depth]) for h in world_hosts]
        runs = [key for key, _ in itertools.groupby(groups)]
        assert len(runs) == len(set(runs)), f"a level-{depth} group is split: {runs}"


def test_unlabelled_nodes_follow_the_groups_in_host_order():
    joined = members(("node3", ""), ("node20", "rack2"), ("node1", ""), ("node10", "rack1"),
                     ("node2", "rack2"))
    assert hosts_in_rank_order(joined) == ["node10", "node2", "node20", "node1", "node3"]


def test_bad_descriptors_get_the_last_ranks():
    joined = [("bad", b"rdzv1-node h a 01 0"), *members(("node2", ""), ("node1", "")),
              ("junk", b"\xff")]
    assert core.assign_ranks(joined, [], 4) == ["id01", "id00", "bad", "junk"]


def test_survivors_keep_ranks_and_newcomers_fill_holes_in_topology_order():
    joined = members(("n5", "rack2"), ("n1", "rack1"), ("n9", "rack3"), ("n2", "rack1"),
                     ("n8", "rack3"), ("n6", "rack2"))
    # id00 (n5) had rank 1, id02 (n9) rank 3; ranks 0, 2, 4, 5 are free.
    previous = ["gone0", "id00", "gone2", "id02"]
    assert hosts_in_rank_order(joined, previous) == ["n1", "n5", "n2", "n9", "n6", "n8"]


def test_rank_order_topology_places_everyone():
    joined = members(("n5", "rack2"), ("n1", "rack1"), ("n9", "rack3"), ("n2", "rack1"))
    descriptor = core.encode_member("n6", "n6", 1, 0, "rack2", "topology")
    joined.append(("id04", descriptor))
    assert hosts_in_rank_order(joined, ["id02", "id00"]) == ["n1", "n2", "n5", "n6", "n9"]
    # One survivor asking is enough, as one newcomer is.
    assert hosts_in_rank_order(joined, ["id04", "id02"]) == ["n1", "n2", "n5", "n6", "n9"]
    joined[4] = ("id04", core.encode_member("n6", "n6", 1, 0, "rack2"))
    assert hosts_in_rank_order(joined, ["id04", "id02"]) == ["n6", "n9", "n1", "n2", "n5"]


def test_topology_labels_are_checked():
    for label in ("pod1/rack07/leaf2", "r", "ßpod/ラック1", "a" * 256):
        assert core.check_topology(label) == label
    for label, why in [("rack 1", "' '"), ("rack1,rack2", "','"), ("a\tb", r"'\\t'"),
                       ("a\x00", r"'\\x00'"), ("a" * 257, "257 bytes"), ("é" * 129, "258 bytes"),
                       ("/rack1", "empty element"), ("pod1//rack1", "empty element"),
                       ("rack1/", "empty element"), ("", "empty")]:
        with pytest.raises(ValueError, match=why):
            core.check_topology(label, "topology")
        with pytest.raises(ValueError):
            core.encode_member("h", "h", 1, 0, label or "/")
    with pytest.raises(ValueError, match="rank_order"):
        core.encode_member("h", "h", 1, 0, "", "racks")


# ------------------------------------------------------------------ the sources
def test_slurm_topology_address_names_the_switches():
    assert slurm_topology("s1.s7.node12", "switch.switch.node") == "s1/s7"
    assert slurm_topology("root.CELL1.isw4.n386", "switch.switch.switch.node") == "root/CELL1/isw4"
    assert slurm_topology("s1.s7.node12") == "s1/s7"
    # A node name with periods: the pattern says how many elements are switches.
    assert slurm_topology("s1.node12.example.com", "switch.node") == "s1"
    # Without the topology plugin the address is the node alone.
    assert slurm_topology("gpu71", "node") is None
    assert slurm_topology("gpu71") is None


def test_topology_option_then_rdzv_topology_then_slurm():
    env = {"RDZV_TOPOLOGY": "envpod/rack1", "SLURM_TOPOLOGY_ADDR": "s1.s2.n1",
           "SLURM_TOPOLOGY_ADDR_PATTERN": "switch.switch.node"}
    assert node_topology("opt/rack", env) == "opt/rack"
    assert node_topology("", env) == "envpod/rack1"
    assert node_topology(None, {**env, "RDZV_TOPOLOGY": ""}) == "s1/s2"
    assert node_topology(None, {}) is None
    with pytest.raises(ValueError, match="RDZV_TOPOLOGY="):
        node_topology(None, {"RDZV_TOPOLOGY": "rack 1"})
    with pytest.raises(ValueError, match="SLURM_TOPOLOGY_ADDR="):
        node_topology(None, {"SLURM_TOPOLOGY_ADDR": "s,1.n1"})


# ------------------------------------------------------------- real rounds
def test_round_ranks_hosts_in_natural_order(etcd_endpoint, run_id, handlers):
    hosts = [f"node{i}" for i in range(1, 13)]
    joined = hosts[:]
    random.Random(11).shuffle(joined)
    handlers.extend(make_handler(etcd_endpoint, run_id, 12, 12, local_addr=h) for h in joined)
    infos = run_round([ThreadNode(h) for h in handlers])
    assert_one_world(infos, 12)
    assert [hosts[info.rank] for info in infos] == joined
    assert infos[0].bootstrap_store_info.master_addr == "node1"


def test_round_of_labelled_and_unlabelled_nodes(etcd_endpoint, run_id, handlers, monkeypatch):
    monkeypatch.setenv("SLURM_TOPOLOGY_ADDR", "s1.s2.node9")
    monkeypatch.setenv("SLURM_TOPOLOGY_ADDR_PATTERN", "switch.switch.node")
    handlers.append(make_handler(etcd_endpoint, run_id, 5, 5, local_addr="node9"))
    monkeypatch.setenv("RDZV_TOPOLOGY", "s1/s1")
    handlers.append(make_handler(etcd_endpoint, run_id, 5, 5, local_addr="node7"))
    monkeypatch.delenv("RDZV_TOPOLOGY")
    monkeypatch.delenv("SLURM_TOPOLOGY_ADDR")
    handlers.append(make_handler(etcd_endpoint, run_id, 5, 5, local_addr="node1"))
    handlers.append(make_handler(etcd_endpoint, run_id, 5, 5, local_addr="node2",
                                 topology="s1/s2"))
    handlers.append(make_handler(etcd_endpoint, run_id, 5, 5, local_addr="10.0.0.1"))
    infos = run_round([ThreadNode(h) for h in handlers])
    assert_one_world(infos, 5)
    # s1/s1: node7; s1/s2: node2, node9 (from Slurm); unlabelled: 10.0.0.1, node1.
    assert [info.rank for info in infos] == [2, 0, 4, 1, 3]
    client = EtcdClient(EtcdConfig(endpoints=tuple(parse_endpoints(etcd_endpoint))))
    try:
        members_prefix = RunKeys("/rdzv", run_id).members(0)
        labels = {core.decode_member(value)[0]: core.decode_member(value)[4]
                  for _, value, _ in client.range_leases(members_prefix)}
    finally:
        client.close()
    assert labels == {"node9": "s1/s2", "node7": "s1/s1", "node1": "", "node2": "s1/s2",
                      "10.0.0.1": ""}


@pytest.mark.parametrize("rank_order, expected", [
    ("stable", ["node1", "node3", "node7", "node6"]),
    ("topology", ["node1", "node3", "node6", "node7"]),
])
def test_next_round_keeps_survivors_or_regroups(etcd_endpoint, run_id, handlers,
                                                rank_order, expected):
    def node(host: str, label: str):
        handler = make_handler(etcd_endpoint, run_id, 4, 4, local_addr=host, topology=label,
                               rank_order=rank_order)
        handlers.append(handler)
        return handler

    first = [node("node5", "rack2"), node("node2", "rack1"), node("node6", "rack2"),
             node("node1", "rack1")]
    infos = run_round([ThreadNode(h) for h in first])
    assert_one_world(infos, 4)
    assert [info.rank for info in infos] == [2, 1, 3, 0]
    # node2 (rank 1) and node5 (rank 2) leave; node3 (rack1) and node7 (rack2) come.
    for leaving in first[:2]:
        leaving.shutdown()
        handlers.remove(leaving)
    second = [first[3], first[2], node("node3", "rack1"), node("node7", "rack2")]
    infos = run_round([ThreadNode(h) for h in second])
    assert_one_world(infos, 4)
    hosts = ["node1", "node6", "node3", "node7"]
    assert [hosts[i] for i in sorted(range(4), key=lambda i: infos[i].rank)] == expected


@pytest.mark.parametrize("config, env", [
    ({"topology": "rack 1"}, {}),
    ({"topology": "a" * 257}, {}),
    ({"rank_order": "racks"}, {}),
    ({}, {"RDZV_TOPOLOGY": "rack,1"}),
    ({}, {"SLURM_TOPOLOGY_ADDR": "sw\x01.node1"}),
])
def test_bad_labels_are_refused_before_anything_is_written(
    etcd_server, run_id, monkeypatch, config, env
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def writes() -> list[float]:
        # Leases granted and keys put (a lease expiring elsewhere moves neither).
        names = (b"etcd_debugging_lease_granted_total ", b"etcd_mvcc_put_total ")
        text = urllib.request.urlopen(etcd_server.get_metrics_url() + "/metrics", timeout=10)
        return [float(line.rsplit(b" ", 1)[1]) for line in text if line.startswith(names)]

    before = writes()
    with pytest.raises(ValueError, match=r"topology|rank_order|TOPOLOGY"):
        make_handler(etcd_server.get_endpoint(), run_id, 1, 1, **config)
    assert writes() == before


# ------------------------------------------------- the compiled sort, at scale
def _natural_oracle(text: str) -> bytes:
    """The placement order of names, spelled out in Python: digit runs as numbers."""
    out = b""
    for part in re.split(r"(\d+)", text.lower()):
        if part.isdigit():
            digits = part.lstrip("0") or "0"
            out += b"0" + bytes([min(len(digits), 255)]) + digits.encode()
        else:
            out += part.encode()
    return out + b"\0"


def _address_oracle(text: str) -> bytes:
    try:
        value = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return b"\2" + _natural_oracle(text)
    if value.version == 4:
        value = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + value.packed)
    return b"\1" + value.packed + b"\0"


def _placement_oracle(node_id: str, host: str, addr: str, pid: int, label: str) -> bytes:
    topology = b"\2"
    if label:
        topology = b"\1" + b"".join(b"\1" + _natural_oracle(e) for e in label.split("/")) + b"\0"
    return (topology + _address_oracle(host) + _address_oracle(addr) + pid.to_bytes(8, "big")
            + node_id.encode())


@pytest.mark.parametrize("seed", range(6))
def test_placement_order_matches_its_definition(seed):
    rng = random.Random(seed)
    n = rng.choice([30, 200, 3000])
    racks = rng.randint(1, 40)
    pick_host = [
        lambda: f"node{rng.randint(0, 300)}",
        lambda: f"gpu-r{rng.randint(0, 12)}-n{rng.randint(0, 40):0{rng.randint(1, 3)}d}",
        lambda: f"10.{rng.randint(0, 3)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}",
        lambda: f"2001:db8::{rng.randint(0, 65535):x}",
        lambda: rng.choice(["a", "A", "a-1", "a.1", "b", "Node", "node"]),
    ]
    rows = []
    for i in range(n):
        host = rng.choice(pick_host)()
        label = "" if rng.random() < 0.2 else (
            f"pod{rng.randint(0, 3)}/rack{rng.randint(0, racks)}"
            + rng.choice(["", "/leaf1", "/leaf02"]))
        rows.append((f"{rng.getrandbits(40):010x}{i}", host, host if rng.random() < 0.8 else
                     pick_host[2](), rng.randint(0, 5), label))
    joined = [(node, core.encode_member(host, addr, pid, 1, label))
              for node, host, addr, pid, label in rows]
    expected = [row[0] for row in sorted(rows, key=lambda row: _placement_oracle(*row))]
    assert core.placement_order(joined) == expected
    assert core.assign_ranks(joined, [], n) == expected
    survivors = rng.sample(expected, n // 3)
    ranks = core.assign_ranks(joined, survivors, n)
    assert ranks[:len(survivors)] == survivors
    assert ranks[len(survivors):] == [node for node in expected if node not in set(survivors)]


def test_torchrun_rdzv_conf_carries_the_label(etcd_endpoint, run_id):
    """``--rdzv-conf topology=...,rank_order=...`` reaches each agent's descriptor."""
    pytest.importorskip("torch")
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.launcher.api import LaunchConfig

    from rdzv.torch import create_handler

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=1, run_id=run_id, rdzv_backend="etcd3",
        rdzv_endpoint=etcd_endpoint,
        rdzv_configs={"topology": "pod1/rack07", "rank_order": "topology"},
    )
    handler = create_handler(RendezvousParameters(
        backend=config.rdzv_backend, endpoint=config.rdzv_endpoint, run_id=config.run_id,
        min_nodes=config.min_nodes, max_nodes=config.max_nodes, local_addr="node1",
        **config.rdzv_configs,
    ))
    try:
        assert handler.next_rendezvous().rank == 0
        client = EtcdClient(EtcdConfig(endpoints=tuple(parse_endpoints(etcd_endpoint))))
        try:
            ((_, value, _),) = client.range_leases(RunKeys("/rdzv", run_id).members(0))
        finally:
            client.close()
        assert core.decode_member(value)[4:] == ("pod1/rack07", "topology")
    finally:
        handler.shutdown()
