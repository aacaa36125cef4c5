"""Reporting: the paired test of a row against TA-NAS on the same test images."""
import pytest

import reporting


def test_paired_difference_on_the_same_test_images():
    # 10 images; the reference gets 1 and 2 wrong (seeds 0, 1), the row 1, 2, 3 and 1, 4
    reference = {"test_images": 10, "test_wrong": [[1, 2], [1, 2]]}
    row = {"test_images": 10, "test_wrong": [[1, 2, 3], [1, 4]]}
    diff, low, high = reporting.paired_difference(row, reference)
    # per image: image 2 (0.5 - 1), image 3 (+0.5), image 4 (+0.5): a mean of +0.05, i.e. 5 points
    assert diff == pytest.approx(5.0)
    assert low < diff < high and low <= 0  # 3 of 10 images differ: not significant
    other = {"test_images": 10, "test_wrong": [[3, 4], [3, 4]]}  # as many errors, on other images
    diff, low, high = reporting.paired_difference(other, reference)
    assert diff == 0 and low < 0 < high  # 4 of 10 images differ, evenly: no difference, an honest interval
    worse = {"test_images": 1000, "test_wrong": [list(range(100))]}
    better = {"test_images": 1000, "test_wrong": [list(range(10))]}
    diff, low, high = reporting.paired_difference(worse, better)
    assert diff == pytest.approx(9.0) and 7 < low < 9 < high < 11  # 90 more of 1,000 wrong: significant


def test_the_paired_interval_carries_the_spread_between_seeds():
    # seeds at 1 % and 5 % error for the reference, 2 % and 6 % for the row: +1 point on average, but one seed
    # of the row (2 %) is better than one of the reference (5 %)
    reference = {"test_images": 1000, "test_wrong": [list(range(10)), list(range(50))]}
    row = {"test_images": 1000, "test_wrong": [list(range(20)), list(range(60))]}
    diff, low, high = reporting.paired_difference(row, reference)
    assert diff == pytest.approx(1.0) and low < -2 and high > 3  # resampling the images alone gives [+0.60, +1.45]
