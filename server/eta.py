"""A job's ETA: its steps left at a smoothed training speed (pure functions, no state of their own).

The ETA used to be the steps left at the average speed since the attempt's first step, so every
evaluation, word probe or checkpoint write counted as slow training: the ETA rose during one
(28 -> 45 min) and fell back after it. Now only time spent in the ``training`` phase is timed
(:mod:`server.jobs` restarts the clock when a trainer enters it and stops it in every other
phase), and the seconds per step are an exponentially weighted average of the reports' speeds:

- each report's weight grows with the time it covers (``1 - exp(-dt / ETA_TAU_S)``), so a
  trainer that reports every second and one that reports every minute smooth alike;
- one report's speed is clamped to within :data:`MAX_JUMP` of the average first, so a single
  stall (a checkpoint written inside the loop, a swapped-out page) moves the ETA a little, not
  by the stall's length, while a lasting change of speed (Stage 2's encoder unfrozen) is
  followed within a few minutes.
"""

from __future__ import annotations

import math

ETA_TAU_S = 120.0
"""Time constant of the average: a report covering this many seconds moves it 63% of the way."""

MAX_JUMP = 3.0
"""One report's seconds per step count as at most this many times the average (or 1/this)."""


def next_step_seconds(step_s: float | None, elapsed_s: float, steps: int) -> float | None:
    """The average seconds per step after a report of ``steps`` more steps in ``elapsed_s``.

    Parameters
    ----------
    step_s : float or None
        The average so far; ``None`` before the first measurement.
    elapsed_s : float
        Training time since the previous report.
    steps : int
        Steps done since the previous report.

    Returns
    -------
    float or None
        The new average (the report's own speed when there was none); the old one unchanged
        when the report carries no step or no time.
    """
    if steps <= 0 or elapsed_s <= 0:
        return step_s
    sample = elapsed_s / steps
    if step_s is None:
        return sample
    sample = min(max(sample, step_s / MAX_JUMP), step_s * MAX_JUMP)
    weight = 1.0 - math.exp(-elapsed_s / ETA_TAU_S)
    return step_s + weight * (sample - step_s)


def eta_seconds(step_s: float | None, step: int, total: int) -> float | None:
    """Seconds until ``total`` steps at ``step_s`` per step; ``None`` while the speed is unknown."""
    if step_s is None:
        return None
    return round(max(total - step, 0) * step_s, 1)
