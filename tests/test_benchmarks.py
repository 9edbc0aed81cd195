"""The benchmark suite's smoke mode runs end to end (CI): every script of the suite
succeeds with --quick and the report gets its section. No figure is asserted (the
tables' shape is, for the scaling and latency sections)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import run  # noqa: E402


# ~3.5 min on 2 idle cores (fifteen scripts, two at a time); a loaded machine took over
# the default 300 s limit, which is for tests that hang, not for this one's size.
@pytest.mark.timeout(900)
def test_quick_suite_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text(
        "STALE\n<!-- notes:begin -->\nhand-written findings\n<!-- notes:end -->\nSTALE\n"
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    report = out.read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr + report[-5000:]
    assert report.startswith("# Benchmarks\n")
    assert "run.py --quick" in report and "Machine:" in report
    assert "hand-written findings" in report and "STALE" not in report  # notes kept, rest not
    rows = dict(re.findall(r"^\| \[(\w+\.py)\]\([^)]*\) \| ([^|]+) \|", report, re.M))
    assert set(rows) == set(run.SUITE)
    for script, status in rows.items():
        if (ROOT / "benchmarks" / script).exists():
            assert status.strip() == "ok", script
            assert f"<!-- section: {script} -->" in report
    for heading in ("## Fisher diagonal", "## engram vs Avalanche", "## Resume latency",
                    "### Training stall of a mid-experience checkpoint"):  # fmt: skip
        assert heading in report
    assert re.search(r"\| \d+\.\d+x", report)  # figures are ratios
    scaling_tables(report)
    latency_table(report)


# The suite's own sections are checked in its one run (each script runs once): its
# tables have the shape the docs promise.


def scaling_tables(report: str) -> None:
    """benchmarks/scaling.py --quick: both axes measured, each cost with its exponent."""
    section = report[report.index("## Scaling (issue 25)") :]
    assert "scaling.py --quick" in section
    number = r"-?\d+\.\d+"
    for cost in ("commit", "engram ls \\(CLI process\\)", "open \\+ resume HEAD",
                 "prune: full gc \\(before\\)", "prune: from the fence \\(now\\)",
                 "gc \\(full, nothing to drop\\)", "compact after 10 commits",
                 "store bytes \\(MiB\\)", "process peak RSS \\(MiB\\)"):  # fmt: skip
        # a value per history length (10, 100), the exponent, largest / smallest
        assert re.search(rf"^\| {cost} \|( [^|]+ \|){{2}} {number} \| {number}x \|$", section,
                         re.M), cost  # fmt: skip
    for size in ("1e+05", "1e+06"):
        assert re.search(rf"^\| {re.escape(size)} \| [\d.]+( \| {number}x){{5}} \|", section,
                         re.M), size  # fmt: skip
    for cost in ("reservoir: admission per sample", "class_balanced: admission per sample",
                 "reservoir: commit after an experience", "class_balanced: restore",
                 "evaluation per test experience", "TensorBoard \\(scalars, figure\\)",
                 "overhead \\(all but training\\)"):  # fmt: skip
        # a value per buffer size (1,000, 10,000) or stream length (10, 20)
        assert re.search(rf"^\| {cost} \|( [^|]+ \|){{2}} {number} \| {number}x \|$", section,
                         re.M), cost  # fmt: skip


def latency_table(report: str) -> None:
    """benchmarks/cli_latency.py --quick: every command timed against `python -c pass`."""
    section = report[report.index("## Inspection latency") :]
    assert "cli_latency.py --quick" in section
    for command in ("python -c pass", 'python -c "import torch"', "engram ls STORE",
                    "engram show STORE", "engram verify STORE --all"):  # fmt: skip
        # wall, over `python -c pass`, vs `import torch`, what it imported
        assert re.search(rf"^\| `{re.escape(command)}` \| \d+\.\d+ \| [+-]\d+\.\d+ \| "
                         rf"\d+\.\d+x \| [^|]+ \|$", section, re.M), command  # fmt: skip


def test_a_failing_script_is_reported_not_fatal(tmp_path: Path) -> None:
    results = [
        {"script": "good.py", "status": "ok", "seconds": 1.0, "section": "## Good\n\n1.00x"},
        {
            "script": "bad.py",
            "status": "failed (exit 1)",
            "seconds": 2.0,
            "section": None,
            "log": "Traceback: boom",
        },
        {"script": "gone.py", "status": "missing", "seconds": 0.0, "section": None},
    ]
    args = run.argparse.Namespace(quick=True, only=None)
    report = run.assemble(results, args, None, 3.0)
    assert "## Good" in report and "| failed (exit 1) |" in report and "| missing |" in report
    assert "Traceback: boom" in report
