"""The key layout of a run in etcd: the one place that spells key names.

Everything of run ``R`` under prefix ``P`` lives below ``P/R/``::

    P/R/state                          the state record (run machine, CAS only)
    P/R/rounds/<r>/members/<node>      a node's join of round r      (its lease)
    P/R/rounds/<r>/confirmed/<node>    a world member is alive        (its lease)
    P/R/rounds/<r>/waiting/<node>      a late or surplus node         (its lease)
    P/R/rounds/<r>/world               the world's header, written by the freeze
    P/R/rounds/<r>/ranks/<cutoff>/<k>  rank shard k of the world frozen at <cutoff>
    P/R/rounds/<r>/last_call           when the last call ends (wall clock, s) (its lease)
    P/R/rounds/<r>/kv/<key>            the round's store (``EtcdStore``)

The keys that outlive a round hang on two leases of the run, whose ids are
derived from the run's key, so that every node knows them without a read:

    data lease    rounds' ``world`` and ``kv/`` keys, and the state record once
                  closed; its TTL is ``closed_run_grace``
    state lease   the state record while the run is open; its TTL is
                  ``run_idle_timeout``

Every live node keeps both alive. When the last node of a run is gone, the data
goes ``closed_run_grace`` seconds later and the state record (of a run that was
not closed) ``run_idle_timeout`` seconds later.

Round numbers are zero-padded so that lexical order is numeric order, which
is what lets one range delete drop every round below a given one.
"""

from __future__ import annotations

import hashlib

from rdzv.txn import prefix_end

_ROUND_DIGITS = 12
#: Round prefixes a ``RunKeys`` keeps formatted (the core asks for the current
#: round's keys on every step); past that many it starts over.
_ROUNDS_CACHED = 64
DEFAULT_PREFIX = "/rdzv"


def _check_segment(name: str, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"The {what} must be a non-empty string, got {name!r}.")
    if "/" in name or name in (".", ".."):
        raise ValueError(
            f"The {what} {name!r} must not contain '/' or be '.' or '..'; "
            "it names one level of the run's keys in etcd."
        )
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(
            f"The {what} {name!r} is not valid text (it has a lone surrogate)."
        ) from None
    if size > 1024:
        raise ValueError(f"The {what} is {size} bytes; at most 1024 are allowed.")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ValueError(f"The {what} {name!r} must not contain control characters.")
    return name


def _lease_id(name: bytes) -> int:
    """A lease id derived from ``name``: positive, 62 bits, never 0 (etcd's "no lease")."""
    digest = hashlib.blake2b(name, digest_size=8, person=b"rdzv-lease").digest()
    return (int.from_bytes(digest, "big") >> 2) or 1


def normalize_prefix(prefix: str) -> str:
    """Return ``prefix`` as ``/a/b`` (leading slash, no trailing slash).

    Raises:
        ValueError: the prefix is not a string or has empty, ``.`` or ``..`` parts.
    """
    if not isinstance(prefix, str):
        raise ValueError(f"etcd_prefix must be a string like '/rdzv', got {prefix!r}.")
    parts = [p for p in prefix.split("/") if p]
    for part in parts:
        _check_segment(part, "etcd_prefix component")
    return "/" + "/".join(parts) if parts else ""


class RunKeys:
    """Key names of one run.

    Args:
        prefix: the etcd prefix shared by all runs (``etcd_prefix``).
        run_id: the run's id; one path segment (no ``/``).
    """

    def __init__(self, prefix: str, run_id: str) -> None:
        self.run_id = _check_segment(run_id, "run id")
        self.run = f"{normalize_prefix(prefix)}/{run_id}/".encode()
        self.state = self.run + b"state"
        #: lease of the rounds' data and of the closed state record
        self.data_lease = _lease_id(self.run + b"\0data")
        #: lease of the state record of an open run
        self.state_lease = _lease_id(self.run + b"\0state")
        self._rounds: dict[int, bytes] = {}

    def round(self, r: int) -> bytes:
        """Prefix of every key of round ``r``."""
        prefix = self._rounds.get(r)
        if prefix is None:
            if len(self._rounds) >= _ROUNDS_CACHED:
                self._rounds.clear()
            prefix = self._rounds[r] = self.run + b"rounds/%0*d/" % (_ROUND_DIGITS, r)
        return prefix

    def rounds_between(self, first: int, end: int) -> tuple[bytes, bytes]:
        """Key range ``[start, end)`` that holds every key of the rounds
        ``first <= r < end`` (for one range delete)."""
        return self.round(first), self.round(end)

    def members(self, r: int) -> bytes:
        """Prefix of the member keys of round ``r``."""
        return self.round(r) + b"members/"

    def confirmed(self, r: int) -> bytes:
        """Prefix of the confirmation keys of round ``r``."""
        return self.round(r) + b"confirmed/"

    def waiting(self, r: int) -> bytes:
        """Prefix of the keys of nodes waiting for the round after ``r``."""
        return self.round(r) + b"waiting/"

    def world(self, r: int) -> bytes:
        """Key of round ``r``'s world header (size, cutoff, rank 0's address)."""
        return self.round(r) + b"world"

    def counter(self, r: int) -> bytes:
        """Key held by the node that counts round ``r``'s members (its node id)."""
        return self.round(r) + b"counter"

    def last_call(self, r: int) -> bytes:
        """Key of the wall-clock time round ``r``'s last call ends (``rdzv status``)."""
        return self.round(r) + b"last_call"

    def ranks(self, r: int, cutoff: int | None = None) -> bytes:
        """Prefix of round ``r``'s rank shards written for a freeze at revision
        ``cutoff`` (without one: those of every freeze attempt)."""
        prefix = self.round(r) + b"ranks/"
        return prefix if cutoff is None else prefix + b"%d/" % cutoff

    def ranks_between(self, r: int, cutoff: int) -> tuple[bytes, bytes]:
        """Key range ``[start, end)`` of round ``r``'s rank shards of ``cutoff``
        (for one range delete)."""
        start = self.ranks(r, cutoff)
        return start, prefix_end(start)

    def rank_shard(self, r: int, cutoff: int, shard: int) -> bytes:
        """Key of rank shard ``shard`` of round ``r``'s world frozen at ``cutoff``."""
        return self.ranks(r, cutoff) + b"%d" % shard

    def kv(self, r: int) -> bytes:
        """Prefix of round ``r``'s store."""
        return self.round(r) + b"kv/"
