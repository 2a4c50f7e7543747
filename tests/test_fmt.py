"""The one money and the one duration format every printed figure uses (raylm/fmt.py)."""

import pytest

from raylm.fmt import duration, money


@pytest.mark.parametrize(
    "usd, shown",
    [
        (17.95, "$17.95"),
        (1234.5, "$1,234.50"),
        (0.01, "$0.01"),
        (0, "$0.00"),
        (0.0031, "$0.0031"),  # below a cent: two significant digits
        (1.8e-5, "$0.000018"),
        (1.3e-5, "$0.000013"),
    ],
)
def test_money_shows_cents_and_two_digits_below_a_cent(usd, shown):
    assert money(usd) == shown


@pytest.mark.parametrize(
    "seconds, shown",
    [
        (0.00194, "0.00194 s"),  # three significant digits under a minute
        (42.2, "42.2 s"),
        (53, "53 s"),
        (60, "1.0 min"),
        (2700, "45.0 min"),
        (3600, "1.0 h"),
        (47.9 * 3600, "47.9 h"),
        (48 * 3600, "2.0 days"),
        (1000 * 86400, "1,000.0 days"),
    ],
)
def test_duration_steps_from_seconds_to_days(seconds, shown):
    assert duration(seconds) == shown
