"""The field checks of settings dataclasses: the rule and the class and field named in the error."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from splitnn.checks import check_amounts, check_counts
from splitnn.errors import ConfigurationError


@dataclass
class Settings:
    steps: object = 1
    lr: object = 0.5


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "2"])
def test_counts_refuse_what_is_not_a_positive_integer(bad):
    with pytest.raises(ConfigurationError, match=r"Settings\.steps must be a positive integer, got"):
        check_counts(Settings(steps=bad), ("steps",))


def test_counts_take_a_minimum_a_bound_and_a_wording():
    check_counts(Settings(steps=0), ("steps",), minimum=0)
    with pytest.raises(ConfigurationError, match=r"Settings\.steps must be an integer >= 0, got -1"):
        check_counts(Settings(steps=-1), ("steps",), minimum=0)
    with pytest.raises(ConfigurationError, match=r"Settings\.steps must be small, got 8"):
        check_counts(Settings(steps=8), ("steps",), below=8, wording="small")
    check_counts(Settings(steps=7), ("steps",), below=8)


@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan"), True, "1"])
def test_amounts_refuse_what_is_not_a_finite_number_from_zero(bad):
    with pytest.raises(ConfigurationError, match=r"Settings\.lr must be a finite number >= 0, got"):
        check_amounts(Settings(lr=bad), ("lr",))
    check_amounts(Settings(lr=0), ("lr",))
