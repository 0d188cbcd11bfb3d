"""rdzv: fast, elastic rendezvous for distributed training launchers, on etcd v3.

The public names mirror torch's module paths, so code written for
``torch.distributed.elastic.rendezvous`` ports by renaming imports:

- ``rdzv.api``: parameters, the handler interface, results and errors;
- ``rdzv.etcd_rendezvous``: ``create_rdzv_handler`` and the handler;
- ``rdzv.etcd_server``: ``EtcdServer`` (and ``EtcdCluster``) for local etcd;
- ``rdzv.etcd_store``: ``EtcdStore``, the store of a completed round.

``rdzv.inspect`` reads a run's status (what ``rdzv status`` shows).

``rdzv.torch`` (the only module that imports torch) plugs rdzv into torchrun.
"""

import os as _os

# gRPC gives a forked child a poller of its own only with its fork support on;
# without it a child can be left with the parent's epoll set and fail its first
# connection ("epoll_ctl failed: file descriptor was created pre fork"). It is
# read when grpc is imported, so it is set before rdzv imports grpc; a value of
# the user's wins.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "1")

from rdzv.api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousError,
    RendezvousGracefulExitError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStateError,
    RendezvousStoreInfo,
    RendezvousTimeoutError,
)
from rdzv.client import ForkedProcessError
from rdzv.etcd_rendezvous import EtcdRendezvousHandler, create_rdzv_handler
from rdzv.etcd_server import EtcdCluster, EtcdServer
from rdzv.etcd_store import EtcdStore, StoreTimeoutError

__version__ = "0.1.0"

__all__ = [
    "EtcdCluster",
    "EtcdRendezvousHandler",
    "EtcdServer",
    "EtcdStore",
    "ForkedProcessError",
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
    "StoreTimeoutError",
    "create_rdzv_handler",
]
