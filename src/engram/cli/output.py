"""What every ``engram`` command shares: exit codes, the usage error, and printing.

Standard library only: :mod:`engram.cli` imports this to report errors, and ``engram
--help`` must not wait for torch or LMDB (the store helpers are in :mod:`engram.cli.common`).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from engram.errors import EngramError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


class UsageError(EngramError):
    """A command-line argument that cannot be used (reported like every EngramError)."""


def emit_json(obj: Any) -> None:
    json.dump(finite(obj), sys.stdout, indent=2, allow_nan=False, default=_json_default)
    sys.stdout.write("\n")


def finite(tree: Any) -> Any:
    """``tree`` with NaN and infinities (not valid JSON for most readers) as null."""
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    if isinstance(tree, dict):
        return {k: finite(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [finite(v) for v in tree]
    return tree


def _json_default(value: Any) -> Any:
    raise TypeError(f"not JSON: {type(value).__qualname__}")


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def num(x: Any, digits: int = 3) -> str:
    """A metric for a table: ``digits`` decimals, ``-`` for None."""
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        return "-" if x is None else str(x)
    return f"{x:.{digits}f}"


def table(rows: list[Sequence[Any]], header: Sequence[str], right: set[int] = frozenset()) -> str:
    """A plain text table; columns in ``right`` are right-aligned (numbers)."""
    cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r in cells:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def indent(text: str) -> str:
    return "  " + text.replace("\n", "\n  ")
