"""Numbers as the report shows them: fixed digits per kind of quantity, ``–`` for anything missing, and no
``-0.0``, so that tables line up and the same numbers always print the same."""

from __future__ import annotations

from typing import Any

import pandas as pd

MISSING = "–"


def missing(value: Any) -> bool:
    return value is None or pd.isna(value)


def digits(lower_is_better: bool) -> int:
    """Accuracy-like scores (0-100) get one decimal; perplexities and losses two."""
    return 2 if lower_is_better else 1


def fixed(value: Any, places: int) -> str:
    if missing(value):
        return MISSING
    text = f"{value:.{places}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def signed(value: Any, places: int) -> str:
    text = fixed(value, places)
    return text if text == MISSING or text.startswith("-") or float(text) == 0 else f"+{text}"


def interval(low: float, high: float, places: int) -> str:
    return "" if missing(low) or missing(high) else f"[{fixed(low, places)}, {fixed(high, places)}]"


def score(mean: float, low: float, high: float, n: int, of_full: float, best: bool, lower_is_better: bool) -> str:
    """``**81.0** (90%) [72.0, 90.0] n=15``: the mean (bold when best), its share of full's (a ratio for
    lower-is-better scores), its 95 % interval where there is one, and the sample count."""
    if missing(mean):
        return MISSING
    places = digits(lower_is_better)
    text = fixed(mean, places)
    parts = [f"**{text}**" if best else text]
    if not missing(of_full):
        parts.append(f"(×{of_full:.2f})" if lower_is_better else f"({100 * of_full:.0f}%)")
    parts += [interval(low, high, places), f"n={n}"]
    return " ".join(p for p in parts if p)


def ratio(value: float) -> str:
    return fixed(value, 2)


def percent(value: float) -> str:
    return MISSING if missing(value) else f"{100 * value:.0f}%"


def sig(value: float) -> str:
    """Three significant digits, without exponents for the magnitudes timings and rates take."""
    if missing(value):
        return MISSING
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:#.3g}".rstrip(".")


def size(value: float) -> str:
    """Bytes in binary units."""
    if missing(value):
        return MISSING
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    exponent = 0
    while abs(value) >= 1024 and exponent < len(units) - 1:
        value /= 1024
        exponent += 1
    return f"{value:.0f} B" if exponent == 0 else f"{sig(value)} {units[exponent]}"


def kind(value: Any) -> str:
    return value if isinstance(value, str) and value else MISSING


def peak(value: float, peak_kind: Any) -> str:
    """A peak memory, unless its kind says it could not be measured."""
    return MISSING if kind(peak_kind) in (MISSING, "unavailable") else size(value)
