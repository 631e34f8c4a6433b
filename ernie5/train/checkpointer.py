"""Saving and restoring a run's stateful parts as step checkpoints (file layout: `ernie5.train.checkpoint`).

What a checkpoint holds:
- the model weights and optimizer state, as each rank's share in safetensors (`ParallelRuntime` gives them
  global names, so any expert / data-parallel layout loads them);
- `trainer_state.json`: plain counters (step, ...) and the `state_dict()` of every named stateful part
  (data loader, spike detector, elastic sampler, objective ...), one JSON value per name;
- `rng.json` (paddle's generator states) and the resolved `config.yaml`.

With several ranks every rank writes its share into one temp dir and rank 0 publishes it with the manifest.
Resume and rollback load the checkpoint rank 0 chose, on every rank (`agreed_latest`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Callable, Optional

from ernie5.errors import UserError
from ernie5.tensor_io import save_tensors
from ernie5.train import checkpoint as ckpt
from ernie5.train.config import CheckpointConfig

STATE_FILE = "trainer_state.json"


class Checkpointer:
    """Step checkpoints under `root` for one rank of a topology."""

    def __init__(self, root: Path, topo, cfg: CheckpointConfig, pause_s: float = 0.0):
        self.root, self.topo, self.cfg = root, topo, cfg
        self.pause_s = pause_s  # fault injection: a pause after every file (see ernie5.train.faults)

    # ---- save --------------------------------------------------------------------------------------------
    def save(self, step: int, runtime, parts: dict, counters: dict, config_yaml: str) -> Path:
        """Write checkpoint `step`: every rank's model / optimizer share; rank 0 adds the counters, the parts'
        states, the RNG state and the config. Returns the published directory."""
        r = self.topo.rank
        writers = {ckpt.rank_file("model", ckpt.TENSORS, r): save_tensors(runtime.model_state()),
                   ckpt.rank_file("optimizer", ckpt.TENSORS, r): save_tensors(runtime.optimizer_state())}
        if self.topo.is_main:
            state = {**counters, **{name: part.state_dict() for name, part in parts.items()}}
            writers.update({STATE_FILE: ckpt.save_json(state), ckpt.RNG_FILE: ckpt.save_rng(),
                            "config.yaml": ckpt.save_text(config_yaml)})
        if not self.topo.distributed:
            return ckpt.write_checkpoint(self.root, step, writers, self.cfg.keep_last, self.pause_s)
        final = self.root / ckpt.step_dir_name(step)
        tmp = self.root / f".tmp-{final.name}-dist"
        if self.topo.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.topo.barrier()
        ckpt.write_files(tmp, writers, self.pause_s)
        self.topo.barrier()
        if self.topo.is_main:
            ckpt.finalize_checkpoint_dir(tmp, final, step)
            ckpt.prune_checkpoints(self.root, self.cfg.keep_last)
        self.topo.barrier()
        return final

    # ---- restore -----------------------------------------------------------------------------------------
    def restore(self, path: Path, runtime, model, parts: dict, defaults: Optional[dict] = None,
                required: tuple[str, ...] = ("loader",)) -> dict:
        """Load weights, optimizer state, every part (in `parts` order) and the RNG; returns the saved state (the
        caller reads its counters from it). A part the checkpoint lacks gets its entry in `defaults` (older
        checkpoints), stays as it is if it has none, and is an error (before anything is loaded) if `required`."""
        trust = self.cfg.allow_pickle  # legacy pickle files only with the user's opt-in
        state = ckpt.json_load(path / STATE_FILE)
        missing = [name for name in required if name in parts and name not in state]
        if missing:
            raise UserError(str(path / STATE_FILE), f"no {missing[0]!r} state: this checkpoint cannot resume a run")
        weights = runtime.local_model_state(ckpt.load_model_weights(path, trust), str(path))
        ckpt.apply_model_state(model, weights, str(path))
        runtime.load_optimizer_state(ckpt.load_merged(path, "optimizer", trust))
        for name, part in parts.items():
            if name in state:
                part.load_state_dict(state[name])
            elif defaults and name in defaults:
                part.load_state_dict(defaults[name])
        ckpt.load_rng(path, trust)
        return state

    # ---- which checkpoint --------------------------------------------------------------------------------
    def agreed_latest(self, warn: Callable[[str], None]) -> Optional[Path]:
        """The newest valid checkpoint as rank 0 sees it, on every rank (each rank verifying on its own could
        pick different ones, e.g. while a file is being replaced on a shared file system)."""
        path = ckpt.latest_valid_checkpoint(self.root, warn=warn)
        chosen = self.topo.broadcast_int(int(path.name[5:]) if path is not None else -1)
        return self.root / ckpt.step_dir_name(chosen) if chosen >= 0 else None

    def find_resume(self) -> Optional[Path]:
        """The checkpoint to resume from (None: start fresh), after removing partial saves. Refuses to start
        over when checkpoints exist but none verifies."""
        if self.topo.is_main:
            ckpt.clean_partial(self.root)
        self.topo.barrier()
        problems: list[str] = []
        path = self.agreed_latest(problems.append)
        existing = ckpt.list_checkpoints(self.root)
        if path is None and existing:
            newest = ckpt.verify_checkpoint(existing[-1])
            raise UserError(str(self.root), f"all {len(existing)} checkpoints are corrupted (newest: {newest}); "
                                            "refusing to start over on top of them (move them away, or use another "
                                            "run.output_dir)")
        for line in problems if self.topo.is_main else []:
            print(line, file=sys.stderr)
        return path

    def latest_valid(self) -> Optional[Path]:
        return ckpt.latest_valid_checkpoint(self.root)
