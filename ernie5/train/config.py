"""Trainer, optimizer, schedule, checkpoint and logging configs (paddle-free)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ernie5.config.schema import join, require


@dataclass
class TrainConfig:
    """The loop: steps, batch geometry, evaluation and logging cadence."""

    max_steps: int = 100
    micro_batch_size: int = 4  # rows per micro-batch per data-parallel rank
    grad_accum_steps: int = 1
    log_interval: int = 1
    eval_interval: int = 0  # 0: no periodic held-out evaluation
    eval_batches: int = 4
    progress_bar: bool = True
    visualdl: bool = False  # also write VisualDL scalars to run.output_dir/visualdl
    max_bad_steps: int = 3  # abort after this many consecutive steps with a non-finite loss or gradient
    spike_window: int = 50  # loss-spike detection: z-score of the loss against the last N good steps
    spike_zscore: float = 6.0
    spike_rollback_after: int = 0  # > 0: after this many consecutive spikes, reload the last checkpoint and
    #                                skip the data that caused them (0: only log spikes)
    max_rollbacks: int = 5  # abort if the loss keeps spiking after this many rollbacks in one invocation

    def validate(self, path: str) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_interval", "eval_batches"):
            require(getattr(self, name) >= 1, join(path, name), f"{getattr(self, name)} must be >= 1")
        require(self.eval_interval >= 0, join(path, "eval_interval"), "must be >= 0")
        require(self.max_bad_steps >= 1, join(path, "max_bad_steps"), "must be >= 1")
        require(self.spike_window >= 2, join(path, "spike_window"), "must be >= 2")
        require(self.spike_zscore > 0, join(path, "spike_zscore"), "must be > 0")
        require(self.spike_rollback_after >= 0, join(path, "spike_rollback_after"), "must be >= 0")
        require(self.max_rollbacks >= 1, join(path, "max_rollbacks"), "must be >= 1")


@dataclass
class CheckpointConfig:
    """Atomic step checkpoints under run.output_dir/checkpoints; resume picks the newest complete one."""

    interval: int = 0  # 0: only at the end of training
    keep_last: int = 3
    resume: bool = True
    # load legacy pickle checkpoints (model.pdparams / optimizer.pdopt / rng.pkl): unpickling can run arbitrary
    # code, so only for checkpoints from a trusted source
    allow_pickle: bool = False

    def validate(self, path: str) -> None:
        require(self.interval >= 0, join(path, "interval"), "must be >= 0")
        require(self.keep_last >= 1, join(path, "keep_last"), "must be >= 1")


@dataclass
class FaultsConfig:
    """Fault injection for reliability tests (leave empty in real runs)."""

    nan_loss_steps: list[int] = field(default_factory=list)  # poison the loss of these steps (1-based) ...
    nan_micro_batch: int = 0  # ... in this micro-batch
    spike_loss_steps: list[int] = field(default_factory=list)  # multiply the loss of these steps by 50 (once each)
    slow_checkpoint_s: float = 0.0  # sleep after each checkpoint file: widens the window for kill-mid-save tests
    crash_rank: int = -1  # this rank dies (os._exit) at the start of step `crash_at_step` (rank-failure tests)
    crash_at_step: int = 0

    def validate(self, path: str) -> None:
        require(self.nan_micro_batch >= 0, join(path, "nan_micro_batch"), "must be >= 0")
        require(self.slow_checkpoint_s >= 0, join(path, "slow_checkpoint_s"), "must be >= 0")
