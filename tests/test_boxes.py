"""Tests for cogagent_nb.data.boxes: thousandths <-> pixels and the validity rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cogagent_nb.data.boxes import MAX_COORD, box_center, box_problems, check_box, from_pixels, is_valid_box, to_pixels


def test_worked_example_from_the_docstring():
    assert to_pixels((500, 500, 999, 999), 1920, 1080) == (960, 540, 1918, 1079)
    assert from_pixels((960, 540, 1918, 1079), 1920, 1080) == (500, 500, 999, 999)


def test_the_action_space_definition_a_over_1000_times_w():
    # Action_space_en.md: the top-left corner is (a / 1000 * w, b / 1000 * h).
    assert to_pixels((250, 100, 750, 900), 800, 600) == (200, 60, 600, 540)


def test_edge_pixels_clamp_into_three_digits():
    assert from_pixels((0, 0, 1920, 1080), 1920, 1080) == (0, 0, MAX_COORD, MAX_COORD)
    assert from_pixels((-3, -1, 10, 10), 100, 100) == (0, 0, 100, 100)


sizes = st.integers(1000, 4000)


@given(st.tuples(*[st.integers(0, 999)] * 4), sizes, sizes)
def test_thousandths_round_trip_on_screens_of_1000_px_or_more(box, width, height):
    assert from_pixels(to_pixels(box, width, height), width, height) == box


@given(st.data(), st.integers(1, 999), st.integers(1, 999))
def test_pixels_round_trip_on_small_images(data, width, height):
    # Below 1000 px a pixel spans at least one thousandth, so pixels come back exactly.
    xs = st.integers(0, width - 1)
    ys = st.integers(0, height - 1)
    box = (data.draw(xs), data.draw(ys), data.draw(xs), data.draw(ys))
    assert to_pixels(from_pixels(box, width, height), width, height) == box


def test_center():
    assert box_center((100, 200, 300, 400)) == (200.0, 300.0)
    x, y = box_center(to_pixels((100, 200, 300, 400), 1000, 500))
    assert (x, y) == (200.0, 150.0)


@pytest.mark.parametrize(
    "box, expected",
    [
        ((0, 0, 999, 999), []),
        ((5, 5, 5, 5), []),
        ((0, 0, 1000, 999), ["coordinate 1000 outside 0-999"]),
        ((-1, 0, 10, 10), ["coordinate -1 outside 0-999"]),
        ((300, 0, 200, 10), ["x1=300 > x2=200 (left edge right of the right edge)"]),
        ((0, 30, 10, 20), ["y1=30 > y2=20 (top edge below the bottom edge)"]),
        ((1200, 0, 10, 5), ["coordinate 1200 outside 0-999", "x1=1200 > x2=10 (left edge right of the right edge)"]),
        ((1, 2, 3), ["a box has 4 numbers, got 3"]),
    ],
)
def test_box_problems_lists_every_rule_broken(box, expected):
    assert box_problems(box) == expected
    assert is_valid_box(box) == (not expected)


def test_check_box_raises_with_all_problems():
    assert check_box([1, 2, 3, 4]) == (1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"invalid box \[5, 2, 3, 1000\]: coordinate 1000.*x1=5 > x2=3"):
        check_box([5, 2, 3, 1000])
    with pytest.raises(ValueError, match="image size must be positive"):
        from_pixels((0, 0, 1, 1), 0, 10)
