"""Numerical guards: loss-spike detection over a sliding window of good steps."""

from __future__ import annotations

import math
from collections import deque
from typing import Optional


class SpikeDetector:
    """Flags a loss whose z-score against the last `window` accepted losses exceeds `zscore`.

    Spikes are not added to the window, so a run of spikes keeps being compared with the healthy baseline.
    `streak` counts consecutive spikes (reset by a normal step).
    """

    def __init__(self, window: int, zscore: float, min_history: int = 10):
        self.history: deque[float] = deque(maxlen=window)
        self.zscore, self.min_history = zscore, min(min_history, window)
        self.streak = 0

    def observe(self, loss: float) -> Optional[float]:
        """Returns the z-score if `loss` is a spike, else None (and records it)."""
        if len(self.history) >= self.min_history:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            z = (loss - mean) / max(std, 1e-8 * max(abs(mean), 1.0))
            if z > self.zscore:
                self.streak += 1
                return z
        self.streak = 0
        self.history.append(loss)
        return None

    def state_dict(self) -> dict:
        return {"history": list(self.history), "streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.streak = int(state["streak"])
