"""The rendezvous interface: parameters, handler contract, results and errors.

Names, signatures and messages follow ``torch.distributed.elastic.rendezvous.api``
so that code written for torch's handlers ports by renaming the imports. Nothing
here imports torch.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from rdzv.config import check_node_bounds

__all__ = [
    "RendezvousClosedError",
    "RendezvousConnectionError",
    "RendezvousError",
    "RendezvousGracefulExitError",
    "RendezvousHandler",
    "RendezvousInfo",
    "RendezvousParameters",
    "RendezvousStateError",
    "RendezvousStoreInfo",
    "RendezvousTimeoutError",
]


class RendezvousError(Exception):
    """Base class for every error a rendezvous raises."""


class RendezvousClosedError(RendezvousError):
    """The run was closed (``set_closed()``); no further rounds will form."""


class RendezvousTimeoutError(RendezvousError):
    """The rendezvous did not complete within its ``timeout``."""


class RendezvousConnectionError(RendezvousError):
    """etcd could not be reached (refused, unresolvable, TLS or auth failure)."""


class RendezvousStateError(RendezvousError):
    """The rendezvous state in etcd is corrupt or cannot be decoded."""


class RendezvousGracefulExitError(RendezvousError):
    """This node is not part of the rendezvous and should exit without failure."""


@dataclass
class RendezvousStoreInfo:
    """Where the workers of a completed round find their bootstrap store.

    Attributes:
        master_addr: address of the rank-0 node, as it published it.
        master_port: a free port on that address.
    """

    MASTER_ADDR_KEY: ClassVar[str] = "MASTER_ADDR"
    MASTER_PORT_KEY: ClassVar[str] = "MASTER_PORT"
    master_addr: str
    master_port: int

    @staticmethod
    def build(
        rank: int,
        store: Any,
        local_addr: str | None,
        server_port: int | None = None,
    ) -> RendezvousStoreInfo:
        """Publish (rank 0) or read (other ranks) the bootstrap address in ``store``.

        Args:
            rank: this node's rank in the round.
            store: the round's store; rank 0 sets the keys, the others ``get`` them
                (blocking until they exist or the store's timeout passes).
            local_addr: the address rank 0 advertises; its FQDN if None.
            server_port: the port rank 0 advertises; a free port if None.

        Returns:
            The address and port every rank of the round agrees on.
        """
        if rank == 0:
            addr = local_addr or socket.getfqdn()
            port = server_port if server_port is not None else free_port()
            store.set(RendezvousStoreInfo.MASTER_ADDR_KEY, addr.encode("utf-8"))
            store.set(RendezvousStoreInfo.MASTER_PORT_KEY, str(port).encode("utf-8"))
        addr = store.get(RendezvousStoreInfo.MASTER_ADDR_KEY).decode("utf-8")
        port = int(store.get(RendezvousStoreInfo.MASTER_PORT_KEY).decode("utf-8"))
        return RendezvousStoreInfo(master_addr=addr, master_port=port)


def free_port() -> int:
    """Return a TCP port that is free on this host right now (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class RendezvousInfo:
    """What a completed round hands to its node.

    Args:
        store: key-value store shared by the round's members.
        rank: this node's rank, in ``0..world_size-1``.
        world_size: number of nodes in the round.
        bootstrap_store_info: rank 0's published address and port.
    """

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        bootstrap_store_info: RendezvousStoreInfo,
    ) -> None:
        self._store = store
        self._rank = rank
        self._world_size = world_size
        self._bootstrap_store_info = bootstrap_store_info

    @property
    def store(self) -> Any:
        """The round's key-value store."""
        return self._store

    @property
    def rank(self) -> int:
        """This node's rank in the round."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of nodes in the round."""
        return self._world_size

    @property
    def bootstrap_store_info(self) -> RendezvousStoreInfo:
        """Rank 0's published ``MASTER_ADDR``/``MASTER_PORT``."""
        return self._bootstrap_store_info

    def __repr__(self) -> str:
        return (
            f"RendezvousInfo(rank={self._rank}, world_size={self._world_size}, "
            f"bootstrap_store_info={self._bootstrap_store_info})"
        )


class RendezvousHandler(ABC):
    """Main rendezvous interface, as torch's elastic agent drives it."""

    @abstractmethod
    def get_backend(self) -> str:
        """Return the name of the rendezvous backend."""

    @property
    def use_agent_store(self) -> bool:
        """Whether the agent should reuse the rendezvous store for its workers."""
        return False

    @abstractmethod
    def next_rendezvous(self) -> RendezvousInfo:
        """Block until this node is a member of a completed round.

        Raises:
            RendezvousClosedError: the run is closed.
            RendezvousConnectionError: etcd cannot be reached.
            RendezvousStateError: the rendezvous state is corrupt.
            RendezvousTimeoutError: the round did not complete in time.
        """

    @abstractmethod
    def is_closed(self) -> bool:
        """Return whether the run is closed."""

    @abstractmethod
    def set_closed(self) -> None:
        """Close the run: every current and future ``next_rendezvous()`` fails."""

    @abstractmethod
    def num_nodes_waiting(self) -> int:
        """Return the number of nodes waiting to join the next round."""

    @abstractmethod
    def get_run_id(self) -> str:
        """Return the run id of the rendezvous."""

    @abstractmethod
    def shutdown(self) -> bool:
        """Release this node's resources; return True on success."""


class RendezvousParameters:
    """Everything needed to construct a rendezvous handler.

    Args:
        backend: name of the backend that handles the rendezvous.
        endpoint: where the backend is, ``host[:port]`` or a comma-separated list.
        run_id: id of the run; nodes with the same id rendezvous together.
        min_nodes: minimum number of nodes admitted to a round.
        max_nodes: maximum number of nodes admitted to a round.
        local_addr: address this node advertises (rank 0's ``MASTER_ADDR``).
        **kwargs: backend-specific options, read with ``get`` and friends.

    Raises:
        ValueError: the backend name is empty, or the bounds break the rule
            ``1 <= min_nodes <= max_nodes <= 1000000`` (``check_node_bounds``).
    """

    def __init__(
        self,
        backend: str,
        endpoint: str,
        run_id: str,
        min_nodes: int,
        max_nodes: int,
        local_addr: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not backend:
            raise ValueError("The rendezvous backend name must be a non-empty string.")
        check_node_bounds(min_nodes, max_nodes)
        self.backend = backend
        self.endpoint = endpoint
        self.run_id = run_id
        self.min_nodes = min_nodes
        self.max_nodes = max_nodes
        self.config = kwargs
        self.local_addr = local_addr

    def get(self, key: str, default: Any = None) -> Any:
        """Return the value of the option ``key`` if set, else ``default``."""
        return self.config.get(key, default)

    def get_as_bool(self, key: str, default: bool | None = None) -> bool | None:
        """Return the option ``key`` as a bool (accepts 1/0, true/false, yes/no, t/f, y/n)."""
        value = self.get(key, default)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            if value in (0, 1):
                return bool(value)
        elif isinstance(value, str):
            lowered = value.lower()
            if lowered in ("1", "true", "t", "yes", "y"):
                return True
            if lowered in ("0", "false", "f", "no", "n"):
                return False
        raise ValueError(
            f"The rendezvous configuration option '{key}' does not represent a valid boolean value."
        )

    def get_as_int(self, key: str, default: int | None = None) -> int | None:
        """Return the option ``key`` as an int."""
        value = self.get(key, default)
        if value is None:
            return value
        try:
            return int(value)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(
                f"The rendezvous configuration option '{key}' does not represent a valid "
                f"integer value."
            ) from e
