"""Names every part of the report shares: the reference method, the average column, the query modes, and the
reading order of rows, so that tables, comparisons and figures list things the same way."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

REFERENCE = "full"
AVERAGE = "average"
MODES = {True: "query-aware", False: "query-agnostic"}

_RANKS: dict[str, Callable[[pd.Series], pd.Series]] = {
    "model": lambda s: s.map(str),
    "length": lambda s: s,
    "mode": lambda s: s.map({mode: i for i, mode in enumerate(MODES.values())}),
    "budget": lambda s: -s,
    "method": lambda s: s.map(lambda m: f"{m != REFERENCE:d}{m}"),
    "task": lambda s: s.map(lambda t: f"{t == AVERAGE:d}{t}"),
    "sample_id": lambda s: s.map(str),
}


def reading_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Query-aware first, budgets descending, the full reference first, then methods A-Z, the average last."""
    keys = [k for k in _RANKS if k in frame]
    return frame.sort_values(keys, key=lambda s: _RANKS[s.name](s), kind="stable") if keys else frame
