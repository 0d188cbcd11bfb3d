"""EtcdStore against a real etcd: c10d semantics, blocking, atomicity, isolation, leases."""

from __future__ import annotations

import datetime
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from rdzv.client import EtcdClient, EtcdConfig, parse_endpoints
from rdzv.etcd_store import EtcdStore, StoreTimeoutError


class ObservedClient(EtcdClient):
    """A real client that lets a test act at the moment a store starts to watch.

    Attributes:
        watching: set once a watch has been created.
        watch_calls: how many watches were created.
        before_watch: if set, called after the store's read and before its watch.
        break_first_watch: if True, the first watch's callback gets an exception
            right after the watch is created, as when etcd's stream breaks.
    """

    def __init__(self, config: EtcdConfig) -> None:
        super().__init__(config)
        self.reset()

    def reset(self) -> None:
        """Forget what earlier tests observed and asked for."""
        self.watching = threading.Event()
        self.watch_calls = 0
        self.before_watch: Callable[[], None] | None = None
        self.break_first_watch = False

    def watch(
        self,
        key: bytes,
        callback: Callable[[Any], None],
        start_revision: int,
        prefix: bool = False,
        no_put: bool = False,
    ) -> int:
        self.watch_calls += 1
        if self.before_watch is not None:
            self.before_watch()
        watch_id = super().watch(key, callback, start_revision, prefix=prefix, no_put=no_put)
        if self.break_first_watch and self.watch_calls == 1:
            callback(ConnectionResetError("injected: watch stream broke"))
        self.watching.set()
        return watch_id


def _config(endpoint: str) -> EtcdConfig:
    return EtcdConfig(endpoints=tuple(parse_endpoints(endpoint)))


# One connection of each kind per module: tests stay fast, and each connection's
# watch thread is set up and torn down once.
@pytest.fixture(scope="module")
def client(etcd_endpoint: str) -> Iterator[EtcdClient]:
    c = EtcdClient(_config(etcd_endpoint))
    yield c
    c.close()


@pytest.fixture(scope="module")
def _observed_connection(etcd_endpoint: str) -> Iterator[ObservedClient]:
    c = ObservedClient(_config(etcd_endpoint))
    yield c
    c.close()


@pytest.fixture
def observed(_observed_connection: ObservedClient) -> ObservedClient:
    _observed_connection.reset()
    return _observed_connection


@pytest.fixture
def base(run_id: str, request: pytest.FixtureRequest) -> str:
    """A namespace of this test's own: ``/rdzv-test/<run>/<test>/``."""
    return f"/rdzv-test/{run_id}/{request.node.name}/"


@pytest.fixture
def store(client: EtcdClient, base: str) -> EtcdStore:
    return EtcdStore(client, base + "kv/", timeout=10)


def _in_thread(fn: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


# ------------------------------------------------------------------ set / get
def test_set_get_bytes_and_str(store: EtcdStore) -> None:
    store.set("bytes", b"\x00\xffraw")
    store.set("text", "héllo")
    store.set(b"bytes-key", bytearray(b"ba"))
    assert store.get("bytes") == b"\x00\xffraw"
    assert store.get(b"text") == "héllo".encode()
    assert store.get("bytes-key") == b"ba"
    store.set("text", b"")
    assert store.get("text") == b""


def test_get_blocks_until_another_thread_sets(
    observed: ObservedClient, client: EtcdClient, base: str
) -> None:
    reader = EtcdStore(observed, base + "kv/", timeout=10)
    writer = EtcdStore(client, base + "kv/")

    def set_once_reader_waits() -> None:
        assert observed.watching.wait(10)
        writer.set("late", b"value")

    setter = _in_thread(set_once_reader_waits)
    assert reader.get("late") == b"value"
    setter.join(10)
    assert observed.watch_calls == 1


def test_put_between_read_and_watch_is_not_missed(
    observed: ObservedClient, client: EtcdClient, base: str
) -> None:
    # The put lands after the store's read and before its watch exists: the watch
    # starts at the read's revision + 1, so it still delivers the put.
    writer = EtcdStore(client, base + "kv/")
    observed.before_watch = lambda: writer.set("racy", b"won")
    reader = EtcdStore(observed, base + "kv/", timeout=10)
    assert reader.get("racy") == b"won"
    assert observed.watch_calls == 1


def test_broken_watch_is_read_again_and_rewatched(
    observed: ObservedClient, client: EtcdClient, base: str
) -> None:
    observed.break_first_watch = True
    reader = EtcdStore(observed, base + "kv/", timeout=10)
    writer = EtcdStore(client, base + "kv/")

    def set_after_rewatch() -> None:
        while observed.watch_calls < 2:
            assert observed.watching.wait(10)
            observed.watching.clear()
        writer.set("k", b"v")

    setter = _in_thread(set_after_rewatch)
    assert reader.get("k") == b"v"
    setter.join(10)
    assert observed.watch_calls == 2


def test_get_timeout_names_key_and_takes_the_timeout(client: EtcdClient, base: str) -> None:
    store = EtcdStore(client, base + "kv/", timeout=datetime.timedelta(milliseconds=500))
    started = time.monotonic()
    with pytest.raises(StoreTimeoutError) as info:
        store.get("never/set")
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 0.9
    assert isinstance(info.value, TimeoutError)
    assert "'never/set'" in str(info.value)
    assert "0.5 s" in str(info.value)


# ------------------------------------------------------------------------ add
def test_add_counts_from_zero_and_stores_decimal(store: EtcdStore) -> None:
    assert store.add("n", 5) == 5
    assert store.add("n", -7) == -2
    assert store.add("n", 0) == -2
    assert store.get("n") == b"-2"
    store.set("m", "40")
    assert store.add("m", 2) == 42
    store.set("text", b"not a number")
    with pytest.raises(ValueError, match=r"'text'.*decimal integer"):
        store.add("text", 1)
    with pytest.raises(TypeError):
        store.add("n", 1.5)  # type: ignore[arg-type]


def test_add_from_64_threads_totals_exactly(client: EtcdClient, base: str) -> None:
    store = EtcdStore(client, base + "kv/", timeout=20)
    threads, per_thread = 64, 5
    start = threading.Barrier(threads)

    def adder() -> list[int]:
        start.wait()
        return [store.add("counter", 1) for _ in range(per_thread)]

    with ThreadPoolExecutor(threads) as pool:
        results = [r for rs in pool.map(lambda _: adder(), range(threads)) for r in rs]
    total = threads * per_thread
    assert store.get("counter") == str(total).encode()
    # Every add saw a distinct intermediate sum: none was lost or applied twice.
    assert sorted(results) == list(range(1, total + 1))


_ADDER_PROCESS = """
import sys
from rdzv.client import EtcdClient, EtcdConfig, parse_endpoints
from rdzv.etcd_store import EtcdStore

endpoint, prefix, index, times = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = EtcdClient(EtcdConfig(endpoints=tuple(parse_endpoints(endpoint))))
store = EtcdStore(client, prefix, timeout=20)
store.set("ready/" + index, b"1")
store.get("go")
for _ in range(times):
    store.add("counter", 3)
client.close()
"""


def test_add_from_8_processes_totals_exactly(
    store: EtcdStore, etcd_endpoint: str
) -> None:
    processes, times = 8, 10
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _ADDER_PROCESS, etcd_endpoint, store.prefix.decode(),
             str(i), str(times)]
        )
        for i in range(processes)
    ]
    try:
        store.wait([f"ready/{i}" for i in range(processes)], timeout=20)
        store.set("go", b"")
        assert [child.wait(30) for child in children] == [0] * processes
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert store.get("counter") == str(3 * processes * times).encode()


# ---------------------------------------------------------------- compare_set
def test_compare_set_follows_c10d(store: EtcdStore) -> None:
    # Missing key, empty expected: created.
    assert store.compare_set("a", b"", b"first") == b"first"
    assert store.get("a") == b"first"
    # Match: replaced.
    assert store.compare_set("a", "first", "second") == b"second"
    assert store.get("a") == b"second"
    # Mismatch: unchanged, the current value comes back.
    assert store.compare_set("a", b"first", b"third") == b"second"
    assert store.get("a") == b"second"
    # Existing key, empty expected, non-empty value: a mismatch.
    assert store.compare_set("a", b"", b"x") == b"second"
    # Missing key, non-empty expected: stays missing, expected comes back.
    assert store.compare_set("b", b"hoped", b"x") == b"hoped"
    assert not store.check(["b"])
    # Existing empty value matches an empty expected.
    store.set("c", b"")
    assert store.compare_set("c", b"", b"filled") == b"filled"


def test_compare_set_has_one_winner_under_concurrency(client: EtcdClient, base: str) -> None:
    store = EtcdStore(client, base + "kv/", timeout=20)
    contenders = 16
    start = threading.Barrier(contenders)

    def contend(i: int) -> bytes:
        start.wait()
        return store.compare_set("leader", b"", f"node-{i}")

    with ThreadPoolExecutor(contenders) as pool:
        results = list(pool.map(contend, range(contenders)))
    winner = store.get("leader")
    assert set(results) == {winner}


# -------------------------------------------------------------- wait / check
def test_wait_blocks_until_all_keys_exist(
    observed: ObservedClient, client: EtcdClient, base: str
) -> None:
    waiter = EtcdStore(observed, base + "kv/", timeout=10)
    writer = EtcdStore(client, base + "kv/")
    writer.set("x/1", b"")

    def set_the_rest() -> None:
        assert observed.watching.wait(10)
        writer.set("x/2", b"")
        writer.set("y", b"")

    setter = _in_thread(set_the_rest)
    waiter.wait(["x/1", "x/2", "y"])
    setter.join(10)
    assert waiter.check(["x/1", "x/2", "y"])
    assert observed.watch_calls == 1


def test_wait_timeout_names_only_the_missing_keys(store: EtcdStore) -> None:
    store.set("here", b"1")
    started = time.monotonic()
    with pytest.raises(StoreTimeoutError) as info:
        store.wait(["here", "gone-1", "gone-2"], timeout=datetime.timedelta(seconds=0.3))
    assert 0.3 <= time.monotonic() - started < 0.7
    message = str(info.value)
    assert "'gone-1'" in message and "'gone-2'" in message
    assert "'here'" not in message


def test_check(store: EtcdStore) -> None:
    assert store.check([])
    assert not store.check(["a"])
    store.set("a", b"")
    assert store.check(["a"])
    assert not store.check(["a", "b"])
    store.set("b", b"")
    assert store.check(["a", "b"])
    with pytest.raises(TypeError, match="list of keys"):
        store.check("a")


# --------------------------------------------------------- delete / num_keys
def test_delete_key(store: EtcdStore) -> None:
    store.set("doomed", b"1")
    assert store.delete_key("doomed") is True
    assert not store.check(["doomed"])
    assert store.delete_key("doomed") is False


def test_num_keys(store: EtcdStore) -> None:
    assert store.num_keys() == 0
    store.multi_set([f"k{i}" for i in range(5)], [b""] * 5)
    store.add("counter", 1)
    assert store.num_keys() == 6
    store.delete_key("k0")
    assert store.num_keys() == 5


# ------------------------------------------------------ multi_get / multi_set
def test_multi_set_and_multi_get(store: EtcdStore) -> None:
    store.multi_set(["a", b"b", "c"], [b"1", "2", b"3"])
    assert store.multi_get(["c", "a", "b", "a"]) == [b"3", b"1", b"2", b"1"]
    store.multi_set(["d", "d"], [b"old", b"new"])
    assert store.get("d") == b"new"
    store.multi_set([], [])
    assert store.multi_get([]) == []
    with pytest.raises(ValueError, match="2 keys and 1 values"):
        store.multi_set(["e", "f"], [b"1"])
    with pytest.raises(ValueError, match="non-empty"):
        store.multi_set(["g", ""], [b"1", b"2"])
    assert not store.check(["e"]) and not store.check(["g"])


def test_multi_get_blocks_until_every_key_exists(
    observed: ObservedClient, client: EtcdClient, base: str
) -> None:
    reader = EtcdStore(observed, base + "kv/", timeout=10)
    writer = EtcdStore(client, base + "kv/")
    writer.set("p", b"1")

    def set_the_rest() -> None:
        assert observed.watching.wait(10)
        writer.multi_set(["q", "r"], [b"2", b"3"])

    setter = _in_thread(set_the_rest)
    assert reader.multi_get(["p", "q", "r"]) == [b"1", b"2", b"3"]
    setter.join(10)


def test_multi_get_timeout_names_the_missing_keys(client: EtcdClient, base: str) -> None:
    store = EtcdStore(client, base + "kv/", timeout=0.2)
    store.set("p", b"1")
    with pytest.raises(StoreTimeoutError, match="'q'"):
        store.multi_get(["p", "q"])


# ------------------------------------------------------------------ isolation
def test_stores_with_different_prefixes_do_not_see_each_other(
    client: EtcdClient, base: str
) -> None:
    first = EtcdStore(client, base + "one/kv/", timeout=0.2)
    second = EtcdStore(client, base + "two/kv/", timeout=0.2)
    first.set("shared", b"one")
    second.set("shared", b"two")
    first.add("n", 1)
    assert first.get("shared") == b"one"
    assert second.get("shared") == b"two"
    assert (first.num_keys(), second.num_keys()) == (2, 1)
    assert not second.check(["n"])
    with pytest.raises(StoreTimeoutError):
        second.get("n")


def test_prefix_without_trailing_slash_is_still_isolated(
    client: EtcdClient, base: str
) -> None:
    short = EtcdStore(client, base + "kv")
    longer = EtcdStore(client, base + "kv2")
    assert short.prefix == (base + "kv/").encode()
    short.set("2x", b"short")
    longer.set("x", b"longer")
    assert short.num_keys() == 1 and longer.num_keys() == 1
    assert not longer.check(["/x"]) and not short.check(["2x/"])


@pytest.mark.parametrize(
    "key",
    ["a/b/c", "/leading", "../escape", "../../../../etc", "a/../../b", "..", "ключ/ü/☃",
     b"\xff\x00binary"],
    ids=["slashes", "leading-slash", "dotdot", "deep-dotdot", "inner-dotdot", "bare-dotdot",
         "unicode", "binary"],
)
def test_keys_stay_under_the_prefix(client: EtcdClient, base: str, key: str | bytes) -> None:
    store = EtcdStore(client, base + "inner/kv/")
    neighbour = EtcdStore(client, base + "escape/")
    store.set(key, b"v")
    raw_keys = [k for k, _, _ in client.range(base.encode())]
    expected = store.prefix + (key.encode() if isinstance(key, str) else key)
    assert raw_keys == [expected]
    assert store.get(key) == b"v"
    assert neighbour.num_keys() == 0


def test_rejects_bad_arguments(client: EtcdClient, base: str, store: EtcdStore) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        store.set("", b"v")
    with pytest.raises(ValueError, match="non-empty"):
        store.get(b"")
    with pytest.raises(ValueError, match="prefix must be non-empty"):
        EtcdStore(client, "")
    with pytest.raises(TypeError):
        store.set("k", 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of keys"):
        store.wait("k")
    with pytest.raises(ValueError, match="positive"):
        EtcdStore(client, base, timeout=0)
    with pytest.raises(ValueError, match="positive"):
        store.wait(["k"], timeout=-1.0)
    with pytest.raises(ValueError, match="lease"):
        EtcdStore(client, base, lease=-1)


def test_timeout_property_and_set_timeout(store: EtcdStore) -> None:
    assert store.timeout == datetime.timedelta(seconds=10)
    store.set_timeout(datetime.timedelta(milliseconds=1500))
    assert store.timeout == datetime.timedelta(seconds=1.5)
    store.set_timeout(0.25)
    assert store.timeout == datetime.timedelta(seconds=0.25)
    started = time.monotonic()
    with pytest.raises(StoreTimeoutError):
        store.get("missing")
    assert 0.25 <= time.monotonic() - started < 0.65


# ---------------------------------------------------------------------- lease
def test_keys_written_under_a_lease_vanish_when_it_is_revoked(
    client: EtcdClient, base: str
) -> None:
    lease = client.lease_grant(60)
    leased = EtcdStore(client, base + "kv/", lease=lease)
    plain = EtcdStore(client, base + "plain/")
    leased.set("set", b"1")
    leased.add("add", 1)
    leased.compare_set("cas", b"", b"1")
    leased.multi_set(["m1", "m2"], [b"1", b"2"])
    plain.set("survivor", b"1")
    assert leased.num_keys() == 5
    client.lease_revoke(lease)
    assert leased.num_keys() == 0
    assert not leased.check(["set"])
    assert plain.get("survivor") == b"1"
