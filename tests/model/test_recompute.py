"""Recompute (full and selective) gives the same loss, gradients and expert counts as no recompute."""

import numpy as np
import paddle
import pytest

from ernie5.runconfig import load_config
from ernie5.model.transformer import build_model, to_tensor_batch
from ernie5.objectives.text import make_text_batch, text_loss

BASE = ["model.vocab_size=61", "model.hidden_size=32", "model.num_layers=3", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_hidden_size=48", "model.moe.num_experts=4", "model.moe.top_k=2",
        "model.moe.expert_ffn_size=16", "model.moe.num_shared_experts=1", "model.moe.layer_start=1",
        "model.mtp.depth=1", "model.moe.aux_loss_coef=0.01"]


def grads_of(*recompute):
    cfg = load_config(None, BASE + list(recompute))
    model = build_model(cfg.model, seed=0, recompute=cfg.recompute)
    model.train()
    rng = np.random.default_rng(0)
    tokens, seg = rng.integers(0, 61, (2, 17)), np.array([[0] * 9 + [1] * 8] * 2)
    out = text_loss(model, to_tensor_batch(make_text_batch(tokens, seg, 1)), 0.3)
    out.total.backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    counts = [l.step_counts.copy() for l in model.moe_layers()]
    return float(out.total), grads, counts


@pytest.mark.parametrize("mode, calls", [
    (["recompute.mode=full"], 3),
    (["recompute.mode=full", "recompute.layers=[1]"], 1),
    (["recompute.mode=selective", "recompute.modules=[attention]"], 3),
    # norm_qkv in 3 layers; gate_up in each non-empty routed expert call and the shared expert of 2 MoE layers
    (["recompute.mode=selective", "recompute.modules=[norm_qkv, expert_gate_up]"], None),
    (["recompute.mode=selective", "recompute.modules=[attention, norm_qkv, expert_gate_up]"], None),
])
def test_recompute_matches_plain_backward(monkeypatch, mode, calls):
    import paddle.distributed.fleet.utils as fleet_utils

    loss0, g0, c0 = grads_of()
    real, seen = fleet_utils.recompute, []

    def counting(fn, *args, **kw):
        seen.append(fn)
        return real(fn, *args, **kw)

    monkeypatch.setattr(fleet_utils, "recompute", counting)
    loss1, g1, c1 = grads_of(*mode)
    assert len(seen) == calls if calls is not None else len(seen) > 6  # recompute really ran
    assert loss1 == loss0
    assert g0.keys() == g1.keys()
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for a, b in zip(c0, c1):  # loads are counted once per micro-batch, not again in the replay
        np.testing.assert_array_equal(a, b)
    assert sum(int(c.sum()) for c in c0) == 2 * 16 * 2 * 2  # 2 MoE layers x tokens x top-2


def test_recompute_layers_out_of_range_is_a_config_error():
    from ernie5.errors import UserError

    with pytest.raises(UserError, match="recompute.layers"):
        load_config(None, BASE + ["recompute.mode=full", "recompute.layers=[7]"])


@pytest.mark.parametrize("mode", [["recompute.mode=full"], ["recompute.mode=selective", "recompute.modules=[attention]"]])
def test_recompute_keeps_the_attention_tiles(monkeypatch, mode):
    """Recompute copies the mask (the copy carries no `key_spans`); the blocks read the spans first and pass
    them on, so attention still runs tile by tile in the first pass and in the replay."""
    import ernie5.model.attention as A

    seen = []
    real = A._gqa_dense
    monkeypatch.setattr(A, "_gqa_dense", lambda q, k, v, m: seen.append(q.shape[1]) or real(q, k, v, m))
    cfg = load_config(None, BASE + mode)
    model = build_model(cfg.model, seed=0, recompute=cfg.recompute)
    model.train()
    S = 2 * A.QUERY_TILE + 9
    tokens, seg = np.random.default_rng(1).integers(0, 61, (1, S + 1)), np.array([[0] * 100 + [1] * (S + 1 - 100)])
    text_loss(model, to_tensor_batch(make_text_batch(tokens, seg, 1)), 0.3).total.backward()
    # 4 blocks (3 layers + MTP) x 3 tiles, then each recomputed block's replay again
    assert len(seen) >= 4 * 3 and set(seen) == {A.QUERY_TILE, S - 2 * A.QUERY_TILE}
