"""The training loop: micro-batches with gradient accumulation, clipping, AdamW, callbacks, exact resume."""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import paddle
from tqdm import tqdm

from ernie5.config.run import RunConfig
from ernie5.data.loader import PackedLoader, SyntheticLoader
from ernie5.data.shards import open_split, read_meta
from ernie5.errors import UserError
from ernie5.model.transformer import build_model, count_params, to_tensor_batch
from ernie5.objectives.text import make_text_batch, text_loss
from ernie5.plan import count_parameters, flops_per_token
from ernie5.train import checkpoint as ckpt
from ernie5.train.callbacks import (AuxFreeBiasUpdate, Callback, Checkpointer, Evaluator, MetricsLogger,
                                    RouterOrthogonalStep, RoutingStats)
from ernie5.train.optim import build_optimizer, grad_global_norm, lr_at, scale_grads
from ernie5.train.perf import measure_gemm_gflops


def resolve_vocab(cfg: RunConfig) -> None:
    """Fill model.vocab_size from the prepared shards (or check it covers them)."""
    if cfg.data.synthetic:
        if cfg.model.vocab_size is None:
            raise UserError("model.vocab_size", "must be set when data.synthetic is true")
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
        self.rank, self.world = 0, 1
        self.is_main = self.rank == 0
        resolve_vocab(cfg)
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.out / "checkpoints"
        self.train_loader, self.val_loader = self._loaders()
        with paddle.utils.unique_name.guard():  # stable parameter names -> stable optimizer-state keys
            self.model = build_model(cfg.model, seed=cfg.run.seed)
        self.params = [p for p in self.model.parameters() if not p.stop_gradient]
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.step = 0
        self.callbacks = callbacks if callbacks is not None else self.default_callbacks()
        self._bar = None
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

    def reduce_counts(self, counts: np.ndarray) -> np.ndarray:
        """Sum expert loads over data-parallel ranks (identity in one process)."""
        return counts

    # ---- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "loader": self.train_loader.state_dict(),
                 "total_params": count_params(self.model)}
        return ckpt.write_checkpoint(self.ckpt_root, self.step, {
            "model.pdparams": ckpt.save_paddle(self.model.state_dict()),
            "optimizer.pdopt": ckpt.save_paddle(self.optimizer.state_dict()),
            "trainer_state.json": ckpt.save_json(state),
            "rng.pkl": ckpt.save_pickle({"paddle": paddle.get_rng_state()}),
            "config.yaml": ckpt.save_text(self.cfg.to_yaml()),
        }, self.cfg.checkpoint.keep_last)

    def load_checkpoint(self, path: Path) -> None:
        ckpt.apply_model_state(self.model, ckpt.load_state(path, "model.pdparams"), str(path))
        self.optimizer.set_state_dict(ckpt.load_state(path, "optimizer.pdopt"))
        state = ckpt.json_load(path / "trainer_state.json")
        self.step = int(state["step"])
        self.train_loader.load_state_dict(state["loader"])
        with open(path / "rng.pkl", "rb") as f:
            paddle.set_rng_state(pickle.load(f)["paddle"])

    def _maybe_resume(self) -> Optional[Path]:
        if not self.cfg.checkpoint.resume:
            return None
        ckpt.clean_partial(self.ckpt_root)
        path = ckpt.latest_valid_checkpoint(self.ckpt_root)
        if path is not None:
            self.load_checkpoint(path)
        return path

    # ---- steps -------------------------------------------------------------------------------------------
    def _micro_batch(self, loader) -> dict:
        tokens, segments = loader.next()
        return to_tensor_batch(make_text_batch(tokens, segments, self.cfg.model.mtp.depth))

    def train_step(self) -> dict:
        """One optimizer step over `grad_accum_steps` micro-batches. Returns the step's metrics."""
        cfg, accum = self.cfg, self.cfg.train.grad_accum_steps
        start = time.perf_counter()
        terms: dict[str, float] = {}
        total = 0.0
        for _ in range(accum):
            out = text_loss(self.model, self._micro_batch(self.train_loader), cfg.model.mtp.loss_weight)
            (out.total / accum).backward()
            total += float(out.total) / accum
            for k, v in out.terms.items():
                terms[k] = terms.get(k, 0.0) + v / accum
        grad_norm = grad_global_norm(self.params)
        self.step += 1
        lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
        if cfg.optim.grad_clip and grad_norm > cfg.optim.grad_clip:
            scale_grads(self.params, cfg.optim.grad_clip / (grad_norm + 1e-6))
        self.optimizer.set_lr(lr)
        with paddle.utils.unique_name.guard():  # accumulators are named on the first step
            self.optimizer.step()
        self.optimizer.clear_grad(set_to_zero=False)
        elapsed = time.perf_counter() - start
        tokens = accum * cfg.train.micro_batch_size * cfg.data.seq_len * self.world
        return {"step": self.step, "loss": total, **terms, "lr": lr, "grad_norm": grad_norm,
                "step_time_s": elapsed, "tokens_per_s": tokens / elapsed,
                "mfu": tokens / elapsed * self.flops_per_token / (self.peak_gflops * 1e9)}

    @paddle.no_grad()
    def evaluate(self) -> Optional[float]:
        """Mean next-token loss over the first `train.eval_batches` held-out micro-batches."""
        if self.val_loader is None:
            return None
        self.model.eval()
        self.val_loader.position = 0
        losses = [float(text_loss(self.model, self._micro_batch(self.val_loader), 0.0).terms["loss_ntp"])
                  for _ in range(self.cfg.train.eval_batches)]
        self.model.train()
        return float(np.mean(losses))

    def report(self, m: dict) -> None:
        """Human-facing progress: the tqdm bar's postfix, or one line per log step when there is no bar."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")
        elif not self.quiet:
            val = f" val {m['val_loss']:.4f}" if m.get("val_loss") is not None else ""
            print(f"step {m['step']:>6}/{self.cfg.train.max_steps} loss {m['loss']:.4f}{val} lr {m['lr']:.2e} "
                  f"grad {m['grad_norm']:.3f} tok/s {m['tokens_per_s']:.0f} mfu {m['mfu']:.3f}", flush=True)

    def train(self) -> list[dict]:
        """Run to max_steps; returns the logged metrics of this invocation."""
        cfg = self.cfg
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_gflops = measure_gemm_gflops()
        self.model.train()
        show_bar = cfg.train.progress_bar and not self.quiet and sys.stderr.isatty()
        self._bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train", unit="step",
                         disable=not show_bar) if show_bar else None
        logged = []
        while self.step < cfg.train.max_steps:
            m = self.train_step()
            m["log"] = m["step"] % cfg.train.log_interval == 0 or m["step"] == cfg.train.max_steps
            for cb in self.callbacks:
                cb.on_step_end(self, m)
            for layer in self.model.moe_layers():
                layer.step_counts[:] = 0
            if m["log"]:
                logged.append({k: v for k, v in m.items() if k != "log"})
            if self._bar is not None:
                self._bar.update(1)
        for cb in self.callbacks:
            cb.on_train_end(self)
        if self._bar is not None:
            self._bar.close()
        return logged


def summary(cfg: RunConfig) -> dict:
    pc = count_parameters(cfg.model)
    return {"total_params": pc.total_params, "active_params": pc.active_params,
            "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len)}


