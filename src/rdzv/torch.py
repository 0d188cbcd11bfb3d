"""rdzv inside torchrun: the ``etcd3`` rendezvous backend for torch's elastic agent.

This is the only module of rdzv that imports torch. It adapts the etcd handler
and its store to torch's own types, so that torch's agent, launcher and
``PrefixStore`` use them like the backends torch ships:

- ``TorchEtcdStore``: a ``torch.distributed.Store`` backed by ``EtcdStore``;
- ``TorchEtcdRendezvousHandler``: torch's ``RendezvousHandler`` around
  ``EtcdRendezvousHandler``; it returns torch's ``RendezvousInfo`` and raises
  torch's rendezvous errors;
- ``create_handler``: the ``torchrun.handlers`` entry point, so that
  ``torchrun --rdzv-backend=etcd3`` finds this backend once rdzv is installed.

Two details of torch 2.x shape this module:

* torch's registry calls an entry point with no arguments and registers what it
  returns as the creator (``handler_registry.register(name, get_handler())``);
  ``create_handler()`` therefore returns itself, and ``create_handler(params)``
  builds a handler.
* C++ callers of a Python ``Store`` subclass (``PrefixStore``, process groups)
  go through pybind's trampoline, which looks up ``getNumKeys`` and
  ``deleteKey`` by their C++ names and keeps the timeout in the C++ base
  (``set_timeout`` on a ``PrefixStore`` never reaches Python). The store
  answers to both spellings and reads the timeout from the base before every
  blocking call.
"""

from __future__ import annotations

import copy
import datetime
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

_INSTALL_HINT = "pip install 'rdzv[torch]'"

#: The backend name the entry point registers (``torchrun --rdzv-backend=etcd3``).
BACKEND = "etcd3"


@overload
def create_handler(params: None = None) -> Callable[[Any], TorchEtcdRendezvousHandler]: ...


@overload
def create_handler(params: Any) -> TorchEtcdRendezvousHandler: ...


def create_handler(
    params: Any = None,
) -> TorchEtcdRendezvousHandler | Callable[[Any], TorchEtcdRendezvousHandler]:
    """Create the torch handler of an etcd v3 rendezvous; the ``torchrun.handlers`` entry point.

    torch's registry calls the entry point without arguments and registers the
    result as the creator of backend ``etcd3``; called so, this function
    returns itself. Called with parameters, it builds the handler.

    Args:
        params: torch's ``RendezvousParameters`` (rdzv's are accepted too).
            ``config`` (``--rdzv-conf``) is passed through unchanged; see
            ``rdzv.config.RENDEZVOUS_OPTIONS``.

    Returns:
        A ``TorchEtcdRendezvousHandler``; ``create_handler`` itself if
        ``params`` is None.

    Raises:
        ValueError: an option is unknown or malformed.
        RendezvousConnectionError: (torch's) etcd cannot be reached.
    """
    if params is None:
        return create_handler
    return _create_handler(params)


# torch is imported after create_handler on purpose: importing torch's rendezvous
# package loads the torchrun.handlers entry points, this module among them. When
# this module is the one being imported, the registry finds create_handler
# already defined instead of failing on a partially initialized module.
try:
    import torch.distributed as _dist

    if not _dist.is_available():
        raise ImportError("this torch build has no torch.distributed support")
    from torch.distributed.elastic.rendezvous import api as _torch_api
except ImportError as _err:
    raise ImportError(
        f"rdzv.torch plugs rdzv into torchrun and needs PyTorch with torch.distributed "
        f"({_err}). Install it with: {_INSTALL_HINT}"
    ) from _err

from rdzv import api
from rdzv.client import ForkedProcessError
from rdzv.etcd_rendezvous import EtcdRendezvousHandler, create_rdzv_handler
from rdzv.etcd_store import EtcdStore, StoreTimeoutError

__all__ = ["BACKEND", "TorchEtcdRendezvousHandler", "TorchEtcdStore", "create_handler"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


def _store_errors(method: Callable[..., _T]) -> Callable[..., _T]:
    """Re-raise rdzv's store errors as the c10d errors torch's callers catch.

    ``torch.distributed.elastic.utils.store.barrier`` and friends catch
    ``DistStoreError`` on a timed-out wait; a TCPStore that loses its server
    raises ``DistNetworkError``.
    """

    @functools.wraps(method)
    def wrapper(self: TorchEtcdStore, *args: Any, **kwargs: Any) -> _T:
        try:
            return method(self, *args, **kwargs)
        except StoreTimeoutError as err:
            raise _dist.DistStoreError(str(err)) from err
        except api.RendezvousConnectionError as err:
            raise _dist.DistNetworkError(str(err)) from err

    return wrapper


class TorchEtcdStore(_dist.Store):
    """A ``torch.distributed.Store`` whose keys live in etcd, through ``EtcdStore``.

    It can be used wherever torch takes a store: wrapped in a ``PrefixStore``,
    by the elastic agent's rank assignment and barriers, or to initialize a
    process group. Timeouts raise ``torch.distributed.DistStoreError`` and an
    unreachable etcd ``torch.distributed.DistNetworkError``, as with c10d's
    ``TCPStore``.

    The timeout is the one of torch's ``Store`` base (``timeout``,
    ``set_timeout``), so it also applies when a ``PrefixStore`` around this
    store changes it. Queue operations and ``list_keys`` are not supported.

    Args:
        store: the etcd store to expose; this object does not own its connection.
    """

    def __init__(self, store: EtcdStore) -> None:
        super().__init__()
        self._store = store
        self.set_timeout(store.timeout)

    @property
    def etcd_store(self) -> EtcdStore:
        """The underlying ``EtcdStore``."""
        return self._store

    def _synced(self) -> EtcdStore:
        # The timeout lives in the C++ base, where a PrefixStore also sets it.
        self._store.set_timeout(self.timeout)
        return self._store

    @_store_errors
    def set(self, key: str, value: str | bytes) -> None:
        """Store ``value`` at ``key``, replacing any previous value."""
        self._synced().set(key, value)

    @_store_errors
    def get(self, key: str) -> bytes:
        """Return the value of ``key``, waiting up to ``timeout`` until it is set.

        Raises:
            DistStoreError: the key was not set in time.
        """
        return self._synced().get(key)

    @_store_errors
    def add(self, key: str, amount: int) -> int:
        """Atomically add ``amount`` to the counter at ``key``; return the new value."""
        return self._synced().add(key, amount)

    @_store_errors
    def compare_set(
        self, key: str, expected_value: str | bytes, desired_value: str | bytes
    ) -> bytes:
        """Set ``key`` to ``desired_value`` if it holds ``expected_value`` (c10d semantics).

        Returns:
            ``desired_value`` if it was stored, else the current value (or
            ``expected_value`` when the key is missing).
        """
        return self._synced().compare_set(key, expected_value, desired_value)

    @_store_errors
    def wait(self, keys: Sequence[str], timeout: datetime.timedelta | None = None) -> None:
        """Block until every key in ``keys`` is set.

        Args:
            keys: the keys to wait for.
            timeout: how long to wait; the store's ``timeout`` if None.

        Raises:
            DistStoreError: some key was not set in time.
        """
        self._synced().wait(keys, timeout)

    @_store_errors
    def check(self, keys: Sequence[str]) -> bool:
        """Return whether every key in ``keys`` is set, without waiting."""
        return self._synced().check(keys)

    @_store_errors
    def multi_get(self, keys: Sequence[str]) -> list[bytes]:
        """Return the values of ``keys`` (read together), waiting until all are set."""
        return self._synced().multi_get(keys)

    @_store_errors
    def multi_set(self, keys: Sequence[str], values: Sequence[str | bytes]) -> None:
        """Store ``values[i]`` at ``keys[i]`` for every ``i``, in one transaction."""
        self._synced().multi_set(keys, values)

    @_store_errors
    def num_keys(self) -> int:
        """Return how many keys the store holds."""
        return self._synced().num_keys()

    @_store_errors
    def delete_key(self, key: str) -> bool:
        """Delete ``key``; return whether it existed."""
        return self._synced().delete_key(key)

    # pybind's trampoline looks these two up by their C++ names.
    getNumKeys = num_keys
    deleteKey = delete_key

    def clone(self) -> TorchEtcdStore:
        """Return a store on the same keys and connection, with its own timeout."""
        return TorchEtcdStore(copy.copy(self._synced()))

    def __repr__(self) -> str:
        return f"TorchEtcdStore({self._store!r})"


# torch's error classes by rdzv's; the most derived match wins.
_ERRORS: dict[type[api.RendezvousError], type[_torch_api.RendezvousError]] = {
    api.RendezvousError: _torch_api.RendezvousError,
    api.RendezvousClosedError: _torch_api.RendezvousClosedError,
    api.RendezvousTimeoutError: _torch_api.RendezvousTimeoutError,
    api.RendezvousConnectionError: _torch_api.RendezvousConnectionError,
    api.RendezvousStateError: _torch_api.RendezvousStateError,
    api.RendezvousGracefulExitError: _torch_api.RendezvousGracefulExitError,
}


def _torch_error(err: api.RendezvousError) -> _torch_api.RendezvousError:
    for cls in type(err).__mro__:
        if cls in _ERRORS:
            return _ERRORS[cls](str(err))
    raise AssertionError(f"{type(err).__name__} is not a RendezvousError")


def _rendezvous_errors(method: Callable[..., _T]) -> Callable[..., _T]:
    """Re-raise rdzv's rendezvous errors as torch's classes of the same name."""

    @functools.wraps(method)
    def wrapper(self: TorchEtcdRendezvousHandler, *args: Any, **kwargs: Any) -> _T:
        try:
            return method(self, *args, **kwargs)
        except api.RendezvousError as err:
            raise _torch_error(err) from err

    return wrapper


class TorchEtcdRendezvousHandler(_torch_api.RendezvousHandler):
    """torch's ``RendezvousHandler`` on rdzv's etcd v3 rendezvous.

    Every call goes to the wrapped ``EtcdRendezvousHandler``; results come back
    as torch's types and errors as torch's ``Rendezvous*Error`` of the same name
    (the original is the ``__cause__``), so that torch's agent reacts to them as
    to its own backends' errors. As with torch's backends, ``shutdown()`` also
    closes the run.

    Create it with ``create_handler(params)``, or let torchrun do it
    (``--rdzv-backend=etcd3``).

    Args:
        handler: the etcd handler to drive; owned from now on (``shutdown()``
            shuts it down).
    """

    def __init__(self, handler: EtcdRendezvousHandler) -> None:
        self._handler = handler
        self._shut_down = False
        self._closed = False

    @property
    def handler(self) -> EtcdRendezvousHandler:
        """The wrapped ``EtcdRendezvousHandler``."""
        return self._handler

    def get_backend(self) -> str:
        """Return the backend name of the parameters (``"etcd3"`` under torchrun)."""
        return self._handler.get_backend()

    def get_run_id(self) -> str:
        """Return the run id."""
        return self._handler.get_run_id()

    @property
    def use_agent_store(self) -> bool:
        """False: the round's store lives in etcd, where workers cannot reach it as a
        TCPStore, so rank 0's worker hosts the workers' store at ``MASTER_PORT``."""
        return False

    @_rendezvous_errors
    def next_rendezvous(self) -> _torch_api.RendezvousInfo:
        """Block until this node is a member of a completed round.

        Returns:
            torch's ``RendezvousInfo``: the round's ``TorchEtcdStore``, this
            node's rank, the number of nodes, and rank 0's address and port.

        Raises:
            RendezvousClosedError: the run is closed.
            RendezvousTimeoutError: no round completed within ``timeout``.
            RendezvousConnectionError: etcd could not be reached.
            RendezvousStateError: the rendezvous state in etcd is corrupt.
        """
        info = self._handler.next_rendezvous()
        bootstrap = info.bootstrap_store_info
        return _torch_api.RendezvousInfo(
            TorchEtcdStore(info.store),
            info.rank,
            info.world_size,
            _torch_api.RendezvousStoreInfo(bootstrap.master_addr, bootstrap.master_port),
        )

    @_rendezvous_errors
    def is_closed(self) -> bool:
        """Return whether the run is closed."""
        return self._handler.is_closed()

    @_rendezvous_errors
    def set_closed(self) -> None:
        """Close the run for every node, now and later."""
        self._handler.set_closed()

    @_rendezvous_errors
    def num_nodes_waiting(self) -> int:
        """Return how many nodes wait to join after this node's last round.

        torch's agent polls it every ``--monitor-interval`` while its workers are
        healthy and restarts them (without using up a restart) when it is > 0.
        """
        return self._handler.num_nodes_waiting()

    @_rendezvous_errors
    def waiting_nodes(self) -> list[str]:
        """Return the ids of the nodes waiting for the next round or already in it
        (see ``EtcdRendezvousHandler.waiting_nodes``)."""
        return self._handler.waiting_nodes()

    @_rendezvous_errors
    def lost_members(self) -> list[str]:
        """Return the ids of the last round's members whose lease expired or who
        shut down (see ``EtcdRendezvousHandler.lost_members``)."""
        return self._handler.lost_members()

    @_rendezvous_errors
    def shutdown(self) -> bool:
        """Close the run, then release this node's lease, watches and connection.

        torch's backends close the run here, and torch's launcher relies on it: it
        calls ``shutdown()`` when its agent is done, succeeded or failed, so that
        the other nodes stop waiting for this one in a next round (they get
        ``RendezvousClosedError`` instead of waiting ``timeout`` seconds), and it
        skips the call when the agent is stopped by a signal, to leave the run
        open for the node's replacement. Idempotent.

        Returns:
            True if the run was closed; False (with a warning) if closing failed.
            The node's resources are released either way.

        Raises:
            RendezvousError: (torch's) this process was forked after the handler
                was created; the run, lease and connection are left to the parent.
        """
        if self._shut_down:
            return self._closed
        forked = False
        try:
            self._handler.set_closed()
            self._closed = True
        except ForkedProcessError:
            forked = True  # nothing here is this process's to close or release
            raise
        except api.RendezvousError as err:
            logger.warning(
                "could not close run %r on shutdown: %s", self._handler.get_run_id(), err
            )
        finally:
            if not forked:
                self._shut_down = True
                self._handler.shutdown()
        return self._closed

    def __repr__(self) -> str:
        return (
            f"TorchEtcdRendezvousHandler(backend={self.get_backend()!r}, "
            f"run_id={self.get_run_id()!r})"
        )


def _rdzv_params(params: Any) -> api.RendezvousParameters:
    """torch's (or rdzv's) ``RendezvousParameters`` as rdzv's, options unchanged."""
    if isinstance(params, api.RendezvousParameters):
        return params
    try:
        fields = (params.backend, params.endpoint, params.run_id, params.min_nodes,
                  params.max_nodes, params.local_addr, params.config)
    except AttributeError as err:
        raise TypeError(
            f"create_handler() expects torch's RendezvousParameters, got "
            f"{type(params).__name__} ({err})."
        ) from None
    backend, endpoint, run_id, min_nodes, max_nodes, local_addr, config = fields
    return api.RendezvousParameters(
        backend, endpoint, run_id, min_nodes, max_nodes, local_addr, **config
    )


def _create_handler(params: Any) -> TorchEtcdRendezvousHandler:
    rdzv_params = _rdzv_params(params)
    try:
        handler = create_rdzv_handler(rdzv_params)
    except api.RendezvousError as err:
        raise _torch_error(err) from err
    logger.info(
        "etcd3 rendezvous of run %r on %s: node %s", rdzv_params.run_id,
        rdzv_params.endpoint, handler.node_id,
    )
    return TorchEtcdRendezvousHandler(handler)
