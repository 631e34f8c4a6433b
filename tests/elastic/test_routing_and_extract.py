"""Masked routing, bias bookkeeping on sub-model steps, and exact extraction of sub-models."""

import numpy as np
import paddle
import pytest

from ernie5.runconfig import load_config
from ernie5.elastic.extract import extract, parse_submodel_spec, resolve_submodel
from ernie5.elastic.submodel import SubModel
from ernie5.errors import UserError
from ernie5.model.moe import MoELayer, Router
from ernie5.model.transformer import build_model

BASE = ["model.vocab_size=97", "model.hidden_size=32", "model.num_heads=4", "model.num_kv_heads=2",
        "model.ffn_hidden_size=48", "model.num_layers=5", "model.moe.num_experts=8", "model.moe.top_k=3",
        "model.moe.expert_ffn_size=16", "model.moe.num_shared_experts=1", "model.moe.layer_start=1",
        "model.mtp.depth=1"]


def run_cfg(*extra):
    return load_config(None, BASE + list(extra))


def test_masked_router_never_selects_a_dropped_expert_even_with_a_huge_bias():
    paddle.seed(0)
    cfg = run_cfg().model
    router = Router(32, cfg.moe, 1.0)
    kept = (1, 2, 5, 6)
    bias = np.zeros(8, np.float32)
    bias[[0, 3, 7]] = 100.0  # would win every selection if the bias were applied
    router.e_score_correction_bias.set_value(paddle.to_tensor(bias))
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(256, 32)).astype(np.float32))
    assert np.isin(router(x).topk_ids_TK.numpy(), [0, 3, 7]).all()  # full routing does use the bias
    for k in (1, 3):
        r = router(x, top_k=k, experts=kept)
        ids = r.topk_ids_TK.numpy()
        assert ids.shape == (256, k) and set(np.unique(ids)) <= set(kept)
        assert float(r.probs_TE.numpy()[:, [0, 3, 4, 7]].max()) == 0.0
        # probabilities are the softmax over the kept logits only; weights renormalised over the chosen k
        logits = x.numpy() @ router.weight.numpy()[:, kept]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        np.testing.assert_allclose(r.probs_TE.numpy()[:, kept], p, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r.topk_w_TK.numpy().sum(1), 1.0, rtol=1e-5)
        want = np.take_along_axis(p, np.argsort(-p, 1, kind="stable")[:, :k], 1)
        np.testing.assert_allclose(np.sort(r.topk_w_TK.numpy(), 1), np.sort(want / want.sum(1, keepdims=True), 1),
                                   rtol=1e-5)
    # a reduced k alone also ignores the bias
    assert not np.isin(router(x, top_k=2).topk_ids_TK.numpy(), [0, 3, 7]).all()


def test_gradients_stay_finite_through_masked_logits():
    paddle.seed(1)
    layer = MoELayer(run_cfg("model.moe.z_loss_coef=0.01", "model.moe.aux_loss_coef=0.01").model)
    layer.train()
    x = paddle.randn([2, 8, 32])
    x.stop_gradient = False
    y, aux = layer(x, SubModel(experts=(0, 1, 2, 3)))
    (y.sum() + aux).backward()
    g = layer.router.weight.grad.numpy()
    assert np.isfinite(g).all() and np.abs(g[:, 4:]).max() == 0.0 and np.abs(g[:, :4]).max() > 0
    assert np.isfinite(x.grad.numpy()).all()


def test_sub_model_routing_is_not_counted_for_the_bias_update():
    paddle.seed(2)
    layer = MoELayer(run_cfg().model)
    layer.train()
    x = paddle.randn([2, 8, 32])
    for sub in (SubModel(experts=(0, 1, 2, 3)), SubModel(top_k=1), SubModel((0, 2), (0, 1, 2, 3), 2)):
        layer(x, sub)
        assert layer.step_counts.sum() == 0, sub
    layer(x, SubModel(layers=(0, 2, 3, 4)))  # a depth-only cut routes like the full model: counted
    layer(x)
    assert layer.step_counts.sum() == 2 * 16 * 3


SUBS = [SubModel(layers=(0, 1, 3, 4)), SubModel(layers=(0, 4)), SubModel(experts=(1, 2, 5, 6)),
        SubModel(top_k=1), SubModel(top_k=2, experts=(0, 3, 4)), SubModel((0, 2, 4), (0, 1, 6, 7), 2)]


@pytest.mark.parametrize("sub", SUBS, ids=[s.kind + str(i) for i, s in enumerate(SUBS)])
def test_extracted_sub_model_equals_the_masked_full_model(sub):
    cfg = run_cfg()
    paddle.seed(3)
    full = build_model(cfg.model, seed=3)
    rng = np.random.default_rng(0)
    for layer in full.moe_layers():  # a trained-looking bias, so a wrong bias copy would show
        layer.router.e_score_correction_bias.set_value(paddle.to_tensor(rng.normal(0, 0.05, 8).astype(np.float32)))
    full.eval()
    state = {k: v.numpy() for k, v in full.state_dict().items()}
    new_cfg, new_state = extract(cfg, state, sub)
    small = build_model(new_cfg.model)
    small.set_state_dict({k: paddle.to_tensor(v) for k, v in new_state.items()})
    small.eval()
    assert new_cfg.model.num_layers == (5 if sub.layers is None else len(sub.layers))
    assert len(small.moe_layers()) == sum(1 for i in (sub.layers or range(5)) if i >= 1)
    assert small.moe_layers()[0].cfg.num_experts == (8 if sub.experts is None else len(sub.experts))
    ids = paddle.to_tensor(rng.integers(0, 97, (2, 24)))
    want = full(ids, submodel=sub).numpy()
    np.testing.assert_allclose(small(ids).numpy(), want, atol=1e-5, rtol=0)
    if sub.routing_is_full:  # the bias matters for a depth-only cut: check it is really in use
        for layer in small.moe_layers():
            assert np.abs(layer.router.e_score_correction_bias.numpy()).sum() > 0


def test_submodel_spec_parsing_and_errors():
    cfg = run_cfg("parallel.data=2", "parallel.expert=2")
    assert parse_submodel_spec("depth=3,experts=4,top_k=1") == {"depth": 3, "experts": 4, "top_k": 1}
    sub = resolve_submodel(cfg.model, cfg.elastic, 2, parse_submodel_spec("depth=3,experts=4,top_k=1"))
    assert sub.layers == (0, 2, 4) and sub.experts == (0, 1, 4, 5) and sub.top_k == 1
    sub = resolve_submodel(cfg.model, cfg.elastic, 2, parse_submodel_spec("depth=0+1+4,experts=2+3+4+7"))
    assert sub.layers == (0, 1, 4) and sub.experts == (2, 3, 4, 7) and sub.top_k is None
    for bad in ("depth", "width=3", "experts=a", "top_k=1+2", "", "experts=3", "experts=0+1+2+3", "top_k=4",
                "experts=2,top_k=3", "depth=9", "depth=0+0"):
        with pytest.raises(UserError) as e:
            resolve_submodel(cfg.model, cfg.elastic, 2, parse_submodel_spec(bad))
        assert e.value.where == "--submodel", bad
