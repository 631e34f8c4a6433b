"""Fault injection for reliability tests (`faults:` in the run config), applied where the loop calls it:

- `at_step_start`: a chosen rank dies without cleanup at the start of a chosen step (as on a hardware fault);
- `poison_loss`: NaN in one micro-batch's loss, or a 50x loss spike (once per step number: a rollback
  replays the step number on other data);
- `checkpoint_pause_s`: a pause after every checkpoint file, widening the kill-mid-save window.

With the default (empty) config every call leaves things as they are.
"""

from __future__ import annotations

import os

from ernie5.train.config import FaultsConfig

CRASH_EXIT_CODE = 17


class FaultInjector:
    def __init__(self, cfg: FaultsConfig, rank: int):
        self.cfg, self.rank = cfg, rank
        self._spiked: set[int] = set()

    @property
    def checkpoint_pause_s(self) -> float:
        return self.cfg.slow_checkpoint_s

    def at_step_start(self, step: int) -> None:
        """`step`: the 1-based number of the step about to run."""
        if self.cfg.crash_rank == self.rank and self.cfg.crash_at_step == step:
            os._exit(CRASH_EXIT_CODE)

    def poison_loss(self, loss, step: int, micro_batch: int):
        """The loss of micro-batch `micro_batch` of step `step` (1-based), with any configured fault applied."""
        if step in self.cfg.nan_loss_steps and micro_batch == self.cfg.nan_micro_batch:
            loss = loss * float("nan")
        if step in self.cfg.spike_loss_steps and step not in self._spiked:
            self._spiked.add(step)
            loss = loss * 50.0
        return loss
