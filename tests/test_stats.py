"""The one summary convention: mean ± sample std (n − 1)."""

import math

from scenarios.stats import format_mean_std, mean_std, std_caption


def test_mean_std_is_the_sample_std() -> None:
    # population std of (1, 2, 3) is 0.816...; the sample std (n - 1) is exactly 1
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)  # one seed: no spread to estimate
    assert mean_std([1.0, math.nan, 3.0, math.inf]) == (2.0, math.sqrt(2.0))
    assert all(math.isnan(v) for v in mean_std([]))


def test_format_and_caption() -> None:
    assert format_mean_std([0.81, 0.83], scale=100, digits=1) == "82.0 ± 1.4"
    assert format_mean_std([12.0, 14.0], spec=".3g") == "13 ± 1.41"
    assert format_mean_std([]) == "—"
    assert std_caption(3) == "mean ± sample std (n − 1) over n = 3 seeds"
