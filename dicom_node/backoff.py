"""Retry delays shared by job retries and deliveries: exponential, capped, jittered.

One owner for the rule so a job and a delivery that fail alike wait alike. Plain numbers in,
seconds out; the caller adds the delay to its persisted ``next_attempt_at``.
"""

from __future__ import annotations

import random


def backoff_delay(attempts: int, *, initial_s: float, max_s: float, jitter: float,
                  rng: random.Random) -> float:
    """Delay before the next try after ``attempts`` failed ones.

    ``initial_s`` after the first failure, doubled after each further one, capped at
    ``max_s``, then spread by a uniform factor in ``[1 - jitter, 1 + jitter]`` so that
    work failing together does not retry together.
    """
    if initial_s <= 0 or max_s < initial_s:
        raise ValueError(f"backoff needs 0 < initial_s <= max_s, got {initial_s!r}, {max_s!r}")
    if not 0 <= jitter <= 1:
        raise ValueError(f"backoff jitter must be in [0, 1], got {jitter!r}")
    exponent = min(max(0, attempts - 1), 62)  # 2**62 s is far past any cap: no overflow
    base = min(max_s, initial_s * 2 ** exponent)
    return max(0.0, base * (1 + rng.uniform(-jitter, jitter)))
