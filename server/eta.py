"""A job's ETA: its steps left at a smoothed training speed (pure functions, no state of their own).

The ETA used to be the steps left at the average speed since the attempt's first step, so every
evaluation, word probe or checkpoint write counted as slow training: the ETA rose during one
(28 -> 45 min) and fell back after it. Now only time spent in the ``training`` phase is timed
(:mod:`server.jobs` restarts the clock when a trainer enters it and stops it in every other
phase), and the seconds per step are an exponentially weighted average of the reports' speeds:

- each report's weight grows with the time it covers (``1 - exp(-dt / ETA_TAU_S)``), so a
  trainer that reports every second and one that reports every minute smooth alike; early in
  an attempt, while that weight is below the report's share of the steps measured so far, the
  share is used (a running mean), so the first minutes need not wait for the average to fill;
- one report's speed is clamped to within :data:`MAX_JUMP` of the average first, so a single
  stall (a checkpoint written inside the loop, a swapped-out page) moves the ETA a little, not
  by the stall's length, while a lasting change of speed (Stage 2's encoder unfrozen) is
  followed within a few minutes.
"""

from __future__ import annotations

import math

ETA_TAU_S = 600.0
"""Time constant of the average: reports covering this many seconds move it 63% of the way."""

MAX_JUMP = 1.5
"""One report's seconds per step count as at most this many times the average (or 1/this)."""


def next_step_seconds(step_s: float | None, elapsed_s: float, steps: int, measured_steps: int) -> float | None:
    """The average seconds per step after a report of ``steps`` more steps in ``elapsed_s``.

    Parameters
    ----------
    step_s : float or None
        The average so far; ``None`` before the first measurement.
    elapsed_s : float
        Training time since the previous report.
    steps : int
        Steps done since the previous report.
    measured_steps : int
        Steps timed in this attempt so far, these included.

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
    weight = max(1.0 - math.exp(-elapsed_s / ETA_TAU_S), steps / max(measured_steps, steps))
    return step_s + weight * (sample - step_s)


def eta_seconds(step_s: float | None, step: int, total: int) -> float | None:
    """Seconds until ``total`` steps at ``step_s`` per step; ``None`` while the speed is unknown."""
    if step_s is None:
        return None
    return round(max(total - step, 0) * step_s, 1)
