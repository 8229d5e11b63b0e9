"""Box coordinates: CogAgent's thousandths (0-999) and pixels.

CogAgent never sees pixel coordinates. A box is ``[[x1,y1,x2,y2]]`` where each number is a fraction of
the screen in thousandths: on a 1920x1080 screenshot, ``[[500,500,999,999]]`` spans pixels
(960, 540) to (1918, 1079). The official action-space document defines the pixel corner as
``a / 1000 * w`` and the click point as the centre of the box. Working in thousandths keeps the answer
independent of the screen resolution, and three digits are few tokens.

Example::

    >>> to_pixels((500, 500, 999, 999), 1920, 1080)
    (960, 540, 1918, 1079)
    >>> from_pixels((960, 540, 1918, 1079), 1920, 1080)
    (500, 500, 999, 999)
"""

from __future__ import annotations

from collections.abc import Sequence

Box = tuple[int, int, int, int]
SCALE = 1000
"""Coordinates are thousandths of width/height."""
MAX_COORD = 999
"""The largest coordinate (three digits); 1000 would be the pixel just beyond the screen's edge."""


def to_pixels(box: Sequence[int], width: int, height: int) -> Box:
    """Thousandths -> pixel corners, ``round(v / 1000 * size)`` as the action-space document defines."""
    x1, y1, x2, y2 = box
    return (_scale(x1, width), _scale(y1, height), _scale(x2, width), _scale(y2, height))


def _scale(value: int, size: int) -> int:
    return int(round(value * size / SCALE))


def from_pixels(box_px: Sequence[float], width: int, height: int) -> Box:
    """Pixel corners -> thousandths, rounded and clamped to 0-999.

    Rounding to the nearest thousandth makes ``from_pixels(to_pixels(b))`` give `b` back when the
    image is at least 1000 px on that axis (a thousandth then spans a pixel or more); on smaller
    images several thousandths share a pixel, and the other direction, pixels -> thousandths ->
    pixels, is the exact one. The clamp keeps a box that touches the right or bottom edge
    (pixel = width) inside the three-digit range.
    """
    x1, y1, x2, y2 = box_px
    return (_unscale(x1, width), _unscale(y1, height), _unscale(x2, width), _unscale(y2, height))


def _unscale(value: float, size: int) -> int:
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    return min(MAX_COORD, max(0, int(round(value * SCALE / size))))


def box_center(box: Sequence[float]) -> tuple[float, float]:
    """The point CogAgent's executor clicks: the centre of the box (same unit as the box)."""
    x1, y1, x2, y2 = box
    return ((x1 + x2) / 2, (y1 + y2) / 2)


def box_problems(box: Sequence[int]) -> list[str]:
    """Every way `box` breaks the rules (empty when valid): four ints, each 0-999, x1<=x2, y1<=y2.

    Returns messages instead of raising, so that a validator can report all of them at once.
    """
    if len(box) != 4:
        return [f"a box has 4 numbers, got {len(box)}"]
    problems = [f"coordinate {v} outside 0-{MAX_COORD}" for v in box if not 0 <= v <= MAX_COORD]
    x1, y1, x2, y2 = box
    if x1 > x2:
        problems.append(f"x1={x1} > x2={x2} (left edge right of the right edge)")
    if y1 > y2:
        problems.append(f"y1={y1} > y2={y2} (top edge below the bottom edge)")
    return problems


def is_valid_box(box: Sequence[int]) -> bool:
    """True when `box_problems` finds nothing."""
    return not box_problems(box)


def check_box(box: Sequence[int]) -> Box:
    """Return `box` as a tuple, or raise ValueError naming every problem."""
    problems = box_problems(box)
    if problems:
        raise ValueError(f"invalid box {list(box)}: " + "; ".join(problems))
    return tuple(int(v) for v in box)  # type: ignore[return-value]
