"""Value rules for options: what a value must be, checked and described in one place.

Light (no torch, no Avalanche): the strategy registry declares its hyperparameters'
rules with these, and :mod:`engram.run.validation` checks every option against them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Rule:
    """What a value must be: ``ok(value)``, described as ``what`` ("an integer >= 1")."""

    what: str
    ok: Callable[[Any], bool]
    null: bool = False  # None is allowed too


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def integer(low: int, high: int | None = None, *, null: bool = False) -> Rule:
    what = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Rule(
        what,
        lambda v: isinstance(v, int) and not isinstance(v, bool)
        and v >= low and (high is None or v <= high),
        null,
    )  # fmt: skip


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    infinite: bool = False,
    null: bool = False,
) -> Rule:
    """A finite number (``infinite``: also +inf) within the given bounds."""
    if low is not None and high is not None:
        what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        what = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        what = "a finite number"

    def ok(v: Any) -> bool:
        if not _is_number(v) or math.isnan(v) or (math.isinf(v) and not (infinite and v > 0)):
            return False
        if low is not None and (v <= low if low_open else v < low):
            return False
        return high is None or (v < high if high_open else v <= high)

    return Rule(what, ok, null)


def choice(options: Sequence[str], *, null: bool = False) -> Rule:
    return Rule(f"one of {', '.join(options)}", lambda v: v in options, null)


def integers(low: int) -> Rule:
    return Rule(
        f"a list of integers >= {low}",
        lambda v: isinstance(v, list)
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= low for x in v),
    )  # fmt: skip


def boolean() -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool))


def text(*, null: bool = False) -> Rule:
    return Rule("a non-empty string", lambda v: isinstance(v, str) and v != "", null)


def hp(default: Any, rule: Rule, doc: str = "") -> Any:
    """A hyperparameter (a dataclass field): its default, what it must be, and why."""
    return field(default=default, metadata={"rule": rule, "doc": doc})


SEED = integer(0, 2**32 - 1)  # numpy's seed range
FRACTION = number(0, 1, null=True)
# The smallest normal float32: a hyperparameter that is used in float32 arithmetic and
# must stay > 0 (SI's eps, a distillation temperature) is 0 or subnormal below it, and
# 1e-50, accepted as "> 0", made SI's importances 0/0 = NaN.
FLOAT32_TINY = 1.1754943508222875e-38
POSITIVE_FLOAT32 = Rule(
    f"a number >= {FLOAT32_TINY:.2g} (smaller ones are 0 in float32)", number(FLOAT32_TINY).ok
)
