"""The loop's components: the router updates run whatever callbacks are passed, the trainer resolves a copy of
its config, the phase hooks see every phase of a step, the checkpointer restores every stateful part."""

import numpy as np
import yaml

from ernie5.train.tasks import TextTask
from ernie5.train.timing import PHASES
from ernie5.train.trainer import Trainer


def test_callbacks_do_not_change_the_algorithm(tiny_cfg, tmp_path):
    """With no callbacks at all the router biases and weights move exactly as in a default run."""
    extra = ["train.max_steps=3", "model.moe.orthogonal_coef=1.0", "optim.router_lr_ratio=1.0"]
    bare = Trainer(tiny_cfg(*extra, f"run.output_dir={tmp_path / 'a'}"), callbacks=[], quiet=True)
    bare.train()
    full = Trainer(tiny_cfg(*extra, f"run.output_dir={tmp_path / 'b'}"), quiet=True)
    full.train()
    a, b = bare.model.state_dict(), full.model.state_dict()
    assert any("e_score_correction_bias" in k for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
    assert all(np.abs(l.router.e_score_correction_bias.numpy()).sum() > 0 for l in bare.model.moe_layers())


def test_train_step_reports_the_router_orthogonal_loss(tiny_cfg):
    tr = Trainer(tiny_cfg("train.max_steps=2", "model.moe.orthogonal_coef=1e-3"), callbacks=[], quiet=True)
    assert tr.train_step()["router_orthogonal_loss"] > 0


def test_resolved_config_is_a_copy_and_is_saved(tiny_cfg):
    cfg = tiny_cfg("train.max_steps=1")
    tr = Trainer(cfg, quiet=True)
    assert cfg.model.vocab_size is None and tr.cfg is not cfg
    assert isinstance(tr.task, TextTask) and tr.cfg.model.vocab_size > 0
    saved = yaml.safe_load((tr.out / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == tr.cfg.model.vocab_size


class Recorder:
    def __init__(self):
        self.phases = []

    def run(self, phase, fn, *args, **kwargs):
        self.phases.append(phase)
        return fn(*args, **kwargs)


def test_timer_sees_every_phase_of_a_step(tiny_cfg):
    rec = Recorder()
    tr = Trainer(tiny_cfg("train.max_steps=2", "model.moe.orthogonal_coef=1e-3"), quiet=True, timer=rec)
    tr.train()
    accum = tr.cfg.train.grad_accum_steps
    assert rec.phases.count("step") == 2 and rec.phases.count("callbacks") == 2
    assert rec.phases.count("data") == rec.phases.count("loss") == rec.phases.count("backward") == 2 * accum
    assert set(rec.phases) <= set(PHASES)
    assert {"sync", "grad_norm", "optimizer", "algorithm", "objective"} <= set(rec.phases)


def test_checkpoint_restores_every_stateful_part(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.max_steps=3", f"run.output_dir={tmp_path / 'r'}", "checkpoint.interval=3")
    tr = Trainer(cfg, quiet=True)
    tr.train()
    again = Trainer(tiny_cfg("train.max_steps=5", f"run.output_dir={tmp_path / 'r'}"), quiet=True)
    assert again.step == again.last_saved_step == 3
    assert again.task.train_loader.state_dict() == tr.task.train_loader.state_dict()
    assert again.spikes.state_dict() == tr.spikes.state_dict()
    assert set(again._stateful()) == {"spikes", "loader"}


def test_a_checkpoint_without_loader_state_is_refused_not_restarted(tiny_cfg):
    """A trainer_state.json that lost its data position cannot resume exactly: one clear error, nothing loaded."""
    import json

    import pytest

    from ernie5.errors import UserError
    from ernie5.train.checkpoint import finalize_checkpoint_dir
    from ernie5.train.trainer import Trainer

    import shutil
    from pathlib import Path

    cfg = tiny_cfg("train.max_steps=2", "checkpoint.interval=2")
    Trainer(cfg, quiet=True).train()
    step = Path(cfg.run.output_dir) / "checkpoints" / "step_00000002"
    tmp = step.parent / ".tmp-edit"
    shutil.copytree(step, tmp)
    state = json.loads((tmp / "trainer_state.json").read_text())
    del state["loader"]
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    (tmp / "manifest.json").unlink()
    finalize_checkpoint_dir(tmp, step, 2)  # a fresh manifest, so only the content is wrong
    with pytest.raises(UserError, match="no 'loader' state"):
        Trainer(cfg, quiet=True)
