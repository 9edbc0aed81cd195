"""Shared by the benchmark scripts: the command-line contract and Markdown output.

Every script of the suite accepts ``--quick`` (a smoke-sized run) and ``--markdown PATH``
(write its section of docs/benchmarks.md there; without it the section is printed).
``benchmarks/run.py`` runs each as a subprocess and assembles the report.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke-sized run (the suite's CI mode)")
    p.add_argument("--markdown", type=Path, help="write this script's Markdown section here")
    return p


def emit(args: argparse.Namespace, text: str) -> None:
    """Write the section to ``--markdown`` (or print it)."""
    text = text.strip() + "\n"
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    print(text)


def command(args: argparse.Namespace, extra: str = "") -> str:
    """The command line that reproduces this section (as run through the suite)."""
    script = Path(sys.argv[0]).resolve().relative_to(ROOT)
    quick = " --quick" if args.quick else ""
    return f".venv/bin/python {script}{quick}{extra}"


MEASURED = ("src", "benchmarks", "pyproject.toml")


def git_commit() -> str:
    """The short commit id measured, and whether the code measured had uncommitted
    changes (the package, the benchmarks, the project file: not the report and plots
    the suite is writing as it runs)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                *MEASURED], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()  # fmt: skip
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    import torch

    return (
        f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleave(runs: dict[str, Callable[[int], object]], rounds: int) -> dict[str, list[float]]:
    """Run every entry once per round, in the same order, timing each; seconds per name."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn(r)
            times[name].append(time.perf_counter() - start)
    return times


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary directory, removed afterwards (benchmark stores are large)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def table(header: list[str], rows: list[list[object]], align: str = "") -> str:
    """A Markdown table; ``align``: one of "l"/"r" per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" if a == "l" else "---:" for a in align) + "|")
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
