"""The training loop: micro-batches with gradient accumulation, clipping, AdamW, callbacks, exact resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import paddle
from tqdm import tqdm

from ernie5.runconfig import RunConfig
from ernie5.data.loader import PackedLoader, SyntheticLoader
from ernie5.data.shards import open_split, read_meta
from ernie5.elastic.sampler import build_sampler
from ernie5.errors import TrainingError, UserError
from ernie5.model.moe import ExpertPlacement
from ernie5.model.transformer import build_model, count_params, to_tensor_batch
from ernie5.parallel.expert_parallel import ExpertParallelDispatcher
from ernie5.parallel.runtime import ParallelRuntime
from ernie5.parallel.topology import init_topology
from ernie5.precision.fp8_linear import notice_once
from ernie5.objectives.text import make_text_batch, text_loss
from ernie5.objectives.unified import MODALITY_TERMS, UnifiedObjective
from ernie5.plan import flops_per_token
from ernie5.train import checkpoint as ckpt
from ernie5.train.callbacks import (AuxFreeBiasUpdate, Callback, Checkpointer, Evaluator, MetricsLogger,
                                    RouterOrthogonalStep, RoutingStats)
from ernie5.train.guards import SpikeDetector
from ernie5.optim.schedule import lr_at
from ernie5.train.perf import measure_gemm_gflops
from ernie5.train.unified_data import UnifiedBatches, is_multimodal_shard, resolve_multimodal


_DETERMINISM_FLAGS = ("FLAGS_cudnn_deterministic", "FLAGS_embedding_deterministic")


def check_determinism(cfg: RunConfig) -> None:
    """`run.deterministic` on a CUDA build needs paddle's determinism flags, which paddle reads at import.

    CPU kernels here are deterministic already (same config + seed -> bit-identical losses, tested).
    """
    if cfg.run.deterministic and paddle.is_compiled_with_cuda():
        for flag in _DETERMINISM_FLAGS:
            if os.environ.get(flag, "").lower() not in ("1", "true"):
                raise UserError("run.deterministic", f"export {flag}=1 before launching (paddle reads it at import)")


def finite_or_none(x: float):
    return x if math.isfinite(x) else None


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records past `last_step` (steps a resumed run will redo), atomically."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def resolve_vocab(cfg: RunConfig) -> None:
    """Fill model.vocab_size from the prepared shards (or check it covers them)."""
    if cfg.data.synthetic:
        if cfg.model.vocab_size is None:
            raise UserError("model.vocab_size", "must be set when data.synthetic is true")
        return
    if is_multimodal_shard(cfg.data.dir):
        resolve_multimodal(cfg, read_meta(cfg.data.dir))
        return
    vocab = int(read_meta(cfg.data.dir)["vocab_size"])
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise UserError("model.vocab_size", f"{cfg.model.vocab_size} < tokenizer vocabulary {vocab}")


class Trainer:
    """Builds everything a run needs from a RunConfig and trains to `train.max_steps` (resuming if it can)."""

    def __init__(self, cfg: RunConfig, callbacks: Optional[list[Callback]] = None, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        self.topo = init_topology(cfg.parallel)
        self.rank, self.world = self.topo.dp_rank, self.topo.dp  # data sharding
        self.is_main = self.topo.is_main
        check_determinism(cfg)
        resolve_vocab(cfg)
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.out / "checkpoints"
        self.unified = None  # UnifiedBatches when data.dir holds multimodal shards
        if cfg.model.multimodal.enabled:
            self.unified = UnifiedBatches(cfg, self.rank, self.world)
            self.objective = UnifiedObjective(cfg.objective, cfg.model.mtp.loss_weight, cfg.data.seq_len)
            self.train_loader, self.val_loader = self.unified.train, self.unified.val
        else:
            cfg.objective.check_text_only("objective")
            self.train_loader, self.val_loader = self._loaders()
        # token-balanced text loss: C tokens per row (0: plain masked means)
        self.balance_length = (cfg.objective.token_balance_length or cfg.data.seq_len) \
            if cfg.objective.token_balanced else 0
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self._peak_gflops: Optional[float] = None
        with paddle.utils.unique_name.guard():  # stable parameter names -> stable optimizer-state keys
            self.model = build_model(cfg.model, seed=cfg.run.seed, recompute=cfg.recompute,
                                     placement=self._expert_placement(), fp8=cfg.precision.fp8)
        if self.is_main:
            notice_once(cfg.precision.fp8.enabled)
        self.runtime = ParallelRuntime(self.model, cfg.optim, self.topo)
        self.step = 0
        self.bad_streak = 0
        self.last_saved_step = -1
        self.spikes = SpikeDetector(cfg.train.spike_window, cfg.train.spike_zscore)
        self.elastic = build_sampler(cfg)  # None unless elastic.enabled: every micro-step trains the full model
        self.callbacks = callbacks if callbacks is not None else self.default_callbacks()
        self._bar = None
        self._signal = None
        self.stopped_by = None
        self.rollbacks = 0
        self._spiked: set[int] = set()
        self.resumed_from = self._maybe_resume()
        if self.is_main:
            tmp = self.out / "config.yaml.tmp"
            tmp.write_text(cfg.to_yaml(), encoding="utf-8")
            tmp.replace(self.out / "config.yaml")

    # ---- setup -------------------------------------------------------------------------------------------
    def _loaders(self):
        d, t = self.cfg.data, self.cfg.train
        seed = self.cfg.run.seed
        if d.synthetic:
            return (SyntheticLoader(self.cfg.model.vocab_size, d.seq_len, t.micro_batch_size, seed, self.rank,
                                    self.world),
                    SyntheticLoader(self.cfg.model.vocab_size, d.seq_len, t.micro_batch_size, seed + 1))
        train = PackedLoader(open_split(d.dir, "train"), d.seq_len, t.micro_batch_size, seed, self.rank, self.world,
                             where=f"{d.dir} (train split)")
        val_split = open_split(d.dir, "val")
        val = (PackedLoader(val_split, d.seq_len, t.micro_batch_size, seed, shuffle=False, where=f"{d.dir} (val)")
               if val_split.tokens.shape[0] > d.seq_len else None)
        return train, val

    def default_callbacks(self) -> list[Callback]:
        return [AuxFreeBiasUpdate(), RouterOrthogonalStep(), RoutingStats(self.out), Evaluator(),
                MetricsLogger(self.out, self.cfg.train.visualdl), Checkpointer()]

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

    def reduce_counts(self, counts: np.ndarray) -> np.ndarray:
        """Sum expert loads over the data-parallel ranks (identity in one process)."""
        return self.topo.sum_array(counts)

    # ---- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "loader": self.train_loader.state_dict(), "bad_streak": self.bad_streak,
                 "rollbacks": self.rollbacks,
                 "spikes": self.spikes.state_dict(), "total_params": count_params(self.model)}
        if self.elastic is not None:
            state["elastic"] = self.elastic.state_dict()
        if self.unified is not None:
            state["objective"] = self.objective.state_dict()
        self.last_saved_step = self.step
        r, pause = self.topo.rank, self.cfg.faults.slow_checkpoint_s
        writers = {ckpt.rank_file("model", ckpt.TENSORS, r): ckpt.save_tensors(self.runtime.model_state()),
                   ckpt.rank_file("optimizer", ckpt.TENSORS, r): ckpt.save_tensors(self.runtime.optimizer_state())}
        if self.is_main:
            writers.update({"trainer_state.json": ckpt.save_json(state),
                            ckpt.RNG_FILE: ckpt.save_rng(),
                            "config.yaml": ckpt.save_text(self.cfg.to_yaml())})
        if not self.topo.distributed:
            return ckpt.write_checkpoint(self.ckpt_root, self.step, writers, self.cfg.checkpoint.keep_last, pause)
        # every rank writes its share into one temp dir; rank 0 adds the manifest and publishes it
        final = self.ckpt_root / ckpt.step_dir_name(self.step)
        tmp = self.ckpt_root / f".tmp-{final.name}-dist"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.topo.barrier()
        ckpt.write_files(tmp, writers, pause)
        self.topo.barrier()
        if self.is_main:
            ckpt.finalize_checkpoint_dir(tmp, final, self.step)
            ckpt.prune_checkpoints(self.ckpt_root, self.cfg.checkpoint.keep_last)
        self.topo.barrier()
        return final

    def load_checkpoint(self, path: Path) -> None:
        trust = self.cfg.checkpoint.allow_pickle  # legacy pickle files only with the user's opt-in
        weights = self.runtime.local_model_state(ckpt.load_model_weights(path, trust), str(path))
        ckpt.apply_model_state(self.model, weights, str(path))
        self.runtime.load_optimizer_state(ckpt.load_merged(path, "optimizer", trust))
        state = ckpt.json_load(path / "trainer_state.json")
        self.step = self.last_saved_step = int(state["step"])
        self.bad_streak = int(state.get("bad_streak", 0))
        self.rollbacks = max(self.rollbacks, int(state.get("rollbacks", 0)))  # the budget survives resume
        self.spikes.load_state_dict(state.get("spikes", {"history": [], "streak": 0}))
        if self.elastic is not None and "elastic" in state:
            self.elastic.load_state_dict(state["elastic"])
        if self.unified is not None and "objective" in state:
            self.objective.load_state_dict(state["objective"])
        self.train_loader.load_state_dict(state["loader"])
        ckpt.load_rng(path, trust)

    def _maybe_resume(self) -> Optional[Path]:
        """Load the newest valid checkpoint (if resuming); drop logged steps that will be redone."""
        path = None
        if self.cfg.checkpoint.resume:
            if self.is_main:
                ckpt.clean_partial(self.ckpt_root)
            self.topo.barrier()
            problems: list[str] = []
            path = self._agreed_checkpoint(problems.append)
            existing = ckpt.list_checkpoints(self.ckpt_root)
            if path is None and existing:
                newest = ckpt.verify_checkpoint(existing[-1])
                raise UserError(str(self.ckpt_root), f"all {len(existing)} checkpoints are corrupted (newest: "
                                                     f"{newest}); refusing to start over on top of them (move them "
                                                     "away, or use another run.output_dir)")
            for line in problems if self.is_main else []:
                print(line, file=sys.stderr)
            if path is not None:
                self.load_checkpoint(path)
        if self.is_main:  # steps past the checkpoint (all of them on a fresh start) will be redone
            for name in ("metrics.jsonl", "routing.jsonl"):
                truncate_jsonl(self.out / name, self.step)
            if path is not None:
                self.event("resumed", checkpoint=str(path))
        return path

    def _agreed_checkpoint(self, warn) -> Optional[Path]:
        """The newest valid checkpoint as rank 0 sees it, on every rank (each rank verifying on its own could
        pick different ones, e.g. while a file is being replaced on a shared file system)."""
        path = ckpt.latest_valid_checkpoint(self.ckpt_root, warn=warn)
        chosen = self.topo.broadcast_int(int(path.name[5:]) if path is not None else -1)
        return self.ckpt_root / ckpt.step_dir_name(chosen) if chosen >= 0 else None

    def event(self, kind: str, **fields) -> None:
        """Record something a person should know about (skips, spikes, rollbacks, signals) in events.jsonl."""
        record = {"step": self.step, "event": kind, **fields}
        if self.is_main:
            with open(self.out / "events.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if kind != "resumed" and not self.quiet and self.is_main:
            detail = ", ".join(f"{k}={v}" for k, v in fields.items())
            print(f"warning: step {self.step}: {kind}" + (f" ({detail})" if detail else ""), file=sys.stderr)

    def rollback(self) -> None:
        """Reload the newest checkpoint but keep the data position: the batches that spiked are skipped."""
        path = self._agreed_checkpoint(warn=lambda msg: print(msg, file=sys.stderr) if self.is_main else None)
        if path is None:
            self.event("rollback_unavailable", reason="no checkpoint yet")
            return
        self.rollbacks += 1
        if self.rollbacks > self.cfg.train.max_rollbacks:
            raise TrainingError(f"the loss keeps spiking after {self.cfg.train.max_rollbacks} rollbacks "
                                f"(last at step {self.step}); newest checkpoint: {path}")
        position, from_step = self.train_loader.position, self.step
        self.load_checkpoint(path)
        skipped_rows = position - self.train_loader.position
        self.train_loader.position = position
        self.spikes.streak = 0
        if self.is_main:  # the steps after the checkpoint are redone: their log lines go
            for name in ("metrics.jsonl", "routing.jsonl"):
                truncate_jsonl(self.out / name, self.step)
        self.event("rollback", from_step=from_step, checkpoint=str(path), skipped_rows=skipped_rows)

    # ---- steps -------------------------------------------------------------------------------------------
    def _micro_batch(self, loader, train: bool = True) -> dict:
        if self.unified is not None:
            return self.unified.batch(loader, train)
        tokens, segments = loader.next()
        return to_tensor_batch(make_text_batch(tokens, segments, self.cfg.model.mtp.depth))

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum_steps` micro-batches. Returns the step's metrics.

        A non-finite loss or gradient skips the update (parameters, optimizer and router biases untouched);
        the step's data is still consumed so the data order does not depend on where faults happened.
        """
        cfg, accum = self.cfg, self.cfg.train.grad_accum_steps
        if cfg.faults.crash_rank == self.topo.rank and cfg.faults.crash_at_step == self.step + 1:
            os._exit(17)  # fault injection: a rank dies without cleanup, as on a hardware fault
        start = time.perf_counter()
        terms: dict[str, float] = {}
        total, bad = 0.0, None
        for mb in range(accum):
            batch = self._micro_batch(self.train_loader)
            if bad is not None and not self.topo.distributed:
                continue  # (with several ranks every micro-batch runs: forward may hold collectives)
            sub = self.elastic.sample(self.step + 1, mb) if self.elastic is not None else None
            out = self._loss(batch, sub)
            loss = out.total
            if self.step + 1 in cfg.faults.nan_loss_steps and mb == cfg.faults.nan_micro_batch:
                loss = loss * float("nan")
            if self.step + 1 in cfg.faults.spike_loss_steps and self.step + 1 not in self._spiked:
                self._spiked.add(self.step + 1)  # once: a rollback replays the step number with other data
                loss = loss * 50.0
            value = float(loss)
            if self.topo.any(not math.isfinite(value) or bad is not None):  # every rank decides the same
                bad = bad or {"reason": "non-finite loss" if not math.isfinite(value) else
                              "non-finite loss on another rank", "micro_batch": mb}
                continue
            (loss / accum).backward()
            total += value / accum
            if self.elastic is not None:
                self.elastic.record_loss(value)
            for k, v in out.terms.items():
                terms[k] = terms.get(k, 0.0) + v / accum
        grad_norm = float("nan")
        if bad is None:
            self.runtime.sync_grads()
            grad_norm = self.runtime.grad_norm()  # after sync: identical on every rank
            if not math.isfinite(grad_norm):
                bad = {"reason": "non-finite gradient"}
        self.step += 1
        lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
        if bad is None:
            if cfg.optim.grad_clip and grad_norm > cfg.optim.grad_clip:
                self.runtime.clip(cfg.optim.grad_clip / (grad_norm + 1e-6))
            self.runtime.step(lr)
        self.runtime.clear_grad()
        if self.unified is not None:  # posterior weighting moves only on applied steps, from all ranks' values
            self.objective.finish_step(bad is None, self.topo.sum_array)
        if bad is None and self.topo.distributed:  # log the mean over data-parallel ranks
            keys = sorted(terms)
            means = self.topo.sum_array(np.array([total] + [terms[k] for k in keys])) / self.topo.dp
            total, terms = float(means[0]), {k: float(v) for k, v in zip(keys, means[1:])}
        elapsed = time.perf_counter() - start
        tokens = accum * cfg.train.micro_batch_size * cfg.data.seq_len * self.world
        metrics = {"step": self.step, "loss": total if bad is None else None, **terms, "lr": lr,
                   "grad_norm": finite_or_none(grad_norm), "step_time_s": elapsed, "tokens_per_s": tokens / elapsed,
                   "mfu": tokens / elapsed * self.flops_per_token / (self.peak_gflops * 1e9)}
        if self.elastic is not None:  # which sub-model each micro-step trained, loss per sub-model kind
            metrics.update(self.elastic.step_metrics())
        if bad is not None:
            metrics["skipped"] = True
            self.event("skipped_step", **bad)
        return metrics

    def _loss(self, batch: dict, submodel=None, record: bool = True):
        if self.unified is not None:
            return self.objective.loss(self.model, batch, submodel, record)
        return text_loss(self.model, batch, self.cfg.model.mtp.loss_weight, submodel=submodel,
                         balance_length=self.balance_length)

    def _guard(self, m: dict) -> None:
        """Count bad steps (abort after too many in a row), detect loss spikes, roll back if configured."""
        t = self.cfg.train
        if m.get("skipped"):
            self.bad_streak += 1
            if self.bad_streak >= t.max_bad_steps:
                raise TrainingError(f"{self.bad_streak} consecutive steps with non-finite loss or gradients "
                                    f"(last: step {self.step}); last checkpoint: "
                                    f"{ckpt.latest_valid_checkpoint(self.ckpt_root) or 'none'}")
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
    def evaluate(self) -> Optional[float]:
        """Mean next-token loss over the first `train.eval_batches` held-out micro-batches."""
        if self.val_loader is None:
            return None
        self.model.eval()
        self.val_loader.position = 0
        if self.unified is None:
            losses = [float(text_loss(self.model, self._micro_batch(self.val_loader), 0.0).terms["loss_ntp"])
                      for _ in range(self.cfg.train.eval_batches)]
        else:  # unified: the sum of the per-modality losses (fixed batches, so evaluations compare)
            losses = []
            for _ in range(self.cfg.train.eval_batches):
                terms = self._loss(self._micro_batch(self.val_loader, train=False), record=False).terms
                losses.append(sum(terms.get(f"loss_{m}", 0.0) for m in MODALITY_TERMS))
        self.model.train()
        return float(np.mean(losses))

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
                m = self.train_step()
                self._guard(m)
                if m.get("skipped"):
                    for layer in self.model.moe_layers():
                        layer.step_counts[:] = 0
                        layer.modality_counts[:] = 0
                m["log"] = (m["step"] % cfg.train.log_interval == 0 or m["step"] == cfg.train.max_steps) \
                    and not m.get("rolled_back")
                for cb in self.callbacks:
                    cb.on_step_end(self, m)
                for layer in self.model.moe_layers():
                    layer.step_counts[:] = 0
                    layer.modality_counts[:] = 0
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
