"""The study's statistics against hand-computed cases."""

import math

import pytest

from snce.study.stats import (
    LOSS,
    NO_DIFFERENCE,
    WIN,
    Interval,
    area_under_curve,
    first_reach,
    paired_difference,
    t_interval,
    verdict,
)

# The masked-diffusion K = 4,096 CE curve of the old one-seed report: not monotone (95.8 at step 50, 116.8 at
# step 200), and SNCE's curve crossing 116.8 between steps 50 and 100.
CE_STEPS = [50, 100, 150, 200]
CE_FID = [95.8, 104.1, 110.3, 116.8]
SNCE_FID = [130.0, 70.0, 40.0, 32.2]


def test_first_reach_on_a_non_monotone_curve():
    # CE's final FID (116.8) was first reached by CE itself at its first evaluation, step 50 ...
    assert first_reach(CE_STEPS, CE_FID, CE_FID[-1]) == 50.0
    # ... and its best FID (95.8) also at step 50.
    assert first_reach(CE_STEPS, CE_FID, min(CE_FID)) == 50.0
    # SNCE crosses 116.8 between step 50 (130.0) and step 100 (70.0): 50 + (130 - 116.8) / (130 - 70) * 50 = 61.
    assert first_reach(CE_STEPS, SNCE_FID, CE_FID[-1]) == pytest.approx(61.0)
    # So SNCE needed 61 / 50 = 1.22x CE's steps for CE's final FID: slower, not "30% of CE's steps".
    assert first_reach(CE_STEPS, SNCE_FID, 95.8) == pytest.approx(50 + (130 - 95.8) / 60 * 50)
    # Never reached within the run:
    assert first_reach(CE_STEPS, CE_FID, 90.0) is None


def test_first_reach_interpolates_and_handles_plateaus():
    assert first_reach([10, 20, 30], [50.0, 30.0, 10.0], 40.0) == pytest.approx(15.0)
    assert first_reach([10, 20, 30], [50.0, 30.0, 10.0], 10.0) == 30.0
    assert first_reach([10, 20], [5.0, 5.0], 5.0) == 10.0
    with pytest.raises(ValueError, match="increase"):
        first_reach([10, 10], [1.0, 2.0], 1.0)
    with pytest.raises(ValueError, match="one value per step"):
        first_reach([10, 20], [1.0], 1.0)


def test_area_under_curve_is_the_trapezoidal_mean():
    # Trapezoids: (100-50) * (95.8+104.1)/2 + 50 * (104.1+110.3)/2 + 50 * (110.3+116.8)/2, over 150 steps.
    expected = (50 * (95.8 + 104.1) / 2 + 50 * (104.1 + 110.3) / 2 + 50 * (110.3 + 116.8) / 2) / 150
    assert area_under_curve(CE_STEPS, CE_FID) == pytest.approx(expected)
    assert area_under_curve([0, 10, 30], [4.0, 2.0, 2.0]) == pytest.approx((10 * 3 + 20 * 2) / 30)
    assert area_under_curve([7], [3.5]) == 3.5


def test_t_interval_hand_computed():
    # values 1, 2, 3, 4: mean 2.5, sd sqrt(5/3), t_{0.975, 3} = 3.182446305284263.
    iv = t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert (iv.mean, iv.n) == (2.5, 4)
    assert iv.lo == pytest.approx(2.5 - half, rel=1e-12) and iv.hi == pytest.approx(
        2.5 + half, rel=1e-12
    )
    # 90%: t_{0.95, 3} = 2.353363434801823
    iv90 = t_interval([1.0, 2.0, 3.0, 4.0], confidence=0.9)
    assert iv90.hi - iv90.mean == pytest.approx(2.353363434801823 * math.sqrt(5 / 3) / 2, rel=1e-12)
    one = t_interval([3.0])
    assert one.mean == 3.0 and math.isnan(one.lo) and math.isnan(one.hi)
    with pytest.raises(ValueError, match="finite"):
        t_interval([1.0, math.nan])


def test_paired_difference_uses_the_per_seed_differences():
    # Seeds 0..2: differences -2, -3, -4 -> mean -3, sd 1, t_{0.975, 2} = 4.302652729911275.
    arm, ce = [10.0, 12.0, 14.0], [12.0, 15.0, 18.0]
    iv = paired_difference(arm, ce)
    half = 4.302652729911275 / math.sqrt(3)
    assert iv.mean == pytest.approx(-3.0)
    assert (iv.lo, iv.hi) == (pytest.approx(-3 - half), pytest.approx(-3 + half))
    # Unpaired, the seed-to-seed spread (sd 2 on each side) would swamp a difference pairing reveals:
    assert iv.hi < 0
    with pytest.raises(ValueError, match="one per seed"):
        paired_difference([1.0, 2.0], [1.0])


def test_verdict_words_follow_only_from_the_interval():
    assert verdict(Interval(-3.0, -5.0, -1.0, 3)) == WIN
    assert verdict(Interval(3.0, 1.0, 5.0, 3)) == LOSS
    assert verdict(Interval(-3.0, -7.0, 1.0, 3)) == NO_DIFFERENCE
    assert (
        verdict(Interval(-3.0, math.nan, math.nan, 1)) == NO_DIFFERENCE
    )  # one seed: nothing is called
    # Higher-is-better metrics (class consistency) flip the sign.
    assert verdict(Interval(0.1, 0.05, 0.15, 3), lower_is_better=False) == WIN
    assert verdict(Interval(-0.1, -0.15, -0.05, 3), lower_is_better=False) == LOSS
