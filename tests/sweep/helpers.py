"""Shared pieces of the sweep tests: a tiny synthetic-data base config and fabricated run directories."""

from __future__ import annotations

import json
from pathlib import Path

from ernie5.runconfig import load_config

# a ~30k-parameter MoE on synthetic tokens: no tokenizer or shards needed, a step takes milliseconds
TINY = [
    "data.synthetic=true", "data.seq_len=32", "model.vocab_size=300", "model.hidden_size=32", "model.num_layers=2",
    "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=64", "model.max_seq_len=64",
    "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_ffn_size=32", "model.moe.layer_start=1",
    "train.max_steps=3", "train.micro_batch_size=2", "train.log_interval=1", "train.eval_interval=3",
    "train.eval_batches=1", "train.progress_bar=false", "optim.warmup_steps=1",
]


def write_base(dir_: Path, extra: list[str] = ()) -> Path:
    """A run config file for TINY (+ extra overrides) in `dir_`."""
    path = dir_ / "base.yaml"
    path.write_text(load_config(None, TINY + list(extra) + [f"run.output_dir={dir_ / 'unused'}"]).to_yaml())
    return path


def write_sweep(dir_: Path, text: str, name: str = "s.yaml") -> Path:
    path = dir_ / name
    path.write_text(text)
    return path


def fabricate_run(run_dir: Path, variant: str, seed: int, records: list[dict], extra: list[str] = (),
                  routing: list[dict] = ()) -> Path:
    """A finished run dir as `ernie5 sweep` leaves it: resolved config.yaml (train.max_steps = the last logged step
    unless `extra` sets it), metrics.jsonl (the given records), optional routing.jsonl, and the sweep's marker
    saying done."""
    run_dir.mkdir(parents=True, exist_ok=True)
    steps = [] if any(e.startswith("train.max_steps=") for e in extra) else \
        [f"train.max_steps={max(r['step'] for r in records)}"]
    cfg = load_config(None, TINY + steps + list(extra) + [f"run.output_dir={run_dir}", f"run.seed={seed}"])
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if routing:
        (run_dir / "routing.jsonl").write_text("".join(json.dumps(r) + "\n" for r in routing))
    (run_dir / "sweep_run.json").write_text(json.dumps({"variant": variant, "seed": seed, "status": "done",
                                                        "wall_s": 1.0}))
    return run_dir


def write_elastic_eval(run_dir: Path, losses: dict, active: dict, batches: int = 64, max_steps: int = 3) -> Path:
    """The final checkpoint's elastic_eval.json as `ernie5 eval --mode elastic` writes it (the fields the report
    reads): one row per sub-model, in the order of `losses`."""
    out = Path(run_dir) / "eval" / f"step_{max_steps:08d}"
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"submodel": name, "kind": "full" if name == "full" else "cut", "loss": loss,
             "active_params": active[name], "total_params": max(active.values()) * 2} for name, loss in losses.items()]
    path = out / "elastic_eval.json"
    path.write_text(json.dumps({"checkpoint": str(Path(run_dir) / "checkpoints" / f"step_{max_steps:08d}"),
                                "batches": batches, "rows": rows}, indent=1))
    return path
