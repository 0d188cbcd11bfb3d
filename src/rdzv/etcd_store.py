"""The key-value store a completed round hands to its nodes, on etcd v3.

``EtcdStore`` has the semantics of torch's c10d ``Store`` (``set``, ``get``,
``add``, ``compare_set``, ``wait``, ``check``, ``delete_key``, ``num_keys``,
``multi_get``, ``multi_set``, ``set_timeout``, ``timeout``), so the code that
torch runs on a rendezvous store runs on it unchanged.

Theory of operation:

* Every key lives below one prefix (for a round, ``<run>/rounds/<r>/kv/``). A
  user key is appended to it as bytes; etcd keys are flat, so ``/`` or ``..`` in
  a key name is just a byte and can never reach outside the prefix.
* Read-modify-write operations (``add``, ``compare_set``) are one transaction
  per attempt that compares the key's mod_revision with the one the value was
  read at. The failure branch reads the key again, so a lost race costs one
  round trip; retries back off with jitter from half a millisecond.
* Blocking reads never poll. They read the keys in one transaction; if some are
  missing they watch them from the read's revision + 1, so a put that lands
  between the read and the watch is still delivered, and wait on an event
  until the deadline. A watch that breaks (etcd restart, compaction) wakes the
  waiter, which reads again and watches again.
"""

from __future__ import annotations

import datetime
import logging
import operator
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from rdzv.client import EtcdClient
from rdzv.config import parse_seconds
from rdzv.retry import contend

__all__ = ["EtcdStore", "StoreTimeoutError"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(seconds=300)

KeyType = str | bytes
ValueType = str | bytes | bytearray | memoryview
TimeoutType = datetime.timedelta | float

_FIRST_BACKOFF = 0.0005
_MAX_BACKOFF = 0.02


class StoreTimeoutError(TimeoutError):
    """Keys of an ``EtcdStore`` did not appear within the timeout.

    The counterpart of c10d's ``DistStoreError`` on a timed-out ``get``/``wait``;
    the message names the missing keys and the timeout.
    """


def _to_bytes(value: ValueType, what: str) -> bytes:
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"The {what} {value!r} is not valid text (it has a lone surrogate)."
            ) from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"The {what} must be str or bytes, got {type(value).__name__}: {value!r}.")


def _key_list(keys: Sequence[KeyType], what: str) -> list[KeyType]:
    if isinstance(keys, (str, bytes, bytearray, memoryview)):
        raise TypeError(f"'{what}' takes a list of keys, got the single key {keys!r}.")
    return list(keys)


class EtcdStore:
    """A c10d-style key-value store kept in etcd under one prefix.

    Args:
        client: the etcd connection; the store borrows it and never closes it.
        prefix: every key of the store lives below it (``str`` is encoded UTF-8).
            A ``/`` is appended when it does not end with one, so that the
            stores of ``/a/kv`` and ``/a/kv2`` cannot see each other's keys.
        timeout: how long ``get``, ``multi_get`` and ``wait`` block (and how long
            ``add``/``compare_set`` keep retrying under contention) before they
            raise ``StoreTimeoutError``; a ``timedelta`` or seconds.
        lease: etcd lease id attached to every key the store writes, so that the
            keys vanish with the lease; 0 for none.

    Raises:
        ValueError: the prefix is empty, the timeout is not positive, or the lease
            is negative.
    """

    def __init__(
        self,
        client: EtcdClient,
        prefix: KeyType,
        timeout: TimeoutType = DEFAULT_TIMEOUT,
        lease: int = 0,
    ) -> None:
        raw = _to_bytes(prefix, "store prefix")
        if not raw:
            raise ValueError(
                "The store prefix must be non-empty (e.g. '/rdzv/<run>/rounds/<r>/kv/'); "
                "an empty prefix would expose every key in etcd."
            )
        lease = operator.index(lease)
        if lease < 0:
            raise ValueError(f"The lease id must be 0 (no lease) or a lease id, got {lease}.")
        self._client = client
        self._prefix = raw if raw.endswith(b"/") else raw + b"/"
        self._lease = lease
        self._timeout = parse_seconds(timeout, "The store timeout")

    # ------------------------------------------------------------- settings
    @property
    def prefix(self) -> bytes:
        """The etcd prefix every key of this store lives below (ends with ``/``)."""
        return self._prefix

    @property
    def timeout(self) -> datetime.timedelta:
        """How long blocking operations wait before ``StoreTimeoutError``."""
        return datetime.timedelta(seconds=self._timeout)

    def set_timeout(self, timeout: TimeoutType) -> None:
        """Set the timeout of ``get``, ``multi_get``, ``wait``, ``add``, ``compare_set``.

        Args:
            timeout: a positive ``timedelta`` or number of seconds.

        Raises:
            ValueError: the timeout is not positive and finite.
        """
        self._timeout = parse_seconds(timeout, "The store timeout")

    # ---------------------------------------------------------------- keys
    def _key(self, key: KeyType) -> bytes:
        raw = _to_bytes(key, "store key")
        if not raw:
            raise ValueError("Store keys must be non-empty; got an empty key.")
        return self._prefix + raw

    def _name(self, full_key: bytes) -> str:
        """The user's key for messages."""
        return repr(full_key[len(self._prefix):].decode("utf-8", "backslashreplace"))

    def _timeout_error(self, full_keys: Sequence[bytes], timeout: float) -> StoreTimeoutError:
        names = ", ".join(self._name(k) for k in full_keys)
        noun, pronoun = ("Key", "it") if len(full_keys) == 1 else ("Keys", "them")
        return StoreTimeoutError(
            f"{noun} {names} of the store at {self._name_prefix()} did not appear within "
            f"{timeout:g} s. Check that the node that sets {pronoun} is alive, or raise the "
            "timeout with set_timeout()."
        )

    def _name_prefix(self) -> str:
        return repr(self._prefix.decode("utf-8", "backslashreplace"))

    # ------------------------------------------------------------ plain ops
    def set(self, key: KeyType, value: ValueType) -> None:
        """Store ``value`` at ``key``, replacing any previous value.

        Args:
            key: the key (``str`` is encoded UTF-8).
            value: ``bytes``, or ``str`` (encoded UTF-8).

        Raises:
            ValueError: the key is empty.
            TypeError: the key or value is neither ``str`` nor ``bytes``.
            RendezvousConnectionError: etcd cannot be reached.
        """
        self._client.put(self._key(key), _to_bytes(value, "store value"), self._lease)

    def get(self, key: KeyType) -> bytes:
        """Return the value of ``key``, waiting until it is set.

        Args:
            key: the key to read.

        Returns:
            The stored bytes.

        Raises:
            StoreTimeoutError: the key was not set within the store's timeout.
            RendezvousConnectionError: etcd cannot be reached.
        """
        return self._wait_for([self._key(key)], self._timeout)[0]

    def multi_get(self, keys: Sequence[KeyType]) -> list[bytes]:
        """Return the values of ``keys``, waiting until every one is set.

        Args:
            keys: the keys to read; the values are read in one transaction.

        Returns:
            The values, in the order of ``keys``.

        Raises:
            StoreTimeoutError: some key was not set within the store's timeout.
            RendezvousConnectionError: etcd cannot be reached.
        """
        full = [self._key(k) for k in _key_list(keys, "multi_get")]
        return self._wait_for(full, self._timeout)

    def multi_set(self, keys: Sequence[KeyType], values: Sequence[ValueType]) -> None:
        """Store ``values[i]`` at ``keys[i]`` for every ``i``, in one transaction.

        Either every key is written or none is. If a key repeats, its last value wins.

        Args:
            keys: the keys to write.
            values: their values, as many as ``keys``.

        Raises:
            ValueError: ``keys`` and ``values`` differ in length, or a key is empty.
            RendezvousConnectionError: etcd cannot be reached.
        """
        full = [self._key(k) for k in _key_list(keys, "multi_set")]
        raw = [_to_bytes(v, "store value") for v in _key_list(values, "multi_set")]
        if len(full) != len(raw):
            raise ValueError(
                f"multi_set got {len(full)} keys and {len(raw)} values; give one value per key."
            )
        # etcd rejects a transaction that puts one key twice.
        latest = dict(zip(full, raw, strict=True))
        if latest:
            self._client.txn([], [("put", k, v, self._lease) for k, v in latest.items()])

    def check(self, keys: Sequence[KeyType]) -> bool:
        """Return whether every key in ``keys`` is set, without waiting.

        Args:
            keys: the keys to look for.

        Returns:
            True if all of them exist (also for an empty list).

        Raises:
            RendezvousConnectionError: etcd cannot be reached.
        """
        full = [self._key(k) for k in _key_list(keys, "check")]
        if not full:
            return True
        _, _, results = self._client.txn([], [("get", k) for k in full])
        return all(r is not None for r in results)

    def wait(self, keys: Sequence[KeyType], timeout: TimeoutType | None = None) -> None:
        """Block until every key in ``keys`` is set.

        Args:
            keys: the keys to wait for.
            timeout: how long to wait; the store's timeout if None.

        Raises:
            StoreTimeoutError: some key was not set in time; the message names the
                keys still missing.
            RendezvousConnectionError: etcd cannot be reached.
        """
        seconds = self._timeout if timeout is None else parse_seconds(timeout, "The wait timeout")
        full = [self._key(k) for k in _key_list(keys, "wait")]
        self._wait_for(full, seconds)

    def delete_key(self, key: KeyType) -> bool:
        """Delete ``key``.

        Args:
            key: the key to delete.

        Returns:
            True if the key existed.

        Raises:
            RendezvousConnectionError: etcd cannot be reached.
        """
        return self._client.delete(self._key(key)) > 0

    def num_keys(self) -> int:
        """Return how many keys the store holds.

        Raises:
            RendezvousConnectionError: etcd cannot be reached.
        """
        return self._client.count(self._prefix)

    # ---------------------------------------------------- read-modify-write
    def add(self, key: KeyType, amount: int) -> int:
        """Atomically add ``amount`` to the integer at ``key`` and return the sum.

        A missing key counts as 0. The value is stored as ASCII decimal, as c10d
        stores it, so ``get`` on a counter returns e.g. ``b"42"``.

        Args:
            key: the counter's key.
            amount: the integer to add (may be negative).

        Returns:
            The value after the addition.

        Raises:
            ValueError: the key holds something that is not a decimal integer.
            StoreTimeoutError: other writers kept winning the race on ``key`` for
                longer than the store's timeout.
            RendezvousConnectionError: etcd cannot be reached.
        """
        delta = operator.index(amount)
        full = self._key(key)

        def compute(current: bytes | None) -> tuple[bytes, int]:
            total = delta
            if current is not None:
                try:
                    total += int(current.decode("ascii"))
                except (UnicodeDecodeError, ValueError):
                    raise ValueError(
                        f"add() needs key {self._name(full)} to hold a decimal integer, "
                        f"but it holds {current[:64]!r}. Use a separate key for counters."
                    ) from None
            return str(total).encode("ascii"), total

        return self._read_modify_write(full, compute)

    def compare_set(
        self, key: KeyType, expected_value: ValueType, desired_value: ValueType
    ) -> bytes:
        """Set ``key`` to ``desired_value`` if it currently holds ``expected_value``.

        c10d semantics: a missing key matches an empty ``expected_value`` (and is
        then created); a missing key with a non-empty ``expected_value`` is left
        missing and ``expected_value`` is returned.

        Args:
            key: the key to update.
            expected_value: the value the key must hold for the update.
            desired_value: the value to store.

        Returns:
            ``desired_value`` if it was stored; otherwise the key's current value
            (or ``expected_value`` if the key is missing).

        Raises:
            StoreTimeoutError: other writers kept winning the race on ``key`` for
                longer than the store's timeout.
            RendezvousConnectionError: etcd cannot be reached.
        """
        expected = _to_bytes(expected_value, "expected value")
        desired = _to_bytes(desired_value, "desired value")

        def compute(current: bytes | None) -> tuple[bytes | None, bytes]:
            if current is None:
                return (desired, desired) if not expected else (None, expected)
            if current == expected:
                return desired, desired
            return None, current

        return self._read_modify_write(self._key(key), compute)

    def _read_modify_write(
        self, key: bytes, compute: Callable[[bytes | None], tuple[bytes | None, Any]]
    ) -> Any:
        """Apply ``compute`` to the value of ``key`` atomically.

        ``compute(current)`` returns ``(new_value, result)``; ``new_value`` None
        means "write nothing". The first attempt assumes the key is absent, which
        saves a read when it is; a failed attempt's transaction reads the key, so
        every later attempt starts from a fresh value. Races lost to other
        writers are retried by rdzv's one compare-and-swap loop
        (``rdzv.retry.contend``) until the store's timeout.
        """
        current: bytes | None = None
        mod_revision = 0
        known = False  # whether ``current`` was read from etcd or only assumed
        attempts = 0

        def attempt() -> tuple[bool, Any]:
            nonlocal current, mod_revision, known, attempts
            while True:
                new_value, result = compute(current)
                if new_value is None and known:
                    return True, result
                attempts += 1
                if new_value is None:
                    # Nothing to write if the key is absent, but it is not known to be.
                    _, _, (found,) = self._client.txn([], [("get", key)])
                else:
                    put = ("put", key, new_value, self._lease)
                    won, _, results = self._client.txn(
                        [("mod", key, mod_revision)], [put], [("get", key)]
                    )
                    if won:
                        return True, result
                    (found,) = results
                lost_race = known
                current, mod_revision = (found[0], found[1]) if found is not None else (None, 0)
                known = True
                if lost_race:
                    logger.debug("Lost the race on %r (attempt %d).", key, attempts)
                    return False, None

        settled, result = contend(
            attempt, time.monotonic() + self._timeout, _FIRST_BACKOFF, _MAX_BACKOFF
        )
        if not settled:
            raise StoreTimeoutError(
                f"Gave up updating key {self._name(key)} of the store at "
                f"{self._name_prefix()} after {attempts} attempts in {self._timeout:g} s: "
                "other writers changed it every time. Raise the timeout with "
                "set_timeout() or spread the updates over several keys."
            )
        return result

    # -------------------------------------------------------------- waiting
    def _wait_for(self, keys: list[bytes], timeout: float) -> list[bytes]:
        """Return the values of ``keys`` once all exist; raise at the deadline."""
        deadline = time.monotonic() + timeout
        if not keys:
            return []
        while True:
            _, revision, results = self._client.txn([], [("get", k) for k in keys])
            missing = {k for k, found in zip(keys, results, strict=True) if found is None}
            if not missing:
                return [found[0] for found in results]
            self._watch_until_put(missing, revision + 1, deadline, timeout)

    def _watch_until_put(
        self, missing: set[bytes], start_revision: int, deadline: float, timeout: float
    ) -> None:
        """Block until every key of ``missing`` was put after ``start_revision - 1``.

        Returns early, without error, if the watch breaks: the caller reads again.

        Raises:
            StoreTimeoutError: the deadline passed first.
        """
        lock = threading.Lock()
        pending = set(missing)
        woken = threading.Event()

        def on_events(events: Any) -> None:
            # Runs on etcd3's watch thread: no etcd calls here, only bookkeeping.
            if isinstance(events, Exception):
                logger.debug("Watch on %r broke (%r); reading again.", sorted(missing), events)
                woken.set()
                return
            with lock:
                for is_put, key, _value, _revision in events:
                    if key not in missing:
                        continue
                    if is_put:
                        pending.discard(key)
                    else:
                        pending.add(key)
                if not pending:
                    woken.set()

        if len(missing) == 1:
            (watch_key,) = missing
            watch_id = self._client.watch(watch_key, on_events, start_revision)
        else:
            # One range watch instead of one watch per key; every key starts with
            # the store's prefix, so the common prefix never reaches outside it.
            common = os.path.commonprefix(sorted(missing))  # noqa: RUF071 (bytes, not paths)
            watch_id = self._client.watch(common, on_events, start_revision, prefix=True)
        try:
            if not woken.wait(max(deadline - time.monotonic(), 0.0)):
                with lock:
                    still_missing = sorted(pending)
                raise self._timeout_error(still_missing, timeout)
        finally:
            self._client.cancel_watch(watch_id)

    def __repr__(self) -> str:
        return f"EtcdStore(prefix={self._name_prefix()}, timeout={self._timeout:g}s)"
