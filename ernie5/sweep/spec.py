"""The sweep file and its expansion into runs.

A sweep file (`kind: sweep`, read like any config: `base:` includes work) names a run config and what to vary:

    kind: sweep
    config: ../ablations/routing_agnostic.yaml   # the base run config, relative to this file
    out: runs/sweeps/routing                      # default output dir (`ernie5 sweep --out` wins)
    seeds: [7, 8]                                 # default: the base config's run.seed
    budget: {steps: 60}                           # or {tokens: 122880}; default: the config's train.max_steps
    overrides: {train.eval_interval: 20}          # applied to every variant
    variants:                                     # list form: name -> overrides; the first is the baseline
      agnostic: {}
      isolated: {model.moe.routing: isolated, model.moe.vision_num_experts: 8}
    # or the grid form (every combination, in the order written; names like `top_k-1,lr-0.001`):
    # grid: {model.moe.top_k: [1, 2], optim.lr: [1.0e-3, 3.0e-3]}
    ladder:                                       # optional: the variants are model sizes, smallest first
      next: {model.hidden_size: 192}              # overrides on top of the last rung: the size to predict
    evaluate:                                     # optional: evaluations of each run's final checkpoint
      - {mode: elastic, batches: 64}              # `ernie5 eval CKPT --mode elastic --batches 64`

Each run's overrides are applied to the base config in this order: `overrides`, the variant's, `run.seed`,
the budget's `train.max_steps`, the command line's, and `run.output_dir` (OUT/VARIANT/seedSEED; OUT and the config
file as absolute paths, so the arguments do not depend on the directory the sweep runs from). So a command
line `train.max_steps=20` beats the budget; `run.seed` and `run.output_dir` belong to the sweep and may not be
overridden.

Budget in tokens: steps = ceil(tokens / tokens per step), tokens per step = train.micro_batch_size x
train.grad_accum_steps x data.seq_len (x parallel.data when set): the global batch of one optimizer step, counted
per variant (a variant that changes the batch gets its own step count). Padding counts as tokens, as in the
trainer's `tokens_per_s`.

`evaluate:` lists evaluations each run gets once its training finished (the runner runs them; `Evaluation`).
Modes: `elastic` (the sub-model grid's held-out loss; `batches` held-out micro-batches, default 16). They are
checked up front for every run: the grid must exist for the run's config (the elastic space builds and has a
sub-model besides the full one) and the run must train on prepared data (the evaluation reads its held-out split).
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ernie5.config.schema import build, join, require
from ernie5.config.yaml_io import load_yaml
from ernie5.elastic.space import ElasticSpace
from ernie5.errors import ConfigError, UserError
from ernie5.runconfig import RunConfig, load_config
from ernie5.train.checkpoint import step_dir_name

TOP_KEYS = ("kind", "name", "config", "out", "seeds", "budget", "overrides", "variants", "grid", "ladder",
            "evaluate")
LADDER_KEYS = ("next",)
EVAL_MODES = ("elastic",)  # `evaluate:` modes (ernie5 eval --mode ...)
EVAL_KEYS = ("mode", "batches")
OWNED_KEYS = ("run.seed", "run.output_dir")  # set per run by the sweep
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._,+-]*$")  # a variant name is a directory name


@dataclass
class Budget:
    """How long each run trains: `steps` optimizer steps, or `tokens` (converted per variant, see the module)."""

    steps: Optional[int] = None
    tokens: Optional[int] = None

    def validate(self, path: str) -> None:
        require((self.steps is None) != (self.tokens is None), path, "give exactly one of steps, tokens")
        for name in ("steps", "tokens"):
            value = getattr(self, name)
            require(value is None or value >= 1, join(path, name), f"{value} must be >= 1")

    def max_steps(self, cfg: RunConfig) -> Optional[int]:
        """train.max_steps for a run of `cfg` (None: keep the config's)."""
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return math.ceil(self.tokens / tokens_per_step(cfg))
        return None


def tokens_per_step(cfg: RunConfig) -> int:
    """Tokens in one optimizer step: micro-batch x accumulation x sequence length x data-parallel ranks."""
    t = cfg.train
    return t.micro_batch_size * t.grad_accum_steps * cfg.data.seq_len * (cfg.parallel.data or 1)


@dataclass(frozen=True)
class Evaluation:
    """One post-training evaluation: `ernie5 eval CKPT --mode MODE --batches N --out DIR` on the final checkpoint."""

    mode: str
    batches: int = 16

    def output_dir(self, run_dir, max_steps: int) -> Path:
        """Where it writes: RUN/eval/step_<max_steps> (`ernie5 eval`'s own default for a run's checkpoint)."""
        return Path(run_dir) / "eval" / step_dir_name(max_steps)

    def output(self, run_dir, max_steps: int) -> Path:
        """The file whose presence says the evaluation wrote its result."""
        return self.output_dir(run_dir, max_steps) / f"{self.mode}_eval.json"

    def args(self, run_dir, max_steps: int) -> list[str]:
        """Arguments after `ernie5 eval`: the final checkpoint, the mode, its options and the output dir."""
        ckpt = Path(run_dir) / "checkpoints" / step_dir_name(max_steps)
        return [str(ckpt), "--mode", self.mode, "--batches", str(self.batches),
                "--out", str(self.output_dir(run_dir, max_steps))]


@dataclass
class RunSpec:
    """One run of a sweep: a variant at a seed, its full override list and its run directory."""

    variant: str
    seed: int
    config: str  # the base run config file
    overrides: list[str]  # everything but run.output_dir, in the order applied
    run_dir: str
    max_steps: int
    evaluate: tuple[Evaluation, ...] = ()  # after training, in order

    @property
    def label(self) -> str:
        return f"{self.variant} seed {self.seed}"

    def train_args(self) -> list[str]:
        """Arguments after `ernie5 train`: the config file and every override, output dir last."""
        return [self.config, *self.overrides, f"run.output_dir={self.run_dir}"]

    def eval_args(self, ev: Evaluation) -> list[str]:
        """Arguments after `ernie5 eval` for evaluation `ev` of this run's final checkpoint."""
        return ev.args(self.run_dir, self.max_steps)


@dataclass
class Ladder:
    """The variants are rungs of a scaling ladder; `next` (overrides on the last rung) is the size to predict."""

    next: list[str] = field(default_factory=list)


@dataclass
class Sweep:
    """A parsed sweep file: the base config, variants in order (the first is the baseline), seeds, budget."""

    path: str
    name: str
    config: str
    out: str
    seeds: list[Optional[int]]  # None: the base config's own seed
    budget: Budget
    overrides: list[str]
    variants: dict[str, list[str]]  # name -> overrides, in order
    ladder: Optional[Ladder] = None
    evaluate: tuple[Evaluation, ...] = ()

    def expand(self, cli_overrides: list[str] = (), out: Optional[str] = None) -> list[RunSpec]:
        """Every run (variants in order, then seeds), each config loaded and validated now: the first problem
        raises one UserError naming the sweep file, the variant and the key."""
        for item in cli_overrides:
            key = item.partition("=")[0]
            if key in OWNED_KEYS:
                raise UserError(f"{self.path}: {key}", "is set per run by the sweep (use `seeds:` or --out)")
        # absolute paths in every run's arguments (and so in its marker): the same sweep run again from another
        # directory, or with --out given another way, has the same arguments
        root = Path(os.path.abspath(out or self.out))
        config = os.path.abspath(self.config)
        runs = []
        for name, variant_overrides in self.variants.items():
            for seed in self.seeds:
                pre = self.overrides + variant_overrides + ([f"run.seed={seed}"] if seed is not None else [])
                cfg = self._load(name, pre + list(cli_overrides))
                steps = self.budget.max_steps(cfg)
                budget = [f"train.max_steps={steps}"] if steps is not None else []
                full = pre + budget + list(cli_overrides)
                cfg = self._load(name, full)
                if seed is None:
                    seed = cfg.run.seed
                for i, ev in enumerate(self.evaluate):
                    _check_evaluation(ev, cfg, f"{self.path}: evaluate[{i}]", name)
                runs.append(RunSpec(name, seed, config, full, str(root / name / f"seed{seed}"),
                                    cfg.train.max_steps, self.evaluate))
        seen: dict[str, str] = {}
        for r in runs:
            if r.run_dir in seen:
                raise UserError(f"{self.path}: seeds", f"{r.label} repeats {seen[r.run_dir]} (same run dir)")
            seen[r.run_dir] = r.label
        return runs

    def _load(self, variant: str, overrides: list[str]) -> RunConfig:
        try:
            return load_config(self.config, overrides)
        except UserError as e:
            raise UserError(f"{self.path}: variant {variant}: {e.where}", e.reason) from None

    def as_dict(self) -> dict:
        """What `sweep.json` records for `ernie5 compare`."""
        return {"name": self.name, "sweep_file": self.path, "config": self.config,
                "variants": list(self.variants),
                "ladder": None if self.ladder is None else {"next": self.ladder.next},
                "evaluate": [{"mode": ev.mode, "batches": ev.batches} for ev in self.evaluate]}


def _check_evaluation(ev: Evaluation, cfg: RunConfig, where: str, variant: str) -> None:
    """What `ernie5 eval --mode elastic` needs from a run's config, checked before anything runs: the sub-model
    grid (the elastic space of `elastic:` for this model, also for a variant that trains with elastic.enabled
    false) with more than the full model, and prepared text data to take held-out batches from."""
    if ev.mode == "elastic":
        if cfg.data.synthetic:
            raise UserError(where, f"variant {variant}: elastic evaluation reads the held-out split of prepared "
                                   "data; data.synthetic is true")
        try:
            grid = ElasticSpace(cfg.elastic, cfg.model, cfg.parallel.expert).grid()
        except UserError as e:
            raise UserError(where, f"variant {variant}: no sub-model grid: {e.where}: {e.reason}") from None
        if len(grid) < 2:
            raise UserError(where, f"variant {variant}: the sub-model grid is the full model only (set p_full < 1 "
                                   "in elastic.depth, elastic.width or elastic.sparsity)")


# ---- reading the file -------------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """A value as override text that YAML reads back as the same value (`isolated`, `0.01`, `[1, 2]`)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if text.endswith("\n..."):
        text = text[:-4].strip()
    if text.endswith("..."):
        text = text[:-3].strip()
    try:
        if yaml.safe_load(text) == value:
            return text
    except yaml.YAMLError:
        pass
    return json.dumps(value)


def _check_keys(raw: dict, known: tuple[str, ...], path: str) -> None:
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            more = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(known)})"
            raise ConfigError(join(path, str(key)), f"unknown key{more}")


def _overrides(raw: Any, path: str) -> list[str]:
    """A mapping {key.path: value} -> ["key.path=value", ...] in order."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping {{key.path: value}}, got {type(raw).__name__} {raw!r}")
    out = []
    for key, value in raw.items():
        out.append(f"{_check_override_key(key, path)}={format_value(value)}")
    return out


def _check_override_key(key: Any, path: str) -> str:
    """A key of `overrides:`, a variant, `ladder.next` or `grid:`: a dotted config path the sweep does not own."""
    if not isinstance(key, str) or not key or "=" in key:
        raise ConfigError(path, f"bad key {key!r} (expected a dotted config path)")
    if key in OWNED_KEYS:
        raise ConfigError(join(path, key), "is set per run by the sweep (use `seeds:` or `out:`)")
    return key


def _check_name(name: Any, path: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(path, f"variant name {name!r} must be letters, digits and . _ , + - (a directory name)")
    return name


def _grid(raw: Any, path: str) -> dict[str, list[str]]:
    """{key: [values]} -> every combination in the order written, named `leaf-value,leaf-value`."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(path, "expected a mapping {key.path: [values, ...]} with at least one key")
    keys = list(raw)
    for key in keys:
        _check_override_key(key, path)
        if not isinstance(raw[key], list) or not raw[key]:
            raise ConfigError(join(path, key), f"expected a non-empty list of values, got {raw[key]!r}")
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    labels = leaves if len(set(leaves)) == len(leaves) else keys  # full paths when two leaves clash
    variants: dict[str, list[str]] = {}
    for combo in itertools.product(*(raw[k] for k in keys)):
        name = ",".join(f"{lab}-{format_value(v)}" for lab, v in zip(labels, combo))
        name = re.sub(r"[^A-Za-z0-9._,+-]", "", name.replace(" ", ""))
        if name in variants:
            raise ConfigError(path, f"two combinations give the variant name {name!r}")
        variants[_check_name(name, path)] = [f"{k}={format_value(v)}" for k, v in zip(keys, combo)]
    return variants


def _variants(raw: Any, path: str) -> dict[str, list[str]]:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(path, "expected a mapping {name: {key.path: value, ...}} with at least one variant")
    return {_check_name(name, join(path, str(name))): _overrides(ov, join(path, str(name)))
            for name, ov in raw.items()}


def _evaluations(raw: Any, path: str) -> tuple[Evaluation, ...]:
    """[{mode: elastic, batches: 64}, ...] -> Evaluations (each mode at most once: they share an output dir)."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(path, f"expected a non-empty list like [{{mode: elastic, batches: 64}}], got {raw!r}")
    out: list[Evaluation] = []
    for i, item in enumerate(raw):
        at = f"{path}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(at, f"expected a mapping {{mode: ..., batches: ...}}, got {item!r}")
        _check_keys(item, EVAL_KEYS, at)
        mode = item.get("mode")
        if mode not in EVAL_MODES:
            raise ConfigError(join(at, "mode"), f"{mode!r} is not an evaluation mode (known: {', '.join(EVAL_MODES)})")
        batches = item.get("batches", Evaluation.batches)
        if not isinstance(batches, int) or isinstance(batches, bool) or batches < 1:
            raise ConfigError(join(at, "batches"), f"{batches!r} must be an integer >= 1")
        if any(ev.mode == mode for ev in out):
            raise ConfigError(at, f"mode {mode} is listed twice (each mode runs once per run)")
        out.append(Evaluation(mode, batches))
    return tuple(out)


def load_sweep(path: str) -> Sweep:
    """Parse and check a sweep file (not the variants' configs: `Sweep.expand` does that). Problems raise
    UserError naming the file and the key."""
    try:
        return _parse(path, load_yaml(Path(path)))
    except UserError as e:
        if e.where.startswith(str(path)):
            raise
        raise UserError(f"{path}: {e.where}", e.reason) from None


def _parse(path: str, raw: dict) -> Sweep:
    _check_keys(raw, TOP_KEYS, "")
    if raw.get("kind") != "sweep":
        raise ConfigError("kind", f"{raw.get('kind', 'run')!r}: a sweep file says `kind: sweep`")
    cfg = raw.get("config")
    if not isinstance(cfg, str) or not cfg:
        raise ConfigError("config", "the base run config file (relative to the sweep file) is required")
    cfg_path = Path(path).parent / cfg
    if not cfg_path.is_file():
        raise ConfigError("config", f"{cfg_path}: run config file not found")
    if ("variants" in raw) == ("grid" in raw):
        raise ConfigError("variants", "give exactly one of `variants:` (named) or `grid:` (every combination)")
    variants = _variants(raw["variants"], "variants") if "variants" in raw else _grid(raw["grid"], "grid")
    seeds = raw.get("seeds")
    if seeds is None:
        seeds = [None]
    elif not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                  for s in seeds):
        raise ConfigError("seeds", f"expected a non-empty list of integers, got {seeds!r}")
    elif len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", f"repeated seed in {seeds}")
    name = raw.get("name") or Path(path).stem
    if not isinstance(name, str):
        raise ConfigError("name", f"expected a string, got {name!r}")
    out = raw.get("out") or f"runs/sweeps/{name}"
    if not isinstance(out, str):
        raise ConfigError("out", f"expected a directory path, got {out!r}")
    budget = build(Budget, raw.get("budget"), "budget") if raw.get("budget") is not None else Budget()
    ladder = None
    if raw.get("ladder") is not None:
        lad = raw["ladder"]
        if not isinstance(lad, dict):
            raise ConfigError("ladder", f"expected a mapping, got {lad!r}")
        _check_keys(lad, LADDER_KEYS, "ladder")
        ladder = Ladder(next=_overrides(lad.get("next"), "ladder.next"))
        if len(variants) < 3:
            raise ConfigError("variants", f"a ladder needs at least 3 sizes to fit with an interval, got "
                                          f"{len(variants)}")
    evaluate = _evaluations(raw["evaluate"], "evaluate") if raw.get("evaluate") is not None else ()
    return Sweep(path=str(path), name=name, config=str(cfg_path), out=out, seeds=seeds, budget=budget,
                 overrides=_overrides(raw.get("overrides"), "overrides"), variants=variants, ladder=ladder,
                 evaluate=evaluate)
