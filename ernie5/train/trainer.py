"""The training loop: steps, the optimizer step (with its router updates), guards, signals, callbacks.

The loop hands its work to components built from the resolved run config:
- a task (`ernie5.train.tasks`): loaders, micro-batches, the loss, the held-out loss, FLOPs per token and the
  workload's own state;
- a `ParallelRuntime`: gradient sync, norm, clipping, AdamW, sharded optimizer state;
- `RouterUpdates` (`ernie5.train.algorithm`): the aux-free bias and router orthogonal steps, run after every
  applied optimizer step;
- a `Checkpointer`: saving and restoring the stateful parts for resume and rollback;
- a `FaultInjector` (tests only) and a step timer (`ernie5.train.timing`, used by `ernie5 bench`);
- callbacks (`ernie5.train.callbacks`) for what is observed or written after a step.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import paddle
from tqdm import tqdm

from ernie5.elastic.sampler import build_sampler
from ernie5.constants import NUM_MODALITIES
from ernie5.errors import TrainingError
from ernie5.model.mixed_precision import autocast, enable_bf16
from ernie5.model.moe import ExpertPlacement
from ernie5.model.transformer import build_model, count_params
from ernie5.optim.schedule import lr_at
from ernie5.model.pipeline import build_stage
from ernie5.parallel.expert_parallel import ExpertParallelDispatcher
from ernie5.parallel.runtime import ParallelRuntime
from ernie5.parallel.topology import init_topology
from ernie5.plan import flops_per_token
from ernie5.plan.layout import chunk_sizes
from ernie5.precision.bf16 import notice_once as bf16_notice_once
from ernie5.precision.fp8_linear import notice_once
from ernie5.runconfig import RunConfig
from ernie5.train.algorithm import RouterUpdates
from ernie5.train.callbacks import Callback, Evaluator, MetricsLogger, PeriodicCheckpoint, RoutingStats
from ernie5.train.checkpointer import Checkpointer
from ernie5.train.faults import FaultInjector
from ernie5.train.guards import SpikeDetector
from ernie5.train.perf import measure_gemm_gflops
from ernie5.train.pipelined import pipeline_eval, pipeline_micro_batches
from ernie5.train.resolve import check_determinism, resolve_run_config
from ernie5.train.run_log import RunLog
from ernie5.train.tasks import build_task
from ernie5.train.timing import NO_TIMER, StepTimer


def finite_or_none(x: float):
    return x if math.isfinite(x) else None


class Trainer:
    """Builds everything a run needs from a RunConfig and trains to `train.max_steps` (resuming if it can).

    `cfg` is not changed: the trainer resolves a copy (`self.cfg`, sizes from the data) and saves that one.
    `timer`: an object whose `run(phase, fn, *args)` the loop calls around each phase of a step.
    """

    def __init__(self, cfg: RunConfig, callbacks: Optional[list[Callback]] = None, quiet: bool = False,
                 timer: Optional[StepTimer] = None):
        self.quiet = quiet
        self.timer = timer or NO_TIMER
        self.topo = init_topology(cfg.parallel)
        self.rank, self.world = self.topo.dp_rank, self.topo.dp  # data sharding
        self.is_main = self.topo.is_main
        check_determinism(cfg)
        self.cfg = cfg = resolve_run_config(cfg)
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.out / "checkpoints"
        self.log = RunLog(self.out, self.is_main)
        self.task = build_task(cfg, self.rank, self.world, notice=self._source_epoch)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)  # a text token's (ernie5.plan.params)
        self._peak_gflops: Optional[float] = None
        self._peak_probed_at = 0  # step of the last re-measurement (see `_mfu`)
        with paddle.utils.unique_name.guard():  # stable parameter names -> stable optimizer-state keys
            pipe = self.topo.pipe
            stage = build_stage(cfg.model.num_layers, pipe.size, pipe.stage, cfg.parallel.virtual_pipeline,
                                chunk_sizes(cfg)) if pipe is not None else None
            self.model = build_model(cfg.model, seed=cfg.run.seed, recompute=cfg.recompute,
                                     placement=self._expert_placement(), fp8=cfg.precision.fp8, tp=self.topo.tp,
                                     stage=stage)
        if cfg.precision.dtype == "bf16":
            enable_bf16(self.model, cfg.precision)
        if self.is_main:
            notice_once(cfg.precision.fp8.enabled)
            bf16_notice_once(cfg.precision.dtype == "bf16")
        self.runtime = ParallelRuntime(self.model, cfg.optim, self.topo)
        self.algorithm = RouterUpdates(cfg.model.moe, cfg.optim.router_lr_ratio, self.reduce_counts)
        self.faults = FaultInjector(cfg.faults, self.topo.rank)
        self.checkpointer = Checkpointer(self.ckpt_root, self.topo, cfg.checkpoint, self.faults.checkpoint_pause_s)
        self.step = 0
        self.bad_streak = 0
        self.last_saved_step = -1
        self.rollbacks = 0
        self.spikes = SpikeDetector(cfg.train.spike_window, cfg.train.spike_zscore)
        self.elastic = build_sampler(cfg)  # None unless elastic.enabled: every micro-step trains the full model
        self.callbacks = callbacks if callbacks is not None else self.default_callbacks()
        self._bar = None
        self._signal = None
        self.stopped_by = None
        self.resumed_from = self._maybe_resume()
        if self.is_main:
            tmp = self.out / "config.yaml.tmp"
            tmp.write_text(cfg.to_yaml(), encoding="utf-8")
            tmp.replace(self.out / "config.yaml")

    # ---- setup -------------------------------------------------------------------------------------------
    def default_callbacks(self) -> list[Callback]:
        return [RoutingStats(self.out), Evaluator(), MetricsLogger(self.out, self.cfg.train.visualdl),
                PeriodicCheckpoint()]

    def _expert_placement(self) -> Optional[ExpertPlacement]:
        topo, E = self.topo, self.cfg.model.moe.num_experts
        if topo.ep == 1 or E == 0:
            return None
        return ExpertPlacement(topo.local_experts(E),
                               ExpertParallelDispatcher(E, topo.ep, topo.ep_rank, topo.ep_group,
                                                        native_alltoall=topo.backend == "nccl"))

    @property
    def peak_gflops(self) -> float:
        """This machine's measured fp32 GEMM rate (the MFU denominator), measured once on first use."""
        if self._peak_gflops is None:
            self._peak_gflops = measure_gemm_gflops()
        return self._peak_gflops

    @peak_gflops.setter
    def peak_gflops(self, value: float) -> None:
        self._peak_gflops = value

    def _mfu(self, achieved_gflops: float) -> float:
        """achieved / peak. A step faster than the peak means the peak was probed while a neighbour shared the
        cores: probe again (at most every 50 steps) and keep the highest rate seen, so the denominator recovers
        once the host is quiet; the MFU is relative to the fastest GEMM rate measured during the run. Only in
        one process: ranks deciding apart would stall each other's collectives."""
        if (achieved_gflops > self.peak_gflops and self.step - self._peak_probed_at >= 50
                and not self.topo.distributed):
            self._peak_probed_at = self.step
            self._peak_gflops = max(self._peak_gflops, measure_gemm_gflops())
        return achieved_gflops / self.peak_gflops

    def reduce_counts(self, counts: np.ndarray) -> np.ndarray:
        """Sum expert loads over the ranks that routed different tokens: the data-parallel ranks, and their
        tensor-parallel ranks under sequence parallelism (identity in one process)."""
        return self.topo.sum_over_token_ranks(counts)

    def routing_counts(self, attr: str) -> np.ndarray:
        """[L, ...] `attr` (`step_counts` or `modality_counts`) of every MoE layer of the model, summed over the
        ranks that routed different tokens and gathered from every pipeline stage (the same on every rank)."""
        m = self.cfg.model
        ids = [i for i in range(m.num_layers) if m.is_moe_layer(i)]
        out = None
        for block_id, block in enumerate(self.model.layers):
            if getattr(block, "present", True) and block.is_moe:
                counts = self.reduce_counts(getattr(block.mlp, attr))
                out = np.zeros((len(ids),) + counts.shape, counts.dtype) if out is None else out
                out[ids.index(block_id)] = counts
        if self.topo.pipe is not None:
            E = m.moe.total_experts
            shape = (len(ids), E) if attr == "step_counts" else (len(ids), NUM_MODALITIES, E)
            out = self.topo.sum_array(out if out is not None else np.zeros(shape, np.int64),
                                      group=self.topo.pipe.group)
        return out

    def event(self, kind: str, **fields) -> None:
        """Record something a person should know about (skips, spikes, rollbacks, signals) in events.jsonl."""
        self.log.event(self.step, kind, warn=not self.quiet, **fields)

    # ---- checkpoints -------------------------------------------------------------------------------------
    def _stateful(self) -> dict:
        """The parts a checkpoint saves besides weights, optimizer state and counters (restored in this order)."""
        parts = {"spikes": self.spikes}
        if self.elastic is not None:
            parts["elastic"] = self.elastic
        parts.update(self.task.stateful())
        parts["loader"] = self.task.train_loader
        return parts

    def save_checkpoint(self) -> Path:
        counters = {"step": self.step, "bad_streak": self.bad_streak, "rollbacks": self.rollbacks,
                    "total_params": count_params(self.model)}
        self.last_saved_step = self.step
        return self.checkpointer.save(self.step, self.runtime, self._stateful(), counters, self.cfg.to_yaml())

    def load_checkpoint(self, path: Path) -> None:
        # checkpoints from before spike detection was saved start it empty
        state = self.checkpointer.restore(path, self.runtime, self.model, self._stateful(),
                                          defaults={"spikes": {"history": [], "streak": 0}})
        self.step = self.last_saved_step = int(state["step"])
        self.bad_streak = int(state.get("bad_streak", 0))
        self.rollbacks = max(self.rollbacks, int(state.get("rollbacks", 0)))  # the budget survives resume

    def _maybe_resume(self) -> Optional[Path]:
        """Load the newest valid checkpoint (if resuming); drop logged steps that will be redone."""
        path = self.checkpointer.find_resume() if self.cfg.checkpoint.resume else None
        if path is not None:
            self.load_checkpoint(path)
        self.log.truncate(self.step)  # steps past the checkpoint (all of them on a fresh start) will be redone
        if path is not None:
            self.event("resumed", checkpoint=str(path))
        return path

    def rollback(self) -> None:
        """Reload the newest checkpoint but keep the data position: the batches that spiked are skipped."""
        path = self.checkpointer.agreed_latest(warn=lambda msg: print(msg, file=sys.stderr) if self.is_main else None)
        if path is None:
            self.event("rollback_unavailable", reason="no checkpoint yet")
            return
        self.rollbacks += 1
        if self.rollbacks > self.cfg.train.max_rollbacks:
            raise TrainingError(f"the loss keeps spiking after {self.cfg.train.max_rollbacks} rollbacks "
                                f"(last at step {self.step}); newest checkpoint: {path}")
        loader = self.task.train_loader
        position, from_step = loader.position, self.step
        self.load_checkpoint(path)
        skipped_rows = position - loader.position
        loader.position = position
        self.spikes.streak = 0
        self.log.truncate(self.step)  # the steps after the checkpoint are redone: their log lines go
        self.event("rollback", from_step=from_step, checkpoint=str(path), skipped_rows=skipped_rows)

    # ---- steps -------------------------------------------------------------------------------------------
    def _clear_routing_counts(self) -> None:
        for layer in self.model.moe_layers():
            layer.step_counts[:] = 0
            layer.modality_counts[:] = 0

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum_steps` micro-batches. Returns the step's metrics.

        A non-finite loss or gradient skips the update (parameters, optimizer and router biases untouched);
        the step's data is still consumed so the data order does not depend on where faults happened.
        """
        cfg, accum, run = self.cfg, self.cfg.train.grad_accum_steps, self.timer.run
        self.faults.at_step_start(self.step + 1)
        start = time.perf_counter()
        self._clear_routing_counts()  # expert loads of this step only (the bias update reads them)
        terms: dict[str, float] = {}
        total, bad = 0.0, None
        if self.topo.pipe is not None:
            total, terms, bad = pipeline_micro_batches(self, accum)
        for mb in range(accum if self.topo.pipe is None else 0):
            batch = run("data", self.task.batch, self.task.train_loader)
            if bad is not None and not self.topo.distributed:
                continue  # (with several ranks every micro-batch runs: forward may hold collectives)
            sub = self.elastic.sample(self.step + 1, mb) if self.elastic is not None else None
            with autocast(cfg.precision):  # AMP O2 bf16 on GPU builds; nothing on CPU
                out = run("loss", self.task.loss, self.model, batch, sub)
            loss = self.faults.poison_loss(out.total, self.step + 1, mb)
            value = float(loss)
            if self.topo.any(not math.isfinite(value) or bad is not None):  # every rank decides the same
                bad = bad or {"reason": "non-finite loss" if not math.isfinite(value) else
                              "non-finite loss on another rank", "micro_batch": mb}
                continue
            run("backward", (loss / accum).backward)
            total += value / accum
            if self.elastic is not None:
                self.elastic.record_loss(value)
            for k, v in out.terms.items():
                terms[k] = terms.get(k, 0.0) + v / accum
        grad_norm = float("nan")
        if bad is None:
            run("sync", self.runtime.sync_grads)
            grad_norm = run("grad_norm", self.runtime.grad_norm)  # after sync: identical on every rank
            if not math.isfinite(grad_norm):
                bad = {"reason": "non-finite gradient"}
        self.step += 1
        lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
        if bad is None:
            if cfg.optim.grad_clip and grad_norm > cfg.optim.grad_clip:
                run("clip", self.runtime.clip, cfg.optim.grad_clip / (grad_norm + 1e-6))
            run("optimizer", self.runtime.step, lr)
        run("optimizer", self.runtime.clear_grad)
        router_metrics = run("algorithm", self.algorithm.after_step, self.model, lr) if bad is None else {}
        run("objective", self.task.finish_step, bad is None, self.topo.sum_over_data_and_stages)
        if bad is None and self.topo.distributed:  # log the mean over data-parallel ranks
            keys = sorted(terms)
            means = self.topo.sum_array(np.array([total] + [terms[k] for k in keys])) / self.topo.dp
            total, terms = float(means[0]), {k: float(v) for k, v in zip(keys, means[1:])}
        elapsed = time.perf_counter() - start
        tokens = accum * cfg.train.micro_batch_size * cfg.data.seq_len * self.world
        metrics = {"step": self.step, "loss": total if bad is None else None, **terms, "lr": lr,
                   "grad_norm": finite_or_none(grad_norm), "step_time_s": elapsed, "tokens_per_s": tokens / elapsed,
                   "mfu": self._mfu(tokens / elapsed * self.flops_per_token / 1e9)}
        metrics.update(self.task.data_metrics())  # tokens seen per source
        if self.elastic is not None:  # which sub-model each micro-step trained, loss per sub-model kind
            metrics.update(self.elastic.step_metrics())
        metrics.update(router_metrics)
        if bad is not None:
            metrics["skipped"] = True
            self.event("skipped_step", **bad)
        return metrics

    def _guard(self, m: dict) -> None:
        """Count bad steps (abort after too many in a row), detect loss spikes, roll back if configured."""
        t = self.cfg.train
        if m.get("skipped"):
            self.bad_streak += 1
            if self.bad_streak >= t.max_bad_steps:
                raise TrainingError(f"{self.bad_streak} consecutive steps with non-finite loss or gradients "
                                    f"(last: step {self.step}); last checkpoint: "
                                    f"{self.checkpointer.latest_valid() or 'none'}")
            return
        self.bad_streak = 0
        z = self.spikes.observe(m["loss"])
        if z is None:
            return
        m["loss_spike_z"] = z
        self.event("loss_spike", loss=round(m["loss"], 5), zscore=round(z, 2))
        if t.spike_rollback_after and self.spikes.streak >= t.spike_rollback_after:
            self.rollback()
            m["skipped"] = m["rolled_back"] = True

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum
        # a second Ctrl-C / SIGTERM acts at once; the checkpoint on disk is always complete
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    @paddle.no_grad()
    def evaluate(self) -> Optional[dict]:
        """The task's held-out loss, overall and per source, over the first `train.eval_batches` micro-batches of
        each source: {"val_loss": ..., "val_loss/<source>": ...} (None: no held-out data)."""
        if not self.task.val_loaders:
            return None
        self.model.eval()
        try:
            mean_of = (lambda batches: pipeline_eval(self, batches)) if self.topo.pipe is not None else None
            with autocast(self.cfg.precision):
                return self.task.eval_losses(self.model, self.cfg.train.eval_batches, mean_of)
        finally:
            self.model.train()

    def _source_epoch(self, name: str, epoch: int) -> None:
        self.event("source_epoch", source=name, epoch=epoch,
                   message=f"data source {name!r} ran out of rows and starts epoch {epoch}")

    def report(self, m: dict) -> None:
        """Human-facing progress: the tqdm bar's postfix, or one line per log step when there is no bar."""
        loss = "skipped" if m["loss"] is None else f"{m['loss']:.4f}"
        if self._bar is not None:
            self._bar.set_postfix(loss=loss, lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")
        elif not self.quiet:
            val = f" val {m['val_loss']:.4f}" if m.get("val_loss") is not None else ""
            grad = "-" if m["grad_norm"] is None else f"{m['grad_norm']:.3f}"
            print(f"step {m['step']:>6}/{self.cfg.train.max_steps} loss {loss}{val} lr {m['lr']:.2e} "
                  f"grad {grad} tok/s {m['tokens_per_s']:.0f} mfu {m['mfu']:.3f}", flush=True)

    def _after_step(self, m: dict) -> None:
        for cb in self.callbacks:
            cb.on_step_end(self, m)

    def train(self) -> list[dict]:
        """Run to max_steps (or until SIGTERM/SIGINT: then checkpoint and return); returns the logged metrics."""
        cfg = self.cfg
        _ = self.peak_gflops  # measured before the first step, so no step times it
        self.model.train()
        show_bar = cfg.train.progress_bar and not self.quiet and sys.stderr.isatty()
        self._bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train", unit="step") if show_bar else None
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        logged = []
        try:
            stop = False
            while self.step < cfg.train.max_steps and not stop:
                m = self.timer.run("step", self.train_step)
                self._guard(m)
                if m.get("skipped"):  # a skipped step's loads count nowhere
                    self._clear_routing_counts()
                m["log"] = (m["step"] % cfg.train.log_interval == 0 or m["step"] == cfg.train.max_steps) \
                    and not m.get("rolled_back")
                self.timer.run("callbacks", self._after_step, m)
                if m["log"]:
                    logged.append({k: v for k, v in m.items() if k != "log"})
                if self._bar is not None:
                    self._bar.update(1)
                stop = self.topo.any(self._signal is not None)  # a signal to any rank stops all of them
            if stop:
                self.stopped_by = signal.Signals(self._signal).name if self._signal else "a signal to another rank"
                if self.last_saved_step != self.step:
                    self.save_checkpoint()
                self.event("stopped", signal=self.stopped_by)
            for cb in self.callbacks:
                cb.on_train_end(self)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            if self._bar is not None:
                self._bar.close()
        return logged
