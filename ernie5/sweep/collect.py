"""What one run directory says, reduced to the numbers a comparison needs.

Definitions (the report repeats them):
- final train value of a metric (`loss`, and every logged loss term: `loss_ntp`, `loss_mtp_1`, `loss_aux`, and the
  per-modality `loss_text` / `loss_visual` / `loss_audio` of unified runs): the mean over the last `TAIL` logged
  records that carry it (fewer if fewer were logged). Train losses are single micro-batch values and noisy; held-out
  ones are not, so:
- final held-out values: `val_loss` and every `val_loss/<source>` of the last record that has a held-out
  evaluation (the trainer evaluates the same held-out batches each time and always at the last step when
  `train.eval_interval` > 0). The trainer logs held-out loss per source, not per modality.
- tokens/s: the median of the logged `tokens_per_s` (robust to the first, slower steps and to a noisy host).
- sizes: total / active parameters (active: one text token) and training FLOPs per token from the planner
  (`ernie5.plan`), for the run's resolved `config.yaml`; training compute = FLOPs per token x tokens trained
  (max_steps x tokens per step).
- routing (MoE runs): `ernie5.analysis.routing.modality_report` over the whole routing.jsonl.
- elastic sub-models: the rows of `eval/step_<max_steps>/elastic_eval.json`, the elastic evaluation of the final
  checkpoint (`ernie5 eval RUN --mode elastic` writes it there, and so does a sweep with `evaluate:`).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ernie5.config.schema import to_dict
from ernie5.config.yaml_io import apply_overrides
from ernie5.analysis.routing import modality_report, read_metrics, read_routing
from ernie5.errors import UserError
from ernie5.plan import count_parameters, flops_per_token
from ernie5.runconfig import config_from_dict
from ernie5.sweep.runner import read_marker
from ernie5.sweep.spec import Evaluation, tokens_per_step

TAIL = 3  # logged records averaged for a final train value


@dataclass
class RunResult:
    """One run's final numbers, curves and sizes."""

    run_dir: str
    variant: str
    seed: int
    max_steps: int
    train: dict[str, float]  # metric -> final value (see the module docstring)
    heldout: dict[str, float]  # "val_loss" and "val_loss/<source>" -> final value
    curves: dict[str, list[tuple[int, float]]]  # "loss", "val_loss" -> [(step, value)]
    tokens_per_s: Optional[float]
    total_params: int
    active_params: int
    flops_per_token: float
    tokens: int  # tokens trained: max_steps x tokens per step
    wall_s: Optional[float] = None  # from the sweep's marker, when the sweep ran it
    routing: Optional[dict] = None  # modality_report of the whole run (MoE runs)
    last_step: int = 0
    elastic: Optional[dict] = None  # {"batches": N, "rows": [...]} of the final checkpoint's elastic_eval.json

    @property
    def finished(self) -> bool:
        """metrics.jsonl reached the config's train.max_steps (the trainer always logs the last step)."""
        return self.last_step >= self.max_steps

    @property
    def compute(self) -> float:
        """Training FLOPs of the whole run (planner FLOPs per token x tokens trained)."""
        return self.flops_per_token * self.tokens


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # NaN is not a number here


def final_train(records: list[dict], tail: int = TAIL) -> dict[str, float]:
    """`loss` and every `loss_*` term: the mean of its last `tail` logged values."""
    keys = sorted({k for r in records for k in r if (k == "loss" or k.startswith("loss_")) and k != "loss_spike_z"})
    out = {}
    for key in keys:
        values = [r[key] for r in records if _number(r.get(key))][-tail:]
        if values:
            out[key] = sum(values) / len(values)
    return out


def final_heldout(records: list[dict]) -> dict[str, float]:
    """val_loss and val_loss/<source> of the last record with a held-out evaluation ({} if none)."""
    for r in reversed(records):
        if _number(r.get("val_loss")):
            return {k: float(v) for k, v in sorted(r.items()) if k.startswith("val_loss") and _number(v)}
    return {}


def read_elastic_eval(run_dir, max_steps: int) -> Optional[dict]:
    """{"batches": held-out micro-batches, "rows": [{"submodel", "loss", "active_params", ...}, ...]} from the
    final checkpoint's elastic_eval.json, or None when the run has none."""
    path = Evaluation("elastic").output(run_dir, max_steps)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = [{"submodel": str(r["submodel"]), "loss": float(r["loss"]), "active_params": int(r["active_params"]),
                 "total_params": int(r["total_params"])} for r in data["rows"]]
        return {"batches": data.get("batches"), "rows": rows}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(str(path), f"unreadable elastic evaluation ({type(e).__name__}: {e})") from None


def read_config(run_dir: Path):
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(str(run_dir), "no config.yaml (not a run directory, or the run never started)")
    try:
        return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    except yaml.YAMLError as e:
        raise UserError(str(path), f"invalid YAML: {e}") from None


def read_run(run_dir, tail: int = TAIL) -> RunResult:
    """Read RUN_DIR (a run written by `ernie5 train`, with or without the sweep's marker)."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise UserError(str(run_dir / "metrics.jsonl"), "no logged steps yet")
    marker = read_marker(run_dir) or {}
    pc = count_parameters(cfg.model)
    curves = {key: [(int(r["step"]), float(r[key])) for r in records if _number(r.get(key))]
              for key in ("loss", "val_loss")}
    tps = [float(r["tokens_per_s"]) for r in records if _number(r.get("tokens_per_s"))]
    routing = None
    if (run_dir / "routing.jsonl").is_file():
        routing = modality_report(read_routing(run_dir))
    return RunResult(
        run_dir=str(run_dir), variant=str(marker.get("variant", run_dir.name)),
        seed=int(marker.get("seed", cfg.run.seed)), max_steps=cfg.train.max_steps,
        train=final_train(records, tail), heldout=final_heldout(records), curves=curves,
        tokens_per_s=statistics.median(tps) if tps else None,
        total_params=pc.total_params, active_params=pc.active_params,
        flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len),
        tokens=cfg.train.max_steps * tokens_per_step(cfg),
        wall_s=marker.get("wall_s"), routing=routing, last_step=int(records[-1]["step"]),
        elastic=read_elastic_eval(run_dir, cfg.train.max_steps))


@dataclass
class Group:
    """The runs of one variant (seeds sorted)."""

    variant: str
    runs: list[RunResult] = field(default_factory=list)

    def values(self, section: str, key: str) -> list[float]:
        """One value per seed of `section` ("train" / "heldout") metric `key` (seeds missing it are left out)."""
        return [getattr(r, section)[key] for r in self.runs if key in getattr(r, section)]

    def by_seed(self, section: str, key: str) -> dict[int, float]:
        return {r.seed: getattr(r, section)[key] for r in self.runs if key in getattr(r, section)}


def group_runs(results: list[RunResult]) -> list[Group]:
    """Runs grouped by variant in the order the variants first appear, seeds sorted within a variant."""
    groups: dict[str, Group] = {}
    for r in results:
        groups.setdefault(r.variant, Group(r.variant)).runs.append(r)
    for g in groups.values():
        g.runs.sort(key=lambda r: (r.seed, r.run_dir))
        seeds = [r.seed for r in g.runs]
        if len(set(seeds)) != len(seeds):
            raise UserError(g.variant, f"two runs of variant {g.variant!r} have the same seed {seeds}: "
                                       "give each run once")
    return list(groups.values())


def size_with(run_dir, overrides: list[str]) -> tuple[float, int, int, int]:
    """(FLOPs per token, tokens trained, total params, active params) of RUN_DIR's resolved config with
    `overrides` applied on top (the scaling ladder's next size)."""
    raw = apply_overrides(to_dict(read_config(Path(run_dir))), list(overrides))
    cfg = config_from_dict(raw)
    pc = count_parameters(cfg.model)
    return (flops_per_token(cfg.model, cfg.data.seq_len), cfg.train.max_steps * tokens_per_step(cfg),
            pc.total_params, pc.active_params)
