"""What the ``rdzv`` commands share: exit codes, argument types, options, output."""

from __future__ import annotations

import argparse
import contextlib
import enum
import sys
import textwrap
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, NoReturn

from rdzv.api import (
    RendezvousClosedError,
    RendezvousConnectionError,
    RendezvousParameters,
    RendezvousStateError,
    RendezvousTimeoutError,
)
from rdzv.client import EtcdClient
from rdzv.config import (
    MAX_NODES,
    RENDEZVOUS_OPTIONS,
    EtcdConfig,
    check_node_bounds,
    environment_credentials,
    parse_endpoints,
    parse_seconds,
)
from rdzv.etcd_store import StoreTimeoutError
from rdzv.keys import DEFAULT_PREFIX, RunKeys, normalize_prefix

BACKEND = "etcd3"
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# How often a terminal's progress line is refreshed during long waits.
_PROGRESS_INTERVAL_S = 0.5
_RAW = argparse.RawDescriptionHelpFormatter


class ExitCode(enum.IntEnum):
    """What ``rdzv`` exits with; scripts can tell failures apart by it."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    TIMEOUT = 3
    CLOSED = 4
    CONNECTION = 5
    STATE = 6
    INTERRUPTED = 130


class UsageError(Exception):
    """Bad arguments or options: exit 2 with one line on stderr."""


# ------------------------------------------------------------------ parsing
class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see: {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # argparse takes a value like "-1:2" for an option, and --nnodes would fail
        # with "expected one argument"; as "--nnodes=-1:2" it gets _nnodes' message.
        given = list(sys.argv[1:] if args is None else args)
        joined: list[str] = []
        while given:
            arg = given.pop(0)
            if arg == "--":
                joined += [arg, *given]
                break
            if arg == "--nnodes" and given and given[0].startswith("-"):
                arg = f"--nnodes={given.pop(0)}"
            joined.append(arg)
        return super().parse_known_args(joined, namespace)


def _nnodes(text: str) -> tuple[int, int]:
    """``N`` or ``MIN:MAX`` -> ``(min, max)``, as ``check_node_bounds`` allows them."""
    low_text, sep, high_text = text.partition(":")
    try:
        low = int(low_text)
        high = int(high_text) if sep else low
    except ValueError:
        low = high = 0
    try:
        check_node_bounds(low, high)
    except ValueError as err:
        beyond = f" ({err})" if high > MAX_NODES else ""
        raise argparse.ArgumentTypeError(
            f"expected N or MIN:MAX, whole numbers with 1 <= MIN <= MAX, got {text!r}{beyond}"
        ) from None
    return low, high


def _positive_seconds(text: str) -> float:
    try:
        return parse_seconds(text, "the value")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected at least {low}, got {value}")
        return value

    return parse


def _port(text: str) -> int:
    port = _at_least(1)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {port}")
    return port


def _endpoint(text: str) -> str:
    try:
        parse_endpoints(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _run_id(text: str) -> str:
    try:
        RunKeys(DEFAULT_PREFIX, text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _prefix(text: str) -> str:
    try:
        return normalize_prefix(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _age(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h`` or ``1d`` -> seconds (0 or more)."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _AGE_UNITS else (text, "s")
    try:
        seconds = float(number) * _AGE_UNITS[unit]
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected an age of 0 or more, like 90, 90s, 30m, 2h or 1d, got {text!r}")
    return seconds


def _conf_item(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _wrap(text: str) -> str:
    """A description filled to the width of a terminal (the help keeps it as is)."""
    return textwrap.fill(text, width=79)


def _example(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def _log_options() -> argparse.ArgumentParser:
    """A parent parser with ``--log-level``, which every command takes."""
    logs = argparse.ArgumentParser(add_help=False)
    logs.add_argument(
        "--log-level", choices=_LOG_LEVELS, type=str.lower, default=argparse.SUPPRESS,
        help="what is logged to stderr (default: warning)",
    )
    return logs


def _run_options() -> argparse.ArgumentParser:
    """A parent parser with the options that name one run and how to reach it."""
    run = argparse.ArgumentParser(add_help=False)
    where = run.add_argument_group("run")
    where.add_argument("--endpoint", required=True, type=_endpoint,
                       help="etcd as host[:port][,host[:port]...]")
    where.add_argument("--run-id", required=True, type=_run_id, help="the run's id")
    where.add_argument("--etcd-prefix", type=_prefix, default=None,
                       help=f"key prefix shared by all runs (default {DEFAULT_PREFIX})")
    where.add_argument(
        "--conf", type=_conf_item, action="append", default=[], metavar="KEY=VALUE",
        help="a rendezvous option, repeatable: " + ", ".join(sorted(RENDEZVOUS_OPTIONS)),
    )
    return run


def _runs_options() -> argparse.ArgumentParser:
    """A parent parser with the options of the commands about every run under a prefix."""
    runs_of = argparse.ArgumentParser(add_help=False)
    at = runs_of.add_argument_group("runs")
    at.add_argument("--endpoint", required=True, type=_endpoint,
                    help="etcd as host[:port][,host[:port]...]")
    at.add_argument("--etcd-prefix", type=_prefix, default=None,
                    help=f"key prefix shared by the runs (default {DEFAULT_PREFIX})")
    at.add_argument("--conf", type=_conf_item, action="append", default=[], metavar="KEY=VALUE",
                    help="a connection option, repeatable (protocol, cacert, cert, key, "
                    "username, password, connect_timeout)")
    at.add_argument("--json", action="store_true", help="print one JSON object")
    return runs_of


# ----------------------------------------------------------- shared steps
def _exit_code(err: BaseException) -> ExitCode:
    if isinstance(err, UsageError):
        return ExitCode.USAGE
    if isinstance(err, (RendezvousTimeoutError, StoreTimeoutError)):
        return ExitCode.TIMEOUT
    if isinstance(err, RendezvousClosedError):
        return ExitCode.CLOSED
    if isinstance(err, RendezvousConnectionError):
        return ExitCode.CONNECTION
    if isinstance(err, RendezvousStateError):
        return ExitCode.STATE
    return ExitCode.FAILURE


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    """Turn the ``ValueError`` of a malformed option into a ``UsageError``."""
    try:
        yield
    except ValueError as err:
        raise UsageError(str(err)) from None


def _run_params(args: argparse.Namespace, min_nodes: int, max_nodes: int,
                **flags: Any) -> RendezvousParameters:
    """Rendezvous parameters from ``--endpoint``, ``--run-id``, ``--conf`` and ``flags``.

    Raises:
        UsageError: an option is given twice or is unknown.
    """
    config: dict[str, Any] = {}
    for key, value in args.conf:
        if key in config:
            raise UsageError(f"--conf {key}=... is given twice")
        config[key] = value
    flags["etcd_prefix"] = args.etcd_prefix
    for key, value in flags.items():
        if value is None:
            continue
        if key in config:
            raise UsageError(
                f"both --{key.replace('_', '-')} and --conf {key}=... are given; give one"
            )
        config[key] = value
    unknown = sorted(set(config) - set(RENDEZVOUS_OPTIONS))
    if unknown:
        raise UsageError(
            f"unknown option(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(RENDEZVOUS_OPTIONS))}"
        )
    # As create_rdzv_handler does, so that status reads with the same credentials.
    config.update(environment_credentials(config))
    with _usage_errors():
        return RendezvousParameters(
            BACKEND, args.endpoint, args.run_id, min_nodes, max_nodes,
            local_addr=getattr(args, "local_addr", None), **config,
        )


def _params_prefix(params: RendezvousParameters) -> str:
    """The parameters' ``etcd_prefix``, normalized; a malformed one is a usage error."""
    with _usage_errors():
        return normalize_prefix(params.get("etcd_prefix", DEFAULT_PREFIX))


def _connect(params: RendezvousParameters) -> EtcdClient:
    with _usage_errors():
        config = EtcdConfig.from_params(params)
        return EtcdClient(config)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
           right: Sequence[str] = ()) -> list[str]:
    """Lay out ``rows`` under ``headers``; columns named in ``right`` align right."""
    cells = [list(headers)] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            text.rjust(width) if header in right else text.ljust(width)
            for text, width, header in zip(row, widths, headers, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return lines


class _Progress:
    """One self-overwriting line on stderr, shown only when stderr is a terminal."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty()
        self._lock = threading.Lock()
        self._shown = False

    def show(self, text: str) -> None:
        """Replace the line with ``text``."""
        if not self.enabled:
            return
        with self._lock:
            self._stream.write("\r\x1b[K" + text)
            self._stream.flush()
            self._shown = True

    def clear(self) -> None:
        """Erase the line, so that what follows starts on a clean one."""
        with self._lock:
            if self._shown:
                self._stream.write("\r\x1b[K")
                self._stream.flush()
                self._shown = False



def _connect_prefix(args: argparse.Namespace) -> tuple[EtcdClient, str]:
    """A client for ``--endpoint``/``--conf``, and the prefix, checked to hold runs.

    Raises:
        UsageError: an option is malformed, or a prefix given explicitly holds no run.
    """
    params = _run_params(argparse.Namespace(**{**vars(args), "run_id": "-"}), 1, 1)
    prefix = _params_prefix(params)
    client = _connect(params)
    if args.etcd_prefix is not None and not client.count(prefix.encode() + b"/"):
        client.close()
        raise UsageError(
            f"no rdzv run under --etcd-prefix {prefix or '/'!r} at {params.endpoint}; "
            f"check the prefix (the default is {DEFAULT_PREFIX})")
    return client, prefix


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KB" if n < 1024**2 else f"{n / 1024**2:.1f} MB"


def _run_rows(runs: list[dict[str, Any]]) -> list[str]:
    return _table(
        ("run", "status", "round", "members", "live", "last seen", "last change", "keys",
         "size"),
        [(r["run_id"], r["status"], r["round"], r["members"], "yes" if r["live"] else "no",
          None if r["idle_s"] is None else f"{r['idle_s']} s ago",
          f"rev {r['last_revision']}", r["keys"], _size(r["bytes"])) for r in runs],
        right=("round", "members", "last seen", "last change", "keys", "size"),
    )

