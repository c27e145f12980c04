"""Names of the finetuning subsets: the paper's four, and sized variants for a size sweep.

top, bottom and random take `split.fraction` of the pool; top<P>, bottom<P> and random<P>
take P% of it (top25: the most popular quarter), so one config can ask how the effect
changes with the amount of finetuning data. whole is the pool. A name is also a path
component and a wildcard value, so it stays letters and digits.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from factft.errors import FactftError

KINDS = ("top", "bottom", "random", "whole")
NAME = re.compile(r"^(?:whole|(top|bottom|random)([1-9][0-9]?)?)$")
_LABELS = {"top": "FT-Top", "bottom": "FT-Bottom", "random": "FT-Random", "whole": "FT-Whole"}


def parse(name: str) -> tuple[str, int | None]:
    """(kind, percent of the pool); percent is None for the paper's four (split.fraction)."""
    match = NAME.match(str(name))
    if match is None:
        raise FactftError(
            f"subset '{name}': unknown; use top, bottom, random, whole, or top<P>, bottom<P>, "
            "random<P> with P in 1-99 (the percent of the pool)"
        )
    kind, percent = match.groups()
    return kind or "whole", None if percent is None else int(percent)


def is_subset(name: str) -> bool:
    return NAME.match(str(name)) is not None


def is_sized(name: str) -> bool:
    return parse(name)[1] is not None


def pool_share(name: str, fraction: float) -> float:
    """The share of the pool the subset takes: its percent, split.fraction, or 1 for whole."""
    kind, percent = parse(name)
    if kind == "whole":
        return 1.0
    return fraction if percent is None else percent / 100


def ordered(names: Iterable[str]) -> list[str]:
    """Names in reading order: the paper's four first, then sized ones by kind and size."""
    return sorted(set(names), key=_order_key)


def _order_key(name: str) -> tuple:
    kind, percent = parse(name)
    return (percent is not None, KINDS.index(kind), percent or 0)


def label(name: str) -> str:
    """FT-Top, ..., and FT-Top 25% for a sized subset."""
    kind, percent = parse(name)
    return _LABELS[kind] if percent is None else f"{_LABELS[kind]} {percent}%"


def check(names: Iterable[str], fraction: float) -> None:
    """A sized top or bottom subset that repeats a plain one (top50 with split.fraction 0.5)
    would finetune the same table twice; say which to drop. (random50 is a draw of its own.)"""
    names = list(names)
    for name in names:
        kind, percent = parse(name)
        repeats = kind in ("top", "bottom") and percent is not None and abs(percent / 100 - fraction) < 1e-9
        if repeats and kind in names:
            raise FactftError(
                f"subsets: '{name}' is the same table as '{kind}' (split.fraction {fraction}); list one of them"
            )
