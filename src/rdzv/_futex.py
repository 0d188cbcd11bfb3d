"""Room in Linux's futex table for the threads of a process's nodes.

A thread that sleeps on a lock or a condition sleeps on a *futex*: the kernel
queues it in a hash table, and every wake-up walks the queue of its slot to
find the threads it wakes. From Linux 6.16 each process has a table of its
own, sized for the process's CPUs (16 slots on 2 CPUs), where earlier kernels
share one table of 256 slots per CPU. A process that hosts thousands of nodes
(a benchmark, a test, a launcher of many agents) has one thread asleep in
each ``next_rendezvous()`` call for the whole round: in a table of 16 slots,
hundreds of sleepers per slot, and every hand-off of a lock in the process
(the interpreter's, gRPC's, the round driver's) walks them. One process of
4096 nodes on 2 CPUs: a round of 7.4-8.6 s with the table the kernel gave it,
5.3-5.9 s with the table grown as the calls began.

So the nodes of a process count themselves (a handler is one node: one
thread in its ``next_rendezvous()`` at a time), and once ``_SLOTS_PER_NODE``
slots per node come to ``_MIN_SLOTS`` or more, the process's table is grown
(``PR_FUTEX_HASH``) to that many, rounded up to a power of two, and never
shrunk. They count when they are created, not when their calls begin: the
threads of many nodes begin their calls together, and wake together, and
that is when a small table costs most (one process of 4096 nodes: 5.4 and
5.7 s a round with the table made large by hand before the calls, 6.8 and
6.9 s with it grown as they began); and a table grows faster with fewer
threads asleep in it. Kernels without tables of their own refuse the
request, and nothing more is asked of them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)

# prctl(2): PR_FUTEX_HASH, and its operations.
_PR_FUTEX_HASH = 78
_PR_FUTEX_HASH_SET_SLOTS = 1
_PR_FUTEX_HASH_GET_SLOTS = 2
# The kernel sizes a default table at 4 slots per thread (up to one thread per
# CPU); the same per node.
_SLOTS_PER_NODE = 4
# Tables smaller than this are left to the kernel: a process with a few
# nodes (a torchrun agent hosts one) never asks.
_MIN_SLOTS = 256
# 64 bytes a slot: 4 MiB at most.
_MAX_SLOTS = 1 << 16


def _load_prctl() -> Callable[..., int] | None:
    """prctl(2) with its argument types, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


def table_slots() -> int:
    """The size of this process's own futex table: 0 while it uses the
    kernel's shared one, -1 where the kernel gives processes none."""
    if _prctl is None:
        return -1
    return _prctl(_PR_FUTEX_HASH, _PR_FUTEX_HASH_GET_SLOTS, 0, 0, 0)


def _grow_table(slots: int) -> bool:
    """Grow the process's futex table to ``slots``; whether it has that many now."""
    assert _prctl is not None
    # The kernel may have grown it past that already (4 slots a thread, on a
    # machine of many CPUs).
    if table_slots() >= slots or \
            _prctl(_PR_FUTEX_HASH, _PR_FUTEX_HASH_SET_SLOTS, slots, 0, 0) == 0:
        return True
    logger.debug("the kernel kept its futex table (prctl: %s)", os.strerror(ctypes.get_errno()))
    return False


class Nodes:
    """The nodes of a process, each with a thread that sleeps in its calls.

    Args:
        grow: grows the process's futex table to a number of slots and says
            whether it has them now; None: never asked.
    """

    def __init__(self, grow: Callable[[int], bool] | None) -> None:
        self._lock = threading.Lock()
        self._grow = grow
        self._nodes = 0
        self._slots = 0

    @property
    def slots(self) -> int:
        """The least size the table has been grown to; 0: the kernel's own."""
        return self._slots

    def add(self) -> None:
        """One more node: grow the table if it needs more room."""
        with self._lock:
            self._nodes += 1
            if self._grow is None:
                return
            wanted = min(1 << (self._nodes * _SLOTS_PER_NODE - 1).bit_length(), _MAX_SLOTS)
            if wanted < _MIN_SLOTS or wanted <= self._slots:
                return
            if self._grow(wanted):
                self._slots = wanted
            else:
                self._grow = None

    def remove(self) -> None:
        """A node shut down."""
        with self._lock:
            self._nodes -= 1

    def _forget(self) -> None:
        # A forked child has none of its parent's threads (its nodes are
        # its parent's), and a table of the kernel's default size.
        self._lock = threading.Lock()
        self._nodes = 0
        self._slots = 0


nodes = Nodes(_grow_table if _prctl is not None else None)
os.register_at_fork(after_in_child=nodes._forget)
