"""The futex table of a process that hosts many nodes (``rdzv._futex``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from rdzv._futex import Nodes, table_slots


class _Kernel:
    def __init__(self, takes: bool = True) -> None:
        self.takes = takes
        self.asked: list[int] = []

    def __call__(self, slots: int) -> bool:
        self.asked.append(slots)
        return self.takes


def test_the_table_grows_by_powers_of_two_with_the_nodes():
    kernel = _Kernel()
    nodes = Nodes(kernel)
    for _ in range(32):
        nodes.add()
    # 4 slots a node, and the kernel's default is left alone below 256.
    assert kernel.asked == [] and nodes.slots == 0
    nodes.add()
    assert kernel.asked == [256] and nodes.slots == 256
    for _ in range(33, 1000):
        nodes.add()
    assert kernel.asked == [256, 512, 1024, 2048, 4096]


def test_the_table_never_shrinks_and_stops_at_its_bound():
    kernel = _Kernel()
    nodes = Nodes(kernel)
    for _ in range(100):
        nodes.add()
    for _ in range(100):
        nodes.remove()
    for _ in range(100):
        nodes.add()
    assert kernel.asked == [256, 512]
    for _ in range(100, 40_000):
        nodes.add()
    assert kernel.asked[-1] == 1 << 16 and nodes.slots == 1 << 16
    assert len(kernel.asked) == len(set(kernel.asked))


def test_a_kernel_that_refuses_is_asked_once():
    kernel = _Kernel(takes=False)
    nodes = Nodes(kernel)
    for _ in range(1000):
        nodes.add()
    assert kernel.asked == [256] and nodes.slots == 0


@pytest.mark.skipif(table_slots() < 0,
                    reason="the kernel gives processes no futex table of their own "
                           "(Linux 6.16 and later do)")
def test_a_process_hosting_many_nodes_gets_room_for_them_before_their_calls(
        etcd_endpoint, run_id):
    # A fresh process, so that the table starts at the kernel's default size.
    script = textwrap.dedent(f"""
        import threading
        from rdzv._futex import table_slots
        from rdzv.api import RendezvousParameters
        from rdzv.etcd_rendezvous import create_rdzv_handler
        n = 40
        handlers = [create_rdzv_handler(RendezvousParameters(
            "etcd", {etcd_endpoint!r}, {run_id!r}, n, n, timeout=60, last_call_timeout=30))
            for _ in range(n)]
        print("created", table_slots())
        infos = [None] * n
        def run(i):
            infos[i] = handlers[i].next_rendezvous()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(i.rank for i in infos) == list(range(n)), infos
        for h in handlers:
            h.shutdown()
        print("shut down", table_slots())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    # 40 nodes: 160 slots, a table of 256 at least, from before their calls
    # began to after they shut down (never shrunk).
    sizes = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines())
    assert int(sizes["created"]) >= 256 and int(sizes["shut down"]) >= 256, sizes
