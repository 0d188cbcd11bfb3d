"""``rdzv bench``: run the join-latency benchmark of a source checkout."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from rdzv.cli._common import _RAW, ExitCode, UsageError, _example, _log_options, _wrap

_BENCHMARK = Path("benchmarks") / "join_latency.py"


def _find_benchmark() -> Path:
    """``benchmarks/join_latency.py`` of the current directory or of this checkout."""
    candidates = [Path.cwd() / _BENCHMARK, Path(__file__).resolve().parents[3] / _BENCHMARK]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UsageError(
        f"{_BENCHMARK.as_posix()} not found: 'rdzv bench' runs the benchmark of a source "
        "checkout; run it from the repository's root"
    )


def _cmd_bench(args: argparse.Namespace) -> int:
    """Run the join-latency benchmark with the arguments rdzv did not consume."""
    script = _find_benchmark()
    # As `python benchmarks/join_latency.py ARGS` would: its argv, its directory first.
    sys.argv = [str(script), *args.passthrough]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")
    return ExitCode.OK


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``rdzv bench`` to ``commands``."""
    bench = commands.add_parser(
        "bench", parents=[_log_options()], formatter_class=_RAW,
        help=f"run {_BENCHMARK.as_posix()} (arguments pass through)",
        description=_wrap(
            f"Run {_BENCHMARK.as_posix()} of a source checkout; every argument after "
            "'bench' that rdzv does not know goes to it (put them after '--' to be sure)."
        ),
        epilog=_example("rdzv bench", "rdzv bench -- --help"),
    )
    bench.set_defaults(func=_cmd_bench)
