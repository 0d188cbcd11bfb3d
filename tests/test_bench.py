"""The benchmarks' own logic, without running a round.

The join-latency benchmark's runs (``make bench``) are appended to the results
file, never replacing earlier ones, and a recorded run can be read back (its
table rows) to be plotted; the scale harness reports its slopes; the soak
tells etcd members that diverged from members that lag.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from helpers import wait_for

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "join_latency.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("join_latency", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _section(bench: ModuleType, started: datetime.datetime, rdzv_s: list[float]) -> str:
    """One run's section as the script renders it: rdzv at N=8, torch etcd timed out."""
    done = bench.Summary("rdzv", 8, [bench.RoundResult("rdzv", 8, seconds=s) for s in rdzv_s])
    failed = bench.Summary("etcd", 8, [bench.RoundResult(
        "etcd", 8, problem="timeout >120 s: 0 of 8 returned", timed_out=True)])
    args = argparse.Namespace(
        procs=1, limit=120.0, repeats=len(rdzv_s), rdzv_conf=[], plot="join_latency-x.png"
    )
    env = ["- Machine: test", "- Python test"]
    return bench.render([done, failed], args, env, started, 60.0)


def test_two_runs_are_both_kept_in_order(bench: ModuleType, tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    first = datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc)
    second = datetime.datetime(2026, 1, 2, 5, 6, tzinfo=datetime.timezone.utc)
    bench.write_results(str(results), _section(bench, first, [0.1, 0.2, 0.3]))
    after_one = results.read_text()
    bench.write_results(str(results), _section(bench, second, [0.5, 0.4, 0.6]))
    text = results.read_text()
    # The first run is still there, byte for byte; the header is written once.
    assert text.startswith(after_one)
    assert text.count(bench.HEADER.splitlines()[0]) == 1
    runs = bench.recorded_runs(text)
    assert list(runs) == ["2026-01-02 03:04", "2026-01-02 05:06"]
    points, limit = bench.points_of(runs["2026-01-02 05:06"])
    assert limit == 120.0
    assert points == [
        bench.Point("rdzv", 8, 0.5, 0.4, 0.6, None),
        bench.Point("etcd", 8, None, None, None, "timeout >120 s"),
    ]
    assert bench.previous_duration(text, "python benchmarks/join_latency.py --nodes 8") is None


def test_recorded_runs_of_the_repository_read_back(bench: ModuleType) -> None:
    # The runs the README's table and plot come from.
    text = (SCRIPT.parent / "RESULTS.md").read_text()
    runs = bench.recorded_runs(text)
    rdzv = {p.nodes: p.median for name in ("2026-11-25 07:20", "2026-11-25 07:29")
            for p in bench.points_of(runs[name])[0] if p.backend == "rdzv"}
    assert rdzv == {8: 0.020, 64: 0.076, 256: 0.317, 1024: 2.084}
    assert bench.previous_duration(text, "python benchmarks/join_latency.py") is not None


def test_scale_reports_each_step_and_the_fitted_slope(bench: ModuleType) -> None:
    # bench put join_latency in sys.modules, which scale imports by that name.
    spec = importlib.util.spec_from_file_location("scale", SCRIPT.parent / "scale.py")
    assert spec is not None and spec.loader is not None
    scale = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = scale
    spec.loader.exec_module(scale)
    sizes = [1024, 2048, 4096, 8192]
    # Rounds that grow as N^1.2 but for a bump at 4096; a floor that grows as N.
    times = [1e-4 * n ** 1.2 for n in sizes]
    times[2] *= 1.5
    points = [scale.Point("single", n, [bench.RoundResult("rdzv", n, seconds=t)],
                          floors=[1e-4 * n, 2e-4 * n])
              for n, t in zip(sizes, times, strict=True)]
    lines = scale.slopes(points)
    assert lines[:3] == [
        "- single: slope 1.20 from N=1024 to N=2048",
        f"- single: slope {1.2 + math.log2(1.5):.2f} from N=2048 to N=4096",
        f"- single: slope {1.2 - math.log2(1.5):.2f} from N=4096 to N=8192",
    ]
    assert lines[3].startswith("- single: slope 1.") and "fitted over N=1024..8192" in lines[3]
    assert lines[3].endswith("the floor's 1.00")
    assert scale.fitted_slope([(n, 3.0 * n ** 1.2) for n in sizes]) == pytest.approx(1.2)


def test_the_soak_tells_diverged_etcd_members_from_lagging_ones(
        bench: ModuleType, etcd_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # bench put join_latency in sys.modules, whose metrics soak reads with.
    spec = importlib.util.spec_from_file_location("soak", SCRIPT.parent / "soak.py")
    assert spec is not None and spec.loader is not None
    soak = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = soak
    spec.loader.exec_module(soak)
    # A real cluster's members, caught up with each other, agree.
    members = etcd_cluster.members
    wait_for(lambda: len({soak._applied_and_revision(m) for m in members}) == 1,
             timeout=10, what="the members to catch up")
    applied, revision = soak._applied_and_revision(members[0])
    assert applied > 0 and revision > 0
    assert soak.Soak.etcd_divergence(SimpleNamespace(cluster=etcd_cluster)) == ""
    # What etcd 3.5.0-3.5.2 can leave after a member's restart: the same raft
    # entries applied, different revisions.
    readings = {"etcd-0": (7, 100), "etcd-1": (7, 97), "etcd-2": (7, 100)}
    monkeypatch.setattr(soak, "_applied_and_revision", lambda member: readings[member.name])
    driver = SimpleNamespace(cluster=SimpleNamespace(
        members=[SimpleNamespace(name=name) for name in readings]))
    said = soak.Soak.etcd_divergence(driver)
    assert "index 7" in said and "etcd-1 97" in said, said
    # A member still applying what the others did is not judged.
    readings["etcd-1"] = (5, 97)
    assert soak.Soak.etcd_divergence(driver) == ""
    # The soak warns of the versions that have the bug.
    assert [soak._loses_writes_when_killed(v) for v in ("3.5.0", "3.5.2", "3.5.3", "3.4.23")] \
        == [True, True, False, False]
