"""One summary convention for every table fedge and its benchmarks write: the mean ± the *sample*
standard deviation over seeds (denominator n − 1), with n stated in the table's caption.

    s = sqrt( Σ (x_i − x̄)² / (n − 1) )

Sample std estimates the spread of the seed-to-seed distribution from a few draws; population std
(denominator n) understates it, by a factor sqrt((n − 1)/n): 18 % at n = 3. With one value there is
no spread to estimate: the std is reported as 0 and the caption's n = 1 says why.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

MISSING = "—"


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample std (n − 1) of the finite ``values``; std 0.0 for a single value;
    (NaN, NaN) when there is none."""
    finite = [float(v) for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return statistics.fmean(finite), std


def format_mean_std(
    values: Iterable[float], scale: float = 1.0, digits: int = 2, spec: str | None = None
) -> str:
    """``"83.10 ± 1.25"``: :func:`mean_std` of ``values`` times ``scale`` (100 for percent),
    ``digits`` decimals (or a format ``spec`` such as ``".3g"``); ``—`` when there is no value."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return MISSING
    fmt = spec or f".{digits}f"
    return f"{format(scale * mean, fmt)} ± {format(scale * std, fmt)}"


def std_caption(n: int | str | None = None, over: str = "seeds") -> str:
    """The words every table's caption carries: ``mean ± sample std (n − 1) over n = 3 seeds``;
    without ``n`` (it differs between rows, which then state it): ``... over seeds``."""
    if n is None:
        return f"mean ± sample std (n − 1) over {over}"
    return f"mean ± sample std (n − 1) over n = {n} {over}"
