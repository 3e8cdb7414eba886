"""pipeline.stats against scipy's, on fixed numbers: Student's t tail and the one-sided one-sample t-test."""

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats as scipy_stats

from pipeline import stats

# the leaderboard's run 6 reports a mean over 5 seeds; these are CORE-like values around GPT-2's bar
SEEDS = {"five_above": [0.2612, 0.2583, 0.2655, 0.2598, 0.2631],
         "seven_mixed": [0.2571, 0.2549, 0.2602, 0.2588, 0.2533, 0.2594, 0.2560],
         "two_below": [0.2501, 0.2532]}


@pytest.mark.parametrize("df", [1, 2, 3, 4, 6, 10, 30, 120])
@pytest.mark.parametrize("t", [-12.0, -2.5, -0.7, 0.0, 0.3, 1.0, 2.132, 3.747, 9.0, 40.0])
def test_the_t_tail_is_scipys(t, df):
    assert stats.t_sf(t, df) == pytest.approx(scipy_stats.t.sf(t, df), rel=1e-10, abs=1e-300)


@pytest.mark.parametrize("a, b, x", [(0.5, 0.5, 0.1), (2.0, 0.5, 0.9), (15.0, 0.5, 0.4), (1.0, 3.0, 0.999),
                                     (60.0, 0.5, 0.97)])
def test_the_incomplete_beta_is_scipys(a, b, x):
    assert stats.incomplete_beta(a, b, x) == pytest.approx(scipy.special.betainc(a, b, x), rel=1e-12)


@pytest.mark.parametrize("name", SEEDS)
@pytest.mark.parametrize("alternative", ["greater", "less"])
def test_the_one_sided_test_is_scipys_ttest_1samp(name, alternative):
    values = SEEDS[name]
    ours = stats.one_sided(values, 0.256525, alternative)
    theirs = scipy_stats.ttest_1samp(values, 0.256525, alternative=alternative)
    assert ours["t"] == pytest.approx(float(theirs.statistic), rel=1e-12)
    assert ours["p"] == pytest.approx(float(theirs.pvalue), rel=1e-10)
    assert (ours["n"], ours["df"]) == (len(values), len(values) - 1)
    assert ours["significant"] == (ours["p"] < 0.01)


def test_five_seeds_above_the_bar_pass_at_001_and_a_mixed_seven_does_not():
    assert stats.one_sided(SEEDS["five_above"], 0.256525)["p"] == pytest.approx(0.00798398, rel=1e-5)
    assert stats.one_sided(SEEDS["five_above"], 0.256525)["significant"] is True
    assert stats.one_sided(SEEDS["seven_mixed"], 0.256525)["significant"] is False
    assert stats.one_sided(SEEDS["five_above"], 0.256525, alpha=0.005)["significant"] is False   # settable


def test_one_seed_says_no_test_is_possible():
    out = stats.one_sided([0.27], 0.256525)
    assert out["p"] is None and out["significant"] is None and out["why"].startswith("one seed: no test is possible")


def test_seeds_without_spread_are_decided_by_the_side_of_the_mean():
    assert stats.one_sided([0.3, 0.3, 0.3], 0.256525)["p"] == 0.0
    assert stats.one_sided([0.2, 0.2], 0.256525)["p"] == 1.0
    assert math.isinf(stats.one_sided([0.2, 0.2], 0.256525, "less")["t"]) is True


# ----------------------------------------------------------------------------- A/B at one depth, scaling fits

A_SEEDS = [0.8312, 0.8297, 0.8325, 0.8301]        # val_bpb of a recipe over seeds
B_SEEDS = [0.8251, 0.8270, 0.8244]                # and of a change to it


@pytest.mark.parametrize("alternative", ["less", "greater"])
@pytest.mark.parametrize(("a", "b"), [(A_SEEDS, B_SEEDS), (B_SEEDS, A_SEEDS), (A_SEEDS, [0.8310, 0.8299, 0.8330])])
def test_welchs_test_is_scipys(a, b, alternative):
    ours = stats.welch(a, b, alternative)
    theirs = scipy_stats.ttest_ind(b, a, equal_var=False, alternative=alternative)
    assert ours["t"] == pytest.approx(float(theirs.statistic), rel=1e-12)
    assert ours["p"] == pytest.approx(float(theirs.pvalue), rel=1e-9)
    assert ours["df"] == pytest.approx(float(theirs.df), rel=1e-12)


def test_welch_needs_two_seeds_a_side():
    assert stats.welch([0.83], B_SEEDS) is None and stats.welch(A_SEEDS, [0.82]) is None


# a CORE-like miniseries: training FLOPs per depth and a score that grows as a power of them
FLOPS = [2.1e17, 6.0e17, 1.5e18, 3.4e18, 7.0e18]
CORE = [0.118, 0.152, 0.183, 0.214, 0.241]


def test_the_power_law_is_numpys_line_in_log_log():
    fit = stats.power_law(FLOPS, CORE)
    slope, intercept = np.polyfit(np.log10(FLOPS), np.log10(CORE), 1)
    assert fit["b"] == pytest.approx(slope, rel=1e-12) and fit["a"] == pytest.approx(10 ** intercept, rel=1e-10)
    r = np.corrcoef(np.log10(FLOPS), np.log10(CORE))[0, 1]
    assert fit["r2"] == pytest.approx(r ** 2, rel=1e-12) and fit["points"] == 5


def test_the_crossing_is_where_the_fit_reaches_gpt2s_core():
    fit = stats.power_law(FLOPS, CORE)
    x = stats.power_law_crossing(fit, 0.256525)
    assert FLOPS[-1] < x < 10 * FLOPS[-1]                      # just past the biggest member
    assert stats.power_law_at(fit, x) == pytest.approx(0.256525, rel=1e-12)
    assert stats.power_law_crossing({"a": 0.2, "b": 0.0}, 0.256525) is None


@pytest.mark.parametrize(("xs", "ys"), [([1e18], [0.2]), ([1e18, 2e18], [0.2, 0.0]), ([1e18, 1e18], [0.1, 0.2])])
def test_a_power_law_refuses_what_it_cannot_fit(xs, ys):
    with pytest.raises(ValueError):
        stats.power_law(xs, ys)
