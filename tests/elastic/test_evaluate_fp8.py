"""`ernie5 eval` (elastic evaluate) builds the model the way it was trained, FP8 recipe included."""

import numpy as np
import paddle

from ernie5.model.transformer import build_model


def test_eval_of_an_fp8_checkpoint_uses_fp8(tiny_cfg):
    from ernie5.runconfig import load_config
    from ernie5.evaluation.elastic import _held_out_sets, evaluate_elastic
    from ernie5.objectives.text import text_loss
    from ernie5.train.checkpoint import apply_model_state, load_model_weights, resolve_checkpoint
    from ernie5.train.trainer import Trainer

    cfg = tiny_cfg("precision.fp8.enabled=true", "precision.fp8.apply_to=all_linear", "train.max_steps=2",
                   "checkpoint.interval=2")
    Trainer(cfg, quiet=True).train()
    ckpt = resolve_checkpoint(cfg.run.output_dir)
    rows, _ = evaluate_elastic(str(ckpt), batches=2, grid=False)
    got = rows[0]["loss"]
    # references: the same weights and held-out batches in an FP8 model and in a plain fp32 model
    saved = load_config(ckpt / "config.yaml")
    data = _held_out_sets(saved, 2)["corpus"][1]

    def loss_of(fp8):
        model = build_model(saved.model, fp8=saved.precision.fp8 if fp8 else None)
        apply_model_state(model, load_model_weights(ckpt), str(ckpt))
        model.eval()
        with paddle.no_grad():
            outs = [text_loss(model, b, 0.0) for b in data]
        return sum(o.terms["loss_ntp"] * o.tokens for o in outs) / sum(o.tokens for o in outs)

    with_fp8, without = loss_of(True), loss_of(False)
    # the recipe changes the loss by ~1e-4 here, 100x the fp32 noise of one eval (~1e-6 relative): the check
    # below can tell the two apart
    assert abs(with_fp8 - without) > 2e-5
    np.testing.assert_allclose(got, with_fp8, rtol=1e-6)
