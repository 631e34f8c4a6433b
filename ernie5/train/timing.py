"""Phase hooks of the training step: the loop runs each phase of a step through a timer object.

The default timer just calls the function. A measuring tool (`ernie5 bench`) passes its own object with the
same `run` method to time, profile or capture the phases, without replacing any of the trainer's names.

Phases, in the order a step runs them:
- `step`: one whole `train_step()` as called by `train()`;
- `data`: building one micro-batch (read, pack, to tensors);
- `loss`: the forward pass and loss of one micro-batch (the task's `loss`);
- `backward`: autograd of one micro-batch's scaled loss;
- `sync`, `grad_norm`, `clip`: gradient all-reduce, the global norm, the clip factor;
- `optimizer`: the AdamW step and clearing the gradients;
- `algorithm`: the router bias update and the router orthogonal step after the optimizer step;
- `objective`: the task's end-of-step bookkeeping (posterior weighting);
- `callbacks`: every callback after a step (logging, evaluation, checkpoints).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

PHASES = ("step", "data", "loss", "backward", "sync", "grad_norm", "clip", "optimizer", "algorithm", "objective",
          "callbacks")


class StepTimer(Protocol):
    def run(self, phase: str, fn: Callable, *args, **kwargs) -> Any:
        """Call `fn(*args, **kwargs)` as phase `phase` and return its result."""


class NoTimer:
    """Runs every phase as is."""

    def run(self, phase: str, fn: Callable, *args, **kwargs) -> Any:
        return fn(*args, **kwargs)


NO_TIMER = NoTimer()
